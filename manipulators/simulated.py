"""The in-process simulated manipulator: no protocol, a motion model, fast tests.

Motion follows ``simulators.motion`` (straight line, trapezoidal speed profile with
``acceleration_um_s2``). Positions are device µm. When a ``SimWorld`` is given, the channel's
position is written into it while moving (about 100 Hz) and on every read, so the simulated
microscope renders the pipette where it is.

One worker thread per channel (started on the first move, joined by ``close``) advances the
world and finishes move handles on arrival. Stop takes only the short state lock, never the
move lock, so it is immediate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from manipulators.base import Limits, Manipulator, MoveHandle, MoveState
from rig.errors import DeviceError
from simulators.motion import MotionAxis
from simulators.world import SimWorld

TICK_S = 0.01  # world update period while moving


class SimulatedManipulator(Manipulator):
    """A simulated channel. ``initial_position_um`` defaults to the world's position of the
    channel (when the world has it), else the middle of the limits."""

    driver_name = "simulated"

    def __init__(
        self,
        name: str,
        limits: Limits,
        max_speed_um_s: float,
        default_speed_um_s: float | None = None,
        *,
        world: SimWorld | None = None,
        acceleration_um_s2: float = 20000.0,
        initial_position_um: Sequence[float] | None = None,
    ) -> None:
        super().__init__(name, limits, max_speed_um_s, default_speed_um_s)
        if not acceleration_um_s2 > 0:
            raise ValueError(f"channel {name!r}: acceleration_um_s2 must be positive")
        self._world = world if world is not None and name in world.channel_names else None
        if world is not None and self._world is None:
            self.log.warning("the simulated world has no such channel; positions stay private",
                             world_channels=world.channel_names)
        if initial_position_um is not None:
            start = np.asarray(initial_position_um, float)
        elif self._world is not None:
            start = self._world.manipulator_position_um(name)
        else:
            start = 0.5 * (np.asarray(limits.min_um) + np.asarray(limits.max_um))
        if start.shape != (limits.n_axes,) or not np.all(np.isfinite(start)):
            raise ValueError(f"channel {name!r}: initial position {start.tolist()} needs {limits.n_axes} finite axes")
        self.acceleration_um_s2 = float(acceleration_um_s2)
        self._axis = MotionAxis(start, acceleration_um_s2)
        self._state_lock = threading.Lock()  # guards _axis, _pending, _worker; held briefly
        self._wake = threading.Condition(self._state_lock)
        self._pending: MoveHandle | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        self._publish(start)

    # -- hooks ---------------------------------------------------------------------------
    def _do_move_to(self, target_um: np.ndarray, speed_um_s: float, handle: MoveHandle) -> None:
        with self._state_lock:
            if self._closed:
                raise DeviceError("closed", channel=self.name)
            if handle.stop_requested:  # a stop came between the switch and now: never start it
                stopped_first = True
            else:
                stopped_first = False
                self._axis.start(target_um, speed_um_s, time.monotonic())
                self._pending = handle
                if self._worker is None:
                    self._worker = threading.Thread(
                        target=self._run, name=f"sim-manipulator-{self.name}", daemon=True
                    )
                    self._worker.start()
                self._wake.notify_all()
        if stopped_first:
            handle.finish(MoveState.INTERRUPTED, reason="stopped before it started")

    def _do_stop(self, reason: str) -> None:
        with self._state_lock:
            position = self._axis.stop(time.monotonic())
            halted, self._pending = self._pending, None
        self._publish(position)
        if halted is not None:  # a move newer than the one stop() saw is halted too: finish it
            halted.finish(MoveState.INTERRUPTED, position_um=position.tolist(), reason=reason)

    def _do_read_position_um(self) -> Sequence[float]:
        with self._state_lock:
            position = self._axis.position_at(time.monotonic())
        self._publish(position)
        return position.tolist()

    def _do_is_busy(self) -> bool:
        with self._state_lock:
            return self._axis.is_moving(time.monotonic())

    def _describe_backend(self) -> dict[str, Any]:
        return {"acceleration_um_s2": self.acceleration_um_s2, "world": self._world is not None}

    def close(self) -> None:
        """Stop motion and join the worker thread. Idempotent."""
        with self._state_lock:
            already = self._closed
            self._closed = True
        if not already:
            self.stop("closed")
        with self._state_lock:
            worker, self._worker = self._worker, None
            self._wake.notify_all()
        if worker is not None and worker is not threading.current_thread():  # close from a done-callback
            worker.join(timeout=5.0)

    # -- worker --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._state_lock:
                while not self._closed and self._axis.move is None and self._pending is None:
                    self._wake.wait()
                if self._closed:
                    return
                now = time.monotonic()
                position = self._axis.position_at(now)
                finished = self._pending if self._axis.move is None else None
                if finished is not None:
                    self._pending = None
            self._publish(position)
            if finished is not None:
                finished.finish(MoveState.DONE, position_um=position.tolist())
            else:
                time.sleep(TICK_S)

    def _publish(self, position_um: np.ndarray) -> None:
        if self._world is not None:
            self._world.set_manipulator_position_um(self.name, position_um)
