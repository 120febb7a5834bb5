"""Python client of patchrig-rpc/1: typed methods, timeouts, retries, telemetry subscription.

    from rig.client import PatchrigClient
    with PatchrigClient("tcp://127.0.0.1:5555") as rig:
        rig.calibrate("A")
        rig.move_tip("A", target_px=[256, 256])
        print(rig.get_position("A"))

Reliability: the "lazy pirate" pattern. Each call sends on a REQ socket and polls for the reply
for ``timeout_s``; when none comes, the socket is closed (linger 0) and re-created, and the
request is sent again, up to ``retries`` more times, then ``RpcTimeout`` is raised. Replies are
matched by ``id``. Queries, ``stop`` and ``stop_all`` are re-sent; ``calibrate``, ``move_tip``,
``set_tip`` and ``shutdown`` never are (``NEVER_RESENT``), nor is ``move`` sent through the typed
methods or ``motion`` (waiting or not): a repeat would supersede, and start again from wherever
it had got to, an operation that may still be running. Long operations called with
``wait=True`` get a per-call timeout (``op_timeout_s``) instead of the short default.

Errors: a reply with ``ok: false`` raises ``RpcError`` carrying the wire ``code``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import zmq

from rig.errors import ConfigError
from rig.protocol import RpcError, make_request

DEFAULT_COMMAND_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TELEMETRY_ENDPOINT = "tcp://127.0.0.1:5556"
#: methods a timeout never re-sends: a repeat would restart the routine part-way
NEVER_RESENT = frozenset({"calibrate", "move_tip", "set_tip", "shutdown"})


class RpcTimeout(RpcError):
    """No reply after every retry (the daemon is down, unreachable, or refused the client)."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


def _curve_keys(curve_dir: str | Path | None) -> Any:
    if curve_dir is None:
        return None
    from rig.curve import ClientKeys

    return ClientKeys.load(Path(curve_dir))


class PatchrigClient:
    """A synchronous patchrig-rpc/1 client (one REQ socket; not for concurrent use by threads).

    ``timeout_s``: reply timeout of quick calls; ``op_timeout_s``: of ``wait=True`` motion
    calls; ``retries``: resends after a timeout; ``curve_dir``: CURVE keys (``client.key_secret``
    and ``server.key``) when the daemon requires authentication.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_COMMAND_ENDPOINT,
        *,
        timeout_s: float = 5.0,
        op_timeout_s: float = 120.0,
        retries: int = 2,
        curve_dir: str | Path | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.op_timeout_s = float(op_timeout_s)
        self.retries = int(retries)
        self._keys = _curve_keys(curve_dir)
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.resends = 0

    # -- plumbing -------------------------------------------------------------------------
    def _connect(self) -> zmq.Socket:
        sock = self._context.socket(zmq.REQ)
        sock.linger = 0
        try:
            if self._keys is not None:
                self._keys.apply(sock)
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)  # an open socket would make context.term() wait for ever
            raise ConfigError(f"cannot connect to {self.endpoint!r}: {exc}") from None
        return sock

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset()
        if self._own_context:
            self._context.term()

    def __enter__(self) -> PatchrigClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None,
             retries: int | None = None) -> dict[str, Any]:
        """Send one request; return its ``result`` or raise ``RpcError``/``RpcTimeout``. A
        method in ``NEVER_RESENT`` is sent once, whatever ``retries`` says."""
        request_id = f"{self._prefix}-{next(self._ids)}"
        payload = make_request(method, params, request_id)
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        attempts = 1 if method in NEVER_RESENT else 1 + (self.retries if retries is None else int(retries))
        for attempt in range(attempts):
            if self._socket is None:
                self._socket = self._connect()
            if attempt > 0:
                self.resends += 1
            self._socket.send(payload)
            deadline = time.monotonic() + timeout
            while True:
                remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                    self._reset()  # lazy pirate: a REQ socket cannot send again without a reply
                    break
                reply = json.loads(self._socket.recv())
                if reply.get("id") != request_id:  # a late answer to an older request: skip
                    if reply.get("id") is None and not reply.get("ok", True):
                        return self._result(reply)
                    self._reset()
                    break
                return self._result(reply)
        if method in NEVER_RESENT:
            raise RpcTimeout(f"{method}: no reply from {self.endpoint} within {timeout:.1f} s; not re-sent (it would "
                             "start again): it may still be running, see status or the op topic")
        raise RpcTimeout(f"{method}: no reply from {self.endpoint} after {attempts} attempt(s) of {timeout:.1f} s")

    @staticmethod
    def _result(reply: dict[str, Any]) -> dict[str, Any]:
        if reply.get("ok"):
            return dict(reply.get("result") or {})
        error = reply.get("error") or {}
        code = error.get("code", "internal")
        try:
            raise RpcError(code, str(error.get("message", "")))
        except ValueError:
            raise RpcError("internal", f"{code}: {error.get('message', '')}") from None

    def motion(self, method: str, params: dict[str, Any], wait: bool, timeout_s: float | None = None) -> dict[str, Any]:
        """A motion call (``move``, ``move_tip``, ``calibrate``), never re-sent: a resent
        ``move`` would supersede, and so restart, the one running. With ``wait``: a quick
        ``ping`` first, so that a daemon that is not there is reported within ``timeout_s``,
        not after the operation's long timeout."""
        params = {**params, "wait": wait}
        if wait:
            try:
                self.call("ping", retries=0)
            except RpcTimeout:
                raise RpcTimeout(f"{method}: the daemon at {self.endpoint} does not answer (no reply to a ping "
                                 f"within {self.timeout_s:.1f} s); nothing was sent") from None
            return self.call(method, params, timeout_s=self.op_timeout_s if timeout_s is None else timeout_s,
                             retries=0)
        # not re-sent either: a second move would supersede (stop, then restart) the first
        return self.call(method, params, timeout_s=self.timeout_s if timeout_s is None else timeout_s, retries=0)

    # -- typed methods --------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def get_position(self, channel: str) -> list[float]:
        """Read-back position of ``channel`` (device µm)."""
        return list(self.call("get_position", {"channel": channel})["position_um"])

    def move(self, channel: str, position_um: Sequence[float], speed_um_s: float | None = None, *,
             wait: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
        """Open-loop move to ``position_um`` (device µm). ``wait=False`` returns ``{"op": id}``."""
        params: dict[str, Any] = {"channel": channel, "position_um": [float(v) for v in position_um]}
        if speed_um_s is not None:
            params["speed_um_s"] = float(speed_um_s)
        return self.motion("move", params, wait, timeout_s)

    def move_tip(self, channel: str, *, target_px: Sequence[float] | None = None,
                 target_um: Sequence[float] | None = None, tolerance_um: float | None = None,
                 max_iterations: int | None = None, speed_um_s: float | None = None,
                 wait: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
        """Closed-loop: bring the tip to ``target_px`` (pixels) or ``target_um`` (microscope µm)."""
        params: dict[str, Any] = {"channel": channel}
        if target_px is not None:
            params["target_px"] = [float(v) for v in target_px]
        if target_um is not None:
            params["target_um"] = [float(v) for v in target_um]
        if tolerance_um is not None:
            params["tolerance_um"] = float(tolerance_um)
        if max_iterations is not None:
            params["max_iterations"] = int(max_iterations)
        if speed_um_s is not None:
            params["speed_um_s"] = float(speed_um_s)
        return self.motion("move_tip", params, wait, timeout_s)

    def locate(self) -> dict[str, Any]:
        """Tips on the newest localised frame, each with its channel (or null)."""
        return self.call("locate")

    def calibrate(self, channel: str, *, wait: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
        return self.motion("calibrate", {"channel": channel}, wait, timeout_s)

    def set_tip(self, channel: str, px: Sequence[float] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"channel": channel}
        if px is not None:
            params["px"] = [float(v) for v in px]
        return self.call("set_tip", params)

    def get_calibration(self, channel: str) -> dict[str, Any]:
        return self.call("get_calibration", {"channel": channel})

    def stop(self, channel: str) -> dict[str, Any]:
        return self.call("stop", {"channel": channel})

    def stop_all(self) -> dict[str, Any]:
        return self.call("stop_all")

    def shutdown(self) -> dict[str, Any]:
        return self.call("shutdown", retries=0)

    def lease(self, action: str, holder: str, lease_s: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"action": action, "holder": holder}
        if lease_s is not None:
            params["lease_s"] = float(lease_s)
        return self.call("lease", params)


class TelemetrySubscriber:
    """A SUB socket on the daemon's telemetry: ``recv`` returns ``(topic, message)``.

    ``topics``: the topics to receive (default: all). Iterate it for a stream, or use
    ``wait_for(predicate, timeout_s)`` to block until a matching message arrives.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_TELEMETRY_ENDPOINT,
        topics: Sequence[str] = (),
        *,
        curve_dir: str | Path | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.linger = 0
        keys = _curve_keys(curve_dir)
        if keys is not None:
            keys.apply(self._socket)
        for topic in topics or [""]:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(endpoint)

    def recv(self, timeout_s: float | None = 1.0) -> tuple[str, dict[str, Any]] | None:
        """The next message, or None after ``timeout_s`` (None: wait forever)."""
        if timeout_s is not None and not self._socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        topic, payload = self._socket.recv_multipart()
        return topic.decode(), json.loads(payload)

    def wait_for(self, predicate: Any, timeout_s: float) -> tuple[str, dict[str, Any]] | None:
        """The first message for which ``predicate(topic, message)`` is true, or None."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            item = self.recv(remaining)
            if item is not None and predicate(*item):
                return item
        return None

    def wait_op(self, op_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The final ``op`` message (done, failed or stopped) of operation ``op_id``."""
        item = self.wait_for(
            lambda t, m: t == "op" and m.get("op") == op_id and m.get("state") in ("done", "failed", "stopped"),
            timeout_s,
        )
        return None if item is None else item[1]

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            item = self.recv(None)
            if item is not None:
                yield item

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> TelemetrySubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
