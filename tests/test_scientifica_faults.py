"""Faults between the Scientifica driver and the controller, through real pyserial and a pty:
late replies, garbled bytes, silence, E replies, missed targets, wrong baud, absent or busy
ports. Each one must end in a clear error (naming the channel and the port) or a correct
recovery, within a bounded time, never a hang and never motion outside the limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import serial

from manipulators.base import Limits, MoveHandle, MoveState
from manipulators.scientifica import ErrorReply, ScientificaManipulator, parse_int
from rig.errors import DeviceError, DeviceTimeout, InvalidParams, Stopped
from simulators.scientifica_device import ScientificaSimulator

LIMITS = Limits((-500.0, -500.0, -500.0), (500.0, 500.0, 500.0))
BAUD = {2: 9600, 3: 38400}
BOUND_S = 10.0  # generous: only catches hangs


@contextmanager
def rig(version: int = 2, timeout_s: float = 0.3, **kwargs: object) -> Iterator[
    tuple[ScientificaSimulator, ScientificaManipulator]
]:
    sim = ScientificaSimulator(version=version, baud=BAUD[version])
    port = sim.start()
    try:
        m = ScientificaManipulator("C", LIMITS, 2000.0, 400.0, port=port, baud=BAUD[version],
                                   timeout_s=timeout_s, **kwargs)  # type: ignore[arg-type]
        try:
            yield sim, m
        finally:
            m.close()
    finally:
        sim.close()


def inside_limits(sim: ScientificaSimulator) -> bool:
    return LIMITS.contains(sim.physical_position_um().tolist())


# -- late replies -------------------------------------------------------------------------------
def test_replies_later_than_usual_but_within_the_timeout_still_work() -> None:
    with rig(timeout_s=0.5) as (sim, m):
        sim.faults.reply_delay_s = 0.1
        handle = m.move_to([40.0, 0.0, -20.0], 800.0).wait(BOUND_S)
        assert handle.state is MoveState.DONE
        assert np.allclose(m.position_um, [40.0, 0.0, -20.0], atol=0.5)


def test_replies_later_than_the_timeout_end_in_a_clear_error_or_the_target() -> None:
    with rig(timeout_s=0.2) as (sim, m):
        sim.faults.reply_delay_s = 0.5
        t0 = time.monotonic()
        handle = m.move_to([60.0, 0.0, 0.0], 800.0)
        handle.wait(BOUND_S + 10, check=False)
        assert time.monotonic() - t0 < BOUND_S + 10
        if handle.state is MoveState.FAILED:
            assert isinstance(handle.error, DeviceError)
            assert "'C'" in str(handle.error)
        else:
            assert handle.state is MoveState.DONE and handle.position_um is not None
            assert np.allclose(handle.position_um, [60.0, 0.0, 0.0], atol=0.5)
        assert inside_limits(sim)
        sim.faults.reply_delay_s = 0.0


def test_a_device_answering_far_too_late_fails_to_open_with_a_clear_error() -> None:
    with ScientificaSimulator() as sim:
        sim.faults.reply_delay_s = 1.5
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as info:
            ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, timeout_s=0.2)
        assert time.monotonic() - t0 < BOUND_S
        assert "'C'" in str(info.value) and sim.port in str(info.value)


def test_stop_never_waits_behind_queued_slow_work() -> None:
    with rig(timeout_s=0.5) as (sim, m):
        handle = m.move_to([400.0, 0.0, 0.0], 100.0)
        time.sleep(0.2)
        sim.faults.reply_delay_s = 0.15  # every exchange now takes 0.15 s
        results: list[object] = []
        workers = [
            threading.Thread(target=lambda: results.append(m.call(lambda p: p.exchange("VER", parse_int), 30)))
            for _ in range(6)
        ]  # 0.9 s of queued work; stop itself needs STOP, S and POS: 0.45 s + the exchange in flight
        for w in workers:
            w.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        m.stop()
        stop_s = time.monotonic() - t0
        assert handle.state is MoveState.INTERRUPTED
        assert stop_s < 1.2, f"stop took {stop_s:.2f} s"  # behind the queue it would be >= 1.35 s
        for w in workers:
            w.join(BOUND_S)
        assert results == [2] * 6  # the queued work still ran, after the stop
        heard = sim.heard()
        first_stop = heard.index("STOP")
        assert heard[first_stop:].count("VER") >= 4, "STOP was not sent before the queued commands"
        sim.faults.reply_delay_s = 0.0


# -- garbled bytes ----------------------------------------------------------------------------------
def test_garbled_replies_during_identification_are_resynchronised() -> None:
    with ScientificaSimulator() as sim:
        sim.faults.garble_next_replies = 1
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, timeout_s=0.3)
        try:
            assert m.describe()["controller_version"] == 2
        finally:
            m.close()


def test_occasional_garbled_replies_during_a_move_are_recovered() -> None:
    with rig() as (sim, m):
        handle = m.move_to([80.0, 10.0, 0.0], 400.0)
        time.sleep(0.05)
        for _ in range(4):
            sim.faults.garble_next_replies = 1
            time.sleep(0.06)
        handle.wait(BOUND_S)
        assert handle.state is MoveState.DONE
        assert np.allclose(m.position_um, [80.0, 10.0, 0.0], atol=0.5)
        assert m._proto.garbled_count >= 1


def test_a_garbled_line_fails_the_move_then_recovers_when_clean() -> None:
    with rig(lost_after_s=1.0) as (sim, m):
        handle = m.move_to([300.0, 0.0, 0.0], 200.0)
        time.sleep(0.1)
        sim.faults.garble_next_replies = 10**9
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="lost contact") as info:
            handle.wait(BOUND_S)
        assert time.monotonic() - t0 < BOUND_S
        assert "'C'" in str(info.value) and sim.port in str(info.value)
        assert inside_limits(sim)
        sim.faults.garble_next_replies = 0
        handle = m.move_to([10.0, 0.0, 0.0], 800.0).wait(BOUND_S)
        assert handle.state is MoveState.DONE
        assert np.allclose(m.position_um, [10.0, 0.0, 0.0], atol=0.5)


# -- silence -------------------------------------------------------------------------------------------
def test_silence_mid_move_is_a_clear_timeout_and_the_driver_recovers() -> None:
    with rig(timeout_s=0.2, lost_after_s=0.8) as (sim, m):
        handle = m.move_to([200.0, 0.0, 0.0], 400.0)
        time.sleep(0.1)
        sim.faults.silent = True
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout) as info:
            handle.wait(BOUND_S)
        assert time.monotonic() - t0 < m.lost_after_s + 3.0
        assert "'C'" in str(info.value) and sim.port in str(info.value)
        with pytest.raises(DeviceTimeout, match="no position"):
            _ = m.position_um
        t0 = time.monotonic()
        with pytest.raises(DeviceError):
            m.stop()  # STOP cannot be confirmed: say so, in bounded time
        assert time.monotonic() - t0 < BOUND_S
        assert inside_limits(sim)
        sim.faults.silent = False
        assert wait_for(lambda: _position_or_none(m) is not None, 3.0)
        handle = m.move_to([0.0, 0.0, 0.0], 800.0).wait(BOUND_S)
        assert handle.state is MoveState.DONE


def test_silent_device_at_open_is_a_timeout_naming_channel_and_port() -> None:
    with ScientificaSimulator() as sim:
        sim.faults.silent = True
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="no answer to the identity check") as info:
            ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, timeout_s=0.2)
        assert time.monotonic() - t0 < BOUND_S
        assert "'C'" in str(info.value) and sim.port in str(info.value)


def test_close_with_a_silent_device_returns() -> None:
    with ScientificaSimulator() as sim:
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, timeout_s=0.2)
        m.move_to([100.0, 0.0, 0.0], 200.0)
        sim.faults.silent = True
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < BOUND_S
        with pytest.raises(DeviceError, match="closed"):
            m.move_to([0.0, 0.0, 0.0], 200.0)


def test_unplugged_controller_fails_the_move_and_closes_cleanly() -> None:
    sim = ScientificaSimulator()
    try:
        port = sim.start()
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=port, timeout_s=0.2, lost_after_s=0.8)
        handle = m.move_to([300.0, 0.0, 0.0], 200.0)
        time.sleep(0.1)
        sim.close()  # the USB cable is pulled: the pty master goes away
        with pytest.raises(DeviceError) as info:
            handle.wait(BOUND_S)
        assert "'C'" in str(info.value)
        with pytest.raises(DeviceError):
            _ = m.position_um
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < BOUND_S
    finally:
        sim.close()


# -- callbacks on the port thread -------------------------------------------------------------------------
def test_stop_move_and_close_from_done_callbacks_do_not_deadlock() -> None:
    with ScientificaSimulator() as sim:
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, timeout_s=0.3)
        events: list[str] = []
        follow_up: list[object] = []

        def close_on_done(_h: object) -> None:
            m.close()  # also on the port thread
            events.append("closed")

        def on_first(_h: object) -> None:
            m.stop("callback stop")  # runs on the port thread
            events.append("stopped")
            follow_up.append(m.move_to([20.0, 0.0, 0.0], 500.0))

        t0 = time.monotonic()
        m.move_to([10.0, 0.0, 0.0], 500.0).add_done_callback(on_first)
        assert wait_for(lambda: len(follow_up) == 1, BOUND_S)
        second = follow_up[0]
        assert isinstance(second, MoveHandle)
        second.add_done_callback(close_on_done)
        assert wait_for(lambda: events == ["stopped", "closed"], BOUND_S)
        assert time.monotonic() - t0 < 3.0
        assert np.allclose(sim.physical_position_um(), [20.0, 0.0, 0.0], atol=0.5)
        assert wait_for(lambda: not m._thread.is_alive(), BOUND_S)
        assert not m._serial.is_open
        m.close()  # idempotent from outside too


# -- E replies and missed targets ----------------------------------------------------------------------
def test_refused_move_fails_with_the_device_error_and_nothing_moves() -> None:
    with rig() as (sim, m):
        sim.faults.error_commands = {"ABS"}
        handle = m.move_to([50.0, 0.0, 0.0], 400.0)
        with pytest.raises(ErrorReply, match="refused 'ABS 500 0 0' with 'E,3'") as info:
            handle.wait(BOUND_S)
        assert info.value.errno == 3 and "'C'" in str(info.value)
        assert np.allclose(sim.physical_position_um(), 0.0)
        sim.faults.error_commands = set()
        assert m.move_to([50.0, 0.0, 0.0], 400.0).wait(BOUND_S).state is MoveState.DONE


def test_a_move_whose_start_reply_is_garbled_fails_and_leaves_the_stage_stopped() -> None:
    """``ABS`` answers as the move starts: a garbled answer (twice, with the retry) must not
    leave the stage travelling on while the caller is told the move failed."""
    with rig(timeout_s=0.3) as (sim, m):
        sim.faults.garble_commands = {"ABS"}
        handle = m.move_to([400.0, 0.0, 0.0], 100.0)  # 4 s of travel
        with pytest.raises(DeviceError, match="garbled"):
            handle.wait(BOUND_S)
        assert "STOP" in sim.heard()
        assert wait_for(lambda: not sim.is_moving(), 5.0)
        stopped_at = sim.physical_position_um().copy()
        time.sleep(0.3)
        assert np.allclose(sim.physical_position_um(), stopped_at)
        assert stopped_at[0] < 200.0  # far from the target: halted, not finished
        sim.faults.garble_commands = set()
        assert m.move_to([50.0, 0.0, 0.0], 400.0).wait(BOUND_S).state is MoveState.DONE


def test_a_speed_left_set_by_a_failed_move_is_overwritten_before_the_next_move() -> None:
    """A garbled answer to ``TOP n`` may hide a TOP the device applied; the next move, even
    at the default speed, must send its own TOP rather than run at the earlier one."""
    sim = ScientificaSimulator(version=2, baud=BAUD[2])
    sim._top = 4000  # a default TOP within this channel's maximum speed
    port = sim.start()
    m = ScientificaManipulator("C", LIMITS, 2000.0, 400.0, port=port, baud=BAUD[2], timeout_s=0.3)
    try:
        info = m.info
        default_speed = info.speed_for_top(info.top_default)
        assert info.top_for_speed(default_speed) == info.top_default
        sim.faults.garble_commands = {"TOP"}
        with pytest.raises(DeviceError, match="garbled"):
            m.move_to([100.0, 0.0, 0.0], 100.0).wait(BOUND_S)
        sim.faults.garble_commands = set()
        assert m.move_to([20.0, 0.0, 0.0], default_speed).wait(BOUND_S).state is MoveState.DONE
        heard = sim.heard()
        last_abs = max(i for i, c in enumerate(heard) if c.startswith("ABS"))
        assert f"TOP {info.top_default}" in heard[last_abs - 3:last_abs]
    finally:
        m.close()
        sim.close()


def test_missed_targets_are_retried() -> None:
    with rig() as (sim, m):
        sim.faults.miss_next_moves = 2
        handle = m.move_to([100.0, 0.0, 0.0], 800.0).wait(BOUND_S)
        assert handle.state is MoveState.DONE and handle.position_um is not None
        assert np.allclose(handle.position_um, [100.0, 0.0, 0.0], atol=0.5)
        assert sim.heard().count("ABS 1000 0 0") == 3


def test_a_target_missed_every_time_fails_after_limited_retries() -> None:
    with rig(max_retries=2) as (sim, m):
        sim.faults.miss_next_moves = 100
        handle = m.move_to([100.0, 0.0, 0.0], 800.0)
        with pytest.raises(DeviceError, match="from the target after 2 retries"):
            handle.wait(BOUND_S)
        assert sim.heard().count("ABS 1000 0 0") == 3
        sim.faults.miss_next_moves = 0


def test_early_idle_status_is_rechecked_not_taken_as_arrival() -> None:
    with rig(acceleration_um_s2=2000.0) as (sim, m):
        sim.faults.idle_early_s = 0.25
        handle = m.move_to([60.0, 0.0, 0.0], 300.0).wait(BOUND_S)
        assert handle.state is MoveState.DONE
        assert np.allclose(sim.physical_position_um(), [60.0, 0.0, 0.0], atol=0.5)
        assert handle.position_um is not None
        assert np.allclose(handle.position_um, [60.0, 0.0, 0.0], atol=0.5)


# -- ports and baud rates --------------------------------------------------------------------------------
# the other direction (device at 38400, driver at 9600) is covered byte by byte in
# test_scientifica_protocol.py; this is the common case: the controller fell back to 9600
# after a power cycle while the configuration says 38400
@pytest.mark.parametrize(("device_baud", "driver_baud"), [(9600, 38400)])
def test_wrong_baud_is_a_clear_error_saying_the_right_rate(device_baud: int, driver_baud: int) -> None:
    with ScientificaSimulator(version=2, baud=device_baud) as sim:
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as info:
            ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, baud=driver_baud, timeout_s=0.2)
        assert time.monotonic() - t0 < BOUND_S
        text = str(info.value)
        assert f"answers at {device_baud} baud, not the configured {driver_baud}" in text
        assert "'C'" in text and sim.port in text
        assert not sim.is_moving()


def test_absent_port_is_a_clear_error(tmp_path: object) -> None:
    missing = "/dev/pts/patchrig-no-such-port"
    with pytest.raises(DeviceError, match="does not exist") as info:
        ScientificaManipulator("C", LIMITS, 1000.0, port=missing)
    assert missing in str(info.value) and "'C'" in str(info.value)


def test_port_in_use_is_a_clear_error() -> None:
    with ScientificaSimulator() as sim:
        holder = serial.Serial(sim.port, 9600, exclusive=True)  # LinLab holding the port
        try:
            with pytest.raises(DeviceError, match="in use") as info:
                ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port)
            assert sim.port in str(info.value) and "'C'" in str(info.value)
        finally:
            holder.close()
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port)
        try:
            with pytest.raises(DeviceError, match="in use"):
                ScientificaManipulator("D", LIMITS, 1000.0, port=sim.port)
        finally:
            m.close()


def test_version_mismatch_is_refused() -> None:
    with ScientificaSimulator(version=3, baud=9600) as sim:
        with pytest.raises(DeviceError, match="reports version 3 .* expects version 2") as info:
            ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, expected_version=2)
        assert "'C'" in str(info.value)


def test_not_a_scientifica_device_is_refused() -> None:
    with ScientificaSimulator() as sim:
        sim.faults.error_commands = {"SCIENTIFICA"}
        with pytest.raises(DeviceError, match="not a Scientifica"):
            ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, timeout_s=0.2)


# -- speed policy ---------------------------------------------------------------------------------------
def test_speed_above_the_controller_maximum_is_rejected_before_anything_is_sent() -> None:
    with rig() as (sim, m):  # v2, |UU| 6.4: at most 3906 µm/s; the channel allows 2000
        m.max_speed_um_s = 5000.0
        before = sim.heard_count
        previous = m.current_move
        with pytest.raises(InvalidParams, match="above what this controller can do"):
            m.move_to([10.0, 0.0, 0.0], 4000.0)
        assert m.current_move is previous
        time.sleep(0.1)
        assert not any(c.startswith(("TOP ", "ABS")) for c in sim.heard(since=before))


def test_slow_move_below_the_controller_minimum_is_stepwise_at_the_requested_mean_speed() -> None:
    with rig() as (sim, m):  # v2 minimum: 78 µm/s
        t0 = time.monotonic()
        handle = m.move_to([10.0, 0.0, 0.0], 20.0)
        ahead_um: list[float] = []
        while not handle.done:  # the pipette is never ahead of 20 µm/s since the move began
            ahead_um.append(sim.physical_position_um()[0] - 20.0 * (time.monotonic() - t0))
            time.sleep(0.005)
        handle.wait(BOUND_S)
        elapsed_s = time.monotonic() - t0
        assert handle.state is MoveState.DONE
        assert elapsed_s >= 10.0 / 20.0
        assert len(ahead_um) > 20 and max(ahead_um) <= 0.05
        steps = [c for c in sim.heard() if c.startswith("ABS")]
        assert len(steps) >= 3
        assert all(c.startswith("TOP 1000") for c in sim.heard() if c.startswith("TOP ") and c != "TOP 30000")


def test_a_stepwise_move_that_stops_short_is_paced_again_not_resent_at_the_device_minimum(monkeypatch) -> None:
    """A slow (stepwise) move whose final ABS stops short is paced again from where it stopped:
    re-sending one ABS would cover the rest at the controller's minimum speed (78 µm/s on v2),
    8 times the 10 µm/s asked for."""
    import manipulators.scientifica as sc

    with rig() as (sim, m):
        target = [40.0, 0.0, 0.0]
        final = m._proto.ticks_for(np.array(target), m.limits)
        real_send = sc.ScientificaProtocol.send_move

        def send_move(self, ticks, top):  # noqa: ANN001, ANN202
            if ticks == final and not sim.faults.miss_next_moves and not getattr(send_move, "armed", False):
                send_move.armed = True  # type: ignore[attr-defined]
                sim.faults.miss_by_um, sim.faults.miss_next_moves = 30.0, 1  # the final ABS stops 30 µm short
            return real_send(self, ticks, top)

        monkeypatch.setattr(sc.ScientificaProtocol, "send_move", send_move)
        handle = m.move_to(target, 10.0)
        samples: list[tuple[float, float]] = []
        while not handle.done:
            samples.append((time.monotonic(), sim.physical_position_um()[0]))
            time.sleep(0.02)
        assert handle.state is MoveState.DONE and getattr(send_move, "armed", False)
        t, x = np.array(samples).T
        windows = [(x[j] - x[i]) / (t[j] - t[i]) for i in range(len(t)) for j in range(i + 1, len(t))
                   if 0.5 <= t[j] - t[i] <= 0.6]
        assert max(windows) < 15.0, max(windows)  # 10 µm/s asked; one ABS for the 30 µm gave 58


def test_a_move_asked_for_while_close_runs_is_refused_and_nothing_moves_after_close(monkeypatch) -> None:
    """close() stops first, then ends the port thread: a move from another thread in between
    (here: while close's stop is being served) is refused, never sent to a port about to close."""
    import manipulators.scientifica as sc

    sim = ScientificaSimulator(version=2, baud=BAUD[2])
    port = sim.start()
    try:
        m = ScientificaManipulator("C", LIMITS, 2000.0, 400.0, port=port, baud=BAUD[2], timeout_s=0.3)
        start = m.position_um
        outcome: list[object] = []
        real_refresh = sc.ScientificaManipulator._refresh_after_stop

        def refresh_then_move(self):  # noqa: ANN001, ANN202
            real_refresh(self)
            if not outcome:
                def client() -> None:
                    try:
                        outcome.append(m.move_to(start + np.array([300.0, 0.0, 0.0]), 500.0))
                    except DeviceError as exc:
                        outcome.append(exc)
                mover = threading.Thread(target=client)
                mover.start()
                mover.join(5.0)

        monkeypatch.setattr(sc.ScientificaManipulator, "_refresh_after_stop", refresh_then_move)
        m.close()
        assert len(outcome) == 1 and isinstance(outcome[0], DeviceError) and "closed" in str(outcome[0])
        time.sleep(0.3)
        assert not sim.is_moving()
        assert np.allclose(sim.physical_position_um(), start, atol=0.5)
    finally:
        sim.close()


def test_a_very_slow_stepwise_move_advances_a_tick_at_a_time() -> None:
    """At 0.3 µm/s one pacing step (0.03 µm) is less than a tick: the move never started and
    timed out. It now advances one tick whenever the schedule has reached it."""
    with rig() as (sim, m):
        t0 = time.monotonic()
        handle = m.move_to([1.0, 0.0, 0.0], 0.3)
        assert handle.wait(BOUND_S + 10.0).state is MoveState.DONE
        assert time.monotonic() - t0 >= 1.0 / 0.3 - 0.2  # at the requested mean speed, not faster
        assert sim.physical_position_um()[0] == pytest.approx(1.0, abs=0.05)


def test_acceleration_is_sent_in_device_units() -> None:
    with rig(acceleration_um_s2=10000.0) as (sim, m):
        assert "ACC 256" in sim.heard()
        assert m.describe()["acceleration_um_s2"] == pytest.approx(10000.0)
        m.set_acceleration_um_s2(5000.0)
        assert "ACC 128" in sim.heard()
        with pytest.raises(InvalidParams):
            m.set_acceleration_um_s2(-1.0)


def test_reversed_axis_reads_back_in_user_units() -> None:
    with ScientificaSimulator(version=2) as sim:
        sim.set_uu((-6.4, 6.4, 6.4))
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port)
        try:
            assert m.describe()["reversed_axes"] == [0]
            m.move_to([100.0, 0.0, 0.0], 800.0).wait(BOUND_S)
            assert np.allclose(m.position_um, [100.0, 0.0, 0.0], atol=0.5)
            assert sim.physical_position_um()[0] == pytest.approx(-100.0)
        finally:
            m.close()


def test_stop_when_silent_interrupts_the_handle_and_reports() -> None:
    with rig() as (sim, m):
        handle = m.move_to([100.0, 0.0, 0.0], 100.0)
        time.sleep(0.1)
        sim.faults.silent = True
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match="'STOP'"):
            m.stop()
        assert time.monotonic() - t0 < BOUND_S
        assert handle.state is MoveState.INTERRUPTED
        with pytest.raises(Stopped):
            handle.wait(0.1)
        sim.faults.silent = False


def wait_for(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(predicate())  # type: ignore[operator]


def _position_or_none(m: ScientificaManipulator) -> np.ndarray | None:
    try:
        return m.position_um
    except DeviceError:
        return None


def test_a_stop_after_the_switch_but_before_the_move_is_queued_is_not_undone() -> None:
    """stop() reads the new move (move_to has made it current) and registers its STOP before
    the move is queued: the port thread serves the STOP, then must not start the move (its
    queue number is newer than the STOP's, so it used to run to its target, reported
    INTERRUPTED)."""
    with rig(version=3) as (sim, m):
        real_submit, real_put = m._submit, m._requests.put
        stop_registered = threading.Event()
        stoppers: list[threading.Thread] = []

        def put(item, *args, **kwargs):  # type: ignore[no-untyped-def]
            real_put(item, *args, **kwargs)
            if item is None:  # stop() wakes the port thread after registering itself
                stop_registered.set()

        def stop_then_submit(request):  # type: ignore[no-untyped-def]
            if request.kind == "move" and not stoppers:
                stoppers.append(threading.Thread(target=m.stop, args=("e-stop",)))
                stoppers[0].start()
                assert stop_registered.wait(BOUND_S)
            real_submit(request)

        m._requests.put = put  # type: ignore[method-assign]
        m._submit = stop_then_submit  # type: ignore[method-assign]
        try:
            handle = m.move_to([300.0, 0.0, 0.0], 400.0)
            stoppers[0].join(BOUND_S)
        finally:
            m._submit = real_submit  # type: ignore[method-assign]
            m._requests.put = real_put  # type: ignore[method-assign]
        handle.wait(BOUND_S, check=False)
        assert handle.state is MoveState.INTERRUPTED, (handle.state, handle.reason)
        time.sleep(0.3)  # at 400 µm/s a move left running would travel 120 µm in this time
        assert np.max(np.abs(sim.physical_position_um())) < 5.0, sim.physical_position_um()


def test_a_move_taken_off_the_queue_just_before_a_stop_does_not_start_after_it() -> None:
    """stop() read the running move; a newer move was queued and the port thread took it off
    the queue; then the STOP was registered and served. The newer move was queued before the
    STOP, so it must not start after it (it used to run to its target, DONE)."""
    with rig(version=3) as (sim, m):
        first = m.move_to([300.0, 0.0, 0.0], 100.0)
        assert wait_for(lambda: sim.is_moving(), BOUND_S)
        real_get, real_stop = m._requests.get, m._do_stop
        newer: list[MoveHandle] = []

        def get_then_wait_for_the_stop(*args, **kwargs):  # type: ignore[no-untyped-def]
            req = real_get(*args, **kwargs)
            if req is not None and req.kind == "move" and req.handle is not first:
                assert wait_for(m._stop_flag.is_set, BOUND_S)  # the STOP is registered now
            return req

        def newer_move_first(reason: str) -> None:
            if not newer:
                newer.append(m.move_to([-300.0, 0.0, 0.0], 100.0))
            real_stop(reason)

        m._requests.get = get_then_wait_for_the_stop  # type: ignore[method-assign]
        m._do_stop = newer_move_first  # type: ignore[method-assign]
        try:
            m.stop("e-stop")
        finally:
            m._do_stop = real_stop  # type: ignore[method-assign]
            m._requests.get = real_get  # type: ignore[method-assign]
        newer[0].wait(BOUND_S, check=False)
        assert newer[0].state is MoveState.INTERRUPTED, (newer[0].state, newer[0].reason)
        stopped_at = sim.physical_position_um()
        time.sleep(0.3)  # at 100 µm/s a move left running would travel 30 µm in this time
        assert np.allclose(sim.physical_position_um(), stopped_at, atol=0.5)
