"""The paper's Table II baselines: torchvision backbones regressing n_max x 2 coordinates.

``build_baseline(name, n_max=...)`` for name in ``BASELINES`` ("vgg16", "resnet18",
"resnet50", "vit"). Each takes x (B, 1, S, S) in [0, 1] (one-channel first layer) and returns
``{"coords": (B, n_max, 2) px (sigmoid x S, pixel-centre origin), "presence": (B, n_max)
logits}`` straight from the image: no heatmap. The presence head is beyond the paper (it
lets these baselines report a variable number of tips, like our models).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.vgg import cfgs, make_layers
from torchvision.models.vision_transformer import VisionTransformer

from localisation.models.resnet_coords import one_channel_stem, sigmoid_to_pixels
from localisation.models.vit_heatmap import check_input, one_channel_patch_embedding
from localisation.pretrained import load_backbone, vit_position_transform

BASELINES = ("vgg16", "resnet18", "resnet50", "vit")


class CoordinateRegressor(nn.Module):
    """A backbone producing a feature vector, a coordinate head and a presence head."""

    def __init__(
        self,
        backbone: nn.Module,
        features: int,
        *,
        n_max: int,
        image_size: int,
        first_conv: str,
        drop_prefixes: tuple[str, ...],
        vit_patch: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.coord_head = nn.Linear(features, n_max * 2)
        self.presence_head = nn.Linear(features, n_max)
        self.n_max = n_max
        self.image_size = image_size
        self._first_conv = first_conv
        self._drop = drop_prefixes
        self._vit_patch = vit_patch

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, S, S) -> {"coords": (B, N, 2) px, "presence": (B, N) logits}."""
        check_input(x, self.image_size)
        features = self.backbone(x)
        return {
            "coords": sigmoid_to_pixels(self.coord_head(features), self.image_size),
            "presence": self.presence_head(features),
        }

    def load_pretrained(self, path: str | Path) -> None:
        """Load the matching torchvision state dict from a local file (head dropped)."""
        transform = (
            vit_position_transform(self.image_size, self._vit_patch)
            if self._vit_patch is not None
            else None
        )
        load_backbone(
            self.backbone,
            path,
            first_conv=self._first_conv,
            drop_prefixes=self._drop,
            transform=transform,
        )


class VGGBackbone(nn.Module):
    """torchvision's VGG without its last Linear (same state-dict keys: ``features.*``,
    ``classifier.0``, ``classifier.3``), built directly so that a narrow VGG never allocates
    the full-size classifier. (B, 1, S, S) -> (B, hidden)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        cfg = [v if v == "M" else max(8, round(int(v) * width)) for v in cfgs["D"]]
        self.features = make_layers(cfg, batch_norm=False)
        self.features[0] = nn.Conv2d(1, int(cfg[0]), kernel_size=3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.hidden = max(64, round(4096 * width))
        self.classifier = nn.Sequential(
            nn.Linear(int(cfg[-2]) * 7 * 7, self.hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(True),
            nn.Dropout(),
        )
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_baseline(
    name: str,
    *,
    n_max: int,
    image_size: int = 256,
    pretrained: str | Path | None = None,
    width: float = 1.0,
    vit_depth: int = 12,
    vit_dim: int = 768,
    vit_heads: int = 12,
) -> CoordinateRegressor:
    """Build a Table II baseline.

    ``pretrained`` names a LOCAL torchvision state dict of the same architecture (vgg16,
    resnet18, resnet50, vit_b_16); nothing is downloaded. ``width`` scales VGG16's channels
    (1.0 = the paper's; smaller for CPU studies); ``vit_*`` size the ViT baseline (12/768/12 =
    ViT-B/16).
    """
    if name == "vgg16":
        vgg = VGGBackbone(width)
        model = CoordinateRegressor(
            vgg, vgg.hidden, n_max=n_max, image_size=image_size,
            first_conv="features.0.weight", drop_prefixes=("classifier.6",),
        )
    elif name in ("resnet18", "resnet50"):
        backbone = resnet18(weights=None) if name == "resnet18" else resnet50(weights=None)
        features = backbone.fc.in_features
        backbone.conv1 = one_channel_stem()
        backbone.fc = nn.Identity()
        model = CoordinateRegressor(
            backbone, features, n_max=n_max, image_size=image_size,
            first_conv="conv1.weight", drop_prefixes=("fc",),
        )
    elif name == "vit":
        vit = VisionTransformer(
            image_size=image_size, patch_size=16, num_layers=vit_depth, num_heads=vit_heads,
            hidden_dim=vit_dim, mlp_dim=4 * vit_dim,
        )
        vit.conv_proj = one_channel_patch_embedding(vit_dim, 16)
        vit.heads = nn.Identity()
        model = CoordinateRegressor(
            vit, vit_dim, n_max=n_max, image_size=image_size,
            first_conv="conv_proj.weight", drop_prefixes=("heads",), vit_patch=16,
        )
    else:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if pretrained is not None:
        model.load_pretrained(pretrained)
    return model
