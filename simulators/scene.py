"""Scenes: what is in a frame, and broad, seeded domain randomisation over all of it.

A ``Scene`` fixes everything needed to render one frame: optics, pipettes, background, detector
and display. ``sample_scene`` draws one at random (reproducibly from a ``numpy`` Generator) for
either domain:

- ``in_vivo``: two-photon frames of dye-filled pipettes above or in the brain. Randomised: pixel
  size, blur in focus and with defocus, 2P fading, shank polarity (dark shadow, bright dye-filled,
  mixed, with or without a thin bright rim), dye spot at the tip, ejected dye cloud, smooth
  brightness variation, tissue texture, bright labelled cells, dark unlabelled somata, dark
  vessels, vignetting and resonant-scan edge brightening, photons per pixel (1-30), detector gain
  and offset, read noise, scan-line noise, fast-axis smear, electrical interference stripes,
  bidirectional-scan row misalignment, dark-field frames (bright pipettes, little tissue dye),
  pipettes converging on one target, bit depth and display gamma. The localiser trained on
  these frames is tested on real frames that are not in this repository, so the ranges are wide
  on purpose.
- ``ex_vivo``: brightfield/DIC pictures of one pipette on a plain field or in a brain slice (faint
  embossed cells): a dark, sharp silhouette with a little DIC relief on a clean grey background
  (the denoiser's target domain).

Each pipette's tip is placed on purpose as visible (in frame, within half the visible defocus),
outside the frame, or clearly out of focus (at least 2.5x the visible defocus, and blurred by at least 4 µm), so labels
are never ambiguous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from simulators.render import (
    Optics,
    Pipette,
    Sensor,
    TipLabel,
    bidirectional_misalignment,
    blobs,
    expose,
    label_tips,
    mean_of_frames,
    quantise,
    render_pipettes,
    smooth_field,
    texture_field,
    tip_contrast_to_noise,
    vessels,
    vignette,
)

DOMAINS = ("in_vivo", "ex_vivo")


@dataclass(frozen=True)
class BackgroundParams:
    """Static background; ``seed`` makes it reproducible. Amplitudes are relative to level 1.

    ``smooth_amp``/``smooth_cells``: large-scale variation; ``texture_amp``/``texture_um``:
    tissue grain; ``bright_cells``: labelled somata (count, radius µm, peak); ``dark_cells``:
    unlabelled somata seen as holes in the dye; ``vessels``: dark tubes (count, width µm, depth).
    """

    seed: int
    smooth_amp: float = 0.2
    smooth_cells: int = 4
    texture_amp: float = 0.2
    texture_um: float = 2.0
    fine_texture_amp: float = 0.1
    bright_cells: int = 3
    bright_cell_radius_um: tuple[float, float] = (3.0, 6.0)
    bright_cell_peak: tuple[float, float] = (0.5, 3.0)
    dark_cells: int = 5
    dark_cell_depth: tuple[float, float] = (0.2, 0.6)
    n_vessels: int = 1
    vessel_width_um: tuple[float, float] = (5.0, 15.0)
    vessel_depth: float = 0.5


@dataclass(frozen=True)
class Scene:
    """Everything that makes one frame. ``gamma`` is a display curve applied after the
    detector (1 = linear); ``dic_relief`` the strength of DIC shading (ex vivo only) along
    ``dic_azimuth_deg``; ``min_tip_cnr`` the contrast-to-noise ratio below which a tip is
    labelled not visible (0 = never); ``background_level`` scales the tissue fluorescence (low:
    bright pipettes over a dark field); ``bidi_shift_px`` the bidirectional-scan row offset.
    """

    domain: str
    optics: Optics
    pipettes: tuple[Pipette, ...]
    background: BackgroundParams
    sensor: Sensor
    vignette_strength: float = 0.0
    scan_edge: float = 0.0
    gamma: float = 1.0
    dic_relief: float = 0.0
    dic_azimuth_deg: float = 45.0
    style: str = "shadow"
    min_tip_cnr: float = 6.0
    background_level: float = 1.0
    bidi_shift_px: float = 0.0


# --------------------------------------------------------------------------------------------
# rendering a scene


def render_background(params: BackgroundParams, optics: Optics) -> np.ndarray:
    """The static background (background units, mean about 1), deterministic per params."""
    rng = np.random.default_rng(params.seed)
    size = optics.size_px
    upx = optics.um_per_px
    bg = 1.0 + params.smooth_amp * smooth_field(rng, size, max(2, params.smooth_cells))
    np.maximum(bg, 0.05, out=bg)
    if params.texture_amp > 0:
        bg *= np.maximum(1.0 + params.texture_amp * texture_field(rng, size, params.texture_um / upx), 0.0)
    if params.fine_texture_amp > 0:
        bg *= np.maximum(1.0 + params.fine_texture_amp * texture_field(rng, size, 1.0), 0.0)
    if params.dark_cells > 0:
        r = (4.0 / upx, 7.0 / upx)
        holes = blobs(rng, size, params.dark_cells, r, params.dark_cell_depth, 1.0 / upx)
        bg *= np.maximum(1.0 - holes, 0.0)
    if params.n_vessels > 0:
        w = (params.vessel_width_um[0] / upx, params.vessel_width_um[1] / upx)
        bg *= 1.0 - params.vessel_depth * vessels(rng, size, params.n_vessels, w, 1.5 / upx)
    if params.bright_cells > 0:
        r = (params.bright_cell_radius_um[0] / upx, params.bright_cell_radius_um[1] / upx)
        bg += blobs(rng, size, params.bright_cells, r, params.bright_cell_peak, 0.8 / upx)
    return bg.astype(np.float32)


@dataclass(frozen=True)
class TipReferences:
    """What each tip's contrast is measured against: the frame without THAT pipette's glass
    and glow, every other pipette kept (a tip lying in another pipette's shadow or glow shows
    only its own contrast over it). Ejected dye clouds stay in (diffuse dye is not the tip).

    Evaluated only in the window asked for (``without``): tip contrast needs a small disc
    around each tip, so no whole tip-free frames are made for every rendered frame.
    ``lit``: what the glass transmits (background + every dye cloud); ``transmissions`` and
    ``glows``: each pipette's own layers (empty: no pipette contributes, e.g. ex vivo);
    ``vignette``: the display falloff applied to everything (None: none).
    """

    lit: np.ndarray
    transmissions: tuple[np.ndarray, ...] = ()
    glows: tuple[np.ndarray, ...] = ()
    vignette: np.ndarray | None = None

    def without(self, index: int, ys: slice, xs: slice) -> np.ndarray:
        """The frame without pipette ``index``, in the window ``[ys, xs]``."""
        lit = self.lit[ys, xs]
        if self.transmissions:
            others = [j for j in range(len(self.transmissions)) if j != index]
            ref = lit * _product([self.transmissions[j][ys, xs] for j in others], lit.shape)
            ref += _total([self.glows[j][ys, xs] for j in others], lit.shape)
        else:
            ref = lit
        return ref if self.vignette is None else ref * self.vignette[ys, xs]


def expected_image(
    scene: Scene, background: np.ndarray | None = None
) -> tuple[np.ndarray, TipReferences]:
    """The noiseless expected image of ``scene`` (background units), and what each tip's
    contrast is measured against (``TipReferences``)."""
    optics = scene.optics
    if background is None:
        background = render_background(scene.background, optics)
    if scene.domain == "ex_vivo":
        layers = render_pipettes(scene.pipettes, optics, want_coverage=True)
        expected = background * layers.transmission
        if scene.dic_relief != 0 and layers.coverage is not None:
            # DIC: shading along the shear direction of both the glass and the slice's texture
            a = math.radians(scene.dic_azimuth_deg)
            gy, gx = np.gradient(layers.coverage - 4.0 * background)
            expected += np.float32(scene.dic_relief) * (gx * math.cos(a) + gy * math.sin(a))
        refs = TipReferences(background)
    else:
        if scene.background_level != 1.0:
            background = background * np.float32(scene.background_level)
        own = [render_pipettes([p], optics) for p in scene.pipettes]
        lit = background.copy()
        for lay in own:
            lit += lay.cloud
        expected = lit * _product([lay.transmission for lay in own], lit.shape)
        expected += _total([lay.glow for lay in own], lit.shape)
        refs = TipReferences(lit, tuple(lay.transmission for lay in own), tuple(lay.glow for lay in own))
    if scene.vignette_strength or scene.scan_edge:
        v = vignette(optics.size_px, scene.vignette_strength, scene.scan_edge)
        expected *= v
        refs = replace(refs, vignette=v)
    return expected, refs


def _product(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    out = np.ones(shape, np.float32)
    for a in arrays:
        out *= a
    return out


def _total(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    for a in arrays:
        out += a
    return out


def scene_labels(scene: Scene, expected: np.ndarray, references: TipReferences) -> list[TipLabel]:
    """Tip labels; a tip in frame and in focus whose own contrast-to-noise ratio (against the
    frame without that pipette, see ``TipReferences``) is below ``scene.min_tip_cnr`` is
    labelled not visible (``reason="low_contrast"``)."""
    labels = label_tips(scene.pipettes, scene.optics)
    radius_px = max(4.0, 8.0 / scene.optics.um_per_px)
    out = []
    for i, lab in enumerate(labels):
        if lab.visible:
            def reference(ys: slice, xs: slice, i: int = i) -> np.ndarray:
                return references.without(i, ys, xs)

            cnr = tip_contrast_to_noise(expected, reference, lab.x_px, lab.y_px, scene.sensor, radius_px)
            lab = replace(lab, cnr=cnr)
            if cnr < scene.min_tip_cnr:
                lab = replace(lab, visible=False, reason="low_contrast")
        out.append(lab)
    return out


def render_scene(
    scene: Scene, rng: np.random.Generator, *, background: np.ndarray | None = None
) -> tuple[np.ndarray, list[TipLabel]]:
    """Render ``scene`` with detector noise drawn from ``rng``: (pixels, one label per pipette).

    ``background`` may be passed when it is reused across frames (the live microscope).
    """
    expected, references = expected_image(scene, background)
    labels = scene_labels(scene, expected, references)
    if scene.bidi_shift_px:
        expected = bidirectional_misalignment(expected, scene.bidi_shift_px)
    pixels = expose(expected, scene.sensor, rng)
    if scene.gamma != 1.0:
        pixels = apply_gamma(pixels, scene.gamma, scene.sensor.bit_depth)
    return pixels, labels


def apply_gamma(pixels: np.ndarray, gamma: float, bit_depth: int) -> np.ndarray:
    """A display curve relative to the frame's 99.9th percentile (as exported, contrast-
    adjusted images have)."""
    top = float(np.percentile(pixels[::4, ::4], 99.9)) or 1.0
    out = top * np.power(pixels.astype(np.float32) / top, np.float32(gamma))
    return quantise(out, bit_depth)


# --------------------------------------------------------------------------------------------
# domain randomisation


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _pick_range(rng: np.random.Generator, value: float | tuple[float, float]) -> float:
    if isinstance(value, tuple | list):
        lo, hi = float(value[0]), float(value[1])
        return lo if lo == hi else _log_uniform(rng, lo, hi)
    return float(value)


def sample_scene(
    rng: np.random.Generator,
    *,
    domain: str = "in_vivo",
    n_tips: tuple[int, int] = (0, 6),
    um_per_px: float | tuple[float, float] = (0.35, 1.0),
    size_px: int | tuple[int, int] = 512,
) -> Scene:
    """Draw a random scene. ``n_tips`` bounds the number of pipettes (inclusive; ex vivo frames
    hold at most one); ``um_per_px`` is a value or a (min, max) range (log-uniform)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    lo, hi = int(n_tips[0]), int(n_tips[1])
    if lo < 0 or hi < lo:
        raise ValueError(f"n_tips must be 0 <= min <= max, got {n_tips}")
    size = (size_px, size_px) if isinstance(size_px, int) else (int(size_px[0]), int(size_px[1]))
    upx = _pick_range(rng, um_per_px)
    if domain == "ex_vivo":
        return _sample_ex_vivo(rng, min(max(lo, 1), hi), upx, size)
    return _sample_in_vivo(rng, int(rng.integers(lo, hi + 1)), upx, size)


MIN_TIP_SEPARATION_UM = 8.0
"""Two glass tips (1-2 µm wide, tapering at 3-8°) are never closer than this in a frame:
closer, they would touch; rigs keep them at least a cell body apart."""


def _far_from_others(tip: tuple[float, float, float], others: list[tuple[float, float, float]]) -> bool:
    return all(math.hypot(tip[0] - o[0], tip[1] - o[1]) >= MIN_TIP_SEPARATION_UM for o in others)


def _place_tip(
    rng: np.random.Generator, optics: Optics, p_outside: float, p_defocus: float
) -> tuple[float, float, float]:
    """A tip position (µm) that is clearly visible, clearly outside the frame, or clearly out
    of focus."""
    h, w = optics.size_px
    upx = optics.um_per_px
    half_w, half_h = (w - 1) / 2 * upx, (h - 1) / 2 * upx
    r = rng.random()
    thr = optics.visible_defocus_um
    if r < p_outside:
        while True:
            x = rng.uniform(-1.3, 1.3) * half_w
            y = rng.uniform(-1.3, 1.3) * half_h
            if abs(x) > half_w + 3 * upx or abs(y) > half_h + 3 * upx:
                return x, y, float(rng.normal(0, 0.25 * thr))
    margin = 6 * upx
    x = rng.uniform(-half_w + margin, half_w - margin)
    y = rng.uniform(-half_h + margin, half_h - margin)
    if r < p_outside + p_defocus:
        # far enough that the tip is blurred by at least 4 µm: it must LOOK out of focus
        sign = 1.0 if rng.random() < 0.7 else -1.0
        dz_min = max(2.5 * thr, 4.0 / max(optics.defocus_blur, 1e-3))
        return x, y, sign * dz_min * rng.uniform(1.0, 2.0)
    return x, y, float(np.clip(rng.normal(0, 0.2 * thr), -0.5 * thr, 0.5 * thr))


def _outside(tip: tuple[float, float, float], optics: Optics) -> bool:
    h, w = optics.size_px
    return abs(tip[0]) > (w - 1) / 2 * optics.um_per_px or abs(tip[1]) > (h - 1) / 2 * optics.um_per_px


def _aim_into_frame(rng: np.random.Generator, tip: tuple[float, float, float], optics: Optics) -> float:
    """An azimuth whose shank crosses the frame from a tip outside it (so the pipette shows)."""
    h, w = optics.size_px
    tx = rng.uniform(-0.4, 0.4) * w * optics.um_per_px
    ty = rng.uniform(-0.4, 0.4) * h * optics.um_per_px
    return math.degrees(math.atan2(ty - tip[1], tx - tip[0])) + float(rng.normal(0, 10.0))


def _azimuths(rng: np.random.Generator, n: int) -> list[float]:
    """Pipettes come from different sides (usually) or from one side (sometimes)."""
    if n == 0:
        return []
    base = rng.uniform(0, 360)
    if rng.random() < 0.25:
        return [float(base + rng.uniform(-60, 60)) for _ in range(n)]
    order = rng.permutation(n)
    return [float(base + 360.0 * i / n + rng.uniform(-35, 35)) for i in order]


def _sample_in_vivo(
    rng: np.random.Generator, n: int, upx: float, size: tuple[int, int]
) -> Scene:
    optics = Optics(
        size_px=size,
        um_per_px=upx,
        focal_z_um=0.0,
        psf_sigma_um=float(rng.uniform(0.3, 0.9)),
        defocus_blur=_log_uniform(rng, 0.05, 0.3),
        max_blur_um=float(rng.uniform(5.0, 25.0)),
        emission_falloff_um=_log_uniform(rng, 12.0, 120.0),
        visible_defocus_um=10.0,
    )
    style = str(rng.choice(["shadow", "bright", "mixed"], p=[0.45, 0.3, 0.25]))
    ejecting = rng.random() < 0.35
    pipettes = []
    # sometimes the pipettes converge on one target cell: tips within ~25 µm of each other
    converge = n >= 2 and rng.random() < 0.3
    h, w = size
    target = (rng.uniform(-0.35, 0.35) * w * upx, rng.uniform(-0.35, 0.35) * h * upx)
    placed: list[tuple[float, float, float]] = []
    for az in _azimuths(rng, n):
        for _attempt in range(50):
            tip = _place_tip(rng, optics, p_outside=0.1, p_defocus=0.1)
            if converge and abs(tip[2]) <= 0.5 * optics.visible_defocus_um and rng.random() < 0.8:
                tip = (target[0] + rng.normal(0, 12.0), target[1] + rng.normal(0, 12.0), tip[2])
            if _far_from_others(tip, placed):
                break
        placed.append(tip)
        if _outside(tip, optics):
            az = _aim_into_frame(rng, tip, optics)
        kind = style if style != "mixed" else str(rng.choice(["shadow", "bright"]))
        if kind == "shadow":
            shadow = float(rng.uniform(0.45, 0.95))
            fill = float(rng.uniform(0.0, 0.4)) if rng.random() < 0.3 else 0.0
        else:
            shadow = float(rng.uniform(0.0, 0.4))
            fill = _log_uniform(rng, 0.4, 5.0)
        pipettes.append(
            Pipette(
                tip_um=tip,
                azimuth_deg=az,
                elevation_deg=float(rng.uniform(20.0, 35.0)),
                tip_radius_um=float(rng.uniform(0.5, 1.0)),
                half_angle_deg=float(rng.uniform(3.0, 8.0)),
                shadow=shadow,
                fill=fill,
                rim=float(rng.uniform(0.2, 1.5 if kind == "bright" else 0.6)) if rng.random() < 0.4 else 0.0,
                tip_spot=_log_uniform(rng, 0.4, 5.0) if rng.random() < 0.6 else 0.0,
                tip_spot_um=float(rng.uniform(0.5, 1.5)),
                cloud=_log_uniform(rng, 0.2, 3.0) if ejecting and rng.random() < 0.7 else 0.0,
                cloud_sigma_um=float(rng.uniform(8.0, 50.0)),
                cloud_offset_um=(float(rng.normal(0, 5)), float(rng.normal(0, 5))),
            )
        )
    above_brain = rng.random() < 0.15  # pipettes still in the dye-lit bath: little tissue
    background = BackgroundParams(
        seed=int(rng.integers(2**31)),
        smooth_amp=float(rng.uniform(0.05, 0.5)),
        smooth_cells=int(rng.integers(2, 7)),
        texture_amp=0.0 if above_brain else float(rng.uniform(0.05, 0.45)),
        texture_um=float(rng.uniform(1.0, 5.0)),
        fine_texture_amp=float(rng.uniform(0.0, 0.25)),
        bright_cells=0 if above_brain else int(rng.integers(0, 12)),
        bright_cell_radius_um=(3.0, 7.0),
        bright_cell_peak=(0.3, 4.0),
        dark_cells=0 if above_brain else int(rng.integers(0, 25)),
        dark_cell_depth=(0.1, 0.7),
        n_vessels=0 if above_brain else int(rng.integers(0, 4)),
        vessel_width_um=(4.0, 20.0),
        vessel_depth=float(rng.uniform(0.2, 0.8)),
    )
    photons = _log_uniform(rng, 1.0, 30.0)
    if rng.random() < 0.4:
        bit_depth = 8
        gain = float(rng.uniform(12.0, 90.0)) / photons  # background at 12-90 of 255
        offset = float(rng.uniform(0.0, 20.0))
    else:
        bit_depth = 16
        gain = _log_uniform(rng, 10.0, 400.0)
        offset = float(rng.uniform(0.0, 3000.0))
    sensor = Sensor(
        photons_per_unit=photons,
        gain_adu=gain,
        offset_adu=offset,
        read_noise_adu=gain * float(rng.uniform(0.05, 1.0)),
        line_offset_adu=gain * float(rng.uniform(0.0, 0.5)) if rng.random() < 0.5 else 0.0,
        line_gain_jitter=float(rng.uniform(0.0, 0.12)) if rng.random() < 0.4 else 0.0,
        bit_depth=bit_depth,
        exact_poisson=True,
        smear_px=float(rng.uniform(0.3, 1.5)) if rng.random() < 0.4 else 0.0,
        interference_adu=gain * float(rng.uniform(0.1, 0.8)) if rng.random() < 0.1 else 0.0,
        interference_period_px=float(rng.uniform(3.0, 30.0)),
        interference_angle_deg=float(rng.uniform(-30.0, 30.0)),
    )
    return Scene(
        domain="in_vivo",
        optics=optics,
        pipettes=tuple(pipettes),
        background=background,
        sensor=sensor,
        vignette_strength=float(rng.uniform(0.0, 0.6)),
        scan_edge=float(rng.uniform(0.0, 0.5)) if rng.random() < 0.5 else 0.0,
        gamma=_log_uniform(rng, 0.5, 1.8) if rng.random() < 0.3 else 1.0,
        style=style,
        background_level=_log_uniform(rng, 0.08, 0.4) if style == "bright" and rng.random() < 0.35 else 1.0,
        bidi_shift_px=float(rng.uniform(0.3, 2.0)) if rng.random() < 0.15 else 0.0,
    )


def _sample_ex_vivo(
    rng: np.random.Generator, n: int, upx: float, size: tuple[int, int]
) -> Scene:
    optics = Optics(
        size_px=size,
        um_per_px=upx,
        psf_sigma_um=float(rng.uniform(0.25, 0.6)),
        defocus_blur=_log_uniform(rng, 0.01, 0.06),
        max_blur_um=float(rng.uniform(2.0, 6.0)),
        emission_falloff_um=1e6,
        visible_defocus_um=10.0,
    )
    pipettes_list = []
    for _ in range(n):
        tip = _place_tip(rng, optics, p_outside=0.08, p_defocus=0.0)
        az = _aim_into_frame(rng, tip, optics) if _outside(tip, optics) else float(rng.uniform(0, 360))
        pipettes_list.append(
            Pipette(
                tip_um=tip,
                azimuth_deg=az,
                elevation_deg=float(rng.uniform(20.0, 35.0)),
                tip_radius_um=float(rng.uniform(0.5, 1.0)),
                half_angle_deg=float(rng.uniform(3.0, 8.0)),
                shadow=float(rng.uniform(0.55, 0.95)),
            )
        )
    pipettes = tuple(pipettes_list)
    in_slice = rng.random() < 0.4  # within a brain slice (faint cells) rather than a plain field
    background = BackgroundParams(
        seed=int(rng.integers(2**31)),
        smooth_amp=float(rng.uniform(0.01, 0.08)),
        smooth_cells=int(rng.integers(2, 5)),
        texture_amp=float(rng.uniform(0.02, 0.08)) if in_slice else float(rng.uniform(0.0, 0.03)),
        texture_um=float(rng.uniform(2.0, 8.0)),
        fine_texture_amp=0.0,
        bright_cells=0,
        dark_cells=int(rng.integers(3, 15)) if in_slice else 0,
        dark_cell_depth=(0.03, 0.12),
        n_vessels=0,
    )
    bit_depth = 8 if rng.random() < 0.7 else 16
    photons = _log_uniform(rng, 150.0, 2000.0)
    level = float(rng.uniform(90.0, 180.0)) * (1.0 if bit_depth == 8 else 256.0)
    sensor = Sensor(
        photons_per_unit=photons,
        gain_adu=level / photons,
        offset_adu=0.0,
        read_noise_adu=level * float(rng.uniform(0.002, 0.01)),
        bit_depth=bit_depth,
        exact_poisson=True,
    )
    return Scene(
        domain="ex_vivo",
        optics=optics,
        pipettes=pipettes,
        background=background,
        sensor=sensor,
        vignette_strength=float(rng.uniform(0.0, 0.25)),
        dic_relief=float(rng.uniform(0.0, 0.6)) * float(rng.choice([-1.0, 1.0])),
        dic_azimuth_deg=float(rng.uniform(0, 360)),
        style="silhouette",
    )


def with_pipettes(scene: Scene, pipettes: tuple[Pipette, ...]) -> Scene:
    """The same scene with other pipettes (the live microscope moves them every frame)."""
    return replace(scene, pipettes=pipettes)


def averaged_scene(scene: Scene, frames_averaged: int) -> Scene:
    """``scene`` seen as the mean of ``frames_averaged`` frames (``render.mean_of_frames``)."""
    return replace(scene, sensor=mean_of_frames(scene.sensor, frames_averaged))
