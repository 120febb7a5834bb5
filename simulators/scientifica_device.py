"""A Scientifica PatchStar/MicroStar controller on a pseudo-terminal, speaking the LinLab protocol.

pyserial opens the slave side of the pty (``ScientificaSimulator.start()`` returns its path);
the simulator answers on the master side, one CR-terminated reply per CR-terminated command,
as in ``shared/protocols/scientifica.md``. Commands are case-insensitive.

Units (the device's own, as the real controllers use them):
- positions in ticks: 0.1 µm on a version-2 card, 0.01 µm on version 3 (``ver`` says which);
- speeds: ``TOP``/``FIRST`` on v2 are motor units n = speed_um_s * 2 * |UU| (range 1000-50000);
  on v3 they are µm/s (range 1-5000, an assumption: no source gives the v3 range);
- acceleration: ``ACC`` on v2 is n = accel_um_s2 * |UU| / 250 (range 10-1000); on v3 µm/s²
  (range 1-100000, an assumption);
- user-unit scale ``UUX/UUY/UUZ`` (v2) or ``USTEP X|Y|Z`` (v3): the device reports
  ``physical * UU_nominal / UU`` per axis on v2 and ``physical * USTEP / USTEP_nominal`` on v3
  (v3's value is 10240 / v2's, so one setting means the same on both), so a negative value
  reverses an axis and a wrong magnitude rescales it. The nominal value is the one the stage
  was built for (6.4 on v2, 1600 on v3 for a PatchStar), so with the default scale the
  read-back equals the physical position.

The shared world (``SimWorld``) receives the *physical* stage position in µm, expressed in the
frame of the read-back at start-up (so, until someone zeroes the device or changes its UU
scale, exactly the position the driver reads back). ``ZERO``, ``P x y z`` and ``PX n`` redefine
the read-back without moving the pipette, as on the real device.

Baud rate: a pty has no real line speed, but Linux keeps the termios of the slave, and
``tcgetattr`` on the master returns it. When the speed the opener set differs from the
configured ``baud``, the simulator behaves like a device hearing the wrong rate: it does not
understand the command and its reply arrives as high-bit garbage with no CR.

Error replies (codes are this simulator's choice; the real codes are not documented):
``BAUD 96|38`` switches the rate and, as on the real device, answers nothing.

``E,1`` unknown command or wrong arguments, ``E,2`` value out of range, ``E,3`` not allowed now
(e.g. ``ZERO`` while moving, or injected by the ``error_*`` fault switches).

Fault switches (``ScientificaSimulator.faults``, changeable at any time from any thread):
late replies, garbled replies, silence, ``E`` replies, missed targets and an early "idle"
status. Run alone with ``patchrig simulate scientifica [--version 2|3] [--baud 9600]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass, field

import numpy as np

from rig.logs import get_logger
from simulators.motion import MotionAxis
from simulators.signals import sigterm_as_ctrl_c
from simulators.world import SimWorld

TICKS_PER_UM = {2: 10.0, 3: 100.0}
NOMINAL_UU = {2: 6.4, 3: 1600.0}  # a PatchStar; v3 uses 10240 / the v2 value
TOP_RANGE = {2: (1000, 50000), 3: (1, 5000)}
ACC_RANGE = {2: (10, 1000), 3: (1, 100000)}
DEFAULT_TOP = {2: 30000, 3: 2500}
DEFAULT_FIRST = {2: 5000, 3: 400}
DEFAULT_ACC = {2: 500, 3: 20000}
TYPE_CODE = {2: "1.05", 3: "3.05"}
FIRMWARE = {2: "2.13", 3: "3.22"}
BAUD_CONSTANTS = {9600: termios.B9600, 38400: termios.B38400}
STATUS_IDLE, STATUS_ACCELERATING, STATUS_MAX_SPEED, STATUS_DECELERATING = 0, 2, 3, 4
WORLD_UPDATE_S = 0.02
MAX_START_UM = 100_000.0  # a start position farther than 10 cm from zero is a typo


@dataclass
class ScientificaFaults:
    """Fault switches of the simulated controller. Counters count down as they fire.

    - ``reply_delay_s``: every reply is sent this late (the device is single-threaded, so later
      commands wait too);
    - ``garble_next_replies``: the next N replies have every byte but the CR replaced by
      high-bit garbage (what line noise looks like to a driver: an unparseable line);
    - ``silent``: commands are not heard at all (no reply, no action), as an unplugged cable;
    - ``error_next_commands``: the next N commands answer ``E,3`` and do nothing;
    - ``error_commands``: command names (upper case, e.g. ``{"ABS"}``) that always answer ``E,3``;
    - ``garble_commands``: command names whose replies are always garbled; the command itself
      still acts (an ``ABS`` starts the move, and the host never hears the ``A``);
    - ``miss_next_moves`` / ``miss_by_um``: the next N moves stop ``miss_by_um`` short on x;
    - ``idle_early_s``: ``S`` reports idle during the last ``idle_early_s`` of every move.
    """

    reply_delay_s: float = 0.0
    garble_next_replies: int = 0
    silent: bool = False
    error_next_commands: int = 0
    error_commands: set[str] = field(default_factory=set)
    garble_commands: set[str] = field(default_factory=set)
    miss_next_moves: int = 0
    miss_by_um: float = 5.0
    idle_early_s: float = 0.0


class _Reply(Exception):
    """Raised by a command handler to answer with an error reply."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class ScientificaSimulator:
    """One simulated Scientifica controller (3 axes) on a pty. See the module docstring.

    ``world``/``channel``: when given, the simulator starts from the world's position of that
    channel and keeps it up to date. ``version`` 2 or 3 picks the units; ``baud`` the rate the
    device listens at. ``travel_um``: half-width of the physical travel around the start
    position; moves stop at the travel ends and ``LIMITS`` reports the switches hit.
    ``wire_time``: delay each reply by the time the command and the reply would take on a real
    line at ``baud`` (10 bits per character), e.g. about 13 ms for ``POS`` at 9600 baud.
    """

    def __init__(
        self,
        *,
        world: SimWorld | None = None,
        channel: str | None = None,
        version: int = 2,
        baud: int = 9600,
        description: str = "PatchStar",
        initial_position_um: np.ndarray | None = None,
        travel_um: float = 25000.0,
        wire_time: bool = False,
    ) -> None:
        if version not in TICKS_PER_UM:
            raise ValueError(f"version must be 2 or 3, got {version!r}")
        if baud not in BAUD_CONSTANTS:
            raise ValueError(f"baud must be 9600 or 38400, got {baud!r}")
        if world is not None and channel is None:
            raise ValueError("a world needs a channel name")
        self.version = version
        self.baud = baud
        self.world = world
        self.channel = channel
        self.description = description
        self.wire_time = wire_time
        self.type_code = TYPE_CODE[version]
        self.faults = ScientificaFaults()
        self.log = get_logger("patchrig.sim.scientifica", channel=channel)
        if world is not None and channel is not None:
            start = world.manipulator_position_um(channel)[:3]
        elif initial_position_um is not None:
            start = np.asarray(initial_position_um, float)
        else:
            start = np.zeros(3)
        if start.shape != (3,):
            raise ValueError("the Scientifica simulator has exactly 3 axes")
        self._lock = threading.Lock()
        self._ticks_per_um = TICKS_PER_UM[version]
        self._uu_nominal = np.full(3, NOMINAL_UU[version])
        self._uu = self._uu_nominal.copy()
        self._offset_um = np.zeros(3)  # read-back = physical * nominal / uu + offset
        self._travel_min_um = start - travel_um
        self._travel_max_um = start + travel_um
        self._limits_hit = 0
        self._top = DEFAULT_TOP[version]
        self._first = DEFAULT_FIRST[version]
        self._acc = DEFAULT_ACC[version]
        self._angle_deg = 0.0
        self._motion = MotionAxis(start, acceleration_um_s2=self._physical_acceleration())
        self._move_clamped = np.zeros(3, bool)
        self._heard: collections.deque[str] = collections.deque(maxlen=10000)
        self._heard_total = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._path: str | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._last_world_s = 0.0

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> str:
        """Open the pty and start answering; return the slave path that pyserial opens."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            attrs = termios.tcgetattr(slave)
            attrs[4] = attrs[5] = BAUD_CONSTANTS[self.baud]
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        # The slave stays open here too, so that the master never sees EIO when the driver
        # closes the port (a real device does not vanish when the host closes its COM port).
        self._master, self._slave, self._path = master, slave, path
        self._thread = threading.Thread(target=self._run, name=f"scientifica-sim-{path}", daemon=True)
        self._thread.start()
        self.log.info("scientifica simulator started", port=path, version=self.version, baud=self.baud)
        return path

    @property
    def port(self) -> str:
        if self._path is None:
            raise RuntimeError("simulator not started")
        return self._path

    def close(self) -> None:
        """Stop answering, join the thread and close both pty ends. Idempotent."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    def __enter__(self) -> ScientificaSimulator:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- truth for tests ------------------------------------------------------------------
    def physical_position_um(self) -> np.ndarray:
        """Where the stage physically is (µm, start-up read-back frame). Tests only."""
        with self._lock:
            return self._motion.position_at(time.monotonic())

    def readback_position_um(self) -> np.ndarray:
        """What ``POS``/``P`` would report now, in µm (before tick rounding)."""
        with self._lock:
            return self._readback_um(time.monotonic())

    def heard(self, since: int = 0) -> list[str]:
        """The command lines heard (newest last; the last 10000 at most), from the ``since``-th
        on (a ``heard_count`` taken earlier). For tests and debugging."""
        with self._lock:
            new = self._heard_total - since
            items = list(self._heard)
        return items[len(items) - min(max(new, 0), len(items)):]

    @property
    def heard_count(self) -> int:
        """How many command lines have been heard so far."""
        with self._lock:
            return self._heard_total

    def is_moving(self) -> bool:
        with self._lock:
            return self._motion.is_moving(time.monotonic())

    def set_uu(self, values: tuple[float, float, float]) -> None:
        """Set the user-unit scale per axis, as ``UUX``.. / ``USTEP`` would."""
        with self._lock:
            self._uu = np.asarray(values, float)

    # -- the device thread ---------------------------------------------------------------
    def _run(self) -> None:
        assert self._master is not None
        buffer = b""
        while not self._closing.is_set():
            try:
                ready, _, _ = select.select([self._master], [], [], WORLD_UPDATE_S)
            except (OSError, ValueError):
                break
            if ready:
                try:
                    chunk = os.read(self._master, 4096)
                except OSError:
                    chunk = b""
                if chunk:
                    buffer += chunk
                    while b"\r" in buffer:
                        line, buffer = buffer.split(b"\r", 1)
                        self._handle_raw_line(line)
            self._update_world()
        self._update_world(force=True)

    def _update_world(self, force: bool = False) -> None:
        if self.world is None or self.channel is None:
            return
        now = time.monotonic()
        if not force and now - self._last_world_s < WORLD_UPDATE_S:
            return
        self._last_world_s = now
        with self._lock:
            pos = self._motion.position_at(now)
        self.world.set_manipulator_position_um(self.channel, pos)

    def _baud_matches(self) -> bool:
        assert self._master is not None
        try:
            speed = termios.tcgetattr(self._master)[4]
        except termios.error:
            return True
        return speed == BAUD_CONSTANTS[self.baud]

    def _handle_raw_line(self, raw: bytes) -> None:
        faults = self.faults
        if faults.silent:
            return
        if not self._baud_matches():
            # What a device hears at the wrong rate is noise; what it answers looks like noise
            # to the host too: high-bit bytes and no CR.
            self._send(_wrong_baud_bytes(b"E,1"))
            return
        text = raw.decode("ascii", errors="replace").strip()
        with self._lock:
            self._heard.append(text)
            self._heard_total += 1
        tokens = text.upper().split()
        if tokens[:1] == ["BAUD"] and len(tokens) == 2 and tokens[1] in ("96", "38"):
            # switches the rate at once and answers nothing (the host reopens the port)
            self.baud = 9600 if tokens[1] == "96" else 38400
            return
        reply = self._answer(text)
        delay_s = faults.reply_delay_s
        if self.wire_time:
            delay_s += (len(raw) + len(reply) + 2) * 10.0 / self.baud
        if delay_s > 0 and self._closing.wait(delay_s):
            return
        data = reply.encode("ascii")
        if faults.garble_next_replies > 0:
            faults.garble_next_replies -= 1
            data = _garble(data)
        elif tokens[:1] and tokens[0] in faults.garble_commands:
            data = _garble(data)
        self._send(data + b"\r")

    def _send(self, data: bytes) -> None:
        if self._master is None:
            return
        try:
            os.write(self._master, data)
        except OSError as exc:
            self.log.warning("reply not written", error=str(exc))

    # -- command table ---------------------------------------------------------------------
    def _answer(self, text: str) -> str:
        tokens = text.split()
        if not tokens:
            return "E,1"
        name, args = tokens[0].upper(), tokens[1:]
        faults = self.faults
        if name in faults.error_commands:
            return "E,3"
        if faults.error_next_commands > 0:
            faults.error_next_commands -= 1
            return "E,3"
        handler = getattr(self, f"_cmd_{name.lower()}", None) if name.isalpha() else None
        if handler is None:
            return "E,1"
        try:
            with self._lock:
                return str(handler(args, time.monotonic()))
        except _Reply as reply:
            return reply.text

    # identity
    def _cmd_scientifica(self, args: list[str], now: float) -> str:
        _no_args(args)
        return "Y519"

    def _cmd_desc(self, args: list[str], now: float) -> str:
        if args:
            self.description = " ".join(args)
            return "A"
        return self.description

    def _cmd_date(self, args: list[str], now: float) -> str:
        _no_args(args)
        return f"Scientifica {FIRMWARE[self.version]}\tMar 12 2019\t10:22:01"

    def _cmd_ver(self, args: list[str], now: float) -> str:
        _no_args(args)
        return str(self.version)

    def _cmd_type(self, args: list[str], now: float) -> str:
        if args:
            _float(args[0])
            self.type_code = args[0]
            return "A"
        return self.type_code

    # positions
    def _readback_um(self, now: float) -> np.ndarray:
        return self._motion.position_at(now) * self._readback_per_physical() + self._offset_um

    def _position_line(self, now: float) -> str:
        ticks = np.rint(self._readback_um(now) * self._ticks_per_um).astype(int)
        return "\t".join(str(int(t)) for t in ticks)

    def _cmd_pos(self, args: list[str], now: float) -> str:
        if args:
            return self._redefine(args, now)
        return self._position_line(now)

    def _cmd_p(self, args: list[str], now: float) -> str:
        return self._cmd_pos(args, now)

    def _redefine(self, args: list[str], now: float) -> str:
        if len(args) != 3:
            raise _Reply("E,1")
        wanted_um = np.array([_int(a) for a in args], float) / self._ticks_per_um
        self._offset_um += wanted_um - self._readback_um(now)
        return "A"

    def _single_axis(self, axis: int, args: list[str], now: float) -> str:
        if not args:
            return str(int(np.rint(self._readback_um(now)[axis] * self._ticks_per_um)))
        if len(args) != 1:
            raise _Reply("E,1")
        self._offset_um[axis] += _int(args[0]) / self._ticks_per_um - self._readback_um(now)[axis]
        return "A"

    def _cmd_px(self, args: list[str], now: float) -> str:
        return self._single_axis(0, args, now)

    def _cmd_py(self, args: list[str], now: float) -> str:
        return self._single_axis(1, args, now)

    def _cmd_pz(self, args: list[str], now: float) -> str:
        return self._single_axis(2, args, now)

    def _cmd_zero(self, args: list[str], now: float) -> str:
        _no_args(args)
        if self._motion.is_moving(now):
            raise _Reply("E,3")
        self._offset_um -= self._readback_um(now)
        return "A"

    # motion
    def _to_physical_um(self, readback_um: np.ndarray) -> np.ndarray:
        return (readback_um - self._offset_um) / self._readback_per_physical()

    def _start_move(self, readback_target_um: np.ndarray, now: float) -> str:
        target = self._to_physical_um(readback_target_um)
        faults = self.faults
        if faults.miss_next_moves > 0:
            faults.miss_next_moves -= 1
            current = self._motion.position_at(now)
            direction = np.sign(target[0] - current[0]) or 1.0
            target[0] -= direction * faults.miss_by_um
        clamped = np.clip(target, self._travel_min_um, self._travel_max_um)
        self._move_clamped = clamped != target
        self._motion.acceleration_um_s2 = self._physical_acceleration()
        self._motion.start(clamped, self._physical_speed(), now)
        self._limits_hit = 0
        return "A"

    def _targets(self, args: list[str], n: int) -> np.ndarray:
        if len(args) != n:
            raise _Reply("E,1")
        return np.array([_int(a) for a in args], float) / self._ticks_per_um

    def _cmd_abs(self, args: list[str], now: float) -> str:
        if len(args) not in (2, 3):
            raise _Reply("E,1")
        target = self._readback_um(now) if self._motion.move is None else self._current_target_readback()
        values = self._targets(args, len(args))
        target[: len(values)] = values
        return self._start_move(target, now)

    def _cmd_absz(self, args: list[str], now: float) -> str:
        target = self._current_target_readback() if self._motion.move else self._readback_um(now)
        target[2] = self._targets(args, 1)[0]
        return self._start_move(target, now)

    def _current_target_readback(self) -> np.ndarray:
        assert self._motion.move is not None
        return self._motion.move.target_um * self._readback_per_physical() + self._offset_um

    def _cmd_rel(self, args: list[str], now: float) -> str:
        if len(args) not in (2, 3):
            raise _Reply("E,1")
        delta = self._targets(args, len(args))
        target = self._readback_um(now)
        target[: len(delta)] += delta
        return self._start_move(target, now)

    def _cmd_relz(self, args: list[str], now: float) -> str:
        target = self._readback_um(now)
        target[2] += self._targets(args, 1)[0]
        return self._start_move(target, now)

    def _cmd_stop(self, args: list[str], now: float) -> str:
        _no_args(args)
        self._motion.stop(now)
        return "A"

    def _cmd_s(self, args: list[str], now: float) -> str:
        _no_args(args)
        move = self._motion.move
        if move is None or not self._motion.is_moving(now):
            self._update_limit_bits()
            return str(STATUS_IDLE)
        t = now - move.t0_s
        if t >= move.duration_s - self.faults.idle_early_s:
            return str(STATUS_IDLE)
        ramp_s = move.peak_um_s / move.acceleration_um_s2
        if t < ramp_s:
            return str(STATUS_ACCELERATING)
        if t > move.duration_s - ramp_s:
            return str(STATUS_DECELERATING)
        return str(STATUS_MAX_SPEED)

    def _update_limit_bits(self) -> None:
        pos = self._motion.position_at(time.monotonic())
        bits = 0
        for axis in range(3):
            if pos[axis] <= self._travel_min_um[axis]:
                bits |= 1 << (2 * axis)
            if pos[axis] >= self._travel_max_um[axis]:
                bits |= 1 << (2 * axis + 1)
        self._limits_hit = bits

    def _cmd_limits(self, args: list[str], now: float) -> str:
        _no_args(args)
        self._update_limit_bits()
        return f"{self._limits_hit:X}"

    # speed, acceleration, scale
    def _readback_per_physical(self) -> np.ndarray:
        """Per axis, read-back µm per physical µm (1 with the nominal scale; negative: reversed).
        v2's UU divides (UU_nominal / UU); v3's USTEP, which is 10240 / UU, multiplies."""
        if self.version == 2:
            return self._uu_nominal / self._uu
        return self._uu / self._uu_nominal

    def _speed_scale(self) -> float:
        """Largest |read-back / physical| ratio over the axes (1 with the nominal UU)."""
        return float(np.max(np.abs(self._readback_per_physical())))

    def _physical_speed(self) -> float:
        """Path speed in physical µm/s from ``TOP`` (v2: motor units; v3: user µm/s)."""
        if self.version == 2:
            return self._top / (2.0 * float(np.min(np.abs(self._uu_nominal))))
        return self._top / self._speed_scale()

    def _physical_acceleration(self) -> float:
        if self.version == 2:
            return 250.0 * self._acc / float(np.min(np.abs(self._uu_nominal)))
        return self._acc / self._speed_scale()

    def _ranged(self, args: list[str], lo: int, hi: int) -> int:
        if len(args) != 1:
            raise _Reply("E,1")
        value = _int(args[0])
        if not lo <= value <= hi:
            raise _Reply("E,2")
        return value

    def _cmd_top(self, args: list[str], now: float) -> str:
        if not args:
            return str(self._top)
        self._top = self._ranged(args, *TOP_RANGE[self.version])
        return "A"

    def _cmd_first(self, args: list[str], now: float) -> str:
        if not args:
            return str(self._first)
        self._first = self._ranged(args, *TOP_RANGE[self.version])
        return "A"

    def _cmd_acc(self, args: list[str], now: float) -> str:
        if not args:
            return str(self._acc)
        self._acc = self._ranged(args, *ACC_RANGE[self.version])
        return "A"

    def _uu_axis(self, axis: int, args: list[str]) -> str:
        if not args:
            return _format_float(self._uu[axis])
        if len(args) != 1:
            raise _Reply("E,1")
        value = _float(args[0])
        if value == 0 or not np.isfinite(value):
            raise _Reply("E,2")
        self._uu[axis] = value
        return "A"

    def _cmd_uux(self, args: list[str], now: float) -> str:
        return self._v2_only(0, args)

    def _cmd_uuy(self, args: list[str], now: float) -> str:
        return self._v2_only(1, args)

    def _cmd_uuz(self, args: list[str], now: float) -> str:
        return self._v2_only(2, args)

    def _v2_only(self, axis: int, args: list[str]) -> str:
        if self.version != 2:
            raise _Reply("E,1")
        return self._uu_axis(axis, args)

    def _cmd_ustep(self, args: list[str], now: float) -> str:
        if self.version < 3 or not args or args[0].upper() not in ("X", "Y", "Z"):
            raise _Reply("E,1")
        return self._uu_axis("XYZ".index(args[0].upper()), args[1:])

    def _cmd_angle(self, args: list[str], now: float) -> str:
        if not args:
            return _format_float(self._angle_deg)
        if len(args) != 1:
            raise _Reply("E,1")
        if args[0].upper() == "A":
            return "A"  # auto-detect: no rotary sensor here, the angle stays as it is
        value = _float(args[0])
        if not 0 <= value <= 90:
            raise _Reply("E,2")
        self._angle_deg = value
        return "A"


def _no_args(args: list[str]) -> None:
    if args:
        raise _Reply("E,1")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Reply("E,1") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Reply("E,1") from None


def _format_float(value: float) -> str:
    return f"{value:g}"


def _garble(data: bytes) -> bytes:
    """Line noise: every byte becomes a high-bit byte (never a CR), so the line cannot parse."""
    return bytes(0x80 | ((b * 37 + 11) & 0x7F) for b in data) or b"\xff"


def _wrong_baud_bytes(data: bytes) -> bytes:
    """What a reply looks like at the wrong baud rate: high-bit bytes, the CR lost."""
    return bytes(0x80 | ((b * 53 + 29) & 0x7F) for b in data + b"\r")


# -- CLI: patchrig simulate scientifica ------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=int, choices=(2, 3), default=2,
                        help="controller version: 2 = 0.1 µm ticks, 3 = 0.01 µm ticks (default 2)")
    parser.add_argument("--baud", type=int, choices=(9600, 38400), default=9600,
                        help="baud rate the device listens at (default 9600)")
    parser.add_argument("--description", default="PatchStar", help="the DESC name (default PatchStar)")
    parser.add_argument("--position-um", type=float, nargs=3, default=(0.0, 0.0, 0.0),
                        metavar=("X", "Y", "Z"), help="start position in µm (default 0 0 0)")
    parser.add_argument("--wire-time", action="store_true",
                        help="delay replies by their transmission time at the baud rate, as on a real line")
    parser.epilog = "Prints the pty path that pyserial opens as the first line, then runs until Ctrl-C."


def run_cli(args: argparse.Namespace) -> int:
    """Run the simulator until Ctrl-C or SIGTERM (both a clean stop, exit 0)."""
    position = np.asarray(args.position_um, float)
    if not np.all(np.isfinite(position)) or np.any(np.abs(position) > MAX_START_UM):
        raise SystemExit(f"patchrig simulate scientifica: error: --position-um must be finite and within "
                         f"±{MAX_START_UM:g} µm, got {args.position_um}")
    with sigterm_as_ctrl_c():
        return _serve(args, position)


def _serve(args: argparse.Namespace, position: np.ndarray) -> int:
    sim = ScientificaSimulator(
        version=args.version, baud=args.baud, description=args.description,
        initial_position_um=position, wire_time=args.wire_time,
    )
    path = sim.start()
    try:  # announce inside the try: a Ctrl-C right after the path is read is a clean stop
        print(path, flush=True)
        print(f"Scientifica v{args.version} simulator at {args.baud} baud on {path}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        sim.close()
    return 0
