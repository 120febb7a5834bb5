"""Tip-to-channel assignment: the Hungarian algorithm against each channel's predicted tip.

Each calibrated channel predicts where its tip should be (its read-back position through its
calibration, in pixels of the frame at hand). Detections are matched one-to-one to channels
by minimum total distance (µm) with a gate: a pair further apart than ``gate_um`` is never
matched. The gate is built into the optimisation (each channel and each detection may stay
unmatched at a cost of ``gate_um / 2``: one gate for the two), so a far pair never displaces a
near one, and a pair with a clearly closer partner is left unmatched (``AMBIGUITY_FRACTION``). Detections that
match no channel are reported as unassigned; channels with no detection within the gate are
reported as missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from localisation.types import TipDetection

_FORBIDDEN = 1e12


@dataclass(frozen=True)
class AssignedTip:
    """One detection matched to a channel; ``distance_um`` from the channel's prediction."""

    channel: str
    index: int
    detection: TipDetection
    distance_um: float
    predicted_px: tuple[float, float]


@dataclass(frozen=True)
class Assignment:
    """The result: ``assigned`` per channel, ``unassigned`` detection indices, ``missing`` channels."""

    assigned: dict[str, AssignedTip] = field(default_factory=dict)
    unassigned: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def as_dict(self, detections: list[TipDetection]) -> dict[str, Any]:
        """JSON-able form (pixels of the frame, µm distances; ``index`` into the detections)."""
        return {
            "assigned": {
                ch: {
                    "index": a.index,
                    "x_px": float(a.detection.x_px),
                    "y_px": float(a.detection.y_px),
                    "score": float(a.detection.score),
                    "distance_um": float(a.distance_um),
                    "predicted_x_px": float(a.predicted_px[0]),
                    "predicted_y_px": float(a.predicted_px[1]),
                }
                for ch, a in self.assigned.items()
            },
            "unassigned": [
                {"x_px": float(detections[i].x_px), "y_px": float(detections[i].y_px), "score": float(detections[i].score)}
                for i in self.unassigned
            ],
            "missing": list(self.missing),
        }


AMBIGUITY_FRACTION = 1.0 / 3.0  # of the gate: a partner this much closer makes a pair ambiguous


def assign_detections(
    predicted_px: Mapping[str, tuple[float, float] | np.ndarray],
    detections: list[TipDetection],
    *,
    um_per_px: float,
    gate_um: float,
) -> Assignment:
    """Match ``detections`` to channels whose tip is predicted at ``predicted_px`` (pixels).

    Distances are in µm (pixel distance times ``um_per_px``); pairs further than ``gate_um``
    are never matched. A matched pair is kept only if neither its channel nor its detection
    has another partner closer by more than ``AMBIGUITY_FRACTION`` of the gate (5 µm of a
    15 µm gate): the channel is then missing and the detection unassigned.
    """
    if not gate_um > 0:
        raise ValueError("gate_um must be positive")
    channels = list(predicted_px)
    n_c, n_d = len(channels), len(detections)
    if n_c == 0 or n_d == 0:
        return Assignment(unassigned=list(range(n_d)), missing=channels)
    pred = np.array([np.asarray(predicted_px[c], float)[:2] for c in channels])
    det = np.array([[d.x_px, d.y_px] for d in detections], float)
    dist_um = np.linalg.norm(pred[:, None, :] - det[None, :, :], axis=2) * float(um_per_px)
    # augmented square problem: [[D, channel-unmatched], [detection-unmatched, 0]]
    size = n_c + n_d
    cost = np.zeros((size, size))
    cost[:n_c, :n_d] = np.where(dist_um <= gate_um, dist_um, _FORBIDDEN)
    cost[:n_c, n_d:] = _FORBIDDEN
    # a channel and a detection left unmatched cost one gate together (half each), as much as
    # the farthest allowed pair: chains of far pairs (A takes B's tip, B takes clutter) cost
    # more than the near pair they would displace
    cost[np.arange(n_c), n_d + np.arange(n_c)] = gate_um / 2
    cost[n_c:, :n_d] = _FORBIDDEN
    cost[n_c + np.arange(n_d), np.arange(n_d)] = gate_um / 2
    rows, cols = linear_sum_assignment(cost)
    assigned: dict[str, AssignedTip] = {}
    margin_um = gate_um * AMBIGUITY_FRACTION
    for r, c in zip(rows, cols, strict=True):
        if r < n_c and c < n_d and dist_um[r, c] <= gate_um:
            # the optimum may chain far pairs (A takes B's tip, B takes clutter) to avoid two
            # unmatched costs; a pair whose channel or detection has a clearly closer partner
            # is ambiguous: left unassigned, so that it never corrects anything
            if dist_um[r, c] > dist_um[r].min() + margin_um or dist_um[r, c] > dist_um[:, c].min() + margin_um:
                continue
            ch = channels[r]
            assigned[ch] = AssignedTip(ch, int(c), detections[c], float(dist_um[r, c]), (float(pred[r, 0]), float(pred[r, 1])))
    used = {a.index for a in assigned.values()}
    return Assignment(
        assigned=assigned,
        unassigned=[i for i in range(n_d) if i not in used],
        missing=[c for c in channels if c not in assigned],
    )
