"""One channel's calibration: manipulator µm -> microscope µm -> pixels, its inverse, its uncertainty.

Frames (as in ``simulators/world.py`` and DESIGN.md):
- manipulator: µm on the device's own axes (x, y, z and, for 4-axis devices, the approach
  axis ``d``, which moves the tip along the pipette at an angle);
- microscope: µm, image-aligned X (columns), Y (rows), focal Z (positive = up, away from
  the tissue), with (0, 0) at the image centre;
- pixels: x = column, y = row, origin at the centre of the top-left pixel, so microscope
  (X, Y) sits at pixel (X / um_per_px + (w - 1) / 2, Y / um_per_px + (h - 1) / 2). The pixel
  size and the image shape always come from the frame at hand, never from the calibration.

The model is affine:  tip_um = matrix @ position_um + offset_um,  ``matrix`` (3, n_axes).
Its X and Y rows are measured (fitted from tip detections); its Z row is completed from
geometry (see ``calibration.fit``), because a two-photon frame shows tips only in X and Y.

Inverse convention for 4-axis devices: the approach axis is kept where it is and x, y, z are
solved, so that a tip moves in the focal plane without advancing along the pipette.

Uncertainty: each XY row's prediction variance at a position ``p`` is
    (p - anchor)^T matrix_cov (p - anchor) + anchor_var_um2
where ``anchor_position_um`` is where the offset was last pinned (the centroid of the fit, or
the position of the last "set tip"), ``matrix_cov`` the fit covariance of the row's matrix
entries (µm²/µm²), and ``anchor_var_um2`` the variance of the tip position at the anchor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from rig.errors import InvalidParams


def um_to_px(xy_um: np.ndarray, um_per_px: float, shape_hw: tuple[int, int]) -> np.ndarray:
    """Microscope (X, Y[, ...]) µm -> pixel (x, y), pixel-centre origin, (0, 0) µm at the centre."""
    h, w = shape_hw
    xy = np.asarray(xy_um, float)[..., :2]
    return xy / float(um_per_px) + np.array([(w - 1) / 2.0, (h - 1) / 2.0])


def px_to_um(xy_px: np.ndarray, um_per_px: float, shape_hw: tuple[int, int]) -> np.ndarray:
    """Pixel (x, y) -> microscope (X, Y) µm; the inverse of ``um_to_px``."""
    h, w = shape_hw
    return (np.asarray(xy_px, float)[..., :2] - np.array([(w - 1) / 2.0, (h - 1) / 2.0])) * float(um_per_px)


MAX_CONDITION = 1e6  # a matrix's x, y, z columns this close to dependent are refused, at any scale


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_number(value: Any, name: str, *, minimum: float | None = None) -> float:
    """A finite JSON number (not a string, not a boolean), at least ``minimum``; else InvalidParams."""
    number = _finite_float(value) if _is_number(value) else None
    if number is None:
        raise InvalidParams(f"calibration {name} must be a finite number, got {_short(value)}")
    if minimum is not None and number < minimum:
        raise InvalidParams(f"calibration {name} must be at least {minimum:g}, got {value!r}")
    return number


def _finite_float(value: int | float) -> float | None:
    """``value`` as a finite float, or None (NaN, infinite, or an integer too large for one)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _short(value: Any) -> str:
    """``repr(value)``, cut to 40 characters (a damaged file may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def json_count(value: Any, name: str) -> int:
    """A non-negative JSON integer (not a boolean); else InvalidParams."""
    if type(value) is not int or value < 0:
        raise InvalidParams(f"calibration {name} must be a non-negative integer, got {value!r}")
    return value


def json_numbers(value: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A nested JSON list of finite numbers of exactly ``shape`` (any regular shape when None),
    as float64; ragged lists, strings, booleans, NaN and other shapes are InvalidParams."""
    if not isinstance(value, list):
        raise InvalidParams(f"calibration {name} must be a list of numbers")
    array = np.asarray(value, dtype=object)
    if shape is not None and array.shape != shape:
        raise InvalidParams(f"calibration {name} must have shape {shape}, got {array.shape}")
    flat = array.reshape(-1)
    if not all(_is_number(v) for v in flat):
        raise InvalidParams(f"calibration {name} must hold numbers only (no strings, booleans or ragged lists)")
    numbers = [_finite_float(v) for v in flat]
    if any(v is None for v in numbers):
        raise InvalidParams(f"calibration {name} is not finite")
    return np.array(numbers, dtype=float).reshape(array.shape)


@dataclass(frozen=True)
class ChannelCalibration:
    """The calibration of one channel (immutable; updates return a new object).

    ``matrix``: (3, n_axes) manipulator µm -> microscope µm (rows X, Y, Z).
    ``offset_um``: (3,) microscope µm of the tip at manipulator zero.
    ``matrix_cov``: (2, n_axes, n_axes) covariance of the X and Y rows of ``matrix``.
    ``anchor_position_um`` / ``anchor_var_um2``: see the module docstring.
    ``residual_um``: RMS XY residual of the fit's inliers (µm).
    ``z_model``: how the Z row was obtained (a sentence, for people).
    ``z_up_sign``: +1 if manipulator +z was assumed/known to move the tip up, -1 if down.
    """

    channel: str
    matrix: np.ndarray
    offset_um: np.ndarray
    matrix_cov: np.ndarray
    anchor_position_um: np.ndarray
    anchor_var_um2: float
    residual_um: float
    n_points: int
    n_inliers: int
    z_model: str = "assumed"
    z_up_sign: float = 1.0
    created_s: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, float)
        if m.ndim != 2 or m.shape[0] != 3 or m.shape[1] not in (3, 4):
            raise InvalidParams(f"calibration matrix must be (3, 3) or (3, 4), got {m.shape}")
        if not np.all(np.isfinite(m)):
            raise InvalidParams("calibration matrix is not finite")
        off = np.asarray(self.offset_um, float).reshape(-1)
        if off.shape != (3,) or not np.all(np.isfinite(off)):
            raise InvalidParams("calibration offset_um must be 3 finite numbers")
        if abs(np.linalg.det(m[:, :3])) < 1e-6 or np.linalg.cond(m[:, :3]) > MAX_CONDITION:
            raise InvalidParams("calibration matrix is singular (or nearly): x, y, z axes are not independent")
        object.__setattr__(self, "matrix", m.copy())
        object.__setattr__(self, "offset_um", off.copy())
        object.__setattr__(self, "matrix_cov", np.asarray(self.matrix_cov, float).reshape(2, m.shape[1], m.shape[1]).copy())
        object.__setattr__(self, "anchor_position_um", np.asarray(self.anchor_position_um, float).reshape(m.shape[1]).copy())

    @property
    def n_axes(self) -> int:
        return int(self.matrix.shape[1])

    # -- forward ------------------------------------------------------------------------
    def _position(self, position_um: np.ndarray) -> np.ndarray:
        p = np.asarray(position_um, float).reshape(-1)
        if p.shape != (self.n_axes,):
            raise InvalidParams(f"position has {p.size} axes, the calibration has {self.n_axes}", channel=self.channel)
        if not np.all(np.isfinite(p)):
            raise InvalidParams("position is not finite", channel=self.channel)
        return p

    def to_microscope_um(self, position_um: np.ndarray) -> np.ndarray:
        """Manipulator µm (n_axes,) -> microscope µm (X, Y, Z)."""
        return self.matrix @ self._position(position_um) + self.offset_um

    def to_px(self, position_um: np.ndarray, um_per_px: float, shape_hw: tuple[int, int]) -> np.ndarray:
        """Manipulator µm -> pixel (x, y) in a frame of pixel size ``um_per_px`` and shape (h, w)."""
        return um_to_px(self.to_microscope_um(position_um), um_per_px, shape_hw)

    # -- inverse ------------------------------------------------------------------------
    def to_manipulator_um(self, target_um: np.ndarray, current_position_um: np.ndarray) -> np.ndarray:
        """Microscope µm (X, Y, Z) -> the manipulator position (n_axes,) that puts the tip there.

        4-axis devices keep the approach axis at ``current_position_um[3]`` and solve x, y, z.
        Nothing is checked against limits here; callers check before moving.
        """
        t = np.asarray(target_um, float).reshape(-1)
        if t.shape != (3,) or not np.all(np.isfinite(t)):
            raise InvalidParams("target must be 3 finite microscope µm (X, Y, Z)", channel=self.channel)
        current = self._position(current_position_um)
        rhs = t - self.offset_um
        if self.n_axes == 4:
            rhs = rhs - self.matrix[:, 3] * current[3]
        xyz = np.linalg.solve(self.matrix[:, :3], rhs)
        out = current.copy()
        out[:3] = xyz
        return out

    def px_to_microscope_um(
        self, xy_px: np.ndarray, um_per_px: float, shape_hw: tuple[int, int], z_um: float
    ) -> np.ndarray:
        """Pixel (x, y) plus a focal Z (µm) -> microscope µm (X, Y, Z)."""
        xy = px_to_um(xy_px, um_per_px, shape_hw)
        return np.array([xy[0], xy[1], float(z_um)])

    # -- uncertainty --------------------------------------------------------------------
    def xy_std_um(self, position_um: np.ndarray) -> np.ndarray:
        """1-sigma uncertainty (µm) of the predicted X and Y at ``position_um``."""
        dp = self._position(position_um) - self.anchor_position_um
        var = np.array([dp @ self.matrix_cov[i] @ dp for i in range(2)]) + self.anchor_var_um2
        return np.sqrt(np.maximum(var, 0.0))

    def uncertainty_um(self, position_um: np.ndarray) -> float:
        """Radial 1-sigma XY uncertainty (µm) of the predicted tip at ``position_um``."""
        return float(np.linalg.norm(self.xy_std_um(position_um)))

    # -- updates ------------------------------------------------------------------------
    def with_offset(
        self, offset_um: np.ndarray, *, anchor_position_um: np.ndarray | None = None, anchor_var_um2: float | None = None
    ) -> ChannelCalibration:
        """A copy with a new offset (µm); optionally re-pinned at a new anchor position."""
        return replace(
            self,
            offset_um=np.asarray(offset_um, float),
            anchor_position_um=self.anchor_position_um if anchor_position_um is None else np.asarray(anchor_position_um, float),
            anchor_var_um2=self.anchor_var_um2 if anchor_var_um2 is None else float(anchor_var_um2),
        )

    def shifted_xy(self, delta_xy_um: np.ndarray) -> ChannelCalibration:
        """A copy whose X, Y offset moved by ``delta_xy_um`` (µm)."""
        off = self.offset_um.copy()
        off[:2] += np.asarray(delta_xy_um, float)[:2]
        return replace(self, offset_um=off)

    # -- (de)serialisation --------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (units in key names)."""
        return {
            "channel": self.channel,
            "n_axes": self.n_axes,
            "matrix_um_per_um": self.matrix.tolist(),
            "offset_um": self.offset_um.tolist(),
            "matrix_cov_um2_per_um2": self.matrix_cov.tolist(),
            "anchor_position_um": self.anchor_position_um.tolist(),
            "anchor_var_um2": float(self.anchor_var_um2),
            "residual_um": float(self.residual_um),
            "n_points": int(self.n_points),
            "n_inliers": int(self.n_inliers),
            "z_model": self.z_model,
            "z_up_sign": float(self.z_up_sign),
            "created_s": float(self.created_s),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelCalibration:
        """Inverse of ``as_dict`` for JSON read from a file; raises InvalidParams naming the
        missing or bad key. Strict: every array has exactly its shape (nothing is reshaped),
        every value is a finite number (no strings, no booleans, no NaN), counts are
        non-negative integers, variances non-negative, ``z_up_sign`` is +1 or -1."""
        if not isinstance(data, dict):
            raise InvalidParams("calibration is not a JSON object")
        try:
            matrix = json_numbers(data["matrix_um_per_um"], "matrix_um_per_um")
            if matrix.ndim != 2 or matrix.shape[0] != 3 or matrix.shape[1] not in (3, 4):
                raise InvalidParams(f"calibration matrix_um_per_um must be 3x3 or 3x4, got shape {matrix.shape}")
            n = matrix.shape[1]
            if "n_axes" in data and (type(data["n_axes"]) is not int or data["n_axes"] != n):
                raise InvalidParams(f"calibration n_axes {data['n_axes']!r} does not match its {n}-column matrix")
            channel = data["channel"]
            if not isinstance(channel, str):
                raise InvalidParams("calibration channel must be a string")
            n_points, n_inliers = json_count(data["n_points"], "n_points"), json_count(data["n_inliers"], "n_inliers")
            if n_inliers > n_points:
                raise InvalidParams(f"calibration has more inliers ({n_inliers}) than points ({n_points})")
            z_up_sign = json_number(data.get("z_up_sign", 1.0), "z_up_sign")
            if z_up_sign not in (1.0, -1.0):
                raise InvalidParams(f"calibration z_up_sign must be 1 or -1, got {z_up_sign:g}")
            z_model = data.get("z_model", "assumed")
            if not isinstance(z_model, str):
                raise InvalidParams("calibration z_model must be a string")
            matrix_cov = json_numbers(data["matrix_cov_um2_per_um2"], "matrix_cov_um2_per_um2", (2, n, n))
            for row in matrix_cov:  # a covariance is symmetric with no negative variance
                if not np.allclose(row, row.T, rtol=1e-6, atol=1e-12) or np.linalg.eigvalsh(row).min() < -1e-9 * max(
                    1.0, float(np.abs(row).max())
                ):
                    raise InvalidParams("calibration matrix_cov_um2_per_um2 must be symmetric positive semi-definite")
            return cls(
                channel=channel,
                matrix=matrix,
                offset_um=json_numbers(data["offset_um"], "offset_um", (3,)),
                matrix_cov=matrix_cov,
                anchor_position_um=json_numbers(data["anchor_position_um"], "anchor_position_um", (n,)),
                anchor_var_um2=json_number(data["anchor_var_um2"], "anchor_var_um2", minimum=0.0),
                residual_um=json_number(data["residual_um"], "residual_um", minimum=0.0),
                n_points=n_points,
                n_inliers=n_inliers,
                z_model=z_model,
                z_up_sign=z_up_sign,
                created_s=json_number(data.get("created_s", 0.0), "created_s", minimum=0.0),
            )
        except KeyError as exc:
            raise InvalidParams(f"calibration is missing key {exc.args[0]!r}") from None
