"""The manipulator contract suite against the in-process simulated backend (with a world)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from support_manipulators import ManipulatorContract

from manipulators.base import Limits, Manipulator
from manipulators.simulated import SimulatedManipulator
from simulators.world import SimWorld

LIMITS = Limits((0.0, 0.0, 0.0), (20000.0, 20000.0, 20000.0))
LIMITS_4 = Limits((0.0,) * 4, (20000.0,) * 4)


@pytest.fixture
def make_manipulators() -> Iterator[Callable[[int], list[Manipulator]]]:
    world = SimWorld(seed=1)
    made: list[Manipulator] = []

    def make(n: int) -> list[Manipulator]:
        out: list[Manipulator] = []
        for _ in range(n):
            i = len(made)
            n_axes = 4 if i % 2 == 0 else 3
            name = f"sim{i}"
            world.add_channel(name, n_axes=n_axes, position_um=np.full(n_axes, 10000.0 + 100 * i))
            m = SimulatedManipulator(name, LIMITS_4 if n_axes == 4 else LIMITS, 2000.0, 500.0, world=world)
            made.append(m)
            out.append(m)
        return out

    yield make
    for m in made:
        m.close()


@pytest.fixture
def manipulator(make_manipulators: Callable[[int], list[Manipulator]]) -> Manipulator:
    return make_manipulators(1)[0]


class TestSimulatedContract(ManipulatorContract):
    tolerance_um = 1e-6


def test_world_follows_the_simulated_manipulator() -> None:
    world = SimWorld(seed=2)
    world.add_channel("A", n_axes=3, position_um=np.array([100.0, 200.0, 300.0]))
    m = SimulatedManipulator("A", LIMITS, 1000.0, world=world)
    try:
        assert np.allclose(m.position_um, [100, 200, 300])
        tip_before = world.true_tip_um("A")
        m.move_to([150.0, 200.0, 300.0], 1000.0).wait(5)
        assert np.allclose(world.manipulator_position_um("A"), [150, 200, 300])
        assert not np.allclose(world.true_tip_um("A"), tip_before)
    finally:
        m.close()


def test_world_sees_intermediate_positions_while_moving() -> None:
    world = SimWorld(seed=3)
    world.add_channel("A", n_axes=3, position_um=np.zeros(3))
    m = SimulatedManipulator("A", LIMITS, 1000.0, world=world)
    try:
        h = m.move_to([300.0, 0.0, 0.0], 500.0)
        seen: list[float] = []
        while not h.done:
            seen.append(float(world.manipulator_position_um("A")[0]))
            h._event.wait(0.02)
        h.wait(1)
        intermediate = [x for x in seen if 1.0 < x < 299.0]
        assert len(intermediate) >= 5, seen
        assert seen == sorted(seen)
    finally:
        m.close()


def test_move_duration_follows_speed_and_acceleration() -> None:
    m = SimulatedManipulator("A", LIMITS, 1000.0, acceleration_um_s2=2000.0, initial_position_um=[0, 0, 0])
    try:
        h = m.move_to([400.0, 0.0, 0.0], 400.0).wait(5)
        # trapezoid: 2 * v / a ramps + (L - v^2/a) / v cruise = 0.4 + 0.92 = 1.2 s
        seconds = h.as_dict()["seconds"]
        assert 1.15 < seconds < 1.6
    finally:
        m.close()


def test_initial_position_defaults_to_middle_of_limits_without_world() -> None:
    m = SimulatedManipulator("A", Limits((0.0, -10.0, 0.0), (100.0, 10.0, 50.0)), 100.0)
    try:
        assert np.allclose(m.position_um, [50.0, 0.0, 25.0])
        assert m.describe()["driver"] == "simulated"
    finally:
        m.close()


def test_bad_construction_is_rejected() -> None:
    with pytest.raises(ValueError, match="acceleration"):
        SimulatedManipulator("A", LIMITS, 100.0, acceleration_um_s2=0.0)
    with pytest.raises(ValueError, match="3 finite axes"):
        SimulatedManipulator("A", LIMITS, 100.0, initial_position_um=[0.0, 0.0])
    with pytest.raises(ValueError, match="max_speed"):
        SimulatedManipulator("A", LIMITS, 0.0)


def test_move_after_close_is_a_clear_error() -> None:
    m = SimulatedManipulator("A", LIMITS, 100.0)
    m.close()
    m.close()  # idempotent
    from rig.errors import DeviceError

    with pytest.raises(DeviceError, match="'A'.*closed"):
        m.move_to([1.0, 1.0, 1.0], 10.0)


def test_close_from_a_done_callback_does_not_deadlock() -> None:
    m = SimulatedManipulator("A", LIMITS, 1000.0, initial_position_um=[0, 0, 0])
    h = m.move_to([5.0, 0.0, 0.0], 1000.0)
    h.add_done_callback(lambda _h: m.close())
    h.wait(5)
    from support_manipulators import wait_until

    assert wait_until(lambda: m._worker is None, 2.0)
    m.close()
