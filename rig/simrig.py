"""The whole rig in simulation, and the assembly of a daemon from a configuration.

``SimulatedRig(cfg)`` builds the one ``SimWorld`` (seed, pixel size, frame size, drift from
``[simulation]``), adds every channel to it, and starts the device simulators the config
implies: one ``SensapexSimulator`` per Sensapex (address, group) on UDP loopback for the
``sensapex`` channels, one ``ScientificaSimulator`` on a pty per ``scientifica`` channel whose
port is ``"<simulated>"`` (the pty path is filled into the returned config), and the
``SimMicroscope`` rendering the world. The daemon then drives them through the real vendor SDK
and real pyserial, exactly as on hardware.

``build_daemon(cfg, ...)`` opens the manipulators (``manipulators.factory``), the frame source
and the localiser a config names and returns a ``Daemon`` (not started).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from config.models import SIMULATED_PORT, RigConfig
from rig.errors import ConfigError
from rig.logs import get_logger
from simulators.world import SimWorld

START_RING_UM = 45.0
log = get_logger("patchrig.simrig")


def needs_simulation(cfg: RigConfig) -> bool:
    """True when the config names simulated frames, simulated drivers or simulated ports."""
    if cfg.frames.source == "simulated" or cfg.simulation is not None:
        return True
    for ch in cfg.channels:
        if ch.driver == "simulated" or (ch.scientifica is not None and ch.scientifica.port == SIMULATED_PORT):
            return True
    return False


def start_position_um(cfg_channel: Any) -> np.ndarray:
    """Where a simulated channel starts: the middle of its soft limits (device µm)."""
    lo = np.asarray(cfg_channel.limits.min_um, float)
    hi = np.asarray(cfg_channel.limits.max_um, float)
    return 0.5 * (lo + hi)


class SimulatedRig:
    """The simulated world, its device simulators and its microscope for ``cfg`` (see module
    docstring). ``start()`` returns the config with the simulated ports filled in."""

    def __init__(self, cfg: RigConfig, *, seed: int | None = None, frame_rate_hz: float | None = None) -> None:
        sim = cfg.simulation
        self.cfg = cfg
        self.seed = sim.seed if (seed is None and sim is not None) else int(seed or 0)
        size = sim.image_size_px if sim is not None else 512
        self.world = SimWorld(
            seed=self.seed,
            um_per_px=cfg.rig.um_per_px,
            image_size_px=(size, size),
            focal_z_um=cfg.frames.focal_z_um or 0.0,
            drift_um_per_min=sim.drift_um_per_min if sim is not None else 0.0,
            jump_probability_per_min=sim.jump_probability_per_min if sim is not None else 0.0,
        )
        for ch in cfg.channels:
            self.world.add_channel(ch.name, n_axes=ch.n_axes, position_um=start_position_um(ch))
        self._spread_tips()
        self.frame_rate_hz = float(frame_rate_hz or (sim.frame_rate_hz if sim is not None else 30.0))
        self.sensapex: list[Any] = []
        self.scientifica: dict[str, Any] = {}
        self.microscope: Any = None

    def _spread_tips(self) -> None:
        """Put each start tip ``START_RING_UM`` from the image centre on the side its pipette
        comes from, as an experimenter lowers pipettes into the field of view, so that tips
        do not start on top of one another. Done through the world's hidden offset (a jump
        before the session starts); the mounting transforms stay random."""
        for name in self.world.channel_names:
            truth = self.world.truth(name)
            az = math.radians(truth.look.azimuth_deg)
            want = np.array([math.cos(az), math.sin(az)]) * START_RING_UM
            now = self.world.true_tip_um(name)
            self.world.jump(name, np.array([want[0] - now[0], want[1] - now[1], 0.0]))

    def start(self) -> RigConfig:
        """Start the device simulators and the microscope; return the filled-in config."""
        from simulators.microscope import SimMicroscope

        try:
            data = self.cfg.model_dump(mode="json")
            groups: dict[tuple[str, int], dict[int, Any]] = {}
            for ch in self.cfg.channels:
                if ch.driver == "sensapex" and ch.sensapex is not None:
                    address = ch.sensapex.address
                    if not address.startswith("127.") or address.endswith(".255"):
                        # after discovery the SDK sends its requests unicast, which a simulator
                        # bound to a broadcast address never receives
                        raise ConfigError(
                            f"simulated Sensapex needs a unicast loopback address (127.x, such as 127.0.0.1), "
                            f"got {address!r}", channel=ch.name
                        )
                    groups.setdefault((address, ch.sensapex.group), {})[ch.sensapex.device_id] = ch
            if groups:
                from simulators.sensapex_device import SensapexSimulator

                for (address, group), devices in groups.items():
                    sim = SensapexSimulator(
                        world=self.world,
                        devices={i: c.name for i, c in devices.items()},
                        n_axes={i: c.n_axes for i, c in devices.items()},
                        group=group,
                        host=address,
                    )
                    sim.start()
                    self.sensapex.append(sim)
            for i, ch in enumerate(self.cfg.channels):
                sc = ch.scientifica
                if ch.driver == "scientifica" and sc is not None and sc.port == SIMULATED_PORT:
                    from simulators.scientifica_device import ScientificaSimulator

                    pty_device = ScientificaSimulator(
                        world=self.world, channel=ch.name, version=sc.expected_version or 2, baud=sc.baud
                    )
                    data["channels"][i]["scientifica"]["port"] = pty_device.start()
                    self.scientifica[ch.name] = pty_device
            self.microscope = SimMicroscope(self.world, rate_hz=self.frame_rate_hz, seed=self.seed)
            return RigConfig.model_validate(data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the microscope and every device simulator (idempotent)."""
        if self.microscope is not None:
            self.microscope.close()
        for sim in self.scientifica.values():
            sim.close()
        self.scientifica.clear()
        for sim in self.sensapex:
            sim.close()
        self.sensapex.clear()

    def __enter__(self) -> SimulatedRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- truth (for reports only: the daemon never sees it) -----------------------------------
    def true_error_um(self, channel: str, target_px: np.ndarray) -> float:
        """Distance (µm, image plane) between the channel's true tip now and ``target_px``."""
        d = self.world.true_tip_px(channel) - np.asarray(target_px, float)
        return float(math.hypot(*d) * self.world.um_per_px)


def load_localiser(cfg: RigConfig, kind: str = "model", microscope: Any = None) -> tuple[Any, str]:
    """The localiser to run: ``model`` (the checkpoint the config names, or the shipped default,
    on ``cfg.localiser.device``, in a child process: ``rig.localiser_process``), ``classical``
    (no learning) or ``oracle`` (simulation truth). Returns (localiser, device description).
    The daemon closes it when it closes."""
    if kind == "oracle":
        if microscope is None:
            raise ConfigError("the oracle localiser needs the simulated microscope")
        from rig.sim_oracle import OracleLocaliser

        return OracleLocaliser(microscope, seed=1), "oracle (simulation truth)"
    if kind == "classical":
        from localisation.classical import ClassicalTipDetector

        return ClassicalTipDetector(), "cpu (classical)"
    from rig.localiser_process import ProcessLocaliser

    checkpoint = None if cfg.localiser.checkpoint is None else str(cfg.localiser.checkpoint)
    localiser = ProcessLocaliser.start(checkpoint, device=cfg.localiser.device, threads=cfg.localiser.threads)
    return localiser, localiser.device


def build_daemon(
    cfg: RigConfig,
    *,
    world: SimWorld | None = None,
    microscope: Any = None,
    localiser: Any = None,
    localiser_device: str = "cpu",
    calibration_dir: Path | None = None,
    command_endpoint: str | None = None,
    telemetry_endpoint: str | None = None,
) -> Any:
    """Open the manipulators and the frame source of ``cfg`` and return a Daemon (not
    started). On failure everything opened so far is closed."""
    from manipulators.factory import build_manipulators
    from rig.daemon import Daemon
    from rig.frame_sources import build_frame_source

    manipulators = build_manipulators(cfg, world=world)
    try:
        frames = build_frame_source(cfg, microscope)
        return Daemon(
            cfg,
            manipulators,
            frames=frames,
            localiser=localiser,
            calibration_dir=calibration_dir,
            command_endpoint=command_endpoint,
            telemetry_endpoint=telemetry_endpoint,
            localiser_device=localiser_device,
        )
    except BaseException:
        for m in manipulators.values():
            m.close()
        raise
