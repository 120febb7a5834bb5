"""Ground-truth tip heatmaps: a Gaussian per tip (the paper's eq. 4-5).

Pixels follow the project convention: x = column, y = row, origin at the centre of the
top-left pixel. ``sigma_px`` is in the heatmap's own pixels (the paper uses 10 at 256x256).
"""

from __future__ import annotations

import torch


def gaussian_heatmap(
    tips_px: torch.Tensor,
    height: int,
    width: int,
    *,
    sigma_px: float,
    mode: str = "sum",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """One heatmap (height, width) with a Gaussian of peak 1 at each tip.

    ``tips_px``: (n, 2) x, y in the heatmap's pixels; ``valid``: optional (n,) bool mask of the
    rows that are real tips (padding rows are ignored). ``mode="sum"`` is the paper's eq. 5
    (overlapping Gaussians add, so the map may exceed 1); ``mode="max"`` keeps the maximum
    (CenterNet targets, always in [0, 1]).
    """
    if sigma_px <= 0:
        raise ValueError(f"sigma_px must be > 0, got {sigma_px}")
    if mode not in ("sum", "max"):
        raise ValueError(f"mode must be 'sum' or 'max', got {mode!r}")
    tips = tips_px.reshape(-1, 2).to(torch.float32)
    if valid is not None:
        tips = tips[valid.reshape(-1).to(torch.bool)]
    ys = torch.arange(height, dtype=torch.float32, device=tips.device)
    xs = torch.arange(width, dtype=torch.float32, device=tips.device)
    if tips.shape[0] == 0:
        return torch.zeros(height, width, dtype=torch.float32, device=tips.device)
    # separable Gaussians: (n, H, 1) * (n, 1, W)
    gy = torch.exp(-((ys[None, :] - tips[:, 1:2]) ** 2) / (2.0 * sigma_px**2))
    gx = torch.exp(-((xs[None, :] - tips[:, 0:1]) ** 2) / (2.0 * sigma_px**2))
    maps = gy[:, :, None] * gx[:, None, :]
    return maps.sum(dim=0) if mode == "sum" else maps.amax(dim=0)


def batch_heatmaps(
    tips_px: torch.Tensor,
    valid: torch.Tensor,
    height: int,
    width: int,
    *,
    sigma_px: float,
    mode: str = "sum",
) -> torch.Tensor:
    """Heatmaps (B, 1, height, width) for padded tips (B, N, 2) with validity mask (B, N)."""
    maps = [
        gaussian_heatmap(tips_px[b], height, width, sigma_px=sigma_px, mode=mode, valid=valid[b])
        for b in range(tips_px.shape[0])
    ]
    return torch.stack(maps)[:, None]


def heatmap_iou(pred: torch.Tensor, target: torch.Tensor, *, threshold: float = 0.5) -> float:
    """Intersection over union of two heatmaps binarised at ``threshold`` (both in [0, 1]).

    Both empty counts as a perfect match (1.0).
    """
    p = pred >= threshold
    t = target >= threshold
    union = (p | t).sum().item()
    if union == 0:
        return 1.0
    return float((p & t).sum().item() / union)
