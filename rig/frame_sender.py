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


def encode_frame(
    pixels: np.ndarray,
    *,
    frame_id: int,
    um_per_px: float,
    z_um: float | None = None,
    t: float | None = None,
) -> list[bytes]:
    """The three message parts of one frame. ``pixels``: (h, w) uint8 or uint16."""
    image = np.asarray(pixels)
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"frames must be 2D uint8 or uint16, got {image.dtype} {image.shape}")
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
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
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
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


if __name__ == "__main__":  # a 10 s test pattern: python frame_sender.py [ENDPOINT]
    endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5560"
    yy, xx = np.mgrid[0:512, 0:512]
    with FrameSender(endpoint) as sender:
        print(f"publishing a test pattern on {sender.endpoint} for 10 s")
        for i in range(300):
            frame = ((xx + 3 * i) % 256 * 200 + yy).astype(np.uint16)
            sender.send(frame, um_per_px=0.62)
            time.sleep(1 / 30)
