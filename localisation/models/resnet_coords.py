"""The paper's finer coordinate learner: ResNet-18 on the heatmap (Sec. III-B.2).

Heatmap (B, 1, S, S) -> ResNet-18 with a one-channel first convolution -> 512 features ->
fully connected layer to n_max x 2 -> sigmoid x S -> coordinates (B, n_max, 2), x then y, in
input pixels with the origin at the centre of the top-left pixel. Beyond the paper, an
optional presence head gives n_max logits (is output slot i a real tip?).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18

from localisation.pretrained import load_backbone


def sigmoid_to_pixels(raw: torch.Tensor, image_size: int) -> torch.Tensor:
    """Raw regression outputs (B, 2N) -> coordinates (B, N, 2) in input pixels.

    The paper's ``sigmoid(raw) * 256``, shifted by half a pixel so that the range (-0.5,
    S - 0.5) covers the whole image in the pixel-centre convention of DESIGN.md.
    """
    return (torch.sigmoid(raw) * image_size - 0.5).reshape(raw.shape[0], -1, 2)


def one_channel_stem(out_channels: int = 64) -> nn.Conv2d:
    """ResNet's 7x7/2 first convolution, taking one channel, Kaiming-initialised."""
    conv = nn.Conv2d(1, out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class ResNetCoords(nn.Module):
    """``forward``: heatmap (B, 1, S, S) -> {"coords": (B, N, 2)[, "presence": (B, N)]}."""

    def __init__(self, *, n_max: int = 4, image_size: int = 256, presence: bool = False) -> None:
        super().__init__()
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {n_max}")
        self.n_max = n_max
        self.image_size = image_size
        self.backbone = resnet18(weights=None)
        self.backbone.conv1 = one_channel_stem()
        self.backbone.fc = nn.Identity()
        self.fc = nn.Linear(512, n_max * 2)  # replaces the classification head
        self.presence_head = nn.Linear(512, n_max) if presence else None

    def forward(self, heatmap: torch.Tensor) -> dict[str, torch.Tensor]:
        """Heatmap (B, 1, S, S) (probabilities or an image) -> coordinates in input pixels."""
        features = self.backbone(heatmap)  # (B, 512)
        out = {"coords": sigmoid_to_pixels(self.fc(features), self.image_size)}
        if self.presence_head is not None:
            out["presence"] = self.presence_head(features)
        return out

    def load_pretrained(self, path: str | Path) -> None:
        """Load a torchvision ResNet-18 state dict from a local file (fc dropped)."""
        load_backbone(self.backbone, path, first_conv="conv1.weight", drop_prefixes=("fc",))
