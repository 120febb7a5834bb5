"""The tip localiser in a child process, so that model inference never holds the daemon's GIL.

Measured on the 2-core machine (4 client processes pinging the daemon while the shipped model
localises 30 frames/s): command round trip p99 13.9 ms with the model in a daemon thread,
4.8 ms with the same work in a child process, 1.3 ms with no localisation at all. The daemon's
server loop, controllers and stoppers are Python threads; inference pre/post-processing is
Python too, and the interpreter lock makes the loop wait behind it.

``ProcessLocaliser.start(checkpoint, device, threads)`` spawns the child, which loads
``localisation.inference.TipLocaliser`` and then answers one frame at a time over a pipe:
request = a JSON header (shape, dtype, um_per_px) then the raw pixel bytes; reply = JSON
detections. No pickling of frames or results. ``locate`` has the ``Localiser`` signature.
A child that dies makes ``locate`` raise (the daemon then has no fresh tips: the watchdog stops
closed-loop operations); ``close`` stops and joins it.

A child that does not answer within ``CALL_TIMEOUT_S`` is killed (a frame is never sent to a
child that stopped reading: the pipe would fill and the send would block for ever, holding
the lock that ``close`` needs), and the next ``locate`` starts a new one. ``close`` never waits
more than ``CLOSE_LOCK_WAIT_S`` for a call in progress: it kills the child, which ends that
call with an error.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
import time
from typing import Any

import numpy as np

from localisation.types import TipDetection
from rig.errors import ConfigError, PatchrigError

START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 30.0
CLOSE_LOCK_WAIT_S = 1.0
RESPAWN_BACKOFF_S = 30.0  # after a failed restart, frames are refused this long before the next try


def _serve(conn: Any, checkpoint: str | None, device: str, threads: int | None) -> None:
    """Child process main: load the model, then localise frames until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the daemon decides
    try:
        import cv2
        import torch

        from localisation.inference import TipLocaliser

        localiser = TipLocaliser.load(checkpoint, device=device, threads=threads)
        if threads is not None:
            torch.set_num_threads(int(threads))
        # OpenCV's own thread pool (resampling, crops) would compete with torch's threads for
        # the same cores: 29.0 -> 25.9 ms per 512x512 frame on 2 cores with it off
        cv2.setNumThreads(1)
        conn.send_bytes(json.dumps({"ok": True, "device": str(localiser.device), "checkpoint": localiser.checkpoint}).encode())
    except Exception as exc:  # report why, then exit
        conn.send_bytes(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        conn.close()
        return
    while True:
        try:
            header = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if header.get("stop"):
            break
        raw = conn.recv_bytes()
        try:
            pixels = np.frombuffer(raw, dtype=np.dtype(header["dtype"])).reshape(header["shape"])
            found = localiser.locate(pixels, float(header["um_per_px"]))
            reply = {"ok": True, "tips": [[d.x_px, d.y_px, d.score] for d in found]}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply["seq"] = header.get("seq")  # the parent matches replies to requests by it
        conn.send_bytes(json.dumps(reply).encode())
    conn.close()


class ProcessLocaliser:
    """A ``Localiser`` whose model runs in a child process (see the module docstring)."""

    def __init__(
        self, process: Any, conn: Any, device: str, checkpoint: str, start_args: tuple[Any, ...] = ()
    ) -> None:
        self._process = process
        self._conn = conn
        self.device = device
        self.checkpoint = checkpoint
        self._start_args = start_args  # (checkpoint, device, threads): to replace a hung child
        self._lock = threading.Lock()
        self._closed = False
        self._hung = False  # the child was killed after a call timed out; the next call restarts it
        self._next_respawn_s = 0.0  # monotonic time before which no restart is tried
        self._seq = 0  # request number; a reply that arrives after its call timed out is skipped

    @classmethod
    def start(cls, checkpoint: str | None = None, device: str = "auto", threads: int | None = None) -> ProcessLocaliser:
        process, parent, hello = cls._spawn(checkpoint, device, threads)
        return cls(process, parent, hello["device"], hello["checkpoint"], (checkpoint, device, threads))

    @staticmethod
    def _spawn(
        checkpoint: str | None, device: str, threads: int | None, started: Any = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Start a child and wait for its hello: (process, pipe end, hello); ConfigError if the
        model does not load. ``started(process)`` is called before the wait."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_serve, args=(child, checkpoint, device, threads), name="patchrig-localiser", daemon=True)
        process.start()
        child.close()
        if started is not None:
            started(process)
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise ConfigError(f"the localiser process did not start within {START_TIMEOUT_S:.0f} s")
            hello = json.loads(parent.recv_bytes())
        except (EOFError, OSError) as exc:
            hello = {"ok": False, "error": f"the localiser process exited ({exc})"}
        except BaseException:
            process.kill()
            process.join()
            parent.close()
            raise
        if not hello.get("ok"):
            process.join(timeout=5.0)
            parent.close()
            raise ConfigError(f"cannot load the localiser: {hello.get('error')}")
        return process, parent, hello

    def _kill_child(self) -> None:
        """Kill the child now (it hung, or ``close`` cannot wait for it)."""
        with contextlib.suppress(Exception):
            self._process.kill()
            self._process.join(timeout=5.0)

    def _replace_hung_child(self) -> None:
        """Start a new child in place of one killed after a timeout (called under the lock).
        A restart that fails is tried again only after ``RESPAWN_BACKOFF_S``: not a model
        load per frame."""
        if not self._start_args:
            raise PatchrigError("the localiser process hung and was stopped")
        if time.monotonic() < self._next_respawn_s:
            raise PatchrigError("the localiser process hung and could not be restarted; "
                                f"the next try is at most {RESPAWN_BACKOFF_S:.0f} s after the last")

        def started(process: Any) -> None:  # ``close`` can kill it while it loads
            self._process = process

        checkpoint, device, threads = self._start_args
        with contextlib.suppress(OSError):
            self._conn.close()
        try:
            self._process, self._conn, _ = self._spawn(checkpoint, device, threads, started)
        except Exception as exc:
            self._next_respawn_s = time.monotonic() + RESPAWN_BACKOFF_S
            raise PatchrigError(f"the localiser process hung and could not be restarted ({exc})") from None
        self._hung = False

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
        """The child's detections for THIS frame. Safety: every request is numbered, and a
        late reply to an earlier request (one whose call timed out) is read and dropped, never
        returned as this frame's tips."""
        array = np.ascontiguousarray(pixels)
        with self._lock:
            if self._closed:
                raise PatchrigError("the localiser process is closed")
            if self._hung:
                self._replace_hung_child()
            self._seq += 1
            header = {"seq": self._seq, "shape": list(array.shape), "dtype": array.dtype.str,
                      "um_per_px": float(um_per_px)}
            try:
                self._conn.send_bytes(json.dumps(header).encode())
                self._conn.send_bytes(array.data.cast("B"))  # C-contiguous: no copy
                deadline = time.monotonic() + CALL_TIMEOUT_S
                while True:
                    if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                        self._hung = True
                        self._kill_child()
                        raise PatchrigError(f"the localiser process did not answer within {CALL_TIMEOUT_S:.0f} s; "
                                            "it was stopped and is restarted for the next frame")
                    reply = json.loads(self._conn.recv_bytes())
                    if reply.get("seq") == self._seq:
                        break  # older replies belong to calls that already timed out
            except (EOFError, OSError) as exc:  # the child crashed (out of memory, a fault): restart it too
                self._hung = True
                self._kill_child()
                raise PatchrigError(f"the localiser process died ({exc}); it is restarted for the next frame") from None
        if not reply.get("ok"):
            raise PatchrigError(f"localiser failed: {reply.get('error')}")
        return [TipDetection(float(x), float(y), float(s)) for x, y, s in reply["tips"]]

    def close(self) -> None:
        """Stop the child and join it. Never waits more than ``CLOSE_LOCK_WAIT_S`` for a call in
        progress: a child that keeps it longer is killed (that call then raises)."""
        if not self._lock.acquire(timeout=CLOSE_LOCK_WAIT_S):
            self._kill_child()
            self._lock.acquire()  # the call in progress ends at once: its child is gone
        try:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError, ValueError):  # already gone: nothing to tell it
                self._conn.send_bytes(json.dumps({"stop": True}).encode())
        finally:
            self._lock.release()
        self._process.join(timeout=10.0)
        if self._process.is_alive():
            self._kill_child()
        self._conn.close()
