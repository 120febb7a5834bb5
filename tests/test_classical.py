"""The classical (no learning) tip detector on clean synthetic frames."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from localisation.classical import ClassicalTipDetector
from rig.errors import DataError


def wedge_frame(tip_xy: tuple[float, float], *, dark: bool, seed: int = 0) -> np.ndarray:
    """512x512 uint16 frame: a pipette wedge entering from the left border, ending at tip_xy,
    on a lit background with Poisson noise (about 40 photons per pixel)."""
    rng = np.random.default_rng(seed)
    expected = np.full((512, 512), 40.0, dtype=np.float32)
    mask = np.zeros((512, 512), dtype=np.float32)
    tx, ty = tip_xy
    cv2.fillPoly(mask, [np.array([[0, ty - 24], [0, ty + 24], [tx, ty]], dtype=np.int32)], 1.0)
    mask = cv2.GaussianBlur(mask, (0, 0), 1.0)
    expected *= 1.0 - 0.7 * mask if dark else 1.0 + 1.5 * mask
    return rng.poisson(expected).astype(np.uint16)


@pytest.mark.parametrize("dark", [True, False])
def test_finds_the_tip_of_a_clean_wedge(dark: bool) -> None:
    um_per_px = 0.6
    tip = (300.0, 256.0)
    found = ClassicalTipDetector().locate(wedge_frame(tip, dark=dark), um_per_px)
    assert len(found) == 1
    error_um = np.hypot(found[0].x_px - tip[0], found[0].y_px - tip[1]) * um_per_px
    assert error_um < 5.0
    assert 0.0 < found[0].score <= 1.0


def test_no_pipette_no_detection_and_deterministic() -> None:
    rng = np.random.default_rng(1)
    empty = rng.poisson(40.0, size=(512, 512)).astype(np.uint16)
    det = ClassicalTipDetector()
    assert det.locate(empty, 0.6) == []
    frame = wedge_frame((200.0, 300.0), dark=True, seed=3)
    assert det.locate(frame, 0.8) == det.locate(frame.copy(), 0.8)


def test_bad_input_is_a_clear_error() -> None:
    bad = np.full((64, 64), np.nan, dtype=np.float32)
    with pytest.raises(DataError, match="NaN"):
        ClassicalTipDetector().locate(bad, 0.5)
    with pytest.raises(DataError, match="um_per_px"):
        ClassicalTipDetector().locate(np.zeros((64, 64), np.uint8), -1.0)
