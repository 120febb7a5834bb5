"""Continuous offset correction of one channel from confident, assigned, fresh detections.

Each observation is an *innovation*: the detected tip minus the tip predicted by the current
calibration (microscope X, Y in µm). An observation is **rejected** (logged, never applied)
when any gate fails:

- ``low confidence``: the detection's score is below ``min_confidence``;
- ``stale frame``: the frame is older than ``stale_after_s``;
- ``moving``: the manipulator moved during or just before the frame;
- ``jump too large``: the innovation exceeds ``max_jump_um`` (a wrong assignment, a lost tip);
- ``outlier``: it disagrees by more than ``outlier_um`` with the median of the recent history.
  Outliers are not forgotten: if ``jump_votes`` consecutive outliers agree with one another
  (spread within ``outlier_um``), the tip really jumped (tissue penetration) and they become
  the new history.

Accepted innovations enter a short window; once it holds ``min_votes`` of them, its median
(when larger than ``deadband_um``) is applied to the offset and the window is re-expressed
relative to the new offset. The median makes single bad detections harmless; the window
length sets how quickly drift and jumps are followed. Rejections are logged with their reason
(each reason at most once a second per channel, with a count) and counted in ``counts``.
"""

from __future__ import annotations

import collections
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from rig.logs import get_logger


@dataclass(frozen=True)
class CorrectionDecision:
    """What happened to one observation. ``applied_delta_xy_um`` is None unless the offset moved."""

    accepted: bool
    reason: str
    innovation_xy_um: tuple[float, float]
    applied_delta_xy_um: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "innovation_xy_um": list(self.innovation_xy_um),
            "applied_delta_xy_um": None if self.applied_delta_xy_um is None else list(self.applied_delta_xy_um),
        }


class OffsetCorrector:
    """The gates and the median filter of one channel's continuous correction (not thread-safe;
    the service serialises calls)."""

    def __init__(
        self,
        channel: str,
        *,
        min_confidence: float,
        max_jump_um: float,
        stale_after_s: float,
        window: int = 5,
        min_votes: int = 3,
        outlier_um: float = 3.0,
        jump_votes: int = 3,
        deadband_um: float = 0.3,
    ) -> None:
        if not 1 <= min_votes <= window:
            raise ValueError("need 1 <= min_votes <= window")
        self.channel = channel
        self.min_confidence = float(min_confidence)
        self.max_jump_um = float(max_jump_um)
        self.stale_after_s = float(stale_after_s)
        self.min_votes = int(min_votes)
        self.outlier_um = float(outlier_um)
        self.jump_votes = int(jump_votes)
        self.deadband_um = float(deadband_um)
        self._history: deque[np.ndarray] = deque(maxlen=int(window))
        # outliers since the last inlier: a jump is confirmed by ``jump_votes`` that agree
        self._pending: collections.deque[np.ndarray] = collections.deque(maxlen=self.jump_votes)
        self.log = get_logger("patchrig.calibration.correction", channel=channel)
        self.counts: dict[str, int] = {}
        self.log_interval_s = 1.0
        self._logged_s: dict[str, float] = {}
        self._logged_count: dict[str, int] = {}

    def reset(self) -> None:
        """Forget the history (after a calibration, a set-tip or a pipette change)."""
        self._history.clear()
        self._pending.clear()

    def _reject(self, reason: str, e: np.ndarray) -> CorrectionDecision:
        """Count and log a rejection (each reason at most once per ``log_interval_s``, with the
        number of rejections for that reason since the last line)."""
        key = reason.split(":")[0]
        self.counts[key] = self.counts.get(key, 0) + 1
        now = time.monotonic()
        if now - self._logged_s.get(key, -math.inf) >= self.log_interval_s:
            self.log.info(
                "correction rejected",
                reason=reason,
                innovation_xy_um=[round(float(v), 3) for v in e],
                rejected_since_last_line=self.counts[key] - self._logged_count.get(key, 0),
            )
            self._logged_s[key] = now
            self._logged_count[key] = self.counts[key]
        return CorrectionDecision(False, reason, (float(e[0]), float(e[1])))

    def update(
        self, innovation_xy_um: np.ndarray, *, score: float, frame_age_s: float, moving: bool
    ) -> CorrectionDecision:
        """Judge one observation; return the decision (and the offset delta to apply, if any)."""
        e = np.asarray(innovation_xy_um, float).reshape(-1)[:2]
        if not (np.all(np.isfinite(e)) and math.isfinite(score) and math.isfinite(frame_age_s)):
            return self._reject("not finite", np.nan_to_num(e))
        if score < self.min_confidence:
            return self._reject(f"low confidence: score {score:.2f} < {self.min_confidence:.2f}", e)
        if frame_age_s > self.stale_after_s:
            return self._reject(f"stale frame: {frame_age_s:.2f} s old > {self.stale_after_s:.2f} s", e)
        if moving:
            return self._reject("moving: the manipulator moved during the frame", e)
        size = float(np.linalg.norm(e))
        if size > self.max_jump_um:
            self._pending.clear()
            return self._reject(f"jump too large: {size:.1f} µm > {self.max_jump_um:.1f} µm", e)
        reason = "accepted"
        if len(self._history) >= self.min_votes:
            median = np.median(np.array(self._history), axis=0)
            if np.linalg.norm(e - median) > self.outlier_um:
                self._pending.append(e)
                recent = np.array(self._pending)
                spread = float(np.max(np.linalg.norm(recent - np.median(recent, axis=0), axis=1)))
                if len(recent) < self.jump_votes or spread > self.outlier_um:
                    return self._reject(
                        f"outlier: {np.linalg.norm(e - median):.1f} µm from the recent history "
                        f"(jump confirmation {min(len(self._pending), self.jump_votes)}/{self.jump_votes})",
                        e,
                    )
                self._history.clear()
                self._history.extend(recent)
                self._pending.clear()
                reason = "accepted: jump confirmed"
            else:
                self._pending.clear()
                self._history.append(e)
        else:
            self._history.append(e)
        self.counts["accepted"] = self.counts.get("accepted", 0) + 1
        if len(self._history) < self.min_votes:
            return CorrectionDecision(True, f"{reason} (waiting for {self.min_votes} votes)", (float(e[0]), float(e[1])))
        median = np.median(np.array(self._history), axis=0)
        if np.linalg.norm(median) <= self.deadband_um:
            return CorrectionDecision(True, f"{reason} (within deadband)", (float(e[0]), float(e[1])))
        shifted = [h - median for h in self._history]
        self._history.clear()
        self._history.extend(shifted)
        self.log.info("offset corrected", delta_xy_um=[round(float(v), 3) for v in median], reason=reason)
        return CorrectionDecision(True, reason, (float(e[0]), float(e[1])), (float(median[0]), float(median[1])))
