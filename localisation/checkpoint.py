"""Localiser checkpoints: weights plus the configuration that built them, versioned.

A checkpoint is a ``torch.save`` dict of plain types and tensors (loaded with
``weights_only=True``: no pickle of arbitrary objects):

    {"format": "patchrig-localiser", "format_version": 1, "config_name": "fast",
     "config": {...LocaliserConfig.to_dict()...}, "model_state": {...},
     "trainer_state": {...} (training checkpoints only), "metrics": {...},
     "verifier": {"config": {...}, "model_state": {...}} (a second stage, optional)}

Loading checks the format, the version, and (when the caller expects one) the configuration
name, so a checkpoint of another configuration is refused with a clear DataError rather than
failing deep inside ``load_state_dict``. Files are written atomically.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localisation.configs import LocaliserConfig, build_model
from rig.atomic import atomic_open
from rig.errors import DataError
from rig.logs import get_logger

log = get_logger(__name__, channel="train")

FORMAT = "patchrig-localiser"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "fast.pt"


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: LocaliserConfig,
    *,
    trainer_state: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    half: bool = False,
    verifier: dict[str, Any] | None = None,
) -> None:
    """Write atomically. ``half`` stores floating weights as float16 (shipped checkpoints).
    ``verifier``: a second stage (``verifier.verifier_payload``) stored beside the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
        for k, v in unwrap(model).state_dict().items()
    }
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_name": cfg.name,
        "config": _jsonable(cfg.to_dict()),
        "model_state": state,
        "metrics": _jsonable(metrics or {}),
    }
    if trainer_state is not None:
        payload["trainer_state"] = trainer_state
    if verifier is not None:
        payload["verifier"] = verifier
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)


def read_checkpoint(path: str | Path, *, expect_config: str | None = None) -> dict[str, Any]:
    """The checkpoint dict, validated. DataError: missing/unreadable file, not a localiser
    checkpoint, unsupported version, or a configuration other than ``expect_config``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        # one line, and not torch's multi-line text, which advises loading with
        # weights_only=False: patchrig never unpickles arbitrary objects from a file
        raise DataError(f"checkpoint {path}: unreadable: not a patchrig checkpoint, or damaged "
                        f"({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"checkpoint {path}: not a patchrig localiser checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"checkpoint {path}: format version {payload.get('format_version')!r}, "
            f"this patchrig reads version {FORMAT_VERSION}"
        )
    if expect_config is not None and payload.get("config_name") != expect_config:
        raise DataError(
            f"checkpoint {path} was trained with config {payload.get('config_name')!r}, "
            f"not {expect_config!r}"
        )
    return payload


def load_model(
    path: str | Path, *, expect_config: str | None = None
) -> tuple[nn.Module, LocaliserConfig, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own configuration and load its weights
    (float32). Returns (model in eval mode, config, checkpoint dict)."""
    payload = read_checkpoint(path, expect_config=expect_config)
    try:
        cfg = LocaliserConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"checkpoint {path}: malformed configuration ({exc})") from exc
    model = build_model(cfg)
    load_weights(model, payload, path)
    model.eval()
    return model, cfg, payload


#: Stored values smaller than this (in magnitude) are loaded as exactly 0. Weight decay leaves
#: unused weights decaying towards 0, down to float32's subnormal range (< 1.2e-38). A product
#: of such a weight and an activation is subnormal too, and x86 CPUs compute subnormals in slow
#: microcode: on the 2-core Xeon (Sapphire Rapids) of this project the shipped ``fast.pt``
#: took 128 ms per forward pass instead of 19 ms. A term below 1e-30 is far below float32's
#: rounding of any output the network computes, so the outputs are unchanged (tested).
TINY_WEIGHT = 1e-30


@torch.no_grad()
def zero_tiny_(tensors: Iterable[torch.Tensor]) -> None:
    """Set the values with ``|v| < TINY_WEIGHT`` of floating tensors to exactly 0, in place
    (used on loading and by the trainer)."""
    for t in tensors:
        if t.is_floating_point():
            t.masked_fill_(t.abs() < TINY_WEIGHT, 0.0)


def flush_tiny(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 copies of a state dict's floating tensors with tiny values set to 0
    (``zero_tiny_``; other tensors unchanged)."""
    out = {k: v.float().clone() if v.is_floating_point() else v for k, v in state.items()}
    zero_tiny_(out.values())
    return out


def load_weights(model: nn.Module, payload: dict[str, Any], path: str | Path, *, grow: bool = False) -> None:
    """Load the checkpoint's weights into ``model`` (float32, tiny values flushed to 0: see
    ``TINY_WEIGHT``; DataError when they do not fit).

    ``grow``: the model may have MORE tensors than the checkpoint (blocks added to a trained
    network, e.g. the fast model's identity-initialised ``extra_blocks``); those keep their
    initialisation. Every tensor of the checkpoint must still fit by name and shape.
    """
    raw = payload.get("model_state")
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise DataError(f"checkpoint {path}: no model weights (model_state is missing or not a set of tensors)")
    bad = [k for k, v in raw.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DataError(f"checkpoint {path}: weights are not finite (NaN or inf in {bad[:3]})")
    state = flush_tiny(raw)
    target = unwrap(model)
    try:
        missing, unexpected = target.load_state_dict(state, strict=not grow)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
        raise DataError(f"checkpoint {path}: weights do not fit this model ({first})") from exc
    if unexpected:
        raise DataError(f"checkpoint {path}: weights do not fit this model (unexpected {unexpected[:3]})")
    if missing:
        log.info("grew model", checkpoint=str(path), new_tensors=len(missing))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
