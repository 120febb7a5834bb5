"""``patchrig evaluate --data DIR``: the paper's metrics and ours, split by tip count.

Examples::

    patchrig data synth --out data/test --n 500 --seed 777     # a fresh synthetic test set
    patchrig evaluate --data data/test --out results/eval.json
    patchrig evaluate --data data/test --checkpoint runs/fast/best.pt --checkpoint classical \\
        --out results/compare.json

Writes the JSON (metrics overall and per tip count, accuracy curve, mean latency), prints a
Markdown table, and saves ``<out>.accuracy.png`` (accuracy against threshold) and
``<out>.overlays.png`` (like the paper's Fig. 6) next to the JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rig.atomic import write_json_atomic
from rig.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="patchrig-tips/1 dataset directory")
    parser.add_argument(
        "--checkpoint",
        action="append",
        help="localiser checkpoint (repeatable); 'default' = the shipped fast.pt, "
        "'classical' = the detector without learning (default: default)",
    )
    parser.add_argument("--config", help="refuse checkpoints of any other configuration")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (figures are written beside it)")
    parser.add_argument(
        "--ablation",
        choices=["no-offset", "no-verifier"],
        help="no-offset: the fast model without its sub-cell offset head (tips at heatmap cell centres); "
        "no-verifier: a cascade's first stage alone, at its own threshold",
    )
    parser.add_argument("--threshold", type=float, help="score threshold (default: each checkpoint's own)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the configuration's)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from localisation.dataset_format import read_dataset
    from localisation.evaluation import (
        evaluate,
        load_localiser,
        metrics_table,
        plot_accuracy_curve,
        plot_overlays,
    )

    dataset = read_dataset(args.data)
    records = dataset.records[: args.limit] if args.limit else dataset.records
    if not records:
        raise DataError(f"{args.data}: the dataset has no images")
    specs = args.checkpoint or ["default"]
    results = []
    for spec in specs:
        name, loc = load_localiser(
            spec, device=args.device, threads=args.threads, expect_config=args.config, score_threshold=args.threshold,
            use_verifier=args.ablation != "no-verifier",
        )
        if args.ablation == "no-verifier":
            if not getattr(loc, "checkpoint_has_verifier", False):
                raise DataError(f"{spec}: --ablation no-verifier needs a checkpoint with a verifier")
            name += " without verifier"
        if args.ablation == "no-offset":
            if not hasattr(getattr(loc, "model", None), "use_offset"):
                raise DataError(f"{spec}: --ablation no-offset needs a fast-family checkpoint")
            loc.model.use_offset = False
            name += " without offset head"
        results.append(evaluate(name, loc, records, progress=not args.no_progress))
    doc = {
        "format": "patchrig-evaluation/1",
        "data": str(args.data),
        "images": len(records),
        "models": [
            {"name": r.name, "spec": s, "metrics": r.metrics, "curve": r.curve, "latency_ms_mean": r.latency_ms}
            for r, s in zip(results, specs, strict=True)
        ],
    }
    write_json_atomic(args.out, doc, allow_nan=True)
    print(metrics_table(results))
    if not args.no_figures:
        stem = args.out.with_suffix("")
        plot_accuracy_curve(results, Path(f"{stem}.accuracy.png"))
        plot_overlays(results, records, Path(f"{stem}.overlays.png"))
        print(f"figures: {stem}.accuracy.png, {stem}.overlays.png")
    print(f"results: {args.out}")
    return 0
