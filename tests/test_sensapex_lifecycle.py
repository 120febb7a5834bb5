"""The shared SDK handle: opened by the first channel, closed (poller joined, UMP._single reset)
by the last, and reopenable in the same process. No module-scoped SDK here on purpose: the
autouse leak fixture checks that closing the last channel leaves no thread or socket behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from sensapex import UMP
from support_sensapex import free_group

from manipulators.base import Limits
from manipulators.sensapex import SensapexManipulator, SensapexSdk
from rig.errors import Busy, DeviceError, DeviceTimeout
from simulators.sensapex_device import SensapexSimulator

GROUP = free_group(5)  # another safe group if this one is busy on the machine
LIMITS = Limits((0.0,) * 3, (20000.0,) * 3)


@pytest.fixture
def sim() -> Iterator[SensapexSimulator]:
    with SensapexSimulator(devices={1: "a", 2: "b"}, n_axes={1: 3, 2: 3}, group=GROUP) as s:
        yield s


def sdk_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sensapex-sdk") or "move-watch" in t.name]


def open_channel(name: str, dev: int) -> SensapexManipulator:
    return SensapexManipulator(name, LIMITS, 1000.0, device_id=dev, address="127.0.0.1", group=GROUP)


def test_last_close_stops_and_joins_the_sdk_threads(sim: SensapexSimulator) -> None:
    a = open_channel("a", 1)
    b = open_channel("b", 2)
    assert SensapexSdk.is_open() and UMP._single is not None
    assert len(sdk_threads()) == 2  # the SDK's poller and our move watcher
    a.move_to(a.position_um + np.array([10.0, 0, 0]), 500.0).wait(5)
    a.close()
    assert SensapexSdk.is_open(), "b still uses the SDK"
    assert b.position_um.shape == (3,)
    b.close()
    b.close()  # idempotent
    assert not SensapexSdk.is_open()
    assert UMP._single is None
    assert sdk_threads() == []


def test_sdk_reopens_in_the_same_process(sim: SensapexSimulator) -> None:
    for cycle in range(3):
        m = open_channel("a", 1)
        target = m.position_um + np.array([5.0 * (cycle + 1), 0, 0])
        m.move_to(target, 500.0).wait(5)
        assert np.allclose(sim.position_um(1), target, atol=0.01)
        m.close()
        assert UMP._single is None


def test_failed_open_releases_the_sdk(sim: SensapexSimulator) -> None:
    with pytest.raises(Exception, match="'ghost'"):
        open_channel("ghost", 9)
    assert not SensapexSdk.is_open() and UMP._single is None


def test_sdk_opened_by_other_code_is_refused(sim: SensapexSimulator) -> None:
    other = UMP.get_ump(address=b"127.0.0.1", group=GROUP, start_poller=False, handle_atexit=False)
    try:
        with pytest.raises(DeviceError, match="already open in this process by other code"):
            open_channel("a", 1)
    finally:
        other.close()
        UMP._single = None


def test_invalid_group_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="cannot open the Sensapex SDK on 127.0.0.1 group 77"):
        SensapexManipulator("a", LIMITS, 1000.0, device_id=1, address="127.0.0.1", group=77)
    assert UMP._single is None


def test_channels_share_one_sdk_and_refuse_a_second_group(sim: SensapexSimulator) -> None:
    a = open_channel("a", 1)
    try:
        with pytest.raises(Busy, match="one address/group per process"):
            SensapexManipulator("x", LIMITS, 1000.0, device_id=1, address="127.0.0.1", group=GROUP + 3)
        b = open_channel("b", 2)
        assert a._sdk is b._sdk
        b.close()
    finally:
        a.close()


def test_closing_the_last_channel_from_a_done_callback(sim: SensapexSimulator) -> None:
    m = open_channel("a", 1)
    closed = threading.Event()

    def close_it(_h: object) -> None:
        m.close()
        closed.set()

    h = m.move_to(m.position_um + np.array([5.0, 0, 0]), 500.0)
    h.add_done_callback(close_it)
    h.wait(5)
    assert closed.wait(5)
    from support_manipulators import wait_until

    assert wait_until(lambda: sdk_threads() == [], 3.0), sdk_threads()
    assert UMP._single is None


def test_timeout_ms_is_applied_to_the_sdk(sim: SensapexSimulator) -> None:
    m = SensapexManipulator("a", LIMITS, 1000.0, device_id=1, address="127.0.0.1", group=GROUP, timeout_ms=50)
    try:
        assert m.describe()["timeout_ms"] == 50
        assert m._sdk.ump.h.contents.timeout == 50
        sim.faults.silent = True
        time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="3 tries of 50 ms"):
            _ = m.position_um
        assert time.monotonic() - t0 < 0.55  # 3 tries of 50 ms (twice with the SDK's retry): 0.3 s, not 0.6 s
        sim.faults.silent = False
        # a second channel asking for another timeout shares the first one's
        b = SensapexManipulator("b", LIMITS, 1000.0, device_id=2, address="127.0.0.1", group=GROUP, timeout_ms=300)
        assert b.timeout_ms == 50
        b.close()
    finally:
        sim.faults.silent = False
        m.close()


def test_a_second_simulator_on_the_same_group_is_a_clear_error(sim: SensapexSimulator) -> None:
    other = SensapexSimulator(devices={3: "c"}, group=GROUP)
    with pytest.raises(OSError, match=rf"cannot bind the Sensapex simulator to 127.0.0.1:{55555 + GROUP} \(group {GROUP}\)"):
        other.start()
    other.close()  # nothing to close, still fine


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group": 11}, "group must be 0..10"),
        ({"devices": {}}, "at least one device"),
        ({"devices": {0: "a"}}, "outside 1..254"),
        ({"devices": {1: "a"}, "n_axes": {1: 2}}, "3 or 4"),
        ({"devices": {1: "a"}, "initial_position_um": {1: [0.0, 0.0]}}, "needs 3 axes"),
    ],
)
def test_bad_simulator_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SensapexSimulator(**kwargs)


def test_broadcast_address_reaches_a_simulator_bound_to_all_interfaces() -> None:
    """An SDK opened on 127.255.255.255 finds devices by broadcast (the way real rigs use
    169.254.255.255); the simulator must then bind 0.0.0.0 (protocols/sensapex-smcp.md §6)."""
    group = free_group(0)
    with SensapexSimulator(devices={4: "d"}, n_axes={4: 3}, group=group, host="0.0.0.0") as bsim:
        m = SensapexManipulator("bc", LIMITS, 1000.0, device_id=4, address="127.255.255.255", group=group)
        try:
            target = m.position_um + np.array([0.0, 12.0, 0.0])
            m.move_to(target, 800.0).wait(5)
            assert np.allclose(bsim.position_um(4), target, atol=0.01)
        finally:
            m.close()
