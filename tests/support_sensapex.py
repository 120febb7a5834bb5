"""Shared fixtures helpers for the Sensapex tests: the UDP simulator and the SDK session.

The vendor SDK is a per-process singleton whose discovery costs ~0.2 s per device id, so each
test module opens the simulator and holds one SDK reference for the whole module
(``module_rig``); channels opened by a test are closed by that test, so the per-test leak
fixture sees no new thread or socket. Each module uses its own SDK group from {0,1,4,5,8,9}
(protocols/sensapex-smcp.md §7.1) and unicast 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from manipulators.base import Limits
from manipulators.sensapex import SensapexManipulator, SensapexSdk
from simulators.sensapex_device import SensapexFaults, SensapexSimulator
from simulators.world import SimWorld

START_UM = 10000.0
LIMITS_3 = Limits((8000.0,) * 3, (12000.0,) * 3)
LIMITS_4 = Limits((8000.0,) * 4, (12000.0,) * 4)
# device id -> axis count: two 4-axis uMp and two 3-axis devices
DEVICE_AXES = {1: 4, 2: 3, 3: 4, 4: 3}


@dataclass
class SensapexRig:
    """A running simulator plus a held SDK reference (for one test module)."""

    sim: SensapexSimulator
    sdk: SensapexSdk
    world: SimWorld
    group: int
    opened: list[SensapexManipulator] = field(default_factory=list)

    def open(self, device_id: int, name: str | None = None, **kwargs: object) -> SensapexManipulator:
        """A channel on ``device_id`` with limits 8000..12000 µm per axis (closed by ``close_all``)."""
        n_axes = DEVICE_AXES[device_id]
        kwargs.setdefault("limits", LIMITS_4 if n_axes == 4 else LIMITS_3)
        m = SensapexManipulator(
            name or f"sx{device_id}",
            kwargs.pop("limits"),  # type: ignore[arg-type]
            float(kwargs.pop("max_speed_um_s", 2000.0)),  # type: ignore[arg-type]
            float(kwargs.pop("default_speed_um_s", 500.0)),  # type: ignore[arg-type]
            device_id=device_id,
            address="127.0.0.1",
            group=self.group,
            **kwargs,  # type: ignore[arg-type]
        )
        self.opened.append(m)
        return m

    def close_all(self) -> None:
        while self.opened:
            self.opened.pop().close()

    def reset(self) -> None:
        """Fresh faults, devices back at the start position, visited ranges cleared."""
        self.sim.faults = SensapexFaults()
        teleported = False
        for dev_id, n in DEVICE_AXES.items():
            if not np.allclose(self.sim.position_um(dev_id), START_UM):
                self.sim.set_position_um(dev_id, [START_UM] * n)
                teleported = True
            self.sim.reset_visited(dev_id)
        if teleported:  # let the SDK's poller take in the position notifications
            time.sleep(0.1)


SAFE_GROUPS = (0, 1, 4, 5, 8, 9)  # pairwise free of shared UDP ports (protocols §7.1)


def free_group(preferred: int) -> int:
    """``preferred`` if its simulator port is free on this machine, else another safe group
    whose port is (other people's `patchrig sim` or tests may be running at the same time)."""
    for group in (preferred, *(g for g in SAFE_GROUPS if g != preferred)):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", 55555 + group))
        except OSError:
            continue
        finally:
            probe.close()
        return group
    raise RuntimeError("no free Sensapex group on this machine")


@contextmanager
def sensapex_rig(preferred_group: int) -> Iterator[SensapexRig]:
    group = free_group(preferred_group)
    world = SimWorld(seed=group)
    for dev_id, n in DEVICE_AXES.items():
        world.add_channel(f"sx{dev_id}", n_axes=n, position_um=np.full(n, START_UM))
    sim = SensapexSimulator(
        world=world, devices={i: f"sx{i}" for i in DEVICE_AXES}, n_axes=DEVICE_AXES, group=group
    )
    sim.start()
    try:
        sdk = SensapexSdk.acquire("127.0.0.1", group)
        try:
            yield SensapexRig(sim=sim, sdk=sdk, world=world, group=group)
        finally:
            sdk.release()
    finally:
        sim.close()


def channel_factory(rig: SensapexRig) -> Callable[[int], list[SensapexManipulator]]:
    def make(n: int) -> list[SensapexManipulator]:
        used = {m.device_id for m in rig.opened}
        free = [i for i in DEVICE_AXES if i not in used]
        return [rig.open(i) for i in free[:n]]

    return make
