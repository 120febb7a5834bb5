"""``PhotonDenoiser``: a small supervised denoiser in front of the first stage (stop 18).

Why: the shipped first stage finds 77.4 % of the test set's tips when it is given the mean of 8
frames of each scene instead of one frame (the verifier still reading the single frame), against
66.6 % on the single frame. The simulator renders exact pairs of one frame and the mean of K
frames of the same still scene (``patchrig data synth --frames-averaged K``, same seed), so a
network can be trained to map the first to the second.

Frames and units: input and output are on the first stage's model grid (``model_um_per_px``),
one channel, intensities in the units of the single frame's robust normalisation
(``preprocess.normalise``: 0.5th percentile -> 0, 99.8th -> 1). The network predicts a
residual correction; ``denoise`` then re-normalises the result with the same robust percentiles,
because that is how an averaged frame reaches the first stage (its own percentiles).

Architecture: space-to-depth by ``factor`` (``factor`` x ``factor`` pixels become channels),
``depth`` 3x3 convolutions with ReLU at ``channels`` channels on that coarser grid, depth-to-
space back, added to the input. Working on the coarser grid keeps it within the CPU budget:
3.1 ms on a 352x352 model image on two cores with channels-last weights, 9.5 ms without
(factor 2, 16 channels, depth 4; measured at stop 18). Deterministic; no normalisation layers,
so any batch size gives the same answer.

Result (docs/localiser-experiments.md, stop 18): it did not help the cascade, in front of the
first stage or beside the frame; it is kept as the tool that measured that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DenoiserSpec:
    """The shape of a ``PhotonDenoiser`` (stored beside its weights)."""

    channels: int = 16
    depth: int = 4
    factor: int = 2

    def __post_init__(self) -> None:
        if self.channels < 1 or self.depth < 2 or self.factor < 1:
            raise ValueError(f"denoiser needs channels >= 1, depth >= 2, factor >= 1; got {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhotonDenoiser(nn.Module):
    """Residual single-frame denoiser on the model grid (see the module docstring)."""

    def __init__(self, spec: DenoiserSpec = DenoiserSpec()) -> None:
        super().__init__()
        self.spec = spec
        f2 = spec.factor * spec.factor
        layers: list[nn.Module] = [nn.Conv2d(f2, spec.channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(spec.depth - 2):
            layers += [nn.Conv2d(spec.channels, spec.channels, 3, padding=1), nn.ReLU(inplace=True)]
        last = nn.Conv2d(spec.channels, f2, 3, padding=1)
        nn.init.zeros_(last.weight)  # starts as the identity
        assert last.bias is not None
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) normalised single frame -> (B, 1, H, W) estimate of the averaged frame in
        the same units (not clipped). H and W need not be multiples of ``factor``: the input is
        padded by edge replication and the result cropped back."""
        f = self.spec.factor
        h, w = x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        y = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        y = F.pixel_unshuffle(y, f) if f > 1 else y
        y = self.body(y)
        y = F.pixel_shuffle(y, f) if f > 1 else y
        return x + y[..., :h, :w]

    @torch.no_grad()
    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """What the first stage reads: ``forward`` re-normalised per image to [0, 1] with the
        robust percentiles of ``preprocess.normalise`` (0.5 -> 0, 99.8 -> 1; a flat result -> 0)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W), got {tuple(x.shape)}")
        return renormalise(self.forward(x))


def renormalise(y: torch.Tensor) -> torch.Tensor:
    """Each image of (B, 1, H, W) mapped to [0, 1] by its 0.5th and 99.8th percentiles, from the
    same strided subsample as ``preprocess.normalise`` (so one image gives the same numbers)."""
    h, w = y.shape[-2:]
    step = max(1, int((h * w / 16384) ** 0.5))
    out = torch.empty_like(y)
    for i in range(y.shape[0]):
        sample = y[i, 0, ::step, ::step].reshape(-1).float()
        lo, hi = torch.quantile(sample, torch.tensor([0.005, 0.998], dtype=sample.dtype, device=sample.device))
        if not hi > lo:
            out[i] = 0
        else:
            out[i] = ((y[i] - lo) / (hi - lo)).clamp_(0.0, 1.0)
    return out
