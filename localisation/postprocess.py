"""Model outputs -> detections (x, y, score) in model pixels. Separate from ``forward``.

How each output kind becomes detections:

- ``coords`` + ``presence`` (fast model, paper model with its presence head): score =
  sigmoid(presence); kept when score >= threshold.
- ``coords`` + ``heatmap`` without ``presence`` (the paper's model as published, which always
  outputs n_max = 4 points): score = sigmoid(heatmap) sampled at each point, so outputs that
  land where the coarse learner saw no tip are dropped. This is how fewer than n_max tips are
  handled for the paper's model (the paper does not say).
- ``coords`` alone (Table II baselines): every output is kept with score 1.0 (the paper's
  protocol; the baselines cannot say that a tip is absent).
- ``heatmap`` alone (ablation "coarse learner without finer learner"): local maxima of
  sigmoid(heatmap) above the threshold, at most ``n_max``.

Finally, detections closer than ``min_separation_px`` to a better one are dropped (several
outputs on one tip would otherwise count as false positives), and the rest sorted by score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def heatmap_peaks(prob: torch.Tensor, *, k: int, window: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest local maxima (``window`` x ``window``) of a probability map (1, H, W):
    coords (k, 2) x, y and values (k,)."""
    p = prob[None] if prob.dim() == 3 else prob
    pooled = F.max_pool2d(p, window, stride=1, padding=window // 2)
    peaks = torch.where(p == pooled, p, torch.zeros_like(p)).flatten()
    h, w = p.shape[-2:]
    vals, idx = peaks.topk(min(k, peaks.numel()))
    ys = torch.div(idx, w, rounding_mode="floor")
    xs = idx - ys * w
    return torch.stack([xs, ys], 1).float(), vals


def sample_map(prob: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of a map (1, H, W) at points (n, 2) x, y (pixel-centre origin)."""
    h, w = prob.shape[-2:]
    gx = (coords[:, 0] + 0.5) / w * 2 - 1
    gy = (coords[:, 1] + 0.5) / h * 2 - 1
    grid = torch.stack([gx, gy], -1)[None, None]  # (1, 1, n, 2)
    return F.grid_sample(prob[None].float(), grid, align_corners=False, padding_mode="zeros")[0, 0, 0]


def suppress_duplicates(xy: np.ndarray, scores: np.ndarray, min_separation_px: float) -> np.ndarray:
    """Indices to keep, best first: greedy, a detection within ``min_separation_px`` of a kept
    one is dropped."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order:
        if all(np.hypot(*(xy[i] - xy[j])) >= min_separation_px for j in keep):
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def detections(
    outputs: dict[str, torch.Tensor],
    *,
    score_threshold: float,
    n_max: int,
    min_separation_px: float = 3.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image of the batch: (xy (m, 2) model pixels, scores (m,)) sorted best first."""
    coords = outputs.get("coords")
    heat = outputs.get("heatmap")
    ref = coords if coords is not None else heat
    if ref is None:
        raise ValueError("model outputs have neither 'coords' nor 'heatmap'")
    batch = ref.shape[0]
    result = []
    for b in range(batch):
        if coords is not None:
            xy = coords[b].float()
            if "presence" in outputs:
                scores = torch.sigmoid(outputs["presence"][b].float())
            elif heat is not None:
                scores = sample_map(torch.sigmoid(heat[b].float()), xy)
            else:
                scores = torch.ones(xy.shape[0])
        elif heat is not None:
            xy, scores = heatmap_peaks(torch.sigmoid(heat[b].float()), k=n_max)
        else:
            raise ValueError("model outputs have neither 'coords' nor 'heatmap'")
        xy_np = xy.detach().cpu().numpy().astype(np.float64)
        s_np = scores.detach().cpu().numpy().astype(np.float64)
        sel = s_np >= score_threshold
        xy_np, s_np = xy_np[sel], s_np[sel]
        keep = suppress_duplicates(xy_np, s_np, min_separation_px)
        result.append((xy_np[keep].reshape(-1, 2), s_np[keep]))
    return result
