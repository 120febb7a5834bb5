"""Calibration maths: transform round trips, robust fit recovering a known hidden transform,
uncertainty shrinking with more points, Z row assumptions."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.fit import build_calibration, fit_xy
from calibration.transform import ChannelCalibration, px_to_um, um_to_px
from rig.errors import InvalidParams, NotCalibrated
from simulators.world import SimWorld, mounting_matrix


def _calibration(n_axes: int = 3) -> ChannelCalibration:
    matrix = mounting_matrix(30.0, (1.0, -1.0, 1.0), (1.02, 0.98, 1.0), 0.0)
    if n_axes == 4:
        matrix = np.column_stack([matrix, [-0.8, -0.2, -0.5]])
    return ChannelCalibration(
        channel="A",
        matrix=matrix,
        offset_um=np.array([10.0, -20.0, 5.0]),
        matrix_cov=np.zeros((2, n_axes, n_axes)),
        anchor_position_um=np.zeros(n_axes),
        anchor_var_um2=0.01,
        residual_um=0.2,
        n_points=10,
        n_inliers=10,
    )


def test_pixel_convention_matches_world():
    world = SimWorld(um_per_px=0.5, image_size_px=(400, 600))
    pts = np.array([[0.0, 0.0], [12.3, -45.6], [-100.0, 80.0]])
    np.testing.assert_allclose(um_to_px(pts, 0.5, (400, 600)), world.um_to_px(pts))
    np.testing.assert_allclose(px_to_um(um_to_px(pts, 0.5, (400, 600)), 0.5, (400, 600)), pts)
    # microscope (0, 0) is the image centre: pixel ((w-1)/2, (h-1)/2)
    np.testing.assert_allclose(um_to_px(np.zeros(2), 0.5, (400, 600)), [299.5, 199.5])


@pytest.mark.parametrize("n_axes", [3, 4])
def test_forward_inverse_round_trip(n_axes):
    cal = _calibration(n_axes)
    rng = np.random.default_rng(1)
    for _ in range(20):
        current = rng.uniform(-500, 500, n_axes)
        target = rng.uniform(-150, 150, 3)
        p = cal.to_manipulator_um(target, current)
        np.testing.assert_allclose(cal.to_microscope_um(p), target, atol=1e-9)
        if n_axes == 4:
            assert p[3] == current[3]  # convention: the approach axis stays where it is


def test_bad_input_is_rejected():
    cal = _calibration()
    with pytest.raises(InvalidParams):
        cal.to_microscope_um(np.array([1.0, 2.0]))
    with pytest.raises(InvalidParams):
        cal.to_manipulator_um(np.array([np.nan, 0, 0]), np.zeros(3))
    with pytest.raises(InvalidParams):
        ChannelCalibration("A", np.zeros((3, 3)), np.zeros(3), np.zeros((2, 3, 3)), np.zeros(3), 0.0, 0.0, 0, 0)


def test_dict_round_trip():
    cal = _calibration(4)
    again = ChannelCalibration.from_dict(cal.as_dict())
    np.testing.assert_allclose(again.matrix, cal.matrix)
    np.testing.assert_allclose(again.offset_um, cal.offset_um)
    with pytest.raises(InvalidParams, match="offset_um"):
        ChannelCalibration.from_dict({k: v for k, v in cal.as_dict().items() if k != "offset_um"})


def _samples(world: SimWorld, name: str, n: int, rng, noise_um: float, n_outliers: int):
    start = world.manipulator_position_um(name)
    k = start.size
    positions = start + rng.uniform(-60, 60, (n, k)) * (np.arange(k) != 2) + rng.uniform(-4, 4, (n, k)) * (np.arange(k) == 2)
    tips = np.array([world.tip_um_for(name, p)[:2] for p in positions]) + rng.normal(0, noise_um, (n, 2))
    bad = rng.choice(n, n_outliers, replace=False)
    tips[bad] += rng.uniform(15, 40, (n_outliers, 2)) * rng.choice([-1, 1], (n_outliers, 2))
    return positions, tips, bad


@pytest.mark.parametrize("n_axes", [3, 4])
def test_fit_recovers_hidden_transform_with_noise_and_outliers(n_axes):
    rng = np.random.default_rng(7)
    for seed in range(5):
        world = SimWorld(seed=seed)
        world.add_channel("A", n_axes=n_axes, position_um=np.full(n_axes, 1000.0))
        positions, tips, bad = _samples(world, "A", 14, rng, noise_um=0.3, n_outliers=3)
        cal, fit = build_calibration("A", positions, tips, world.focal_z_um)
        assert not fit.inliers[bad].any(), "outliers must be rejected"
        assert fit.inliers.sum() >= 10
        truth = world.truth("A")
        np.testing.assert_allclose(cal.matrix[:2, [0, 1]], truth.matrix[:2, [0, 1]], atol=0.02)
        # the prediction is right where it matters: around the calibrated positions, in XY
        for p in positions:
            assert np.linalg.norm(cal.to_microscope_um(p)[:2] - world.tip_um_for("A", p)[:2]) < 1.0
        assert cal.residual_um < 0.8
        # Z offset is pinned so that the tip is predicted in the focal plane where it was seen
        assert abs(cal.to_microscope_um(world.manipulator_position_um("A"))[2] - world.focal_z_um) < 10.0


def test_uncertainty_shrinks_with_more_points():
    world = SimWorld(seed=3)
    world.add_channel("A", position_um=np.full(3, 500.0))
    rng = np.random.default_rng(0)
    widths = []
    for n in (6, 24, 96):
        positions, tips, _ = _samples(world, "A", n, rng, noise_um=0.5, n_outliers=0)
        cal, _ = build_calibration("A", positions, tips, 0.0)
        widths.append(cal.uncertainty_um(positions[0] + 30.0))
    assert widths[0] > widths[1] > widths[2]


def test_fit_needs_enough_points_and_agreement():
    with pytest.raises(NotCalibrated):
        fit_xy(np.zeros((2, 3)) + np.arange(2)[:, None], np.zeros((2, 2)))
    rng = np.random.default_rng(0)
    positions = rng.uniform(-50, 50, (8, 3))
    tips = rng.uniform(-100, 100, (8, 2))  # random: no consistent transform
    with pytest.raises(NotCalibrated):
        fit_xy(positions, tips)


def test_unmoved_axis_gets_zero_gain_and_wide_prior():
    rng = np.random.default_rng(2)
    positions = np.column_stack([rng.uniform(-50, 50, 8), rng.uniform(-50, 50, 8), np.zeros(8)])
    tips = positions[:, :2] @ np.array([[0.0, 1.0], [-1.0, 0.0]]).T + 3.0
    fit = fit_xy(positions, tips)
    assert list(fit.measured_axes) == [True, True, False]
    np.testing.assert_allclose(fit.a_xy[:, 2], 0.0)
    assert fit.matrix_cov[0, 2, 2] > 1e-3
