"""The manipulator contract through the real vendor SDK (libum.so) against the UDP simulator,
plus the Sensapex-specific behaviour: 4-axis uMp, device ids, SDK sharing, wire-level quirks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from support_manipulators import ManipulatorContract, target_inside
from support_sensapex import LIMITS_3, LIMITS_4, SensapexRig, channel_factory, sensapex_rig

from manipulators.base import Limits, Manipulator, MoveState
from manipulators.sensapex import SensapexManipulator, SensapexSdk
from rig.errors import Busy, InvalidParams, NotFound

PREFERRED_GROUP = 8  # another safe group is used if this one is busy on the machine


@pytest.fixture(scope="module")
def rig() -> Iterator[SensapexRig]:
    with sensapex_rig(PREFERRED_GROUP) as r:
        yield r


@pytest.fixture
def make_manipulators(rig: SensapexRig) -> Iterator[Callable[[int], list[Manipulator]]]:
    rig.reset()
    yield channel_factory(rig)  # type: ignore[misc]
    rig.close_all()


@pytest.fixture
def manipulator(make_manipulators: Callable[[int], list[Manipulator]]) -> Manipulator:
    return make_manipulators(1)[0]


class TestSensapexContract(ManipulatorContract):
    tolerance_um = 0.1  # the SDK retries beyond 0.1 µm; the simulator lands exactly


def test_four_axis_device_moves_its_fourth_axis(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(1)
    assert m.n_axes == 4 and m.describe()["device_id"] == 1
    start = m.position_um
    target = start + np.array([0.0, 0.0, 0.0, 80.0])
    m.move_to(target, 800.0).wait(10)
    assert np.allclose(m.position_um, target, atol=0.1)
    assert np.allclose(rig.sim.position_um(1), target, atol=0.01)
    assert np.allclose(rig.world.manipulator_position_um("sx1"), target, atol=0.01)


def test_world_pipette_follows_the_device(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(2)
    tip_before = rig.world.true_tip_um("sx2")
    target = m.position_um + np.array([40.0, -20.0, 10.0])
    m.move_to(target, 1000.0).wait(10)
    assert np.allclose(rig.world.manipulator_position_um("sx2"), target, atol=0.01)
    assert np.linalg.norm(rig.world.true_tip_um("sx2") - tip_before) > 20.0


def test_moves_are_straight_lines_at_the_path_speed(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(2)
    start = m.position_um
    target = start + np.array([300.0, 150.0, -100.0])
    t0 = time.monotonic()
    h = m.move_to(target, 600.0)
    samples = []
    while not h.done:
        samples.append(rig.sim.position_um(2))
        time.sleep(0.02)
    h.wait(1)
    seconds = time.monotonic() - t0
    length = float(np.linalg.norm(target - start))
    assert seconds > 0.9 * length / 600.0, "moved faster than the requested path speed"
    direction = (target - start) / length
    for p in samples:  # every sample lies on the segment (within the integer-speed rounding)
        off_line = (p - start) - np.dot(p - start, direction) * direction
        assert np.linalg.norm(off_line) < 3.0


def test_axis_count_mismatch_is_a_clear_error(rig: SensapexRig, make_manipulators: object) -> None:
    with pytest.raises(InvalidParams, match=r"'wrong'.*4 axes.*3"):
        rig.open(1, name="wrong", limits=LIMITS_3)
    with pytest.raises(InvalidParams, match=r"'wrong'.*3 axes.*4"):
        rig.open(2, name="wrong", limits=LIMITS_4)


def test_unknown_device_id_is_a_clear_error_naming_the_channel(rig: SensapexRig, make_manipulators: object) -> None:
    t0 = time.monotonic()
    with pytest.raises(NotFound) as info:
        SensapexManipulator("ghost", LIMITS_3, 1000.0, device_id=7, address="127.0.0.1", group=rig.group)
    assert time.monotonic() - t0 < 3.0
    text = str(info.value)
    assert "'ghost'" in text and "device 7" in text and "[1, 2, 3, 4]" in text
    # the SDK stays usable for the others
    m = rig.open(2)
    assert m.position_um.shape == (3,)


def test_device_id_used_twice_is_refused(rig: SensapexRig, make_manipulators: object) -> None:
    rig.open(2, name="first")
    with pytest.raises(Busy, match=r"'second'.*device 2.*'first'"):
        rig.open(2, name="second")


def test_another_group_while_open_is_refused(rig: SensapexRig, make_manipulators: object) -> None:
    with pytest.raises(Busy, match="one address/group per process"):
        SensapexManipulator("other", LIMITS_3, 1000.0, device_id=1, address="127.0.0.1", group=rig.group + 1)
    with pytest.raises(Busy):
        SensapexManipulator("other", LIMITS_3, 1000.0, device_id=1, address="127.0.0.2", group=rig.group)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device_id": 0}, "device id"),
        ({"device_id": 300}, "device id"),
        ({"limits": Limits((-2000.0,) * 3, (0.0,) * 3)}, "SDK's range"),
        ({"limits": Limits((0.0,) * 2, (10.0,) * 2)}, "3 or 4 axes"),
    ],
)
def test_bad_construction_arguments(rig: SensapexRig, make_manipulators: object, kwargs: dict, match: str) -> None:
    args = {"device_id": 2, "limits": LIMITS_3} | kwargs
    limits = args.pop("limits")
    with pytest.raises(InvalidParams, match=match):
        SensapexManipulator("bad", limits, 1000.0, address="127.0.0.1", group=rig.group, **args)


def test_speed_below_one_um_per_s_is_refused(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(2)
    before = rig.sim.request_counts["GOTO_POS"]
    with pytest.raises(InvalidParams, match=r"'sx2'.*minimum of 1 µm/s"):
        m.move_to(target_inside(m, 5.0), 0.5)
    assert rig.sim.request_counts["GOTO_POS"] == before


def test_rejected_target_sends_nothing(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(2)
    before = dict(rig.sim.request_counts)
    bad = m.position_um
    bad[0] = 12000.5
    with pytest.raises(Exception, match="outside limits"):
        m.move_to(bad, 100.0)
    time.sleep(0.1)
    assert rig.sim.request_counts.get("GOTO_POS", 0) == before.get("GOTO_POS", 0)
    assert rig.sim.request_counts.get("TAKE_STEP", 0) == before.get("TAKE_STEP", 0)


def test_stop_reaches_the_device_twice_and_is_harmless(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(3)
    h = m.move_to(target_inside(m, 300.0), 200.0)
    time.sleep(0.2)
    before = rig.sim.request_counts["STOP"]
    m.stop()
    assert h.state is MoveState.INTERRUPTED
    assert rig.sim.request_counts["STOP"] - before == 2  # the SDK's quirk: ump.stop + interrupt
    assert not rig.sim.is_moving(3)


def test_position_read_back_matches_the_device(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(4)
    assert np.allclose(m.position_um, rig.sim.position_um(4), atol=0.01)
    d = m.describe()
    assert d["driver"] == "sensapex" and d["group"] == rig.group and d["address"] == "127.0.0.1"
    assert d["sdk"].startswith("sensapex 1.504")


def test_sdk_stays_open_while_a_reference_is_held(rig: SensapexRig, make_manipulators: object) -> None:
    m = rig.open(2)
    m.close()
    assert SensapexSdk.is_open()
    m2 = rig.open(2)
    assert m2.position_um.shape == (3,)


def test_simulator_answers_the_rest_of_the_sdk(rig: SensapexRig, make_manipulators: object) -> None:
    """Calls the driver does not use but a user of the SDK might: version, ping, relative
    steps, features and parameters all get well-formed answers from the simulator."""
    m = rig.open(2)
    ump = rig.sdk.ump
    assert ump.get_firmware_version(2) == (1, 504, 0, 0, 0)
    ump.ping_device(2)
    start = rig.sim.position_um(2)
    ump.take_step(2, [6.0, 0.0, -4.0], 200)
    time.sleep(0.3)
    assert np.allclose(rig.sim.position_um(2), start + np.array([6.0, 0.0, -4.0]), atol=0.01)
    assert ump.get_soft_start_state(2) == 0
    assert ump.get_um_param(2, 0x105).value == 3
    assert np.allclose(m.position_um, rig.sim.position_um(2), atol=0.01)
