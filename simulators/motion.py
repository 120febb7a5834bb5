"""A straight-line, trapezoidal-velocity motion model shared by the simulated devices.

Positions in device µm, speeds in µm/s, accelerations in µm/s², times in seconds from any
monotonic clock. All axes move together along the straight line to the target (the way both
vendors' "simultaneous" moves behave); the path speed follows a trapezoid (or a triangle when
the move is too short to reach ``speed_um_s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class LinearMove:
    """One move from ``start_um`` to ``target_um`` started at ``t0_s``."""

    start_um: np.ndarray
    target_um: np.ndarray
    speed_um_s: float
    acceleration_um_s2: float
    t0_s: float

    def __post_init__(self) -> None:
        self.start_um = np.asarray(self.start_um, float).copy()
        self.target_um = np.asarray(self.target_um, float).copy()
        delta = self.target_um - self.start_um
        self.length_um = float(np.linalg.norm(delta))
        self.unit = delta / self.length_um if self.length_um > 0 else np.zeros_like(delta)
        v, a = float(self.speed_um_s), float(self.acceleration_um_s2)
        if v <= 0 or a <= 0:
            raise ValueError("speed and acceleration must be positive")
        ramp_um = v * v / a  # distance spent accelerating + decelerating at full speed
        if self.length_um >= ramp_um:
            self.peak_um_s = v
            self.duration_s = 2 * v / a + (self.length_um - ramp_um) / v
        else:  # triangle
            self.peak_um_s = math.sqrt(self.length_um * a)
            self.duration_s = 2 * self.peak_um_s / a

    def distance_at(self, t_s: float) -> float:
        """Path length travelled (µm) at time ``t_s``."""
        t = min(max(t_s - self.t0_s, 0.0), self.duration_s)
        a, vp, T = self.acceleration_um_s2, self.peak_um_s, self.duration_s
        t_ramp = vp / a
        if t <= t_ramp:
            return 0.5 * a * t * t
        if t <= T - t_ramp:
            return 0.5 * a * t_ramp * t_ramp + vp * (t - t_ramp)
        remaining = T - t
        return self.length_um - 0.5 * a * remaining * remaining

    def position_at(self, t_s: float) -> np.ndarray:
        """Position (device µm) at ``t_s``; exactly ``target_um`` once finished."""
        if self.finished_at(t_s):
            return self.target_um.copy()
        return self.start_um + self.unit * self.distance_at(t_s)

    def finished_at(self, t_s: float) -> bool:
        return t_s - self.t0_s >= self.duration_s


class MotionAxis:
    """The motion state of one simulated device: idle at a position, or executing a move.

    Not thread-safe on its own: the owning device serialises access.
    """

    def __init__(self, position_um: np.ndarray, acceleration_um_s2: float = 20000.0) -> None:
        self._position_um = np.asarray(position_um, float).copy()
        self.acceleration_um_s2 = float(acceleration_um_s2)
        self.move: LinearMove | None = None

    def start(self, target_um: np.ndarray, speed_um_s: float, now_s: float) -> LinearMove:
        """Start a new move from wherever the device is now (supersedes any running move)."""
        self._position_um = self.position_at(now_s)
        self.move = LinearMove(self._position_um, target_um, speed_um_s, self.acceleration_um_s2, now_s)
        return self.move

    def stop(self, now_s: float) -> np.ndarray:
        """Halt at the current position (the short deceleration is neglected)."""
        self._position_um = self.position_at(now_s)
        self.move = None
        return self._position_um.copy()

    def position_at(self, now_s: float) -> np.ndarray:
        if self.move is None:
            return self._position_um.copy()
        pos = self.move.position_at(now_s)
        if self.move.finished_at(now_s):
            self._position_um = pos
            self.move = None
        return pos

    def is_moving(self, now_s: float) -> bool:
        self.position_at(now_s)
        return self.move is not None

    def set_position(self, position_um: np.ndarray) -> None:
        """Redefine the position without moving (zeroing)."""
        self.move = None
        self._position_um = np.asarray(position_um, float).copy()
