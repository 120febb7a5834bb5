"""Scientifica PatchStar / MicroStar / LinLab controllers on a serial port (pyserial).

Two layers, one concept each:

- ``ScientificaProtocol``: the byte-level LinLab exchange on an open port (one CR-terminated
  command, one CR-terminated reply), the identity handshake, version-aware units, user-unit
  scale, and the ``TOP``/``ACC`` conversions. Single-threaded; no motion logic.
- ``ScientificaManipulator``: the ``Manipulator`` backend. ONE worker thread owns the port: it
  runs queued requests (moves, settings), polls ``S`` and the position (20 Hz while a move runs,
  10 Hz when idle) into a read-back cache, and finishes move handles. ``stop()`` never queues:
  it raises a flag that the worker services before anything else; the exchange in flight, if
  any, is bounded by the per-reply timeout, and queued moves older than the stop are dropped.

Units: the device counts ticks of 0.1 µm (controller version 2) or 0.01 µm (version 3), read
with ``VER`` at start-up. The user-unit scale (``UUX/UUY/UUZ`` on v2, ``USTEP X|Y|Z`` on v3) is
applied by the controller itself (a negative value reverses an axis); the driver reads it for
the v2 speed and acceleration units and reports it in ``describe()``.

Speed (per move, under the worker, so nothing interleaves): ``TOP n`` -> ``ABS x y z`` ->
``TOP <previous>``. v2: n = floor(speed_um_s * 2 * min|UU|) in 1000..50000; v3: n = floor
(speed_um_s) µm/s in 1..5000. A speed below the controller's minimum runs as a stepwise move
(short ``ABS`` steps at the minimum speed, paced so that the mean speed is the one asked for),
as ACQ4 does for old controllers; a speed above its maximum is rejected before anything is sent.
Rounding is always toward slower. Acceleration: ``ACC n``, v2 n = round(a * min|UU| / 250) in
10..1000, v3 µm/s².

Completion: a move is done when ``S`` reports idle twice, at least 100 ms apart, with the
position unchanged and within ``tolerance_um`` of the target. A device that stops short is sent
the same ``ABS`` again, at most ``max_retries`` times; then the move fails with a clear error.

Safety: targets are checked against the soft limits by ``Manipulator.move_to`` and rounded to
ticks toward the inside of the limits, so the device is never sent a point outside them.
A garbled reply (high-bit bytes, unparseable text, a line without CR) is followed by a
resynchronisation (drain until the line is quiet, flush) and one retry; a timeout likewise.
If the device stays silent for ``lost_after_s``, the running move fails with ``DeviceTimeout``
and the read-back raises until the device answers again. Every error names the channel and the
port.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import serial

from manipulators.base import Limits, Manipulator, MoveHandle, MoveState
from rig.errors import DeviceError, DeviceTimeout, InvalidParams, OutOfBounds, PatchrigError
from rig.logs import get_logger

T = TypeVar("T")

try:  # pyserial's POSIX backend lets termios.error (not an OSError) escape, e.g. when unplugged
    from termios import error as _TermiosError
except ImportError:  # pragma: no cover - Windows
    _TermiosError = OSError  # type: ignore[assignment,misc]
IO_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError, _TermiosError)

IDENTITY_COMMAND = "scientifica"
IDENTITY_REPLY = "Y519"
TICKS_PER_UM = {2: 10.0, 3: 100.0}
TOP_RANGE = {2: (1000, 50000), 3: (1, 5000)}
ACC_RANGE = {2: (10, 1000), 3: (1, 100000)}
BAUD_RATES = (9600, 38400)
POLL_MOVING_S = 0.05
POLL_IDLE_S = 0.1  # keeps the idle read-back within 100 ms (~30 % of a 9600-baud line)
RECHECK_S = 0.1
STEP_S = 0.1  # pacing of stepwise (slow) moves
MAX_STEP_S = 0.25  # a stepwise ABS covers at most this long of the schedule (no catch-up bursts)


# -- errors ------------------------------------------------------------------------------------
class GarbledReply(DeviceError):
    """The reply could not be read: high-bit bytes, no CR, or not the expected shape."""


class ErrorReply(DeviceError):
    """The controller answered ``E`` (``E,n``): it refused the command. ``errno`` is n or None."""

    def __init__(self, message: str, *, channel: str | None = None, errno: int | None = None) -> None:
        super().__init__(message, channel=channel)
        self.errno = errno


class StopRequested(Exception):
    """Internal: a stop was requested while a slow exchange was in progress."""


class SerialLike(Protocol):
    """The part of ``serial.Serial`` the protocol uses (a scripted fake in byte-level tests)."""

    timeout: float | None
    baudrate: int

    def write(self, data: bytes) -> int | None: ...
    def read(self, size: int = 1) -> bytes: ...
    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes: ...
    def reset_input_buffer(self) -> None: ...
    def close(self) -> None: ...


# -- parsers (each raises ValueError on a reply of the wrong shape) -----------------------------
def parse_ack(text: str) -> None:
    if text != "A":
        raise ValueError(f"expected 'A', got {text!r}")


def parse_int(text: str) -> int:
    return int(text.strip())


def parse_float(text: str) -> float:
    value = float(text.strip())
    if not math.isfinite(value):
        raise ValueError(f"not finite: {text!r}")
    return value


def parse_text(text: str) -> str:
    return text


def parse_position_ticks(text: str) -> tuple[int, int, int]:
    parts = text.replace(",", "\t").split()
    if len(parts) != 3:
        raise ValueError(f"expected 3 values, got {text!r}")
    x, y, z = (int(p) for p in parts)
    return x, y, z


def parse_version(text: str) -> int:
    version = int(float(text.strip()))
    if version < 1:
        raise ValueError(f"implausible version {text!r}")
    return version


# -- device facts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScientificaInfo:
    """What the handshake learned. ``version`` is the controller version (``VER``); ``units``
    is 2 or 3 (0.1 or 0.01 µm ticks); ``uu`` the user-unit scale per axis; ``top_default`` and
    ``acc`` the device's ``TOP`` and ``ACC`` (device units) at start-up."""

    version: int
    uu: tuple[float, float, float]
    top_default: int
    acc: int
    description: str = ""
    firmware: str = ""
    type_code: str = ""

    @property
    def units(self) -> int:
        return 3 if self.version >= 3 else 2

    @property
    def ticks_per_um(self) -> float:
        return TICKS_PER_UM[self.units]

    @property
    def min_abs_uu(self) -> float:
        return float(min(abs(u) for u in self.uu))

    def top_for_speed(self, speed_um_s: float) -> int:
        """``TOP`` value for ``speed_um_s`` (rounded toward slower; may be out of range)."""
        if self.units == 2:
            return math.floor(speed_um_s * 2.0 * self.min_abs_uu + 1e-9)
        return math.floor(speed_um_s + 1e-9)

    def speed_for_top(self, top: int) -> float:
        if self.units == 2:
            return top / (2.0 * self.min_abs_uu)
        return float(top)

    @property
    def min_speed_um_s(self) -> float:
        return self.speed_for_top(TOP_RANGE[self.units][0])

    @property
    def max_speed_um_s(self) -> float:
        return self.speed_for_top(TOP_RANGE[self.units][1])

    def acc_for_acceleration(self, acceleration_um_s2: float) -> int:
        if self.units == 2:
            return round(acceleration_um_s2 * self.min_abs_uu / 250.0)
        return round(acceleration_um_s2)

    def acceleration_for_acc(self, acc: int) -> float:
        if self.units == 2:
            return 250.0 * acc / self.min_abs_uu
        return float(acc)


# -- the byte-level protocol ---------------------------------------------------------------------
class ScientificaProtocol:
    """LinLab exchanges on an open port. Not thread-safe: one thread owns it.

    ``abort``: a callable the slow paths (retries, resynchronisation, multi-command sequences)
    check; when it returns True they raise ``StopRequested`` so that a stop is serviced quickly.
    """

    def __init__(
        self,
        port: SerialLike,
        *,
        channel: str,
        port_name: str,
        timeout_s: float = 0.5,
        abort: Callable[[], bool] | None = None,
    ) -> None:
        self.port = port
        self.channel = channel
        self.port_name = port_name
        self.timeout_s = float(timeout_s)
        self.abort = abort or (lambda: False)
        self.info: ScientificaInfo | None = None
        self.top_dirty = False  # TOP was changed for a move and not yet restored
        self.log = get_logger("patchrig.scientifica", channel=channel)
        self._current_timeout: float | None = None
        self.garbled_count = 0
        self.timeout_count = 0

    # -- raw exchange ----------------------------------------------------------------------
    def _set_timeout(self, timeout_s: float) -> None:
        if self._current_timeout != timeout_s:
            self.port.timeout = timeout_s
            self._current_timeout = timeout_s

    def _where(self) -> str:
        return f"port {self.port_name}"

    def exchange_once(self, command: str, parse: Callable[[str], T], timeout_s: float | None = None) -> T:
        """Send ``command`` + CR, read one CR-terminated reply and parse it. No retry."""
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            self.port.reset_input_buffer()
            self.port.write(command.encode("ascii") + b"\r")
            self._set_timeout(wait_s)
            raw = self.port.read_until(b"\r")
            if raw and not raw.endswith(b"\r"):
                # pyserial gives up as the deadline passes even mid-line: finish the line
                self._set_timeout(min(0.05, wait_s))
                raw += self.port.read_until(b"\r")
        except serial.SerialTimeoutException:
            self.timeout_count += 1
            raise DeviceTimeout(f"could not send {command!r} within {wait_s:.2f} s ({self._where()})",
                                channel=self.channel) from None
        except IO_ERRORS as exc:
            raise DeviceError(f"serial I/O failed on {self._where()} during {command!r}: {exc}",
                              channel=self.channel) from exc
        if not raw.endswith(b"\r"):
            if raw:
                self.garbled_count += 1
                raise GarbledReply(f"incomplete reply {raw!r} to {command!r} ({self._where()})",
                                   channel=self.channel)
            self.timeout_count += 1
            raise DeviceTimeout(f"no reply to {command!r} within {wait_s:.2f} s ({self._where()})",
                                channel=self.channel)
        body = raw[:-1]
        if any(not (32 <= b < 127 or b == 9) for b in body):
            self.garbled_count += 1
            raise GarbledReply(f"garbled reply {raw!r} to {command!r} ({self._where()})", channel=self.channel)
        text = body.decode("ascii").strip()
        if text.startswith("E") and (len(text) == 1 or text[1] in ", "):
            digits = text[2:].strip()
            errno = int(digits) if digits.isdigit() else None
            raise ErrorReply(f"controller refused {command!r} with {text!r} ({self._where()})",
                             channel=self.channel, errno=errno)
        try:
            return parse(text)
        except ValueError as exc:
            self.garbled_count += 1
            raise GarbledReply(f"unexpected reply {text!r} to {command!r} ({self._where()}): {exc}",
                               channel=self.channel) from None

    def resync(self, *, abortable: bool = True) -> None:
        """Drain whatever is still arriving (until the line is quiet, at most ``timeout_s``),
        then flush the input, so that a late or partial reply cannot be taken for the next one."""
        quiet_s = min(0.1, self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        try:
            self._set_timeout(quiet_s)
            while time.monotonic() < deadline:
                if abortable and self.abort():
                    break
                if not self.port.read(4096):
                    break
            self.port.reset_input_buffer()
        except IO_ERRORS as exc:
            raise DeviceError(f"serial I/O failed on {self._where()} while resynchronising: {exc}",
                              channel=self.channel) from exc

    def exchange(
        self,
        command: str,
        parse: Callable[[str], T] = parse_ack,  # type: ignore[assignment]
        *,
        timeout_s: float | None = None,
        retries: int = 1,
        abortable: bool = True,
    ) -> T:
        """``exchange_once`` with resynchronisation and ``retries`` retries after a garbled
        reply or a timeout. ``E`` replies are real answers and are not retried."""
        error: DeviceError | None = None
        for attempt in range(retries + 1):
            if abortable and self.abort():
                raise StopRequested()
            if attempt:
                self.log.warning("resynchronising", command=command, error=str(error))
                self.resync(abortable=abortable)
                if abortable and self.abort():
                    raise StopRequested()
            try:
                return self.exchange_once(command, parse, timeout_s)
            except (GarbledReply, DeviceTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    # -- identity ----------------------------------------------------------------------------
    def handshake(self, baud: int) -> None:
        """``scientifica`` -> ``Y519``; retried once with a longer wait. On failure, probe the
        other baud rate so that the error can say what the device is set to."""
        garbled = False
        for wait_s in (self.timeout_s, 2 * self.timeout_s):
            try:
                reply = self.exchange(IDENTITY_COMMAND, parse_text, timeout_s=wait_s, retries=0,
                                      abortable=False)
            except GarbledReply:
                garbled = True
                self.resync(abortable=False)
                continue
            except DeviceTimeout:
                continue
            except ErrorReply as exc:
                raise DeviceError(
                    f"the device on {self._where()} refused the identity check ({exc}); "
                    "not a Scientifica controller?", channel=self.channel) from None
            if reply == IDENTITY_REPLY:
                return
            raise DeviceError(
                f"the device on {self._where()} answered {reply!r} to the identity check, "
                f"expected {IDENTITY_REPLY!r}: not a Scientifica controller", channel=self.channel)
        other = BAUD_RATES[1] if baud == BAUD_RATES[0] else BAUD_RATES[0]
        if self._answers_at(other, baud):
            raise DeviceError(
                f"the controller on {self._where()} answers at {other} baud, not the configured "
                f"{baud}: set baud = {other} for this channel (or send 'BAUD {str(baud)[:2]}' "
                "from LinLab)", channel=self.channel)
        if garbled:
            raise DeviceError(
                f"garbled answers to the identity check at {baud} baud on {self._where()}: wrong "
                "baud rate or a noisy line", channel=self.channel)
        raise DeviceTimeout(
            f"no answer to the identity check on {self._where()} at {baud} baud: is the "
            "controller on, on this port, and not held by LinLab?", channel=self.channel)

    def _answers_at(self, baud: int, restore_baud: int) -> bool:
        try:
            self.port.baudrate = baud
            self.exchange_once(IDENTITY_COMMAND, _expect(IDENTITY_REPLY))
            return True
        except DeviceError:
            return False
        finally:
            with contextlib.suppress(*IO_ERRORS, ValueError):
                self.port.baudrate = restore_baud
            with contextlib.suppress(*IO_ERRORS, DeviceError):
                self.resync(abortable=False)

    def identify(self, baud: int, expected_version: int | None = None) -> ScientificaInfo:
        """Handshake, then read version, name, firmware, type, user units, TOP and ACC."""
        self.handshake(baud)
        version = self.exchange("VER", parse_version, abortable=False)
        units = 3 if version >= 3 else 2
        if expected_version is not None and units != expected_version:
            raise DeviceError(
                f"the controller on {self._where()} reports version {version} "
                f"({'0.01' if units == 3 else '0.1'} µm ticks) but the configuration expects "
                f"version {expected_version}; speed and acceleration units differ between them: "
                "fix expected_version", channel=self.channel)
        description = self._optional("DESC")
        date = self._optional("DATE")
        firmware = date.split("\t", 1)[0].split(" ", 1)[-1] if date else ""
        type_code = self._optional("TYPE")
        if units == 2:
            uu = tuple(self.exchange(f"UU{a}", parse_float, abortable=False) for a in "XYZ")
        else:
            uu = tuple(self.exchange(f"USTEP {a}", parse_float, abortable=False) for a in "XYZ")
        if any(u == 0 for u in uu):
            raise DeviceError(f"the controller on {self._where()} reports a zero user-unit scale {uu}",
                              channel=self.channel)
        top = self.exchange("TOP", parse_int, abortable=False)
        acc = self.exchange("ACC", parse_int, abortable=False)
        self.info = ScientificaInfo(
            version=version, uu=(uu[0], uu[1], uu[2]), top_default=top, acc=acc,
            description=description, firmware=firmware, type_code=type_code,
        )
        self.log.info("scientifica identified", port=self.port_name, version=version, uu=list(uu),
                      description=description, firmware=firmware, type=type_code)
        return self.info

    def _optional(self, command: str) -> str:
        try:
            return self.exchange(command, parse_text, abortable=False)
        except ErrorReply:
            return ""

    # -- motion ------------------------------------------------------------------------------
    def _need_info(self) -> ScientificaInfo:
        if self.info is None:
            raise DeviceError("controller not identified yet", channel=self.channel)
        return self.info

    def read_status(self) -> int:
        """``S``: 0 idle, non-zero moving (1-7, see the protocol notes)."""
        return self.exchange("S", parse_int)

    def read_position_um(self) -> np.ndarray:
        """``POS`` (v2) or ``P`` (v3), converted from ticks to µm."""
        info = self._need_info()
        ticks = self.exchange("POS" if info.units == 2 else "P", parse_position_ticks)
        return np.asarray(ticks, float) / info.ticks_per_um

    def ticks_for(self, target_um: np.ndarray, limits: Limits | None = None) -> tuple[int, int, int]:
        """Round a target in µm to ticks, toward the inside of ``limits`` when rounding would
        leave them. Raises ``OutOfBounds`` if an axis's limits hold no tick at all."""
        tpu = self._need_info().ticks_per_um
        ticks = []
        for axis, value in enumerate(np.asarray(target_um, float)):
            t = round(value * tpu)
            if limits is not None:
                lo, hi = limits.min_um[axis], limits.max_um[axis]
                if t / tpu > hi:
                    t = math.floor(hi * tpu)
                    t -= 1 if t / tpu > hi else 0  # float rounding of hi * tpu
                if t / tpu < lo:
                    t = math.ceil(lo * tpu)
                    t += 1 if t / tpu < lo else 0
                if not lo <= t / tpu <= hi:
                    raise OutOfBounds(
                        f"axis {axis}: no {1 / tpu:g} µm device step lies within the limits "
                        f"[{lo:.3f}, {hi:.3f}] µm; rejected, nothing moved", channel=self.channel)
            ticks.append(int(t))
        return ticks[0], ticks[1], ticks[2]

    def send_move(self, ticks: tuple[int, int, int], top: int) -> None:
        """``TOP top`` -> ``ABS x y z`` -> ``TOP <default>``. Checks ``abort`` between commands;
        ``top_dirty`` stays set if the restore did not happen (the stop path restores it)."""
        info = self._need_info()
        if top != info.top_default or self.top_dirty:
            # dirty before the exchange: a garbled answer may hide a TOP the device applied.
            # A dirty TOP (an earlier restore failed) is always overwritten, so that no move
            # runs at an earlier move's speed.
            self.top_dirty = True
            self.exchange(f"TOP {top}")
            self.top_dirty = top != info.top_default
        try:
            self.exchange(f"ABS {ticks[0]} {ticks[1]} {ticks[2]}")
        finally:
            if self.top_dirty and not self.abort():
                self.restore_top()

    def restore_top(self) -> None:
        info = self._need_info()
        self.exchange(f"TOP {info.top_default}", abortable=False)
        self.top_dirty = False

    def stop(self) -> None:
        """``STOP`` (never aborted, retried once)."""
        self.exchange("STOP", abortable=False)

    def set_acceleration(self, acceleration_um_s2: float) -> int:
        """``ACC n``; returns n. Raises ``InvalidParams`` when out of the controller's range."""
        info = self._need_info()
        acc = info.acc_for_acceleration(acceleration_um_s2)
        lo, hi = ACC_RANGE[info.units]
        if not lo <= acc <= hi:
            raise InvalidParams(
                f"acceleration {acceleration_um_s2:g} µm/s² is outside this controller's range "
                f"{info.acceleration_for_acc(lo):.0f}..{info.acceleration_for_acc(hi):.0f} µm/s²",
                channel=self.channel)
        self.exchange(f"ACC {acc}", abortable=False)
        self.info = ScientificaInfo(
            version=info.version, uu=info.uu, top_default=info.top_default, acc=acc,
            description=info.description, firmware=info.firmware, type_code=info.type_code)
        return acc


def _expect(wanted: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text != wanted:
            raise ValueError(f"expected {wanted!r}, got {text!r}")
        return text
    return parse


def open_serial_port(port: str, baud: int, timeout_s: float, channel: str) -> serial.Serial:
    """Open ``port`` exclusively (8N1, no handshake) or raise a ``DeviceError`` that says why."""
    try:
        return serial.Serial(port, baudrate=baud, timeout=timeout_s, write_timeout=timeout_s,
                             exclusive=True)
    except serial.SerialException as exc:
        text = str(exc)
        if "exclusively lock" in text or "Resource temporarily unavailable" in text or "busy" in text:
            reason = "is in use by another program (LinLab, another patchrig?)"
        elif "No such file" in text:
            reason = "does not exist (unplugged, or the wrong port name?)"
        elif "Permission denied" in text:
            reason = "is not accessible (permission denied: add the user to the dialout group)"
        else:
            reason = f"could not be opened ({text})"
        raise DeviceError(f"serial port {port} {reason}", channel=channel) from None
    except (OSError, ValueError) as exc:
        raise DeviceError(f"serial port {port} could not be opened ({exc})", channel=channel) from None


# -- the manipulator -----------------------------------------------------------------------------
@dataclass
class _Request:
    seq: int
    kind: str  # "move" | "call"
    handle: MoveHandle | None = None
    target_um: np.ndarray | None = None
    speed_um_s: float = 0.0
    call: Callable[[ScientificaProtocol], Any] | None = None
    future: Future[Any] | None = None


@dataclass
class _ActiveMove:
    handle: MoveHandle
    target_um: np.ndarray
    ticks: tuple[int, int, int]
    top: int
    speed_um_s: float
    stepwise: bool
    start_um: np.ndarray
    started_s: float
    deadline_s: float
    issued_s: float = 0.0
    retries: int = 0
    idle_since_s: float | None = None
    idle_position_um: np.ndarray | None = None
    final_issued: bool = True
    next_step_s: float = 0.0
    last_step_s: float | None = None  # when the previous stepwise ABS was paced
    last_step_ticks: tuple[int, int, int] | None = None


@dataclass
class _Readback:
    position_um: np.ndarray
    status: int = 0
    at_s: float = field(default_factory=time.monotonic)


class ScientificaManipulator(Manipulator):
    """A Scientifica channel (3 axes, device µm) on ``port`` at ``baud``.

    ``timeout_s``: per-reply timeout. ``expected_version``: 2 or 3; a controller of the other
    version is refused (its speed units differ). ``tolerance_um``: how close a finished move
    must be. ``max_retries``: re-sent ``ABS`` when the device stops short.
    ``acceleration_um_s2``: sent with ``ACC`` at start-up when given (else the device's own).
    ``lost_after_s``: how long without a valid reply before a running move fails and the
    read-back raises (default max(2 s, 4 * timeout_s)).
    Opening performs the handshake; errors name the channel and the port.
    """

    driver_name = "scientifica"

    def __init__(
        self,
        name: str,
        limits: Limits,
        max_speed_um_s: float,
        default_speed_um_s: float | None = None,
        *,
        port: str,
        baud: int = 9600,
        timeout_s: float = 0.5,
        expected_version: int | None = None,
        tolerance_um: float = 0.5,
        max_retries: int = 3,
        acceleration_um_s2: float | None = None,
        lost_after_s: float | None = None,
    ) -> None:
        super().__init__(name, limits, max_speed_um_s, default_speed_um_s)
        if limits.n_axes != 3:
            raise InvalidParams(f"a Scientifica controller has 3 axes, the limits have {limits.n_axes}",
                                channel=name)
        if baud not in BAUD_RATES:
            raise InvalidParams(f"baud must be 9600 or 38400, got {baud!r}", channel=name)
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidParams(f"timeout_s must be positive, got {timeout_s!r}", channel=name)
        if expected_version not in (None, 2, 3):
            raise InvalidParams(f"expected_version must be 2 or 3, got {expected_version!r}", channel=name)
        self.port_name = port
        self.baud = baud
        self.timeout_s = float(timeout_s)
        self.tolerance_um = float(tolerance_um)
        self.max_retries = int(max_retries)
        self.lost_after_s = float(lost_after_s) if lost_after_s else max(2.0, 4 * self.timeout_s)
        self._stop_flag = threading.Event()
        self._closing = threading.Event()
        self._state_lock = threading.Lock()  # guards seq, stop waiters, cache; held briefly
        self._seq = 0
        self._stop_waiters: list[tuple[int, str, threading.Event, list[PatchrigError]]] = []
        # the newest request number a serviced STOP covered, and its reason (port thread only):
        # a move taken off the queue just before that STOP must not start after it
        self._stopped_through_seq = 0
        self._stopped_reason = ""
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._active: _ActiveMove | None = None  # worker thread only
        self._failure: PatchrigError | None = None
        self._closed = False
        self._closing_moves = False  # close() began: no new move is accepted
        self._serial = open_serial_port(port, baud, self.timeout_s, name)
        try:
            self._proto = ScientificaProtocol(self._serial, channel=name, port_name=port,
                                              timeout_s=self.timeout_s, abort=self._stop_flag.is_set)
            self._proto.identify(baud, expected_version)
            if acceleration_um_s2 is not None:
                self._proto.set_acceleration(acceleration_um_s2)
            position = self._proto.read_position_um()
            status = self._proto.read_status()
        except BaseException:
            self._serial.close()
            raise
        self._cache = _Readback(position_um=position, status=status)
        self._last_ok_s = time.monotonic()
        self._poll_failures = 0
        if self.default_speed_um_s > self.info.max_speed_um_s:
            self.log.warning("default speed above what this controller can do; moves at the default "
                             "speed will be refused", default_speed_um_s=self.default_speed_um_s,
                             device_max_um_s=self.info.max_speed_um_s)
        self._thread = threading.Thread(target=self._run, name=f"scientifica-{name}", daemon=True)
        self._thread.start()

    @property
    def info(self) -> ScientificaInfo:
        """What the handshake learned (version, user units, TOP and ACC in device units)."""
        info = self._proto.info
        assert info is not None
        return info

    # -- hooks ---------------------------------------------------------------------------------
    def validate_speed(self, speed_um_s: float | None) -> float:
        """The base checks, plus the controller's own maximum (``TOP`` range), before anything
        is sent or superseded."""
        speed = super().validate_speed(speed_um_s)
        if speed > self.info.max_speed_um_s:
            raise InvalidParams(
                f"speed {speed:.1f} µm/s above what this controller can do "
                f"({self.info.max_speed_um_s:.1f} µm/s)", channel=self.name)
        return speed

    def _do_move_to(self, target_um: np.ndarray, speed_um_s: float, handle: MoveHandle) -> None:
        self._check_usable()
        self._proto.ticks_for(target_um, self.limits)  # OutOfBounds here, before anything is queued
        self._submit(_Request(seq=0, kind="move", handle=handle, target_um=target_um.copy(),
                              speed_um_s=speed_um_s))

    def _do_stop(self, reason: str) -> None:
        if self._closed:
            return
        if not self._thread.is_alive():
            raise DeviceError(f"port thread not running, cannot stop (port {self.port_name})",
                              channel=self.name)
        done = threading.Event()
        errors: list[PatchrigError] = []
        with self._state_lock:
            self._stop_waiters.append((self._seq, reason, done, errors))
            self._stop_flag.set()
        if threading.current_thread() is self._thread:
            self._service_stop()  # called from a done-callback on the port thread: serve it here
        else:
            self._requests.put(None)  # wake the worker if it waits for work
            if not done.wait(self.lost_after_s + 3 * self.timeout_s + 1.0):
                raise DeviceTimeout(f"STOP not confirmed on port {self.port_name}", channel=self.name)
        if errors:
            raise errors[0]

    def _do_read_position_um(self) -> Sequence[float]:
        with self._state_lock:
            cache = self._cache
        age_s = time.monotonic() - cache.at_s
        if self._closed:
            raise DeviceError(f"closed (port {self.port_name})", channel=self.name)
        if age_s > self.lost_after_s:
            raise DeviceTimeout(
                f"no position from the controller for {age_s:.1f} s (port {self.port_name})",
                channel=self.name)
        return cache.position_um.tolist()

    def _do_is_busy(self) -> bool:
        with self._state_lock:
            status = self._cache.status
        return self._active is not None or status != 0

    def _describe_backend(self) -> dict[str, Any]:
        info = self.info
        return {
            "port": self.port_name,
            "baud": self.baud,
            "controller_version": info.version,
            "um_per_tick": 1.0 / info.ticks_per_um,
            "user_units": list(info.uu),
            "reversed_axes": [i for i, u in enumerate(info.uu) if u < 0],
            "description": info.description,
            "firmware": info.firmware,
            "type": info.type_code,
            "device_speed_range_um_s": [info.min_speed_um_s, info.max_speed_um_s],
            "acceleration_um_s2": info.acceleration_for_acc(info.acc),
            "tolerance_um": self.tolerance_um,
            "timeout_s": self.timeout_s,
        }

    # -- extra API ------------------------------------------------------------------------------
    def set_acceleration_um_s2(self, acceleration_um_s2: float, timeout_s: float = 5.0) -> None:
        """Set the controller's acceleration (``ACC``). Runs on the port thread."""
        if not (math.isfinite(acceleration_um_s2) and acceleration_um_s2 > 0):
            raise InvalidParams(f"acceleration {acceleration_um_s2!r} µm/s² must be positive", channel=self.name)
        self.call(lambda proto: proto.set_acceleration(acceleration_um_s2), timeout_s)

    def call(self, fn: Callable[[ScientificaProtocol], T], timeout_s: float = 5.0) -> T:
        """Run ``fn(protocol)`` on the port thread (for settings and diagnostics); return its result."""
        self._check_usable()
        if threading.current_thread() is self._thread:  # e.g. from a done-callback
            return fn(self._proto)
        future: Future[T] = Future()
        self._submit(_Request(seq=0, kind="call", call=fn, future=future))
        try:
            return future.result(timeout_s)
        except TimeoutError:
            raise DeviceTimeout(f"port thread busy for {timeout_s} s (port {self.port_name})",
                                channel=self.name) from None

    def close(self) -> None:
        """Stop motion, end the port thread, close the port. Idempotent; safe from a move's
        done-callback (which runs on the port thread: the thread then closes the port itself)."""
        if self._closed:
            return
        with self._move_lock:  # a move being queued now is queued before the STOP below, later ones refused
            self._closing_moves = True
        try:
            self.stop("close")
        except PatchrigError as exc:
            self.log.warning("stop on close failed", error=str(exc))
        self._closed = True
        self._closing.set()
        self._requests.put(None)
        if threading.current_thread() is self._thread:
            return
        self._thread.join(self.lost_after_s + 5 * self.timeout_s + 2.0)
        self._release_port()

    def _release_port(self) -> None:
        with contextlib.suppress(*IO_ERRORS):
            self._serial.close()
        self._fail_pending(DeviceError(f"closed (port {self.port_name})", channel=self.name), "closed")

    # -- request plumbing -------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed or self._closing_moves:
            raise DeviceError(f"closed (port {self.port_name})", channel=self.name)
        if self._failure is not None:
            raise self._failure

    def _submit(self, request: _Request) -> None:
        with self._state_lock:
            self._seq += 1
            request.seq = self._seq
            self._requests.put(request)

    def _fail_pending(self, error: PatchrigError, reason: str) -> None:
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                self._finish_request(req, MoveState.INTERRUPTED, reason, error)
        if self._active is not None:
            self._active.handle.finish(MoveState.INTERRUPTED, reason=reason)
            self._active = None

    @staticmethod
    def _finish_request(req: _Request, state: MoveState, reason: str, error: PatchrigError | None) -> None:
        if req.handle is not None:
            req.handle.finish(state, reason=reason)
        if req.future is not None and not req.future.done():
            req.future.set_exception(error or DeviceError(reason))

    # -- the port thread --------------------------------------------------------------------------
    def _run(self) -> None:
        next_poll_s = time.monotonic()
        try:
            while not self._closing.is_set():
                if self._stop_flag.is_set():
                    self._service_stop()
                wait_s = max(0.0, next_poll_s - time.monotonic())
                try:
                    req = self._requests.get(timeout=wait_s)
                except queue.Empty:
                    req = None
                if self._stop_flag.is_set():
                    self._service_stop()
                if self._closing.is_set():
                    if req is not None:
                        self._requests.put(req)
                    break
                if req is not None:
                    self._handle_request(req)
                    if req.kind == "move":  # watch a new move closely from the start
                        next_poll_s = min(next_poll_s, time.monotonic() + POLL_MOVING_S)
                if time.monotonic() >= next_poll_s:
                    self._poll()
                    interval = POLL_MOVING_S if self._active is not None else POLL_IDLE_S
                    next_poll_s = time.monotonic() + interval
        except Exception as exc:  # a bug must not leave moves hanging: fail them, report it
            self.log.exception("scientifica port thread crashed")
            self._failure = DeviceError(f"port thread failed: {exc}", channel=self.name)
            self._halt_if_moving()
            self._fail_pending(self._failure, f"port thread failed: {exc}")
        finally:
            self._release_stop_waiters(DeviceError(f"closed (port {self.port_name})", channel=self.name))
            if self._closing.is_set():
                self._halt_if_moving()
                self._release_port()

    def _halt_if_moving(self) -> None:
        """The port thread is ending: send STOP if a move may still be running (nothing else
        could stop it once the port is closed). Errors are ignored: the port may be gone."""
        if self._active is not None or self._cache.status != 0:
            with contextlib.suppress(Exception):
                self._proto.stop()

    def _handle_request(self, req: _Request) -> None:
        try:
            if req.kind == "move":
                self._start_move(req)
            elif req.call is not None and req.future is not None and not req.future.done():
                result = req.call(self._proto)
                req.future.set_result(result)
        except StopRequested:
            if req.kind == "call":  # settings run after the stop; a move is interrupted by it
                self._requests.put(req)
        except PatchrigError as exc:
            self.log.warning("request failed", kind=req.kind, error=str(exc))
            if req.kind == "move":
                # Safety: ``ABS`` answers as the move starts, so a lost or garbled answer (or a
                # failed speed restore after it) can leave the stage moving: stop it.
                with contextlib.suppress(PatchrigError, StopRequested):
                    self._proto.stop()
            if req.handle is not None:
                req.handle.finish(MoveState.FAILED, position_um=self._cache.position_um, reason=str(exc),
                                  error=exc)
                if self._active is not None and self._active.handle is req.handle:
                    self._active = None
            if req.future is not None and not req.future.done():
                req.future.set_exception(exc)

    def _start_move(self, req: _Request) -> None:
        assert req.handle is not None and req.target_um is not None
        if req.handle.done:  # superseded or stopped while queued
            return
        if req.handle.stop_requested:  # stopped after the switch, before it was queued
            req.handle.finish(MoveState.INTERRUPTED, reason="stopped before it started")
            return
        if req.seq <= self._stopped_through_seq:  # queued before a STOP served since it was dequeued
            req.handle.finish(MoveState.INTERRUPTED, reason=self._stopped_reason)
            return
        info = self.info
        now = time.monotonic()
        top = info.top_for_speed(req.speed_um_s)
        lo, hi = TOP_RANGE[info.units]
        stepwise = top < lo
        top = min(max(top, lo), hi)
        start = self._cache.position_um.copy()
        distance = float(np.linalg.norm(req.target_um - start))
        expected_s = distance / req.speed_um_s + 1.0
        move = _ActiveMove(
            handle=req.handle, target_um=req.target_um, ticks=self._proto.ticks_for(req.target_um, self.limits),
            top=top, speed_um_s=req.speed_um_s, stepwise=stepwise, start_um=start, started_s=now,
            deadline_s=now + 2.0 * expected_s + 2.0 + self.lost_after_s,
            final_issued=not stepwise, next_step_s=now,
        )
        self._active = move
        if stepwise:
            self.log.info("stepwise move", speed_um_s=req.speed_um_s, device_min_um_s=info.min_speed_um_s)
            self._step(move, now, start)
        else:
            self._proto.send_move(move.ticks, move.top)
            move.issued_s = time.monotonic()

    def _step(self, move: _ActiveMove, now: float, position_um: np.ndarray) -> None:
        """Issue the next short ``ABS`` of a stepwise move: to where the requested speed says the
        pipette should be by now, so that it is never ahead of that schedule, and never more
        than one step beyond the read-back ``position_um``: the requested speed times the time
        since the previous ``ABS`` (at least ``STEP_S``, at most ``MAX_STEP_S``), or one tick if
        that is more (a very slow move advances a tick at a time). Each ``ABS`` runs at the
        device's minimum speed, so after a stall (a slow reply, a resync) catching up with the
        schedule in one ``ABS`` would move the pipette faster than asked."""
        path = move.target_um - move.start_um
        length = float(np.linalg.norm(path))
        reached_um = float(np.dot(position_um - move.start_um, path) / length) if length > 0 else 0.0
        since_s = STEP_S if move.last_step_s is None else min(max(STEP_S, now - move.last_step_s), MAX_STEP_S)
        allowance_um = max(move.speed_um_s * since_s, 1.0 / self.info.ticks_per_um)
        travelled = min(move.speed_um_s * (now - move.started_s), max(reached_um, 0.0) + allowance_um)
        move.next_step_s = now + STEP_S
        if travelled >= length:
            ticks, move.final_issued = move.ticks, True
        else:
            point = move.start_um + (move.target_um - move.start_um) * (travelled / length)
            ticks = self._proto.ticks_for(point, self.limits)
            if ticks == move.last_step_ticks:
                return
        move.last_step_ticks = ticks
        self._proto.send_move(ticks, move.top)
        move.issued_s = move.last_step_s = time.monotonic()

    def _poll(self) -> None:
        try:
            status = self._proto.read_status()
            position = self._proto.read_position_um()
        except StopRequested:
            return
        except PatchrigError as exc:
            self._poll_failed(exc)
            return
        now = time.monotonic()
        with self._state_lock:
            self._cache = _Readback(position_um=position, status=status, at_s=now)
        self._last_ok_s = now
        if self._poll_failures:
            self.log.info("controller answering again", after_failures=self._poll_failures)
            self._poll_failures = 0
        if self._active is not None:
            try:
                self._advance(self._active, position, status, now)
            except StopRequested:
                return
            except PatchrigError as exc:
                self._fail_active(exc)

    def _poll_failed(self, exc: PatchrigError) -> None:
        silent_s = time.monotonic() - self._last_ok_s
        self._poll_failures += 1
        if self._poll_failures == 1 or self._poll_failures % 50 == 0:  # no log flood when unplugged
            self.log.warning("poll failed", error=str(exc), silent_s=round(silent_s, 2),
                             failures=self._poll_failures)
        if self._active is not None and silent_s > self.lost_after_s:
            self._fail_active(DeviceTimeout(
                f"lost contact with the controller on port {self.port_name}: no valid reply for "
                f"{silent_s:.1f} s ({exc})", channel=self.name))

    def _fail_active(self, error: PatchrigError) -> None:
        move, self._active = self._active, None
        if move is None:
            return
        with contextlib.suppress(PatchrigError, StopRequested):
            self._proto.stop()
        move.handle.finish(MoveState.FAILED, position_um=self._cache.position_um, reason=str(error), error=error)

    def _advance(self, move: _ActiveMove, position: np.ndarray, status: int, now: float) -> None:
        """Progress the running move from one poll: stepwise pacing, completion, retries."""
        if move.handle.done:  # superseded: its successor is queued; forget it once idle
            if status == 0:
                self._active = None
            return
        if now > move.deadline_s:
            raise DeviceTimeout(
                f"move did not finish within {move.deadline_s - move.started_s:.1f} s "
                f"(at {np.round(position, 2).tolist()} µm)", channel=self.name)
        if move.stepwise and not move.final_issued:
            if now >= move.next_step_s:
                self._step(move, now, position)
            return
        if status != 0:
            move.idle_since_s = None
            return
        if move.idle_since_s is None or (
            move.idle_position_um is not None
            and float(np.max(np.abs(position - move.idle_position_um))) > 0.5 / self.info.ticks_per_um
        ):
            move.idle_since_s, move.idle_position_um = now, position.copy()
            return
        if now - move.idle_since_s < RECHECK_S:
            return
        error_um = float(np.linalg.norm(position - move.target_um))
        if error_um <= self.tolerance_um:
            self._active = None
            move.handle.finish(MoveState.DONE, position_um=position)
            return
        if move.retries < self.max_retries:
            move.retries += 1
            self.log.warning("target missed, re-sending", error_um=round(error_um, 3), attempt=move.retries)
            move.idle_since_s = None
            if move.stepwise:  # paced again from here: one ABS would run at the device's minimum speed
                move.start_um, move.started_s, move.final_issued = position.copy(), now, False
                move.deadline_s = max(move.deadline_s,
                                      now + 2.0 * (error_um / move.speed_um_s + 1.0) + 2.0 + self.lost_after_s)
                move.last_step_ticks, move.last_step_s = None, None
                self._step(move, now, position)
                return
            self._proto.send_move(move.ticks, move.top)
            move.issued_s = time.monotonic()
            return
        raise DeviceError(
            f"stopped {error_um:.2f} µm from the target after {move.retries} retries "
            f"(at {np.round(position, 2).tolist()} µm, target {np.round(move.target_um, 2).tolist()} µm)",
            channel=self.name)

    def _service_stop(self) -> None:
        """Send STOP now; interrupt the running move and the queued moves older than the stop."""
        with self._state_lock:
            waiters, self._stop_waiters = self._stop_waiters, []
            self._stop_flag.clear()
        if not waiters:
            return
        stop_seq = max(w[0] for w in waiters)
        reason = waiters[-1][1]
        self._stopped_through_seq = max(self._stopped_through_seq, stop_seq)
        self._stopped_reason = reason
        error: PatchrigError | None = None
        try:
            self._proto.stop()
        except PatchrigError as exc:
            error = exc
        interrupted, self._active = self._active, None
        keep: list[_Request] = []
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                break
            if req is None:
                continue
            if req.kind == "move" and req.seq <= stop_seq:
                self._finish_request(req, MoveState.INTERRUPTED, reason, None)
            else:
                keep.append(req)
        for req in keep:
            self._requests.put(req)
        if error is None:
            with contextlib.suppress(PatchrigError, StopRequested):
                if self._proto.top_dirty:
                    self._proto.restore_top()
                self._refresh_after_stop()
        if interrupted is not None:
            interrupted.handle.finish(MoveState.INTERRUPTED, position_um=self._cache.position_um, reason=reason)
        for _seq, _reason, done, errors in waiters:
            if error is not None:
                errors.append(error)
            done.set()

    def _refresh_after_stop(self) -> None:
        """Poll until ``S`` reports idle (at most ~0.5 s) so that the read-back is current."""
        deadline = time.monotonic() + 0.5
        while True:
            status = self._proto.exchange("S", parse_int, abortable=False)
            position = self._proto.exchange("POS" if self.info.units == 2 else "P", parse_position_ticks,
                                            abortable=False)
            now = time.monotonic()
            with self._state_lock:
                self._cache = _Readback(np.asarray(position, float) / self.info.ticks_per_um, status, now)
            self._last_ok_s = now
            if status == 0 or now > deadline:
                return
            time.sleep(0.02)

    def _release_stop_waiters(self, error: PatchrigError) -> None:
        with self._state_lock:
            waiters, self._stop_waiters = self._stop_waiters, []
        for _seq, _reason, done, errors in waiters:
            errors.append(error)
            done.set()
