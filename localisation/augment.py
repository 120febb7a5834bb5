"""Training augmentation: geometric (labels move with the pixels) and photometric.

Images are float32 (H, W) in [0, 1]; tips are (n, 2) x, y pixels with the origin at the centre
of the top-left pixel. Every geometric change is one affine map applied to the image with
``cv2.warpAffine`` and to the tips with the same matrix, so labels stay exact; tips that leave
the output are dropped (never clipped to the border).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run. The paper: vertical and horizontal flips, scaling 0.9-1.1."""

    flip: bool = True
    rot90: bool = False
    scale_range: tuple[float, float] = (0.9, 1.1)
    photometric: bool = False


def affine_matrix(
    *,
    scale: float,
    centre_in: tuple[float, float],
    centre_out: tuple[float, float],
    flip_x: bool = False,
    flip_y: bool = False,
    rot90_k: int = 0,
) -> np.ndarray:
    """2x3 matrix mapping input pixel (x, y) to output pixel: flips/rotation and ``scale``
    about ``centre_in``, which lands on ``centre_out``. Pixel-centre coordinates throughout."""
    a = np.eye(2)
    for _ in range(rot90_k % 4):
        a = np.array([[0.0, -1.0], [1.0, 0.0]]) @ a
    if flip_x:
        a = np.diag([-1.0, 1.0]) @ a
    if flip_y:
        a = np.diag([1.0, -1.0]) @ a
    a = scale * a
    c_in = np.asarray(centre_in, dtype=np.float64)
    c_out = np.asarray(centre_out, dtype=np.float64)
    t = c_out - a @ c_in
    return np.concatenate([a, t[:, None]], axis=1)


def apply_affine(
    image: np.ndarray,
    tips_px: np.ndarray,
    matrix: np.ndarray,
    out_size: tuple[int, int],
    *,
    border_value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` to ``out_size`` (h, w) and move the tips with it; drop tips outside.

    cv2 uses the same pixel-centre convention for integer coordinates, so no half-pixel shift.
    """
    h, w = out_size
    warped = cv2.warpAffine(
        image,
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(border_value),
    )
    return warped, move_points(tips_px, matrix, out_size)


def random_geometric(
    image: np.ndarray,
    tips_px: np.ndarray,
    out_size: tuple[int, int],
    cfg: AugmentConfig,
    rng: np.random.Generator,
    *,
    random_crop: bool,
    border_value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips, rot90 and scale, then a crop (random centre when ``random_crop``, else
    the image centre) of ``out_size``. Without augmentation flags this is a plain crop/pad."""
    m = random_affine(image.shape, out_size, cfg, rng, random_crop=random_crop)
    return apply_affine(image, tips_px, m, out_size, border_value=border_value)


def random_affine(
    shape_hw: tuple[int, ...],
    out_size: tuple[int, int],
    cfg: AugmentConfig,
    rng: np.random.Generator,
    *,
    random_crop: bool,
) -> np.ndarray:
    """The 2x3 map of ``random_geometric`` for an image of ``shape_hw`` (so that more points,
    e.g. the faint tips training ignores, can be moved with ``move_points``)."""
    h_in, w_in = int(shape_hw[0]), int(shape_hw[1])
    scale = float(rng.uniform(*cfg.scale_range)) if cfg.scale_range != (1.0, 1.0) else 1.0
    flip_x = bool(cfg.flip and rng.random() < 0.5)
    flip_y = bool(cfg.flip and rng.random() < 0.5)
    k = int(rng.integers(0, 4)) if cfg.rot90 else 0
    if random_crop:
        # any centre such that the crop overlaps the image; favour the image, allow edges
        cx = float(rng.uniform(0, w_in - 1)) if w_in > 1 else 0.0
        cy = float(rng.uniform(0, h_in - 1)) if h_in > 1 else 0.0
        half_w, half_h = out_size[1] / (2 * scale), out_size[0] / (2 * scale)
        if w_in <= 2 * half_w:
            cx = (w_in - 1) / 2
        else:
            cx = float(np.clip(cx, half_w - 0.5, w_in - half_w - 0.5))
        if h_in <= 2 * half_h:
            cy = (h_in - 1) / 2
        else:
            cy = float(np.clip(cy, half_h - 0.5, h_in - half_h - 0.5))
    else:
        cx, cy = (w_in - 1) / 2, (h_in - 1) / 2
    return affine_matrix(
        scale=scale,
        centre_in=(cx, cy),
        centre_out=((out_size[1] - 1) / 2, (out_size[0] - 1) / 2),
        flip_x=flip_x,
        flip_y=flip_y,
        rot90_k=k,
    )


def move_points(points_px: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Points (n, 2) through the 2x3 ``matrix``; those outside ``out_size`` (h, w) dropped."""
    h, w = out_size
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    moved = pts @ matrix[:, :2].T + matrix[:, 2]
    inside = (
        (moved[:, 0] >= -0.5) & (moved[:, 0] <= w - 0.5) & (moved[:, 1] >= -0.5) & (moved[:, 1] <= h - 0.5)
    )
    return moved[inside].astype(np.float32)


def random_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, offset, blur and extra noise, so the model does not rely on one exact
    rendering of brightness and noise (real frames differ from the simulator). Output in [0, 1].
    """
    img = np.clip(image, 0.0, 1.0)
    if rng.random() < 0.5:
        img = img ** float(rng.uniform(0.7, 1.4))
    if rng.random() < 0.5:
        img = (img - 0.5) * float(rng.uniform(0.7, 1.3)) + 0.5 + float(rng.uniform(-0.1, 0.1))
    if rng.random() < 0.2:
        img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), float(rng.uniform(0.4, 1.0)))
    if rng.random() < 0.3:
        img = img + rng.normal(0.0, float(rng.uniform(0.01, 0.06)), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
