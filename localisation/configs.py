"""Named, typed localiser configurations and the functions that build their models.

``get_config(name)`` returns a frozen ``LocaliserConfig``; ``build_model(cfg)`` the untrained
network. No argparse here: the CLI (cli_train.py) maps options onto ``with_overrides``.

Configurations:

- ``paper``: the paper, faithfully. CycleGAN denoiser in front (when its generator checkpoint
  is given), ViT-B/16 coarse heatmap learner (12 blocks, d = 768, 12 heads), ResNet-18 finer
  coordinate learner with n_max = 4, input resized to 256x256, Gaussian sigma 10 px, Dice +
  0.15 x Hungarian loss, Adam, batch 32, three stages (encoder 50 epochs at 1e-4, decoder 50 at
  1e-3, both 100 at 1e-4), learning rate halved after 20 epochs without validation improvement,
  flips and scaling 0.9-1.1.
- ``paper-small``: the same family cut down to train on two CPU cores: ViT depth 12 -> 4,
  d 768 -> 192, heads 12 -> 3, heatmap head 256 -> 64 channels; epochs 50/50/100 -> 4/2/6;
  plateau patience 20 -> 2 epochs; 2000 training frames; batch 32 -> 16. ResNet-18,
  input 256, sigma 10, alpha 0.15 and the stage learning rates are unchanged.
- ``fast``: ours (models/fast.py): fully convolutional, frames resampled to 1.5 µm/px (any
  frame size), CenterNet focal + offset loss, 0..n_max tips with a score each.
- ``fast-tiny``: the fast model at a quarter of the width and one short epoch, for tests and
  smoke runs of the tooling (not for use on a rig).
- ``baseline-vgg16|resnet18|resnet50|vit``: the paper's Table II baselines (direct regression
  of n_max x 2 coordinates, Hungarian loss), 200 epochs at 1e-4 as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from localisation.augment import AugmentConfig
from rig.errors import DataError


@dataclass(frozen=True)
class Stage:
    """One training stage. ``trainable``: submodule names to train (others frozen), or
    None for the whole model. Learning rate ``lr`` for Adam."""

    name: str
    epochs: int
    lr: float
    trainable: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LocaliserConfig:
    """Everything that defines a localiser: model, input preparation, loss and training."""

    name: str
    model: str  # "fast" | "paper" | "baseline"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # input preparation (see preprocess.py)
    input_mode: str = "fixed_scale"  # "fixed_scale" | "resize"
    input_size: int = 256  # resize: the model input side; fixed_scale: the training crop side
    model_um_per_px: float | None = None  # fixed_scale only
    n_max: int = 8
    # loss
    loss: str = "centernet"  # "centernet" | "paper"
    sigma_px: float = 10.0  # paper heatmap Gaussian (model pixels)
    sigma_cells: float = 1.0  # centernet heatmap Gaussian (output cells)
    alpha: float = 0.15
    # training
    stages: tuple[Stage, ...] = (Stage("all", 1, 1e-3),)
    batch_size: int = 32
    weight_decay: float = 0.0
    plateau_patience_epochs: int = 20
    plateau_factor: float = 0.5
    augment: AugmentConfig = AugmentConfig()
    train_examples: int = 4000
    val_examples: int = 200
    train_seed: int = 10_000_000
    val_seed: int = 20_000_000
    domain: str = "in_vivo"
    # inference
    score_threshold: float = 0.5
    threads: int = 2
    denoiser: str | None = None  # a denoiser file (CycleGAN generator or PhotonDenoiser), or None

    def with_overrides(self, **changes: Any) -> LocaliserConfig:
        """A copy with some fields changed (unknown names -> ValueError)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LocaliserConfig:
        d = dict(d)
        d["stages"] = tuple(
            Stage(s["name"], s["epochs"], s["lr"], None if s["trainable"] is None else tuple(s["trainable"]))
            for s in d["stages"]
        )
        aug = dict(d["augment"])
        aug["scale_range"] = tuple(aug["scale_range"])
        d["augment"] = AugmentConfig(**aug)
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.check_inference_values()
        return cfg

    def check_inference_values(self) -> None:
        """ValueError for a value inference could not use (as a hand-edited or damaged
        checkpoint might hold): the threshold in 0-1, a positive finite scale and input size,
        at least one thread and one tip."""
        if not (isinstance(self.score_threshold, int | float) and 0.0 <= self.score_threshold <= 1.0):
            raise ValueError(f"score_threshold must be in 0-1, got {self.score_threshold!r}")
        scale = self.model_um_per_px
        if scale is not None and not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"model_um_per_px must be positive and finite, got {scale!r}")
        for name in ("threads", "n_max", "input_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


PAPER_STAGES = (
    Stage("encoder", 50, 1e-4, ("encoder",)),
    Stage("decoder", 50, 1e-3, ("decoder",)),
    Stage("joint", 100, 1e-4, None),
)

_PAPER = LocaliserConfig(
    name="paper",
    model="paper",
    model_kwargs={"vit_depth": 12, "vit_dim": 768, "vit_heads": 12},
    input_mode="resize",
    input_size=256,
    n_max=4,
    loss="paper",
    sigma_px=10.0,
    alpha=0.15,
    stages=PAPER_STAGES,
    batch_size=32,
    plateau_patience_epochs=20,
    augment=AugmentConfig(flip=True, rot90=False, scale_range=(0.9, 1.1), photometric=False),
    score_threshold=0.5,
)

_PAPER_SMALL = _PAPER.with_overrides(
    name="paper-small",
    model_kwargs={"vit_depth": 4, "vit_dim": 192, "vit_heads": 3, "head_channels": 64},
    stages=(
        Stage("encoder", 4, 1e-4, ("encoder",)),
        Stage("decoder", 2, 1e-3, ("decoder",)),
        Stage("joint", 6, 1e-4, None),
    ),
    batch_size=16,
    plateau_patience_epochs=2,
    train_examples=2000,
)

_FAST = LocaliserConfig(
    name="fast",
    model="fast",
    model_kwargs={"widths": (16, 32, 64, 96), "out_stride": 4, "extra_blocks": (0, 2, 3)},
    input_mode="fixed_scale",
    input_size=192,
    model_um_per_px=1.5,
    n_max=8,
    loss="centernet",
    sigma_cells=1.0,
    stages=(Stage("all", 24, 2e-3, None),),
    batch_size=16,
    weight_decay=1e-5,
    plateau_patience_epochs=3,
    augment=AugmentConfig(flip=True, rot90=True, scale_range=(0.9, 1.1), photometric=True),
    train_examples=4000,
    val_examples=200,
    score_threshold=0.5,
    threads=2,
)

_FAST_TINY = _FAST.with_overrides(
    name="fast-tiny",
    model_kwargs={"widths": (4, 8, 16, 24), "out_stride": 4},
    input_size=96,
    stages=(Stage("all", 1, 2e-3, None),),
    batch_size=4,
    train_examples=8,
    val_examples=4,
)


def _baseline(name: str) -> LocaliserConfig:
    return _PAPER.with_overrides(
        name=f"baseline-{name}",
        model="baseline",
        model_kwargs={"name": name},
        loss="paper",
        stages=(Stage("all", 200, 1e-4, None),),
    )


CONFIGS: dict[str, LocaliserConfig] = {
    c.name: c
    for c in (
        _PAPER,
        _PAPER_SMALL,
        _FAST,
        _FAST_TINY,
        *(_baseline(n) for n in ("vgg16", "resnet18", "resnet50", "vit")),
    )
}


def get_config(name: str) -> LocaliserConfig:
    """The named configuration (DataError listing the known names otherwise)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise DataError(f"unknown localiser config {name!r}; known: {', '.join(CONFIGS)}") from None


def build_model(cfg: LocaliserConfig, *, pretrained: dict[str, str] | None = None) -> nn.Module:
    """The untrained network of ``cfg``. ``pretrained`` may name LOCAL torchvision weight files
    (keys ``vit``, ``resnet`` for ``paper``; ``backbone`` for baselines); nothing is
    downloaded."""
    pretrained = pretrained or {}
    kw = dict(cfg.model_kwargs)
    if cfg.model == "fast":
        from localisation.models.fast import build_fast_model

        return build_fast_model(
            n_max=cfg.n_max,
            widths=tuple(kw["widths"]),
            out_stride=int(kw["out_stride"]),
            extra_blocks=tuple(kw.get("extra_blocks", (0, 0, 0))),
        )
    if cfg.model == "paper":
        from localisation.models.paper import build_paper_model

        return build_paper_model(
            n_max=cfg.n_max,
            image_size=cfg.input_size,
            pretrained_vit=pretrained.get("vit"),
            pretrained_resnet=pretrained.get("resnet"),
            **kw,
        )
    if cfg.model == "baseline":
        from localisation.models.baselines import build_baseline

        name = kw.pop("name")
        return build_baseline(
            name, n_max=cfg.n_max, image_size=cfg.input_size, pretrained=pretrained.get("backbone"), **kw
        )
    raise DataError(f"config {cfg.name!r}: unknown model kind {cfg.model!r}")


def model_stride(model: nn.Module) -> int:
    """Multiple the input side must be of (fully convolutional models), 1 otherwise."""
    return int(getattr(model, "input_multiple", 1))
