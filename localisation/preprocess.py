"""Frame -> model input: validation, resampling to the model's scale, intensity normalisation.

The same functions serve training (data.py) and inference (inference.py), so the model always
sees frames prepared the same way.

Two input modes (set by the configuration):

- ``fixed_scale``: the frame is resampled so that one model pixel is ``model_um_per_px`` µm
  whatever the microscope's pixel size and frame size (the fast model is fully convolutional).
- ``resize``: the frame is resized to ``size x size`` whatever its pixel size (the paper).

Coordinates: x = column, y = row, origin at the centre of the top-left pixel, in both the
input and the model image; ``Resampling`` converts between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from rig.errors import DataError

MAX_MODEL_SIDE_PX = 16384  # a frame larger than this on the model's grid has a wrong pixel size
MIN_MODEL_SIDE_PX = 1  # ... and so has a whole frame smaller than one model pixel


@dataclass(frozen=True)
class Resampling:
    """How model pixels relate to input pixels: ``x_model = (x_in + 0.5) * sx - 0.5``."""

    sx: float
    sy: float

    def to_model(self, tips_px: np.ndarray) -> np.ndarray:
        tips = np.asarray(tips_px, dtype=np.float64).reshape(-1, 2)
        return np.stack([(tips[:, 0] + 0.5) * self.sx - 0.5, (tips[:, 1] + 0.5) * self.sy - 0.5], 1)

    def to_input(self, tips_px: np.ndarray) -> np.ndarray:
        tips = np.asarray(tips_px, dtype=np.float64).reshape(-1, 2)
        return np.stack([(tips[:, 0] + 0.5) / self.sx - 0.5, (tips[:, 1] + 0.5) / self.sy - 0.5], 1)


def validate_frame(pixels: object, um_per_px: float, *, what: str = "image") -> np.ndarray:
    """Check a frame and return it as a 2-D array. Colour (h, w, 3|4) is converted to grey.

    Raises DataError for: not an array, empty, wrong number of dimensions, non-numeric,
    NaN/inf values, smaller than 8x8 pixels, or a non-positive/non-finite ``um_per_px``.
    """
    if not isinstance(pixels, np.ndarray):
        raise DataError(f"{what}: expected a numpy array, got {type(pixels).__name__}")
    return _validate_array(pixels, um_per_px, what)


def _validate_array(pixels: np.ndarray, um_per_px: float, what: str) -> np.ndarray:
    if pixels.size == 0:
        raise DataError(f"{what}: empty image (shape {pixels.shape})")
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        pixels = pixels[..., :3].astype(np.float32).mean(axis=2)
    if pixels.ndim != 2:
        raise DataError(f"{what}: expected a 2-D greyscale image (h, w), got shape {pixels.shape}")
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise DataError(f"{what}: unsupported pixel type {pixels.dtype}")
    if min(pixels.shape) < 8:
        raise DataError(f"{what}: image too small ({pixels.shape[1]}x{pixels.shape[0]} px)")
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise DataError(f"{what}: image contains NaN or infinite values")
    if not (isinstance(um_per_px, int | float | np.floating | np.integer) and not isinstance(um_per_px, bool)
            and np.isfinite(um_per_px) and um_per_px > 0):
        raise DataError(f"{what}: um_per_px must be a positive number, got {um_per_px!r}")
    return pixels


def resample(
    pixels: np.ndarray,
    um_per_px: float,
    *,
    mode: str,
    size: int,
    model_um_per_px: float | None,
) -> tuple[np.ndarray, Resampling]:
    """Resample a validated frame to the model's grid (float32, not yet normalised)."""
    h, w = pixels.shape
    if mode == "resize":
        out_w, out_h = size, size
    elif mode == "fixed_scale":
        if model_um_per_px is None:
            raise ValueError("fixed_scale mode needs model_um_per_px")
        f = float(um_per_px) / float(model_um_per_px)
        side = max(w, h) * f  # the frame's larger side on the model grid, model pixels
        if not math.isfinite(side) or side > MAX_MODEL_SIDE_PX or side < MIN_MODEL_SIDE_PX:
            raise DataError(
                f"a {w}x{h} frame at {um_per_px:g} µm/px is {w * f:.3g}x{h * f:.3g} px on the model's "
                f"{model_um_per_px:g} µm grid, outside {MIN_MODEL_SIDE_PX}-{MAX_MODEL_SIDE_PX} px a side: "
                "is the pixel size right?")
        out_w, out_h = max(8, round(w * f)), max(8, round(h * f))
    else:
        raise ValueError(f"unknown input mode {mode!r}")
    img: np.ndarray = pixels.astype(np.float32, copy=False)
    if (out_w, out_h) != (w, h):
        shrinking = out_w < w and out_h < h
        img = cv2.resize(
            img, (out_w, out_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        )
    return img, Resampling(out_w / w, out_h / h)


def robust_range(img: np.ndarray) -> tuple[float, float]:
    """(lo, hi): the 0.5th and 99.8th percentiles of a strided subsample of ``img`` (about
    16,384 pixels; fast, deterministic)."""
    step = max(1, int(np.sqrt(img.size / 16384)))
    lo, hi = np.percentile(img[::step, ::step], (0.5, 99.8))
    return float(lo), float(hi)


def normalise(img: np.ndarray) -> np.ndarray:
    """Map intensities to [0, 1] with robust percentiles (``robust_range``: 0.5 % -> 0,
    99.8 % -> 1). A flat image maps to 0.
    """
    lo, hi = robust_range(img)
    if not hi > lo:
        return np.zeros_like(img, dtype=np.float32)
    out = (img - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def prepare(
    pixels: np.ndarray,
    um_per_px: float,
    *,
    mode: str,
    size: int,
    model_um_per_px: float | None,
    what: str = "image",
) -> tuple[np.ndarray, Resampling]:
    """Validate, resample and normalise one frame: (model image float32 in [0, 1], resampling)."""
    pixels = validate_frame(pixels, um_per_px, what=what)
    return prepare_valid(pixels, um_per_px, mode=mode, size=size, model_um_per_px=model_um_per_px)


def prepare_valid(
    frame: np.ndarray, um_per_px: float, *, mode: str, size: int, model_um_per_px: float | None
) -> tuple[np.ndarray, Resampling]:
    """``prepare`` of a frame that ``validate_frame`` already returned (no second check)."""
    img, rs = resample(frame, um_per_px, mode=mode, size=size, model_um_per_px=model_um_per_px)
    return normalise(img), rs


def pad_to_multiple(img: np.ndarray, multiple: int, *, min_size: int = 0) -> np.ndarray:
    """Pad bottom/right (coordinates unchanged) to a multiple of ``multiple``, with the image
    mean (the value augmentation uses outside the frame)."""
    h, w = img.shape
    th = max(min_size, -(-h // multiple) * multiple)
    tw = max(min_size, -(-w // multiple) * multiple)
    if (th, tw) == (h, w):
        return img
    out = np.full((th, tw), float(img.mean()), dtype=np.float32)
    out[:h, :w] = img
    return out
