"""The patchrig-rpc/1 command server: one ROUTER socket, one loop thread that only dispatches.

Flow: the loop thread receives ``[identity, (empty,) payload]``, parses and validates the
payload (``rig.protocol.parse_request``) and hands the request to the ``handler`` with a
``Responder``. Fast methods (``ping``, ``status``, ``stop``, ``stop_all``, ...) answer at once
from the loop thread; slow ones run in per-channel workers or a small query pool and answer
later through ``Responder``, whose reply travels to the loop thread over an inproc PUSH/PULL
pair (a ZeroMQ socket is only ever used by one thread at a time). So the loop never blocks one
client on another's long operation, and ``stop``/``stop_all`` are never queued behind anything.

Hostile input: anything that is not one frame of valid JSON gets ``bad_request`` (or
``unknown_method``/``invalid_params``) and touches nothing. Messages above
``max_message_bytes`` are answered with ``bad_request``; above ``hard_limit_bytes`` ZeroMQ
itself drops the connection (memory protection). Replies never pickle: JSON only.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from rig.errors import ConfigError
from rig.logs import get_logger
from rig.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Request,
    RpcError,
    error_reply,
    exception_reply,
    ok_reply,
    parse_request,
    peek_id,
)

Handler = Callable[[Request, "Responder"], None]

_ids = itertools.count(1)


def normalise_endpoint(endpoint: str) -> str:
    """``tcp://host:0`` -> ``tcp://host:*`` (ZeroMQ's spelling of "any free port")."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-2] + ":*"
    return endpoint


class Responder:
    """Answers one request exactly once, from any thread."""

    __slots__ = ("_server", "_routing", "request_id", "method", "received_s", "_done", "_lock")

    def __init__(self, server: CommandServer, routing: list[bytes], request: Request) -> None:
        self._server = server
        self._routing = routing
        self.request_id = request.id
        self.method = request.method
        self.received_s = time.monotonic()
        self._done = False
        self._lock = threading.Lock()

    @property
    def answered(self) -> bool:
        return self._done

    def ok(self, result: dict[str, Any] | None = None) -> None:
        self._send(ok_reply(self.request_id, result))

    def error(self, exc: BaseException) -> None:
        self._send(exception_reply(self.request_id, exc))

    def _send(self, payload: bytes) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._server._deliver(self._routing, payload)


class CommandServer:
    """The ROUTER socket and its loop thread. ``handler(request, responder)`` must answer
    through ``responder`` (now or later) and must not block: raise ``PatchrigError`` for a
    one-line error."""

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        handler: Handler,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        curve_keys: Any = None,
    ) -> None:
        self._context = context
        self._handler = handler
        self.max_message_bytes = int(max_message_bytes)
        self.hard_limit_bytes = max(16 * self.max_message_bytes, 1 << 20)
        self.log = get_logger("patchrig.server")
        self.stats = {"requests": 0, "errors": 0, "malformed": 0}
        self._refuse_reason: str | None = None
        self._stop = threading.Event()
        self._loop_ident: int | None = None

        from rig.curve import is_loopback_endpoint

        if curve_keys is None and not is_loopback_endpoint(endpoint):
            raise ConfigError(
                f"command endpoint {endpoint} is not loopback: set [server] curve_dir "
                "(keys from `patchrig keygen DIR`) so that clients must authenticate"
            )
        self._router = context.socket(zmq.ROUTER)
        self._router.linger = 0
        self._router.setsockopt(zmq.MAXMSGSIZE, self.hard_limit_bytes)
        self._router.rcvhwm = 10000
        self._router.sndhwm = 10000
        if curve_keys is not None:
            curve_keys.apply(self._router)
        try:
            self._router.bind(normalise_endpoint(endpoint))
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            raise ConfigError(f"cannot bind the command socket to {endpoint}: {exc} "
                              "(is another patchrig daemon running there?)") from None
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        inproc = f"inproc://patchrig-replies-{id(self)}-{next(_ids)}"
        self._pull = context.socket(zmq.PULL)
        self._pull.linger = 0
        self._pull.bind(inproc)
        self._push = context.socket(zmq.PUSH)
        self._push.linger = 0
        self._push.sndhwm = 100000
        self._push.connect(inproc)
        self._push_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="patchrig-server", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self.log.info("command server listening", endpoint=self.endpoint)

    def refuse_new(self, reason: str) -> None:
        """From now on every request is answered ``stopped`` with ``reason`` (shutdown)."""
        self._refuse_reason = reason

    def close(self) -> None:
        """Stop the loop, deliver pending replies, close the sockets (linger 0)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        with self._push_lock:
            self._push.close(linger=0)
        if not self._router.closed:
            self._router.close(linger=0)
        if not self._pull.closed:
            self._pull.close(linger=0)

    @property
    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_ident

    # -- replies --------------------------------------------------------------------------
    def _deliver(self, routing: list[bytes], payload: bytes) -> None:
        if self.in_loop_thread:
            self._send_router(routing, payload)
            return
        with self._push_lock:
            if self._push.closed:
                return
            try:
                self._push.send_multipart([*routing, payload], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self.log.warning("reply dropped", error=str(exc))

    def _send_router(self, routing: list[bytes], payload: bytes) -> None:
        try:
            self._router.send_multipart([*routing, payload], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or its queue full: drop, never block
            self.log.info("reply not delivered", error=str(exc))

    # -- loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if self._pull in events:
                    self._drain_replies()
                if self._router in events:
                    for _ in range(256):
                        try:
                            frames = self._router.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._handle_frames(frames)
                        self._drain_replies()
            self._drain_replies()
        finally:
            self._router.close(linger=0)
            self._pull.close(linger=0)

    def _drain_replies(self) -> None:
        while True:
            try:
                frames = self._pull.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send_router(frames[:-1], frames[-1])

    def _handle_frames(self, frames: list[bytes]) -> None:
        self.stats["requests"] += 1
        identity, rest = frames[0], frames[1:]
        if b"" in rest:  # REQ (or DEALER imitating it): routing envelope up to the delimiter
            cut = rest.index(b"") + 1
            routing, body = [identity, *rest[:cut]], rest[cut:]
        else:
            routing, body = [identity], rest
        if len(body) != 1:
            self.stats["malformed"] += 1
            self._send_router(routing, error_reply(None, "bad_request", f"expected one message frame, got {len(body)}"))
            return
        payload = body[0]
        try:
            request = parse_request(payload, max_bytes=self.max_message_bytes)
        except RpcError as exc:
            self.stats["malformed"] += 1
            request_id = peek_id(payload) if len(payload) <= self.max_message_bytes else None
            self._send_router(routing, error_reply(request_id, exc.code, str(exc)))
            return
        if self._refuse_reason is not None:
            self._send_router(routing, error_reply(request.id, "stopped", self._refuse_reason))
            return
        responder = Responder(self, routing, request)
        try:
            self._handler(request, responder)
        except Exception as exc:
            self.stats["errors"] += 1
            if not isinstance(exc, RpcError) and getattr(exc, "code", "internal") == "internal":
                self.log.exception("handler failed", method=request.method)
            responder.error(exc)
