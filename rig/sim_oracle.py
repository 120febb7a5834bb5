"""An oracle localiser for the simulated rig: the true tips of each rendered frame, plus noise.

It answers ``locate(pixels, um_per_px)`` for frames of one ``SimMicroscope`` by looking up the
truth recorded when that very pixel array was rendered (visible tips only, as the renderer
labels them), adds Gaussian noise of ``noise_px`` and gives every tip ``score``. A frame that
is the mean of consecutive rendered frames (``[calibration] frames_averaged``, taken with
the pipettes still) gets the truth of the newest of them. Frames it did not see rendered get
no detections. It is for tests, development (``patchrig sim --localiser
oracle``) and for separating control error from localisation error; it is never used on a
real rig (it needs the simulator's truth).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from localisation.types import TipDetection


class OracleLocaliser:
    """Truth-reading localiser of ``microscope`` frames (see the module docstring)."""

    def __init__(self, microscope: Any, *, noise_px: float = 0.3, score: float = 0.95, seed: int = 0, keep: int = 40) -> None:
        self._microscope = microscope
        self.noise_px = float(noise_px)
        self.score = float(score)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._keep = keep
        self._recent: list[tuple[Any, list[tuple[float, float]]]] = []
        self._unsubscribe = microscope.subscribe(self._on_frame)

    def _on_frame(self, frame: Any) -> None:
        truth = dict(self._microscope.last_truth)  # the render thread calls us right after rendering
        tips = [(float(t.x_px), float(t.y_px)) for t in truth.values() if t.visible]
        with self._lock:
            self._recent = [*self._recent[-(self._keep - 1):], (frame.pixels, tips)]

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
        with self._lock:
            recent = list(self._recent)
        tips = next((t for p, t in reversed(recent) if p is pixels), None)
        if tips is None:
            tips = self._truth_of_an_average(pixels, recent)
        if tips is None:
            return []
        with self._lock:
            noise = self._rng.normal(0.0, self.noise_px, size=(len(tips), 2))
        return [TipDetection(x + dx, y + dy, self.score) for (x, y), (dx, dy) in zip(tips, noise, strict=True)]

    @staticmethod
    def _truth_of_an_average(
        pixels: np.ndarray, recent: list[tuple[Any, list[tuple[float, float]]]], max_frames: int = 32
    ) -> list[tuple[float, float]] | None:
        """The newest frame's truth if ``pixels`` is the rounded mean of 2..``max_frames`` (the
        config's largest ``frames_averaged``) consecutive recent frames, computed as
        ``calibration.observe`` averages; else None. Each window is first compared on one row
        (cheap), in full only where that row matches. An average over frames that are not
        consecutive (frames skipped under load) is not recognised."""
        row = pixels.shape[0] // 2
        for end in range(len(recent) - 1, max(len(recent) - 1 - max_frames, -1), -1):
            for k in range(2, min(max_frames, end + 1) + 1):
                window = [p for p, _ in recent[end - k + 1 : end + 1]]
                if any(p.shape != pixels.shape or p.dtype != pixels.dtype for p in window):
                    break
                row_mean = np.rint(np.mean(np.stack([p[row] for p in window]), axis=0)).astype(pixels.dtype)
                if not np.array_equal(row_mean, pixels[row]):
                    continue
                mean = np.rint(np.mean(np.stack(window), axis=0)).astype(pixels.dtype)
                if np.array_equal(mean, pixels):
                    return recent[end][1]
        return None

    def close(self) -> None:
        self._unsubscribe()
