"""Hungarian matching between predicted and true tips, and the paper's losses (eq. 6-7).

Coordinates are pixels of the model input (x, y). Tips are padded to a fixed ``N`` per image
with a boolean validity mask; padded rows never take part in matching or losses (there are no
fake (0, 0) tips anywhere).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def match(pred_xy: np.ndarray, true_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment minimising the summed Euclidean distance (eq. 6).

    ``pred_xy`` (p, 2), ``true_xy`` (t, 2). Returns index arrays ``(pred_idx, true_idx)`` of
    length min(p, t).
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    if len(pred_xy) == 0 or len(true_xy) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    cost = np.linalg.norm(pred_xy[:, None, :] - true_xy[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def batched_match(
    pred_xy: torch.Tensor,
    true_xy: torch.Tensor,
    true_valid: torch.Tensor,
    pred_valid: torch.Tensor | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-image Hungarian matching. ``pred_xy`` (B, P, 2), ``true_xy`` (B, N, 2),
    ``true_valid`` (B, N) bool, ``pred_valid`` optional (B, P) bool.

    Returns one ``(pred_idx, true_idx)`` pair per image, indices into the padded tensors.
    """
    pred_np = pred_xy.detach().float().cpu().numpy()
    true_np = true_xy.detach().float().cpu().numpy()
    tv = true_valid.detach().cpu().numpy().astype(bool)
    pv = (
        np.ones(pred_np.shape[:2], dtype=bool)
        if pred_valid is None
        else pred_valid.detach().cpu().numpy().astype(bool)
    )
    out = []
    for b in range(pred_np.shape[0]):
        p_ids = np.flatnonzero(pv[b])
        t_ids = np.flatnonzero(tv[b])
        r, c = match(pred_np[b, p_ids], true_np[b, t_ids])
        out.append((p_ids[r], t_ids[c]))
    return out


def hungarian_distance_loss(
    pred_xy: torch.Tensor, true_xy: torch.Tensor, true_valid: torch.Tensor, *, scale: float = 1.0
) -> torch.Tensor:
    """Mean Euclidean distance between Hungarian-matched pairs, divided by ``scale``.

    (B, P, 2) predictions against (B, N, 2) truths with (B, N) validity. Predictions left
    unmatched (more outputs than tips) are not penalised here: the presence loss handles them.
    Zero when there is no true tip in the batch.
    """
    pairs = batched_match(pred_xy, true_xy, true_valid)
    dists = []
    for b, (pi, ti) in enumerate(pairs):
        if len(pi):
            d = pred_xy[b, torch.as_tensor(pi)] - true_xy[b, torch.as_tensor(ti)]
            dists.append(torch.sqrt((d**2).sum(-1) + 1e-6))
    if not dists:
        return pred_xy.sum() * 0.0
    return torch.cat(dists).mean() / scale


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss between sigmoid(logits) and a target heatmap, both (B, 1, H, W).

    The target is clipped to [0, 1] (summed Gaussians may exceed 1). Per image, then averaged;
    an empty target with an empty prediction costs ~0 thanks to the smoothing ``eps``.
    """
    p = torch.sigmoid(logits).flatten(1)
    t = target.clamp(0.0, 1.0).flatten(1)
    inter = (p * t).sum(1)
    return (1.0 - (2.0 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def presence_targets(
    pred_xy: torch.Tensor, true_xy: torch.Tensor, true_valid: torch.Tensor
) -> torch.Tensor:
    """(B, P) float: 1 for predictions matched to a true tip, 0 for the others."""
    target = torch.zeros(pred_xy.shape[:2], dtype=torch.float32, device=pred_xy.device)
    for b, (pi, _ti) in enumerate(batched_match(pred_xy, true_xy, true_valid)):
        target[b, torch.as_tensor(pi, dtype=torch.long)] = 1.0
    return target


def presence_loss(
    presence_logits: torch.Tensor,
    pred_xy: torch.Tensor,
    true_xy: torch.Tensor,
    true_valid: torch.Tensor,
) -> torch.Tensor:
    """Binary cross-entropy of each output's presence logit against "matched to a true tip"."""
    target = presence_targets(pred_xy, true_xy, true_valid)
    return F.binary_cross_entropy_with_logits(presence_logits, target)


def paper_total_loss(
    outputs: dict[str, torch.Tensor],
    target_heatmap: torch.Tensor | None,
    true_xy: torch.Tensor,
    true_valid: torch.Tensor,
    *,
    alpha: float = 0.15,
    coord_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The paper's eq. 7: L = L_m (Dice on the heatmap) + alpha * L_h (Hungarian distance).

    Works for the models that output only some keys: a model without ``heatmap`` (the
    Table II baselines) gets the Hungarian term alone, and one with ``presence`` (our
    variable-count extension) adds a presence BCE. The paper sums L_h over the n tips; here it
    is the mean over matched tips times ``alpha`` (divide by ``coord_scale`` to keep it in a
    range comparable to Dice). Returns the total and each term (for the metrics log).
    """
    terms: dict[str, torch.Tensor] = {}
    zero = true_xy.sum() * 0.0
    total = zero
    if "heatmap" in outputs and target_heatmap is not None:
        terms["dice"] = dice_loss(outputs["heatmap"], target_heatmap)
        total = total + terms["dice"]
    if "coords" in outputs:
        terms["hungarian"] = hungarian_distance_loss(
            outputs["coords"], true_xy, true_valid, scale=coord_scale
        )
        total = total + alpha * terms["hungarian"]
        if "presence" in outputs:
            terms["presence"] = presence_loss(
                outputs["presence"], outputs["coords"], true_xy, true_valid
            )
            total = total + terms["presence"]
    terms["total"] = total
    return terms
