"""Evaluate localisers end to end on a labelled dataset: metrics, curve, figures.

A "localiser spec" names what to evaluate: a checkpoint path, ``default`` (the shipped
``fast.pt``) or ``classical`` (the non-learning detector). Every frame goes through the same
public path the daemon uses (``locate`` on the raw pixels), so pre-processing, the denoiser
and post-processing are all included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localisation.dataset_format import TipRecord, load_image
from localisation.heatmaps import gaussian_heatmap, heatmap_iou
from localisation.inference import TipLocaliser
from localisation.metrics import MetricsAccumulator
from localisation.models.fast import centernet_targets
from localisation.progress import bar


@dataclass
class EvaluatedModel:
    """One localiser's results on a dataset."""

    name: str
    metrics: dict[str, Any]
    curve: dict[str, list[float]]
    latency_ms: float
    predictions: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)  # per image (xy, scores)
    heatmaps: list[np.ndarray | None] = field(repr=False)


def load_localiser(
    spec: str,
    *,
    device: str = "auto",
    threads: int | None = None,
    expect_config: str | None = None,
    score_threshold: float | None = None,
    use_verifier: bool = True,
) -> tuple[str, Any]:
    """(display name, object with ``locate``) for a spec (see the module docstring).
    ``use_verifier=False``: a cascade's first stage alone, at its own threshold."""
    if spec == "classical":
        from localisation.classical import ClassicalTipDetector

        return "classical", ClassicalTipDetector()
    loc = TipLocaliser.load(
        None if spec == "default" else spec,
        device=device,
        threads=threads,
        expect_config=expect_config,
        score_threshold=score_threshold,
        use_verifier=use_verifier,
    )
    return f"{loc.cfg.name} ({Path(loc.checkpoint).name})", loc


def _true_heatmap_iou(loc: TipLocaliser, pred_heat: np.ndarray, true_model_px: np.ndarray) -> float:
    """IoU (at 0.5) of the predicted heatmap against the ground truth on the same grid: the
    paper's Gaussian (sigma_px) for models with a full-resolution heatmap, the CenterNet target
    (sigma_cells at the output stride) for the fast model."""
    h, w = pred_heat.shape
    if loc.cfg.loss == "centernet":
        stride = int(getattr(loc.model, "out_stride", 1))
        tips = torch.as_tensor(true_model_px, dtype=torch.float32).reshape(1, -1, 2)
        valid = torch.ones(tips.shape[:2], dtype=torch.bool)
        target = centernet_targets(tips, valid, (h, w), stride, loc.cfg.sigma_cells)[0][0, 0]
    else:
        target = gaussian_heatmap(torch.as_tensor(true_model_px, dtype=torch.float32), h, w, sigma_px=loc.cfg.sigma_px).clamp(0, 1)
    return heatmap_iou(torch.from_numpy(pred_heat), target)


def _all_tips(rec: TipRecord) -> list[dict[str, Any]] | None:
    """The record's well-formed ``all_tips`` entries (numeric x, y), as ``patchrig data synth``
    writes them; None when the record has no ``all_tips`` list. Malformed entries are skipped:
    ``all_tips`` is an optional extra that readers which do not need it ignore."""
    entries = rec.extra.get("all_tips")
    if not isinstance(entries, list):
        return None
    out = []
    for t in entries:
        if not isinstance(t, dict):
            continue
        try:
            x, y = float(t["x"]), float(t["y"])
        except (KeyError, TypeError, ValueError):
            continue
        out.append(dict(t, x=x, y=y))
    return out


def faint_tips_px(rec: TipRecord) -> np.ndarray:
    """(n, 2) x, y of the record's real tips that are too faint to require (``all_tips``
    entries with reason ``low_contrast``); none otherwise."""
    return low_contrast_px(_all_tips(rec) or [])


def low_contrast_px(all_tips: list[dict[str, Any]]) -> np.ndarray:
    """(n, 2) x, y of the well-formed ``all_tips`` entries whose reason is ``low_contrast``."""
    faint = [(t["x"], t["y"]) for t in all_tips if t.get("reason") == "low_contrast"]
    return np.asarray(faint, dtype=np.float64).reshape(-1, 2)


def true_tip_cnr(rec: TipRecord) -> np.ndarray | None:
    """Each true tip's contrast-to-noise ratio from the record's ``all_tips`` (the visible entry
    at the tip's position), NaN where unknown; None when the record has no ``all_tips``."""
    entries = _all_tips(rec)
    if entries is None:
        return None
    known = [t for t in entries if t.get("visible") and isinstance(t.get("cnr"), int | float)]
    out = np.full(len(rec.tips_px), np.nan)
    for i, (x, y) in enumerate(np.asarray(rec.tips_px, dtype=np.float64).reshape(-1, 2)):
        for t in known:
            if abs(t["x"] - x) < 0.01 and abs(t["y"] - y) < 0.01:
                out[i] = float(t["cnr"])
                break
    return out


def evaluate(
    name: str, localiser: Any, records: list[TipRecord], *, progress: bool = True, keep_heatmaps: bool = True
) -> EvaluatedModel:
    """Run ``localiser`` on every record and score it (see metrics.py)."""
    acc = MetricsAccumulator()
    preds: list[tuple[np.ndarray, np.ndarray]] = []
    heats: list[np.ndarray | None] = []
    times = []
    for rec in bar(records, enabled=progress, desc=f"evaluate {name}", unit="image"):
        pixels = load_image(rec)
        t0 = time.perf_counter()
        heat = None
        iou = None
        if isinstance(localiser, TipLocaliser):
            dets, pred, rs = localiser.locate_with_heatmap(pixels, rec.um_per_px)
            if pred.heatmap is not None:
                iou = _true_heatmap_iou(localiser, pred.heatmap, rs.to_model(rec.tips_px))
                heat = pred.heatmap if keep_heatmaps else None
        else:
            dets = localiser.locate(pixels, rec.um_per_px)
        times.append((time.perf_counter() - t0) * 1e3)
        xy = np.array([[d.x_px, d.y_px] for d in dets], dtype=np.float64).reshape(-1, 2)
        scores = np.array([d.score for d in dets], dtype=np.float64)
        acc.add(
            xy, rec.tips_px, rec.um_per_px, heatmap_iou=iou, faint_px=faint_tips_px(rec), true_cnr=true_tip_cnr(rec)
        )
        preds.append((xy, scores))
        heats.append(heat)
    return EvaluatedModel(name, acc.summary(), acc.curve(), float(np.mean(times)) if times else 0.0, preds, heats)


def metrics_table(results: list[EvaluatedModel]) -> str:
    """A Markdown table: one row per model and tip count (``all`` first)."""
    head = "| model | tips/frame | frames | acc@3µm | acc@5µm | acc@10µm | mean err µm | precision | recall | F1 | heatmap IoU |"
    lines = [head, "|" + "---|" * 11]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in results:
        rows = [("all", r.metrics["overall"])] + list(r.metrics["by_n_tips"].items())
        for key, m in rows:
            lines.append(
                f"| {r.name} | {key} | {m['images']} | {pct(m['acc_3um'])} | {pct(m['acc_5um'])} | "
                f"{pct(m['acc_10um'])} | {num(m['mean_error_um'])} | {pct(m['precision'])} | "
                f"{pct(m['recall'])} | {pct(m['f1'])} | {num(m['heatmap_iou'])} |"
            )
    def band_table(key: str, label: str, columns: list[tuple[str, str]]) -> list[str]:
        """The rows of every model's ``metrics[key]`` bands; ``columns``: (header, metric name),
        counts printed as they are, shares as percentages."""
        rows = [(r.name, b, m) for r in results for b, m in r.metrics.get(key, {}).items()]
        if not rows:
            return []
        heads = ["model", label, *(h for h, _ in columns)]
        cells = [[name, band, *(str(m[k]) if isinstance(m[k], int) else pct(m[k]) for _, k in columns)]
                 for name, band, m in rows]
        head, *body = ["| " + " | ".join(c) + " |" for c in [heads, *cells]]
        return ["", head, "|" + "---|" * len(heads), *body]

    lines += band_table("by_cnr", "tip CNR", [("tips", "true_tips"), ("acc@3µm", "acc_3um"), ("acc@5µm", "acc_5um"),
                                              ("acc@10µm", "acc_10um")])
    lines += band_table("by_um_per_px", "µm per pixel", [("frames", "images"), ("tips", "true_tips"),
                                                         ("acc@5µm", "acc_5um"), ("acc@10µm", "acc_10um"),
                                                         ("precision", "precision")])
    return "\n".join(lines)


def plot_accuracy_curve(results: list[EvaluatedModel], path: Path) -> None:
    """Accuracy (fraction of true tips found within e µm) against e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        ax.plot(r.curve["threshold_um"], [100 * a for a in r.curve["accuracy"]], label=r.name)
    for e in (3, 5, 10):
        ax.axvline(e, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("error threshold e (µm)")
    ax.set_ylabel("true tips found within e (%)")
    ax.set_xlim(0, 10.5)
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Accuracy against error threshold\n(matches gated at 10 µm)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overlays(results: list[EvaluatedModel], records: list[TipRecord], path: Path, *, gate_um: float = 10.0) -> None:
    """Like the paper's Fig. 6: one row per tip count (first frame with that many tips), one
    column per model, plus the first model's heatmap. Green dots: true tips; blue crosses:
    predictions within ``gate_um`` of a true tip; red crosses: the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from localisation.metrics import gated_match

    rows: list[int] = []
    seen: set[int] = set()
    for i, rec in enumerate(records):
        n = len(rec.tips_px)
        if n not in seen:
            seen.add(n)
            rows.append(i)
    rows.sort(key=lambda i: len(records[i].tips_px))
    rows = rows[:7]
    has_heat = bool(results) and any(h is not None for h in results[0].heatmaps)
    ncols = len(results) + int(has_heat)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols, 2.6 * len(rows)), dpi=100, squeeze=False)
    for r_i, idx in enumerate(rows):
        rec = records[idx]
        img = load_image(rec).astype(np.float32)
        lo, hi = np.percentile(img, (0.5, 99.8))
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
        for c_i, res in enumerate(results):
            ax = axes[r_i, c_i]
            ax.imshow(img, cmap="gray", interpolation="nearest")
            true = rec.tips_px
            ax.scatter(true[:, 0], true[:, 1], s=14, c="lime", marker="o", linewidths=0)
            xy, _s = res.predictions[idx]
            for p in xy:
                ok = len(gated_match(p[None] * rec.um_per_px, true * rec.um_per_px, gate_um)) == 1
                ax.scatter([p[0]], [p[1]], s=40, c="deepskyblue" if ok else "red", marker="x", linewidths=1.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r_i == 0:
                ax.set_title(res.name, fontsize=8)
            if c_i == 0:
                ax.set_ylabel(f"{len(true)} tip(s)", fontsize=8)
        if has_heat:
            ax = axes[r_i, -1]
            heat = results[0].heatmaps[idx]
            if heat is not None:
                ax.imshow(heat, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r_i == 0:
                ax.set_title("heatmap", fontsize=8)
    fig.suptitle("green: true tips; blue x: within 10 µm; red x: wrong", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
