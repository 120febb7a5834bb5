"""The ``Manipulator`` interface every backend implements, with move handles and limits.

Template hooks, as in python-microscope: the public methods validate, lock and log, then call
the backend's ``_do_*`` hooks. Coordinates are the device's own axes in µm; speeds in µm/s.

Safety rules enforced here, before a backend sees anything:
- a target with NaN/inf, the wrong number of axes, or any axis outside the soft limits is
  rejected with ``OutOfBounds``/``InvalidParams`` and nothing is sent (never clipped);
- a speed that is not finite, not positive, or above ``max_speed_um_s`` is rejected;
- a new move on a channel supersedes the running one (its handle ends "superseded");
- ``stop`` takes no lock that a move holds, so it never waits behind other work.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rig.errors import DeviceError, InvalidParams, OutOfBounds, PatchrigError, Stopped
from rig.logs import get_logger

# a position in device µm: a list/tuple of floats or a 1-D numpy array
PositionLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Limits:
    """Per-axis soft limits in device µm, inclusive. Targets outside are rejected."""

    min_um: tuple[float, ...]
    max_um: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.min_um) != len(self.max_um):
            raise ValueError("min_um and max_um differ in length")
        for lo, hi in zip(self.min_um, self.max_um, strict=True):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"invalid axis limits {lo} .. {hi}")

    @property
    def n_axes(self) -> int:
        return len(self.min_um)

    def contains(self, position_um: PositionLike) -> bool:
        return all(
            lo <= p <= hi for p, lo, hi in zip(position_um, self.min_um, self.max_um, strict=True)
        )

    def check(self, position_um: PositionLike, channel: str | None = None) -> None:
        """Raise ``OutOfBounds`` naming the first offending axis; do nothing when inside."""
        for axis, (p, lo, hi) in enumerate(zip(position_um, self.min_um, self.max_um, strict=True)):
            if not lo <= p <= hi:
                raise OutOfBounds(
                    f"axis {axis} target {p:.3f} µm outside limits [{lo:.3f}, {hi:.3f}] µm; "
                    "rejected, nothing moved",
                    channel=channel,
                )


class MoveState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    INTERRUPTED = "interrupted"  # stop, stop_all, superseded, shutdown
    FAILED = "failed"  # device error, timeout, did not reach target


class MoveHandle:
    """The handle of one move. Thread-safe; finished exactly once by the backend.

    ``setpoint_um``: the requested target (device µm). ``position_um``: the read-back when the
    move finished (None while running). ``reason``: why it was interrupted or failed.
    """

    def __init__(self, channel: str, setpoint_um: np.ndarray, speed_um_s: float) -> None:
        self.channel = channel
        self.setpoint_um = np.asarray(setpoint_um, float).copy()
        self.speed_um_s = float(speed_um_s)
        self.started_s = time.monotonic()
        self.finished_s: float | None = None
        self.state = MoveState.RUNNING
        self.reason: str | None = None
        self.error: PatchrigError | None = None
        self.position_um: np.ndarray | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[MoveHandle], None]] = []
        self._stop_requested = threading.Event()

    @property
    def stop_requested(self) -> bool:
        """True once ``Manipulator.stop`` was called while this was the channel's move, even if
        the move has not been sent yet: a backend must not start (or must halt again) a move
        whose stop came first."""
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    @property
    def interrupted(self) -> bool:
        return self.state is MoveState.INTERRUPTED

    def finish(
        self,
        state: MoveState,
        position_um: PositionLike | None = None,
        reason: str | None = None,
        error: PatchrigError | None = None,
    ) -> bool:
        """Finish the move (backends call this). Returns False if it had already finished."""
        with self._lock:
            if self._event.is_set():
                return False
            self.state = state
            self.reason = reason
            self.error = error
            self.position_um = None if position_um is None else np.asarray(position_um, float)
            self.finished_s = time.monotonic()
            callbacks = list(self._callbacks)
            self._event.set()
        for cb in callbacks:
            self._run_callback(cb)
        return True

    def add_done_callback(self, callback: Callable[[MoveHandle], None]) -> None:
        """Call ``callback(handle)`` when finished (at once if already finished). A callback
        that raises is logged; it never reaches the backend thread that finished the move."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        self._run_callback(callback)

    def _run_callback(self, callback: Callable[[MoveHandle], None]) -> None:
        try:
            callback(self)
        except Exception as exc:  # a user's bug must not kill a backend's worker or port thread
            get_logger("patchrig.manipulator", channel=self.channel).exception(
                "a move's done-callback failed", error=str(exc))

    def wait(self, timeout_s: float | None = None, *, check: bool = True) -> MoveHandle:
        """Block until finished. With ``check``: raise ``Stopped`` if interrupted, the backend's
        error if failed, ``DeviceTimeout``-like ``DeviceError`` if ``timeout_s`` passes."""
        if not self._event.wait(timeout_s):
            raise DeviceError(f"move not finished after {timeout_s} s", channel=self.channel)
        if check:
            if self.state is MoveState.INTERRUPTED:
                raise Stopped(f"move interrupted: {self.reason}", channel=self.channel)
            if self.state is MoveState.FAILED:
                raise self.error or DeviceError(f"move failed: {self.reason}", channel=self.channel)
        return self

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (for telemetry and replies)."""
        return {
            "channel": self.channel,
            "state": self.state.value,
            "setpoint_um": self.setpoint_um.tolist(),
            "position_um": None if self.position_um is None else self.position_um.tolist(),
            "speed_um_s": self.speed_um_s,
            "reason": self.reason,
            "seconds": (self.finished_s or time.monotonic()) - self.started_s,
        }


class Manipulator(ABC):
    """One micromanipulator channel. Public methods validate and lock; backends implement hooks.

    Backend hooks (all in device µm):
    - ``_do_move_to(target_um, speed_um_s, handle)``: start the move and return quickly; finish
      ``handle`` later (DONE at the target within tolerance, or FAILED/INTERRUPTED). The running
      move, if any, was already marked superseded; the backend must make the device follow the
      new target.
    - ``_do_stop(reason)``: halt now; must be fast, thread-safe, and take no lock held by moves.
      Finish the running handle as INTERRUPTED.
    - ``_do_read_position_um()``: the read-back position.
    - ``_do_is_busy()``: whether the device is moving.
    - ``close()``: release the device (stopping motion first).
    """

    check_reads_device = False
    """Whether ``_check_move`` reads the device (it may then wait for it): the daemon runs such
    checks off its server loop."""

    def __init__(
        self, name: str, limits: Limits, max_speed_um_s: float, default_speed_um_s: float | None = None
    ) -> None:
        if not (math.isfinite(max_speed_um_s) and max_speed_um_s > 0):
            raise ValueError("max_speed_um_s must be a positive finite number")
        self.name = name
        self.limits = limits
        self.max_speed_um_s = float(max_speed_um_s)
        self.default_speed_um_s = float(default_speed_um_s or min(200.0, max_speed_um_s))
        self.log = get_logger("patchrig.manipulator", channel=name)
        self._move_lock = threading.RLock()  # serialises move starts; stop never takes it (re-entrant: a
        # done-callback of the superseded move may call close() or move_to() on this channel)
        self._handle_lock = threading.Lock()  # guards _current only, held for microseconds
        self._current: MoveHandle | None = None

    @property
    def n_axes(self) -> int:
        return self.limits.n_axes

    # -- validation ---------------------------------------------------------------------
    def validate_target(self, position_um: PositionLike) -> np.ndarray:
        """Return the target as an array, or raise (InvalidParams/OutOfBounds). Sends nothing."""
        try:
            raw = np.asarray(position_um)
        except (TypeError, ValueError):
            raw = np.asarray([None])
        has_bool = isinstance(position_um, list | tuple) and any(isinstance(v, bool | np.bool_) for v in position_um)
        if raw.dtype.kind not in "iuf" or has_bool:  # bools, strings ("12"), None, ragged lists
            raise InvalidParams(f"target {position_um!r} is not a list of numbers", channel=self.name)
        target = raw.astype(float).reshape(-1)
        if target.shape != (self.n_axes,):
            raise InvalidParams(
                f"target has {target.size} axes, this device has {self.n_axes}", channel=self.name
            )
        if not np.all(np.isfinite(target)):
            raise InvalidParams(f"target {target.tolist()} is not finite", channel=self.name)
        self.limits.check(target.tolist(), channel=self.name)
        return target

    def validate_speed(self, speed_um_s: float | None) -> float:
        """Return the speed to use (default when None), or raise InvalidParams. The default
        goes through the same checks: no path returns a speed above the channel maximum."""
        if speed_um_s is None:
            speed_um_s = self.default_speed_um_s
        if isinstance(speed_um_s, bool | str | bytes):
            raise InvalidParams(f"speed {speed_um_s!r} is not a number", channel=self.name)
        try:
            speed = float(speed_um_s)
        except (TypeError, ValueError):
            raise InvalidParams(f"speed {speed_um_s!r} is not a number", channel=self.name) from None
        if not math.isfinite(speed) or speed <= 0:
            raise InvalidParams(f"speed {speed_um_s!r} µm/s must be positive and finite", channel=self.name)
        if speed > self.max_speed_um_s:
            raise InvalidParams(
                f"speed {speed:.1f} µm/s above the channel maximum {self.max_speed_um_s:.1f} µm/s",
                channel=self.name,
            )
        return speed

    def check_move(self, position_um: PositionLike, speed_um_s: float | None = None) -> tuple[np.ndarray, float]:
        """Every check ``move_to`` makes before it supersedes the running move: the target, the
        speed, and the backend's own (which may read the device). Returns (target, speed);
        raises (InvalidParams, OutOfBounds, DeviceError) and sends nothing."""
        target = self.validate_target(position_um)
        speed = self.validate_speed(speed_um_s)
        self._check_move(target, speed)
        return target, speed

    # -- public API ---------------------------------------------------------------------
    def move_to(self, position_um: PositionLike, speed_um_s: float | None = None) -> MoveHandle:
        """Start a move to ``position_um`` (device µm) at ``speed_um_s``; return its handle.

        Raises before anything is sent if the target or speed is invalid. Supersedes the
        running move on this channel.
        """
        target, speed = self.check_move(position_um, speed_um_s)
        with self._move_lock:
            handle = MoveHandle(self.name, target, speed)
            with self._handle_lock:
                previous, self._current = self._current, handle
            if previous is not None and not previous.done:
                previous.finish(MoveState.INTERRUPTED, reason="superseded")
            if handle.done or self.current_move is not handle:
                return handle  # a done-callback above moved or stopped the channel: that one wins
            self.log.info("move", target_um=[round(float(v), 3) for v in target], speed_um_s=speed)
            try:
                self._do_move_to(target, speed, handle)
            except PatchrigError as exc:
                handle.finish(MoveState.FAILED, reason=str(exc), error=exc)
                raise
            except Exception as exc:  # a backend bug must not leave a RUNNING handle behind
                err = DeviceError(f"move failed: {exc}", channel=self.name)
                handle.finish(MoveState.FAILED, reason=str(exc), error=err)
                raise err from exc
        return handle

    def stop(self, reason: str = "stop") -> None:
        """Halt this channel now. Never waits behind a move; safe from any thread."""
        with self._handle_lock:
            current = self._current
        if current is not None:
            # before the STOP: a move switched in but not yet sent must see it (backends check
            # ``stop_requested`` before they start a move, and again after sending it)
            current.request_stop()
        try:
            self._do_stop(reason)  # first: nothing (not even a log line) is sent before the STOP
        finally:
            if current is not None and not current.done:
                current.finish(MoveState.INTERRUPTED, reason=reason)
        self.log.info("stop", reason=reason)  # only once it was sent: a failure raises instead

    @property
    def current_move(self) -> MoveHandle | None:
        with self._handle_lock:
            return self._current

    @property
    def position_um(self) -> np.ndarray:
        """The read-back position in device µm."""
        return np.asarray(self._do_read_position_um(), float)

    def is_busy(self) -> bool:
        return bool(self._do_is_busy())

    def describe(self) -> dict[str, Any]:
        """JSON-able description: name, driver, axes, limits, speed caps, backend details."""
        return {
            "name": self.name,
            "driver": self.driver_name,
            "n_axes": self.n_axes,
            "limits": {"min_um": list(self.limits.min_um), "max_um": list(self.limits.max_um)},
            "max_speed_um_s": self.max_speed_um_s,
            "default_speed_um_s": self.default_speed_um_s,
            **self._describe_backend(),
        }

    # -- hooks --------------------------------------------------------------------------
    driver_name: str = "abstract"

    def _describe_backend(self) -> dict[str, Any]:
        return {}

    def _check_move(self, target_um: np.ndarray, speed_um_s: float) -> None:  # noqa: B027 (optional hook)
        """Refuse (raise) a validated move for a backend reason, before the running move is
        superseded or anything is sent. Default: nothing to refuse."""

    @abstractmethod
    def _do_move_to(self, target_um: np.ndarray, speed_um_s: float, handle: MoveHandle) -> None: ...

    @abstractmethod
    def _do_stop(self, reason: str) -> None: ...

    @abstractmethod
    def _do_read_position_um(self) -> PositionLike: ...

    @abstractmethod
    def _do_is_busy(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...


MOVE_TIMEOUT_MARGIN_S = 10.0


def move_timeout_s(distance_um: float, speed_um_s: float) -> float:
    """How long a caller waits for a move before calling the device hung: twice the travel
    time at the move's speed plus ``MOVE_TIMEOUT_MARGIN_S`` (seconds)."""
    return 2.0 * float(distance_um) / float(speed_um_s) + MOVE_TIMEOUT_MARGIN_S


def stop_all(manipulators: Iterable[Manipulator], reason: str = "stop_all") -> dict[str, str | None]:
    """Stop every manipulator in parallel; return {name: None or the error text}.

    Each stop runs in its own thread so that a slow or dead device does not delay the others.
    """
    devices = list(manipulators)
    results: dict[str, str | None] = {}
    if not devices:
        return results

    def _one(m: Manipulator) -> tuple[str, str | None]:
        try:
            m.stop(reason)
            return m.name, None
        except Exception as exc:  # report, never raise: the other devices must still stop
            return m.name, str(exc)

    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="stop-all") as pool:
        for name, err in pool.map(_one, devices):
            results[name] = err
    return results
