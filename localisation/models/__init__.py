"""Models: the paper's ViT heatmap encoder and ResNet coordinate decoder, the Table II
baselines, and the CycleGAN denoiser. Every model's ``forward(x)`` takes x (B, 1, S, S)
float32 in [0, 1] and returns a dict with some of ``heatmap`` (B, 1, S, S) logits, ``coords``
(B, N, 2) x, y in input pixels (pixel-centre origin) and ``presence`` (B, N) logits."""

from localisation.models.baselines import BASELINES, CoordinateRegressor, build_baseline
from localisation.models.paper import PaperModel, build_paper_model
from localisation.models.resnet_coords import ResNetCoords
from localisation.models.vit_heatmap import HeatmapHead, ViTHeatmap

__all__ = [
    "BASELINES",
    "CoordinateRegressor",
    "HeatmapHead",
    "PaperModel",
    "ResNetCoords",
    "ViTHeatmap",
    "build_baseline",
    "build_paper_model",
]
