"""The rig daemon: frame acquisition, localiser worker, controllers, command server, telemetry,
watchdog, and their orderly shutdown.

Threads (all joined by ``close``): the server loop; one controller worker per channel; the
position poller; the localiser worker (when frames and a localiser are given); the watchdog;
the telemetry publisher; a small query pool for requests that read devices (``get_position``,
``locate``, ``set_tip``). Queues are bounded everywhere: each controller holds at most one
pending operation, the query pool refuses work beyond ``MAX_QUERIES`` with ``busy``, the
frame source keeps only the newest frame, telemetry drops (and counts) beyond its queue.

Shutdown (SIGINT, SIGTERM via ``serve_forever``'s caller, or the ``shutdown`` request): refuse
new commands (``stopped``), cancel every operation, stop every manipulator in parallel,
publish the final status (a last ``heartbeat`` with ``state: "stopped"``), close the sockets
with linger 0, join every thread, close the devices.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import zmq

from config.models import RigConfig
from manipulators.base import Manipulator
from rig.closed_loop import ClosedLoop
from rig.controllers import ChannelController, Operation, PositionPoller, halt_all, move_body
from rig.curve import ServerKeys, is_loopback_endpoint, start_authenticator
from rig.errors import Busy, ConfigError, DeviceError, InvalidParams, NoFrame, NotFound, Stopped
from rig.localiser_worker import LocaliserWorker
from rig.logs import get_logger
from rig.protocol import MOTION_METHODS, PROTOCOL, Request
from rig.server import CommandServer, Responder, normalise_endpoint
from rig.telemetry import TelemetryPublisher
from rig.watchdog import Lease, Watchdog

MAX_QUERIES = 32
MAX_CHECKS = 16  # motion requests whose checks read a device, in flight at once
SWITCH_INTERVAL_S = 0.001
MEMORY_POSITION_DRIVERS = frozenset({"simulated", "scientifica"})
"""Drivers whose position read-back is served from memory without waiting on the device (the
Scientifica driver's port thread keeps a polled cache): ``get_position`` on them is answered
in the server loop. Others (the Sensapex SDK may query the device under its lock) go to the
query pool so that a dead device never stalls the loop."""


def _describe(op: Operation | None) -> dict[str, Any] | None:
    """An operation's description, or None (for a value read once: it may end meanwhile)."""
    return None if op is None else op.describe()


class Daemon:
    """The assembled daemon. Build it, ``start()`` it, ``close()`` it (idempotent).

    ``manipulators``: channel name -> Manipulator (the daemon closes them, the frame source and
    the localiser when ``owns_devices``).
    ``frames``: a FrameSource (or None: ``locate``/closed-loop methods answer ``no_frame``).
    ``localiser``: anything with ``locate(pixels, um_per_px)``. ``calibration``: ``"auto"``
    (default) builds a ``calibration.service.CalibrationService`` on the frames and the
    localiser worker's shared model (store in ``calibration_dir``, default the config's), when
    both exist; or pass a service object; or None (closed-loop methods answer
    ``not_calibrated``). Endpoints default to the config's; ``tcp://127.0.0.1:0`` picks a port.
    """

    def __init__(
        self,
        cfg: RigConfig,
        manipulators: dict[str, Manipulator],
        *,
        frames: Any = None,
        localiser: Any = None,
        calibration: Any = "auto",
        calibration_dir: Path | None = None,
        command_endpoint: str | None = None,
        telemetry_endpoint: str | None = None,
        curve_dir: Path | None = None,
        owns_devices: bool = True,
        localiser_device: str = "cpu",
        device_silent_s: float = 2.0,
        position_rate_hz: float = 5.0,
    ) -> None:
        self.cfg = cfg
        self.manipulators = dict(manipulators)
        self.frames = frames
        self.localiser = localiser
        self.owns_devices = owns_devices
        self.log = get_logger("patchrig.daemon")
        self.started_s = time.monotonic()
        self.state = "starting"
        self._closing = threading.Lock()
        self._closed = threading.Event()
        self._shutdown_requested = threading.Event()
        self._shutdown_thread: threading.Thread | None = None
        self._query_slots = threading.BoundedSemaphore(MAX_QUERIES)
        self._check_slots = threading.BoundedSemaphore(MAX_CHECKS)

        command_endpoint = command_endpoint or cfg.server.command_endpoint
        telemetry_endpoint = telemetry_endpoint or cfg.server.telemetry_endpoint
        curve_dir = curve_dir if curve_dir is not None else cfg.server.curve_dir
        for ep in (command_endpoint, telemetry_endpoint):
            if curve_dir is None and not is_loopback_endpoint(ep):
                raise ConfigError(
                    f"endpoint {ep} is not loopback: set [server] curve_dir (keys from "
                    "`patchrig keygen DIR`) so that only authenticated clients get in"
                )
        keys = ServerKeys.load(curve_dir) if curve_dir is not None else None

        self.context = zmq.Context()
        self._auth = None
        self._pub: zmq.Socket | None = None
        self.server: CommandServer | None = None
        try:
            if keys is not None:
                self._auth = start_authenticator(self.context, keys)
            self._pub = self.context.socket(zmq.PUB)
            self._pub.linger = 0
            self._pub.sndhwm = 10000
            if keys is not None:
                keys.apply(self._pub)
            try:
                self._pub.bind(normalise_endpoint(telemetry_endpoint))
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot bind the telemetry socket to {telemetry_endpoint}: {exc} "
                                  "(is another patchrig daemon running there?)") from None
            self.telemetry_endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.telemetry = TelemetryPublisher(
                self._pub, heartbeat=self._heartbeat, heartbeat_hz=cfg.server.heartbeat_hz
            )
            publish = self.telemetry.publish
            self.controllers = {
                name: ChannelController(name, m, publish=publish) for name, m in self.manipulators.items()
            }
            self.closed_loop = ClosedLoop(self, None)
            self.poller = PositionPoller(self.controllers, publish=publish, rate_hz=position_rate_hz)
            self.localiser_worker: LocaliserWorker | None = None
            if frames is not None and localiser is not None:
                self.localiser_worker = LocaliserWorker(
                    frames,
                    localiser,
                    min_score=cfg.localiser.min_score,
                    um_per_px_range=cfg.localiser.um_per_px_range,
                    rig_um_per_px=cfg.rig.um_per_px,
                    on_detections=self.closed_loop.on_detections,
                    publish=publish,
                    device=localiser_device,
                )
            if isinstance(calibration, str) and calibration == "auto":
                calibration = None
                if self.localiser_worker is not None:
                    from calibration.service import CalibrationService

                    calibration = CalibrationService(
                        cfg.rig,
                        cfg.calibration,
                        self.manipulators,
                        frames,
                        self.localiser_worker.shared_localiser(),
                        store_dir=calibration_dir,
                        focal_z_um=cfg.frames.focal_z_um,
                        stale_after_s=cfg.frames.stale_after_s,
                        min_score=cfg.localiser.min_score,
                        um_per_px_range=cfg.localiser.um_per_px_range,
                        z_up_signs={c.name: float(c.z_up_sign) for c in cfg.channels},
                    )
            self.calibration = calibration
            self.closed_loop.service = calibration
            self.lease = Lease(cfg.server.lease_s)
            self.watchdog = Watchdog(
                self.controllers,
                event=self.telemetry.event,
                stop_all=lambda reason: self.stop_all_async(reason),  # never waits for a device
                lease=self.lease,
                frame_age_s=self._frame_age_s if frames is not None else None,
                stale_after_s=cfg.frames.stale_after_s,
                device_silent_s=device_silent_s,
            )
            self.queries = ThreadPoolExecutor(max_workers=4, thread_name_prefix="patchrig-query")
            # motion requests' checks: never queued behind queries (a locate waiting for a frame)
            self.checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="patchrig-check")
            self.server = CommandServer(
                self.context,
                command_endpoint,
                self._handle,
                max_message_bytes=cfg.server.max_message_bytes,
                curve_keys=keys,
            )
            self.command_endpoint = self.server.endpoint
        except BaseException:
            self._abort_construction()
            raise

    def _abort_construction(self) -> None:
        for ctl in getattr(self, "controllers", {}).values():
            ctl.close()
        for pool in (getattr(self, "queries", None), getattr(self, "checks", None)):
            if pool is not None:
                pool.shutdown(wait=True)
        if self._pub is not None:
            self._pub.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.context.term()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Daemon:
        """Start every thread; the daemon serves from now on.

        Sets the interpreter's thread switch interval to ``SWITCH_INTERVAL_S`` (1 ms instead of
        5 ms) for the whole process: the server loop must get the GIL back quickly from busy
        threads (localiser pre/post-processing, drivers), or command replies wait up to 5 ms.
        """
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        if self.frames is not None and hasattr(self.frames, "start"):
            self.frames.start()
        self.telemetry.start()
        self.poller.poll_once()
        self.poller.start()
        if self.localiser_worker is not None:
            self.localiser_worker.start()
        self.watchdog.start()
        assert self.server is not None
        self.server.start()
        self.state = "running"
        self.telemetry.event("info", "started", "daemon started", command=self.command_endpoint, telemetry=self.telemetry_endpoint)
        return self

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_shutdown(self, reason: str = "shutdown requested") -> None:
        """Begin shutdown from any thread (signal handler, the server loop): new commands are
        refused at once; a background thread runs ``close``."""
        if self._shutdown_requested.is_set():
            return
        self._shutdown_requested.set()
        self.state = "shutting_down"
        if self.server is not None:
            self.server.refuse_new(f"daemon is shutting down ({reason})")
        self.log.info("shutdown requested", reason=reason)
        self._shutdown_thread = threading.Thread(target=self.close, args=(reason,), name="patchrig-shutdown", daemon=True)
        self._shutdown_thread.start()

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        return self._closed.wait(timeout_s)

    def serve_forever(self) -> None:
        """Block until shut down (a ``shutdown`` request or ``request_shutdown``)."""
        while not self._closed.wait(0.2):
            pass

    def close(self, reason: str = "shutdown") -> None:
        """Graceful shutdown; idempotent and safe from any thread but the server loop."""
        if not self._closing.acquire(blocking=False):
            self._closed.wait(30.0)
            self._join_shutdown_thread()
            return
        try:
            self._shutdown_requested.set()
            self.state = "shutting_down"
            assert self.server is not None
            self.server.refuse_new(f"daemon is shutting down ({reason})")
            self.log.info("shutting down", reason=reason)
            errors = self.stop_all("shutdown")
            for ctl in self.controllers.values():
                ctl.close()
            self.watchdog.close()
            if self.localiser_worker is not None:
                self.localiser_worker.close()
            self.poller.close()
            self.queries.shutdown(wait=True, cancel_futures=True)
            self.checks.shutdown(wait=True, cancel_futures=True)
            try:
                self.closed_loop.close()
            except Exception as exc:
                self.log.warning("calibration not persisted", error=str(exc))
            self.state = "stopped"
            final = self.status()
            final["stop_errors"] = errors
            self.telemetry.event("info", "stopped", "daemon stopped", reason=reason)
            self.telemetry.close(final=final)
            time.sleep(0.1)  # let the I/O thread put the last messages on the wire
            self.server.close()
            if self._pub is not None:
                self._pub.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self.context.term()
            if self.owns_devices:
                if self.frames is not None and hasattr(self.frames, "close"):
                    self.frames.close()
                if self.localiser is not None and hasattr(self.localiser, "close"):
                    self.localiser.close()
                for m in self.manipulators.values():
                    try:
                        m.close()
                    except Exception as exc:
                        self.log.warning("device close failed", channel=m.name, error=str(exc))
            self.log.info("daemon stopped")
        finally:
            self._closed.set()
        self._join_shutdown_thread()

    def _join_shutdown_thread(self) -> None:
        t = self._shutdown_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=30.0)

    # -- shared actions -------------------------------------------------------------------
    def stop_all_async(self, reason: str, done: Any = None) -> None:
        """E-stop: cancel every operation and halt every device in parallel, each from its
        channel's stopper thread (never queued behind operations). ``done(errors)`` is called
        once every device answered; the ``e-stop`` event goes out then."""

        def finished(errors: dict[str, str | None]) -> None:
            failed = {k: v for k, v in errors.items() if v}
            level = "alarm" if failed else ("info" if reason == "shutdown" else "warning")
            self.telemetry.event(level, "e-stop", f"all manipulators stopped ({reason})", reason=reason, errors=failed)
            if done is not None:
                done(errors)

        halt_all(list(self.controllers.values()), reason, finished)

    def stop_all(self, reason: str = "stop_all", timeout_s: float = 10.0) -> dict[str, str | None]:
        """``stop_all_async`` and wait for every device (the watchdog and shutdown use it)."""
        box: dict[str, dict[str, str | None]] = {}
        ready = threading.Event()

        def done(errors: dict[str, str | None]) -> None:
            box["errors"] = errors
            ready.set()

        self.stop_all_async(reason, done)
        if not ready.wait(timeout_s):
            return {n: "no answer to stop" for n in self.controllers}
        return box["errors"]

    def controller(self, channel: str) -> ChannelController:
        ctl = self.controllers.get(channel)
        if ctl is None:
            raise NotFound(f"unknown channel {channel!r}; channels: {', '.join(self.controllers)}")
        return ctl

    def _newest_frame(self) -> Any:
        """The newest frame the localiser worker took (or, without one, the source's newest).
        The worker's view is preferred: it is what closed-loop control sees, and asking the
        source marks its newest frame as taken, which would hide drops from its counters."""
        if self.localiser_worker is not None:
            result = self.localiser_worker.latest
            return None if result is None else result.frame
        return self.frames.latest() if self.frames is not None else None

    def _frame_age_s(self) -> float | None:
        latest = self._newest_frame()
        return None if latest is None else time.monotonic() - latest.received_s

    # -- status ---------------------------------------------------------------------------
    def _heartbeat(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "uptime_s": time.monotonic() - self.started_s,
            "channels": {n: {"op": _describe(c.current), "device_error": c.device_error} for n, c in self.controllers.items()},
            "frame_age_s": self._frame_age_s() if self.frames is not None else None,
            "lease": self.lease.describe(),
        }

    def status(self) -> dict[str, Any]:
        """The daemon's state from cached values only (fast; the server loop calls it)."""
        frames: dict[str, Any] | None = None
        if self.frames is not None:
            latest = self._newest_frame()
            frames = {
                "latest_frame_id": None if latest is None else latest.frame_id,
                "age_s": None if latest is None else time.monotonic() - latest.received_s,
                "shape": None if latest is None else list(latest.shape),
                "um_per_px": None if latest is None else latest.um_per_px,
                **dict(getattr(self.frames, "stats", {}) or {}),
            }
        localiser = None
        if self.localiser_worker is not None:
            localiser = {"device": self.localiser_worker.device, **self.localiser_worker.stats}
        channels = {}
        for name, ctl in self.controllers.items():
            channels[name] = {**ctl.describe(), "calibrated": self.closed_loop.is_calibrated(name)}
        return {
            "protocol": PROTOCOL,
            "state": self.state,
            "rig": self.cfg.rig.model_dump(),
            "uptime_s": time.monotonic() - self.started_s,
            "command_endpoint": self.command_endpoint,
            "telemetry_endpoint": self.telemetry_endpoint,
            "channels": channels,
            "frames": frames,
            "localiser": localiser,
            "lease": self.lease.describe(),
            "alarms": list(self.watchdog.alarms),
            "server": dict(self.server.stats) if self.server else None,
            "telemetry": dict(self.telemetry.stats),
        }

    # -- request handling (server loop thread: never block) -------------------------------
    def _handle(self, request: Request, responder: Responder) -> None:
        method = request.method
        p = request.params
        if method == "ping":
            responder.ok({"pong": True, "protocol": PROTOCOL, "t": time.time()})
        elif method == "status":
            responder.ok(self.status())
        elif method == "stop":
            ctl = self.controller(p.channel)  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            ctl.cancel_ops("stop")

            def stopped(error: str | None) -> None:
                ms = (time.perf_counter() - t0) * 1e3
                if error:
                    self.telemetry.event("alarm", "stop", f"channel {ctl.name}: stop failed: {error}", channel=ctl.name)
                    responder.error(DeviceError(f"stop failed: {error}", channel=ctl.name))
                else:
                    self.telemetry.event("info", "stop", f"channel {ctl.name} stopped", channel=ctl.name)
                    responder.ok({"channel": ctl.name, "stopped": True, "ms": ms})

            ctl.halt_async("stop", stopped)
        elif method == "stop_all":
            t0 = time.perf_counter()
            self.stop_all_async("stop_all", lambda errors: responder.ok(
                {"stopped": [n for n, e in errors.items() if not e], "errors": {n: e for n, e in errors.items() if e},
                 "all_stopped": not any(errors.values()), "ms": (time.perf_counter() - t0) * 1e3}
            ))
        elif method == "shutdown":
            responder.ok({"shutting_down": True})
            self.request_shutdown("shutdown request")
        elif method == "lease":
            result = self.lease.apply(p.action, p.holder, p.lease_s)  # type: ignore[attr-defined]
            self.telemetry.event("info", "lease", f"lease {p.action} by {p.holder!r}", **result)  # type: ignore[attr-defined]
            responder.ok(result)
        elif method == "get_calibration":  # reads the device position: not in the loop
            self.controller(p.channel)  # type: ignore[attr-defined]
            self._query(responder, lambda: self.closed_loop.get_calibration(p.channel))  # type: ignore[attr-defined]
        elif method == "get_position":
            ctl = self.controller(p.channel)  # type: ignore[attr-defined]
            if ctl.manipulator.driver_name in MEMORY_POSITION_DRIVERS:
                responder.ok(self._get_position(ctl))
            else:
                self._query(responder, lambda: self._get_position(ctl))
        elif method == "locate":
            self._query(responder, self._locate)
        elif method == "set_tip":
            self.controller(p.channel)  # type: ignore[attr-defined]
            self._query(responder, lambda: self.closed_loop.set_tip(p.channel, p.px))  # type: ignore[attr-defined]
        elif method in MOTION_METHODS:
            self._start_operation(request, responder)
        else:  # parse_request only lets known methods through
            raise InvalidParams(f"method {method!r} is not handled")

    def _query(self, responder: Responder, work: Any) -> None:
        """Run ``work()`` in the query pool and answer with its result or error."""

        def answer() -> None:
            try:
                responder.ok(work())
            except Exception as exc:
                responder.error(exc)

        self._in_pool(self.queries, self._query_slots, answer, responder)

    def _in_pool(
        self, pool: ThreadPoolExecutor, slots: threading.BoundedSemaphore, run_and_answer: Any,
        responder: Responder, *, accepted: Any = None,
    ) -> None:
        """Run ``run_and_answer()`` (which answers ``responder`` itself) in ``pool``; Busy when
        every one of ``slots`` is in flight. ``accepted()`` runs here (the server loop) once the
        request has a slot, before the pool can start it."""
        if not slots.acquire(blocking=False):
            raise Busy("too many requests in flight; try again")
        if accepted is not None:
            accepted()

        def run() -> None:
            try:
                run_and_answer()
            finally:
                slots.release()

        try:
            future = pool.submit(run)
        except RuntimeError:  # pool shut down
            slots.release()
            raise Busy("daemon is shutting down") from None

        def never_ran(done: Any) -> None:  # cancelled in the queue at shutdown: still answer
            if done.cancelled():
                slots.release()
                responder.error(Stopped("daemon is shutting down; the request was not run"))

        future.add_done_callback(never_ran)

    def _get_position(self, ctl: ChannelController) -> dict[str, Any]:
        position = ctl.manipulator.position_um
        ctl.note_position(position)
        return {"channel": ctl.name, "position_um": position.tolist(), "busy": ctl.current is not None}

    def _locate(self) -> dict[str, Any]:
        if self.localiser_worker is None:
            raise NoFrame("no frame source or localiser configured")
        stale_s = self.cfg.frames.stale_after_s
        result = self.localiser_worker.latest
        if result is None or result.age_s > stale_s:
            result = self.localiser_worker.wait_for_frame_after(time.monotonic() - stale_s, stale_s)
        if result is None:
            raise NoFrame(f"no localised frame within the last {stale_s:.2f} s")
        tips = result.tips_json()
        return {
            "frame_id": result.frame.frame_id,
            "t_frame": result.frame.t_s,
            "age_s": result.age_s,
            "um_per_px": result.frame.um_per_px,
            "shape": list(result.frame.shape),
            "tips": tips,
            # as the assignment reports them; when nothing was assigned (no calibration service,
            # a frame not for steering, an assignment that failed) every tip is unassigned and
            # every calibrated channel missing
            "unassigned": [{k: t[k] for k in ("x_px", "y_px", "score")} for t in tips if t["channel"] is None],
            "missing": [n for n in self.controllers if n not in result.assigned and self.closed_loop.is_calibrated(n)],
            **{k: v for k, v in result.extra.items() if k in ("unassigned", "missing", "not_for_steering")},
        }

    def _start_operation(self, request: Request, responder: Responder) -> None:
        p = request.params
        ctl = self.controller(p.channel)  # type: ignore[attr-defined]
        params = p.model_dump(exclude_none=True)
        wait = params.pop("wait", True)
        params.pop("channel", None)
        check: Any = None  # checks that may read devices: run off the loop, before superseding
        if request.method == "move":
            target = ctl.manipulator.validate_target(p.position_um)  # type: ignore[attr-defined]
            speed = ctl.manipulator.validate_speed(p.speed_um_s)  # type: ignore[attr-defined]
            body = move_body(ctl, target, speed)
            if ctl.manipulator.check_reads_device:
                check = partial(ctl.manipulator.check_move, target, speed)
            else:  # nothing to wait for: checked here, submitted at once
                ctl.manipulator.check_move(target, speed)
        elif request.method == "move_tip":
            body = self.closed_loop.move_tip_body(ctl, p)
            check = self.closed_loop.move_tip_check(ctl, p)
        else:
            body = self.closed_loop.calibrate_body(ctl)
        op = Operation(ctl.name, request.method, params, body, publish=self.telemetry.publish)
        op.add_finish_callback(self._report_failure)
        if wait:
            op.add_finish_callback(lambda o: responder.error(o.error) if o.error is not None else responder.ok(o.result))

        def submit(reserved: int | None = None) -> None:
            ctl.submit(op, reserved=reserved)
            if not wait:
                responder.ok({"op": op.id, "channel": ctl.name, "method": request.method})

        if check is None:
            submit()
            return
        # a request refused by its checks leaves the running operation alone ("a bad request
        # changes nothing"); a stop or a newer request arriving meanwhile wins (``reserve``)
        reserved: list[int] = []

        def check_then_submit() -> None:
            try:
                check()
            except Exception as exc:
                responder.error(exc)
                return
            submit(reserved[0])

        self._in_pool(self.checks, self._check_slots, check_then_submit, responder,
                      accepted=lambda: reserved.append(ctl.reserve()))

    def _report_failure(self, op: Operation) -> None:
        """A failed operation (not a stop) also goes out as a warning ``event``."""
        if op.state == "failed" and op.error is not None:
            from rig.protocol import error_code_of

            self.telemetry.event("warning", "op_failed", f"{op.method} {op.id} failed: {op.error}",
                                 channel=op.channel, op=op.id, code=error_code_of(op.error))
