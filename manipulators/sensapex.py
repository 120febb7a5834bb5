"""Sensapex uMp/uMs channels on the vendor SDK (the ``sensapex`` package and its ``libum.so``).

The SDK's quirks (protocols/sensapex-smcp.md) and how this driver copes with each:

- **One SDK handle per process.** ``UMP.get_ump`` is a singleton bound to one address and group.
  Channels on the same address/group share it through ``SensapexSdk`` (reference counted); a
  channel asking for another address/group while it is open gets a clear error. When the last
  user releases it, the SDK is closed, its poller thread stopped *and joined*, and
  ``UMP._single`` reset so that it can be opened again.
- **get_device before goto.** Each channel calls ``ump.get_device(id)`` when it opens (this also
  checks that the id answers discovery: an unknown id gives ``NotFound`` naming the channel and
  listing the ids found). Without it ``goto_pos`` raises ``KeyError``.
- **Axis count.** The device is asked once (GET_PARAMETER 0x105); a 4-axis uMp needs 4-axis
  limits. If the device does not answer, the configured count is used (``set_axis_count``).
- **Moves that fail silently.** ``MoveRequest.start`` swallows lost ACKs and retries up to five
  times; it may finish "successfully" without reaching the target, or be interrupted with
  "did not reach target". Every finished move is checked here against its target
  (``tolerance_um``) and ends FAILED with the reason otherwise. A move that never finishes
  (a device that went silent while busy) fails with ``DeviceTimeout`` after
  ``1.5 x distance / speed + completion_margin_s``, and the device is told to stop.
- **Speeds.** Moves are simultaneous and linear (per-axis speeds scaled so the tip moves along a
  straight line at the requested path speed); the SDK treats speeds below 1 µm/s as 1 µm/s, so
  such speeds are rejected. libum itself refuses targets outside -1000..125000 µm: limits must
  lie inside that range.
- **Stop sends STOP twice** (``ump.stop`` then ``MoveRequest.interrupt``); harmless.
- **Stop that fails or is ignored.** The pending ``MoveRequest`` is taken from the SDK before
  the STOP is sent (else its poller, seeing the device idle short of its target, would send
  the GOTO again, e.g. while a STOP whose ACK never came is being retried). After a STOP the device
  must report idle or stop changing position; STOP is re-sent up to 3 times, else
  ``DeviceError`` ("kept moving").
- **is_busy** reports a stale error when the drive status is "failed" (after a STOP), so the
  drive status is read directly.
- **Timeouts.** ``UMP.set_timeout`` has no effect (it assigns to the ctypes pointer), so
  ``timeout_ms`` is written into libum's state directly. Every ``UMError`` becomes a
  ``DeviceTimeout`` (-3, -5) or ``DeviceError`` naming the channel, the device id, address and
  group. The SDK's own retry warning (``UMP.call`` with ``retries``) is handled the same way.
- **A dead device holds the SDK's one lock** for ~0.6 s per request (three tries). After a
  timeout the channel fails at once for ``lost_backoff_s``, then probes with a quick ping
  (three tries of ``probe_timeout_ms``) before asking again, so the other channels on the SDK
  are not held up.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from manipulators.base import Limits, Manipulator, MoveHandle, MoveState
from rig.errors import Busy, DeviceError, DeviceTimeout, InvalidParams, NotFound, PatchrigError
from rig.logs import get_logger

SDK_MIN_UM = -1000.0  # libum rejects GOTO targets outside this range (error -4)
SDK_MAX_UM = 125000.0
MIN_SPEED_UM_S = 1.0  # the SDK raises slower speeds to 1 µm/s ("speed < 1 crashes the uMp")
SDK_RETRY_THRESHOLD_UM = 0.5  # sensapex MoveRequest: an axis closer than this to its target does not move


def sdk_axis_speeds_um_s(diff_um: np.ndarray, speed_um_s: float) -> np.ndarray:
    """The speeds (µm/s) the SDK sends to the axes that move, for a ``linear=True`` move by
    ``diff_um`` (device µm) at ``speed_um_s`` along the path, as sensapex ``MoveRequest``
    computes them: each axis gets ``speed * |diff| / max(1, norm(diff over every axis))``,
    raised to ``MIN_SPEED_UM_S`` and truncated to whole µm/s; an axis within
    ``SDK_RETRY_THRESHOLD_UM`` of its target does not move. Empty when no axis moves."""
    diff = np.abs(np.asarray(diff_um, float))
    moving = diff >= SDK_RETRY_THRESHOLD_UM
    shares = float(speed_um_s) * diff[moving] / max(1.0, float(np.linalg.norm(diff)))
    return np.floor(np.maximum(shares, MIN_SPEED_UM_S))


def sdk_duration_s(diff_um: np.ndarray, speed_um_s: float) -> float:
    """How long that move takes at the SDK's axis speeds (s; acceleration left out)."""
    diff = np.abs(np.asarray(diff_um, float))
    speeds = sdk_axis_speeds_um_s(diff, speed_um_s)
    return float(np.max(diff[diff >= SDK_RETRY_THRESHOLD_UM] / speeds)) if speeds.size else 0.0
WATCH_PERIOD_S = 0.005
# how the SDK's ump.stop (and our _do_stop) word the interruption of a pending MoveRequest
STOP_INTERRUPT_REASON = "stop requested before move finished"

_UM_ERRNO = re.compile(r"UM Error: (-?\d+)")


def _log() -> Any:
    """This module's logger, made at call time so that it follows ``configure_logging``."""
    return get_logger("patchrig.sensapex")


def _errno_of(exc: BaseException) -> int | None:
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int):
        return errno
    m = _UM_ERRNO.search(str(exc))
    return int(m.group(1)) if m else None


class _PendingMove:
    __slots__ = ("channel", "request", "handle", "deadline_s", "exhausted_since_s")

    def __init__(self, channel: SensapexManipulator, request: Any, handle: MoveHandle, deadline_s: float):
        self.channel = channel
        self.request = request
        self.handle = handle
        self.deadline_s = deadline_s
        self.exhausted_since_s: float | None = None


class SensapexSdk:
    """The process's one open vendor SDK handle, shared by every channel on one address/group.

    Use ``SensapexSdk.acquire(address, group, timeout_ms)`` and ``release()`` (channels do this
    themselves; tests and benchmarks may hold an extra reference to keep the SDK open between
    channels). Owns a small watcher thread that finishes move handles when the SDK's
    ``MoveRequest`` finishes.
    """

    _registry_lock = threading.Lock()
    _current: SensapexSdk | None = None

    def __init__(self, address: str, group: int, timeout_ms: int) -> None:
        from sensapex import UMP

        if UMP._single is not None:
            raise DeviceError(
                "the Sensapex SDK is already open in this process by other code; "
                "patchrig must own the SDK handle"
            )
        self.address = address
        self.group = group
        self.timeout_ms = timeout_ms
        try:
            ump = UMP.get_ump(address=address.encode(), group=group, start_poller=False, handle_atexit=False)
        except RuntimeError as exc:  # um_open failed (bad group/port, bad address)
            UMP._single = None
            raise DeviceError(f"cannot open the Sensapex SDK on {address} group {group}: {exc}") from None
        self.ump = ump
        # Not ump.set_timeout: it assigns to the ctypes pointer object, not the state it points
        # to, so it has no effect. The state's leading fields (up to udp_port) match libum 1.504.
        ump.h.contents.timeout = int(timeout_ms)
        ump._timeout = int(timeout_ms)
        ump.poller.name = f"sensapex-sdk-poller-g{group}"
        ump.poller.start()
        self._refs = 0
        self._device_owners: dict[int, str] = {}
        self._pending: dict[int, _PendingMove] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, name=f"sensapex-move-watch-g{group}", daemon=True)
        self._watcher.start()
        _log().info("sensapex sdk opened", address=address, group=group, timeout_ms=timeout_ms)

    # -- sharing -------------------------------------------------------------------------
    @classmethod
    def acquire(cls, address: str, group: int, timeout_ms: int = 200) -> SensapexSdk:
        """Open the SDK (or share the open one) for ``address``/``group``; count a reference."""
        with cls._registry_lock:
            sdk = cls._current
            if sdk is None:
                sdk = cls(address, group, timeout_ms)
                cls._current = sdk
            elif (sdk.address, sdk.group) != (address, group):
                raise Busy(
                    f"the Sensapex SDK is open on {sdk.address} group {sdk.group}; the vendor SDK "
                    f"allows one address/group per process, so {address} group {group} cannot be opened too"
                )
            sdk._refs += 1
            return sdk

    def release(self) -> None:
        """Drop a reference; the last one closes the SDK and joins its threads."""
        with SensapexSdk._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            SensapexSdk._current = None
            self._close()

    @classmethod
    def is_open(cls) -> bool:
        return cls._current is not None

    def probe(self, dev_id: int, timeout_ms: int) -> bool:
        """Ping ``dev_id`` with a short per-try timeout (3 tries); True if it answered. Holds the
        SDK lock for at most ~3 x ``timeout_ms``, instead of the ~0.6 s of an ordinary request."""
        ump = self.ump
        with ump.lock:
            if ump.h is None:
                return False
            state = ump.h.contents
            normal = state.timeout
            state.timeout = int(timeout_ms)
            try:
                return int(ump.lib.um_ping(ump.h, ctypes.c_int(dev_id))) >= 0
            finally:
                state.timeout = normal

    def claim_device(self, dev_id: int, channel: str) -> None:
        with self._cond:
            owner = self._device_owners.get(dev_id)
            if owner is not None:
                raise Busy(f"Sensapex device {dev_id} is already used by channel {owner!r}", channel=channel)
            self._device_owners[dev_id] = channel

    def unclaim_device(self, dev_id: int) -> None:
        with self._cond:
            self._device_owners.pop(dev_id, None)

    def _close(self) -> None:
        from sensapex import UMP

        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._watcher:  # a done-callback may close channels
            self._watcher.join(timeout=5.0)
        try:
            self.ump.close()  # stops and joins the poller, closes the socket
        finally:
            UMP._single = None
        _log().info("sensapex sdk closed", address=self.address, group=self.group)

    # -- move watching -------------------------------------------------------------------
    def watch(self, dev_id: int, pending: _PendingMove) -> None:
        with self._cond:
            self._pending[dev_id] = pending
            self._cond.notify_all()

    def unwatch(self, dev_id: int) -> _PendingMove | None:
        with self._cond:
            return self._pending.pop(dev_id, None)

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                now = time.monotonic()
                ready = []
                for dev_id, p in list(self._pending.items()):
                    if (
                        p.request.finished_event.is_set()
                        or p.handle.done
                        or now > p.deadline_s
                        or p.channel._retries_exhausted(p, now)
                    ):
                        ready.append(p)
                        del self._pending[dev_id]
            for p in ready:
                try:
                    p.channel._resolve(p)
                except Exception as exc:  # never let the watcher die
                    err = DeviceError(f"move bookkeeping failed: {exc}", channel=p.channel.name)
                    p.handle.finish(MoveState.FAILED, reason=str(err), error=err)
            time.sleep(WATCH_PERIOD_S)


class SensapexManipulator(Manipulator):
    """One Sensapex device (id 1..19) reached through the vendor SDK over UDP.

    ``address``: the SDK's target address (link-local broadcast by default; 127.0.0.1 for the
    simulator). ``group``: 0..10, the device port is 55555+group. ``timeout_ms``: the SDK's
    per-try timeout (three tries per request). Opening takes ~0.2 s (discovery).
    """

    driver_name = "sensapex"
    check_reads_device = True  # its speed check reads the position (see _check_move)
    tolerance_um = 1.0
    completion_margin_s = 4.0
    position_max_age_ms = 20
    lost_backoff_s = 2.0
    probe_timeout_ms = 30

    def __init__(
        self,
        name: str,
        limits: Limits,
        max_speed_um_s: float,
        default_speed_um_s: float | None = None,
        *,
        device_id: int,
        address: str = "169.254.255.255",
        group: int = 0,
        timeout_ms: int = 200,
    ) -> None:
        super().__init__(name, limits, max_speed_um_s, default_speed_um_s)
        if not isinstance(device_id, int) or not 1 <= device_id <= 254:
            raise InvalidParams(f"Sensapex device id must be an integer 1..254, got {device_id!r}", channel=name)
        if limits.n_axes not in (3, 4):
            raise InvalidParams(f"a Sensapex channel has 3 or 4 axes, limits give {limits.n_axes}", channel=name)
        if min(limits.min_um) < SDK_MIN_UM or max(limits.max_um) > SDK_MAX_UM:
            raise InvalidParams(
                f"limits must lie inside the SDK's range {SDK_MIN_UM:g}..{SDK_MAX_UM:g} µm", channel=name
            )
        if self.default_speed_um_s < MIN_SPEED_UM_S:
            raise InvalidParams(f"default speed must be at least {MIN_SPEED_UM_S:g} µm/s", channel=name)
        self.device_id = device_id
        self.address = address
        self.group = group
        self._closed = False
        self._lost = False  # set by a timeout; cleared by any answer
        self._lost_until_s = 0.0  # while lost: fail fast until then, then probe with a quick ping
        self._sdk = SensapexSdk.acquire(address, group, timeout_ms)
        self.timeout_ms = self._sdk.timeout_ms  # the first channel on the SDK sets it for all
        if self.timeout_ms != timeout_ms:
            self.log.warning("the shared Sensapex SDK keeps the first channel's timeout",
                             asked_ms=timeout_ms, timeout_ms=self.timeout_ms)
        try:
            self._sdk.claim_device(device_id, name)
            try:
                self._open_device()
            except BaseException:
                self._sdk.unclaim_device(device_id)
                raise
        except BaseException:
            self._sdk.release()
            raise
        self.log.info("sensapex channel open", device_id=device_id, address=address, group=group,
                      n_axes=self.n_axes)

    def _where(self) -> str:
        return f"Sensapex device {self.device_id} at {self.address} group {self.group}"

    def _error(self, exc: BaseException, what: str) -> PatchrigError:
        """Turn an SDK failure into a clear error naming the channel and the device. A device
        that did not answer is left alone for ``lost_backoff_s`` (see ``_check_reachable``)."""
        errno = _errno_of(exc)
        if errno in (-3, -5):
            self._lost = True
            self._lost_until_s = time.monotonic() + self.lost_backoff_s
        if errno == -3:
            return DeviceTimeout(
                f"{what}: no answer from {self._where()} "
                f"(3 tries of {self.timeout_ms} ms; is it powered, cabled and in this group?)",
                channel=self.name,
            )
        if errno == -5:  # libum forgets a device that stopped answering and then calls it invalid
            return DeviceTimeout(
                f"{what}: no answer from {self._where()}; the SDK no longer knows it ({exc})",
                channel=self.name,
            )
        if errno == -4:
            return InvalidParams(f"{what}: the SDK refused the arguments ({exc})", channel=self.name)
        return DeviceError(f"{what}: {self._where()} failed: {exc}", channel=self.name)

    def _check_reachable(self, what: str) -> None:
        """Keep a device that stopped answering from holding up the other channels: every
        request to a dead device holds the SDK's one lock for ~0.6 s (three tries). After a
        timeout, requests fail at once for ``lost_backoff_s``; after that, a quick ping (three
        tries of ``probe_timeout_ms``) decides whether to ask the device again."""
        if not self._lost:
            return
        now = time.monotonic()
        remaining_s = self._lost_until_s - now
        if remaining_s > 0:
            raise DeviceTimeout(
                f"{what}: {self._where()} did not answer a moment ago; not asked again for "
                f"{remaining_s:.1f} s so that the other channels are not held up",
                channel=self.name,
            )
        if not self._sdk.probe(self.device_id, self.probe_timeout_ms):
            self._lost_until_s = time.monotonic() + self.lost_backoff_s
            raise DeviceTimeout(f"{what}: still no answer from {self._where()} to a ping", channel=self.name)
        self._lost = False

    def _open_device(self) -> None:
        from sensapex import UMError

        ump = self._sdk.ump
        try:
            ump.get_device(self.device_id)
        except ValueError:
            try:
                found = ump.list_devices()
            except (UMError, UserWarning):
                found = []
            raise NotFound(
                f"{self._where()} did not answer discovery; devices found: {found or 'none'}",
                channel=self.name,
            ) from None
        except (UMError, UserWarning) as exc:
            raise self._error(exc, "discovery") from None
        try:
            device_axes = int(ump.axis_count(self.device_id))
        except (UMError, UserWarning) as exc:
            device_axes = self.n_axes
            ump.set_axis_count(self.device_id, self.n_axes)
            self.log.warning("axis count not answered; using the configured count", n_axes=self.n_axes,
                             error=str(exc))
        if device_axes != self.n_axes:
            raise InvalidParams(
                f"{self._where()} has {device_axes} axes but the channel's limits give {self.n_axes}",
                channel=self.name,
            )
        self.position_um  # noqa: B018  (a first read proves the device answers position queries)

    # -- validation ----------------------------------------------------------------------
    def validate_speed(self, speed_um_s: float | None) -> float:
        speed = super().validate_speed(speed_um_s)
        if speed < MIN_SPEED_UM_S:
            raise InvalidParams(
                f"speed {speed:g} µm/s is below the Sensapex minimum of {MIN_SPEED_UM_S:g} µm/s",
                channel=self.name,
            )
        return speed

    # -- hooks ---------------------------------------------------------------------------
    def _do_move_to(self, target_um: np.ndarray, speed_um_s: float, handle: MoveHandle) -> None:
        from sensapex import UMError

        if self._closed:
            raise DeviceError("closed", channel=self.name)
        self._check_reachable("move")
        self._sdk.unwatch(self.device_id)  # the superseded move is already finished by the base
        # Safety: take the superseded request out of the SDK before the new GOTO. Otherwise a
        # failed GOTO leaves it there, and the SDK's poller sends the old target again.
        self._take_move_from_sdk()
        start = time.monotonic()
        try:
            request = self._sdk.ump.goto_pos(
                self.device_id, [float(v) for v in target_um], float(speed_um_s),
                simultaneous=True, linear=True, max_acceleration=0, name=handle.channel,
            )
        except (UMError, UserWarning) as exc:
            self._stop_quietly("a move could not be started")  # the old one may still be running
            raise self._error(exc, "move") from None
        except ValueError as exc:  # axis-count mismatch inside MoveRequest
            raise DeviceError(f"move refused by the SDK: {exc}", channel=self.name) from None
        if handle.done or handle.stop_requested:
            # stopped while the GOTO was on its way: that stop may have found the device idle,
            # and the GOTO then started it; stop it now (stop() finishes the handle)
            self._take_move_from_sdk(request)
            self._stop_quietly("stopped while the move was being sent")
            return
        if self.n_axes < 4:  # sensapex 1.504 compares n read-back axes with 4 thresholds and crashes
            request.retry_threshold = request.retry_threshold[: self.n_axes]
            request.fail_threshold = request.fail_threshold[: self.n_axes]
        # from the axis speeds the SDK sends (whole µm/s): at low speeds the move takes longer
        # than distance / speed (1.9 µm/s runs at 1 µm/s)
        deadline = start + 1.5 * sdk_duration_s(target_um - np.asarray(request.start_pos[: self.n_axes], float),
                                                speed_um_s) + self.completion_margin_s
        self._sdk.watch(self.device_id, _PendingMove(self, request, handle, deadline))

    def _check_move(self, target_um: np.ndarray, speed_um_s: float) -> None:
        """InvalidParams (before the running move is superseded) when the SDK's per-axis
        speeds would move the pipette faster than ``speed_um_s``. With ``linear=True`` the SDK gives each axis its share of the speed,
        raised to at least 1 µm/s (the uMp's minimum) and truncated to whole µm/s; at low
        speeds an axis with a small share then runs faster than its share, and the path speed
        (the norm of the axis speeds) can exceed the request: (1, 1, 1) at 1.5 µm/s for a
        diagonal move is 1.73 µm/s."""
        diff = np.asarray(target_um, float) - np.asarray(self._do_read_position_um(), float)
        axis_speeds = sdk_axis_speeds_um_s(diff, speed_um_s)
        if axis_speeds.size == 0:
            return
        path_um_s = float(np.linalg.norm(axis_speeds))
        if path_um_s > float(speed_um_s) + 1e-9:
            raise InvalidParams(
                f"at {speed_um_s:g} µm/s this move would run its axes at {axis_speeds.tolist()} µm/s "
                f"(each at least {MIN_SPEED_UM_S:g} µm/s), {path_um_s:.2f} µm/s along the path: faster "
                f"than asked; ask for at least {path_um_s:.1f} µm/s or move one axis at a time",
                channel=self.name,
            )

    EXHAUSTED_GRACE_S = 0.15

    def _retries_exhausted(self, p: _PendingMove, now: float) -> bool:
        """True once the SDK has used all its attempts, the device is idle, and the SDK has not
        finished the move for ``EXHAUSTED_GRACE_S`` (sensapex 1.504 crashes in that path for
        3-axis devices, comparing 3 read-back axes with 4 thresholds, and retries forever)."""
        request = p.request
        if request.finished or request.attempts < request.max_attempts or request.has_more_calls_to_make():
            return False
        try:
            if self._do_is_busy():
                p.exhausted_since_s = None
                return False
        except PatchrigError:
            return False
        if p.exhausted_since_s is None:
            p.exhausted_since_s = now
        return now - p.exhausted_since_s > self.EXHAUSTED_GRACE_S

    def _resolve(self, p: _PendingMove) -> None:
        """Finish ``p.handle`` from its SDK MoveRequest (watcher thread)."""
        handle, request = p.handle, p.request
        if handle.done:
            return
        if not request.finished_event.is_set() and p.exhausted_since_s is not None:
            self._take_move_from_sdk(request)
            try:
                position = np.asarray(self._read_fresh_um(), float)
            except PatchrigError as exc:
                handle.finish(MoveState.FAILED, reason=str(exc), error=exc)
                return
            miss_um = float(np.max(np.abs(position - handle.setpoint_um)))
            err0 = DeviceError(
                f"move did not reach its target after {request.attempts} attempts: "
                f"{miss_um:.2f} µm off, read-back {np.round(position, 3).tolist()}",
                channel=self.name,
            )
            handle.finish(MoveState.FAILED, position_um=position.tolist(), reason=str(err0), error=err0)
            return
        if not request.finished_event.is_set():  # deadline passed
            err = DeviceTimeout(
                f"move did not complete within {p.deadline_s - handle.started_s:.1f} s; "
                f"{self._where()} stopped answering or never reported completion; stop sent",
                channel=self.name,
            )
            # Stop first (a done-callback may start the next move), and only while this is
            # still the channel's move: a newer move, sent meanwhile, owns the device.
            with self._move_lock:
                if handle.done or self.current_move is not handle:
                    return
                self._stop_quietly("move timeout")
            handle.finish(MoveState.FAILED, reason=str(err), error=err)
            return
        if request.interrupted:
            reason = str(request.interrupt_reason)
            if reason.startswith(STOP_INTERRUPT_REASON):
                # a stop took the request between its GOTO and its watch, and has not yet
                # finished the handle (it is still verifying the device halted)
                handle.finish(MoveState.INTERRUPTED, reason=reason)
                return
            if "Invalid argument" in reason:
                err2: PatchrigError = InvalidParams(f"the SDK refused the move: {reason}", channel=self.name)
            else:
                err2 = DeviceError(f"move failed: {reason}", channel=self.name)
            handle.finish(MoveState.FAILED, reason=str(err2), error=err2)
            return
        if request.last_pos is None:
            cause = request.last_pos_exception or RuntimeError("no read-back")
            err3 = self._error(cause, "read-back after move")
            handle.finish(MoveState.FAILED, reason=str(err3), error=err3)
            return
        position = np.asarray(request.last_pos, float)[: self.n_axes]
        miss_um = float(np.max(np.abs(position - handle.setpoint_um)))
        if miss_um > self.tolerance_um:
            err4 = DeviceError(
                f"move finished {miss_um:.2f} µm from its target (tolerance {self.tolerance_um:g} µm); "
                f"read-back {np.round(position, 3).tolist()}",
                channel=self.name,
            )
            handle.finish(MoveState.FAILED, position_um=position.tolist(), reason=str(err4), error=err4)
            return
        handle.finish(MoveState.DONE, position_um=position.tolist())

    def _take_move_from_sdk(self, only: Any = None) -> Any:
        """Remove this device's pending ``MoveRequest`` from the SDK (only if it is ``only``,
        when given), so that the SDK's poller never sends its GOTO again; the removed request or
        None."""
        ump = self._sdk.ump
        with ump.lock:
            pending = ump._last_move.get(self.device_id)
            if pending is None or (only is not None and pending is not only):
                return None
            return ump._last_move.pop(self.device_id)

    def _do_stop(self, reason: str) -> None:
        from sensapex import UMError

        move_at_stop = self.current_move  # a move started after this one supersedes the stop
        watched = self._sdk.unwatch(self.device_id)
        ump = self._sdk.ump
        try:
            with ump.lock:
                # BEFORE the STOP: once the device has obeyed it, the poller would otherwise see
                # it idle short of its target, between a STOP whose ACK never came and our clean-up
                request = self._take_move_from_sdk()
                try:
                    ump.stop(self.device_id, reason=reason)
                    if request is not None:  # what ump.stop does with a pending move (a second STOP)
                        request.interrupt(f"{STOP_INTERRUPT_REASON} ({reason})")
                except (UMError, UserWarning) as exc:
                    if request is not None and not request.finished:
                        request.interrupted = True
                        request.interrupt_reason = f"stop failed: {exc}"
                        request.finished = True
                        request.finished_event.set()
                    raise self._error(exc, "stop") from None
        finally:
            # the watched move may be newer than the one stop() saw: this STOP halted it too
            if watched is not None and not watched.handle.done:
                watched.handle.finish(MoveState.INTERRUPTED, reason=reason)
        self._lost = False  # it answered the STOP: reachable again
        self._verify_stopped(move_at_stop)

    STOP_CHECK_S = 0.1
    STOP_TRIES = 3
    STILL_UM = 0.05  # moved less than this in STOP_CHECK_S: stopped (catches >= 0.5 µm/s)

    def _verify_stopped(self, move_at_stop: MoveHandle | None = None) -> None:
        """Make sure the device obeyed the STOP. If it already reports idle, done. Otherwise
        read the position twice ``STOP_CHECK_S`` apart; while it still changes by
        ``STILL_UM`` or more (a slow approach too), send STOP again (up to ``STOP_TRIES`` in
        all). A device that keeps moving is a ``DeviceError``.

        A move started (from another thread) after the STOP is newer than it and wins: the
        check ends at once, and no further STOP is sent that would cut that move short."""
        from sensapex import UMError

        def superseded() -> bool:
            return self.current_move is not move_at_stop

        if superseded() or not self._do_is_busy():
            return
        previous = np.asarray(self._read_fresh_um())
        for attempt in range(1, self.STOP_TRIES + 1):
            time.sleep(self.STOP_CHECK_S)
            if superseded():
                return
            now = np.asarray(self._read_fresh_um())
            if float(np.max(np.abs(now - previous))) < self.STILL_UM:
                return
            previous = now
            if superseded():
                return
            if attempt < self.STOP_TRIES:
                self.log.warning("device still moving after STOP; sending STOP again", attempt=attempt)
                try:
                    self._sdk.ump.call("um_stop", ctypes.c_int(self.device_id))
                except (UMError, UserWarning) as exc:
                    raise self._error(exc, "repeated stop") from None
        raise DeviceError(
            f"{self._where()} kept moving after {self.STOP_TRIES} STOP commands "
            f"(position {np.round(previous, 3).tolist()} µm)",
            channel=self.name,
        )

    def query_position_um(self) -> np.ndarray:
        """Ask the device now (one GET_POSITIONS round trip), bypassing the SDK's cache."""
        return np.asarray(self._read_fresh_um(), float)

    def _read_fresh_um(self) -> list[float]:
        from sensapex import UMError

        self._check_reachable("position read")
        try:
            pos = self._sdk.ump.get_pos(self.device_id, timeout=-1)
        except (UMError, UserWarning) as exc:
            raise self._error(exc, "position read") from None
        return [float(v) for v in pos[: self.n_axes]]

    def _stop_quietly(self, reason: str) -> None:
        try:
            self._do_stop(reason)
        except PatchrigError as exc:
            self.log.warning("stop failed", reason=reason, error=str(exc))

    def _do_read_position_um(self) -> Sequence[float]:
        from sensapex import UMError

        self._check_reachable("position read")
        try:
            pos = self._sdk.ump.get_pos(self.device_id, timeout=self.position_max_age_ms)
        except (UMError, UserWarning) as exc:
            raise self._error(exc, "position read") from None
        return [float(v) for v in pos[: self.n_axes]]

    def _do_is_busy(self) -> bool:
        # Not ump.is_busy: a drive status of -1 ("failed", e.g. after a STOP) is a valid answer,
        # but UMP.call treats any negative return as an error and reports a stale last error.
        ump = self._sdk.ump
        with ump.lock:
            if ump.h is None:
                raise DeviceError("the Sensapex SDK is closed", channel=self.name)
            status = int(ump.lib.um_get_drive_status(ump.h, ctypes.c_int(self.device_id)))
        return status > 0

    def _describe_backend(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "address": self.address,
            "group": self.group,
            "timeout_ms": self.timeout_ms,
            "sdk": "sensapex " + _sdk_version(),
        }

    def close(self) -> None:
        """Stop the device if a move is running, and release the shared SDK. Idempotent."""
        if self._closed:
            return
        with self._move_lock:  # no move can be on its way while the channel closes
            current = self.current_move
            if current is not None and not current.done:
                try:
                    self.stop("closed")
                except PatchrigError as exc:
                    self.log.warning("stop on close failed", error=str(exc))
            self._closed = True
        self._sdk.unwatch(self.device_id)
        self._sdk.unclaim_device(self.device_id)
        self._sdk.release()
        self.log.info("sensapex channel closed")


def _sdk_version() -> str:
    try:
        from importlib.metadata import version

        return version("sensapex")
    except Exception:
        return "unknown"
