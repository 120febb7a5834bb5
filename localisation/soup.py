"""A weight soup: the element-wise mean of several first stages fine-tuned from one start.

    python -m localisation.soup --out runs/soup runs/fast-v5s/best.pt runs/fast-v6/best.pt ...

Networks fine-tuned from the same weights (other seeds, data or learning rates) stay in one
basin of the loss, and the mean of their weights is usually better than any one of them
("model soups", Wortsman et al. 2022): it costs nothing at inference, since the soup is one
network of the same size and speed. Averaging networks trained from DIFFERENT starts gives
garbage; this module cannot check where a network started, so that is the caller's promise
(every ingredient named in the soup's record).

What is checked: every ingredient is a localiser checkpoint of the same configuration name,
with the same model and input preparation (model, model_kwargs, input mode and size, µm per
model pixel, n_max, denoiser), and none carries a
second stage (soup first stages; ``localisation.ship --verifier-from`` adds a verifier).
Those fields decide the network's tensors (``configs.build_model``), so the ingredients'
weights line up one to one; a checkpoint whose weights do not fit its own configuration is
refused when it loads. Anything else is a ``DataError`` before anything is written.

Floating tensors (weights and BatchNorm running statistics) are averaged in float64 and
stored as float32; integer buffers (BatchNorm's step counter) take the first ingredient's
value. The output is a run directory that ``localisation.ship --run`` reads: ``best.pt``
(written atomically, its ``metrics.soup`` naming the ingredients and their SHA-256),
``metrics.jsonl`` (empty: a soup has no epochs) and ``soup.json`` (the same record).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localisation.checkpoint import load_model, save_checkpoint
from localisation.configs import LocaliserConfig
from rig.atomic import write_json_atomic
from rig.errors import DataError

#: Configuration fields that must agree for two networks' weights to be averaged and run alike.
MODEL_FIELDS = ("model", "model_kwargs", "input_mode", "input_size", "model_um_per_px", "n_max", "denoiser")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_compatible(p0: Path, cfg0: LocaliserConfig, p1: Path, cfg1: LocaliserConfig) -> None:
    if cfg1.name != cfg0.name:
        raise DataError(f"soup: {p1} is configuration {cfg1.name!r}, {p0} is {cfg0.name!r}")
    for name in MODEL_FIELDS:
        a, b = getattr(cfg0, name), getattr(cfg1, name)
        if a != b:
            raise DataError(f"soup: {p1} has {name} = {b!r}, {p0} has {a!r}")


def average_first_stages(checkpoints: Sequence[Path]) -> tuple[nn.Module, LocaliserConfig, dict[str, Any]]:
    """The soup of ``checkpoints``: (model in eval mode, the first ingredient's configuration,
    the record naming every ingredient). DataError for no ingredient, an unreadable or
    incompatible one, or one with a verifier (see the module docstring)."""
    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise DataError("soup: name at least one checkpoint")
    loaded = []
    for path in paths:
        model, cfg, payload = load_model(path)
        if "verifier" in payload:
            raise DataError(f"soup: {path} is a cascade with a verifier; soup first stages only "
                            "(training runs' best.pt or last.pt)")
        loaded.append((path, cfg, model))
    for path, cfg, _ in loaded[1:]:
        _check_compatible(paths[0], loaded[0][1], path, cfg)
    _, cfg, model = loaded[0]  # holds the mean (computed into new tensors before it is loaded)
    states = [m.state_dict() for _, _, m in loaded]
    mean: dict[str, torch.Tensor] = {}
    for key, t0 in states[0].items():
        if t0.is_floating_point():
            total = torch.zeros(t0.shape, dtype=torch.float64)
            for state in states:
                total += state[key].double()
            mean[key] = (total / len(states)).to(t0.dtype)
        else:
            mean[key] = t0.clone()
    model.load_state_dict(mean)
    model.eval()
    record = {"ingredients": [{"path": str(p), "sha256": _sha256(p)} for p in paths]}
    return model, cfg, record


def write_soup(out_dir: Path, checkpoints: Sequence[Path]) -> Path:
    """Average ``checkpoints`` and write the run directory ``out_dir`` (see the module
    docstring); returns the path of ``best.pt``. A non-empty ``out_dir`` (a training run, say)
    is refused, as is a path through a file; nothing is written when averaging fails."""
    _check_out_dir(out_dir)
    model, cfg, record = average_first_stages(checkpoints)
    best = out_dir / "best.pt"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(best, model, cfg, metrics={"soup": record})
        (out_dir / "metrics.jsonl").write_text("", encoding="utf-8")
        write_json_atomic(out_dir / "soup.json", record)
    except OSError as exc:  # permissions, a full disk, a path changed since the check
        raise DataError(f"soup: cannot write {out_dir} ({exc.strerror or exc})") from exc
    return best


def _check_out_dir(out_dir: Path) -> None:
    """DataError unless ``out_dir`` is an empty directory or can be created as one: it is not
    a file, no folder above it is a file, and it holds nothing."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise DataError(f"soup: --out {out_dir}: {path} is not a directory")
            break
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise DataError(f"soup: {out_dir} is not empty; name a new run directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localisation.soup",
        description="Average the weights of first stages fine-tuned from the same start (a weight soup).",
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, metavar="CHECKPOINT",
                        help="first-stage checkpoints (no verifier) of one configuration, all fine-tuned "
                             "from the same weights")
    parser.add_argument("--out", type=Path, required=True,
                        help="run directory to write (best.pt, metrics.jsonl, soup.json), for localisation.ship --run")
    args = parser.parse_args(argv)
    try:
        best = write_soup(args.out, args.checkpoints)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {best} (the mean of {len(args.checkpoints)} first stages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
