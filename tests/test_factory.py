"""Building channels from configuration: every driver, the sim profile, all-or-nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
from support_sensapex import free_group

from config.loader import default_config_path, load_config
from config.models import ChannelConfig, RigConfig
from manipulators.factory import build_manipulator, build_manipulators
from manipulators.scientifica import ScientificaManipulator
from manipulators.sensapex import SensapexManipulator, SensapexSdk
from manipulators.simulated import SimulatedManipulator
from rig.errors import ConfigError, PatchrigError
from simulators.scientifica_device import ScientificaSimulator
from simulators.sensapex_device import SensapexSimulator
from simulators.world import SimWorld

GROUP = free_group(1)  # another safe group if this one is busy on the machine


def channel(**kw: object) -> ChannelConfig:
    base: dict[str, object] = {
        "name": "A",
        "driver": "simulated",
        "limits": {"min_um": [0.0, 0.0, 0.0], "max_um": [20000.0, 20000.0, 20000.0]},
        "max_speed_um_s": 1000.0,
        "default_speed_um_s": 300.0,
    }
    return ChannelConfig.model_validate(base | kw)


def test_simulated_channel_uses_the_config_and_the_world() -> None:
    world = SimWorld(seed=0)
    world.add_channel("A", n_axes=3, position_um=np.array([5000.0, 5000.0, 5000.0]))
    m = build_manipulator(channel(simulated={"acceleration_um_s2": 5000.0}), world=world)
    try:
        assert isinstance(m, SimulatedManipulator)
        assert m.acceleration_um_s2 == 5000.0
        assert m.max_speed_um_s == 1000.0 and m.default_speed_um_s == 300.0
        assert m.limits.max_um == (20000.0, 20000.0, 20000.0)
        assert np.allclose(m.position_um, [5000.0, 5000.0, 5000.0])
        m.move_to([5010.0, 5000.0, 5000.0]).wait(5)
        assert np.allclose(world.manipulator_position_um("A"), [5010.0, 5000.0, 5000.0])
    finally:
        m.close()


@pytest.fixture
def sensapex_sim() -> Iterator[SensapexSimulator]:
    with SensapexSimulator(devices={1: "A", 2: "B"}, n_axes={1: 4, 2: 3}, group=GROUP) as sim:
        yield sim


def test_sensapex_channel(sensapex_sim: SensapexSimulator) -> None:
    cfg = channel(
        driver="sensapex",
        n_axes=4,
        limits={"min_um": [0.0] * 4, "max_um": [20000.0] * 4},
        sensapex={"device_id": 1, "address": "127.0.0.1", "group": GROUP, "timeout_ms": 150},
    )
    m = build_manipulator(cfg)
    try:
        assert isinstance(m, SensapexManipulator)
        assert (m.device_id, m.group, m.timeout_ms, m.n_axes) == (1, GROUP, 150, 4)
        assert np.allclose(m.position_um, sensapex_sim.position_um(1), atol=0.01)
    finally:
        m.close()
    assert not SensapexSdk.is_open()


def test_scientifica_channel() -> None:
    with ScientificaSimulator(version=3, baud=38400) as sim:
        cfg = channel(driver="scientifica", scientifica={"port": sim.port, "baud": 38400, "expected_version": 3})
        m = build_manipulator(cfg)
        try:
            assert isinstance(m, ScientificaManipulator)
            assert m.position_um.shape == (3,)
        finally:
            m.close()


def test_simulated_port_placeholder_is_a_clear_error() -> None:
    cfg = channel(driver="scientifica", scientifica={"port": "<simulated>"})
    with pytest.raises(ConfigError, match=r"'A'.*patchrig sim"):
        build_manipulator(cfg)


def test_build_all_channels_of_a_rig(sensapex_sim: SensapexSimulator) -> None:
    cfg = RigConfig.model_validate(
        {
            "channels": [
                channel(name="S1").model_dump(),
                channel(name="S2", n_axes=3, driver="sensapex",
                        sensapex={"device_id": 2, "address": "127.0.0.1", "group": GROUP}).model_dump(),
            ]
        }
    )
    built = build_manipulators(cfg)
    try:
        assert list(built) == ["S1", "S2"]
        assert isinstance(built["S2"], SensapexManipulator)
    finally:
        for m in built.values():
            m.close()


def test_build_is_all_or_nothing(sensapex_sim: SensapexSimulator) -> None:
    cfg = RigConfig.model_validate(
        {
            "channels": [
                channel(name="ok", driver="sensapex", sensapex={"device_id": 2, "address": "127.0.0.1", "group": GROUP}).model_dump(),
                channel(name="missing", driver="sensapex", sensapex={"device_id": 9, "address": "127.0.0.1", "group": GROUP}).model_dump(),
            ]
        }
    )
    threads_before = {t.name for t in threading.enumerate()}
    with pytest.raises(PatchrigError, match="'missing'"):
        build_manipulators(cfg)
    assert not SensapexSdk.is_open()  # the channel opened first was closed again
    assert {t.name for t in threading.enumerate()} <= threads_before


def test_the_shipped_sim_profile_needs_patchrig_sim_for_its_serial_ports() -> None:
    cfg = load_config(default_config_path())
    scientifica = [c for c in cfg.channels if c.driver == "scientifica"]
    assert scientifica, "sim.toml has Scientifica channels"
    with pytest.raises(ConfigError, match="<simulated>"):
        build_manipulator(scientifica[0])


def test_a_failing_close_during_cleanup_does_not_hide_the_original_error(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []
    real_close = SimulatedManipulator.close

    def broken_close(self: SimulatedManipulator) -> None:
        real_close(self)
        closed.append(self.name)
        raise RuntimeError("close exploded")

    monkeypatch.setattr(SimulatedManipulator, "close", broken_close)
    cfg = RigConfig.model_validate(
        {
            "channels": [
                channel(name="first").model_dump(),
                channel(name="second", driver="scientifica", scientifica={"port": "<simulated>"}).model_dump(),
            ]
        }
    )
    with pytest.raises(ConfigError, match="'second'"):
        build_manipulators(cfg)
    assert closed == ["first"]
