"""Per-channel controllers: operation semantics, supersession and stop, one worker per channel.

An ``Operation`` is one motion request (``move``, ``move_tip``, ``calibrate``) on one channel.
Its life: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``stopped``; every transition is
published on the telemetry ``op`` topic (with ``progress`` messages in between), and the
request is answered when it ends (``wait: true``) or at once with ``{"op": id}``.

Rules:
- one operation runs per channel at a time, in the channel's worker thread;
- a new operation supersedes the running one: the old one ends ``stopped`` (reason
  "superseded"; its device is halted first, from the stopper thread), and the pending
  one, if any, is dropped the same way (the queue holds at most the newest request: it is
  bounded by construction);
- ``stop`` cancels the running and pending operations and halts the manipulator from the
  caller's thread (the server's loop), never waiting for the worker;
- every move goes through the ``Manipulator`` interface, so limits and speed caps apply.

``PositionPoller`` reads every channel's position a few times a second (one thread), caches
it for ``status``, publishes the ``position`` topic and records device silence for the
watchdog.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from manipulators.base import Manipulator, MoveHandle, MoveState, move_timeout_s
from rig.errors import DeviceError, PatchrigError, Stopped
from rig.logs import get_logger
from rig.protocol import error_code_of

OpBody = Callable[["Operation"], dict[str, Any]]
HaltCallback = Callable[[str | None], None]
SUPERSEDE_HALT_WAIT_S = 10.0  # a new operation waits at most this for its predecessor's device stop
Publish = Callable[[str, dict[str, Any]], Any]

_op_numbers = itertools.count(1)


def new_op_id(channel: str) -> str:
    return f"{channel}-{next(_op_numbers)}"


class Operation:
    """One operation on one channel. Thread-safe: cancel from any thread, run in the worker.

    ``body(op)`` does the work and returns the JSON result; it waits through ``start_move`` and
    ``sleep`` (both wake up at once on cancel) and calls ``check`` between steps.
    When superseded, its device is stopped (on the stopper thread) before the successor
    starts: a successor that fails before it sends a move must not leave the old move running.
    """

    def __init__(
        self,
        channel: str,
        method: str,
        params: dict[str, Any],
        body: OpBody,
        *,
        publish: Publish | None = None,
        on_finish: Callable[[Operation], None] | None = None,
    ) -> None:
        self.id = new_op_id(channel)
        self.channel = channel
        self.method = method
        self.params = params
        self.body = body
        self.state = "queued"
        self.result: dict[str, Any] | None = None
        self.error: PatchrigError | None = None
        self.created_s = time.monotonic()
        self.started_s: float | None = None
        self.finished_s: float | None = None
        self.cancel_reason: str | None = None
        self.cancel_failure: PatchrigError | None = None
        self._publish = publish
        self._on_finish = [on_finish] if on_finish is not None else []
        self.after_halt: threading.Event | None = None  # set: the worker starts it only after this
        self._wake = threading.Event()
        self.cancel_event = threading.Event()  # set on cancel: for code that takes an Event
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._halt_device: Callable[[str], str | None] | None = None  # set by the controller

    # -- state ----------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait_finished(self, timeout_s: float | None = None) -> bool:
        return self._finished.wait(timeout_s)

    def add_finish_callback(self, callback: Callable[[Operation], None]) -> None:
        with self._lock:
            if not self._finished.is_set():
                self._on_finish.append(callback)
                return
        callback(self)

    def cancel(self, reason: str, *, failure: PatchrigError | None = None) -> None:
        """Ask the operation to end ``stopped`` with ``reason`` (or ``failed`` with ``failure``
        when a fault, not a person, ended it: a silent device, stale frames); wakes its waits."""
        with self._lock:
            if self._finished.is_set() or self.cancel_reason is not None:
                return
            self.cancel_reason = reason
            self.cancel_failure = failure
        # The move's handle is left to the device's stop to finish: its end time then says when
        # the device halted, which the closed loop's "still since" checks rely on.
        self.cancel_event.set()
        self._wake.set()

    def check(self) -> None:
        """Raise ``Stopped`` (or the cancel's ``failure``) if the operation was cancelled."""
        if self.cancel_failure is not None:
            raise self.cancel_failure
        if self.cancel_reason is not None:
            raise Stopped(f"{self.method} {self.id} interrupted: {self.cancel_reason}", channel=self.channel)

    # -- helpers for bodies ---------------------------------------------------------------
    def start_move(self, send: Callable[[], MoveHandle], timeout_s: float) -> MoveHandle:
        """Send a move (``send()`` returns its handle) and wait for it; raise Stopped on cancel,
        the handle's error on failure.

        Safety: a cancel can arrive while the move command is on its way to the device. The stop
        that came with that cancel may then reach the device before the move does, and the move
        would run on after a confirmed stop. So when the operation turns out to be cancelled as
        the handle comes back, the device is halted again from here, before raising Stopped."""
        self.check()
        handle = send()
        with self._lock:
            cancelled = self.cancel_reason
        if cancelled is not None:
            if self._halt_device is not None:
                self._halt_device(f"{cancelled} (a move sent as the operation was cancelled)")
            if not handle.done:
                handle.finish(MoveState.INTERRUPTED, reason=cancelled)
        self._wake.clear()
        handle.add_done_callback(lambda _h: self._wake.set())
        if not self._wake.wait(timeout_s) and not handle.done:
            # a hung move may still be driving the device: halt it before giving up on it
            if self._halt_device is not None:
                self._halt_device("move timeout")
            raise DeviceError(f"move not finished after {timeout_s:.1f} s; stop sent", channel=self.channel)
        self.check()
        if not handle.done:  # woken by a cancel that raced with the wait
            self.check()
        handle.wait(0, check=True)
        return handle

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; raise Stopped at once if cancelled."""
        self._wake.clear()
        self.check()
        self._wake.wait(seconds)
        self.check()

    def progress(self, **fields: Any) -> None:
        """Publish a progress message on the ``op`` topic."""
        self._emit("progress", **fields)

    # -- lifecycle (the controller calls these) -------------------------------------------
    def _emit(self, state: str, **fields: Any) -> None:
        if self._publish is not None:
            self._publish(
                "op", {"op": self.id, "channel": self.channel, "method": self.method, "state": state, **fields}
            )

    def _run(self, halt_device: Callable[[str], str | None] | None = None) -> None:
        """Run the body in this (the channel worker's) thread; ``halt_device(reason)`` stops
        the channel's device (see ``start_move``)."""
        self._halt_device = halt_device
        self.started_s = time.monotonic()
        try:
            self.check()
            self.state = "running"
            self._emit("running")
            result = self.body(self)
            self.check()
            self._finish("done", result=result)
        except PatchrigError as raised:
            error: PatchrigError = raised
            reason = self.cancel_reason
            if self.cancel_failure is not None:
                error = self.cancel_failure
            elif reason is not None and not isinstance(raised, Stopped):
                error = Stopped(f"{self.method} {self.id} interrupted: {reason} ({raised})", channel=self.channel)
            self._finish("stopped" if isinstance(error, Stopped) else "failed", error=error)
        except Exception as exc:  # a bug in a body: report it as internal, never kill the worker
            get_logger("patchrig.controller", channel=self.channel).exception("operation crashed", op=self.id)
            err = PatchrigError(f"{self.method} crashed: {type(exc).__name__}: {exc}", channel=self.channel)
            self._finish("failed", error=err)

    def _drop(self, reason: str) -> None:
        """End a queued operation that never ran."""
        self.cancel_reason = reason
        self._finish("stopped", error=Stopped(f"{self.method} {self.id} {reason} before it started", channel=self.channel))

    def _finish(self, state: str, *, result: dict[str, Any] | None = None, error: PatchrigError | None = None) -> None:
        with self._lock:
            if self._finished.is_set():
                return
            self.state = state
            self.result = {"op": self.id, **(result or {})} if error is None else None
            self.error = error
            self.finished_s = time.monotonic()
            callbacks = list(self._on_finish)
            self._finished.set()
        seconds = self.finished_s - (self.started_s or self.created_s)
        if error is None:
            self._emit(state, result=self.result, seconds=seconds)
        else:
            self._emit(state, error={"code": error_code_of(error), "message": str(error)}, seconds=seconds)
        for cb in callbacks:
            cb(self)

    def describe(self) -> dict[str, Any]:
        return {"op": self.id, "channel": self.channel, "method": self.method, "state": self.state}


class _HaltRequest:
    """One device stop that the stopper thread has not begun yet. Every stop asked for before
    it begins joins it (their reasons and callbacks are merged): one STOP sent after all of
    those requests satisfies each of them, so the stopper's backlog is at most one request,
    however fast supersessions and stops arrive."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.callbacks: list[HaltCallback] = []
        self.done = threading.Event()  # set once the device answered (whatever it answered)

    def join(self, reason: str, callback: HaltCallback | None) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        if callback is not None:
            self.callbacks.append(callback)

    @property
    def reason(self) -> str:
        return ", ".join(self.reasons)


class ChannelController:
    """Runs one channel's operations in its own worker thread; stop from any thread."""

    def __init__(self, name: str, manipulator: Manipulator, *, publish: Publish | None = None) -> None:
        self.name = name
        self.manipulator = manipulator
        self._publish = publish
        self.log = get_logger("patchrig.controller", channel=name)
        self._cond = threading.Condition()
        self._pending: Operation | None = None
        self._current: Operation | None = None
        self._closed = False
        self._arrivals = 0  # requests and stops so far, numbered as they arrive (see ``reserve``)
        self._effective = 0  # the number of the newest one that took effect (submitted, or a stop)
        self.last_position_um: np.ndarray | None = None
        self.last_position_s: float | None = None
        self.last_device_ok_s: float = time.monotonic()
        self.device_error: str | None = None
        self._halt_cond = threading.Condition()
        self._next_halt: _HaltRequest | None = None  # asked for, not yet begun by the stopper
        self._halt_under_way: _HaltRequest | None = None  # begun by the stopper, not yet answered
        self._stopper_closing = False
        self._thread = threading.Thread(target=self._run, name=f"patchrig-controller-{name}", daemon=True)
        self._thread.start()
        self._stopper = threading.Thread(target=self._run_stopper, name=f"patchrig-stopper-{name}", daemon=True)
        self._stopper.start()

    # -- submit / stop --------------------------------------------------------------------
    def reserve(self) -> int:
        """A place in this channel's order of requests, for a request whose checks run (and may
        read devices) before it is submitted: ``submit(op, reserved=n)`` drops ``op`` if a stop,
        or a request that arrived after it, has already taken effect. So requests take effect in
        the order they arrived, a stop always wins over a request still being checked, and a
        request its checks refuse (never submitted) changes nothing for the others."""
        with self._cond:
            self._arrivals += 1
            return self._arrivals

    def submit(self, op: Operation, *, reserved: int | None = None) -> Operation:
        """Queue ``op``; it supersedes the running and the pending operation of this channel.

        Everything that decides when ``op`` may start happens under the channel's lock, before
        the worker can take it: the running operation is cancelled first, then its device stop
        is asked for (on the stopper thread: the caller, the server loop, never waits for a
        device), and ``op`` starts only once that stop is answered. Stops run one after
        another, so that one ends after any stop asked for earlier; with nothing to supersede,
        ``op`` still waits for a stop already asked for (a user's, the watchdog's), which
        would otherwise cut its move short."""
        op._emit("queued", params=op.params)  # before the worker can emit "running"
        with self._cond:
            if self._closed:
                op._drop("refused: controller closed")
                return op
            if reserved is None:
                self._arrivals += 1
                reserved = self._arrivals
            if reserved < self._effective:
                op._drop("superseded by a later request or stop while it was being checked")
                return op
            self._effective = reserved
            dropped, self._pending = self._pending, op
            running = self._current
            # every stop asked for before this request (a user's stop, the watchdog's, a
            # superseded operation's) ends before it starts: stops run one after another, so
            # waiting for the newest one is enough
            op.after_halt = self._newest_halt()
            if running is not None and not running.finished:
                self.log.info("superseding", old=running.id, new=op.id)
                running.cancel("superseded")  # before the stop: see Operation.start_move

                def answered(error: str | None) -> None:
                    if error is not None:
                        self.log.warning("stop of the superseded operation failed", op=running.id, error=error)

                op.after_halt = self.halt_async("superseded", answered)
            self._cond.notify_all()
        if dropped is not None:
            dropped._drop("superseded")
        return op

    def stop(self, reason: str = "stop", *, failure: PatchrigError | None = None) -> str | None:
        """Cancel the running and pending operations and halt the device now.

        Returns None, or the device's error text (the operations are cancelled regardless).
        Never waits for the worker; safe from any thread. ``failure``: see ``Operation.cancel``.
        """
        self.cancel_ops(reason, failure=failure)
        return self._halt(reason)

    def cancel_ops(self, reason: str, *, failure: PatchrigError | None = None) -> None:
        """Cancel the operations without commanding the device (stop_all halts devices itself)."""
        with self._cond:
            self._arrivals += 1  # a request still being checked (``reserve``) is not submitted
            self._effective = self._arrivals
            dropped, self._pending = self._pending, None
            running = self._current
        if running is not None:
            running.cancel(reason, failure=failure)
        if dropped is not None:
            dropped._drop(reason)

    def halt_async(self, reason: str, callback: HaltCallback | None = None) -> threading.Event:
        """Halt the device from this channel's own stopper thread and call ``callback(error)``
        (None on success) once the device answered; return an Event set at that moment.
        Never blocks the caller; never waits behind operations, only behind the one stop of
        this device already under way: every stop asked for before the stopper begins the next
        one joins that next one (one STOP sent after a request satisfies it)."""
        with self._halt_cond:
            if self._stopper_closing:
                request = None
            else:
                if self._next_halt is None:
                    self._next_halt = _HaltRequest()
                    self._halt_cond.notify_all()
                request = self._next_halt
                request.join(reason, callback)
        if request is None:  # the controller is closed and its stopper gone: stop from here
            error = self._halt(reason)
            if callback is not None:
                callback(error)
            done = threading.Event()
            done.set()
            return done
        return request.done

    def _newest_halt(self) -> threading.Event | None:
        """The answer Event of the newest stop asked for and not yet answered, or None."""
        with self._halt_cond:
            request = self._next_halt or self._halt_under_way
            return None if request is None else request.done

    def _run_stopper(self) -> None:
        while True:
            with self._halt_cond:
                while self._next_halt is None and not self._stopper_closing:
                    self._halt_cond.wait()
                request, self._next_halt = self._next_halt, None
                self._halt_under_way = request
            if request is None:  # closing, nothing left to do
                return
            error = self._halt(request.reason)
            with self._halt_cond:
                self._halt_under_way = None
            request.done.set()
            for callback in request.callbacks:
                try:
                    callback(error)
                except Exception as exc:  # a reply that cannot go out must not kill the stopper
                    self.log.warning("stop callback failed", error=str(exc))

    def _halt(self, reason: str) -> str | None:
        try:
            self.manipulator.stop(reason)
            return None
        except Exception as exc:
            self.log.warning("stop failed", reason=reason, error=str(exc))
            return str(exc)

    @property
    def current(self) -> Operation | None:
        with self._cond:
            return self._current or self._pending

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel everything, halt, and join the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.stop("shutdown")
        self._thread.join(timeout=timeout_s)
        with self._halt_cond:  # the stopper serves what is asked, then ends
            self._stopper_closing = True
            self._halt_cond.notify_all()
        self._stopper.join(timeout=timeout_s)

    # -- cached state ---------------------------------------------------------------------
    def note_position(self, position_um: np.ndarray) -> None:
        self.last_position_um = np.asarray(position_um, float)
        self.last_position_s = time.monotonic()
        self.last_device_ok_s = self.last_position_s
        self.device_error = None

    def note_device_error(self, message: str) -> None:
        self.device_error = message

    def describe(self) -> dict[str, Any]:
        """Cached state only (fast: called from the server loop)."""
        op = self.current
        age = None if self.last_position_s is None else time.monotonic() - self.last_position_s
        return {
            "driver": self.manipulator.driver_name,
            "n_axes": self.manipulator.n_axes,
            "limits": {"min_um": list(self.manipulator.limits.min_um), "max_um": list(self.manipulator.limits.max_um)},
            "max_speed_um_s": self.manipulator.max_speed_um_s,
            "default_speed_um_s": self.manipulator.default_speed_um_s,
            "position_um": None if self.last_position_um is None else self.last_position_um.tolist(),
            "position_age_s": age,
            "op": None if op is None else op.describe(),
            "device_error": self.device_error,
        }

    # -- worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                pending = self._pending
                if pending is None:  # closed with nothing pending
                    return
                op = pending
                self._pending = None
                self._current = op
            if self._closed:
                op._drop("refused: shutting down")
            else:
                if op.after_halt is not None:  # the superseded operation's device stop
                    op.after_halt.wait(SUPERSEDE_HALT_WAIT_S)
                op._run(halt_device=self._halt)
            with self._cond:
                self._current = None


def move_body(ctl: ChannelController, target_um: np.ndarray, speed_um_s: float) -> OpBody:
    """The body of a plain ``move`` to ``target_um`` (device µm, already validated against the
    limits) at ``speed_um_s`` (already capped). Its timeout only catches a hung device."""
    manipulator = ctl.manipulator

    def body(op: Operation) -> dict[str, Any]:
        start = ctl.last_position_um
        if start is None or start.shape != target_um.shape:
            start = manipulator.position_um
        distance_um = float(((target_um - start) ** 2).sum() ** 0.5)
        timeout_s = move_timeout_s(distance_um, speed_um_s)

        def send() -> MoveHandle:
            handle = manipulator.move_to(target_um, speed_um_s)
            op.progress(setpoint_um=target_um.tolist(), speed_um_s=speed_um_s)
            return handle

        handle = op.start_move(send, timeout_s)
        position = handle.position_um if handle.position_um is not None else manipulator.position_um
        ctl.note_position(position)
        return {"channel": ctl.name, "position_um": position, "setpoint_um": target_um,
                "seconds": handle.as_dict()["seconds"]}

    return body


class PositionPoller:
    """One thread reading every channel's position at ``rate_hz``; publishes ``position``."""

    def __init__(self, controllers: dict[str, ChannelController], *, publish: Publish | None, rate_hz: float = 5.0) -> None:
        self._controllers = controllers
        self._publish = publish
        self._period_s = 1.0 / rate_hz
        self._stop = threading.Event()
        self.log = get_logger("patchrig.position")
        self._thread = threading.Thread(target=self._run, name="patchrig-position", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def poll_once(self) -> dict[str, Any]:
        positions: dict[str, Any] = {}
        for name, ctl in self._controllers.items():
            try:
                pos = ctl.manipulator.position_um
                ctl.note_position(pos)
                positions[name] = {"position_um": pos.tolist(), "busy": ctl.current is not None}
            except Exception as exc:
                if ctl.device_error is None:
                    self.log.warning("position read failed", channel=name, error=str(exc))
                ctl.note_device_error(str(exc))
                positions[name] = {"position_um": None, "error": str(exc)}
        if self._publish is not None:
            self._publish("position", {"channels": positions})
        return positions

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll_once()
            self._stop.wait(max(0.0, self._period_s - (time.monotonic() - started)))


def halt_all(controllers: list[ChannelController], reason: str, done: Callable[[dict[str, str | None]], None]) -> None:
    """Cancel every operation and halt every device in parallel (each from its own stopper
    thread); call ``done({channel: None or error})`` once every device has answered."""
    if not controllers:
        done({})
        return
    results: dict[str, str | None] = {}
    lock = threading.Lock()

    def one_done(name: str, error: str | None) -> None:
        with lock:
            results[name] = error
            finished = len(results) == len(controllers)
        if finished:
            done(dict(results))

    for ctl in controllers:
        ctl.cancel_ops(reason)
    for ctl in controllers:

        def callback(error: str | None, name: str = ctl.name) -> None:
            one_done(name, error)

        ctl.halt_async(reason, callback)
