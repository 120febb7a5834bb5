"""Load pretrained torchvision backbone weights from a LOCAL state-dict file; never download.

Every model in ``localisation.models`` is built with ``weights=None``. When the user names a
torchvision weights file (e.g. ``resnet18-f37072fd.pth`` or ``vit_b_16-c867db91.pth``, as
``torch.hub`` caches them), these helpers copy it into the model:

- the first convolution of an RGB network becomes one-channel by averaging its RGB kernels
  (the images are greyscale two-photon frames or heatmaps);
- a ViT's position embedding is interpolated to the model's image size (e.g. 14x14 -> 16x16
  patches for 256x256 inputs);
- the classification head is dropped (our heads are new and stay randomly initialised);
- every other tensor must exist in the file with the right shape, or a ``DataError`` names the
  file and the offending keys; nothing is loaded then.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from rig.errors import DataError


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """Read a state dict (``.pth``/``.pt``) from ``path`` with ``weights_only=True``.

    Accepts a bare state dict or one wrapped under ``state_dict``/``model``. A missing,
    unreadable or non-tensor file raises ``DataError`` naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pretrained weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise DataError(f"cannot read pretrained weights {p}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise DataError(f"pretrained weights {p} is not a state dict of tensors")
    return OrderedDict(obj)


def to_one_channel(weight: torch.Tensor) -> torch.Tensor:
    """(out, C, kh, kw) first-conv kernel -> (out, 1, kh, kw) by averaging over C."""
    return weight.mean(dim=1, keepdim=True) if weight.shape[1] != 1 else weight


def load_backbone(
    module: nn.Module,
    path: str | Path,
    *,
    first_conv: str,
    drop_prefixes: Iterable[str] = (),
    transform: Callable[[OrderedDict[str, torch.Tensor]], OrderedDict[str, torch.Tensor]]
    | None = None,
) -> None:
    """Copy the tensors of the torchvision state dict at ``path`` into ``module``.

    ``first_conv`` is the key of the first convolution's weight (made one-channel);
    keys starting with any of ``drop_prefixes`` are ignored on both sides (classification
    heads); ``transform`` may rewrite the state first (ViT position embeddings). All remaining
    keys of ``module`` must be present with identical shapes, else ``DataError`` and nothing
    is changed.
    """
    drop = tuple(drop_prefixes)
    state = read_state_dict(path)
    if first_conv not in state:
        raise DataError(f"pretrained weights {path} have no {first_conv!r}: not this architecture")
    state[first_conv] = to_one_channel(state[first_conv])
    if transform is not None:
        try:
            state = transform(state)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise DataError(f"pretrained weights {path} do not fit this model: {exc}") from exc
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(drop)}
    theirs = {k: v for k, v in state.items() if not k.startswith(drop)}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    mismatched = [
        f"{k} {tuple(theirs[k].shape)} != {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(theirs))
        if theirs[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"wrong shapes: {'; '.join(mismatched[:3])}")
    if problems:
        raise DataError(
            f"pretrained weights {path} do not match {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(theirs, strict=False)


def vit_position_transform(
    image_size: int, patch_size: int
) -> Callable[[OrderedDict[str, torch.Tensor]], OrderedDict[str, torch.Tensor]]:
    """Return a state transform interpolating ``encoder.pos_embedding`` to ``image_size``."""

    def transform(state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        if "encoder.pos_embedding" not in state:
            raise KeyError("encoder.pos_embedding")
        return interpolate_embeddings(image_size, patch_size, state)

    return transform
