"""The simulated Scientifica controller through a real pseudo-terminal and real pyserial:
the command table, v2/v3 units, user-unit scale, E replies, baud rate and fault switches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import serial
from support_cli import ctrl_c_reaches_the_child

from simulators.scientifica_device import ScientificaSimulator
from simulators.world import SimWorld

REPO = Path(__file__).resolve().parents[1]


class Line:
    """A pyserial port on the simulator's pty, with one-command-one-reply helpers."""

    def __init__(self, port: str, baud: int) -> None:
        self.serial = serial.Serial(port, baud, timeout=0.5, exclusive=True)

    def raw(self, command: str, timeout_s: float = 0.5) -> bytes:
        self.serial.reset_input_buffer()
        self.serial.timeout = timeout_s
        self.serial.write(command.encode("ascii") + b"\r")
        return self.serial.read_until(b"\r")

    def ask(self, command: str) -> str:
        reply = self.raw(command)
        assert reply.endswith(b"\r"), f"no complete reply to {command!r}: {reply!r}"
        return reply[:-1].decode("ascii")

    def position(self) -> np.ndarray:
        return np.array([int(v) for v in self.ask("POS").split("\t")], float)

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ask("S") != "0":
            assert time.monotonic() < deadline, "device still moving"
            time.sleep(0.01)

    def close(self) -> None:
        self.serial.close()


@pytest.fixture(params=[2, 3], ids=["v2", "v3"])
def device(request: pytest.FixtureRequest) -> Iterator[tuple[ScientificaSimulator, Line]]:
    baud = 9600 if request.param == 2 else 38400
    sim = ScientificaSimulator(version=request.param, baud=baud)
    line = Line(sim.start(), baud)
    yield sim, line
    line.close()
    sim.close()


@pytest.fixture
def v2() -> Iterator[tuple[ScientificaSimulator, Line]]:
    sim = ScientificaSimulator(version=2, baud=9600)
    line = Line(sim.start(), 9600)
    yield sim, line
    line.close()
    sim.close()


# -- identity ----------------------------------------------------------------------------------
def test_identity_version_name_date_type(device: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = device
    assert line.ask("scientifica") == "Y519"
    assert line.ask("SCIENTIFICA") == "Y519"
    assert line.ask("ver") == line.ask("VER") == str(sim.version)
    assert line.ask("DESC") == "PatchStar"
    assert line.ask("DESC Rig 2 left") == "A"
    assert line.ask("desc") == "Rig 2 left"
    firmware, date, clock = line.ask("DATE").split("\t")
    assert firmware.split(" ", 1)[1] in ("2.13", "3.22") and date and clock
    assert line.ask("TYPE") == ("1.05" if sim.version == 2 else "3.05")
    assert line.ask("TYPE 3.16") == "A" and line.ask("TYPE") == "3.16"


def test_unknown_and_malformed_commands_answer_e(device: tuple[ScientificaSimulator, Line]) -> None:
    _sim, line = device
    for bad in ("SPEED 100", "FLY", "ABS 1", "ABS 1 2 3 4", "ABS a b c", "ABSZ", "TOP fast", "S 1", "", "__init__"):
        assert line.ask(bad) == "E,1", bad
    assert line.ask("TOP 999999") == "E,2"


# -- positions and units -------------------------------------------------------------------------
def test_abs_forms_in_device_ticks(device: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = device
    um_per_tick = 0.1 if sim.version == 2 else 0.01
    assert line.ask("ABS 1000 -2000 300") == "A"
    line.wait_idle()
    assert line.ask("POS") == line.ask("P") == "1000\t-2000\t300"
    assert np.allclose(sim.physical_position_um(), np.array([1000, -2000, 300]) * um_per_tick)
    assert line.ask("abs 10 20") == "A"  # XY only, lower case
    line.wait_idle()
    assert line.ask("POS") == "10\t20\t300"
    assert line.ask("ABSZ -7") == "A"  # Z only
    line.wait_idle()
    assert line.ask("POS") == "10\t20\t-7"
    assert (line.ask("PX"), line.ask("PY"), line.ask("pz")) == ("10", "20", "-7")


def test_rel_forms(v2: tuple[ScientificaSimulator, Line]) -> None:
    _sim, line = v2
    assert line.ask("REL 100 -50 10") == "A"
    line.wait_idle()
    assert line.ask("REL 5 5") == "A"
    line.wait_idle()
    assert line.ask("RELZ -20") == "A"
    line.wait_idle()
    assert line.ask("POS") == "105\t-45\t-10"


def test_redefining_position_does_not_move_the_stage(device: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = device
    line.ask("ABS 500 600 700")
    line.wait_idle()
    physical = sim.physical_position_um()
    assert line.ask("ZERO") == "A"
    assert line.ask("POS") == "0\t0\t0"
    assert line.ask("PX 25") == "A" and line.ask("PX") == "25"
    assert line.ask("P 1 2 3") == "A" and line.ask("P") == "1\t2\t3"
    assert np.allclose(sim.physical_position_um(), physical)
    assert line.ask("ABS 11 2 3") == "A"  # +10 ticks on x from the new origin
    line.wait_idle()
    tick_um = 0.1 if sim.version == 2 else 0.01
    assert np.allclose(sim.physical_position_um(), physical + [10 * tick_um, 0, 0])


def test_zero_is_refused_while_moving_and_stop_halts(v2: tuple[ScientificaSimulator, Line]) -> None:
    _sim, line = v2
    line.ask("TOP 1280")  # 100 µm/s
    line.ask("ABS 100000 0 0")  # 10 mm: takes 100 s
    time.sleep(0.1)
    assert line.ask("S") in ("2", "3")
    assert line.ask("ZERO") == "E,3"
    assert line.ask("STOP") == "A"
    assert line.ask("S") == "0"
    x = line.position()[0]
    assert 0 < x < 100000
    time.sleep(0.1)
    assert line.position()[0] == x


def test_status_goes_accelerate_cruise_decelerate_idle(v2: tuple[ScientificaSimulator, Line]) -> None:
    _sim, line = v2
    line.ask("ACC 10")  # 390 µm/s²: slow ramps that polling can see
    line.ask("TOP 1280")  # 100 µm/s: 0.26 s ramps, 0.34 s cruise
    line.ask("ABS 600 0 0")  # 60 µm
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        s = line.ask("S")
        if not seen or seen[-1] != s:
            seen.append(s)
        if s == "0":
            break
        time.sleep(0.01)
    assert seen == ["2", "3", "4", "0"]


def test_v2_and_v3_speed_and_acceleration_units(device: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = device
    if sim.version == 2:
        assert line.ask("TOP 6400") == "A"  # 500 µm/s with |UU| 6.4
        assert line.ask("ACC 256") == "A"  # 10000 µm/s²
        assert line.ask("TOP 999") == "E,2" and line.ask("TOP 50001") == "E,2"
        assert line.ask("ACC 9") == "E,2" and line.ask("ACC 1001") == "E,2"
    else:
        assert line.ask("TOP 500") == "A"  # µm/s
        assert line.ask("ACC 10000") == "A"  # µm/s²
        assert line.ask("TOP 0") == "E,2" and line.ask("TOP 5001") == "E,2"
    assert line.ask("FIRST 1000") == "A" and line.ask("FIRST") == "1000"
    line.ask("ABS 100000 0 0")
    move = sim._motion.move
    assert move is not None
    assert move.speed_um_s == pytest.approx(500.0)
    assert move.acceleration_um_s2 == pytest.approx(10000.0)
    line.ask("STOP")


def test_user_units_v2_and_negative_scale_reverses_the_axis(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    assert (line.ask("UUX"), line.ask("UUY"), line.ask("UUZ")) == ("6.4", "6.4", "6.4")
    assert line.ask("USTEP X") == "E,1"
    assert line.ask("UUX -6.4") == "A" and line.ask("UUX") == "-6.4"
    assert line.ask("UUY 0") == "E,2"
    assert line.ask("ABS 1000 0 0") == "A"
    line.wait_idle()
    assert line.position()[0] == 1000
    assert sim.physical_position_um()[0] == pytest.approx(-100.0)  # the axis runs backwards
    assert line.ask("UUX 3.2") == "A"  # half the steps per unit: read-back doubles
    assert line.position()[0] == -2000


def test_user_units_v3_use_ustep() -> None:
    with ScientificaSimulator(version=3, baud=38400) as sim:
        line = Line(sim.port, 38400)
        try:
            assert line.ask("USTEP X") == "1600" and line.ask("ustep z") == "1600"
            assert line.ask("UUX") == "E,1"
            assert line.ask("USTEP Y -1600") == "A"
            line.ask("ABS 0 500 0")
            line.wait_idle()
            assert sim.physical_position_um()[1] == pytest.approx(-5.0)
            assert line.ask("USTEP Q") == "E,1"
            # USTEP is 10240 / UU: USTEP 3200 is v2's UU 3.2, which doubles the read-back
            line.ask("ABS 0 500 1000")
            line.wait_idle()
            assert line.position()[2] == 1000
            assert line.ask("USTEP Z 3200") == "A"
            assert line.position()[2] == 2000
        finally:
            line.close()


def test_travel_ends_set_the_limit_bits() -> None:
    with ScientificaSimulator(version=2, baud=9600, travel_um=100.0) as sim:
        line = Line(sim.port, 9600)
        try:
            assert line.ask("LIMITS") == "0"
            line.ask("ABS 0 0 3000")  # 300 µm on z: beyond the 100 µm travel
            line.wait_idle()
            assert line.ask("LIMITS") == "20"  # bit 5: z high, in hex
            assert sim.physical_position_um()[2] == pytest.approx(100.0)
            line.ask("ABS -3000 0 0")
            line.wait_idle()
            assert line.ask("LIMITS") == "1"  # bit 0: x low
        finally:
            line.close()


def test_angle(v2: tuple[ScientificaSimulator, Line]) -> None:
    _sim, line = v2
    assert line.ask("ANGLE") == "0"
    assert line.ask("ANGLE 27.5") == "A" and line.ask("angle") == "27.5"
    assert line.ask("ANGLE A") == "A"
    assert line.ask("ANGLE 120") == "E,2"


# -- the shared world ------------------------------------------------------------------------------
def test_world_position_starts_from_and_follows_the_device() -> None:
    world = SimWorld(seed=1)
    world.add_channel("C", n_axes=3, position_um=np.array([100.0, 200.0, -300.0]))
    with ScientificaSimulator(world=world, channel="C", version=2, baud=9600) as sim:
        line = Line(sim.port, 9600)
        try:
            assert line.ask("POS") == "1000\t2000\t-3000"
            line.ask("ABS 1500 2000 -3000")
            line.wait_idle()
            time.sleep(0.05)
            assert np.allclose(world.manipulator_position_um("C"), [150.0, 200.0, -300.0])
        finally:
            line.close()


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="version"):
        ScientificaSimulator(version=4)
    with pytest.raises(ValueError, match="baud"):
        ScientificaSimulator(baud=19200)
    with pytest.raises(ValueError, match="channel"):
        ScientificaSimulator(world=SimWorld())


# -- baud rate and faults ----------------------------------------------------------------------------
def _eventually(predicate: Any, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(predicate())


def test_wrong_baud_gives_garbage_without_cr_and_does_nothing(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    line.serial.baudrate = 38400
    reply = line.raw("ABS 1000 0 0", timeout_s=0.5)
    assert reply and b"\r" not in reply and all(b >= 0x80 for b in reply)
    assert not sim.is_moving()
    line.serial.baudrate = 9600
    assert line.ask("scientifica") == "Y519"


def test_baud_command_switches_the_rate_without_a_reply(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    assert line.raw("BAUD 38", timeout_s=0.15) == b""
    assert _eventually(lambda: sim.baud == 38400)
    garbage = line.raw("VER", timeout_s=0.5)  # still 9600 here
    assert garbage and b"\r" not in garbage
    line.serial.baudrate = 38400
    assert line.ask("VER") == "2"
    assert line.raw("baud 96", timeout_s=0.15) == b""
    assert _eventually(lambda: sim.baud == 9600)
    line.serial.baudrate = 9600
    assert line.ask("scientifica") == "Y519"
    assert line.ask("BAUD 19") == "E,1"


@pytest.mark.parametrize("baud", [9600, 38400])
def test_wire_time_delays_replies_by_their_transmission_time(baud: int) -> None:
    with ScientificaSimulator(baud=baud, wire_time=True) as sim:
        line = Line(sim.port, baud)
        try:
            t0 = time.monotonic()
            for _ in range(5):
                assert line.ask("POS") == "0\t0\t0"
            per_exchange_s = (time.monotonic() - t0) / 5
            assert per_exchange_s >= (4 + 6) * 10 / baud  # 'POS\r' + '0\t0\t0\r': 10 characters
        finally:
            line.close()


def test_late_replies(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    sim.faults.reply_delay_s = 0.3
    t0 = time.monotonic()
    assert line.ask("VER") == "2"
    assert time.monotonic() - t0 >= 0.29
    sim.faults.reply_delay_s = 0.0


def test_garbled_replies_keep_the_cr_and_count_down(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    sim.faults.garble_next_replies = 2
    for _ in range(2):
        reply = line.raw("scientifica")
        assert reply.endswith(b"\r") and all(b >= 0x80 for b in reply[:-1])
    assert line.ask("scientifica") == "Y519"


def test_silence_means_no_reply_and_no_action(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    sim.faults.silent = True
    assert line.raw("ABS 1000 0 0", timeout_s=0.5) == b""  # long enough for the device to hear it while silent
    assert not sim.is_moving()
    sim.faults.silent = False
    assert line.ask("POS") == "0\t0\t0"


def test_error_reply_switches(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    sim.faults.error_next_commands = 1
    assert line.ask("ABS 10 0 0") == "E,3"
    assert not sim.is_moving()
    sim.faults.error_commands = {"ABS"}
    assert line.ask("abs 10 0 0") == "E,3"
    assert line.ask("VER") == "2"
    sim.faults.error_commands = set()
    assert line.ask("ABS 10 0 0") == "A"


def test_missed_target_and_early_idle(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    sim.faults.miss_next_moves = 1
    sim.faults.miss_by_um = 4.0
    line.ask("ABS 1000 0 0")
    line.wait_idle()
    assert line.ask("PX") == "960"  # stopped 4 µm short
    sim.faults.idle_early_s = 1.0
    line.ask("ACC 2")  # 78 µm/s²: the last 4 µm take 0.45 s
    line.ask("ABS 1000 0 0")
    time.sleep(0.02)
    assert line.ask("S") == "0"  # says idle although still moving
    assert line.ask("PX") != "1000"
    deadline = time.monotonic() + 2.0
    while line.ask("PX") != "1000" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert line.ask("PX") == "1000"


def test_random_command_lines_each_get_exactly_one_reply(v2: tuple[ScientificaSimulator, Line]) -> None:
    """A seeded fuzz of the command table: every line gets one CR-terminated reply, the device
    never stops answering, and nothing moves beyond its travel."""
    sim, line = v2
    rng = np.random.default_rng(7)
    names = ["scientifica", "DESC", "DATE", "VER", "TYPE", "P", "POS", "PX", "PY", "PZ", "ABS", "ABSZ",
             "REL", "RELZ", "STOP", "S", "TOP", "FIRST", "ACC", "UUX", "UUY", "UUZ", "USTEP", "ZERO",
             "LIMITS", "ANGLE", "XYZZY", "P0", "?", "E,1"]
    args = ["", "0", "-1", "7", "1e3", "x", "Y", "A", "99999999999999999999", "1.5", "-", "\t"]
    for _ in range(300):
        name = str(rng.choice(names))
        name = name.lower() if rng.random() < 0.3 else name
        words = [name] + [str(rng.choice(args)) for _ in range(int(rng.integers(0, 4)))]
        reply = line.raw(" ".join(words))
        assert reply.endswith(b"\r") and b"\r" not in reply[:-1], (words, reply)
        assert all(32 <= b < 127 or b in (9, 13) for b in reply), (words, reply)
    line.ask("STOP")
    for axis in "XYZ":
        line.ask(f"UU{axis} 6.4")
    assert line.ask("scientifica") == "Y519"
    travel = np.abs(sim.physical_position_um())
    assert np.all(travel <= 25000.0 + 1e-6)


def test_heard_lists_commands_since_a_mark(v2: tuple[ScientificaSimulator, Line]) -> None:
    sim, line = v2
    line.ask("VER")
    mark = sim.heard_count
    line.ask("desc")
    line.ask("S")
    assert sim.heard(since=mark) == ["desc", "S"]
    assert sim.heard()[-3:] == ["VER", "desc", "S"]
    assert sim.heard(since=sim.heard_count) == []


def test_close_is_idempotent_and_releases_the_pty() -> None:
    sim = ScientificaSimulator()
    path = sim.start()
    assert os.path.exists(path)
    sim.close()
    sim.close()


# -- the CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_prints_the_pty_path_first_and_stops_on_ctrl_c_or_sigterm(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from rig.cli import main; raise SystemExit(main())",
         "simulate", "scientifica", "--version", "3", "--baud", "38400"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_the_child,
    )
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        if not path.startswith("/dev/pts/"):
            proc.kill()
            _out, err = proc.communicate(timeout=5)
            pytest.fail(f"first line {path!r} is not a pty path; stderr: {err[-2000:]}")
        line = Line(path, 38400)
        try:
            assert line.ask("scientifica") == "Y519"
            assert line.ask("VER") == "3"
        finally:
            line.close()
        proc.send_signal(sig)
        code = proc.wait(10)
        assert proc.stderr is not None
        assert code == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("value", ["nan", "1e30"])
def test_cli_refuses_a_start_position_that_is_not_finite_or_absurd(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rig.cli", "simulate", "scientifica", "--position-um", value, "0", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "--position-um must be finite" in done.stderr and "Traceback" not in done.stderr
