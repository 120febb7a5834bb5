"""Shared helpers of the daemon tests: a small simulated rig and a running daemon on free ports.

``running_daemon(...)`` builds a SimWorld, in-process ``SimulatedManipulator`` channels that move
its pipettes, and a ``Daemon`` bound to ``tcp://127.0.0.1:0`` (free ports, never the defaults);
it yields a ``RigUnderTest`` and closes everything afterwards.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from config.loader import config_from_mapping
from config.models import RigConfig
from manipulators.base import Limits, Manipulator
from manipulators.simulated import SimulatedManipulator
from rig.client import PatchrigClient, TelemetrySubscriber
from rig.daemon import Daemon
from simulators.world import SimWorld

LIMIT_UM = 5000.0
START_UM = 2500.0


def make_config(names: list[str], *, server: dict[str, Any] | None = None, frames: dict[str, Any] | None = None,
                channel_keys: dict[str, dict[str, Any]] | None = None, **sections: Any) -> RigConfig:
    """A config of simulated channels ``names``; ``channel_keys``: more keys per channel name."""
    channels = [
        {
            "name": n,
            "driver": "simulated",
            "n_axes": 3,
            "max_speed_um_s": 2000.0,
            "default_speed_um_s": 500.0,
            "limits": {"min_um": [0.0] * 3, "max_um": [LIMIT_UM] * 3},
            **(channel_keys or {}).get(n, {}),
        }
        for n in names
    ]
    data: dict[str, Any] = {"channels": channels, "server": server or {}, **sections}
    if frames is not None:
        data["frames"] = frames
    return config_from_mapping(data, "<test>")


def make_world(names: list[str], seed: int = 0) -> SimWorld:
    world = SimWorld(seed=seed, um_per_px=0.62, image_size_px=(512, 512))
    for n in names:
        world.add_channel(n, n_axes=3, position_um=np.full(3, START_UM))
    return world


def make_manipulators(cfg: RigConfig, world: SimWorld | None) -> dict[str, Manipulator]:
    out: dict[str, Manipulator] = {}
    for ch in cfg.channels:
        out[ch.name] = SimulatedManipulator(
            ch.name,
            Limits(tuple(ch.limits.min_um), tuple(ch.limits.max_um)),
            ch.max_speed_um_s,
            ch.default_speed_um_s,
            world=world,
            initial_position_um=[START_UM] * ch.n_axes,
        )
    return out


@dataclass
class RigUnderTest:
    cfg: RigConfig
    world: SimWorld
    manipulators: dict[str, Manipulator]
    daemon: Daemon
    clients: list[Any] = field(default_factory=list)
    microscope: Any = None

    def client(self, **kwargs: Any) -> PatchrigClient:
        kwargs.setdefault("timeout_s", 5.0)
        c = PatchrigClient(self.daemon.command_endpoint, **kwargs)
        self.clients.append(c)
        return c

    def subscriber(self, topics: tuple[str, ...] = ()) -> TelemetrySubscriber:
        """A telemetry subscriber known to be joined (see ``JoinedSubscriber``)."""
        s = JoinedSubscriber(self.daemon.telemetry_endpoint, topics)
        self.clients.append(s)
        return s

    def positions(self) -> dict[str, np.ndarray]:
        """True read-backs straight from the world (not through the daemon)."""
        return {n: self.world.manipulator_position_um(n) for n in self.manipulators}


class JoinedSubscriber(TelemetrySubscriber):
    """A subscriber whose subscriptions have reached the publisher when it is returned.

    ZeroMQ's slow joiner: a SUB socket's subscriptions travel to the PUB asynchronously, and
    until they arrive its messages are dropped, so a fixed sleep is a race on a loaded machine.
    This one also subscribes to ``heartbeat`` and waits for one: a heartbeat that arrives
    proves that the subscriptions sent before it are in force. Topics it was not asked for are
    then hidden from ``recv``."""

    def __init__(self, endpoint: str, topics: tuple[str, ...] = (), join_timeout_s: float = 10.0) -> None:
        self._wanted: tuple[str, ...] | None = None  # None: show everything (while joining)
        super().__init__(endpoint, (*topics, "heartbeat") if topics else ())
        joined = self.wait_for(lambda topic, _message: topic == "heartbeat", join_timeout_s)
        assert joined is not None, f"no heartbeat within {join_timeout_s} s: the subscription never joined"
        self._wanted = tuple(topics)

    def recv(self, timeout_s: float | None = 1.0) -> tuple[str, dict[str, Any]] | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = super().recv(remaining)
            if item is None or not self._wanted or item[0].startswith(self._wanted):
                return item
            if deadline is not None and time.monotonic() >= deadline:
                return None


@contextlib.contextmanager
def running_daemon(
    names: list[str] | None = None,
    *,
    server: dict[str, Any] | None = None,
    daemon_kwargs: dict[str, Any] | None = None,
    manipulators: Callable[[RigConfig, SimWorld], dict[str, Manipulator]] | None = None,
    calibration_dir: Any = None,
    frame_rate_hz: float = 20.0,
    **cfg_sections: Any,
) -> Iterator[RigUnderTest]:
    """A running daemon. With ``calibration_dir``: also a simulated microscope at
    ``frame_rate_hz``, its frame source, the oracle localiser (true tips + 0.3 px noise) and the
    calibration service storing into ``calibration_dir``."""
    names = names or ["A", "B"]
    cfg = make_config(names, server=server, **cfg_sections)
    world = make_world(names)
    devices = (manipulators or make_manipulators)(cfg, world)
    kwargs = dict(daemon_kwargs or {})
    microscope = oracle = None
    if calibration_dir is not None:
        from rig.frame_sources import SimulatedFrameSource
        from rig.sim_oracle import OracleLocaliser
        from simulators.microscope import SimMicroscope

        microscope = SimMicroscope(world, rate_hz=frame_rate_hz, seed=1)
        oracle = OracleLocaliser(microscope, noise_px=0.3, seed=2)
        kwargs.update(frames=SimulatedFrameSource(microscope), localiser=oracle, calibration_dir=calibration_dir)
    daemon = Daemon(
        cfg,
        devices,
        command_endpoint="tcp://127.0.0.1:0",
        telemetry_endpoint="tcp://127.0.0.1:0",
        **kwargs,
    )
    rig = RigUnderTest(cfg, world, devices, daemon, microscope=microscope)
    try:
        daemon.start()
        yield rig
    finally:
        for c in rig.clients:
            c.close()
        daemon.close()
        if microscope is not None:
            microscope.close()


def raw_request(endpoint: str, frames: list[bytes] | bytes, *, timeout_s: float = 3.0,
                socket_type: int = zmq.REQ) -> dict[str, Any] | None:
    """Send raw bytes (one frame or several) and return the decoded reply, or None on timeout."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(socket_type)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        if isinstance(frames, bytes):
            frames = [frames]
        if socket_type == zmq.DEALER:
            sock.send_multipart([b"", *frames])
        else:
            sock.send_multipart(frames)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = sock.recv_multipart()
        return json.loads(reply[-1])
    finally:
        sock.close(linger=0)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
