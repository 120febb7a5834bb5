"""A classical tip detector without learning, for comparison with the learned localisers.

Pipettes are wedges that enter the frame from its border and end at their tip. The detector:

1. resamples the frame to ``work_um_per_px`` (1 µm/px) and normalises it (preprocess.prepare);
2. denoises (Gaussian, ``smooth_um``), subtracts the smooth background (Gaussian,
   ``background_um``) and divides by the robust noise level (MAD), giving a z-map;
3. marks pixels darker or brighter than ``threshold_sigma`` (shadowed or dye-filled glass),
   cleans the mask morphologically and keeps connected parts that touch the frame border and
   are large enough (pipettes come from outside; labelled cells are small and inside);
4. takes, in every such part, the pixel farthest from where the part enters the frame (the
   mean of its border pixels) as the tip: pipettes are straight wedges ending at their tip.

One tip per part: two pipettes whose masks touch give one detection. The score in [0, 1] is a
heuristic of the part's contrast (mean |z|) and length. Deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from localisation.preprocess import prepare
from localisation.types import TipDetection


@dataclass(frozen=True)
class ClassicalParams:
    """Parameters in µm (converted with ``work_um_per_px``) or in noise sigmas."""

    work_um_per_px: float = 1.0
    smooth_um: float = 2.5
    background_um: float = 60.0
    threshold_sigma: float = 1.5
    min_area_um2: float = 120.0
    min_length_um: float = 30.0
    min_elongation: float = 3.5
    max_tips: int = 8


class ClassicalTipDetector:
    """``locate(pixels, um_per_px) -> list[TipDetection]`` in the input's pixels, best first."""

    def __init__(self, params: ClassicalParams | None = None) -> None:
        self.params = params or ClassicalParams()

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
        p = self.params
        img, rs = prepare(
            pixels, um_per_px, mode="fixed_scale", size=0, model_um_per_px=p.work_um_per_px
        )
        z = self.z_map(img)
        mask = self.pipette_mask(z)
        tips = self.tips_from_mask(mask, z)
        if not tips:
            return []
        xy = rs.to_input(np.array([[t[0], t[1]] for t in tips]))
        return [TipDetection(float(x), float(y), float(t[2])) for (x, y), t in zip(xy, tips, strict=True)]

    def z_map(self, img: np.ndarray) -> np.ndarray:
        """Background-subtracted, noise-normalised image (float32, units of noise sigma)."""
        px = self.params.work_um_per_px
        smooth = cv2.GaussianBlur(img, (0, 0), self.params.smooth_um / px)
        background = cv2.GaussianBlur(img, (0, 0), self.params.background_um / px)
        resid = smooth - background
        mad = float(np.median(np.abs(resid - np.median(resid)))) * 1.4826
        return resid / max(mad, 1e-6)

    def pipette_mask(self, z: np.ndarray) -> np.ndarray:
        """Pipette-like parts of z < -threshold (shadow) and z > threshold (dye-filled glass):
        cleaned morphologically, touching the frame border, large and elongated enough."""
        p = self.params
        out = np.zeros(z.shape, dtype=bool)
        for raw in (z < -p.threshold_sigma, z > p.threshold_sigma):
            out |= self._elongated_border_parts(raw.astype(np.uint8))
        return out

    def _elongated_border_parts(self, raw: np.ndarray) -> np.ndarray:
        p = self.params
        raw = cv2.morphologyEx(raw, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
        raw = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
        h, w = raw.shape
        min_area = p.min_area_um2 / p.work_um_per_px**2
        min_length = p.min_length_um / p.work_um_per_px
        keep = np.zeros(n, dtype=bool)
        for i in range(1, n):
            x0, y0, bw, bh, area = stats[i]
            touches = x0 == 0 or y0 == 0 or x0 + bw == w or y0 + bh == h
            if not touches or area < min_area:
                continue
            ys, xs = np.nonzero(labels[y0 : y0 + bh, x0 : x0 + bw] == i)
            cov = np.cov(np.stack([xs, ys]).astype(np.float64))
            minor, major = np.sqrt(np.maximum(np.linalg.eigvalsh(cov), 1e-9))
            keep[i] = major / minor >= p.min_elongation and 4 * major >= min_length
        return keep[labels]

    def tips_from_mask(self, mask: np.ndarray, z: np.ndarray) -> list[tuple[float, float, float]]:
        """(x, y, score) in working pixels: per part, the pixel farthest from where it enters."""
        p = self.params
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        edge = np.zeros(mask.shape, dtype=bool)
        edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
        found: list[tuple[float, float, float]] = []
        for i in range(1, n):
            part = labels == i
            ys, xs = np.nonzero(part)
            ey, ex = np.nonzero(part & edge)
            if len(ey) == 0:
                continue
            entry = np.array([ex.mean(), ey.mean()])
            d = np.hypot(xs - entry[0], ys - entry[1])
            k = int(np.argmax(d))
            length_um = float(d[k]) * p.work_um_per_px
            contrast = float(np.mean(np.abs(z[part])))
            score = 0.5 * min(1.0, contrast / (3 * p.threshold_sigma)) + 0.5 * min(1.0, length_um / (3 * p.min_length_um))
            found.append((float(xs[k]), float(ys[k]), score))
        found.sort(key=lambda t: -t[2])
        return found[: p.max_tips]
