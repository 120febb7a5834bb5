"""The telemetry publisher: one ZeroMQ PUB socket, multipart ``[topic, JSON]``.

Topics (patchrig-rpc/1):
- ``heartbeat``: at ``heartbeat_hz`` (1 Hz by default), the daemon's short status;
- ``tips``: every localised frame: detections in pixels, their channel assignment, latency;
- ``position``: manipulator read-backs (device µm);
- ``op``: progress and completion of operations started with ``wait: false`` (and all others);
- ``event``: warnings, alarms, e-stops (``{"level": "info"|"warning"|"alarm", "kind", ...}``).

Any thread may call ``publish``: messages go through a bounded queue to the one thread that
owns the socket, so a slow network never blocks a controller; when the queue is full the
message is dropped and counted (``stats["dropped"]``). Every message carries ``t`` (time.time()).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from rig.logs import get_logger
from rig.protocol import dumps

TOPICS = ("heartbeat", "tips", "position", "op", "event")

_STOP = object()


class TelemetryPublisher:
    """Owns the PUB socket (already bound by the caller or bound here) and its thread.

    ``heartbeat`` returns the heartbeat payload; it is called from the publisher thread.
    """

    def __init__(
        self,
        socket: zmq.Socket,
        *,
        heartbeat: Callable[[], dict[str, Any]] | None = None,
        heartbeat_hz: float = 1.0,
        queue_size: int = 2048,
    ) -> None:
        self._socket = socket
        self._heartbeat = heartbeat
        self._period_s = 1.0 / heartbeat_hz
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._seq = 0
        self.stats = {"published": 0, "dropped": 0, "heartbeats": 0}
        self.log = get_logger("patchrig.telemetry")
        self._thread = threading.Thread(target=self._run, name="patchrig-telemetry", daemon=True)
        self._started = False

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def publish(self, topic: str, payload: dict[str, Any]) -> bool:
        """Queue ``payload`` on ``topic``; False (and counted) if the queue is full."""
        if topic not in TOPICS:
            raise ValueError(f"unknown telemetry topic {topic!r}")
        message = dict(payload)
        message.setdefault("t", time.time())
        try:
            self._queue.put_nowait((topic, message))
            return True
        except queue.Full:
            with self._lock:
                self.stats["dropped"] += 1
            return False

    def event(self, level: str, kind: str, message: str, **fields: Any) -> None:
        """Publish an ``event`` (``level``: info, warning or alarm) and log it."""
        log = self.log.warning if level in ("warning", "alarm") else self.log.info
        log(kind, level=level, message=message, **fields)
        self.publish("event", {"level": level, "kind": kind, "message": message, **fields})

    def close(self, final: dict[str, Any] | None = None, timeout_s: float = 2.0) -> None:
        """Flush queued messages (and ``final`` as a last heartbeat), then stop the thread.
        The caller closes the socket afterwards."""
        if not self._started:
            return
        if final is not None:
            self.publish("heartbeat", final)
        while True:
            try:
                self._queue.put(_STOP, timeout=timeout_s)
                break
            except queue.Full:
                continue
        self._thread.join(timeout=timeout_s + 1.0)
        self._started = False

    # -- thread ---------------------------------------------------------------------------
    def _send(self, topic: str, message: dict[str, Any]) -> None:
        try:
            self._socket.send_multipart([topic.encode(), dumps(message)], flags=zmq.NOBLOCK)
            with self._lock:
                self.stats["published"] += 1
        except zmq.Again:
            with self._lock:
                self.stats["dropped"] += 1
        except zmq.ZMQError as exc:
            self.log.warning("telemetry send failed", error=str(exc))

    def _run(self) -> None:
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if self._heartbeat is not None and now >= next_beat:
                next_beat = max(next_beat + self._period_s, now)
                try:
                    beat = self._heartbeat()
                except Exception as exc:  # a heartbeat bug must not silence telemetry
                    beat = {"state": "error", "error": str(exc)}
                self._seq += 1
                beat = {"seq": self._seq, "t": time.time(), **beat}
                self.stats["heartbeats"] += 1
                self._send("heartbeat", beat)
            timeout = max(0.0, next_beat - time.monotonic()) if self._heartbeat else 0.5
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is _STOP:
                return
            self._send(*item)
