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
