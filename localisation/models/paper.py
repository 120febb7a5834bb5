"""The paper's coarse-to-fine localiser (Fig. 2): ViT heatmap encoder -> ResNet-18 decoder.

``forward(x)``: x (B, 1, S, S) in [0, 1] (the denoised frame, resized to S = 256) ->
``{"heatmap": (B, 1, S, S) logits, "coords": (B, n_max, 2) px[, "presence": (B, n_max)]}``.
The decoder reads ``sigmoid(heatmap)``. The CycleGAN denoiser runs before this module (see
``localisation.models.cyclegan.Denoiser``); post-processing is separate.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from localisation.models.resnet_coords import ResNetCoords
from localisation.models.vit_heatmap import ViTHeatmap


class PaperModel(nn.Module):
    """``.encoder`` (coarse heatmap learner) and ``.decoder`` (finer coordinate learner)."""

    def __init__(self, encoder: ViTHeatmap, decoder: ResNetCoords) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.image_size = encoder.image_size
        self.n_max = decoder.n_max

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, S, S) -> heatmap logits, coordinates (and presence logits if enabled)."""
        heatmap = self.encoder(x)
        out = self.decoder(torch.sigmoid(heatmap))
        out["heatmap"] = heatmap
        return out


def build_paper_model(
    *,
    n_max: int = 4,
    vit_depth: int = 12,
    vit_dim: int = 768,
    vit_heads: int = 12,
    image_size: int = 256,
    pretrained_vit: str | Path | None = None,
    pretrained_resnet: str | Path | None = None,
    presence: bool = False,
    head_channels: int = 256,
) -> PaperModel:
    """Build the paper's model (defaults: ViT-B/16, 12 blocks, d = 768, n_max = 4).

    ``pretrained_vit``/``pretrained_resnet`` name LOCAL torchvision state-dict files
    (vit_b_16 / resnet18); nothing is downloaded. ``presence`` adds the beyond-the-paper
    presence head to the decoder.
    """
    encoder = ViTHeatmap(
        image_size=image_size,
        depth=vit_depth,
        dim=vit_dim,
        heads=vit_heads,
        head_channels=head_channels,
    )
    decoder = ResNetCoords(n_max=n_max, image_size=image_size, presence=presence)
    if pretrained_vit is not None:
        encoder.load_pretrained(pretrained_vit)
    if pretrained_resnet is not None:
        decoder.load_pretrained(pretrained_resnet)
    return PaperModel(encoder, decoder)
