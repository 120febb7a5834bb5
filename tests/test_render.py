"""The renderer: the pixel-centre label convention on noiseless renders, visibility labels,
defocus, noise statistics, bit depths and per-seed determinism of synthetic examples."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from simulators.render import (
    Optics,
    Pipette,
    Sensor,
    expose,
    label_tip,
    mean_of_frames,
    render_pipettes,
    um_to_px,
)
from simulators.scene import BackgroundParams, Scene, render_scene, sample_scene
from simulators.synth import sample_example
from simulators.world import SimWorld

OPTICS = Optics(size_px=(96, 128), um_per_px=0.5, psf_sigma_um=0.4, defocus_blur=0.0)


def tip_at_px(x_px: float, y_px: float, optics: Optics = OPTICS, z_um: float = 0.0) -> tuple[float, float, float]:
    """Microscope µm of pixel (x, y) under the pixel-centre convention."""
    h, w = optics.size_px
    return ((x_px - (w - 1) / 2) * optics.um_per_px, (y_px - (h - 1) / 2) * optics.um_per_px, z_um)


def test_pixel_convention_matches_the_world() -> None:
    world = SimWorld(um_per_px=0.5, image_size_px=(96, 128))
    for xy_um in [(0.0, 0.0), (3.25, -7.5), (-31.75, 23.75)]:
        assert um_to_px(*xy_um, OPTICS) == pytest.approx(tuple(world.um_to_px(np.array(xy_um))))
    # microscope (0, 0) is the image centre: between pixels 63 and 64 horizontally
    assert um_to_px(0.0, 0.0, OPTICS) == (63.5, 47.5)


@pytest.mark.parametrize("x_px, y_px", [(40.3, 30.8), (71.62, 55.05), (90.5, 20.0)])
def test_dye_spot_centroid_is_the_label_to_a_hundredth_of_a_pixel(x_px: float, y_px: float) -> None:
    p = Pipette(tip_at_px(x_px, y_px), azimuth_deg=30.0, shadow=0.0, tip_spot=1.0, tip_spot_um=0.6)
    glow = render_pipettes([p], OPTICS).glow
    yy, xx = np.mgrid[0:96, 0:128]
    win = (np.abs(xx - x_px) < 8) & (np.abs(yy - y_px) < 8)
    g = np.where(win, glow, 0.0)
    cx, cy = (g * xx).sum() / g.sum(), (g * yy).sum() / g.sum()
    label = label_tip(p, OPTICS)
    assert (label.x_px, label.y_px) == pytest.approx((x_px, y_px), abs=1e-9)
    assert cx == pytest.approx(x_px, abs=0.01)
    assert cy == pytest.approx(y_px, abs=0.01)
    # the brightest pixel is the one that contains the label
    iy, ix = np.unravel_index(np.argmax(glow), glow.shape)
    assert abs(ix - x_px) <= 0.5 and abs(iy - y_px) <= 0.5


def test_glass_is_centred_on_the_axis_and_ends_exactly_at_the_tip() -> None:
    """A wide, flat, in-focus pipette pointing left: its cross-profile is centred on the tip's
    row and its end (50 % coverage along the axis) is at the tip's column."""
    x_tip, y_tip = 50.37, 45.71
    p = Pipette(
        tip_at_px(x_tip, y_tip), azimuth_deg=0.0, elevation_deg=0.1, tip_radius_um=3.0,
        half_angle_deg=0.5, shadow=1.0,
    )
    cov = 1.0 - render_pipettes([p], OPTICS).transmission
    # across the shank, 20 px behind the tip: symmetric about y_tip
    col = cov[:, 70].astype(np.float64)
    rows = np.arange(96)
    assert (col * rows).sum() / col.sum() == pytest.approx(y_tip, abs=0.02)
    # along the axis: on the two rows around the axis, interpolate the 50 % crossing
    for row in (45, 46):
        profile = cov[row, 30:70].astype(np.float64)
        i = int(np.argmax(profile >= 0.5 * profile[-1]))
        x_half = 30 + i - 1 + (0.5 * profile[-1] - profile[i - 1]) / (profile[i] - profile[i - 1])
        assert x_half == pytest.approx(x_tip, abs=0.05)
    # nothing in front of the tip
    assert cov[:, : int(x_tip) - 5].max() < 1e-3


@pytest.mark.parametrize("azimuth_deg", [0.0, 45.0, 135.0, 200.0, 290.0])
def test_shank_extends_toward_the_azimuth_to_the_border(azimuth_deg: float) -> None:
    x_tip, y_tip = 64.0, 48.0
    p = Pipette(tip_at_px(x_tip, y_tip), azimuth_deg=azimuth_deg, shadow=0.9)
    cov = 1.0 - render_pipettes([p], OPTICS).transmission
    a = math.radians(azimuth_deg)
    # a point 40 px along the shank is covered; one 10 px in front of the tip is not
    sx, sy = x_tip + 40 * math.cos(a), y_tip + 40 * math.sin(a)
    fx, fy = x_tip - 10 * math.cos(a), y_tip - 10 * math.sin(a)
    assert cov[round(sy), round(sx)] > 0.2
    assert cov[round(fy), round(fx)] < 0.01
    # the shank reaches the border of the frame
    border = np.concatenate([cov[0], cov[-1], cov[:, 0], cov[:, -1]])
    assert border.max() > 0.05


def test_rising_shank_is_soft_and_wide_while_the_tip_is_sharp() -> None:
    optics = Optics(size_px=(64, 256), um_per_px=0.5, psf_sigma_um=0.4, defocus_blur=0.3, max_blur_um=30)
    p = Pipette(tip_at_px(20.0, 31.5, optics), azimuth_deg=0.0, elevation_deg=30.0, shadow=0.9)
    cov = 1.0 - render_pipettes([p], optics).transmission

    def width_px(col: int) -> float:
        c = cov[:, col].astype(np.float64)
        m = (c * np.arange(64)).sum() / c.sum()
        return math.sqrt((c * (np.arange(64) - m) ** 2).sum() / c.sum())

    near, far = width_px(25), width_px(150)
    assert far > 4 * near
    assert cov[:, 25].max() > 1.5 * cov[:, 150].max()  # soft: lower peak contrast far up the shank


def test_visibility_labels_are_explicit() -> None:
    optics = Optics(size_px=(96, 128), um_per_px=0.5, visible_defocus_um=10.0)
    inside = label_tip(Pipette(tip_at_px(10.0, 10.0, optics, z_um=3.0), 0.0), optics)
    assert inside.visible and inside.reason == "visible"
    left = label_tip(Pipette(tip_at_px(-0.6, 10.0, optics), 0.0), optics)
    assert not left.visible and left.reason == "outside_frame"
    edge = label_tip(Pipette(tip_at_px(-0.5, 95.4, optics), 0.0), optics)
    assert edge.visible
    below = label_tip(Pipette(tip_at_px(10.0, 95.5, optics), 0.0), optics)
    assert below.reason == "outside_frame"
    far = label_tip(Pipette(tip_at_px(40.0, 40.0, optics, z_um=-25.0), 0.0), optics)
    assert not far.visible and far.reason == "out_of_focus" and far.defocus_um == -25.0


def _plain_scene(pipette: Pipette, photons: float) -> Scene:
    optics = Optics(size_px=(96, 128), um_per_px=0.5)
    sensor = Sensor(photons_per_unit=photons, gain_adu=10.0, offset_adu=100.0, read_noise_adu=2.0)
    background = BackgroundParams(seed=1, texture_amp=0.0, fine_texture_amp=0.0, bright_cells=0, dark_cells=0, n_vessels=0)
    return Scene("in_vivo", optics, (pipette,), background, sensor)


def test_a_tip_drowned_in_noise_is_labelled_low_contrast() -> None:
    rng = np.random.default_rng(0)
    faint = Pipette(tip_at_px(60.0, 50.0), 20.0, shadow=0.03)
    _, labels = render_scene(_plain_scene(faint, photons=0.5), rng)
    assert labels[0].reason == "low_contrast" and not labels[0].visible
    clear = Pipette(tip_at_px(60.0, 50.0), 20.0, shadow=0.9, tip_spot=2.0)
    _, labels = render_scene(_plain_scene(clear, photons=10.0), rng)
    assert labels[0].visible


def test_a_faint_tip_inside_another_pipettes_shadow_is_hidden_by_it() -> None:
    """A tip's contrast is measured against the frame without THAT pipette: the dark shadow of
    another pipette lying over it does not make it visible."""
    rng = np.random.default_rng(5)
    faint = Pipette(tip_at_px(60.0, 50.0), 20.0, shadow=0.03)
    # a wide, dark, sharp pipette whose shank covers (60, 50): its tip is 20 px further on
    cover = Pipette(tip_at_px(80.0, 50.0), 180.0, tip_radius_um=6.0, half_angle_deg=8.0, shadow=0.9)
    scene = replace(_plain_scene(faint, photons=10.0), pipettes=(faint, cover))
    _, labels = render_scene(scene, rng)
    assert labels[0].reason == "low_contrast"
    assert labels[1].visible  # the covering pipette's own tip is clear
    # the same tip, strong enough to show through the shadow, stays visible
    strong = replace(faint, shadow=0.9, tip_spot=3.0)
    _, labels = render_scene(replace(scene, pipettes=(strong, cover)), rng)
    assert labels[0].visible and labels[1].visible


def test_exact_poisson_noise_has_poisson_statistics() -> None:
    rng = np.random.default_rng(3)
    expected = np.full((256, 256), 1.0, np.float32)
    sensor = Sensor(photons_per_unit=4.0, gain_adu=1.0, offset_adu=0.0, read_noise_adu=0.0)
    counts = expose(expected, sensor, rng).astype(np.float64)
    assert counts.mean() == pytest.approx(4.0, rel=0.02)
    assert counts.var() == pytest.approx(4.0, rel=0.05)
    assert np.array_equal(counts, np.round(counts))  # photon counts are integers


def test_fast_noise_matches_mean_and_variance_and_line_noise_is_per_row() -> None:
    rng = np.random.default_rng(4)
    expected = np.full((256, 256), 2.0, np.float32)
    sensor = Sensor(photons_per_unit=5.0, gain_adu=20.0, offset_adu=300.0, read_noise_adu=10.0, exact_poisson=False)
    img = expose(expected, sensor, rng).astype(np.float64)
    assert img.mean() == pytest.approx(300 + 20 * 10, rel=0.01)
    assert img.var() == pytest.approx(20**2 * 10 + 10**2, rel=0.06)
    lined = Sensor(photons_per_unit=5.0, gain_adu=20.0, offset_adu=300.0, read_noise_adu=0.0, line_offset_adu=40.0, exact_poisson=False)
    img = expose(expected, lined, rng).astype(np.float64)
    row_means = img.mean(axis=1)
    assert row_means.std() > 30  # whole rows shift together
    assert img.mean(axis=0).std() < 10


def test_the_mean_of_k_frames_keeps_the_counts_and_divides_the_noise_variance_by_k() -> None:
    """``mean_of_frames``: K times the photons at 1/K of the gain; every noise variance / K."""
    expected = np.full((256, 256), 2.0, np.float32)
    one = Sensor(photons_per_unit=5.0, gain_adu=20.0, offset_adu=300.0, read_noise_adu=10.0,
                 line_offset_adu=8.0, exact_poisson=False)
    four = mean_of_frames(one, 4)
    assert mean_of_frames(one, 1) is one
    assert four.photons_per_unit == 20.0 and four.gain_adu == 5.0
    assert (four.read_noise_adu, four.line_offset_adu) == (5.0, 4.0)
    a = expose(expected, one, np.random.default_rng(5)).astype(np.float64)
    b = expose(expected, four, np.random.default_rng(5)).astype(np.float64)
    assert b.mean() == pytest.approx(a.mean(), rel=0.01)
    def within_rows_var(img: np.ndarray) -> float:
        return float((img - img.mean(axis=1, keepdims=True)).var())

    assert within_rows_var(b) == pytest.approx(within_rows_var(a) / 4, rel=0.08)
    assert b.mean(axis=1).std() == pytest.approx(a.mean(axis=1).std() / 2, rel=0.25)  # scan-line offsets
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="whole number"):
            mean_of_frames(one, bad)  # type: ignore[arg-type]


def test_bit_depths_and_clipping() -> None:
    rng = np.random.default_rng(0)
    expected = np.full((32, 32), 1.0, np.float32)
    expected[0, 0] = 1e6
    eight = expose(expected, Sensor(photons_per_unit=4, gain_adu=10, offset_adu=5, bit_depth=8), rng)
    sixteen = expose(expected, Sensor(photons_per_unit=4, gain_adu=10, offset_adu=5, bit_depth=16), rng)
    assert eight.dtype == np.uint8 and eight[0, 0] == 255
    assert sixteen.dtype == np.uint16 and sixteen[0, 0] == 65535
    with pytest.raises(ValueError, match="bit_depth"):
        expose(expected, Sensor(bit_depth=12), rng)


def test_sample_example_is_deterministic_per_seed() -> None:
    a = sample_example(123, size_px=128)
    b = sample_example(123, size_px=128)
    c = sample_example(124, size_px=128)
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.tips_px, b.tips_px)
    assert a.meta == b.meta and a.um_per_px == b.um_per_px
    assert not np.array_equal(a.pixels, c.pixels)


def test_sample_example_labels_only_visible_tips_inside_the_frame() -> None:
    n_hidden = 0
    for seed in range(12):
        ex = sample_example(seed, n_tips=(2, 5), size_px=160)
        assert ex.pixels.shape == (160, 160) and ex.pixels.dtype in (np.uint8, np.uint16)
        visible = [t for t in ex.meta["all_tips"] if t["visible"]]
        n_hidden += len(ex.meta["all_tips"]) - len(visible)
        assert 2 <= len(ex.meta["all_tips"]) <= 5
        assert len(visible) == len(ex.tips_px)
        assert np.all((ex.tips_px >= -0.5) & (ex.tips_px < 159.5))
        assert 0.35 <= ex.um_per_px <= 1.0
        for t in ex.meta["all_tips"]:
            assert t["reason"] in ("visible", "outside_frame", "out_of_focus", "low_contrast")
    assert n_hidden > 0  # the generator does produce explicitly invisible tips


def test_fixed_pixel_size_and_tip_count_are_honoured() -> None:
    ex = sample_example(5, n_tips=(3, 3), um_per_px=0.8, size_px=128)
    assert ex.um_per_px == 0.8 and len(ex.meta["all_tips"]) == 3
    with pytest.raises(ValueError, match="domain"):
        sample_example(5, domain="in_vitro")
    with pytest.raises(ValueError, match="n_tips"):
        sample_example(5, n_tips=(3, 1))


def test_ex_vivo_is_one_dark_sharp_pipette_on_clean_grey() -> None:
    checked = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, domain="ex_vivo", n_tips=(1, 1), size_px=192)
        assert len(scene.pipettes) == 1
        pixels, labels = render_scene(scene, rng)
        if not labels[0].visible:  # tip placed outside the frame on purpose
            continue
        checked += 1
        cov = 1.0 - render_pipettes(scene.pipettes, scene.optics).transmission
        img = pixels.astype(np.float64)
        bg = img[cov < 1e-3]
        glass = img[cov > 0.5]
        assert bg.std() / bg.mean() < 0.15  # clean background
        assert glass.mean() < 0.75 * bg.mean()  # dark silhouette
        # sharp: the silhouette edge at the tip spans only a couple of pixels
        assert scene.optics.defocus_blur <= 0.06 and scene.optics.psf_sigma_um <= 0.6
    assert checked >= 5


def test_in_vivo_randomisation_is_broad() -> None:
    styles, depths, polarity = set(), set(), set()
    for seed in range(40):
        scene = sample_scene(np.random.default_rng(seed), n_tips=(1, 4), size_px=64)
        styles.add(scene.style)
        depths.add(scene.sensor.bit_depth)
        for p in scene.pipettes:
            polarity.add("bright" if p.fill > 0.4 else "dark")
    assert styles == {"shadow", "bright", "mixed"}
    assert depths == {8, 16}
    assert polarity == {"bright", "dark"}
