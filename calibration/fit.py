"""Robust fitting of a channel's calibration from (manipulator position, tip pixel) pairs.

What is estimated, and what is assumed:

- **Estimated** (from the detections, least squares with outlier rejection): the X and Y rows
  of the affine map, i.e. how far and in which image direction each manipulator axis moves
  the tip (this absorbs the mounting azimuth, axis signs, axis scales and the in-plane part of
  any tilt), and the X, Y offset. RANSAC over minimal subsets picks the inliers, then
  ordinary least squares on the inliers is iterated with a MAD-based threshold. The residual
  (RMS over inliers, µm) and the parameter covariance come from the inliers.
- **Assumed** (a frame shows tips only in X and Y): the Z row. The manipulator's z axis is
  taken as vertical (its Z gain is the mean in-plane scale of the x and y axes, reduced by
  whatever in-plane motion the z axis showed) and the x and y axes as horizontal; the sign of
  z (does +z move the tip up?) is a rig fact given by the caller (default +1 = up). The
  approach axis of a 4-axis device is assumed to move the tip along a unit vector pointing
  down into the tissue, so its Z gain is ``-sqrt(1 - |in-plane gain|^2)``.
- **Z offset**: every detection used is in focus, so the tip was at the frame's focal plane
  (``Frame.z_um``, else the configured ``focal_z_um``, else 0) when it was seen; the Z offset
  is the mean of ``z_focal - Zrow @ position`` over the inliers.

Axes that did not move during calibration (e.g. z steps that all lost the tip) get an
in-plane gain of 0 with a wide prior covariance (0.05² per entry), and the fit says so.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from calibration.transform import ChannelCalibration
from rig.errors import NotCalibrated

#: prior variance of an in-plane gain that was not measured (5 % of an axis' travel)
UNMEASURED_GAIN_VAR = 0.05**2


@dataclass(frozen=True)
class XYFit:
    """The in-plane part of a fit. Gains in µm (microscope) per µm (manipulator)."""

    a_xy: np.ndarray  # (2, k) in-plane gain of each axis
    b_xy: np.ndarray  # (2,) in-plane offset, µm
    matrix_cov: np.ndarray  # (2, k, k) covariance of the rows of a_xy
    anchor_position_um: np.ndarray  # (k,) centroid of the inlier positions
    anchor_var_um2: float  # variance of the prediction at the anchor, per coordinate
    residual_um: float  # RMS radial residual of the inliers
    residuals_um: np.ndarray  # (n,) radial residual of every point
    inliers: np.ndarray  # (n,) bool
    measured_axes: np.ndarray  # (k,) bool, axes that moved enough to be fitted
    noise_um: float  # per-coordinate noise estimate (µm)


def _solve(design: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """Least squares ``design @ coef = targets``; None if rank deficient."""
    if np.linalg.matrix_rank(design, tol=1e-6) < design.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(design, targets, rcond=None)
    return coef


def fit_xy(
    positions_um: np.ndarray,
    tips_xy_um: np.ndarray,
    *,
    min_threshold_um: float = 2.0,
    min_axis_travel_um: float = 0.5,
    max_subsets: int = 400,
    seed: int = 0,
) -> XYFit:
    """Fit ``tip_xy = a_xy @ position + b_xy`` robustly.

    ``positions_um`` (n, k) manipulator µm; ``tips_xy_um`` (n, 2) microscope µm. Points whose
    radial residual exceeds ``max(min_threshold_um, 3.5 * robust sigma)`` are outliers.
    Raises NotCalibrated when too few points remain to fit the axes that moved.
    """
    p = np.asarray(positions_um, float)
    t = np.asarray(tips_xy_um, float)
    if p.ndim != 2 or t.shape != (p.shape[0], 2):
        raise ValueError("positions_um must be (n, k) and tips_xy_um (n, 2)")
    n, k = p.shape
    measured = np.ptp(p, axis=0) >= min_axis_travel_um if n else np.zeros(k, bool)
    cols = np.flatnonzero(measured)
    m = len(cols) + 1  # parameters per coordinate
    if n < m + 1:
        raise NotCalibrated(f"only {n} usable tip positions; at least {m + 1} needed to fit {len(cols)} axes")
    design_all = np.column_stack([p[:, cols], np.ones(n)])

    def residuals(coef: np.ndarray) -> np.ndarray:
        return np.linalg.norm(design_all @ coef - t, axis=1)

    # RANSAC over minimal subsets: keep the hypothesis with the most inliers (then least cost).
    rng = np.random.default_rng(seed)
    combos = list(itertools.combinations(range(n), m)) if _n_choose_k(n, m) <= max_subsets else None
    best: tuple[int, float, np.ndarray] | None = None
    for i in range(len(combos) if combos is not None else max_subsets):
        idx = np.array(combos[i]) if combos is not None else rng.choice(n, size=m, replace=False)
        coef = _solve(design_all[idx], t[idx])
        if coef is None:
            continue
        r = residuals(coef)
        inl = r <= min_threshold_um
        cost = float(np.sum(np.minimum(r, min_threshold_um) ** 2))
        key = (int(inl.sum()), -cost)
        if best is None or key > (best[0], -best[1]):
            best = (key[0], cost, coef)
    if best is None:
        raise NotCalibrated("the axis moves are degenerate: no subset of positions spans the moved axes")
    inliers = residuals(best[2]) <= min_threshold_um

    # Refine: least squares on the inliers, then a robust threshold from the MAD, until stable.
    coef = best[2]
    for _ in range(10):
        if inliers.sum() < m + 1:
            break
        sol = _solve(design_all[inliers], t[inliers])
        if sol is None:
            break
        coef = sol
        r = residuals(coef)
        sigma = float(np.median(r[inliers])) / 1.1774  # Rayleigh median -> per-coordinate sigma
        threshold = max(min_threshold_um, 3.5 * sigma)
        new = r <= threshold
        if np.array_equal(new, inliers):
            break
        inliers = new
    n_in = int(inliers.sum())
    if n_in < m + 1:
        raise NotCalibrated(f"only {n_in} of {n} tip positions agree with one another; need {m + 1}")
    r = residuals(coef)
    resid_in = design_all[inliers] @ coef - t[inliers]
    dof = max(2 * (n_in - m), 1)
    noise2 = float(np.sum(resid_in**2) / dof)
    centroid = p[inliers].mean(axis=0)
    centred = p[inliers][:, cols] - centroid[cols]
    xtx_inv = np.linalg.inv(centred.T @ centred)
    a_xy = np.zeros((2, k))
    a_xy[:, cols] = coef[:-1].T
    b_xy = coef[-1]
    cov = np.zeros((2, k, k))
    for row in range(2):
        cov[row][np.ix_(cols, cols)] = noise2 * xtx_inv
        for j in np.flatnonzero(~measured):
            cov[row][j, j] = UNMEASURED_GAIN_VAR
    return XYFit(
        a_xy=a_xy,
        b_xy=np.asarray(b_xy, float),
        matrix_cov=cov,
        anchor_position_um=centroid,
        anchor_var_um2=noise2 / n_in,
        residual_um=float(np.sqrt(np.mean(r[inliers] ** 2))),
        residuals_um=r,
        inliers=inliers,
        measured_axes=measured,
        noise_um=float(np.sqrt(noise2)),
    )


def _n_choose_k(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def complete_z_row(a_xy: np.ndarray, *, z_up_sign: float = 1.0) -> tuple[np.ndarray, str]:
    """The full (3, k) matrix from the fitted in-plane gains and the geometric assumptions.

    Returns the matrix and a sentence saying what was assumed.
    """
    a = np.asarray(a_xy, float)
    k = a.shape[1]
    scale = float(np.mean(np.linalg.norm(a[:, :2], axis=0)))
    a_z = float(np.linalg.norm(a[:, 2]))
    z_gain = float(np.sign(z_up_sign) or 1.0) * np.sqrt(max(scale**2 - a_z**2, 0.5 * scale**2))
    z_row = np.zeros(k)
    z_row[2] = z_gain
    text = (
        f"Z row assumed: x, y horizontal; z vertical with gain {z_gain:+.3f} "
        f"({'up' if z_gain > 0 else 'down'} for +z, sign given, not measured)"
    )
    if k == 4:
        a_d = float(np.linalg.norm(a[:, 3]))
        z_row[3] = -np.sqrt(max(1.0 - a_d**2, 0.0))
        text += f"; approach axis assumed a unit vector into the tissue (Z gain {z_row[3]:+.3f})"
    return np.vstack([a, z_row]), text


def build_calibration(
    channel: str,
    positions_um: np.ndarray,
    tips_xy_um: np.ndarray,
    focal_z_um: np.ndarray | float,
    *,
    z_up_sign: float = 1.0,
    min_threshold_um: float = 2.0,
    seed: int = 0,
) -> tuple[ChannelCalibration, XYFit]:
    """Fit the in-plane rows robustly, complete the Z row, pin the Z offset to the focal plane."""
    p = np.asarray(positions_um, float)
    fit = fit_xy(p, tips_xy_um, min_threshold_um=min_threshold_um, seed=seed)
    matrix, z_text = complete_z_row(fit.a_xy, z_up_sign=z_up_sign)
    z_focal = np.broadcast_to(np.asarray(focal_z_um, float), (p.shape[0],))
    z_offset = float(np.mean(z_focal[fit.inliers] - p[fit.inliers] @ matrix[2]))
    calibration = ChannelCalibration(
        channel=channel,
        matrix=matrix,
        offset_um=np.array([fit.b_xy[0], fit.b_xy[1], z_offset]),
        matrix_cov=fit.matrix_cov,
        anchor_position_um=fit.anchor_position_um,
        anchor_var_um2=fit.anchor_var_um2,
        residual_um=fit.residual_um,
        n_points=int(p.shape[0]),
        n_inliers=int(fit.inliers.sum()),
        z_model=z_text,
        z_up_sign=float(np.sign(z_up_sign) or 1.0),
    )
    return calibration, fit
