"""Where a cascade loses its tips: each true tip classed by the stage that missed it.

    python -m localisation.miss_analysis --data runs/val-big --out runs/eval/misses.json \\
        [--checkpoint CKPT] [--figure runs/eval/misses.png]

For a checkpoint with a verifier (the shipped ``fast.pt``), every labelled (visible) tip of the
dataset gets one class, from the per-stage outputs of ``TipLocaliser.last_cascade``:

- ``found``: a candidate's refined tip lies within ``--tolerance-um`` (default 5 µm) of the
  tip with a verifier score at or above the localiser's threshold;
- ``rejected``: a refined tip lies that close, but every such one scored below the threshold
  (the verifier's miss);
- ``refined_off``: a first-stage candidate lies within ``--candidate-um`` (default 6 µm, the
  shipped verifier's positive labelling radius) but no refined tip within the tolerance (the
  verifier moved it wrongly);
- ``no_candidate``: neither (the first stage's miss).

Counts are given overall and by the tip's contrast-to-noise band. ``found`` differs slightly
from ``evaluate``'s accuracy within 5 µm, which also suppresses duplicates, keeps at most
``n_max`` tips and matches one to one. The optional figure shows crops (80 µm) of missed tips
of CNR 10 or more: red circle the tip (5 µm radius), green crosses the first-stage candidates,
cyan dots the verifier's refined tips. Diagnostics only: nothing here changes a model.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from localisation.dataset_format import TipRecord, load_image, read_dataset
from localisation.evaluation import true_tip_cnr
from localisation.inference import CascadeStages, TipLocaliser
from localisation.metrics import CNR_BAND_NAMES, cnr_band
from localisation.progress import bar
from rig.atomic import write_json_atomic
from rig.errors import DataError

CLASSES = ("found", "rejected", "refined_off", "no_candidate")


def classify_tips(
    stages: CascadeStages,
    tips_px: np.ndarray,
    um_per_px: float,
    *,
    threshold: float,
    tolerance_um: float = 5.0,
    candidate_um: float = 6.0,
) -> list[str]:
    """One class of ``CLASSES`` per true tip ((n, 2) input pixels) of one frame (see the
    module docstring)."""
    out = []
    for tip in np.asarray(tips_px, dtype=np.float64).reshape(-1, 2):
        d_refined = np.linalg.norm(stages.refined_px - tip, axis=1) * um_per_px
        d_candidate = np.linalg.norm(stages.candidates_px - tip, axis=1) * um_per_px
        close = d_refined <= tolerance_um
        if close.any():
            out.append("found" if stages.verifier_scores[close].max() >= threshold else "rejected")
        elif (d_candidate <= candidate_um).any():
            out.append("refined_off")
        else:
            out.append("no_candidate")
    return out


def analyse(
    loc: TipLocaliser,
    records: list[TipRecord],
    *,
    tolerance_um: float = 5.0,
    candidate_um: float = 6.0,
    progress: bool = True,
) -> tuple[dict[str, Any], list[tuple[int, int, str, float]], list[CascadeStages]]:
    """Class counts ({"overall": {...}, "by_cnr": {band: {...}}}, each with ``tips`` and a
    count and fraction per class), the per-tip list (record index, tip index, class, CNR) and
    each record's ``CascadeStages`` (for ``plot_misses``)."""
    if loc.verifier is None:
        raise DataError(f"{loc.checkpoint}: miss analysis needs a checkpoint with a verifier (a cascade)")
    per_tip: list[tuple[int, int, str, float]] = []
    per_frame: list[CascadeStages] = []
    for i, rec in enumerate(bar(records, enabled=progress, desc="miss analysis", unit="image")):
        loc.locate(load_image(rec), rec.um_per_px)
        stages = loc.last_cascade
        assert stages is not None  # a cascade always records its stages
        per_frame.append(stages)
        classes = classify_tips(stages, rec.tips_px, rec.um_per_px, threshold=loc.score_threshold,
                                tolerance_um=tolerance_um, candidate_um=candidate_um)
        cnr = true_tip_cnr(rec)
        for j, c in enumerate(classes):
            per_tip.append((i, j, c, float(cnr[j]) if cnr is not None else float("nan")))
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    for _i, _j, c, cnr_value in per_tip:
        groups["overall"][c] += 1
        if np.isfinite(cnr_value):
            groups[cnr_band(cnr_value)][c] += 1

    def summary(counts: Counter[str]) -> dict[str, Any]:
        n = sum(counts.values())
        return {"tips": n, **{c: {"count": counts[c], "fraction": counts[c] / n if n else None} for c in CLASSES}}

    bands = list(CNR_BAND_NAMES)  # in order, "<10" first
    by_cnr = {b: summary(groups[b]) for b in bands if b in groups}
    return {"overall": summary(groups["overall"]), "by_cnr": by_cnr}, per_tip, per_frame


def table(result: dict[str, Any]) -> str:
    """A Markdown table of the class fractions, overall then by CNR band."""
    lines = ["| tips | CNR | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 2) + "|"]
    for name, row in [("all", result["overall"]), *result["by_cnr"].items()]:
        cells = [f"{100 * row[c]['fraction']:.1f}%" if row[c]["fraction"] is not None else "-" for c in CLASSES]
        lines.append(f"| {row['tips']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_misses(
    records: list[TipRecord],
    per_tip: list[tuple[int, int, str, float]],
    per_frame: list[CascadeStages],
    path: Path,
    *,
    per_class: int = 12,
) -> None:
    """Crops of up to ``per_class`` ``no_candidate`` and ``rejected`` misses with CNR >= 10
    (see the module docstring), one row of six per line, written to ``path`` (PNG). ``per_tip``
    and ``per_frame`` are what ``analyse`` returned for ``records``."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = []
    for cls in ("no_candidate", "rejected"):
        picked += [t for t in per_tip if t[2] == cls and t[3] >= 10.0][:per_class]
    if not picked:
        raise DataError("no misses with CNR >= 10 to show")
    ncols = 6
    nrows = -(-len(picked) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.0 * ncols, 2.15 * nrows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    images: dict[int, np.ndarray] = {}  # each shown frame read once
    for ax, (i, j, cls, cnr_value) in zip(axes.ravel(), picked, strict=False):
        rec = records[i]
        if i not in images:
            images[i] = load_image(rec).astype(np.float32)
        pixels = images[i]
        stages = per_frame[i]
        tip = rec.tips_px[j]
        half = 40.0 / rec.um_per_px  # 80 µm crop
        side = int(round(2 * half))
        crop = cv2.getRectSubPix(pixels, (side, side), (float(tip[0]), float(tip[1])))
        lo, hi = np.percentile(crop, (1, 99.5))
        ax.imshow(np.clip((crop - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray", interpolation="nearest")
        origin = tip - (side - 1) / 2.0
        for pts, style in ((stages.candidates_px, dict(c="lime", marker="+", s=40)),
                           (stages.refined_px, dict(c="cyan", marker=".", s=12))):
            p = pts - origin
            inside = (p >= 0).all(1) & (p < side).all(1)
            ax.scatter(p[inside, 0], p[inside, 1], linewidths=1, **style)  # type: ignore[arg-type]
        ax.add_patch(plt.Circle(((side - 1) / 2, (side - 1) / 2), 5.0 / rec.um_per_px, fill=False, color="red", lw=1))
        ax.set_title(f"{cls.replace('_', ' ')}  CNR {cnr_value:.0f}\n{rec.um_per_px:.2f} µm/px", fontsize=7)
    fig.suptitle("missed tips (80 µm crops): red, the tip; green +, first-stage candidates; cyan, refined", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m localisation.miss_analysis", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a labelled patchrig-tips/1 dataset")
    p.add_argument("--out", type=Path, required=True, help="JSON of the class counts")
    p.add_argument("--checkpoint", help="a cascade checkpoint (default: the shipped fast.pt)")
    p.add_argument("--threshold", type=float, help="verifier score threshold (default: the checkpoint's)")
    p.add_argument("--tolerance-um", type=float, default=5.0, help="a refined tip this close is on the tip (µm)")
    p.add_argument("--candidate-um", type=float, default=6.0, help="a candidate this close is near the tip (µm)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figure", type=Path, help="also write crops of missed tips (PNG)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.tolerance_um <= 0 or args.candidate_um <= 0:
        raise SystemExit("--tolerance-um and --candidate-um must be positive")
    try:
        records = read_dataset(args.data).records[: args.limit or None]
        if not records:
            raise DataError(f"{args.data}: the dataset has no images")
        loc = TipLocaliser.load(args.checkpoint, device="cpu", threads=args.threads, score_threshold=args.threshold)
        result, per_tip, per_frame = analyse(loc, records, tolerance_um=args.tolerance_um, candidate_um=args.candidate_um,
                                  progress=not args.no_progress)
        doc = {"data": str(args.data), "checkpoint": loc.checkpoint, "threshold": loc.score_threshold,
               "tolerance_um": args.tolerance_um, "candidate_um": args.candidate_um, "images": len(records), **result}
        write_json_atomic(args.out, doc, allow_nan=True)
        print(table(result))
        if args.figure:
            plot_misses(records, per_tip, per_frame, args.figure)
            print(f"figure: {args.figure}")
    except DataError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
