"""Localisation metrics, in µm: the paper's and detection metrics, split by tip count.

Matching: per image, predictions and true tips are paired one-to-one by the Hungarian algorithm
on Euclidean distance, gated at ``gate_um`` (10 µm): a pair farther apart is not a match. Then

- ``acc_{e}um`` (e = 3, 5, 10): fraction of TRUE tips whose match lies within e µm (the paper's
  accuracy within an error threshold; acc_10um equals the recall);
- ``mean_error_um``: mean distance of the matched pairs;
- ``precision`` = matches / predictions, ``recall`` = matches / true tips, ``f1``;
- ``heatmap_iou``: IoU of predicted and true heatmaps binarised at 0.5 (models with a heatmap);
- ``exact_count``: fraction of images with as many predictions as true tips.

Faint real tips ("difficult" objects, as PASCAL VOC treats them): a dataset may list tips that
are really there but below the visibility threshold (``all_tips`` entries with reason
``low_contrast``: in frame, in focus, too faint to require). They are neither required nor
penalised: a prediction left unmatched by the true tips that lies within the gate of such a tip
is dropped from the predictions (``ignored_predictions``) instead of counting as a false
positive; missing them costs nothing. One prediction per faint tip (matched one to one, as
required tips are): a second detection of the same faint tip is a duplicate and counts as
false, as a second detection of a required tip does (stricter than PASCAL VOC, which ignores
every detection of a difficult object; the daemon must not see one tip twice).

Everything is also reported per number of true tips in the image (``by_n_tips``), and, where
the dataset gives each true tip's contrast-to-noise ratio (``patchrig data synth`` does), the
accuracy per CNR band (``by_cnr``: how detection falls off as tips get fainter), and every
metric per band of the frame's pixel size (``by_um_per_px``: how it holds across zoom levels;
frames outside the training range of 0.35-1.0 µm per pixel fall in the outer bands).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

THRESHOLDS_UM = (3.0, 5.0, 10.0)
CURVE_UM = tuple(float(x) for x in np.arange(0.0, 20.01, 0.5))
CNR_BANDS = (0.0, 10.0, 20.0, 40.0)  # lower edges of the ``by_cnr`` bands
PIXEL_SIZE_BANDS_UM = (0.0, 0.5, 0.7, 1.0)  # lower edges of the ``by_um_per_px`` bands (µm per pixel)
#: score thresholds a validation sweep tries (``ship`` and ``train-verifier`` alike): 0.20-0.95
SWEEP_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.20, 0.951, 0.05), 2))


def _band_name(value: float, lower_edges: tuple[float, ...]) -> str:
    """The name of the band of ``value`` among bands with these lower edges (the first is only
    a placeholder): "<e1", "e1-e2", ..., "eN+"."""
    edges = lower_edges
    for lo, hi in zip(edges[1:-1], edges[2:], strict=True):
        if lo <= value < hi:
            return f"{lo:g}-{hi:g}"
    return f"<{edges[1]:g}" if value < edges[1] else f"{edges[-1]:g}+"


def cnr_band(cnr: float) -> str:
    """The ``by_cnr`` band name of a contrast-to-noise ratio ("<10", "10-20", "20-40", "40+")."""
    return _band_name(cnr, CNR_BANDS)


#: the ``by_cnr`` band names, faint to bright ("<10", "10-20", "20-40", "40+")
CNR_BAND_NAMES = tuple(cnr_band(lo) for lo in CNR_BANDS)


def pixel_size_band(um_per_px: float) -> str:
    """The ``by_um_per_px`` band name of a frame's pixel size in µm ("<0.5", "0.5-0.7",
    "0.7-1", "1+"): fine to coarse."""
    return _band_name(um_per_px, PIXEL_SIZE_BANDS_UM)


#: the ``by_um_per_px`` band names, fine to coarse
PIXEL_SIZE_BAND_NAMES = tuple(pixel_size_band(lo) for lo in PIXEL_SIZE_BANDS_UM)


def gated_pairs(pred_um: np.ndarray, true_um: np.ndarray, gate_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gated Hungarian matches between (p, 2) and (t, 2) points: prediction indices, true
    indices and distances (µm), pairs farther apart than ``gate_um`` left out."""
    pred_um = np.asarray(pred_um, dtype=np.float64).reshape(-1, 2)
    true_um = np.asarray(true_um, dtype=np.float64).reshape(-1, 2)
    if len(pred_um) == 0 or len(true_um) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    d = np.linalg.norm(pred_um[:, None] - true_um[None], axis=-1)
    big = 1e6
    rows, cols = linear_sum_assignment(np.where(d <= gate_um, d, big))
    m = d[rows, cols]
    keep = m <= gate_um
    return rows[keep], cols[keep], m[keep]


def gated_match(pred_um: np.ndarray, true_um: np.ndarray, gate_um: float) -> np.ndarray:
    """Distances (µm) of the gated Hungarian matches between (p, 2) and (t, 2) points."""
    return gated_pairs(pred_um, true_um, gate_um)[2]


@dataclass
class _Tally:
    images: int = 0
    true: int = 0
    pred: int = 0
    ignored: int = 0
    distances: list[float] = field(default_factory=list)
    exact_count: int = 0
    ious: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | None]:
        d = np.asarray(self.distances)
        matched = len(d)
        precision = matched / self.pred if self.pred else (1.0 if self.true == 0 else 0.0)
        recall = matched / self.true if self.true else 1.0
        out: dict[str, float | int | None] = {
            "images": self.images,
            "true_tips": self.true,
            "predicted_tips": self.pred,
            "matched_tips": matched,
            "ignored_predictions": self.ignored,
        }
        for e in THRESHOLDS_UM:
            out[f"acc_{e:g}um"] = float((d <= e).sum() / self.true) if self.true else None
        out["mean_error_um"] = float(d.mean()) if matched else None
        out["precision"] = float(precision)
        out["recall"] = float(recall)
        out["f1"] = float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0
        out["exact_count"] = self.exact_count / self.images if self.images else None
        out["heatmap_iou"] = float(np.mean(self.ious)) if self.ious else None
        return out


class MetricsAccumulator:
    """Add images one by one, then ``summary()`` (overall, by number of true tips, by tip
    contrast and by pixel size)."""

    def __init__(self, gate_um: float = 10.0) -> None:
        self.gate_um = gate_um
        self.total = _Tally()
        self.by_n: dict[int, _Tally] = defaultdict(_Tally)
        self.by_scale: dict[str, _Tally] = defaultdict(_Tally)  # pixel-size band -> tally
        self.by_cnr: dict[str, list[float]] = defaultdict(list)  # band -> distance per true tip (inf: missed)

    def add(
        self,
        pred_px: np.ndarray,
        true_px: np.ndarray,
        um_per_px: float,
        *,
        heatmap_iou: float | None = None,
        faint_px: np.ndarray | None = None,
        true_cnr: np.ndarray | None = None,
    ) -> np.ndarray:
        """One image: predictions and truths in the same pixels, pixel size ``um_per_px``;
        ``faint_px``: real tips too faint to require (see the module docstring); ``true_cnr``:
        each true tip's contrast-to-noise ratio (NaN: unknown). Returns the matched distances (µm)."""
        pred = np.asarray(pred_px, dtype=np.float64).reshape(-1, 2) * um_per_px
        true = np.asarray(true_px, dtype=np.float64).reshape(-1, 2) * um_per_px
        rows, cols, dist = gated_pairs(pred, true, self.gate_um)
        if true_cnr is not None:
            per_tip = np.full(len(true), np.inf)
            per_tip[cols] = dist
            for c, d in zip(np.asarray(true_cnr, dtype=np.float64).reshape(-1), per_tip, strict=True):
                if np.isfinite(c):
                    self.by_cnr[cnr_band(float(c))].append(float(d))
        ignored = 0
        if faint_px is not None and len(faint_px):
            unmatched = np.setdiff1d(np.arange(len(pred)), rows)
            faint = np.asarray(faint_px, dtype=np.float64).reshape(-1, 2) * um_per_px
            ignored = len(gated_pairs(pred[unmatched], faint, self.gate_um)[0])
        for t in (self.total, self.by_n[len(true)], self.by_scale[pixel_size_band(float(um_per_px))]):
            t.images += 1
            t.true += len(true)
            t.pred += len(pred) - ignored
            t.ignored += ignored
            t.distances.extend(dist.tolist())
            t.exact_count += int(len(pred) == len(true))
            if heatmap_iou is not None:
                t.ious.append(heatmap_iou)
        return dist

    def curve(self) -> dict[str, list[float]]:
        """Accuracy (fraction of true tips matched within e) for e in 0..20 µm; matches are
        gated at ``gate_um``, so the curve is flat beyond it."""
        d = np.asarray(self.total.distances)
        n = max(self.total.true, 1)
        return {"threshold_um": list(CURVE_UM), "accuracy": [float((d <= e).sum() / n) for e in CURVE_UM]}

    def summary(self) -> dict[str, object]:
        return {
            "overall": self.total.summary(),
            "by_n_tips": {str(k): self.by_n[k].summary() for k in sorted(self.by_n)},
            "by_cnr": {band: _band_summary(self.by_cnr[band]) for band in _band_order(self.by_cnr)},
            "by_um_per_px": {b: self.by_scale[b].summary() for b in PIXEL_SIZE_BAND_NAMES if b in self.by_scale},
            "gate_um": self.gate_um,
        }


def _band_order(bands: dict[str, list[float]]) -> list[str]:
    return [n for n in CNR_BAND_NAMES if n in bands]


def _band_summary(distances: list[float]) -> dict[str, float | int]:
    d = np.asarray(distances)
    out: dict[str, float | int] = {"true_tips": len(d)}
    for e in THRESHOLDS_UM:
        out[f"acc_{e:g}um"] = float((d <= e).mean()) if len(d) else 0.0
    return out


def threshold_sweep(
    frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]], thresholds: Iterable[float]
) -> list[dict[str, float]]:
    """Overall metrics at each score threshold. ``frames``: per image (predictions (m, 2) px,
    their scores (m,), true tips (t, 2) px, µm per px, faint tips (f, 2) px), with every
    prediction a localiser keeps at its lowest threshold. Keeping the scores at or above a
    higher threshold gives what that threshold gives: duplicate suppression and the n_max cap
    only ever favour better scores."""
    rows = []
    for thr in thresholds:
        acc = MetricsAccumulator()
        for pred_px, scores, true_px, um_per_px, faint_px in frames:
            acc.add(np.asarray(pred_px).reshape(-1, 2)[np.asarray(scores) >= thr], true_px, um_per_px, faint_px=faint_px)
        o = acc.summary()["overall"]
        assert isinstance(o, dict)
        rows.append({"threshold": float(thr), "precision": o["precision"], "recall": o["recall"], "f1": o["f1"],
                     "acc_5um": o["acc_5um"], "acc_10um": o["acc_10um"]})
    return rows


def pick_threshold(rows: list[dict[str, float]], min_precision: float) -> dict[str, float]:
    """The row of the lowest threshold whose precision reaches ``min_precision`` (rows sorted
    by threshold), else the row with the best F1."""
    ok = [r for r in rows if r["precision"] >= min_precision]
    return ok[0] if ok else max(rows, key=lambda r: r["f1"])
