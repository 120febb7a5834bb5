"""The manipulator contract suite against the Scientifica driver: real pyserial talking to the
simulated LinLab controller on real pseudo-terminals, for version-2 (0.1 µm, 9600 baud) and
version-3 (0.01 µm, 38400 baud) controllers, with the shared world following the moves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from support_manipulators import ManipulatorContract

from manipulators.base import Limits, Manipulator, MoveState, stop_all
from manipulators.scientifica import ScientificaManipulator
from simulators.scientifica_device import ScientificaSimulator
from simulators.world import SimWorld

LIMITS = Limits((-10000.0, -10000.0, -10000.0), (10000.0, 10000.0, 10000.0))
BAUD = {2: 9600, 3: 38400}


@pytest.fixture
def make_manipulators(request: pytest.FixtureRequest) -> Iterator[Callable[[int], list[Manipulator]]]:
    """Channels on their own simulated controllers; the class's ``version`` picks the first
    one's version and the others alternate, so a four-channel rig mixes v2 and v3."""
    first_version = getattr(request.cls, "version", 2)
    world = SimWorld(seed=5)
    sims: list[ScientificaSimulator] = []
    made: list[Manipulator] = []

    def make(n: int) -> list[Manipulator]:
        out: list[Manipulator] = []
        for _ in range(n):
            i = len(made)
            version = first_version if i % 2 == 0 else 5 - first_version
            name = f"sci{i}"
            world.add_channel(name, n_axes=3, position_um=np.array([100.0 * i, -50.0 * i, 25.0 * i]))
            sim = ScientificaSimulator(world=world, channel=name, version=version, baud=BAUD[version])
            sims.append(sim)
            port = sim.start()
            m = ScientificaManipulator(
                name, LIMITS, 2000.0, 500.0, port=port, baud=BAUD[version], expected_version=version
            )
            made.append(m)
            out.append(m)
        return out

    yield make
    for m in made:
        m.close()
    for sim in sims:
        sim.close()


@pytest.fixture
def manipulator(make_manipulators: Callable[[int], list[Manipulator]]) -> Manipulator:
    return make_manipulators(1)[0]


class TestScientificaV2Contract(ManipulatorContract):
    version = 2
    tolerance_um = 0.5


class TestScientificaV3Contract(ManipulatorContract):
    version = 3
    tolerance_um = 0.5


def test_world_follows_the_scientifica_channel() -> None:
    world = SimWorld(seed=6)
    world.add_channel("C", n_axes=3, position_um=np.array([10.0, 20.0, 30.0]))
    with ScientificaSimulator(world=world, channel="C", version=3, baud=38400) as sim:
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, baud=38400)
        try:
            assert np.allclose(m.position_um, [10, 20, 30])
            handle = m.move_to([60.0, 20.0, -5.0], 800.0)
            seen: list[float] = []
            while not handle.done:
                seen.append(float(world.manipulator_position_um("C")[0]))
                handle._event.wait(0.02)
            handle.wait(1.0)
            assert np.allclose(world.manipulator_position_um("C"), [60, 20, -5], atol=0.01)
            assert any(11.0 < x < 59.0 for x in seen), seen
        finally:
            m.close()


@pytest.mark.parametrize(("version", "baud"), [(2, 9600), (3, 38400)])
def test_moves_and_stop_at_real_line_speed(version: int, baud: int) -> None:
    """With the simulator's wire time on (about 1 ms per character at 9600 baud), moves still
    finish at their target and stop still interrupts promptly."""
    with ScientificaSimulator(version=version, baud=baud, wire_time=True) as sim:
        m = ScientificaManipulator("C", LIMITS, 1000.0, port=sim.port, baud=baud, expected_version=version)
        try:
            handle = m.move_to([30.0, -20.0, 10.0], 800.0).wait(10.0)
            assert handle.position_um is not None
            assert np.allclose(handle.position_um, [30.0, -20.0, 10.0], atol=0.5)
            handle = m.move_to([400.0, -20.0, 10.0], 200.0)
            time.sleep(0.2)
            t0 = time.monotonic()
            m.stop()
            assert time.monotonic() - t0 < 1.0
            assert handle.interrupted
            stopped = m.position_um
            assert 31.0 < stopped[0] < 399.0
            time.sleep(0.2)
            assert np.allclose(sim.physical_position_um(), stopped, atol=0.5)
        finally:
            m.close()


def test_stop_all_halts_four_moving_scientifica_channels(
    make_manipulators: Callable[[int], list[Manipulator]],
) -> None:
    channels = make_manipulators(4)
    handles = [m.move_to(m.position_um + 500.0, 300.0) for m in channels]
    time.sleep(0.2)
    t0 = time.monotonic()
    results = stop_all(channels)
    assert time.monotonic() - t0 < 2.0
    assert results == {m.name: None for m in channels}
    for m, h in zip(channels, handles, strict=True):
        assert h.state is MoveState.INTERRUPTED and h.reason == "stop_all"
        assert not m.is_busy()
