"""A Sensapex uMp simulator that speaks SMCP v1 over UDP, so the unmodified vendor SDK drives it.

Facts come from protocols/sensapex-smcp.md. One UDP socket on ``host:55555+group`` serves
several device ids (1..19). Each device has a trapezoidal motion model
(``simulators.motion``); while it moves, it pushes POSITION_CHANGED and STATUS_CHANGED
notifications every ``tick_s`` to every client address it has heard from, and on arrival
STATUS_CHANGED 0 then GOTO_POS_COMPLETED [0]. Replies go to the source address of each request
and copy its sender id (the SDK's id changes on every open). Notifications go to 0x2FF and never
ask for an ACK. The GOTO's ACK always goes out before its completion (unless a fault says
otherwise).

Positions are device µm in the API and INT32 nm on the wire. When a ``SimWorld`` is given, each
device starts from ``world.manipulator_position_um(channel)`` and writes its position back while
moving, so the simulated microscope renders the pipette.

Fault switches (``faults``, change them at any time): dropped ACKs per message type, error
replies per message type, withheld completion, completion sent before the ACK, silence (all or
some device ids), a final-position offset, and an unanswered axis-count query.

Run alone: ``patchrig simulate sensapex --group 0 --ids 1,2`` (until Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from rig.logs import get_logger
from simulators import smcp
from simulators.motion import MotionAxis
from simulators.signals import sigterm_as_ctrl_c
from simulators.world import SimWorld

BASE_PORT = 55555
DEFAULT_START_UM = 10000.0  # middle of a 20 mm uMp axis
MAX_WIRE_UM = 2_000_000.0  # positions travel as INT32 nm (and 0x7FFFFFFF means "undefined")
FIRMWARE_VERSION = (1, 504, 0, 0, 0)



def _log() -> Any:
    """This module's logger, made at call time so that it follows ``configure_logging``."""
    return get_logger("patchrig.sim.sensapex")


@dataclass
class SensapexFaults:
    """Fault switches of the simulator. Message types are ``simulators.smcp.CMD_*`` numbers."""

    drop_ack_types: set[int] = field(default_factory=set)
    """ACKs of requests of these types are never sent (the request is still carried out)."""
    error_types: set[int] = field(default_factory=set)
    """Requests of these types get an error reply (ERROR bit, no data) and are not carried out."""
    withhold_completion: bool = False
    """Never send GOTO_POS_COMPLETED; moves then end only through libum's ~1 s fallback."""
    completion_before_ack: bool = False
    """Send GOTO_POS_COMPLETED [0] before the GOTO's ACK (and not again on arrival)."""
    silent: bool = False
    """Answer nothing and send nothing: a dead or unplugged device (all ids)."""
    silent_ids: set[int] = field(default_factory=set)
    """Only these device ids are silent."""
    final_offset_um: float = 0.0
    """Moves end this far from the commanded target, on every defined axis."""
    final_offset_moves: int | None = None
    """Apply ``final_offset_um`` to the next N moves only (None: every move)."""
    answer_axis_count: bool = True
    """Answer GET_PARAMETER 0x105 (axis count); False leaves it unanswered."""

    def is_silent(self, dev_id: int) -> bool:
        return self.silent or dev_id in self.silent_ids


class _Device:
    """State of one simulated device. Guarded by the simulator's lock."""

    def __init__(self, dev_id: int, channel: str, n_axes: int, start_um: np.ndarray, acceleration_um_s2: float):
        self.dev_id = dev_id
        self.channel = channel
        self.n_axes = n_axes
        self.motion = MotionAxis(start_um, acceleration_um_s2)
        self.goto_pending = False  # a GOTO is running and owes a GOTO_POS_COMPLETED
        self.completion_sent = False
        self.moving_axes_bits = 0
        self.reported_busy = False  # the last STATUS_CHANGED said busy: an idle one is owed
        self.notify_id = 0
        self.visited_min_um = start_um.copy()
        self.visited_max_um = start_um.copy()

    def next_notify_id(self) -> int:
        self.notify_id = (self.notify_id + 1) & 0xFFFF
        return self.notify_id

    def note_visited(self, position_um: np.ndarray) -> None:
        self.visited_min_um = np.minimum(self.visited_min_um, position_um)
        self.visited_max_um = np.maximum(self.visited_max_um, position_um)


class SensapexSimulator:
    """Simulated Sensapex devices on one UDP socket. See the module docstring."""

    def __init__(
        self,
        *,
        world: SimWorld | None = None,
        devices: dict[int, str] | None = None,
        n_axes: dict[int, int] | None = None,
        group: int = 0,
        host: str = "127.0.0.1",
        initial_position_um: dict[int, Sequence[float]] | None = None,
        acceleration_um_s2: float = 20000.0,
        tick_s: float = 0.01,
    ) -> None:
        if not 0 <= group <= 10:
            raise ValueError(f"Sensapex group must be 0..10, got {group}")
        devices = dict(devices) if devices is not None else {1: "1"}
        if not devices:
            raise ValueError("the simulator needs at least one device id")
        self.world = world
        self.group = group
        self.host = host
        self.port = BASE_PORT + group
        self.tick_s = tick_s
        self.faults = SensapexFaults()
        self.request_counts: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._devices: dict[int, _Device] = {}
        for dev_id, channel in devices.items():
            if not 1 <= dev_id <= 254:
                raise ValueError(f"device id {dev_id} outside 1..254 (use 1..19 for manipulators)")
            in_world = world is not None and channel in world.channel_names
            if n_axes is not None and dev_id in n_axes:
                axes = n_axes[dev_id]
            elif in_world:
                axes = world.truth(channel).n_axes  # type: ignore[union-attr]
            else:
                axes = 3
            if axes not in (3, 4):
                raise ValueError(f"device {dev_id}: axis count must be 3 or 4, got {axes}")
            if initial_position_um is not None and dev_id in initial_position_um:
                start = np.asarray(initial_position_um[dev_id], float)
            elif in_world:
                start = world.manipulator_position_um(channel)  # type: ignore[union-attr]
            else:
                start = np.full(axes, DEFAULT_START_UM)
            if start.shape != (axes,):
                raise ValueError(f"device {dev_id}: start position needs {axes} axes")
            if not np.all(np.isfinite(start)) or np.any(np.abs(start) > MAX_WIRE_UM):
                raise ValueError(
                    f"device {dev_id}: start position {start.tolist()} µm must be finite and within "
                    f"±{MAX_WIRE_UM:g} µm (SMCP sends INT32 nm)"
                )
            self._devices[dev_id] = _Device(dev_id, channel, axes, start, acceleration_um_s2)
        self._sock: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clients: set[tuple[str, int]] = set()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> SensapexSimulator:
        """Bind ``host:55555+group`` and start serving. Raises OSError if the port is taken."""
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"cannot bind the Sensapex simulator to {self.host}:{self.port} (group {self.group}): {exc.strerror}"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"sensapex-sim-g{self.group}", daemon=True)
        self._thread.start()
        for dev in self._devices.values():
            self._publish_world(dev, dev.motion.position_at(time.monotonic()))
        _log().info("sensapex simulator serving", address=f"{self.host}:{self.port}", ids=self.device_ids)
        return self

    def close(self) -> None:
        """Stop serving, join the thread, close the sockets. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            if self._wake_w is not None:
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"x")
            thread.join(timeout=5.0)
        for s in (self._sock, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._sock = self._wake_r = self._wake_w = None

    def __enter__(self) -> SensapexSimulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- inspection (tests, benchmarks) --------------------------------------------------
    @property
    def device_ids(self) -> list[int]:
        return sorted(self._devices)

    def n_axes(self, dev_id: int) -> int:
        return self._devices[dev_id].n_axes

    def position_um(self, dev_id: int) -> np.ndarray:
        """The device's true position now (device µm)."""
        with self._lock:
            return self._devices[dev_id].motion.position_at(time.monotonic())

    def is_moving(self, dev_id: int) -> bool:
        with self._lock:
            return self._devices[dev_id].motion.is_moving(time.monotonic())

    def visited_range_um(self, dev_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis minimum and maximum position the device has been at (µm) since the last reset."""
        with self._lock:
            dev = self._devices[dev_id]
            dev.note_visited(dev.motion.position_at(time.monotonic()))
            return dev.visited_min_um.copy(), dev.visited_max_um.copy()

    def reset_visited(self, dev_id: int) -> None:
        with self._lock:
            dev = self._devices[dev_id]
            pos = dev.motion.position_at(time.monotonic())
            dev.visited_min_um, dev.visited_max_um = pos.copy(), pos.copy()

    def set_position_um(self, dev_id: int, position_um: Sequence[float]) -> None:
        """Teleport a device (test set-up only; stops any move)."""
        with self._lock:
            dev = self._devices[dev_id]
            pos = np.asarray(position_um, float)
            dev.motion.set_position(pos)
            dev.goto_pending = False
            dev.visited_min_um, dev.visited_max_um = pos.copy(), pos.copy()
            self._notify(dev, smcp.NOTIFY_POSITION_CHANGED, *(smcp.um_to_nm(x) for x in pos))
        self._publish_world(dev, pos)

    # -- the server loop -----------------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        next_tick = time.monotonic()
        while not self._stopping:
            moving = self._any_active()
            timeout = max(0.0, next_tick - time.monotonic()) if moving else 0.5
            try:
                readable, _, _ = select.select([self._sock, self._wake_r], [], [], timeout)
            except (OSError, ValueError):
                return
            if self._stopping:
                return
            if self._sock in readable:
                self._drain()
            now = time.monotonic()
            if now >= next_tick or not moving:
                self._tick(now)
                next_tick = now + self.tick_s

    def _any_active(self) -> bool:
        with self._lock:
            return any(d.goto_pending or d.motion.move is not None for d in self._devices.values())

    def _drain(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, addr = self._sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                frame = smcp.decode(data)
            except smcp.SmcpError as exc:
                _log().warning("malformed SMCP datagram ignored", source=f"{addr[0]}:{addr[1]}", error=str(exc))
                continue
            self._handle(frame, addr)

    def _send(self, frame: smcp.Frame, addr: tuple[str, int]) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendto(smcp.encode(frame), addr)

    def _notify(self, dev: _Device, msg_type: int, *values: int) -> None:
        if msg_type == smcp.NOTIFY_STATUS_CHANGED:
            dev.reported_busy = bool(values and values[0] & smcp.STATUS_BUSY)
        if self.faults.is_silent(dev.dev_id):
            return
        frame = smcp.notification(dev.dev_id, dev.next_notify_id(), msg_type, *values)
        for client in list(self._clients):
            self._send(frame, client)

    # -- requests ------------------------------------------------------------------------
    def _targets(self, frame: smcp.Frame) -> list[_Device]:
        if frame.receiver in (smcp.ID_ALL_DEVICES, smcp.ID_EVERYONE):
            return [self._devices[i] for i in sorted(self._devices)]
        dev = self._devices.get(frame.receiver)
        return [dev] if dev is not None else []

    def _handle(self, frame: smcp.Frame, addr: tuple[str, int]) -> None:
        if not frame.is_request or frame.sender == 0:
            return
        devices = self._targets(frame)
        if not devices:
            return
        with self._lock:  # _notify iterates the clients, also from other threads
            self._clients.add(addr)
            self.request_counts[frame.type_name] += 1
        for dev in devices:
            if self.faults.is_silent(dev.dev_id):
                continue
            with self._lock:
                self._handle_one(dev, frame, addr)

    def _ack(self, dev: _Device, frame: smcp.Frame, addr: tuple[str, int], *, error: bool = False) -> None:
        if frame.wants_ack and frame.type not in self.faults.drop_ack_types:
            self._send(smcp.ack_for(frame, dev.dev_id, error=error), addr)

    def _respond(self, dev: _Device, frame: smcp.Frame, addr: tuple[str, int], *values: int) -> None:
        self._send(smcp.response_for(frame, dev.dev_id, (smcp.int32_block(*values),)), addr)

    def _handle_one(self, dev: _Device, frame: smcp.Frame, addr: tuple[str, int]) -> None:
        t = frame.type
        if t in self.faults.error_types:
            if frame.wants_response:
                self._send(smcp.response_for(frame, dev.dev_id, (), error=True), addr)
            else:
                self._ack(dev, frame, addr, error=True)
            return
        now = time.monotonic()
        if t == smcp.CMD_GOTO_POS:
            self._goto(dev, frame, addr, now)
            return
        if t == smcp.CMD_TAKE_STEP:
            self._ack(dev, frame, addr)
            self._take_step(dev, frame, now)
            return
        self._ack(dev, frame, addr)
        if t == smcp.CMD_STOP:
            self._stop(dev, now)
        elif t == smcp.CMD_GET_POSITIONS:
            pos = dev.motion.position_at(now)
            self._respond(dev, frame, addr, *(smcp.um_to_nm(v) for v in pos))
        elif t == smcp.CMD_GET_PARAMETER:
            param = frame.values(0)[0] if frame.values(0) else -1
            if param == smcp.PARAM_AXIS_COUNT and not self.faults.answer_axis_count:
                return
            value = {
                smcp.PARAM_AXIS_COUNT: dev.n_axes,
                smcp.PARAM_DEVICE_ID: dev.dev_id,
                smcp.PARAM_HW_ID: 0x5550,
                smcp.PARAM_SERIAL: 100000 + dev.dev_id,
            }.get(param, 0)
            self._respond(dev, frame, addr, param, value)
        elif t in (smcp.CMD_GET_FEATURE, smcp.CMD_GET_EXT_FEATURE):
            feature = frame.values(0)[0] if frame.values(0) else 0
            self._respond(dev, frame, addr, feature, 0)
        elif t == smcp.CMD_GET_VERSION:
            self._respond(dev, frame, addr, *FIRMWARE_VERSION)
        elif frame.wants_response:  # any other query: a well-formed zero answer
            self._respond(dev, frame, addr, 0)
        # PING, SET_*, INIT_ZERO, CALIBRATE, SAVE_ZERO: the ACK is all

    def _goto(self, dev: _Device, frame: smcp.Frame, addr: tuple[str, int], now: float) -> None:
        values = frame.values(0)
        current = dev.motion.position_at(now)
        target = current.copy()
        defined: list[int] = []
        for axis in range(min(dev.n_axes, 4, len(values))):
            um = smcp.nm_to_um(values[axis])
            if um is not None:
                target[axis] = um
                defined.append(axis)
        common = values[4] if len(values) > 4 else 0
        max_acc = values[6] if len(values) > 6 else 0
        axis_speeds = list(frame.values(1))
        speeds: dict[int, float] = {}
        for axis in defined:
            raw = axis_speeds[axis] if axis < len(axis_speeds) and axis_speeds[axis] != 0 else common
            speeds[axis] = raw if raw > 0 else -raw / 1000.0  # negative: nm/s
        if any(s <= 0 for s in speeds.values()):
            self._ack(dev, frame, addr, error=True)
            return
        offset = self._take_final_offset()
        for axis in defined:
            target[axis] += offset
        if self.faults.completion_before_ack:
            self._notify(dev, smcp.NOTIFY_STATUS_CHANGED, 0)
            self._notify(dev, smcp.NOTIFY_GOTO_POS_COMPLETED, 0)
        self._ack(dev, frame, addr)
        duration_s = max((abs(target[a] - current[a]) / speeds[a] for a in defined), default=0.0)
        length_um = float(np.linalg.norm(target - current))
        path_speed = length_um / duration_s if duration_s > 0 else 1.0
        if max_acc > 0:
            dev.motion.acceleration_um_s2 = float(max_acc)
        dev.motion.start(target, path_speed, now)
        dev.goto_pending = True
        dev.completion_sent = self.faults.completion_before_ack
        dev.moving_axes_bits = sum(
            smcp.STATUS_AXIS_MOVING[a] for a in defined if abs(target[a] - current[a]) > 0
        )
        if dev.moving_axes_bits:
            self._notify(dev, smcp.NOTIFY_STATUS_CHANGED, smcp.STATUS_BUSY | dev.moving_axes_bits)

    def _take_final_offset(self) -> float:
        f = self.faults
        if f.final_offset_um == 0.0:
            return 0.0
        if f.final_offset_moves is None:
            return f.final_offset_um
        if f.final_offset_moves <= 0:
            return 0.0
        f.final_offset_moves -= 1
        return f.final_offset_um

    def _take_step(self, dev: _Device, frame: smcp.Frame, now: float) -> None:
        v = list(frame.values(0)) + [0] * 10
        current = dev.motion.position_at(now)
        delta = np.array([v[i] / 1000.0 for i in range(dev.n_axes)])
        speeds = [abs(v[4 + i]) for i in range(dev.n_axes) if delta[i] != 0]
        if not speeds or min(speeds) <= 0:
            return
        duration_s = max(abs(delta[i]) / abs(v[4 + i]) for i in range(dev.n_axes) if delta[i] != 0)
        dev.motion.start(current + delta, float(np.linalg.norm(delta)) / duration_s, now)
        dev.moving_axes_bits = sum(smcp.STATUS_AXIS_MOVING[i] for i in range(dev.n_axes) if delta[i] != 0)
        self._notify(dev, smcp.NOTIFY_STATUS_CHANGED, smcp.STATUS_BUSY | dev.moving_axes_bits)

    def _stop(self, dev: _Device, now: float) -> None:
        was_active = dev.goto_pending or dev.motion.move is not None
        pos = dev.motion.stop(now)
        dev.note_visited(pos)
        self._publish_world(dev, pos)
        if not was_active:
            return
        self._notify(dev, smcp.NOTIFY_POSITION_CHANGED, *(smcp.um_to_nm(x) for x in pos))
        self._notify(dev, smcp.NOTIFY_STATUS_CHANGED, 0)
        if dev.goto_pending and not self.faults.withhold_completion:
            self._notify(dev, smcp.NOTIFY_GOTO_POS_COMPLETED, 1)
        dev.goto_pending = False

    # -- motion --------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        with self._lock:
            for dev in self._devices.values():
                if dev.motion.move is None and not dev.goto_pending:
                    if dev.reported_busy:  # a step that ended between ticks (a position query cleared it)
                        self._notify(dev, smcp.NOTIFY_STATUS_CHANGED, 0)
                    continue
                pos = dev.motion.position_at(now)
                dev.note_visited(pos)
                self._publish_world(dev, pos)
                self._notify(dev, smcp.NOTIFY_POSITION_CHANGED, *(smcp.um_to_nm(x) for x in pos))
                if dev.motion.move is not None:
                    self._notify(dev, smcp.NOTIFY_STATUS_CHANGED, smcp.STATUS_BUSY | dev.moving_axes_bits)
                    continue
                # arrived
                self._notify(dev, smcp.NOTIFY_STATUS_CHANGED, 0)
                if dev.goto_pending and not dev.completion_sent and not self.faults.withhold_completion:
                    self._notify(dev, smcp.NOTIFY_GOTO_POS_COMPLETED, 0)
                dev.goto_pending = False
                dev.completion_sent = False

    def _publish_world(self, dev: _Device, position_um: np.ndarray) -> None:
        if self.world is not None and dev.channel in self.world.channel_names:
            self.world.set_manipulator_position_um(dev.channel, position_um)


# -- command line ------------------------------------------------------------------------
def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids or any(not 1 <= i <= 19 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"--ids needs distinct manipulator ids in 1..19, got {text!r}")
    return ids


def _parse_start_um(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--start-um must be a number of µm, got {text!r}") from None
    if not (math.isfinite(value) and abs(value) <= MAX_WIRE_UM):
        raise argparse.ArgumentTypeError(f"--start-um must be finite and within ±{MAX_WIRE_UM:g} µm, got {text!r}")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", type=int, default=0, choices=range(0, 11), metavar="G",
                        help="SDK group 0..10; the simulator listens on UDP port 55555+G (default 0)")
    parser.add_argument("--ids", type=_parse_ids, default=[1], help="device ids to serve, e.g. 1,2 (default 1)")
    parser.add_argument("--axes", type=int, default=4, choices=(3, 4),
                        help="axes per device: 4 for a uMp-4 with its diagonal axis (default 4)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; use 0.0.0.0 for an SDK opened on 127.255.255.255)")
    parser.add_argument("--start-um", type=_parse_start_um, default=DEFAULT_START_UM,
                        help=f"start position of every axis in µm (default {DEFAULT_START_UM:g})")


def run_cli(args: argparse.Namespace) -> int:
    ids: list[int] = args.ids
    sim = SensapexSimulator(
        devices={i: str(i) for i in ids},
        n_axes={i: args.axes for i in ids},
        group=args.group,
        host=args.host,
        initial_position_um={i: [args.start_um] * args.axes for i in ids},
    )
    with sigterm_as_ctrl_c():  # before the first line: whoever reads it may stop us at once
        sim.start()
        try:
            sdk_address = "127.0.0.1" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
            print(f"Sensapex simulator on udp {args.host}:{sim.port} (group {args.group})", flush=True)
            for i in ids:
                print(f"  device {i}: {args.axes} axes at {sim.position_um(i).round(3).tolist()} µm", flush=True)
            print(
                f"Open the SDK with UMP.get_ump(address=b'{sdk_address}', group={args.group}). Ctrl-C stops.",
                flush=True,
            )
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("Sensapex simulator stopped", flush=True)
            return 0
        finally:
            sim.close()
