"""Channel controllers against a real simulated manipulator: a stop that lands while a move
command is on its way to the device, supersession with a device that is slow to stop (one
move, or a burst of them), and a move that outlives its operation's timeout.

The races are made deterministic by holding the device's command (or its stop) on an event,
so no test depends on timing luck.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from manipulators.base import Limits, MoveHandle
from manipulators.simulated import SimulatedManipulator
from rig.controllers import ChannelController, Operation, move_body

LIMITS = Limits((0.0, 0.0, 0.0), (1000.0, 1000.0, 1000.0))


class MoveInFlight(SimulatedManipulator):
    """Holds every move command, as if it were still on the wire, until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__("A", LIMITS, 1000.0, initial_position_um=[0.0, 0.0, 0.0])
        self.sending = threading.Event()
        self.release = threading.Event()

    def _do_move_to(self, target_um: np.ndarray, speed_um_s: float, handle: MoveHandle) -> None:
        self.sending.set()
        assert self.release.wait(10.0)
        super()._do_move_to(target_um, speed_um_s, handle)


class SlowToStop(SimulatedManipulator):
    """A device whose stop is answered only when ``answer_stop`` is set."""

    def __init__(self) -> None:
        super().__init__("A", LIMITS, 1000.0, initial_position_um=[0.0, 0.0, 0.0])
        self.stopping = threading.Event()
        self.answer_stop = threading.Event()

        self.stop_reasons: list[str] = []

    def _do_stop(self, reason: str) -> None:
        self.stop_reasons.append(reason)
        self.stopping.set()
        assert self.answer_stop.wait(10.0)
        super()._do_stop(reason)


@contextlib.contextmanager
def _controller(device: SimulatedManipulator) -> Iterator[ChannelController]:
    """A controller for channel "A" on ``device``; on exit whatever the device holds is let go
    (``release``, ``answer_stop``) and both are closed."""
    ctl = ChannelController("A", device)
    try:
        yield ctl
    finally:
        for held in ("release", "answer_stop"):
            event = getattr(device, held, None)
            if event is not None:
                event.set()
        ctl.close()
        device.close()


def _wait_until(condition: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_a_stop_that_lands_while_the_move_is_being_sent_still_leaves_the_device_stopped() -> None:
    device = MoveInFlight()
    with _controller(device) as ctl:
        ctl.note_position(device.position_um)
        op = Operation("A", "move", {}, move_body(ctl, np.array([200.0, 0.0, 0.0]), 500.0))
        ctl.submit(op)
        assert device.sending.wait(5.0)  # the move command is on its way
        # the daemon's stop: cancel the operation, halt the device from the stopper thread
        ctl.cancel_ops("stop")
        answered: list[str | None] = []
        ctl.halt_async("stop", answered.append)
        assert _wait_until(lambda: answered == [None])  # stop confirmed while the device was still
        device.release.set()  # ... and only now does the move command reach the device
        assert op.wait_finished(5.0)
        assert op.state == "stopped"
        settled = device.position_um
        time.sleep(0.3)  # at 500 µm/s a move left running would travel 150 µm in this time
        after = device.position_um
        assert np.allclose(after, settled), (settled, after)
        assert after[0] < 20.0, after  # halted within milliseconds of starting, far from the 200 µm target
        assert not device.is_busy()


def test_superseding_a_closed_loop_operation_never_waits_for_the_device_stop() -> None:
    device = SlowToStop()
    with _controller(device) as ctl:
        first = Operation("A", "calibrate", {}, lambda op: (op.sleep(30.0), {})[1])
        ctl.submit(first)
        assert _wait_until(lambda: first.state == "running")
        second_started = threading.Event()
        second = Operation("A", "move_tip", {}, lambda op: (second_started.set(), {"ok": True})[1])
        submitter = threading.Thread(target=ctl.submit, args=(second,))
        submitter.start()
        submitter.join(5.0)
        assert not submitter.is_alive()  # the caller (the server loop) did not wait for the device
        assert device.stopping.wait(5.0)  # the device's stop is under way on the stopper thread
        assert first.wait_finished(5.0) and first.state == "stopped"
        assert not second_started.wait(0.2)  # the successor waits for the device's answer
        device.answer_stop.set()
        assert second.wait_finished(5.0) and second.state == "done" and second_started.is_set()


def _move(ctl: ChannelController, x_um: float, speed_um_s: float) -> Operation:
    return Operation("A", "move", {}, move_body(ctl, np.array([x_um, 0.0, 0.0]), speed_um_s))


def test_a_burst_of_superseding_moves_and_a_stop_share_one_device_stop() -> None:
    """Joystick-style moves arriving faster than the device answers STOP: every stop asked for
    while one is under way joins the next one, so the backlog never grows, the user's stop is
    never refused, and it is answered by a STOP sent after it was asked for."""
    device = SlowToStop()
    with _controller(device) as ctl:
        ctl.note_position(device.position_um)
        first = ctl.submit(_move(ctl, 900.0, 50.0))
        assert _wait_until(device.is_busy)
        burst = [ctl.submit(_move(ctl, 100.0 + i, 500.0)) for i in range(20)]
        assert device.stopping.wait(5.0)  # the first supersession's stop is under way, held
        ctl.cancel_ops("stop")
        answered: list[str | None] = []
        ctl.halt_async("stop", answered.append)
        device.answer_stop.set()
        assert _wait_until(lambda: answered == [None])
        # the held one, then one for all the rest (plus, when the first operation was cancelled
        # while its move command was on its way, that operation's own second stop)
        assert 2 <= len(device.stop_reasons) <= 3, device.stop_reasons
        assert "stop" in device.stop_reasons[-1]
        assert all(op.wait_finished(5.0) and op.state == "stopped" for op in [first, *burst])
        assert not device.is_busy()


def test_the_newest_of_a_burst_of_moves_runs_to_its_target() -> None:
    """No stale supersession stop may cut short the move that superseded them all."""
    device = SlowToStop()
    with _controller(device) as ctl:
        ctl.note_position(device.position_um)
        ctl.submit(_move(ctl, 900.0, 50.0))
        assert _wait_until(device.is_busy)
        burst = [ctl.submit(_move(ctl, 100.0 + i, 500.0)) for i in range(20)]
        assert device.stopping.wait(5.0)
        device.answer_stop.set()
        last = burst[-1]
        assert last.wait_finished(10.0)
        assert last.state == "done", (last.state, last.error)
        assert np.allclose(device.position_um, [119.0, 0.0, 0.0], atol=0.01)
        assert all(op.state == "stopped" for op in burst[:-1])


def test_a_move_that_never_finishes_is_stopped_when_its_operation_gives_up() -> None:
    device = SimulatedManipulator("A", LIMITS, 1000.0, initial_position_um=[0.0, 0.0, 0.0])
    with _controller(device) as ctl:
        op = ctl.submit(Operation("A", "move", {}, lambda op: (
            op.start_move(lambda: device.move_to([900.0, 0.0, 0.0], 50.0), timeout_s=0.3), {})[1]))
        assert op.wait_finished(5.0)
        assert op.state == "failed" and "stop sent" in str(op.error), op.error
        assert not device.is_busy()
        settled = device.position_um
        time.sleep(0.2)  # at 50 µm/s a move left running would travel 10 µm in this time
        assert np.allclose(device.position_um, settled)


def test_a_move_asked_for_while_a_stop_is_under_way_waits_for_it() -> None:
    """The watchdog (or a user) cancels the operation and asks for a stop; a move submitted
    before the device answered that stop must start after it, not be cut short by it."""
    device = SlowToStop()
    with _controller(device) as ctl:
        ctl.note_position(device.position_um)
        first = ctl.submit(_move(ctl, 900.0, 50.0))
        assert _wait_until(device.is_busy)
        ctl.cancel_ops("stale frames")
        ctl.halt_async("stale frames")
        assert device.stopping.wait(5.0) and first.wait_finished(5.0)  # the op ended, its stop is held
        second = ctl.submit(_move(ctl, 100.0, 500.0))
        time.sleep(0.2)
        assert second.state == "queued"  # waits for the stop under way
        device.answer_stop.set()
        assert second.wait_finished(10.0) and second.state == "done", (second.state, second.error)
        assert np.allclose(device.position_um, [100.0, 0.0, 0.0], atol=0.01)


def test_a_request_still_being_checked_loses_to_a_later_stop_or_request() -> None:
    """The daemon checks some requests off its loop before it submits them (``reserve``): one
    that a stop or a newer request overtook while it was checked is dropped, never run, and
    the operation it would have superseded keeps running."""
    device = SimulatedManipulator("A", LIMITS, 1000.0, initial_position_um=[0.0, 0.0, 0.0])
    with _controller(device) as ctl:
        overtaken_by_stop = ctl.reserve()
        ctl.cancel_ops("stop")
        late = ctl.submit(_move(ctl, 100.0, 500.0), reserved=overtaken_by_stop)
        assert late.wait_finished(5.0) and late.state == "stopped" and late.started_s is None
        running = ctl.submit(_move(ctl, 900.0, 100.0))
        assert _wait_until(lambda: running.state == "running")
        older, newer = ctl.reserve(), ctl.reserve()
        second = ctl.submit(_move(ctl, 50.0, 500.0), reserved=newer)
        first = ctl.submit(_move(ctl, 10.0, 500.0), reserved=older)  # its check ended last
        assert first.wait_finished(5.0) and first.state == "stopped" and first.started_s is None
        assert second.wait_finished(5.0) and second.state == "done"
        assert running.state == "stopped"  # superseded by the newer request only
        assert device.position_um[0] == 50.0
        still_checked = ctl.reserve()
        ctl.reserve()  # a later request whose check failed: never submitted, it changes nothing
        kept = ctl.submit(_move(ctl, 20.0, 500.0), reserved=still_checked)
        assert kept.wait_finished(5.0) and kept.state == "done"
