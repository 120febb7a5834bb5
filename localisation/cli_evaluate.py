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
import os
import tempfile
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
    from localisation.dataset_format import read_dataset, refuse_overwriting
    from localisation.evaluation import (
        evaluate,
        load_localiser,
        metrics_table,
        plot_accuracy_curve,
        plot_overlays,
    )

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # NaN fails too
        raise DataError(f"--threshold must be a score from 0 to 1, got {args.threshold}")
    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit must be at least 1, got {args.limit}")
    if args.threads is not None and args.threads < 1:
        raise DataError(f"--threads must be at least 1, got {args.threads}")
    out = Path(args.out)
    stem = out.with_suffix("")
    figures = [] if args.no_figures else [Path(f"{stem}.accuracy.png"), Path(f"{stem}.overlays.png")]
    for path in (out, *figures):
        if path.is_dir():
            raise DataError(f"{path} is a directory: it cannot be written (choose another --out)")
    dataset = read_dataset(args.data)
    refuse_overwriting([out, *figures], dataset)
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
    # every output is made in a scratch folder beside --out, then moved into place (the JSON
    # last): a failure leaves no partial set of files
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".evaluate-") as tmp:
        staged = {path: Path(tmp) / path.name for path in [*figures, out]}
        if figures:
            plot_accuracy_curve(results, staged[figures[0]])
            plot_overlays(results, records, staged[figures[1]])
        write_json_atomic(staged[out], doc, allow_nan=True)
        for final, scratch in staged.items():
            os.replace(scratch, final)
    print(metrics_table(results))
    if figures:
        print(f"figures: {figures[0]}, {figures[1]}")
    print(f"results: {out}")
    return 0
