"""Physically motivated two-photon (and brightfield) renderer of pipettes in microscope µm.

How a frame is made (all maps are float32 (h, w), "background units": 1.0 = the mean
fluorescence of the dye-lit tissue at the focal plane):

    expected = (background + dye_cloud) * transmission + glow           (render_pipettes)
    photons  = Poisson(expected * photons_per_unit)                       (expose)
    pixels   = offset + gain * photons + read noise + scan-line noise, quantised to 8/16 bit

Pipettes are 3D truncated cones: the tip (the centre of the opening) sits at ``tip_um``
(microscope X, Y, Z; Z up, away from the tissue), the shank rises away from it at
``elevation_deg`` toward ``azimuth_deg`` (the in-plane direction from the tip toward the shank,
0 = +x, 90 = +y), widening with ``half_angle_deg`` from ``tip_radius_um``. Each point of the
shank is blurred by a Gaussian whose sigma grows with its height above or below the focal plane
(``Optics.defocus_blur``), so the tip is sharp and the rising shank wide and soft. Two-photon
fluorescence of out-of-focus dye also fades (``Optics.emission_falloff_um``).

Geometry is analytic, not rasterised: every pixel evaluates the exact blurred cross-section of
the cone at its own position, with the pixel's own area folded into the blur (a box of one pixel
has variance 1/12 px²). This is what supersampling converges to, so tip labels are exact to a
small fraction of a pixel and cost nothing extra. Pixel convention: x = column, y = row, origin at
the centre of the top-left pixel; microscope (0, 0) is the image centre (as ``SimWorld``).

Speed: each pipette only touches the pixels inside its bounding wedge; a 512x512 frame with four
pipettes renders in a few milliseconds on one core (``patchrig bench microscope``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import cv2
import numpy as np

# --------------------------------------------------------------------------------------------
# scene description


@dataclass(frozen=True)
class Pipette:
    """One pipette: geometry in microscope µm / degrees, appearance in background units.

    ``shadow``: fraction of the background fluorescence the glass blocks where it is in focus
    (0 = invisible glass, 1 = black); ``fill``: fluorescence of the dye-filled lumen; ``rim``:
    peak of a thin bright line along both glass walls; ``tip_spot``: peak of the dye spot at the
    tip, ``tip_spot_um`` its size (Gaussian sigma); ``cloud``: peak of the ejected dye cloud
    around the tip, ``cloud_sigma_um`` its size, ``cloud_offset_um`` its centre relative to the tip
    (in-plane X, Y).
    """

    tip_um: tuple[float, float, float]
    azimuth_deg: float
    elevation_deg: float = 27.0
    tip_radius_um: float = 0.7
    half_angle_deg: float = 5.0
    shadow: float = 0.6
    fill: float = 0.0
    rim: float = 0.0
    tip_spot: float = 0.0
    tip_spot_um: float = 0.8
    cloud: float = 0.0
    cloud_sigma_um: float = 20.0
    cloud_offset_um: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Optics:
    """Imaging geometry and blur.

    ``size_px``: (h, w); ``psf_sigma_um``: lateral blur in focus; ``defocus_blur``: µm of blur
    sigma per µm of distance from the focal plane; ``max_blur_um``: cap of that blur;
    ``emission_falloff_um``: defocus at which pipette fluorescence has halved (2P optical
    sectioning); ``visible_defocus_um``: a tip further than this from the focal plane is labelled
    not visible.
    """

    size_px: tuple[int, int] = (512, 512)
    um_per_px: float = 0.62
    focal_z_um: float = 0.0
    psf_sigma_um: float = 0.4
    defocus_blur: float = 0.25
    max_blur_um: float = 25.0
    emission_falloff_um: float = 40.0
    visible_defocus_um: float = 10.0


@dataclass(frozen=True)
class TipLabel:
    """Where a pipette's tip is in the frame. ``visible`` is False when the tip is outside the
    frame (``reason="outside_frame"``) or further than ``Optics.visible_defocus_um`` from the
    focal plane (``reason="out_of_focus"``); ``reason`` is "visible" otherwise. ``cnr``: the
    tip's own contrast-to-noise ratio where the scene measured it (in frame and in focus, see
    ``scene.scene_labels``), else None."""

    x_px: float
    y_px: float
    z_um: float
    defocus_um: float
    visible: bool
    reason: str
    cnr: float | None = None


@dataclass(frozen=True)
class Sensor:
    """Detector: Poisson photon counts, then ``offset_adu + gain_adu * photons`` plus Gaussian
    read noise, per-line offset and gain jitter (scan-line noise), clipped to ``bit_depth``.

    ``photons_per_unit``: mean photons per pixel for background level 1.0 (a few in vivo).
    ``exact_poisson=False`` draws shot and read noise together from their Gaussian approximation
    (same mean and variance, gain^2 * lam + read^2): several times faster, used by the live
    simulated microscope to hold its frame rate. ``smear_px``: Gaussian low-pass of the analogue
    signal along the fast scan axis (x), making noise grains horizontally elongated;
    ``interference_adu``: amplitude of electrical pick-up, a sinusoidal stripe pattern of
    ``interference_period_px`` at ``interference_angle_deg`` from vertical.
    """

    photons_per_unit: float = 4.0
    gain_adu: float = 40.0
    offset_adu: float = 200.0
    read_noise_adu: float = 15.0
    line_offset_adu: float = 0.0
    line_gain_jitter: float = 0.0
    bit_depth: int = 16
    exact_poisson: bool = True
    smear_px: float = 0.0
    interference_adu: float = 0.0
    interference_period_px: float = 7.0
    interference_angle_deg: float = 5.0


@dataclass
class PipetteLayers:
    """What pipettes add to a frame: ``transmission`` multiplies the (background + cloud),
    ``glow`` (filled lumen, rim, tip spot) and ``cloud`` (ejected dye) are additive."""

    transmission: np.ndarray
    glow: np.ndarray
    cloud: np.ndarray
    coverage: np.ndarray | None = field(default=None)


# --------------------------------------------------------------------------------------------
# coordinates and labels


def um_to_px(x_um: float, y_um: float, optics: Optics) -> tuple[float, float]:
    """Microscope µm -> pixel (x, y), centre-of-pixel origin; (0, 0) µm is the image centre."""
    h, w = optics.size_px
    return x_um / optics.um_per_px + (w - 1) / 2, y_um / optics.um_per_px + (h - 1) / 2


def label_tip(pipette: Pipette, optics: Optics) -> TipLabel:
    """The tip's pixel position and whether it counts as visible (see ``TipLabel``)."""
    h, w = optics.size_px
    x, y = um_to_px(pipette.tip_um[0], pipette.tip_um[1], optics)
    dz = float(pipette.tip_um[2] - optics.focal_z_um)
    if not (-0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5):
        reason = "outside_frame"
    elif abs(dz) > optics.visible_defocus_um:
        reason = "out_of_focus"
    else:
        reason = "visible"
    return TipLabel(float(x), float(y), float(pipette.tip_um[2]), dz, reason == "visible", reason)


def label_tips(pipettes: Sequence[Pipette], optics: Optics) -> list[TipLabel]:
    return [label_tip(p, optics) for p in pipettes]


def erf(x: np.ndarray) -> np.ndarray:
    """Fast odd, monotone approximation of the error function (max error 4e-4)."""
    return np.tanh(x * (1.1283792 + 0.10091 * (x * x)))


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


# --------------------------------------------------------------------------------------------
# pipettes


def render_pipettes(
    pipettes: Sequence[Pipette], optics: Optics, *, want_coverage: bool = False
) -> PipetteLayers:
    """Render every pipette's transmission, glow and dye cloud (noiseless, background units).

    ``want_coverage`` also returns the summed blurred glass coverage (0..1 per pipette), used by
    brightfield/DIC rendering and by tests.
    """
    h, w = optics.size_px
    transmission = np.ones((h, w), np.float32)
    glow = np.zeros((h, w), np.float32)
    cloud = np.zeros((h, w), np.float32)
    coverage = np.zeros((h, w), np.float32) if want_coverage else None
    for p in pipettes:
        _add_pipette(p, optics, transmission, glow, coverage)
        if p.cloud > 0:
            _add_cloud(p, optics, cloud)
    return PipetteLayers(transmission, glow, cloud, coverage)


def _add_pipette(
    p: Pipette,
    optics: Optics,
    transmission: np.ndarray,
    glow: np.ndarray,
    coverage: np.ndarray | None,
) -> None:
    h, w = optics.size_px
    upx = optics.um_per_px
    tx, ty = um_to_px(p.tip_um[0], p.tip_um[1], optics)
    az = math.radians(p.azimuth_deg)
    el = math.radians(p.elevation_deg)
    ca, sa = math.cos(az), math.sin(az)
    # per px of in-plane distance along the shank: radius growth and height gain
    taper = math.tan(math.radians(p.half_angle_deg)) / math.cos(el)
    rise_um = upx * math.tan(el)
    r0 = p.tip_radius_um / upx
    dz0 = float(p.tip_um[2] - optics.focal_z_um)
    k = optics.defocus_blur
    s_fixed2 = (optics.psf_sigma_um / upx) ** 2 + 1.0 / 12.0
    s_max = max(optics.max_blur_um / upx, math.sqrt(s_fixed2))
    s_tip = min(math.sqrt(s_fixed2 + (k * dz0 / upx) ** 2), s_max)
    spot_s = math.sqrt((p.tip_spot_um / upx) ** 2 + s_tip**2)

    # bounding wedge: |v| < a + b * max(u, 0), u > -a
    a = r0 + 3.0 * s_tip + (4.0 * spot_s if p.tip_spot > 0 else 0.0) + 1.5
    b = taper + 3.0 * k * rise_um / upx
    u_far = math.hypot(h, w) + abs(tx) + abs(ty)
    corners = []
    for u_end, half in ((-a, a), (u_far, a + b * u_far)):
        for sgn in (-1.0, 1.0):
            corners.append((tx + u_end * ca - sgn * half * sa, ty + u_end * sa + sgn * half * ca))
    cx = [c[0] for c in corners]
    cy = [c[1] for c in corners]
    x0 = max(int(math.floor(min(cx))), 0)
    x1 = min(int(math.ceil(max(cx))) + 1, w)
    y0 = max(int(math.floor(min(cy))), 0)
    y1 = min(int(math.ceil(max(cy))) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    xx, yy = _grid(h, w)
    dx = xx[y0:y1, x0:x1] - np.float32(tx)
    dy = yy[y0:y1, x0:x1] - np.float32(ty)
    u = dx * np.float32(ca) + dy * np.float32(sa)
    v = np.abs(dy * np.float32(ca) - dx * np.float32(sa))
    uc = np.maximum(u, 0.0)
    inside = (v < a + b * uc) & (u > -a)
    if not inside.any():
        return
    u = u[inside]
    v = v[inside]
    uc = uc[inside]

    dz = dz0 + uc * np.float32(rise_um)
    sig = np.minimum(np.sqrt(np.float32(s_fixed2) + (np.float32(k / upx) * dz) ** 2), s_max)
    inv_s2 = 1.0 / (sig * np.float32(math.sqrt(2.0)))
    r = r0 + uc * np.float32(taper)
    end = 0.5 * (1.0 + erf(u * np.float32(1.0 / (math.sqrt(2.0) * s_tip))))
    cov = 0.5 * (erf((r - v) * inv_s2) + erf((r + v) * inv_s2)) * end

    sub_t = transmission[y0:y1, x0:x1]
    sub_t[inside] *= 1.0 - np.float32(p.shadow) * cov
    if coverage is not None:
        coverage[y0:y1, x0:x1][inside] += cov

    add = np.zeros_like(cov)
    fade = None
    if p.fill > 0 or p.rim > 0:
        fz = np.float32(1.0 / max(optics.emission_falloff_um, 1e-6))
        fade = 1.0 / (1.0 + (dz * fz) ** 2)
    if p.fill > 0 and fade is not None:
        r_in = r * np.float32(0.7)
        lumen = 0.5 * (erf((r_in - v) * inv_s2) + erf((r_in + v) * inv_s2)) * end
        # brightness grows with the dye's path length until it exceeds the 2P focal slab (~2 µm)
        depth = np.minimum(r_in * np.float32(upx), 1.0)
        add += np.float32(p.fill) * lumen * depth * fade
    if p.rim > 0 and fade is not None:
        s_rim0 = math.sqrt(s_fixed2)
        add += (
            np.float32(p.rim)
            * np.exp(-0.5 * ((v - r) / sig) ** 2)
            * (np.float32(s_rim0) / sig)
            * end
            * fade
        )
    if p.tip_spot > 0:
        add += np.float32(p.tip_spot) * np.exp(
            (u * u + v * v) * np.float32(-0.5 / spot_s**2)
        ) * np.float32((p.tip_spot_um / upx) ** 2 / spot_s**2 if spot_s > 0 else 1.0)
    if p.fill > 0 or p.rim > 0 or p.tip_spot > 0:
        glow[y0:y1, x0:x1][inside] += add


def _add_cloud(p: Pipette, optics: Optics, cloud: np.ndarray) -> None:
    """A smooth Gaussian cloud of ejected dye, evaluated on a coarse grid and resized."""
    h, w = optics.size_px
    upx = optics.um_per_px
    cx, cy = um_to_px(p.tip_um[0] + p.cloud_offset_um[0], p.tip_um[1] + p.cloud_offset_um[1], optics)
    s = max(p.cloud_sigma_um / upx, 1.0)
    f = int(max(1, min(8, s // 3)))
    hc, wc = -(-h // f), -(-w // f)
    # centre of coarse pixel i is fine coordinate (i + 0.5) * f - 0.5 (cv2.resize convention)
    xs = (np.arange(wc, dtype=np.float32) + 0.5) * f - 0.5 - cx
    ys = (np.arange(hc, dtype=np.float32) + 0.5) * f - 0.5 - cy
    g: np.ndarray = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2) / s**2).astype(np.float32)
    if f > 1:
        g = cv2.resize(g, (wc * f, hc * f), interpolation=cv2.INTER_LINEAR)[:h, :w]
    cloud += np.float32(p.cloud) * g


# --------------------------------------------------------------------------------------------
# background ingredients (all deterministic given the rng)


def smooth_field(rng: np.random.Generator, size_px: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth large-scale variation, zero mean, unit-ish std: a cells x cells random grid,
    bicubically resized to the frame."""
    h, w = size_px
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def texture_field(
    rng: np.random.Generator, size_px: tuple[int, int], scale_px: float
) -> np.ndarray:
    """Band-limited tissue texture with correlation length ``scale_px``, zero mean, unit std."""
    h, w = size_px
    f = max(1, int(scale_px // 2))
    hc, wc = -(-h // f), -(-w // f)
    g: np.ndarray = rng.standard_normal((hc, wc)).astype(np.float32)
    g = cv2.GaussianBlur(g, (0, 0), max(scale_px / f, 0.5))
    if f > 1:
        g = cv2.resize(g, (wc * f, hc * f), interpolation=cv2.INTER_LINEAR)[:h, :w]
    std = float(g.std()) or 1.0
    return (g - float(g.mean())) / std


def blobs(
    rng: np.random.Generator,
    size_px: tuple[int, int],
    n: int,
    radius_px: tuple[float, float],
    amplitude: tuple[float, float],
    blur_px: float,
) -> np.ndarray:
    """``n`` soft round blobs (cell bodies), amplitude drawn per blob (may be negative)."""
    h, w = size_px
    out: np.ndarray = np.zeros((h, w), np.float32)
    shift = 4
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx = rng.uniform(*radius_px)
        ry = rx * rng.uniform(0.7, 1.3)
        amp = float(rng.uniform(*amplitude))
        cv2.ellipse(
            out,
            (int(cx * 2**shift), int(cy * 2**shift)),
            (int(rx * 2**shift), int(ry * 2**shift)),
            float(rng.uniform(0, 180)), 0, 360, amp, -1, cv2.LINE_AA, shift,
        )
    if blur_px > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur_px)
    return out


def vessels(
    rng: np.random.Generator,
    size_px: tuple[int, int],
    n: int,
    width_px: tuple[float, float],
    blur_px: float,
) -> np.ndarray:
    """``n`` meandering tubes (blood vessels), 0..1 coverage map."""
    h, w = size_px
    out: np.ndarray = np.zeros((h, w), np.float32)
    for _ in range(n):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        heading = rng.uniform(0, 2 * math.pi)
        width = float(rng.uniform(*width_px))
        pts = []
        step = max(w, h) / 20
        for _ in range(30):
            pts.append((x, y))
            heading += rng.normal(0, 0.3)
            x += step * math.cos(heading)
            y += step * math.sin(heading)
        poly = np.round(np.array(pts) * 16).astype(np.int32)
        cv2.polylines(out, [poly], False, 1.0, max(1, int(round(width))), cv2.LINE_AA, 4)
    if blur_px > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur_px)
    return np.minimum(out, 1.0)


@lru_cache(maxsize=4)
def vignette(size_px: tuple[int, int], strength: float, scan_edge: float) -> np.ndarray:
    """Radial falloff (``strength`` = loss at the corners) times resonant-scan edge brightening
    along x (``scan_edge`` = gain at the left/right edges: the beam slows there)."""
    h, w = size_px
    ys = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / (h / 2)
    xs = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / (w / 2)
    r2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / 2.0
    scan = 1.0 + scan_edge * xs[None, :] ** 4
    out = ((1.0 - strength * r2) * scan).astype(np.float32)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------
# detector


def mean_of_frames(sensor: Sensor, frames: int) -> Sensor:
    """The detector as seen through the mean of ``frames`` independent frames of a still scene
    (the frame averaging of acquisition software): ``frames`` times the photons at
    ``1/frames`` of the gain (so the mean counts are unchanged), and the read, scan-line and
    pick-up noise, independent from frame to frame, divided by sqrt(``frames``). Shot-noise
    variance falls by ``frames`` too; the scene (background clutter, smear, gamma) does not
    change. ``frames`` = 1 gives ``sensor`` itself; below 1 is a ValueError."""
    if int(frames) != frames or frames < 1:
        raise ValueError(f"frames must be a whole number >= 1, got {frames}")
    if frames == 1:
        return sensor
    k = float(frames)
    root = math.sqrt(k)
    return replace(
        sensor,
        photons_per_unit=sensor.photons_per_unit * k,
        gain_adu=sensor.gain_adu / k,
        read_noise_adu=sensor.read_noise_adu / root,
        line_offset_adu=sensor.line_offset_adu / root,
        line_gain_jitter=sensor.line_gain_jitter / root,
        interference_adu=sensor.interference_adu / root,
    )


def expose(expected: np.ndarray, sensor: Sensor, rng: np.random.Generator) -> np.ndarray:
    """Turn an expected image (background units, >= 0) into detector counts (uint8/uint16).

    Noise is drawn from ``rng``; the same rng state gives the same frame.
    """
    if sensor.bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {sensor.bit_depth}")
    lam = np.maximum(expected, 0.0, dtype=np.float32) * np.float32(sensor.photons_per_unit)
    h, w = lam.shape
    gain = np.float32(sensor.gain_adu)
    if sensor.exact_poisson:
        out = rng.poisson(lam).astype(np.float32) * gain
        if sensor.read_noise_adu > 0:
            out += np.float32(sensor.read_noise_adu) * rng.standard_normal((h, w), dtype=np.float32)
    else:
        # shot and read noise in one Gaussian draw: variance gain^2 * lam + read^2
        sd = np.sqrt(lam * gain * gain + np.float32(sensor.read_noise_adu) ** 2)
        out = lam * gain + sd * rng.standard_normal((h, w), dtype=np.float32)
    if sensor.smear_px > 0:
        k = 2 * int(math.ceil(3 * sensor.smear_px)) + 1
        out = cv2.GaussianBlur(out, (k, 1), sensor.smear_px, sigmaY=0, borderType=cv2.BORDER_REFLECT)
    if sensor.line_gain_jitter > 0:
        out *= 1.0 + np.float32(sensor.line_gain_jitter) * rng.standard_normal((h, 1), dtype=np.float32)
    out += np.float32(sensor.offset_adu)
    if sensor.interference_adu > 0:
        a = math.radians(sensor.interference_angle_deg)
        phase = float(rng.uniform(0, 2 * math.pi))
        xs = np.arange(w, dtype=np.float32) * np.float32(math.cos(a))
        ys = np.arange(h, dtype=np.float32) * np.float32(math.sin(a))
        arg = (ys[:, None] + xs[None, :]) * np.float32(2 * math.pi / sensor.interference_period_px) + phase
        out += np.float32(sensor.interference_adu) * np.sin(arg)
    if sensor.line_offset_adu > 0:
        out += np.float32(sensor.line_offset_adu) * rng.standard_normal((h, 1), dtype=np.float32)
    return quantise(out, sensor.bit_depth)


def quantise(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """Round and clip a float image to uint8 or uint16."""
    top = 255.0 if bit_depth == 8 else 65535.0
    out = np.clip(image + 0.5, 0.0, top)
    return out.astype(np.uint8 if bit_depth == 8 else np.uint16)


def full_scale_units(sensor: Sensor) -> float:
    """The expected-image value (background units) at which ``sensor``'s counts reach the top of
    its bit depth: contrast above it is lost to saturation."""
    top = 255.0 if sensor.bit_depth == 8 else 65535.0
    return max(top - sensor.offset_adu, 1.0) / max(sensor.photons_per_unit * sensor.gain_adu, 1e-12)


def tip_contrast_to_noise(
    expected: np.ndarray,
    reference: Callable[[slice, slice], np.ndarray],
    x_px: float,
    y_px: float,
    sensor: Sensor,
    radius_px: float,
) -> float:
    """Detectability of a tip: the matched-filter signal-to-noise ratio
    sqrt(sum(d_lambda**2 / var)) of the frame with versus without the tip's pipette, over a
    disc of ``radius_px`` around the tip, in photons. ``reference(ys, xs)`` gives the frame
    without the pipette in the window ``[ys, xs]`` (only the window around the tip is ever
    needed). ``var`` is the Poisson and read noise plus the background clutter (the variance of
    the tip-free frame's fine texture in that disc, smooth gradients removed), since texture
    hides a faint tip as well as noise does. Both images are clipped at the detector's full
    scale first, so contrast lost to saturation does not count. Used to label tips that are
    drawn but lost as not visible.
    """
    h, w = expected.shape
    r = int(math.ceil(radius_px))
    cx, cy = int(round(x_px)), int(round(y_px))
    x0, x1 = max(cx - r, 0), min(cx + r + 1, w)
    y0, y1 = max(cy - r, 0), min(cy + r + 1, h)
    if x0 >= x1 or y0 >= y1:
        return 0.0
    yy, xx = np.mgrid[y0:y1, x0:x1]
    disc = (xx - x_px) ** 2 + (yy - y_px) ** 2 <= radius_px**2
    k = sensor.photons_per_unit
    # the detector saturates: contrast above full scale is lost (a tip in a saturated dye
    # cloud is not visible however strong its expected contrast)
    full_scale = full_scale_units(sensor)
    ref_win = np.minimum(reference(slice(y0, y1), slice(x0, x1)), np.float32(full_scale)).astype(np.float32)
    exp_win = np.minimum(expected[y0:y1, x0:x1], np.float32(full_scale)).astype(np.float32)
    fine = ref_win - cv2.GaussianBlur(ref_win, (0, 0), max(radius_px / 2, 1.0), borderType=cv2.BORDER_REFLECT)
    clutter = float((fine[disc].astype(np.float64) * k).var())
    ref = ref_win[disc].astype(np.float64) * k
    diff = (exp_win[disc].astype(np.float64) - ref_win[disc]) * k
    var = np.maximum(ref, 0.0) + (sensor.read_noise_adu / max(sensor.gain_adu, 1e-9)) ** 2 + clutter + 1e-6
    return float(math.sqrt(float((diff * diff / var).sum())))


def bidirectional_misalignment(image: np.ndarray, shift_px: float) -> np.ndarray:
    """Bidirectional resonant scanning with a phase error: even rows shift by -shift/2 and odd
    rows by +shift/2 along x (linear interpolation), so positions stay right on average."""
    if shift_px == 0:
        return image
    out = image.copy()
    for start, d in ((0, -shift_px / 2), (1, shift_px / 2)):
        rows = image[start::2]
        n = int(math.floor(d))
        f = np.float32(d - n)
        a = np.roll(rows, n, axis=1)
        b = np.roll(rows, n + 1, axis=1)
        out[start::2] = (1 - f) * a + f * b
    return out

