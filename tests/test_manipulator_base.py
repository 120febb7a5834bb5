"""The Manipulator interface itself: Limits, MoveHandle, validation, stop and stop_all."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from manipulators.base import Limits, Manipulator, MoveHandle, MoveState, stop_all
from manipulators.simulated import SimulatedManipulator
from rig.errors import DeviceError, DeviceTimeout, InvalidParams, OutOfBounds, Stopped

LIMITS = Limits((0.0, 0.0, 0.0), (100.0, 100.0, 100.0))


# -- Limits ---------------------------------------------------------------------------------
def test_limits_contain_inclusive_bounds() -> None:
    assert LIMITS.n_axes == 3
    assert LIMITS.contains([0.0, 100.0, 50.0])
    assert not LIMITS.contains([0.0, 100.1, 50.0])
    LIMITS.check([0.0, 0.0, 100.0])


def test_limits_check_names_axis_and_channel() -> None:
    with pytest.raises(OutOfBounds, match=r"channel 'A': axis 2 target 101.000 µm outside limits \[0.000, 100.000\]"):
        LIMITS.check([1.0, 1.0, 101.0], channel="A")
    with pytest.raises(OutOfBounds, match="axis 0"):
        LIMITS.check([-0.001, 1.0, 1.0])


@pytest.mark.parametrize(
    ("lo", "hi"),
    [((0.0, 0.0), (1.0,)), ((1.0,), (1.0,)), ((2.0,), (1.0,)), ((math.nan,), (1.0,)), ((0.0,), (math.inf,))],
)
def test_invalid_limits_are_refused(lo: tuple, hi: tuple) -> None:
    with pytest.raises(ValueError):
        Limits(lo, hi)


# -- MoveHandle --------------------------------------------------------------------------------
def test_handle_finishes_exactly_once_and_runs_callbacks() -> None:
    h = MoveHandle("A", np.array([1.0, 2.0, 3.0]), 10.0)
    seen: list[MoveState] = []
    h.add_done_callback(lambda x: seen.append(x.state))
    assert not h.done and h.state is MoveState.RUNNING
    assert h.as_dict()["position_um"] is None
    assert h.finish(MoveState.DONE, position_um=[1.0, 2.0, 3.0])
    assert not h.finish(MoveState.INTERRUPTED, reason="late")
    assert h.state is MoveState.DONE and seen == [MoveState.DONE]
    h.add_done_callback(lambda x: seen.append(x.state))  # already done: called at once
    assert seen == [MoveState.DONE, MoveState.DONE]
    d = h.as_dict()
    json.dumps(d)
    assert d["position_um"] == [1.0, 2.0, 3.0] and d["state"] == "done"


def test_handle_setpoint_is_a_copy() -> None:
    target = np.array([1.0, 2.0])
    h = MoveHandle("A", target, 1.0)
    target[0] = 99.0
    assert h.setpoint_um[0] == 1.0


def test_handle_wait_raises_on_timeout_interrupt_and_failure() -> None:
    h = MoveHandle("A", np.zeros(3), 1.0)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="not finished after 0.05 s"):
        h.wait(0.05)
    assert time.monotonic() - t0 < 1.0
    h.finish(MoveState.INTERRUPTED, reason="stop")
    with pytest.raises(Stopped, match="'A'.*interrupted: stop"):
        h.wait(1)
    assert h.wait(1, check=False) is h
    failed = MoveHandle("B", np.zeros(3), 1.0)
    failed.finish(MoveState.FAILED, reason="x", error=DeviceTimeout("gone", channel="B"))
    with pytest.raises(DeviceTimeout, match="gone"):
        failed.wait(1)


def test_handle_wait_from_many_threads() -> None:
    h = MoveHandle("A", np.zeros(3), 1.0)
    results: list[MoveState] = []
    threads = [threading.Thread(target=lambda: results.append(h.wait(5).state)) for _ in range(5)]
    for t in threads:
        t.start()
    h.finish(MoveState.DONE)
    for t in threads:
        t.join(5)
    assert results == [MoveState.DONE] * 5


# -- test doubles for the template hooks ---------------------------------------------------------
class SlowStartManipulator(Manipulator):
    """A backend whose move start blocks (e.g. a slow serial line) and whose stop can hang."""

    driver_name = "test-double"

    def __init__(self, name: str, start_s: float = 0.0, stop_s: float = 0.0, stop_error: bool = False):
        super().__init__(name, LIMITS, 100.0)
        self.start_s, self.stop_s, self.stop_error = start_s, stop_s, stop_error
        self.stops: list[str] = []

    def _do_move_to(self, target_um: np.ndarray, speed_um_s: float, handle: MoveHandle) -> None:
        time.sleep(self.start_s)

    def _do_stop(self, reason: str) -> None:
        time.sleep(self.stop_s)
        self.stops.append(reason)
        if self.stop_error:
            raise DeviceTimeout("no answer", channel=self.name)

    def _do_read_position_um(self) -> Sequence[float]:
        return [0.0, 0.0, 0.0]

    def _do_is_busy(self) -> bool:
        return False

    def close(self) -> None:
        pass


class BrokenManipulator(SlowStartManipulator):
    def _do_move_to(self, target_um: np.ndarray, speed_um_s: float, handle: MoveHandle) -> None:
        raise KeyError("backend bug")


def test_stop_never_waits_behind_a_move_start() -> None:
    m = SlowStartManipulator("slow", start_s=1.0)
    mover = threading.Thread(target=m.move_to, args=([1.0, 1.0, 1.0], 10.0))
    mover.start()
    time.sleep(0.1)  # move_to now holds the move lock inside _do_move_to
    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 0.3
    assert m.stops == ["stop"]
    mover.join(5)


def test_backend_bug_fails_the_handle_and_raises_a_device_error() -> None:
    m = BrokenManipulator("broken")
    with pytest.raises(DeviceError, match="'broken'.*backend bug"):
        m.move_to([1.0, 1.0, 1.0], 10.0)
    assert m.current_move is not None and m.current_move.state is MoveState.FAILED


def test_default_speed_is_capped_by_the_maximum() -> None:
    m = SlowStartManipulator("s")
    assert m.default_speed_um_s == 100.0
    assert m.validate_speed(None) == 100.0
    assert m.validate_speed(50) == 50.0
    m.default_speed_um_s = 10_000.0  # however it got there, the default is checked like any speed
    with pytest.raises(InvalidParams, match="above the channel maximum"):
        m.validate_speed(None)


# -- stop_all ----------------------------------------------------------------------------------
def test_stop_all_of_nothing() -> None:
    assert stop_all([]) == {}


def test_stop_all_runs_in_parallel_with_one_dead_device() -> None:
    live = [SimulatedManipulator(f"L{i}", LIMITS, 100.0, initial_position_um=[0, 0, 0]) for i in range(3)]
    dead = SlowStartManipulator("dead", stop_s=1.0, stop_error=True)
    try:
        handles = [m.move_to([90.0, 0.0, 0.0], 50.0) for m in live]
        time.sleep(0.1)
        t0 = time.monotonic()
        result = stop_all([dead, *live])
        elapsed = time.monotonic() - t0
        assert elapsed < 1.6  # one slow stop, not four in a row
        assert result == {"dead": "channel 'dead': no answer", "L0": None, "L1": None, "L2": None}
        for h in handles:
            assert h.state is MoveState.INTERRUPTED and h.reason == "stop_all"
            assert h.finished_s is not None and h.finished_s - t0 < 0.5, "a live channel waited for the dead one"
        assert all(not m.is_busy() for m in live)
        assert dead.stops == ["stop_all"]
    finally:
        for m in live:
            m.close()


def test_stop_all_many_times_from_many_threads_is_safe() -> None:
    chans = [SimulatedManipulator(f"C{i}", LIMITS, 100.0, initial_position_um=[0, 0, 0]) for i in range(4)]
    try:
        for m in chans:
            m.move_to([80.0, 80.0, 80.0], 100.0)
        threads = [threading.Thread(target=stop_all, args=(chans,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert all(m.current_move is not None and m.current_move.interrupted for m in chans)
        positions = [m.position_um for m in chans]
        time.sleep(0.1)
        assert all(np.array_equal(p, m.position_um) for p, m in zip(positions, chans, strict=True))
    finally:
        for m in chans:
            m.close()


@pytest.mark.parametrize(
    "target",
    [[True, 1.0, 2.0], ["1", "2", "3"], [1.0, None, 2.0], [[1.0, 2.0], [3.0]], "123", None],
    ids=["bool", "numeric_strings", "none", "ragged", "string", "nothing"],
)
def test_targets_that_are_not_numbers_are_rejected_before_anything_moves(target: object) -> None:
    from rig.errors import InvalidParams

    m = SimulatedManipulator("Q", Limits((-100.0,) * 3, (100.0,) * 3), 500.0)
    try:
        with pytest.raises(InvalidParams, match="channel 'Q'"):
            m.move_to(target, 100.0)  # type: ignore[arg-type]
        assert m.current_move is None
    finally:
        m.close()


@pytest.mark.parametrize("speed", [True, "100", b"100"])
def test_speeds_that_are_not_numbers_are_rejected(speed: object) -> None:
    from rig.errors import InvalidParams

    m = SimulatedManipulator("Q", Limits((-100.0,) * 3, (100.0,) * 3), 500.0)
    try:
        with pytest.raises(InvalidParams, match="not a number"):
            m.move_to([1.0, 2.0, 3.0], speed)  # type: ignore[arg-type]
        assert m.current_move is None
        m.move_to([1.0, 2.0, 3.0], np.float32(100.0)).wait(5)  # numpy numbers are numbers
        m.move_to(np.array([2, 3, 4]), 50).wait(5)  # integer targets and speeds too
    finally:
        m.close()


def test_a_move_started_from_the_superseded_moves_done_callback_wins() -> None:
    """The superseded move's done-callback starts another move (the lock is re-entrant): that
    nested move is the newest and must run; the outer one, already superseded by it, must not
    be sent."""
    m = SimulatedManipulator("A", Limits((0.0,) * 3, (1000.0,) * 3), 1000.0, initial_position_um=[0.0, 0.0, 0.0])
    try:
        first = m.move_to([900.0, 0.0, 0.0], 50.0)
        nested: list[MoveHandle] = []
        first.add_done_callback(lambda _h: nested.append(m.move_to([0.0, 200.0, 0.0], 500.0)))
        outer = m.move_to([0.0, 0.0, 300.0], 500.0)
        assert nested and m.current_move is nested[0]
        assert outer.state is MoveState.INTERRUPTED and outer.reason == "superseded"
        nested[0].wait(5.0)
        assert np.allclose(m.position_um, [0.0, 200.0, 0.0], atol=1.0)
    finally:
        m.close()
