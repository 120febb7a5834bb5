"""The ``fast`` tip localiser: a small fully convolutional CenterNet-style network.

Beyond the paper: any number of tips from 0 to ``n_max``, a presence logit per output and a
confidence per detection, real time on two CPU cores.

Architecture (input x: (B, 1, H, W) in [0, 1], H and W multiples of 16):
  encoder  stride 2 -> 4 -> 8 -> 16 residual conv stages (widths ``widths``), the last one
           with a dilated block for context (pipettes are long wedges: the tip is where the
           wedge ends);
  decoder  FPN-style top-down path back to stride ``out_stride`` (4 by default);
  heads    ``center_logits`` (B, 1, H/s, W/s): tip-centre heatmap logits;
           ``offset`` (B, 2, H/s, W/s): sub-cell x, y offset of the tip in cells.
Decoding (in ``forward``, cheap): 3x3 max-pool peak finding, the ``n_max`` best peaks ->
  ``coords`` (B, n_max, 2) x, y in input pixels (pixel-centre origin) and ``presence``
  (B, n_max) logits (the peak logit). Thresholding happens in post-processing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (channels unchanged)."""

    def __init__(self, channels: int, dilation: int = 1, *, identity_init: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels, dilation=dilation)
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
        )
        if identity_init:
            # the residual branch starts at exactly 0: on a non-negative (post-ReLU) input the
            # block is the identity, so a trained network grows deeper without changing
            bn = self.conv2[1]
            assert isinstance(bn, nn.BatchNorm2d)
            nn.init.zeros_(bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)), inplace=True)


def _extra(channels: int, n: int) -> list[ResidualBlock]:
    """``n`` identity-initialised residual blocks (alternating dilation 1 and 2)."""
    return [ResidualBlock(channels, dilation=1 + i % 2, identity_init=True) for i in range(n)]


class FastTipNet(nn.Module):
    """Small encoder-decoder predicting a tip-centre heatmap and sub-cell offsets.

    ``extra_blocks``: residual blocks appended to the stride 4, 8 and 16 stages, initialised as
    the identity (so weights of the network without them load unchanged, see
    ``checkpoint.load_weights(grow=True)``).
    """

    def __init__(
        self,
        *,
        widths: tuple[int, int, int, int] = (16, 32, 64, 96),
        out_stride: int = 4,
        n_max: int = 8,
        head_width: int | None = None,
        extra_blocks: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        super().__init__()
        if out_stride not in (2, 4):
            raise ValueError(f"out_stride must be 2 or 4, got {out_stride}")
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {n_max}")
        w1, w2, w3, w4 = widths
        self.n_max = n_max
        self.out_stride = out_stride
        self.use_offset = True  # False: ablation "no finer learner" (tips at cell centres)
        self.input_multiple = 16
        self.stem = nn.Sequential(_conv_bn_relu(1, w1, stride=2), _conv_bn_relu(w1, w1))  # /2
        e4, e8, e16 = (int(n) for n in extra_blocks)
        self.stage4 = nn.Sequential(_conv_bn_relu(w1, w2, stride=2), ResidualBlock(w2), *_extra(w2, e4))  # /4
        self.stage8 = nn.Sequential(_conv_bn_relu(w2, w3, stride=2), ResidualBlock(w3), *_extra(w3, e8))  # /8
        self.stage16 = nn.Sequential(  # /16
            _conv_bn_relu(w3, w4, stride=2), ResidualBlock(w4), ResidualBlock(w4, dilation=2), *_extra(w4, e16)
        )
        hw = head_width or w2
        self.lat16 = nn.Conv2d(w4, hw, 1)
        self.lat8 = nn.Conv2d(w3, hw, 1)
        self.lat4 = nn.Conv2d(w2, hw, 1)
        self.lat2 = nn.Conv2d(w1, hw, 1) if out_stride == 2 else None
        self.smooth = _conv_bn_relu(hw, hw)
        self.center_head = nn.Sequential(_conv_bn_relu(hw, hw), nn.Conv2d(hw, 1, 1))
        self.offset_head = nn.Sequential(_conv_bn_relu(hw, hw), nn.Conv2d(hw, 2, 1))
        # focal-loss prior: start with p(tip) ~ 0.01 everywhere
        last = self.center_head[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias, -4.6)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder features at the output stride: (B, head_width, H/s, W/s)."""
        f2 = self.stem(x)
        f4 = self.stage4(f2)
        f8 = self.stage8(f4)
        f16 = self.stage16(f8)
        p = self.lat16(f16)
        p = F.interpolate(p, size=f8.shape[-2:], mode="nearest") + self.lat8(f8)
        p = F.interpolate(p, size=f4.shape[-2:], mode="nearest") + self.lat4(f4)
        if self.lat2 is not None:
            p = F.interpolate(p, size=f2.shape[-2:], mode="nearest") + self.lat2(f2)
        return self.smooth(p)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 1, H, W) in [0, 1] -> dict of ``center_logits``, ``offset``, ``coords``,
        ``presence`` and ``features`` (see the module docstring)."""
        feats = self.features(x - 0.5)
        center = self.center_head(feats)
        offset = self.offset_head(feats)
        if not self.use_offset:
            offset = torch.zeros_like(offset)
        coords, presence = decode_peaks(center, offset, self.out_stride, self.n_max)
        return {"center_logits": center, "offset": offset, "coords": coords, "presence": presence, "features": feats}


def decode_peaks(
    center_logits: torch.Tensor, offset: torch.Tensor, stride: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` strongest local maxima (3x3) of the heatmap.

    Returns coords (B, k, 2) x, y in input pixels (cell centre + offset, pixel-centre origin)
    and their logits (B, k); non-maxima get -inf-like logits (-1e4) so thresholds drop them.
    Coordinates are differentiable through ``offset``.
    """
    b, _, h, w = center_logits.shape
    pooled = F.max_pool2d(center_logits, 3, stride=1, padding=1)
    is_peak = center_logits == pooled
    scores = torch.where(is_peak, center_logits, torch.full_like(center_logits, -1e4))
    k_eff = min(k, h * w)
    top, idx = scores.flatten(1).topk(k_eff, dim=1)
    iy = torch.div(idx, w, rounding_mode="floor")
    ix = idx - iy * w
    off = offset.flatten(2)  # (B, 2, h*w)
    ox = torch.gather(off[:, 0], 1, idx)
    oy = torch.gather(off[:, 1], 1, idx)
    x = (ix.to(ox.dtype) + ox + 0.5) * stride - 0.5
    y = (iy.to(oy.dtype) + oy + 0.5) * stride - 0.5
    coords = torch.stack([x, y], dim=-1)
    if k_eff < k:
        pad = k - k_eff
        coords = torch.cat([coords, coords.new_zeros(b, pad, 2)], 1)
        top = torch.cat([top, top.new_full((b, pad), -1e4)], 1)
    return coords, top


def centernet_targets(
    tips_px: torch.Tensor, valid: torch.Tensor, shape_hw: tuple[int, int], stride: int, sigma_cells: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets at the output grid for padded tips (B, N, 2) and validity (B, N).

    Returns heatmap (B, 1, h, w) in [0, 1] with exact 1 at each tip's cell, the tips' cell
    indices (B, N) (flattened, 0 for padding), offsets (B, N, 2) in cells, and a mask (B, N).
    """
    h, w = shape_hw
    cx = (tips_px[..., 0] + 0.5) / stride - 0.5
    cy = (tips_px[..., 1] + 0.5) / stride - 0.5
    ix = cx.round().clamp(0, w - 1)
    iy = cy.round().clamp(0, h - 1)
    mask = valid.to(torch.bool)
    ys = torch.arange(h, dtype=torch.float32, device=tips_px.device)
    xs = torch.arange(w, dtype=torch.float32, device=tips_px.device)
    gy = torch.exp(-((ys[None, None, :] - iy[..., None]) ** 2) / (2 * sigma_cells**2))
    gx = torch.exp(-((xs[None, None, :] - ix[..., None]) ** 2) / (2 * sigma_cells**2))
    g = gy[..., :, None] * gx[..., None, :]  # (B, N, h, w)
    g = g * mask[..., None, None]
    heat = g.amax(dim=1, keepdim=True) if g.shape[1] else torch.zeros(tips_px.shape[0], 1, h, w)
    index = (iy * w + ix).long() * mask
    offsets = torch.stack([cx - ix, cy - iy], dim=-1)
    return heat, index, offsets, mask


def ignore_mask(
    points_px: torch.Tensor, valid: torch.Tensor, shape_hw: tuple[int, int], stride: int, radius_cells: float
) -> torch.Tensor:
    """(B, 1, h, w) bool: output cells within ``radius_cells`` of any valid point (B, M, 2),
    points in input pixels (pixel-centre origin), cells of ``stride`` pixels."""
    h, w = shape_hw
    cx = (points_px[..., 0] + 0.5) / stride - 0.5
    cy = (points_px[..., 1] + 0.5) / stride - 0.5
    ys = torch.arange(h, dtype=torch.float32, device=points_px.device)
    xs = torch.arange(w, dtype=torch.float32, device=points_px.device)
    dy2 = (ys[None, None, :] - cy[..., None]) ** 2  # (B, M, h)
    dx2 = (xs[None, None, :] - cx[..., None]) ** 2  # (B, M, w)
    near = (dy2[..., :, None] + dx2[..., None, :]) <= radius_cells**2  # (B, M, h, w)
    near = near & valid.to(torch.bool)[..., None, None]
    return near.any(dim=1, keepdim=True) if near.shape[1] else torch.zeros(points_px.shape[0], 1, h, w, dtype=torch.bool)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 4.0,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by the number of tips.

    ``target`` (B, 1, h, w) in [0, 1] with exact 1 at tip cells. ``ignore`` (B, 1, h, w) bool:
    cells that count neither as tip nor as background (around faint tips); a tip cell inside
    still counts as a tip.
    """
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1.0).float()
    neg = 1.0 - pos
    if ignore is not None:
        neg = neg * (~ignore).float()
    logp = F.logsigmoid(logits)
    log1mp = F.logsigmoid(-logits)
    pos_loss = (1 - p) ** alpha * logp * pos
    neg_loss = (1 - target) ** beta * p**alpha * log1mp * neg
    n_pos = pos.sum().clamp(min=1.0)
    return -(pos_loss.sum() + neg_loss.sum()) / n_pos


def centernet_loss(
    outputs: dict[str, torch.Tensor],
    tips_px: torch.Tensor,
    valid: torch.Tensor,
    *,
    stride: int,
    sigma_cells: float = 1.0,
    offset_weight: float = 1.0,
    ignore_px: torch.Tensor | None = None,
    ignore_valid: torch.Tensor | None = None,
    ignore_radius_cells: float = 1.5,
) -> dict[str, torch.Tensor]:
    """Focal heatmap loss + L1 offset loss at the true tips' cells. Returns terms and total.

    ``ignore_px`` (B, M, 2) / ``ignore_valid`` (B, M): faint tips (input pixels); the heatmap
    cells within ``ignore_radius_cells`` of one are left out of the background term."""
    center = outputs["center_logits"]
    h, w = int(center.shape[-2]), int(center.shape[-1])
    heat, index, offsets, mask = centernet_targets(tips_px, valid, (h, w), stride, sigma_cells)
    ignore = None
    if ignore_px is not None and ignore_valid is not None:
        ignore = ignore_mask(ignore_px, ignore_valid, (h, w), stride, ignore_radius_cells)
    hm = focal_loss(center, heat, ignore=ignore)
    off_pred = torch.gather(outputs["offset"].flatten(2), 2, index[:, None, :].expand(-1, 2, -1))
    off_pred = off_pred.permute(0, 2, 1)  # (B, N, 2)
    m = mask[..., None].float()
    off = (torch.abs(off_pred - offsets) * m).sum() / m.sum().clamp(min=1.0)
    total = hm + offset_weight * off
    return {"focal": hm, "offset_l1": off, "total": total}


def build_fast_model(
    *,
    n_max: int = 8,
    widths: tuple[int, int, int, int] = (16, 32, 64, 96),
    out_stride: int = 4,
    extra_blocks: tuple[int, int, int] = (0, 0, 0),
) -> FastTipNet:
    """The ``fast`` configuration's network."""
    w1, w2, w3, w4 = (int(w) for w in widths)
    e4, e8, e16 = (int(n) for n in extra_blocks)
    return FastTipNet(widths=(w1, w2, w3, w4), n_max=n_max, out_stride=out_stride, extra_blocks=(e4, e8, e16))
