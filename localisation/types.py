"""What a localiser returns, and the interface the daemon and calibration rely on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TipDetection:
    """One detected tip in the input image's own pixels (x = column, y = row, origin at the
    centre of the top-left pixel). ``score`` in [0, 1] is the detection's confidence."""

    x_px: float
    y_px: float
    score: float


class Localiser(Protocol):
    """Anything that finds pipette tips in a greyscale frame.

    ``locate(pixels, um_per_px)``: ``pixels`` is (h, w) uint8/uint16/float, any size and pixel
    size; returns detections in the input's pixels, best first, possibly empty. Deterministic.
    """

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]: ...


#: Frame pixel sizes (µm per pixel, inclusive) where the shipped localiser was measured to keep
#: its precision (README: "Frames unlike the training frames"). Frames outside are still
#: located, but their detections must not steer a manipulator: on frames of 1.0-2.0 µm per
#: pixel the shipped cascade's precision fell to 86.5 % (98.0 % on the test set).
VALIDATED_UM_PER_PX = (0.2, 1.0)


RIG_PIXEL_SIZE_TOLERANCE = 0.01  # relative: a frame within 1 % of the rig's pixel size is the rig's


def pixel_size_refusal(
    um_per_px: float, um_per_px_range: tuple[float, float] | None, rig_um_per_px: float | None = None
) -> str | None:
    """Why detections on a frame of ``um_per_px`` (µm per pixel) may not steer a manipulator:
    a one-line reason when it lies outside ``um_per_px_range`` (inclusive), or differs by more
    than ``RIG_PIXEL_SIZE_TOLERANCE`` from ``rig_um_per_px``, the pixel size the calibrations
    were made for (another zoom or objective); else None (a None range or rig size: no limit)."""
    if um_per_px_range is not None:
        lo, hi = um_per_px_range
        if not lo <= um_per_px <= hi:
            return (f"frame pixel size {um_per_px:g} µm is outside the localiser's validated range "
                    f"{lo:g}-{hi:g} µm per pixel ([localiser] um_per_px_range)")
    if rig_um_per_px is not None and abs(um_per_px - rig_um_per_px) > RIG_PIXEL_SIZE_TOLERANCE * rig_um_per_px:
        return (f"frame pixel size {um_per_px:g} µm differs from the rig's {rig_um_per_px:g} µm ([rig] um_per_px), "
                "the pixel size its calibrations are for")
    return None
