"""The one contract suite every manipulator backend passes.

Use it by subclassing ``ManipulatorContract`` in a ``test_contract_<backend>.py`` file and
providing two fixtures there:

- ``manipulator``: a fresh, open channel (3 or 4 axes) whose soft limits leave at least
  ``travel_um`` of room around its start position on every axis; closed after the test.
- ``make_manipulators``: a callable ``n -> list[Manipulator]`` giving ``n`` (up to 4) distinct,
  open channels; the fixture closes them after the test.

Class attributes tune the suite to a backend's speed (all in µm, µm/s and s):
``tolerance_um`` (how close a finished move must be to its target), ``speed_um_s`` (the speed of
ordinary test moves, must be <= the channel's ``max_speed_um_s``), ``slow_speed_um_s`` (for moves
that must still be running when they are stopped or superseded), ``travel_um`` (move length),
``settle_s`` (how long a rejected move is watched for unwanted motion) and ``move_timeout_s``
(a generous bound that only catches hangs).

Everything asserts real behaviour through the public ``Manipulator`` interface: read-backs,
handle states, errors. Nothing here knows which backend it drives.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from manipulators.base import Manipulator, MoveHandle, MoveState
from rig.errors import InvalidParams, OutOfBounds, PatchrigError, Stopped


def target_inside(m: Manipulator, offset_um: float, axes: list[int] | None = None) -> np.ndarray:
    """A target ``offset_um`` away from the current position on ``axes`` (default: all),
    stepping toward the middle of each axis's limits so that it stays inside them."""
    start = m.position_um
    target = start.copy()
    for axis in axes if axes is not None else range(m.n_axes):
        mid = 0.5 * (m.limits.min_um[axis] + m.limits.max_um[axis])
        sign = 1.0 if start[axis] <= mid else -1.0
        target[axis] = start[axis] + sign * offset_um
    m.limits.check(target.tolist(), channel=m.name)
    return target


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def assert_not_moved(m: Manipulator, before_um: np.ndarray, settle_s: float, tolerance_um: float) -> None:
    """The channel stays where it was (within tolerance) and idle for ``settle_s``."""
    time.sleep(settle_s)
    after = m.position_um
    assert np.allclose(after, before_um, atol=tolerance_um), f"moved from {before_um} to {after}"
    assert not m.is_busy()


class ManipulatorContract:
    """Behaviour every backend must show. Subclasses provide the two fixtures (see module doc)."""

    tolerance_um: float = 1.0
    speed_um_s: float = 800.0
    slow_speed_um_s: float = 150.0
    travel_um: float = 60.0
    settle_s: float = 0.15
    move_timeout_s: float = 15.0

    # -- identity and read-back ----------------------------------------------------------
    def test_describe_is_json_and_names_channel(self, manipulator: Manipulator) -> None:
        d = manipulator.describe()
        json.dumps(d)  # JSON-able
        assert d["name"] == manipulator.name
        assert d["n_axes"] == manipulator.n_axes == manipulator.limits.n_axes
        assert d["max_speed_um_s"] == manipulator.max_speed_um_s
        assert d["driver"] not in ("", "abstract")

    def test_position_is_finite_with_one_value_per_axis(self, manipulator: Manipulator) -> None:
        pos = manipulator.position_um
        assert pos.shape == (manipulator.n_axes,)
        assert np.all(np.isfinite(pos))
        assert not manipulator.is_busy()

    # -- moves ---------------------------------------------------------------------------
    def test_move_reaches_target_within_tolerance(self, manipulator: Manipulator) -> None:
        target = target_inside(manipulator, self.travel_um)
        handle = manipulator.move_to(target, self.speed_um_s)
        handle.wait(self.move_timeout_s)
        assert handle.state is MoveState.DONE
        assert handle.position_um is not None
        assert np.allclose(handle.position_um, target, atol=self.tolerance_um)
        assert np.allclose(manipulator.position_um, target, atol=self.tolerance_um)
        assert not manipulator.is_busy()

    def test_a_done_callback_that_raises_does_not_break_the_channel(self, manipulator: Manipulator) -> None:
        """A caller's bug in a done-callback runs on the backend's own thread: it is logged, and
        the next moves still finish (it used to end the simulated backend's worker)."""
        first = manipulator.move_to(target_inside(manipulator, self.travel_um / 2), self.speed_um_s)

        def broken(_handle: MoveHandle) -> None:
            raise RuntimeError("a bug in the caller's callback")

        first.add_done_callback(broken)
        assert first.wait(self.move_timeout_s).state is MoveState.DONE
        target = target_inside(manipulator, self.travel_um)
        second = manipulator.move_to(target, self.speed_um_s)
        second.add_done_callback(broken)
        assert second.wait(self.move_timeout_s).state is MoveState.DONE
        assert np.allclose(manipulator.position_um, target, atol=self.tolerance_um)

    def test_single_axis_move_leaves_other_axes_alone(self, manipulator: Manipulator) -> None:
        start = manipulator.position_um
        target = target_inside(manipulator, self.travel_um, axes=[manipulator.n_axes - 1])
        manipulator.move_to(target, self.speed_um_s).wait(self.move_timeout_s)
        pos = manipulator.position_um
        assert np.allclose(pos[:-1], start[:-1], atol=self.tolerance_um)
        assert pos[-1] == pytest.approx(target[-1], abs=self.tolerance_um)

    def test_move_handle_fields(self, manipulator: Manipulator) -> None:
        target = target_inside(manipulator, self.travel_um / 2)
        handle = manipulator.move_to(target.tolist(), self.speed_um_s)
        assert isinstance(handle, MoveHandle)
        assert handle.channel == manipulator.name
        assert np.array_equal(handle.setpoint_um, target)
        assert handle.speed_um_s == pytest.approx(self.speed_um_s)
        assert manipulator.current_move is handle
        assert handle.wait(self.move_timeout_s) is handle
        assert handle.done and not handle.interrupted
        assert handle.reason is None and handle.error is None
        summary = handle.as_dict()
        json.dumps(summary)
        assert summary["state"] == "done"
        assert summary["channel"] == manipulator.name
        assert summary["setpoint_um"] == pytest.approx(target.tolist())
        assert summary["seconds"] > 0
        assert handle.finished_s is not None and handle.finished_s >= handle.started_s

    def test_move_is_not_faster_than_the_requested_speed(self, manipulator: Manipulator) -> None:
        """The speed limit holds: a move cannot arrive sooner than distance / speed (path speed,
        so a diagonal move must not run each axis at full speed)."""
        start = manipulator.position_um
        target = target_inside(manipulator, self.slow_speed_um_s * 0.5)  # all axes: diagonal
        handle = manipulator.move_to(target, self.slow_speed_um_s).wait(self.move_timeout_s)
        assert handle.finished_s is not None
        distance_um = float(np.linalg.norm(target - start))
        assert handle.finished_s - handle.started_s >= 0.9 * distance_um / self.slow_speed_um_s

    def test_default_speed_is_used_when_none_given(self, manipulator: Manipulator) -> None:
        target = target_inside(manipulator, self.travel_um / 4)
        handle = manipulator.move_to(target)
        assert handle.speed_um_s == pytest.approx(manipulator.default_speed_um_s)
        handle.wait(self.move_timeout_s)
        assert np.allclose(manipulator.position_um, target, atol=self.tolerance_um)

    def test_move_to_current_position_finishes_done(self, manipulator: Manipulator) -> None:
        here = manipulator.position_um
        handle = manipulator.move_to(here, self.speed_um_s).wait(self.move_timeout_s)
        assert handle.state is MoveState.DONE
        assert np.allclose(manipulator.position_um, here, atol=self.tolerance_um)

    def test_done_callback_runs_once(self, manipulator: Manipulator) -> None:
        calls: list[MoveState] = []
        handle = manipulator.move_to(target_inside(manipulator, self.travel_um / 4), self.speed_um_s)
        handle.add_done_callback(lambda h: calls.append(h.state))
        handle.wait(self.move_timeout_s)
        assert wait_until(lambda: len(calls) == 1, 2.0)
        time.sleep(0.05)
        assert calls == [MoveState.DONE]

    # -- rejected input: clear error naming the channel, nothing moves --------------------
    @pytest.mark.parametrize("side", ["above_max", "below_min"])
    def test_out_of_limits_target_rejected_without_motion(self, manipulator: Manipulator, side: str) -> None:
        before = manipulator.position_um
        previous = manipulator.current_move
        for axis in range(manipulator.n_axes):
            target = before.copy()
            if side == "above_max":
                target[axis] = manipulator.limits.max_um[axis] + 1.0
            else:
                target[axis] = manipulator.limits.min_um[axis] - 1.0
            with pytest.raises(OutOfBounds) as info:
                manipulator.move_to(target, self.speed_um_s)
            assert manipulator.name in str(info.value)
            assert f"axis {axis}" in str(info.value)
            assert info.value.code == "out_of_bounds"
        assert manipulator.current_move is previous
        assert_not_moved(manipulator, before, self.settle_s, self.tolerance_um)

    @pytest.mark.parametrize(
        "bad",
        [
            pytest.param("nan", id="nan"),
            pytest.param("inf", id="inf"),
            pytest.param("-inf", id="-inf"),
            pytest.param("too_few_axes", id="too_few_axes"),
            pytest.param("too_many_axes", id="too_many_axes"),
            pytest.param("not_numbers", id="not_numbers"),
        ],
    )
    def test_malformed_target_rejected_without_motion(self, manipulator: Manipulator, bad: str) -> None:
        before = manipulator.position_um
        target: object
        if bad in ("nan", "inf", "-inf"):
            t = before.copy()
            t[0] = float(bad)
            target = t
        elif bad == "too_few_axes":
            target = before[:-1]
        elif bad == "too_many_axes":
            target = np.append(before, 0.0)
        else:
            target = ["a"] * manipulator.n_axes
        with pytest.raises(InvalidParams) as info:
            manipulator.move_to(target, self.speed_um_s)  # type: ignore[arg-type]
        assert manipulator.name in str(info.value)
        assert info.value.code == "invalid_params"
        assert_not_moved(manipulator, before, self.settle_s, self.tolerance_um)

    @pytest.mark.parametrize("speed", [0.0, -1.0, -500.0, math.nan, math.inf, "fast"])
    def test_bad_speed_rejected_without_motion(self, manipulator: Manipulator, speed: object) -> None:
        before = manipulator.position_um
        target = target_inside(manipulator, self.travel_um)
        with pytest.raises(InvalidParams) as info:
            manipulator.move_to(target, speed)  # type: ignore[arg-type]
        assert manipulator.name in str(info.value)
        assert_not_moved(manipulator, before, self.settle_s, self.tolerance_um)

    def test_speed_above_channel_maximum_rejected(self, manipulator: Manipulator) -> None:
        before = manipulator.position_um
        target = target_inside(manipulator, self.travel_um)
        with pytest.raises(InvalidParams, match="maximum"):
            manipulator.move_to(target, manipulator.max_speed_um_s * 1.01)
        assert_not_moved(manipulator, before, self.settle_s, self.tolerance_um)

    # -- stop and supersession ------------------------------------------------------------
    def _slow_move(self, m: Manipulator, duration_s: float = 2.0) -> tuple[np.ndarray, np.ndarray, MoveHandle]:
        start = m.position_um
        target = target_inside(m, self.slow_speed_um_s * duration_s)
        return start, target, m.move_to(target, self.slow_speed_um_s)

    def test_stop_interrupts_mid_move(self, manipulator: Manipulator) -> None:
        start, target, handle = self._slow_move(manipulator)
        assert wait_until(lambda: np.linalg.norm(manipulator.position_um - start) > 5.0, 3.0), "never moved"
        t0 = time.monotonic()
        manipulator.stop()
        assert handle.done, "stop() returned before the running move was finished"
        assert time.monotonic() - t0 < 2.0
        assert handle.state is MoveState.INTERRUPTED
        assert handle.reason == "stop"
        with pytest.raises(Stopped):
            handle.wait(0.1)
        assert wait_until(lambda: not manipulator.is_busy(), 2.0)
        stopped_at = manipulator.position_um
        travelled = np.linalg.norm(stopped_at - start)
        assert 5.0 < travelled < np.linalg.norm(target - start) - 5.0, "not stopped mid-way"
        assert_not_moved(manipulator, stopped_at, 0.3, self.tolerance_um)

    def test_move_after_stop_works(self, manipulator: Manipulator) -> None:
        _start, _target, handle = self._slow_move(manipulator)
        time.sleep(0.2)
        manipulator.stop()
        assert handle.interrupted
        wait_until(lambda: not manipulator.is_busy(), 2.0)
        target = target_inside(manipulator, self.travel_um / 2)
        manipulator.move_to(target, self.speed_um_s).wait(self.move_timeout_s)
        assert np.allclose(manipulator.position_um, target, atol=self.tolerance_um)

    def test_stop_when_idle_is_harmless(self, manipulator: Manipulator) -> None:
        before = manipulator.position_um
        manipulator.stop()
        manipulator.stop("again")
        assert_not_moved(manipulator, before, self.settle_s, self.tolerance_um)

    def test_a_stop_between_the_switch_and_the_send_is_not_undone(self, manipulator: Manipulator) -> None:
        """stop() from another thread after move_to made the move current, before its command
        went out: the move must never run to its target (not started, or halted again at
        once), and it ends INTERRUPTED."""
        start = manipulator.position_um
        target = target_inside(manipulator, self.travel_um)
        real_send = manipulator._do_move_to

        def stop_lands_first(target_um, speed_um_s, handle):  # type: ignore[no-untyped-def]
            stopper = threading.Thread(target=manipulator.stop, args=("e-stop",))
            stopper.start()
            stopper.join(self.move_timeout_s)
            return real_send(target_um, speed_um_s, handle)

        manipulator._do_move_to = stop_lands_first  # type: ignore[method-assign]
        try:
            handle = manipulator.move_to(target, self.slow_speed_um_s)
        finally:
            del manipulator._do_move_to
        handle.wait(self.move_timeout_s, check=False)
        assert handle.state is MoveState.INTERRUPTED, (handle.state, handle.reason)
        assert wait_until(lambda: not manipulator.is_busy(), 2.0)
        stopped_at = manipulator.position_um
        assert np.linalg.norm(stopped_at - start) < 0.5 * self.travel_um, "the stopped move ran on"
        assert_not_moved(manipulator, stopped_at, 0.3, self.tolerance_um)

    def test_a_move_sent_while_a_stop_is_on_its_way_is_halted_and_finished(self, manipulator: Manipulator) -> None:
        """stop() read the running move; a newer move went out before the STOP did. The STOP
        halts the newer move too, so it must end INTERRUPTED (never RUNNING forever)."""
        _start, far_target, first = self._slow_move(manipulator)
        second_target = far_target  # 2 s away: it cannot end DONE before the STOP reaches it
        real_stop = manipulator._do_stop
        newer: list[MoveHandle] = []

        def newer_move_first(reason: str) -> None:
            if not newer:
                mover = threading.Thread(target=lambda: newer.append(manipulator.move_to(second_target, self.slow_speed_um_s)))
                mover.start()
                mover.join(self.move_timeout_s)
            real_stop(reason)

        manipulator._do_stop = newer_move_first  # type: ignore[method-assign]
        try:
            manipulator.stop("e-stop")
        finally:
            del manipulator._do_stop
        assert newer, "the newer move was not sent"
        assert first.state is MoveState.INTERRUPTED
        newer[0].wait(self.move_timeout_s, check=False)
        assert newer[0].state is MoveState.INTERRUPTED, (newer[0].state, newer[0].reason)
        assert wait_until(lambda: not manipulator.is_busy(), 2.0)
        assert_not_moved(manipulator, manipulator.position_um, 0.3, self.tolerance_um)

    def test_new_move_supersedes_running_move(self, manipulator: Manipulator) -> None:
        start, _target, first = self._slow_move(manipulator)
        assert wait_until(lambda: np.linalg.norm(manipulator.position_um - start) > 2.0, 3.0)
        second_target = start.copy()
        second = manipulator.move_to(second_target, self.speed_um_s)
        assert first.done and first.state is MoveState.INTERRUPTED
        assert first.reason == "superseded"
        second.wait(self.move_timeout_s)
        assert second.state is MoveState.DONE
        assert manipulator.current_move is second
        assert np.allclose(manipulator.position_um, second_target, atol=self.tolerance_um)

    def test_concurrent_move_calls_leave_one_winner(self, manipulator: Manipulator) -> None:
        """Moves issued from several threads at once: exactly one ends DONE (the last one
        started), every other one ends superseded, and the device ends at the winner's target."""
        # slow and long enough (0.2 s or more) that no move can finish before the others start
        targets = [target_inside(manipulator, f * self.travel_um) for f in (0.5, 0.67, 0.83, 1.0)]
        handles: list[MoveHandle] = []
        lock = threading.Lock()
        barrier = threading.Barrier(len(targets))

        def go(t: np.ndarray) -> None:
            barrier.wait()
            h = manipulator.move_to(t, self.slow_speed_um_s)
            with lock:
                handles.append(h)

        threads = [threading.Thread(target=go, args=(t,)) for t in targets]
        for th in threads:
            th.start()
        for th in threads:
            th.join(self.move_timeout_s)
        assert len(handles) == len(targets)
        winner = manipulator.current_move
        assert winner in handles
        winner.wait(self.move_timeout_s)
        for h in handles:
            assert h.done
            if h is not winner:
                assert h.state is MoveState.INTERRUPTED and h.reason == "superseded"
        assert winner.state is MoveState.DONE
        assert np.allclose(manipulator.position_um, winner.setpoint_um, atol=self.tolerance_um)

    def test_moves_stops_and_reads_from_many_threads_never_deadlock(self, manipulator: Manipulator) -> None:
        """One channel hammered for a second by a mover, a stopper and a reader: no deadlock,
        no unexpected error, every handle finishes, and the channel ends idle and usable."""
        targets = [target_inside(manipulator, d) for d in (5.0, 15.0, 25.0)]
        handles: list[MoveHandle] = []
        errors: list[BaseException] = []
        stop_at = time.monotonic() + 1.0

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    while time.monotonic() < stop_at:
                        fn()
                except BaseException as exc:  # reported below
                    errors.append(exc)

            return run

        def move() -> None:
            handles.append(manipulator.move_to(targets[len(handles) % len(targets)], self.speed_um_s))
            time.sleep(0.02)

        def stop() -> None:
            manipulator.stop("hammer")
            time.sleep(0.05)

        def read() -> None:
            assert manipulator.position_um.shape == (manipulator.n_axes,)
            manipulator.is_busy()
            time.sleep(0.005)

        threads = [threading.Thread(target=guarded(f)) for f in (move, stop, read)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(self.move_timeout_s)
        assert not any(th.is_alive() for th in threads), "deadlock"
        assert errors == [], [repr(e) for e in errors]
        assert handles
        manipulator.stop()
        for h in handles:
            h.wait(self.move_timeout_s, check=False)
            assert h.state in (MoveState.DONE, MoveState.INTERRUPTED), (h.state, h.reason)
        assert wait_until(lambda: not manipulator.is_busy(), 3.0)
        target = target_inside(manipulator, 10.0)
        manipulator.move_to(target, self.speed_um_s).wait(self.move_timeout_s)
        assert np.allclose(manipulator.position_um, target, atol=self.tolerance_um)

    # -- several channels ------------------------------------------------------------------
    def test_four_channels_move_concurrently(self, make_manipulators: Callable[[int], list[Manipulator]]) -> None:
        channels = make_manipulators(4)
        assert len({m.name for m in channels}) == 4
        duration_s = 0.6
        targets = [target_inside(m, self.speed_um_s * duration_s) for m in channels]
        handles = [m.move_to(t, self.speed_um_s) for m, t in zip(channels, targets, strict=True)]
        for h in handles:
            h.wait(self.move_timeout_s)
        for m, h, t in zip(channels, handles, targets, strict=True):
            assert h.state is MoveState.DONE
            assert np.allclose(m.position_um, t, atol=self.tolerance_um)
        # the four moves overlapped in time: every one started before any one finished
        assert max(h.started_s for h in handles) < min(h.finished_s or 0.0 for h in handles)

    def test_stopping_one_channel_leaves_the_others_moving(
        self, make_manipulators: Callable[[int], list[Manipulator]]
    ) -> None:
        a, b = make_manipulators(2)
        _sa, _ta, ha = self._slow_move(a, 1.0)
        _sb, tb, hb = self._slow_move(b, 1.0)
        time.sleep(0.2)
        a.stop()
        assert ha.interrupted
        assert not hb.done
        hb.wait(self.move_timeout_s)
        assert hb.state is MoveState.DONE
        assert np.allclose(b.position_um, tb, atol=self.tolerance_um)

    def test_errors_are_patchrig_errors(self, manipulator: Manipulator) -> None:
        with pytest.raises(PatchrigError):
            manipulator.move_to([math.nan] * manipulator.n_axes, self.speed_um_s)
