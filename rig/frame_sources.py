"""Where the daemon's frames come from, behind one interface.

- ``SimulatedFrameSource``: frames of an in-process ``SimMicroscope``;
- ``ZmqFrameSource``: a ZeroMQ SUB of patchrig-frame/1 (``[b"frame", header JSON, bytes]``, see
  ``rig.frame_sender``), keeping only the newest frame;
- ``ReplayFrameSource``: a TIFF stack or a folder of PNG/TIFF images, replayed at a fixed rate.

Every source keeps only its newest frame (``latest``), lets a consumer wait for a frame that
arrived after the one it has (``wait_for_frame``), and counts ``received`` (accepted) frames, ``dropped``
frames (superseded before anyone could take them, or missing from the sender's frame_id
sequence) and ``rejected`` frames (malformed: wrong part count, bad header JSON, missing or
wrong fields, truncated bytes, wrong size or dtype). A rejected frame is logged and counted and
the source keeps going. The first accepted frame fixes the frame geometry (shape and dtype);
later frames that differ are rejected as mismatched, because calibrations are only valid for
one pixel geometry.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from rig.errors import ConfigError, DataError
from rig.frame import Frame
from rig.logs import get_logger

SCHEMA = "patchrig-frame/1"
MAX_FRAME_ID = 2**53  # exact in a JSON number everywhere
MIN_SIDE_PX = 8  # the localiser needs at least 8x8 pixels; a smaller frame would fix the stream's geometry
MAX_PLAUSIBLE_GAP = 100_000  # a larger jump in frame_id is a renumbering, not lost frames
RECENT_IDS_KEPT = 4096  # frames whose arrival order wait_for_frame remembers (2 min at 30 Hz)
_DTYPES: dict[str, np.dtype] = {"uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16)}


# what a replayed TIFF stack may hold (int16, as ScanImage saves, is clipped at 0 to uint16)
_REPLAY_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16))


class FrameRejected(ValueError):
    """A frame was malformed or did not match the stream's geometry."""


class FrameSource:
    """Base class: newest-frame buffer, waiting, and counters. Subclasses call
    ``_accept(frame)`` for each good frame and ``_reject(reason)`` for each bad one."""

    name = "frames"

    def __init__(self, *, expected_shape: tuple[int, int] | None = None, expected_dtype: str | None = None) -> None:
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._taken_id: int | None = None
        # arrival order of recent frames: frame_id -> the arrival number of the newest frame with
        # that id (bounded), so that "newer" survives a sender that restarts its numbering
        self._arrivals = 0
        self._arrival_of_id: OrderedDict[int, int] = OrderedDict()
        self._received = 0
        self._dropped = 0
        self._rejected = 0
        self._expected_shape = tuple(expected_shape) if expected_shape is not None else None
        self._expected_dtype = np.dtype(expected_dtype) if expected_dtype is not None else None
        self._log = get_logger("rig.frame_sources", source=self.name)
        self._closed = False

    # -- consumer side ---------------------------------------------------------------------
    def start(self) -> None:
        """Start delivering frames."""

    def close(self) -> None:
        """Stop delivering frames and release resources; wakes any waiter."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def latest(self) -> Frame | None:
        """The newest frame, or None if none has arrived."""
        with self._cond:
            if self._latest is not None:
                self._taken_id = self._latest.frame_id
            return self._latest

    def wait_for_frame(self, after_frame_id: int | None, timeout_s: float) -> Frame | None:
        """The newest frame, once it arrived after the frame with id ``after_frame_id`` (any
        frame if None), waiting up to ``timeout_s``; None on timeout or when closed.

        "After" is arrival order for the last ``RECENT_IDS_KEPT`` frames, so a sender that
        restarts its numbering never leaves a consumer waiting for ever; an id the source has
        not seen recently falls back to "a higher id"."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            while True:
                f = self._latest
                if f is not None and self._arrived_after(f, after_frame_id):
                    self._taken_id = f.frame_id
                    return f
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(remaining)

    def _arrived_after(self, frame: Frame, after_frame_id: int | None) -> bool:
        """Whether ``frame`` (the latest) arrived after the frame with id ``after_frame_id``
        (call with ``self._cond`` held)."""
        if after_frame_id is None:
            return True
        arrival = self._arrival_of_id.get(after_frame_id)
        if arrival is None:
            return frame.frame_id > after_frame_id
        return self._arrivals > arrival

    @property
    def stats(self) -> dict[str, int]:
        """Counters: received (accepted), dropped (superseded or lost), rejected (malformed)."""
        with self._cond:
            return {"received": self._received, "dropped": self._dropped, "rejected": self._rejected}

    def __enter__(self) -> FrameSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- producer side ---------------------------------------------------------------------
    def _check_geometry(self, shape: tuple[int, int], dtype: np.dtype) -> None:
        if self._expected_shape is not None and shape != self._expected_shape:
            raise FrameRejected(f"shape {list(shape)} does not match the stream's {list(self._expected_shape)}")
        if self._expected_dtype is not None and dtype != self._expected_dtype:
            raise FrameRejected(f"dtype {dtype} does not match the stream's {self._expected_dtype}")

    def _accept(self, frame: Frame, *, superseded: int = 0) -> None:
        with self._cond:
            self._check_geometry(frame.shape, frame.pixels.dtype)
            if self._expected_shape is None:
                self._expected_shape = frame.shape
            if self._expected_dtype is None:
                self._expected_dtype = frame.pixels.dtype
            old = self._latest
            if old is not None and self._taken_id != old.frame_id:
                self._dropped += 1
            self._dropped += superseded
            self._latest = frame
            self._received += 1
            self._arrivals += 1
            self._arrival_of_id[frame.frame_id] = self._arrivals
            self._arrival_of_id.move_to_end(frame.frame_id)
            if len(self._arrival_of_id) > RECENT_IDS_KEPT:
                self._arrival_of_id.popitem(last=False)
            self._cond.notify_all()

    def _count_lost(self, n: int) -> None:
        with self._cond:
            self._dropped += n

    def _reject(self, reason: str) -> None:
        with self._cond:
            self._rejected += 1
            n = self._rejected
        if n <= 5 or n % 100 == 0:
            self._log.warning("frame rejected", reason=reason, rejected_total=n)


# --------------------------------------------------------------------------------------------
# simulated


class SimulatedFrameSource(FrameSource):
    """Frames from an in-process ``simulators.microscope.SimMicroscope``. ``start`` subscribes
    (and starts the microscope if it was not running; ``close`` then stops it again)."""

    name = "simulated"

    def __init__(self, microscope: Any) -> None:
        super().__init__()
        self.microscope = microscope
        self._unsubscribe: Any = None
        self._started_microscope = False

    def start(self) -> None:
        if self._unsubscribe is not None:
            return
        self._unsubscribe = self.microscope.subscribe(self._on_frame)
        if not self.microscope.running:
            self.microscope.start()
            self._started_microscope = True

    def _on_frame(self, frame: Frame) -> None:
        try:
            self._accept(frame)
        except FrameRejected as exc:
            self._reject(str(exc))

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._started_microscope:
            self.microscope.close()
            self._started_microscope = False
        super().close()


# --------------------------------------------------------------------------------------------
# ZeroMQ


def decode_frame(parts: list[bytes], *, received_s: float | None = None) -> Frame:
    """Decode one patchrig-frame/1 message; raises FrameRejected saying what is wrong."""
    if len(parts) != 3:
        raise FrameRejected(f"expected 3 message parts, got {len(parts)}")
    topic, raw_header, data = parts
    if bytes(topic) != b"frame":
        raise FrameRejected(f"topic must be b'frame', got {bytes(topic)[:20]!r}")
    try:
        header = json.loads(bytes(raw_header).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameRejected(f"header is not UTF-8 JSON ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # integers of > 4300 digits, nesting too deep
        raise FrameRejected(f"header is not usable JSON ({type(exc).__name__}: {str(exc)[:80]})") from exc
    if not isinstance(header, dict):
        raise FrameRejected("header must be a JSON object")
    missing = [k for k in ("schema", "frame_id", "t", "shape", "dtype", "um_per_px") if k not in header]
    if missing:
        raise FrameRejected(f"header lacks {', '.join(missing)}")
    if header["schema"] != SCHEMA:
        raise FrameRejected(f"schema must be {SCHEMA!r}, got {header['schema']!r}")
    fid = header["frame_id"]
    if not isinstance(fid, int) or isinstance(fid, bool) or not 0 <= fid <= MAX_FRAME_ID:
        raise FrameRejected(f"frame_id must be an integer from 0 to 2**53, got {_short(fid)}")
    t = header["t"]
    if not _finite(t):
        raise FrameRejected(f"t must be a finite number, got {_short(t)}")
    shape = header["shape"]
    if not (
        isinstance(shape, list) and len(shape) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and MIN_SIDE_PX <= s <= 16384 for s in shape)
    ):
        raise FrameRejected(f"shape must be [h, w] integers from {MIN_SIDE_PX} to 16384, got {_short(shape)}")
    dtype: np.dtype | None = _DTYPES.get(header["dtype"]) if isinstance(header["dtype"], str) else None
    if dtype is None:
        raise FrameRejected(f"dtype must be 'uint8' or 'uint16', got {header['dtype']!r}")
    if header.get("order", "C") != "C":
        raise FrameRejected(f"order must be 'C', got {header.get('order')!r}")
    upx = header["um_per_px"]
    if not _finite(upx) or upx <= 0:
        raise FrameRejected(f"um_per_px must be a positive number, got {_short(upx)}")
    z = header.get("z_um")
    if z is not None and not _finite(z):
        raise FrameRejected(f"z_um must be a number or null, got {_short(z)}")
    h, w = shape
    expected = h * w * dtype.itemsize
    buf = memoryview(data)
    if buf.nbytes != expected:
        raise FrameRejected(f"pixel data has {buf.nbytes} bytes, header says {expected} ({h}x{w} {dtype})")
    pixels = np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(h, w).astype(dtype, copy=False)
    pixels.setflags(write=False)
    return Frame(
        frame_id=fid,
        t_s=float(t),
        pixels=pixels,
        um_per_px=float(upx),
        z_um=None if z is None else float(z),
        received_s=time.monotonic() if received_s is None else received_s,
    )


def frames_lost_between(previous_id: int | None, frame_id: int) -> int:
    """Frames missing from the sender's sequence between ``previous_id`` and ``frame_id``: 0
    for the next id, and for a restart or a jump above ``MAX_PLAUSIBLE_GAP`` (a renumbering,
    not lost frames)."""
    if previous_id is None or not previous_id + 1 < frame_id <= previous_id + MAX_PLAUSIBLE_GAP:
        return 0
    return frame_id - previous_id - 1


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about untrusted input."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


class ZmqFrameSource(FrameSource):
    """A ZeroMQ SUB socket receiving patchrig-frame/1 from ``endpoint`` (connects; the
    acquisition program binds). A receiver thread drains everything queued and keeps only the
    newest valid frame (ZMQ_CONFLATE cannot be used with multipart messages); frames it skips,
    and gaps in the sender's frame_id sequence, count as dropped."""

    name = "zmq"

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        expected_shape: tuple[int, int] | None = None,
        expected_dtype: str | None = None,
        receive_hwm: int = 16,
    ) -> None:
        super().__init__(expected_shape=expected_shape, expected_dtype=expected_dtype)
        self.endpoint = endpoint
        self._context = context
        self._receive_hwm = receive_hwm
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_seen_id: int | None = None
        self._renumberings = 0  # times the sender's frame_id went back or jumped
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="frames-zmq", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)
        if self._error is not None:
            self.close()
            raise ConfigError(f"cannot subscribe to {self.endpoint}: {self._error}")

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        super().close()

    def _run(self) -> None:
        own = self._context is None
        ctx = self._context or zmq.Context()
        sock = None
        try:
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, self._receive_hwm)
            sock.setsockopt(zmq.SUBSCRIBE, b"frame")
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            if sock is not None:
                sock.close(linger=0)
            if own:
                ctx.term()
            return
        self._ready.set()
        self._log.info("subscribed", endpoint=self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                newest: Frame | None = None
                skipped = 0
                while True:  # drain: keep only the newest valid frame
                    try:
                        parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    frame = self._decode(parts)
                    if frame is None:
                        continue
                    if newest is not None:
                        skipped += 1
                    newest = frame
                if newest is not None:
                    try:
                        self._accept(newest, superseded=skipped)
                    except FrameRejected as exc:
                        self._reject(str(exc))
        finally:
            sock.close(linger=0)
            if own:
                ctx.term()

    def _decode(self, parts: list[bytes]) -> Frame | None:
        try:
            frame = decode_frame(parts)
            with self._cond:
                self._check_geometry(frame.shape, frame.pixels.dtype)
        except FrameRejected as exc:
            self._reject(str(exc))
            return None
        except Exception as exc:  # whatever a message holds, the receiver thread must live on
            self._reject(f"undecodable message ({type(exc).__name__}: {str(exc)[:80]})")
            return None
        last = self._last_seen_id
        if last is not None and frame.frame_id == last:
            # ids must change from frame to frame: consumers wait for "a frame after id N", and a
            # repeated id would leave them waiting in silence (no localisation, no correction)
            self._reject(f"frame_id {frame.frame_id} repeats the previous frame's; each frame needs a new id")
            return None
        lost = frames_lost_between(last, frame.frame_id)
        if lost:
            self._count_lost(lost)
        elif last is not None and (frame.frame_id < last or frame.frame_id > last + MAX_PLAUSIBLE_GAP):
            # the sender restarted or renumbered: frames are still taken, newest first
            self._renumberings += 1
            if self._renumberings <= 5 or self._renumberings % 100 == 0:  # no flood from a sender that never counts
                self._log.warning("frame_id sequence restarted", previous=last, now=frame.frame_id,
                                  restarts_total=self._renumberings)
        self._last_seen_id = frame.frame_id
        return frame


# --------------------------------------------------------------------------------------------
# replay


def _check_replay_series(tif: Any) -> None:
    """DataError for a TIFF whose pages are not one frame each: several series (a thumbnail
    beside the stack), or a channel axis (an ImageJ/ScanImage stack of 2 channels would
    replay channel 1, channel 2, channel 1, ... as if each were a new frame)."""
    if len(tif.series) != 1:
        raise DataError(f"{len(tif.series)} image series (a thumbnail or several stacks); replay needs one")
    series = tif.series[0]
    axes, shape = str(series.axes), tuple(series.shape)
    if "C" in axes and shape[axes.index("C")] > 1:
        raise DataError(f"{shape[axes.index('C')]} channels (axes {axes}, shape {list(shape)}); replay needs one "
                        "channel: save each channel as its own stack")


class ReplayFrameSource(FrameSource):
    """Replays a multi-page TIFF stack, or a folder of PNG/TIFF images (sorted by name), at
    ``rate_hz``, looping by default. Images are read lazily; colour is converted to grey;
    signed 16-bit pixels (ScanImage) become uint16 with negative values set to 0. A stack whose
    pixels are not 8/16-bit integers (float, 32-bit) is refused when the source is made.
    An unreadable image or page is rejected, counted and logged, and replay goes on."""

    name = "replay"

    def __init__(
        self,
        path: str | Path,
        rate_hz: float,
        um_per_px: float,
        *,
        z_um: float | None = None,
        loop: bool = True,
    ) -> None:
        super().__init__()
        if not (rate_hz > 0 and math.isfinite(rate_hz)):
            raise ConfigError(f"replay rate must be positive, got {rate_hz}")
        if not (um_per_px > 0 and math.isfinite(um_per_px)):
            raise ConfigError(f"replay um_per_px must be positive, got {um_per_px}")
        self.path = Path(path).expanduser()
        self.rate_hz = float(rate_hz)
        self.um_per_px = float(um_per_px)
        self.z_um = z_um
        self.loop = loop
        self._files: list[Path] = []
        self._tiff: Any = None
        if self.path.is_dir():
            self._files = sorted(
                p for p in self.path.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff") and p.is_file()
            )
            if not self._files:
                raise ConfigError(f"{self.path}: no PNG or TIFF images to replay")
            self.n_frames = len(self._files)
        elif self.path.is_file():
            import tifffile

            try:
                self._tiff = tifffile.TiffFile(self.path)
                self.n_frames = len(self._tiff.pages)
                if self.n_frames == 0:
                    raise DataError("no readable pages")
                _check_replay_series(self._tiff)
                page_dtype = np.dtype(self._tiff.pages[0].dtype)
                if page_dtype not in _REPLAY_DTYPES:
                    raise DataError(f"pixels are {page_dtype}; replay needs 8- or 16-bit integer frames")
            except Exception as exc:
                if self._tiff is not None:
                    self._tiff.close()
                raise ConfigError(f"{self.path}: cannot open as a TIFF stack ({exc})") from exc
        else:
            raise ConfigError(f"{self.path}: replay path does not exist")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._tiff_lock = threading.Lock()
        self.finished = threading.Event()

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` as an (h, w) uint8/uint16 array (colour converted to grey, contiguous
        or planar); raises DataError if unreadable."""
        if self._files:
            from localisation.dataset_format import load_image

            return load_image(self._files[index])
        with self._tiff_lock:
            try:
                page = self._tiff.pages[index]
                image = np.asarray(page.asarray())
                if getattr(page, "samplesperpixel", 1) > 1 and page.planarconfig == 2:  # separate planes
                    image = np.moveaxis(image, 0, -1)  # (samples, h, w) -> (h, w, samples)
            except Exception as exc:
                raise DataError(f"{self.path}: page {index} unreadable ({exc})") from exc
        if image.dtype == np.int16:  # ScanImage saves int16: negative values are noise around 0
            image = np.maximum(image, 0).astype(np.uint16)
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            image = np.clip(image + 0.5, 0, 65535).astype(np.uint16)
        if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
            raise DataError(f"{self.path}: page {index} is {image.dtype} {image.shape}, not 2D 8/16-bit")
        return image

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="frames-replay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        super().close()

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.monotonic()
        frame_id = 0
        index = 0
        while not self._stop.is_set():
            if index >= self.n_frames:
                if not self.loop:
                    self.finished.set()
                    return
                index = 0
            try:
                pixels = self.read(index)
                pixels.setflags(write=False)
                frame = Frame(frame_id, time.time(), pixels, self.um_per_px, self.z_um, time.monotonic())
                self._accept(frame)
            except (DataError, FrameRejected) as exc:
                self._reject(f"frame {index}: {exc}")
            except Exception as exc:  # whatever a file holds, replay goes on
                self._reject(f"frame {index}: unreadable ({type(exc).__name__}: {str(exc)[:80]})")
            frame_id += 1
            index += 1
            next_t += period
            delay = next_t - time.monotonic()
            if delay < 0:
                next_t = time.monotonic()
            else:
                self._stop.wait(delay)


# --------------------------------------------------------------------------------------------
# factory


def build_frame_source(cfg: Any, microscope: Any = None, *, um_per_px: float | None = None) -> FrameSource:
    """The frame source a config asks for. ``cfg``: ``config.models.FramesConfig`` or a whole
    ``RigConfig`` (then the replay pixel size defaults to ``rig.um_per_px``). ``microscope``:
    the ``SimMicroscope`` for ``source = "simulated"``. Not started."""
    frames = getattr(cfg, "frames", cfg)
    if um_per_px is None and hasattr(cfg, "rig"):
        um_per_px = cfg.rig.um_per_px
    if frames.source == "simulated":
        if microscope is None:
            raise ConfigError("frames.source 'simulated' needs a simulated microscope")
        return SimulatedFrameSource(microscope)
    if frames.source == "zmq":
        return ZmqFrameSource(frames.zmq_endpoint)
    if frames.source == "replay":
        if frames.replay_path is None:
            raise ConfigError("frames.source 'replay' needs frames.replay_path")
        if um_per_px is None:
            raise ConfigError("replay needs the pixel size (rig.um_per_px)")
        return ReplayFrameSource(frames.replay_path, frames.replay_rate_hz, um_per_px, z_um=frames.focal_z_um)
    raise ConfigError(f"unknown frames.source {frames.source!r}")
