"""Make a training run the shipped default: ``localisation/checkpoints/<name>.pt`` + ``.json``.

    python -m localisation.ship --run runs/fast --test runs/testset-777 \\
        --train-command "patchrig train --config fast ..." \\
        --test-command "patchrig data synth --out runs/testset-777 --n 500 --seed 777"

``--verifier-from CHECKPOINT`` ships the run's first stage (a ``fast`` run without a verifier)
with the second stage of another cascade checkpoint, e.g. a retrained first stage under the
shipped verifier; the threshold is then picked end to end on ``--val-data`` as for any cascade.

Copies the run's ``best.pt`` without its optimiser state, evaluates it end to end on the test
set (``evaluation.evaluate``: the same path as ``patchrig evaluate``) and records in the JSON
the exact training and test-set commands, the training history summary, the measured metrics
and whether the issue's targets are met. Nothing here edits a number by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model, read_checkpoint, save_checkpoint
from localisation.configs import LocaliserConfig
from localisation.data import cached_synthetic
from localisation.dataset_format import read_dataset
from localisation.evaluation import evaluate, faint_tips_px, metrics_table
from localisation.inference import TipLocaliser, check_context_width, predict_prepared
from localisation.metrics import SWEEP_THRESHOLDS, pick_threshold, threshold_sweep
from localisation.verifier import load_verifier
from rig.atomic import write_json_atomic
from rig.errors import DataError

TARGETS = {"acc_5um": 0.95, "acc_10um": 0.99, "precision": 0.98}


def main(argv: list[str] | None = None) -> int:
    """Ship a run (see the module docstring). Any failure is one line on stderr and exit 1,
    and leaves ``--out`` and its ``.json`` as they were: the new checkpoint is written beside
    them and moved into place only after the test set was measured."""
    try:
        return _ship(argv)
    except (DataError, OSError, ValueError) as exc:
        print(f"localisation.ship: error: {exc}", file=sys.stderr)
        return 1


def _ship(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="training run directory (best.pt, metrics.jsonl)")
    p.add_argument("--checkpoint-name", default="best.pt")
    p.add_argument("--test", type=Path, required=True, help="patchrig-tips/1 test set never used in training")
    p.add_argument("--train-command", required=True)
    p.add_argument("--test-command", required=True)
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--verifier-from", type=Path, metavar="CHECKPOINT",
                   help="take the second stage (verifier) from this cascade checkpoint and put it on the run's "
                        "first stage (which must have none); needs --pick-threshold")
    p.add_argument("--score-threshold", type=float, help="override the configuration's threshold")
    p.add_argument("--pick-threshold", action="store_true",
                   help="pick the threshold on the run's VALIDATION frames: the lowest in 0.20-0.95 whose "
                        "validation precision reaches the target plus a margin (--precision-margin; the test "
                        "set is never used for this)")
    p.add_argument("--precision-margin", type=float, default=0.0,
                   help="validation precision required above the 98%% target when picking (default 0)")
    p.add_argument("--cache-dir", type=Path, help="the run's synthetic frame cache (for --pick-threshold)")
    p.add_argument("--val-data", type=Path,
                   help="the run's patchrig-tips/1 validation set (for --pick-threshold; default: the "
                        "configuration's synthetic validation seeds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    progress = not args.no_progress
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        p.error(f"--score-threshold must be in 0-1, got {args.score_threshold}")
    if not 0.0 <= args.precision_margin <= 0.02:
        p.error(f"--precision-margin must be in 0-0.02, got {args.precision_margin}")
    # every input is read before anything is written
    records = read_dataset(args.test).records
    if not records:
        raise DataError(f"{args.test}: the test set has no images")
    metrics_log = args.run / "metrics.jsonl"
    try:
        history = [json.loads(x) for x in metrics_log.read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as exc:
        raise DataError(f"{metrics_log}: cannot read the run's metrics log: {exc}") from None

    torch.set_num_threads(args.threads)
    src = args.run / args.checkpoint_name
    model, cfg, payload = load_model(src)
    sweep_rows = None
    verifier = payload.get("verifier")
    verifier_src = src
    if args.verifier_from is not None:
        if not args.pick_threshold:
            raise SystemExit("--verifier-from needs --pick-threshold (the pair's threshold is picked anew)")
        verifier = verifier_from(args.verifier_from, model, payload, cfg, src)
        verifier_src = args.verifier_from
    if verifier is not None:
        # a cascade: train-verifier picked a threshold on its validation frames; --pick-threshold
        # picks again, end to end, on --val-data (e.g. a larger validation set)
        sweep_rows = payload.get("metrics", {}).get("validation_threshold_sweep")
        if args.pick_threshold and args.val_data is None:
            raise SystemExit("--pick-threshold for a checkpoint with a verifier needs --val-data")
    if args.pick_threshold:
        if verifier is not None and args.verifier_from is not None:
            with tempfile.TemporaryDirectory() as tmp:
                pair = Path(tmp) / "pair.pt"
                save_checkpoint(pair, model, cfg, verifier=verifier)
                sweep_rows = sweep_cascade(pair, args.val_data, threads=args.threads, progress=progress)
        elif verifier is not None:
            sweep_rows = sweep_cascade(src, args.val_data, threads=args.threads, progress=progress)
        else:
            sweep_rows = sweep_thresholds(model, cfg, args.cache_dir, val_data=args.val_data, progress=progress)
        chosen = pick_threshold(sweep_rows, TARGETS["precision"] + args.precision_margin)
        cfg = cfg.with_overrides(score_threshold=chosen["threshold"])
    elif args.score_threshold is not None:
        cfg = cfg.with_overrides(score_threshold=args.score_threshold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".ship-") as tmp:
        staged = Path(tmp) / args.out.name  # same file system: moved into place at the end
        save_checkpoint(staged, model, cfg, metrics={"val": payload.get("metrics", {}).get("val"),
                                                     "epoch": payload.get("metrics", {}).get("epoch")},
                        verifier=verifier)
        loc = TipLocaliser.load(staged, device="cpu", threads=args.threads)
        result = evaluate(cfg.name, loc, records, keep_heatmaps=False, progress=progress)
        doc = _record(args, cfg, model, payload, verifier, verifier_src, src, history, sweep_rows, records,
                      result, staged.stat().st_size)
        os.replace(staged, args.out)
    write_json_atomic(args.out.with_suffix(".json"), doc, allow_nan=True)
    print(metrics_table([result]))
    print(json.dumps(doc["targets"], indent=1))
    return 0


def _record(args: argparse.Namespace, cfg: LocaliserConfig, model: torch.nn.Module, payload: dict[str, Any],
            verifier: dict[str, Any] | None, verifier_src: Path, src: Path, history: list[dict[str, Any]],
            sweep_rows: Any, records: list[Any], result: Any, size_bytes: int) -> dict[str, Any]:
    """The shipped checkpoint's record (``fast.json``): commands, training, sweep, test metrics."""
    overall = result.metrics["overall"]
    return {
        "checkpoint": args.out.name,
        "config": cfg.name,
        "config_values": cfg.to_dict(),
        "size_bytes": size_bytes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "verifier": None if verifier is None else {
            "config": verifier["config"], "first_stage_threshold": verifier.get("first_stage_threshold"),
            "source_checkpoint": str(verifier_src),
            "parameters": sum(p.numel() for p in load_verifier(verifier, str(verifier_src))[0].parameters())},
        "training_command": args.train_command,
        "training": {
            "source_checkpoint": str(src),
            "selected_epoch": payload.get("metrics", {}).get("epoch"),
            "soup": payload.get("metrics", {}).get("soup"),
            "epochs_run": len(history),
            "minutes": history[-1]["minutes"] if history else None,
            "val_history": [{"epoch": h["epoch"], "lr": h["lr"], "train_loss": h["train"]["total"],
                             "val_acc_5um": h["val"]["acc_5um"], "val_acc_10um": h["val"]["acc_10um"],
                             "val_precision": h["val"]["precision"]} for h in history],
        },
        "score_threshold": cfg.score_threshold,
        "validation_threshold_sweep": sweep_rows,
        "test_set": {"command": args.test_command, "path": str(args.test), "images": len(records),
                     "tips": int(sum(len(r.tips_px) for r in records))},
        "metrics": result.metrics,
        "targets": {k: {"target": v, "measured": overall[k], "met": overall[k] is not None and overall[k] >= v}
                    for k, v in TARGETS.items()},
        "mean_locate_ms_during_evaluation": result.latency_ms,
        "host": {"machine": platform.machine(), "torch": torch.__version__, "threads": args.threads},
    }


def verifier_from(
    donor_path: Path, model: torch.nn.Module, payload: dict[str, Any], cfg: LocaliserConfig, src: Path
) -> dict[str, Any]:
    """The ``"verifier"`` entry of the cascade checkpoint ``donor_path``, to put on the first
    stage ``model`` of ``src`` (SystemExit with a clear message if either does not fit). Its
    first-stage threshold (the ``no-verifier`` ablation's) becomes the new first stage's own."""
    if payload.get("verifier") is not None:
        raise SystemExit(f"--verifier-from: {src} already has a verifier")
    if cfg.model != "fast":
        raise SystemExit(f"--verifier-from: {src} is a {cfg.model!r} model; a verifier needs a 'fast' first stage")
    try:
        donor = read_checkpoint(donor_path)
    except DataError as exc:
        raise SystemExit(f"--verifier-from: {exc}") from exc
    entry = donor.get("verifier")
    if entry is None:
        raise SystemExit(f"--verifier-from: {donor_path} has no verifier")
    try:
        check_context_width(model, load_verifier(entry, str(donor_path))[1], str(donor_path))
    except DataError as exc:
        raise SystemExit(f"--verifier-from: {exc}") from exc
    return {**entry, "first_stage_threshold": float(cfg.score_threshold)}


def sweep_cascade(checkpoint: Path, val_data: Path, *, threads: int, progress: bool = True) -> list[dict[str, Any]]:
    """Validation metrics at ``SWEEP_THRESHOLDS`` of a checkpoint with a verifier, end to end
    through ``TipLocaliser.locate`` at threshold 0 (see ``metrics.threshold_sweep``)."""
    from localisation.dataset_format import load_image
    from localisation.progress import bar

    loc = TipLocaliser.load(checkpoint, device="cpu", threads=threads, score_threshold=0.0)
    frames = []
    for rec in bar(read_dataset(val_data).records, enabled=progress, desc="validation sweep", unit="frame"):
        dets = loc.locate(load_image(rec), rec.um_per_px)
        frames.append((np.array([[d.x_px, d.y_px] for d in dets]).reshape(-1, 2), np.array([d.score for d in dets]),
                       rec.tips_px, rec.um_per_px, faint_tips_px(rec)))
    return threshold_sweep(frames, SWEEP_THRESHOLDS)


def sweep_thresholds(
    model: torch.nn.Module,
    cfg: LocaliserConfig,
    cache_dir: Path | None,
    *,
    val_data: Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Validation metrics at ``SWEEP_THRESHOLDS``: on ``val_data`` (a dataset directory, whose
    faint tips are neither required nor false positives, as in ``evaluate``) or else on the
    configuration's synthetic validation seeds."""
    from localisation.data import load_directory, load_frame_denoiser

    if val_data is not None:
        prepared = load_directory(cfg, val_data, progress=progress)
        faint = [faint_tips_px(r) for r in read_dataset(val_data).records]
    else:
        prepared = cached_synthetic(cfg, cfg.val_seed, cfg.val_examples, cache_dir, desc="render val", progress=progress)
        faint = [f.resampling.to_input(f.faint_model_px) for f in prepared]  # as evaluate counts them
    # the inference path exactly: the configuration's denoiser too
    denoiser = load_frame_denoiser(cfg.denoiser) if cfg.denoiser else None
    frames = []
    for f, faint_px in zip(prepared, faint, strict=True):
        pred = predict_prepared(model, cfg, f.image_float(), device=torch.device("cpu"), score_threshold=0.0,
                                denoiser=denoiser)
        frames.append((f.resampling.to_input(pred.xy_model_px), pred.scores, f.resampling.to_input(f.tips_model_px),
                       f.um_per_px, faint_px))
    return threshold_sweep(frames, SWEEP_THRESHOLDS)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
