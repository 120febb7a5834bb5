"""Build manipulator channels from the rig configuration.

``build_manipulator(channel_config)`` opens one channel with the driver its config names;
``build_manipulators(rig_config)`` opens all of them, in file order, and closes the ones it
already opened if a later one fails (so a bad config never leaves devices or threads behind).
Driver modules are imported only when used, so a rig without serial or Sensapex hardware does
not need their libraries to load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from manipulators.base import Limits, Manipulator
from rig.errors import ConfigError
from rig.logs import get_logger

if TYPE_CHECKING:
    from config.models import ChannelConfig, RigConfig
    from simulators.world import SimWorld

SIMULATED_PORT_PLACEHOLDER = "<simulated>"


def _log() -> Any:
    """This module's logger, made at call time so that it follows ``configure_logging``."""
    return get_logger("patchrig.manipulators")


def limits_of(channel: ChannelConfig) -> Limits:
    """The channel's soft limits (device µm)."""
    return Limits(tuple(channel.limits.min_um), tuple(channel.limits.max_um))


def build_manipulator(channel: ChannelConfig, *, world: SimWorld | None = None) -> Manipulator:
    """Open the channel described by ``channel``. ``world`` is used by the simulated driver
    only (the protocol simulators own their world link). Errors name the channel."""
    limits = limits_of(channel)
    common = (channel.name, limits, channel.max_speed_um_s, channel.default_speed_um_s)
    if channel.driver == "simulated":
        from manipulators.simulated import SimulatedManipulator

        acceleration = channel.simulated.acceleration_um_s2 if channel.simulated else 20000.0
        return SimulatedManipulator(*common, world=world, acceleration_um_s2=acceleration)
    if channel.driver == "sensapex":
        from manipulators.sensapex import SensapexManipulator

        sx = channel.sensapex
        if sx is None:
            raise ConfigError("driver 'sensapex' needs a [sensapex] section", channel=channel.name)
        return SensapexManipulator(
            *common, device_id=sx.device_id, address=sx.address, group=sx.group, timeout_ms=sx.timeout_ms
        )
    if channel.driver == "scientifica":
        from manipulators.scientifica import ScientificaManipulator

        sc = channel.scientifica
        if sc is None:
            raise ConfigError("driver 'scientifica' needs a [scientifica] section", channel=channel.name)
        if sc.port == SIMULATED_PORT_PLACEHOLDER:
            raise ConfigError(
                f"port {SIMULATED_PORT_PLACEHOLDER!r} is filled in by `patchrig sim`; "
                "give a real serial port (e.g. /dev/ttyUSB0) to run on hardware",
                channel=channel.name,
            )
        return ScientificaManipulator(
            *common, port=sc.port, baud=sc.baud, timeout_s=sc.timeout_s, expected_version=sc.expected_version
        )
    raise ConfigError(f"unknown driver {channel.driver!r}", channel=channel.name)


def build_manipulators(cfg: RigConfig, *, world: SimWorld | None = None) -> dict[str, Manipulator]:
    """Open every channel of ``cfg`` ({name: manipulator}, in file order). All or nothing."""
    built: dict[str, Manipulator] = {}
    try:
        for channel in cfg.channels:
            built[channel.name] = build_manipulator(channel, world=world)
            _log().info("channel ready", channel=channel.name, driver=channel.driver)
    except BaseException:
        for m in reversed(list(built.values())):
            try:
                m.close()
            except Exception as exc:  # report and go on: the original error is the one to raise
                _log().warning("close after failed start failed", channel=m.name, error=str(exc))
        raise
    return built
