"""Every fault switch of the Sensapex simulator, driven through the real SDK: each gives a clear
error or a correct recovery within a bounded time, never a hang, never motion outside limits.

Several faults only show up as a ~1 s delay (libum's stuck-drive fallback), so those tests
assert on timing too (protocols/sensapex-smcp.md §7.9).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from support_sensapex import DEVICE_AXES, LIMITS_3, LIMITS_4, SensapexRig, sensapex_rig

from manipulators.base import MoveState, stop_all
from manipulators.sensapex import SensapexManipulator
from rig.errors import DeviceError, DeviceTimeout, PatchrigError
from simulators import smcp

PREFERRED_GROUP = 9  # another safe group is used if this one is busy on the machine
X50 = np.array([50.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def rig() -> Iterator[SensapexRig]:
    with sensapex_rig(PREFERRED_GROUP) as r:
        yield r


@pytest.fixture(autouse=True)
def fresh(rig: SensapexRig) -> Iterator[None]:
    """Clean faults and positions before each test; afterwards close its channels and check
    that no device ever left the channels' limits."""
    rig.reset()
    yield
    rig.sim.faults.silent = False
    rig.sim.faults.silent_ids.clear()
    rig.close_all()
    for dev_id, n in DEVICE_AXES.items():
        lo, hi = rig.sim.visited_range_um(dev_id)
        limits = LIMITS_4 if n == 4 else LIMITS_3
        assert np.all(lo >= np.array(limits.min_um)) and np.all(hi <= np.array(limits.max_um)), (
            f"device {dev_id} visited {lo}..{hi}, outside its limits"
        )


def counts(rig: SensapexRig) -> dict[str, int]:
    return dict(rig.sim.request_counts)


def delta(rig: SensapexRig, before: dict[str, int], name: str) -> int:
    return rig.sim.request_counts.get(name, 0) - before.get(name, 0)


# -- dropped ACKs ------------------------------------------------------------------------
def test_dropped_goto_acks_are_resent_and_the_move_still_arrives(rig: SensapexRig) -> None:
    m = rig.open(2)
    rig.sim.faults.drop_ack_types.add(smcp.CMD_GOTO_POS)
    before = counts(rig)
    target = m.position_um + X50
    t0 = time.monotonic()
    h = m.move_to(target, 1000.0).wait(10)
    assert time.monotonic() - t0 < 5.0
    assert h.state is MoveState.DONE
    assert np.allclose(rig.sim.position_um(2), target, atol=0.01)
    assert delta(rig, before, "GOTO_POS") >= 3  # libum resent the unacknowledged GOTO


def test_dropped_position_query_acks_are_harmless(rig: SensapexRig) -> None:
    m = rig.open(2)
    rig.sim.faults.drop_ack_types.add(smcp.CMD_GET_POSITIONS)
    target = m.position_um + X50
    t0 = time.monotonic()
    m.move_to(target, 1000.0).wait(10)
    assert time.monotonic() - t0 < 1.0
    assert np.allclose(m.position_um, target, atol=0.1)


def test_dropped_stop_ack_is_a_timeout_and_the_move_never_resumes(rig: SensapexRig) -> None:
    m = rig.open(2)
    h = m.move_to(m.position_um + np.array([500.0, 0, 0]), 200.0)
    time.sleep(0.3)
    rig.sim.faults.drop_ack_types.add(smcp.CMD_STOP)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        m.stop()
    assert time.monotonic() - t0 < 1.5
    assert "'sx2'" in str(info.value) and "no answer" in str(info.value)
    assert h.state is MoveState.INTERRUPTED
    stopped_at = rig.sim.position_um(2)
    assert not rig.sim.is_moving(2)
    time.sleep(0.6)  # the SDK's poller must not send the GOTO again
    assert not rig.sim.is_moving(2)
    assert np.allclose(rig.sim.position_um(2), stopped_at, atol=0.01)


# -- error replies -------------------------------------------------------------------------
def test_error_reply_to_position_query_is_a_clear_error_and_nothing_moves(rig: SensapexRig) -> None:
    m = rig.open(2)
    start = rig.sim.position_um(2)
    rig.sim.faults.error_types.add(smcp.CMD_GET_POSITIONS)
    before = counts(rig)
    time.sleep(0.05)  # let the cached position age beyond the read's 20 ms
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=r"'sx2'.*position read.*Peer failure"):
        _ = m.position_um
    with pytest.raises(DeviceError, match="'sx2'"):
        m.move_to(start + X50, 500.0)
    assert time.monotonic() - t0 < 2.0
    assert delta(rig, before, "GOTO_POS") == 0
    assert np.allclose(rig.sim.position_um(2), start)


def test_a_slow_move_gets_the_time_its_whole_um_per_s_axis_speed_takes(rig: SensapexRig) -> None:
    """The SDK truncates axis speeds to whole µm/s: 3 µm at 1.9 µm/s runs at 1 µm/s and takes
    3 s. The deadline counts that (it used to count 1.9 µm/s: 2.4 s plus the margin, and the
    move was failed and stopped on its way)."""
    m = rig.open(2)
    m.completion_margin_s = 0.3
    start = rig.sim.position_um(2)
    h = m.move_to(start + np.array([3.0, 0.0, 0.0]), 1.9)
    assert h.wait(10.0).state is MoveState.DONE
    assert np.allclose(rig.sim.position_um(2), start + np.array([3.0, 0.0, 0.0]), atol=0.5)


def test_the_sdk_axis_speeds_are_whole_um_per_s_shares_of_at_least_one() -> None:
    from manipulators.sensapex import sdk_axis_speeds_um_s, sdk_duration_s

    assert sdk_axis_speeds_um_s(np.array([100.0, 15.0, 0.0]), 20.0).tolist() == [19.0, 2.0]
    assert sdk_duration_s(np.array([100.0, 15.0, 0.0]), 20.0) == pytest.approx(7.5)  # y: 15 µm at 2 µm/s
    assert sdk_duration_s(np.array([40.0, 0.0, 0.0]), 1.9) == pytest.approx(40.0)
    assert sdk_axis_speeds_um_s(np.array([0.05, 0.0, 0.0]), 20.0).size == 0 and sdk_duration_s(np.zeros(3), 5.0) == 0.0
    # as the SDK: the norm over every axis (a 1 nm read-back residual makes a 2 µm/s share
    # 1.99999 -> 1 µm/s), and an axis within its 0.5 µm retry threshold does not move
    assert sdk_axis_speeds_um_s(np.array([100.0, -0.001, 0.0]), 2.0).tolist() == [1.0]
    assert sdk_duration_s(np.array([100.0, -0.001, 0.0]), 2.0) == pytest.approx(100.0)
    assert sdk_axis_speeds_um_s(np.array([10.0, 0.3, 0.0]), 1.2).tolist() == [1.0]


def test_the_axis_speeds_are_those_the_vendor_sdk_computes() -> None:
    """Checked against sensapex's own MoveRequest (its position read and device stubbed)."""
    from sensapex.sensapex import MoveRequest

    from manipulators.sensapex import sdk_axis_speeds_um_s

    class Ump:
        default_max_accelerations = {1: None}

    for start, target, speed in (([1000.0, 2000.001, 3000.0], [1100.0, 2000.0, 3000.0], 2.0),
                                 ([0.0, 0.0, 0.0], [100.0, 15.0, 0.0], 20.0),
                                 ([5.0, 5.0, 5.0], [17.0, 5.3, 9.0], 7.5)):
        request = MoveRequest.__new__(MoveRequest)
        request._read_position = lambda start=start: list(start)  # noqa: B023
        request._movement_args = lambda acc, pos4, speeds, simultaneous: [int(x) for x in speeds]
        MoveRequest.__init__(request, Ump(), 1, target, speed, simultaneous=True, linear=True)
        sent = np.array(request._moves[0][: len(start)], float)
        diff = np.subtract(target, start)
        moving = np.abs(diff) >= 0.5
        assert sent[moving].tolist() == sdk_axis_speeds_um_s(diff, speed).tolist()


def test_error_reply_to_goto_fails_the_move_within_its_deadline(rig: SensapexRig) -> None:
    m = rig.open(2)
    m.completion_margin_s = 1.5
    start = rig.sim.position_um(2)
    rig.sim.faults.error_types.add(smcp.CMD_GOTO_POS)
    t0 = time.monotonic()
    h = m.move_to(start + X50, 1000.0)
    with pytest.raises(DeviceError) as info:
        h.wait(10)
    assert time.monotonic() - t0 < 4.0
    assert h.state is MoveState.FAILED and "'sx2'" in str(info.value)
    assert np.allclose(rig.sim.position_um(2), start)  # the device refused: nothing moved


def test_error_reply_to_stop_is_detected_as_a_device_that_keeps_moving(rig: SensapexRig) -> None:
    m = rig.open(2)
    h = m.move_to(m.position_um + np.array([400.0, 0, 0]), 400.0)
    time.sleep(0.2)
    rig.sim.faults.error_types.add(smcp.CMD_STOP)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=r"'sx2'.*kept moving after 3 STOP"):
        m.stop()
    assert time.monotonic() - t0 < 1.0
    assert h.state is MoveState.INTERRUPTED
    rig.sim.faults.error_types.clear()
    m.stop()  # once the device obeys again, stop works and is verified
    assert not rig.sim.is_moving(2)


# -- completion notifications ----------------------------------------------------------------
@pytest.mark.parametrize("fault", ["withhold_completion", "completion_before_ack"])
def test_missing_or_early_completion_finishes_about_one_second_late(rig: SensapexRig, fault: str) -> None:
    m = rig.open(2)
    target = m.position_um + X50
    t0 = time.monotonic()
    m.move_to(target, 1000.0).wait(10)
    normal_s = time.monotonic() - t0
    setattr(rig.sim.faults, fault, True)
    target2 = target - X50
    t0 = time.monotonic()
    h = m.move_to(target2, 1000.0).wait(10)
    late_s = time.monotonic() - t0
    assert h.state is MoveState.DONE
    assert np.allclose(m.position_um, target2, atol=0.1)
    assert normal_s < 0.5
    # about one second late: a load-independent lower bound (load only lengthens late_s)
    assert late_s > 0.9 and late_s - normal_s < 2.5, (normal_s, late_s)


# -- silence -----------------------------------------------------------------------------------
def test_silent_device_reads_and_moves_time_out_clearly_without_motion(rig: SensapexRig) -> None:
    m = rig.open(2)
    start = rig.sim.position_um(2)
    rig.sim.faults.silent = True
    time.sleep(0.05)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        _ = m.position_um
    assert time.monotonic() - t0 < 3.0  # bounded: never a hang or a retry storm
    assert "'sx2'" in str(info.value) and "no answer from Sensapex device 2" in str(info.value)
    with pytest.raises(DeviceTimeout):
        m.move_to(start + X50, 500.0)
    assert time.monotonic() - t0 < 6.0
    assert np.allclose(rig.sim.position_um(2), start)


def test_device_going_silent_mid_move_fails_the_move_within_its_deadline(rig: SensapexRig) -> None:
    m = rig.open(1)
    m.completion_margin_s = 1.0
    target = m.position_um + np.array([200.0, 0, 0, 0])
    h = m.move_to(target, 400.0)  # 0.5 s
    time.sleep(0.15)
    rig.sim.faults.silent_ids.add(1)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match=r"'sx1'.*did not complete within"):
        h.wait(10)
    assert time.monotonic() - t0 < 5.0  # the 0.5 s move's deadline plus its 1 s margin, with room for load
    assert h.state is MoveState.FAILED


def test_unknown_device_id_is_a_clear_error(rig: SensapexRig) -> None:
    with pytest.raises(PatchrigError, match=r"'ghost'.*device 9.*devices found: \[1, 2, 3, 4\]"):
        SensapexManipulator("ghost", LIMITS_3, 1000.0, device_id=9, address="127.0.0.1", group=rig.group)


def test_stop_all_with_one_dead_device_stops_the_others(rig: SensapexRig) -> None:
    channels = [rig.open(i) for i in (1, 2, 3)]
    handles = [m.move_to(m.position_um + np.r_[400.0, np.zeros(m.n_axes - 1)], 200.0) for m in channels]
    time.sleep(0.2)
    rig.sim.faults.silent_ids.add(3)
    t0 = time.monotonic()
    result = stop_all(channels)
    assert time.monotonic() - t0 < 3.0
    assert result["sx1"] is None and result["sx2"] is None
    assert result["sx3"] is not None and "no answer" in result["sx3"]
    assert all(h.state is MoveState.INTERRUPTED for h in handles)
    assert not rig.sim.is_moving(1) and not rig.sim.is_moving(2)


# -- final-position offset ---------------------------------------------------------------------
@pytest.mark.parametrize("device_id", [1, 2])  # 4-axis and 3-axis
def test_persistent_final_offset_fails_clearly_after_the_sdk_retries(rig: SensapexRig, device_id: int) -> None:
    m = rig.open(device_id)
    rig.sim.faults.final_offset_um = 3.0
    before = counts(rig)
    t0 = time.monotonic()
    h = m.move_to(m.position_um + np.r_[50.0, np.zeros(m.n_axes - 1)], 1000.0)
    with pytest.raises(DeviceError, match="did not reach"):
        h.wait(10)
    assert time.monotonic() - t0 < 3.0
    assert delta(rig, before, "GOTO_POS") == 5
    assert h.state is MoveState.FAILED


def test_one_time_offset_is_corrected_by_the_sdk_retry(rig: SensapexRig) -> None:
    m = rig.open(2)
    rig.sim.faults.final_offset_um = 5.0
    rig.sim.faults.final_offset_moves = 1
    before = counts(rig)
    target = m.position_um + X50
    h = m.move_to(target, 1000.0).wait(10)
    assert h.state is MoveState.DONE
    assert np.allclose(rig.sim.position_um(2), target, atol=0.01)
    assert delta(rig, before, "GOTO_POS") == 2


def test_small_offset_within_tolerance_is_reported_honestly(rig: SensapexRig) -> None:
    m = rig.open(2)
    rig.sim.faults.final_offset_um = 0.5
    target = m.position_um + X50
    h = m.move_to(target, 1000.0).wait(10)
    assert h.state is MoveState.DONE
    assert h.position_um is not None
    assert h.position_um[0] - target[0] == pytest.approx(0.5, abs=0.01)


# -- axis count ----------------------------------------------------------------------------------
def test_unanswered_axis_count_falls_back_to_the_configured_count(rig: SensapexRig) -> None:
    rig.sdk.ump._axis_counts.pop(3, None)  # make the SDK ask again
    rig.sim.faults.answer_axis_count = False
    t0 = time.monotonic()
    m = rig.open(3)
    assert 0.5 < time.monotonic() - t0 < 3.0  # one unanswered query: 3 tries of 200 ms
    assert m.n_axes == 4
    target = m.position_um + np.array([0, 0, 0, 30.0])
    m.move_to(target, 500.0).wait(10)
    assert np.allclose(m.position_um, target, atol=0.1)


# -- malformed datagrams ---------------------------------------------------------------------------
def test_garbage_datagrams_are_ignored(rig: SensapexRig) -> None:
    m = rig.open(4)
    junk = [b"", b"\x10", b"hello world, not smcp", b"\x11" + bytes(15), bytes(16)[:2] + b"\x00" * 14]
    bad_count = smcp.encode(smcp.Frame(receiver=4, sender=600, message_id=1, options=1, type=14))[:-2] + b"\x00\x05"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in [*junk, bad_count]:
            s.sendto(datagram, ("127.0.0.1", rig.sim.port))
    time.sleep(0.05)
    target = m.position_um + np.array([20.0, 0, 0])
    m.move_to(target, 500.0).wait(5)
    assert np.allclose(m.position_um, target, atol=0.1)


def test_a_dead_device_fails_fast_after_its_first_timeout_and_recovers(rig: SensapexRig) -> None:
    dead, alive = rig.open(2), rig.open(4)
    dead.lost_backoff_s = 0.5
    rig.sim.faults.silent_ids.add(2)
    time.sleep(0.05)
    with pytest.raises(DeviceTimeout, match="no answer"):
        _ = dead.position_um
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match=r"'sx2'.*not asked again"):
        _ = dead.position_um
    with pytest.raises(DeviceTimeout, match="not asked again"):
        dead.move_to([10010.0, 10000.0, 10000.0], 100.0)
    assert time.monotonic() - t0 < 0.1  # no SDK request, so the shared SDK lock stays free
    t1 = time.monotonic()
    alive.move_to(alive.position_um + np.array([10.0, 0, 0]), 1000.0).wait(5)
    assert time.monotonic() - t1 < 1.0
    time.sleep(0.55)  # back-off over, still dead: a quick ping (3 x 30 ms), not a 0.6 s request
    t2 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="still no answer.*ping"):
        _ = dead.position_um
    assert time.monotonic() - t2 < 0.3
    rig.sim.faults.silent_ids.clear()
    time.sleep(0.55)
    assert np.allclose(dead.position_um, rig.sim.position_um(2), atol=0.01)  # answered the ping: back
    target = dead.position_um + np.array([5.0, 0, 0])
    dead.move_to(target, 500.0).wait(5)
    assert np.allclose(rig.sim.position_um(2), target, atol=0.01)


def test_a_move_started_while_a_stop_is_being_verified_wins(rig: SensapexRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop (device ignoring STOP) and a newer move from another thread: the newer move owns the
    device, so the stop neither fails nor sends the STOP again that would cut that move short."""
    import threading

    m = rig.open(2)
    start = m.position_um
    m.move_to(start + np.array([400.0, 0, 0]), 400.0)
    time.sleep(0.1)
    rig.sim.faults.error_types.add(smcp.CMD_STOP)
    verifying, newer_started = threading.Event(), threading.Event()
    real_verify = m._verify_stopped

    def verify_after_the_newer_move(move_at_stop):  # type: ignore[no-untyped-def]
        verifying.set()
        assert newer_started.wait(5.0)
        real_verify(move_at_stop)

    monkeypatch.setattr(m, "_verify_stopped", verify_after_the_newer_move)
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            m.stop("operator")
        except BaseException as exc:  # reported below
            errors.append(exc)

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert verifying.wait(5.0)
    before = counts(rig)
    target = start + np.array([0.0, 60.0, 0.0])
    newer = m.move_to(target, 400.0)
    newer_started.set()
    stopper.join(5.0)
    assert not stopper.is_alive() and errors == [], errors
    assert delta(rig, before, "STOP") == 0  # no STOP after the newer move began
    newer.wait(10.0)
    assert np.allclose(m.position_um, target, atol=1.0)


# -- stop and supersession races (stop 21) ----------------------------------------------------
def test_a_stop_while_the_goto_is_being_sent_leaves_the_device_stopped(rig: SensapexRig, monkeypatch) -> None:
    """stop() finds the device idle and returns; the GOTO then reaches it. The driver must stop
    that move, which nothing else tracks."""
    import threading

    import sensapex.sensapex as sdk

    m = rig.open(2)
    start = rig.sim.position_um(2)
    real_read = sdk.MoveRequest._read_position
    sending = threading.Event()

    def slow_first_read(self):  # the SDK reads the start position before it sends the GOTO
        if not sending.is_set():
            sending.set()
            time.sleep(0.3)
        return real_read(self)

    monkeypatch.setattr(sdk.MoveRequest, "_read_position", slow_first_read)
    handles: list = []
    mover = threading.Thread(target=lambda: handles.append(m.move_to(start + np.array([300.0, 0, 0]), 500.0)))
    mover.start()
    assert sending.wait(5.0)
    m.stop("e-stop")  # answers at once: the device is idle
    mover.join(5.0)
    assert handles and handles[0].state is MoveState.INTERRUPTED
    time.sleep(0.4)  # at 500 µm/s an untracked GOTO would travel 200 µm in this time
    assert not rig.sim.is_moving(2)
    assert np.max(np.abs(rig.sim.position_um(2) - start)) < 50.0  # halted at once, not 200 µm on


def test_a_superseding_move_whose_stop_ack_is_lost_never_revives_the_old_target(rig: SensapexRig) -> None:
    m = rig.open(2)
    start = rig.sim.position_um(2)
    m.move_to(start + np.array([1000.0, 0, 0]), 500.0)
    time.sleep(0.2)
    rig.sim.faults.drop_ack_types.add(smcp.CMD_STOP)
    try:
        second = m.move_to(start + np.array([0, 50.0, 0]), 500.0)
        assert second.wait(10.0).state is MoveState.DONE
    finally:
        rig.sim.faults.drop_ack_types.clear()
    time.sleep(1.0)  # the SDK's poller would have sent the old GOTO again by now
    assert np.allclose(rig.sim.position_um(2) - start, [0.0, 50.0, 0.0], atol=0.5)


def test_a_refused_stop_during_a_slow_approach_is_an_error(rig: SensapexRig) -> None:
    """10 µm/s (a cell approach) moves 1 µm in 0.1 s: a device that ignores STOP must be caught."""
    m = rig.open(2)
    h = m.move_to(m.position_um + np.array([0, 0, 100.0]), 10.0)
    time.sleep(0.3)
    rig.sim.faults.error_types.add(smcp.CMD_STOP)
    try:
        with pytest.raises(DeviceError, match="kept moving after 3 STOP"):
            m.stop()
    finally:
        rig.sim.faults.error_types.clear()
    m.stop()
    assert h.state is MoveState.INTERRUPTED and not rig.sim.is_moving(2)


def test_a_slow_diagonal_move_that_the_sdk_would_run_faster_than_asked_is_refused(rig: SensapexRig) -> None:
    """The SDK runs each axis at least at 1 µm/s: (1, 1, 1) µm/s for a diagonal move asked at
    1.5 µm/s is 1.73 µm/s along the path. Refused before anything is sent or superseded."""
    from rig.errors import InvalidParams

    m = rig.open(2)
    start = m.position_um
    before = counts(rig)
    with pytest.raises(InvalidParams, match="faster than asked"):
        m.move_to(start + np.array([10.0, 10.0, 10.0]), 1.5)
    assert delta(rig, before, "GOTO_POS") == 0 and m.current_move is None
    h = m.move_to(start + np.array([10.0, 10.0, 10.0]), 50.0)  # the same move at a normal speed runs
    assert h.wait(10.0).state is MoveState.DONE


def test_the_simulator_reports_idle_after_a_step_that_ended_between_its_ticks(rig: SensapexRig) -> None:
    """A position query can clear a finished TAKE_STEP before the next tick; the device must
    still announce that it is idle, or the SDK's um_is_busy stays 1 for ever."""
    import ctypes

    rig.open(2)
    ump = rig.sdk.ump
    ump.take_step(2, [5.0, 0, 0], 1000)
    for _ in range(200):  # queries while the 5 ms step runs and ends
        ump.get_pos(2, timeout=-1)
        time.sleep(0.001)
    deadline = time.monotonic() + 2.0
    busy = 1
    while busy and time.monotonic() < deadline:
        time.sleep(0.02)
        with ump.lock:
            busy = ump.lib.um_is_busy(ump.h, ctypes.c_int(2))
    assert busy == 0


def _hold_stop_verification(m: SensapexManipulator, monkeypatch):  # type: ignore[no-untyped-def]
    """Make ``m.stop()`` hold after its STOP and stillness check, before the base class
    finishes the handle: returns (verified, release) events; set ``release`` to let it end."""
    import threading

    real_verify = m._verify_stopped
    verified, release = threading.Event(), threading.Event()

    def slow_verify(move_at_stop):  # type: ignore[no-untyped-def]
        real_verify(move_at_stop)
        verified.set()
        release.wait(5.0)

    monkeypatch.setattr(m, "_verify_stopped", slow_verify)
    return verified, release


def test_a_stop_between_the_goto_and_its_watch_interrupts_the_move(rig: SensapexRig, monkeypatch) -> None:
    """stop() takes the request the GOTO just registered before the driver watches it, and is
    still verifying the halt when the watcher sees the interrupted request: the move was
    stopped (INTERRUPTED), it did not fail (the CI race of stop 21)."""
    import threading

    m = rig.open(2)
    start = rig.sim.position_um(2)
    ump = m._sdk.ump
    real_goto = ump.goto_pos
    verified, release = _hold_stop_verification(m, monkeypatch)
    stoppers: list[threading.Thread] = []

    def goto_then_stop(*args, **kwargs):  # type: ignore[no-untyped-def]
        request = real_goto(*args, **kwargs)
        stoppers.append(threading.Thread(target=m.stop, args=("e-stop",)))
        stoppers[0].start()
        assert request.finished_event.wait(5.0)  # the stop interrupted it
        return request

    monkeypatch.setattr(ump, "goto_pos", goto_then_stop)
    try:
        handle = m.move_to(start + np.array([300.0, 0, 0]), 500.0)
        assert verified.wait(5.0)
        handle.wait(2.0, check=False)  # resolved by the watcher while stop() is still running
        assert handle.state is MoveState.INTERRUPTED, (handle.state, handle.reason)
        assert "e-stop" in handle.reason
    finally:
        release.set()
        for th in stoppers:
            th.join(5.0)
    assert not rig.sim.is_moving(2)


def test_a_stop_whose_stop_goes_out_before_the_goto_is_not_undone(rig: SensapexRig, monkeypatch) -> None:
    """stop() reads the new move (move_to has made it current), sends STOP to an idle device
    and is still verifying when the GOTO goes out: the driver must halt that GOTO (the move
    used to run to its target while its handle said INTERRUPTED)."""
    import threading

    m = rig.open(2)
    start = rig.sim.position_um(2)
    ump = m._sdk.ump
    real_goto = ump.goto_pos
    verified, release = _hold_stop_verification(m, monkeypatch)
    stoppers: list[threading.Thread] = []

    def stop_then_goto(*args, **kwargs):  # type: ignore[no-untyped-def]
        stoppers.append(threading.Thread(target=m.stop, args=("e-stop",)))
        stoppers[0].start()
        assert verified.wait(5.0)  # the STOP went out and found the device idle
        return real_goto(*args, **kwargs)

    monkeypatch.setattr(ump, "goto_pos", stop_then_goto)
    try:
        handle = m.move_to(start + np.array([300.0, 0, 0]), 500.0)
    finally:
        release.set()
        for th in stoppers:
            th.join(5.0)
    handle.wait(2.0, check=False)
    assert handle.state is MoveState.INTERRUPTED, (handle.state, handle.reason)
    time.sleep(0.4)  # at 500 µm/s an untracked GOTO would travel 200 µm in this time
    assert not rig.sim.is_moving(2)
    assert np.max(np.abs(rig.sim.position_um(2) - start)) < 50.0


def test_a_move_timeout_never_stops_the_move_that_superseded_it(rig: SensapexRig, monkeypatch) -> None:
    """The watcher gives up on a move (deadline passed) just as a newer move is sent: its
    timeout STOP must not halt the newer move, which runs to its target."""
    import threading

    m = rig.open(2)
    start = rig.sim.position_um(2)
    real_where = m._where
    resolving, newer_sent = threading.Event(), threading.Event()

    def where_as_the_newer_move_is_sent():  # type: ignore[no-untyped-def]
        # the watcher names the device in its timeout error, before it sends the STOP
        if threading.current_thread() is not threading.main_thread() and not resolving.is_set():
            resolving.set()
            newer_sent.wait(5.0)
        return real_where()

    monkeypatch.setattr(m, "_where", where_as_the_newer_move_is_sent)
    first = m.move_to(start + np.array([1500.0, 0, 0]), 100.0)
    time.sleep(0.05)
    with m._sdk._cond:
        m._sdk._pending[m.device_id].deadline_s = 0.0  # the first move times out now
    assert resolving.wait(5.0)
    target = start + np.array([0, 300.0, 0])
    second = m.move_to(target, 500.0)
    newer_sent.set()
    second.wait(10.0, check=False)
    assert second.state is MoveState.DONE, (second.state, second.reason)
    assert first.state is MoveState.INTERRUPTED and first.reason == "superseded"
    assert np.allclose(rig.sim.position_um(2)[:3], target[:3], atol=1.0)
