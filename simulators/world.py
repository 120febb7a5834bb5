"""The one shared simulated world: true pipette tips, hidden transforms, drift and jumps.

Frames:
- manipulator coordinates: µm, each device's own axes (x, y, z[, d]); simulated devices write
  them here through ``set_manipulator_position_um``;
- microscope coordinates: µm, image-aligned X (columns), Y (rows), focal Z (positive = up,
  away from the tissue);
- pixels: x = column, y = row, origin at the centre of the top-left pixel, so a point at
  microscope (X, Y) is at pixel (X / um_per_px + (w - 1) / 2, Y / um_per_px + (h - 1) / 2):
  microscope (0, 0) is the image centre.

The hidden per-channel transform maps manipulator µm to microscope µm:
    tip_um = M @ position_um[:3] + position_um[3] * approach_unit + offset_um + drift_um
with M a rotation about Z (the mounting azimuth) times a per-axis sign and scale, a small tilt,
and, for 4-axis devices, a diagonal approach axis. Drift is a slow random walk; jumps are
sudden offsets, as repeated tissue penetrations cause. The daemon never reads any of this:
only tests and benchmarks do, to measure true error.

Thread-safe: one lock guards all state; device threads, the microscope and tests share it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PipetteLook:
    """How one pipette looks and sits in the microscope frame (angles in degrees).

    ``azimuth_deg`` is the direction, in the image plane, from the tip toward the shank
    (0 = +x, 90 = +y); ``elevation_deg`` is the angle of the shank above the focal plane.
    """

    azimuth_deg: float
    elevation_deg: float = 27.0
    tip_radius_um: float = 0.7
    half_angle_deg: float = 5.0


@dataclass
class ChannelTruth:
    """Hidden truth of one channel. Never shown to the daemon."""

    name: str
    n_axes: int
    matrix: np.ndarray  # (3, 3): manipulator xyz µm -> microscope µm
    approach_unit: np.ndarray  # (3,): microscope direction of the 4th axis (zeros if 3 axes)
    offset_um: np.ndarray  # (3,)
    look: PipetteLook
    position_um: np.ndarray  # (n_axes,) current manipulator read-back
    drift_um: np.ndarray = field(default_factory=lambda: np.zeros(3))
    visible: bool = True


def mounting_matrix(
    azimuth_deg: float,
    axis_signs: tuple[float, float, float] = (1.0, 1.0, 1.0),
    axis_scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    tilt_deg: float = 0.0,
) -> np.ndarray:
    """A plausible manipulator mounting: rotate about Z by ``azimuth_deg``, tilt about X'."""
    a = math.radians(azimuth_deg)
    t = math.radians(tilt_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0, 0, 1.0]])
    rx = np.array([[1.0, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return rz @ rx @ np.diag(np.asarray(axis_signs) * np.asarray(axis_scales))


class SimWorld:
    """The shared simulated world. All positions in µm; see the module docstring for frames."""

    def __init__(
        self,
        *,
        seed: int = 0,
        um_per_px: float = 0.62,
        image_size_px: tuple[int, int] = (512, 512),
        focal_z_um: float = 0.0,
        drift_um_per_min: float = 0.0,
        jump_probability_per_min: float = 0.0,
        jump_size_um: float = 6.0,
    ) -> None:
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(seed)
        self.seed = seed
        self.um_per_px = um_per_px
        self.image_size_px = image_size_px  # (h, w)
        self.focal_z_um = focal_z_um
        self.drift_um_per_min = drift_um_per_min
        self.jump_probability_per_min = jump_probability_per_min
        self.jump_size_um = jump_size_um
        self.time_s = 0.0
        self._channels: dict[str, ChannelTruth] = {}

    # -- set-up --------------------------------------------------------------------------
    def add_channel(
        self,
        name: str,
        *,
        n_axes: int = 3,
        matrix: np.ndarray | None = None,
        offset_um: np.ndarray | None = None,
        look: PipetteLook | None = None,
        position_um: np.ndarray | None = None,
        approach_elevation_deg: float = 27.0,
    ) -> ChannelTruth:
        """Add a channel whose tip is at microscope ``M @ position + offset``.

        Defaults: a random mounting azimuth with random axis signs and 1-3 % scale error,
        and an offset that puts the start position's tip near the image centre.
        """
        with self._lock:
            if name in self._channels:
                raise ValueError(f"channel {name!r} already exists")
            rng = self._rng
            if look is None:
                base = 90.0 * len(self._channels) + 45.0
                look = PipetteLook(
                    azimuth_deg=float(base + rng.uniform(-20, 20)),
                    elevation_deg=approach_elevation_deg,
                )
            if matrix is None:
                signs = tuple(float(s) for s in rng.choice([-1.0, 1.0], size=3))
                scales = tuple(float(s) for s in rng.uniform(0.97, 1.03, size=3))
                matrix = mounting_matrix(
                    float(rng.uniform(0, 360)), signs, scales, float(rng.uniform(-3, 3))  # type: ignore[arg-type]
                )
            pos = np.zeros(n_axes) if position_um is None else np.asarray(position_um, float)
            if pos.shape != (n_axes,):
                raise ValueError(f"position_um must have {n_axes} axes")
            approach = np.zeros(3)
            if n_axes == 4:
                az = math.radians(look.azimuth_deg)
                el = math.radians(look.elevation_deg)
                # advancing the approach axis moves the tip away from the shank and down
                approach = -np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])
            if offset_um is None:
                half_w = self.image_size_px[1] * self.um_per_px / 2
                target = np.array(
                    [rng.uniform(-0.4, 0.4) * half_w, rng.uniform(-0.4, 0.4) * half_w, self.focal_z_um]
                )
                offset_um = target - (np.asarray(matrix) @ pos[:3] + approach * (pos[3] if n_axes == 4 else 0.0))
            truth = ChannelTruth(
                name=name,
                n_axes=n_axes,
                matrix=np.asarray(matrix, float),
                approach_unit=approach,
                offset_um=np.asarray(offset_um, float),
                look=look,
                position_um=pos.copy(),
            )
            self._channels[name] = truth
            return truth

    # -- what simulated devices call -----------------------------------------------------
    def set_manipulator_position_um(self, name: str, position_um: np.ndarray) -> None:
        """A simulated device reports its new read-back position (device µm)."""
        with self._lock:
            ch = self._channels[name]
            ch.position_um = np.asarray(position_um, float)[: ch.n_axes].copy()

    def manipulator_position_um(self, name: str) -> np.ndarray:
        with self._lock:
            return self._channels[name].position_um.copy()

    # -- time, drift, jumps --------------------------------------------------------------
    def advance(self, dt_s: float) -> None:
        """Advance the world clock: slow random-walk drift and occasional jumps per channel."""
        if dt_s <= 0:
            return
        with self._lock:
            self.time_s += dt_s
            sigma = self.drift_um_per_min * math.sqrt(dt_s / 60.0)
            p_jump = 1.0 - math.exp(-self.jump_probability_per_min * dt_s / 60.0)
            for ch in self._channels.values():
                if sigma > 0:
                    ch.drift_um = ch.drift_um + self._rng.normal(0, sigma, 3) * np.array([1, 1, 0.3])
                if p_jump > 0 and self._rng.random() < p_jump:
                    self._jump_locked(ch, None)

    def jump(self, name: str, offset_um: np.ndarray | None = None) -> np.ndarray:
        """Apply a sudden offset to a channel's hidden transform (random if None). Returns it."""
        with self._lock:
            return self._jump_locked(self._channels[name], offset_um)

    def _jump_locked(self, ch: ChannelTruth, offset_um: np.ndarray | None) -> np.ndarray:
        if offset_um is None:
            d = self._rng.normal(0, 1, 3) * np.array([1, 1, 0.3])
            offset_um = d / (np.linalg.norm(d) + 1e-12) * self.jump_size_um
        ch.drift_um = ch.drift_um + np.asarray(offset_um, float)
        return np.asarray(offset_um, float)

    # -- truth (tests, benchmarks and the microscope only) -------------------------------
    @property
    def channel_names(self) -> list[str]:
        with self._lock:
            return list(self._channels)

    def truth(self, name: str) -> ChannelTruth:
        """A copy of a channel's hidden truth."""
        with self._lock:
            ch = self._channels[name]
            return ChannelTruth(
                name=ch.name,
                n_axes=ch.n_axes,
                matrix=ch.matrix.copy(),
                approach_unit=ch.approach_unit.copy(),
                offset_um=ch.offset_um.copy(),
                look=ch.look,
                position_um=ch.position_um.copy(),
                drift_um=ch.drift_um.copy(),
                visible=ch.visible,
            )

    def tip_um_for(self, name: str, position_um: np.ndarray) -> np.ndarray:
        """Microscope µm of the tip if the manipulator were at ``position_um`` (device µm)."""
        with self._lock:
            ch = self._channels[name]
            p = np.asarray(position_um, float)
            tip = ch.matrix @ p[:3] + ch.offset_um + ch.drift_um
            if ch.n_axes == 4:
                tip = tip + ch.approach_unit * p[3]
            return tip

    def true_tip_um(self, name: str) -> np.ndarray:
        """Microscope µm (X, Y, Z) of the channel's true tip now."""
        with self._lock:
            return self.tip_um_for(name, self._channels[name].position_um)

    def um_to_px(self, xy_um: np.ndarray) -> np.ndarray:
        """Microscope µm (X, Y, ...) -> pixel (x, y), centre-of-pixel origin."""
        h, w = self.image_size_px
        xy = np.asarray(xy_um, float)[..., :2]
        return xy / self.um_per_px + np.array([(w - 1) / 2, (h - 1) / 2])

    def px_to_um(self, xy_px: np.ndarray) -> np.ndarray:
        """Pixel (x, y) -> microscope µm (X, Y)."""
        h, w = self.image_size_px
        return (np.asarray(xy_px, float) - np.array([(w - 1) / 2, (h - 1) / 2])) * self.um_per_px

    def true_tip_px(self, name: str) -> np.ndarray:
        """Pixel (x, y) of the channel's true tip now."""
        return self.um_to_px(self.true_tip_um(name))

    def set_visible(self, name: str, visible: bool) -> None:
        """Hide or show a pipette (e.g. a broken or withdrawn tip)."""
        with self._lock:
            self._channels[name].visible = visible
