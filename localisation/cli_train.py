"""``patchrig train --config NAME``: train a localiser configuration.

Examples::

    patchrig train --config fast --out runs/fast --cache-dir runs/cache
    patchrig train --config fast --out runs/fast --resume          # continue after a stop
    torchrun --nproc-per-node 4 -m rig.cli train --config paper --out runs/paper   # multi-GPU

Without ``--data`` the frames are synthetic (the configuration's seed ranges). Writes
``OUT/last.pt`` (resumable), ``OUT/best.pt`` and ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from localisation.configs import CONFIGS, Stage, get_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, choices=sorted(CONFIGS), help="named configuration")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics.jsonl)")
    parser.add_argument("--data", type=Path, help="patchrig-tips/1 training set (default: synthetic frames)")
    parser.add_argument("--val-data", type=Path, help="patchrig-tips/1 validation set")
    parser.add_argument("--cache-dir", type=Path, help="cache rendered synthetic frames here (.npz)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--init-from", type=Path, help="start from these weights (same config)")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly after this many minutes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override every stage's epoch count")
    parser.add_argument("--lr", type=float, help="override every stage's learning rate")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--um-per-px", type=float, metavar="UM",
        help="the model's scale in µm per model pixel (fixed-scale configurations such as fast; "
        "default the configuration's). Stored in the checkpoint: inference resamples frames to it",
    )
    parser.add_argument("--train-examples", type=int, help="synthetic training frames")
    parser.add_argument("--val-examples", type=int, help="synthetic validation frames")
    parser.add_argument("--denoiser", type=Path, help="denoiser file to run first (CycleGAN generator or PhotonDenoiser)")
    parser.add_argument("--pretrained-vit", type=Path, help="local torchvision vit_b_16 weights")
    parser.add_argument("--pretrained-resnet", type=Path, help="local torchvision resnet18 weights")
    parser.add_argument("--pretrained-backbone", type=Path, help="local torchvision weights of a baseline")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_options(args: argparse.Namespace) -> None:
    """ValueError (one line) for an option no run can use, before anything is written."""
    for name, least in (("epochs", 1), ("batch_size", 1), ("train_examples", 1), ("val_examples", 1),
                        ("threads", 1), ("workers", 0), ("seed", 0)):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes >= 0):
        raise ValueError(f"--max-minutes must be 0 (one step, then stop) or more, got {args.max_minutes}")


def config_from_args(args: argparse.Namespace):  # noqa: ANN201 - LocaliserConfig
    """The named configuration with the command-line overrides applied."""
    check_options(args)
    cfg = get_config(args.config)
    changes: dict[str, object] = {}
    if args.epochs is not None or args.lr is not None:
        changes["stages"] = tuple(
            Stage(s.name, args.epochs if args.epochs is not None else s.epochs,
                  args.lr if args.lr is not None else s.lr, s.trainable)
            for s in cfg.stages
        )
    for field in ("batch_size", "train_examples", "val_examples"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    if args.denoiser is not None:
        changes["denoiser"] = str(args.denoiser)
    if args.um_per_px is not None:
        if cfg.input_mode != "fixed_scale":
            raise ValueError(f"--um-per-px needs a fixed-scale configuration; {cfg.name} resizes its input")
        if not args.um_per_px > 0:
            raise ValueError(f"--um-per-px must be > 0, got {args.um_per_px}")
        changes["model_um_per_px"] = float(args.um_per_px)
    return cfg.with_overrides(**changes) if changes else cfg


def run(args: argparse.Namespace) -> int:
    from localisation.train import TrainOptions, train

    cfg = config_from_args(args)
    pretrained = {
        k: str(v)
        for k, v in (("vit", args.pretrained_vit), ("resnet", args.pretrained_resnet), ("backbone", args.pretrained_backbone))
        if v is not None
    }
    opts = TrainOptions(
        out_dir=args.out, data=args.data, val_data=args.val_data, cache_dir=args.cache_dir,
        resume=args.resume, max_minutes=args.max_minutes, device=args.device, threads=args.threads,
        workers=args.workers, progress=not args.no_progress, seed=args.seed, pretrained=pretrained or None,
        init_from=args.init_from,
    )
    result = train(cfg, opts)
    if not math.isfinite(result.get("best_score", 0.0)):  # no epoch finished: no best score yet
        result["best_score"] = None
    print(json.dumps(result))
    return 0
