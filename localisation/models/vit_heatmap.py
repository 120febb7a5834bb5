"""The paper's coarse heatmap learner: a ViT encoder and the heatmap head (Sec. III-B.1).

Input (B, 1, S, S) in [0, 1] -> 16x16 patches -> learnable position embedding -> N_c ViT
blocks (torchvision's ``VisionTransformer``, classification head replaced by identity) ->
token map (B, d, S/16, S/16) -> heatmap head: 3x3 conv to 256, ReLU, bilinear x16, 1x1 conv
-> heatmap logits (B, 1, S, S).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from localisation.pretrained import load_backbone, vit_position_transform


class HeatmapHead(nn.Module):
    """3x3 conv (d -> 256), ReLU, bilinear upsampling x16, 1x1 conv (256 -> 1).

    The 1x1 convolution and bilinear upsampling are both linear and act on different axes
    (channels vs space, and bilinear weights sum to one, so the bias passes through too):
    they commute. ``forward`` therefore applies the 1x1 conv *before* the upsampling, which
    gives the same heatmap as the paper's order (``forward_paper_order``, checked in tests)
    with 256x fewer operations at full resolution.

    Initialisation (not in the paper, which starts from ImageNet weights): the output bias
    starts at logit(``prior``) = logit(0.01), so that the untrained heatmap is sparse like its
    target instead of 0.5 everywhere. In our short CPU runs this made no measurable difference
    (docs/readme/localiser-paper.md). ``prior=None`` gives PyTorch's default initialisation.
    """

    def __init__(self, in_dim: int, hidden: int = 256, scale: int = 16, prior: float | None = 0.01) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(in_dim, hidden, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
        self.conv1x1 = nn.Conv2d(hidden, 1, kernel_size=1)
        if prior is not None and self.conv1x1.bias is not None:  # sparse start, see the class doc
            nn.init.constant_(self.conv1x1.bias, math.log(prior / (1 - prior)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) token map -> (B, 1, 16h, 16w) heatmap logits."""
        return self.upsample(self.conv1x1(self.relu(self.conv3x3(features))))

    def forward_paper_order(self, features: torch.Tensor) -> torch.Tensor:
        """The literal order of the paper (upsample 256 channels, then 1x1 conv)."""
        return self.conv1x1(self.upsample(self.relu(self.conv3x3(features))))


class ViTHeatmap(nn.Module):
    """ViT encoder + heatmap head. ``forward``: (B, 1, S, S) -> (B, 1, S, S) logits."""

    def __init__(
        self,
        *,
        image_size: int = 256,
        patch_size: int = 16,
        depth: int = 12,
        dim: int = 768,
        heads: int = 12,
        mlp_dim: int | None = None,
        head_channels: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.vit = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=depth,
            num_heads=heads,
            hidden_dim=dim,
            mlp_dim=mlp_dim or 4 * dim,
            dropout=dropout,
        )
        self.vit.conv_proj = one_channel_patch_embedding(dim, patch_size)
        self.vit.heads = nn.Identity()  # the classification head is replaced by identity
        self.head = HeatmapHead(dim, head_channels, patch_size)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> token map (B, d, S/16, S/16) after the last block and LayerNorm."""
        check_input(x, self.image_size)
        vit = self.vit
        seq = vit._process_input(x)  # (B, L, d), L = (S/16)^2
        cls = vit.class_token.expand(seq.shape[0], -1, -1)
        seq = vit.encoder(torch.cat([cls, seq], dim=1))[:, 1:]  # drop the class token
        side = self.image_size // self.patch_size
        return seq.transpose(1, 2).reshape(x.shape[0], -1, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> heatmap logits (B, 1, S, S)."""
        return self.head(self.tokens(x))

    def load_pretrained(self, path: str | Path) -> None:
        """Load a torchvision ViT state dict (e.g. vit_b_16) from a local file."""
        load_backbone(
            self.vit,
            path,
            first_conv="conv_proj.weight",
            drop_prefixes=("heads",),
            transform=vit_position_transform(self.image_size, self.patch_size),
        )


def one_channel_patch_embedding(dim: int, patch_size: int) -> nn.Conv2d:
    """The 16x16/16 patch embedding for one-channel input, initialised as torchvision does."""
    conv = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)
    fan_in = patch_size * patch_size
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def check_input(x: torch.Tensor, image_size: int) -> None:
    """Raise ValueError unless ``x`` is (B, 1, image_size, image_size)."""
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(
            f"expected input (B, 1, {image_size}, {image_size}), got {tuple(x.shape)}"
        )
