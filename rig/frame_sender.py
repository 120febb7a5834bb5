"""Publish frames to patchrig in the patchrig-frame/1 format (copy this file into any
acquisition program; it needs only numpy and pyzmq).

Wire format: a ZeroMQ PUB socket sends multipart messages
``[b"frame", header JSON (UTF-8), pixel bytes]`` with header::

    {"schema": "patchrig-frame/1", "frame_id": 17, "t": 1732523412.25,
     "shape": [512, 512], "dtype": "uint16", "order": "C", "um_per_px": 0.62, "z_um": -120.0}

``pixel bytes`` are the (h, w) uint8 or uint16 image in C order, native little-endian. The
daemon subscribes (``frames.source = "zmq"``, ``frames.zmq_endpoint``), keeps only the newest
frame and counts the ones it dropped. Example::

    with FrameSender("tcp://127.0.0.1:5560") as sender:
        while acquiring:
            sender.send(image, um_per_px=0.62, z_um=stage_z)

The sender binds by default (the acquisition program is the long-lived end); the PUB socket's
send high-water mark is small so a stalled subscriber never makes the acquisition wait: PUB
drops instead of blocking.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import numpy as np
import zmq

SCHEMA = "patchrig-frame/1"
TOPIC = b"frame"
MAX_FRAME_ID = 2**53  # the receiver's limits (rig/frame_sources.py), repeated: this file stands alone
MIN_SIDE_PX = 8
MAX_SIDE_PX = 16384


def encode_frame(
    pixels: np.ndarray,
    *,
    frame_id: int,
    um_per_px: float,
    z_um: float | None = None,
    t: float | None = None,
) -> list[bytes]:
    """The three message parts of one frame. ``pixels``: (h, w) uint8 or uint16, each side
    ``MIN_SIDE_PX``-``MAX_SIDE_PX``; ``frame_id``: an integer 0..``MAX_FRAME_ID``; ``t``: finite
    seconds since the epoch (default now). ValueError for anything the daemon would reject."""
    image = np.asarray(pixels)
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"frames must be 2D uint8 or uint16, got {image.dtype} {image.shape}")
    if not all(MIN_SIDE_PX <= side <= MAX_SIDE_PX for side in image.shape):
        raise ValueError(f"frame sides must be {MIN_SIDE_PX}-{MAX_SIDE_PX} pixels, got {image.shape}")
    if isinstance(frame_id, bool) or not isinstance(frame_id, int | np.integer) or not 0 <= frame_id <= MAX_FRAME_ID:
        raise ValueError(f"frame_id must be an integer from 0 to 2**53, got {frame_id!r}")
    if not 0 < um_per_px < float("inf"):
        raise ValueError(f"um_per_px must be positive and finite, got {um_per_px}")
    if z_um is not None and not abs(z_um) < float("inf"):
        raise ValueError(f"z_um must be finite or None, got {z_um}")
    if t is not None and not abs(t) < float("inf"):
        raise ValueError(f"t must be finite, got {t}")
    image = np.ascontiguousarray(image.astype(image.dtype.newbyteorder("<"), copy=False))
    header = {
        "schema": SCHEMA,
        "frame_id": int(frame_id),
        "t": float(time.time() if t is None else t),
        "shape": [int(image.shape[0]), int(image.shape[1])],
        "dtype": str(image.dtype.name),
        "order": "C",
        "um_per_px": float(um_per_px),
        "z_um": None if z_um is None else float(z_um),
    }
    return [TOPIC, json.dumps(header).encode("utf-8"), image.tobytes()]


class FrameSender:
    """A ZeroMQ PUB socket sending patchrig-frame/1 frames. Not thread-safe: one thread sends.

    ``bind=True`` binds ``endpoint`` (default); ``bind=False`` connects to it instead.
    ``send`` never blocks: when no subscriber keeps up, ZeroMQ drops the frame.
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5560",
        *,
        bind: bool = True,
        context: zmq.Context | None = None,
        high_water_mark: int = 16,
    ) -> None:
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, high_water_mark)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            if bind:
                self._socket.bind(endpoint)
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self._next_id = 0

    def send(
        self,
        pixels: np.ndarray,
        *,
        um_per_px: float,
        z_um: float | None = None,
        frame_id: int | None = None,
        t: float | None = None,
    ) -> int:
        """Send one frame; returns its frame_id (consecutive from 0 unless given)."""
        fid = self._next_id if frame_id is None else int(frame_id)
        parts = encode_frame(pixels, frame_id=fid, um_per_px=um_per_px, z_um=z_um, t=t)
        with contextlib.suppress(zmq.Again):  # no room: PUB semantics, the frame is dropped
            # copy=True: a frame is a few hundred kB, so copying costs ~0.1 ms, and zero-copy
            # sends would start pyzmq's garbage-collector thread in the acquisition program
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
        self._next_id = fid + 1
        return fid

    def send_parts(self, parts: list[bytes]) -> None:
        """Send raw message parts (for tests of malformed input)."""
        self._socket.send_multipart(parts, flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> FrameSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python frame_sender.py [ENDPOINT] [--seconds S] [--rate HZ]``: a moving test pattern."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="frame_sender.py",
        description="Publish a moving 512x512 uint16 test pattern in patchrig-frame/1 (Ctrl-C stops).",
    )
    parser.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5560",
                        help="endpoint to bind (default tcp://127.0.0.1:5560)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to publish (default 10)")
    parser.add_argument("--rate", type=float, default=30.0, help="frames per second (default 30)")
    parser.add_argument("--um-per-px", type=float, default=0.62, help="pixel size in the header (default 0.62)")
    args = parser.parse_args(argv)
    if not (0 < args.rate <= 1000 and 0 <= args.seconds < float("inf") and 0 < args.um_per_px < float("inf")):
        parser.error("--rate must be in (0, 1000], --seconds finite and >= 0, --um-per-px positive")
    try:
        sender = FrameSender(args.endpoint)
    except zmq.ZMQError as exc:
        print(f"frame_sender.py: error: cannot bind {args.endpoint}: {exc}", file=sys.stderr)
        return 1
    yy, xx = np.mgrid[0:512, 0:512]
    n = 0
    try:
        print(f"publishing a test pattern on {sender.endpoint} for {args.seconds:g} s at {args.rate:g} Hz", flush=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            frame = ((xx + 3 * n) % 256 * 200 + yy).astype(np.uint16)
            sender.send(frame, um_per_px=args.um_per_px)
            n += 1
            time.sleep(max(0.0, t0 + n / args.rate - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        sender.close()
    print(f"sent {n} frames", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
