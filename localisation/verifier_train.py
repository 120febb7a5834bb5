"""``patchrig train-verifier``: train the second stage (verifier.py) of a ``fast`` localiser.

Example::

    patchrig train-verifier --first-stage localisation/checkpoints/fast.pt \\
        --data runs/train-v3 --val-data runs/val-v3 --out runs/verifier --frames 6000

Steps:

1. The first stage proposes its candidates on ``--frames`` training frames and on every
   validation frame (``candidates`` peaks with score >= ``min_first_score``), exactly as at
   inference, and a crop is cut around each one with the inference code.
2. Each candidate is labelled from the dataset: a tip when a labelled tip lies within
   ``--positive-um`` (default ``POSITIVE_UM``; the offset target is the way to it, in crop
   pixels); not a tip when no labelled tip lies within ``--negative-um`` (default
   ``NEGATIVE_UM``) and no faint (``low_contrast``) real tip within
   10 µm; otherwise it is left out (ambiguous).
   With ``--context``, the first stage's decoder features at each candidate are stored beside
   its crop (``inference.first_stage_context``, as at inference).
3. The verifier is trained with binary cross-entropy on the label plus a smooth-L1 loss on the
   offset of tips, with rotations by 90°, flips and brightness/contrast changes.
4. After every epoch the whole cascade is measured on the validation frames, end to end as the
   evaluator measures it; the score threshold is the lowest in 0.20-0.95 whose validation
   precision reaches 98 %, and the epoch with the best accuracy within 5 µm at that threshold
   is kept.

Writes ``OUT/best.pt`` (the first stage's weights and configuration, with the verifier and the
picked threshold: a complete localiser checkpoint, usable by ``locate``, ``evaluate``, the
daemon and ``localisation.ship``) and ``OUT/metrics.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from localisation.checkpoint import load_model, save_checkpoint
from localisation.dataset_format import TipRecord, load_image, read_dataset
from localisation.evaluation import faint_tips_px
from localisation.inference import feature_width, first_stage_context
from localisation.metrics import SWEEP_THRESHOLDS, pick_threshold, threshold_sweep
from localisation.preprocess import Resampling
from localisation.progress import bar
from localisation.verifier import (
    TipVerifier,
    VerifierConfig,
    crop_grid,
    crops_at,
    first_stage_threshold,
    read_outputs,
    score_logit,
    select_verified,
    verifier_payload,
)
from rig.atomic import atomic_open
from rig.errors import DataError

POSITIVE_UM = 4.0  # a candidate this close to a labelled tip is a tip
NEGATIVE_UM = 8.0  # a candidate farther than this from every labelled tip is not a tip
FAINT_UM = 10.0  # ... unless a faint real tip lies this close (then it is left out)
PRECISION_TARGET = 0.98


@dataclass
class Candidates:
    """First-stage candidates of a list of frames. ``frame``: index of the frame (n,);
    ``xy_px``: input pixels (n, 2); ``score``: first-stage score (n,); ``label``: 1 tip, 0 not
    a tip, -1 left out (n,); ``offset``: candidate -> tip in crop pixels (n, 2; zero unless a
    tip); ``crops``: (n, S, S) float16; ``context``: the first stage's features at each
    candidate (n, C) float16, C = 0 for a verifier without context. Per frame:
    ``frame_shape`` (height, width) in pixels and ``grid_scale`` (crop-grid pixels per input
    pixel in x and y), (n_frames, 2)."""

    frame: np.ndarray
    xy_px: np.ndarray
    score: np.ndarray
    label: np.ndarray
    offset: np.ndarray
    crops: np.ndarray
    context: np.ndarray
    frame_shape: np.ndarray
    grid_scale: np.ndarray


def label_candidates(
    xy_px: np.ndarray,
    tips_px: np.ndarray,
    faint_px: np.ndarray,
    um_per_px: float,
    cfg: VerifierConfig,
    *,
    positive_um: float = POSITIVE_UM,
    negative_um: float = NEGATIVE_UM,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) int8 and offsets (n, 2) crop pixels of candidates (input pixels): a tip
    within ``positive_um`` µm of a labelled tip, not a tip beyond ``negative_um`` µm of every
    labelled tip (and ``FAINT_UM`` of every faint one), left out (-1) otherwise."""
    label = np.full(len(xy_px), -1, dtype=np.int8)
    offset = np.zeros((len(xy_px), 2), dtype=np.float32)
    crop_px_per_px = um_per_px / cfg.crop_um_per_px
    for k, p in enumerate(np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)):
        d_tip = np.linalg.norm(tips_px - p, axis=1) * um_per_px if len(tips_px) else np.array([np.inf])
        d_faint = (np.linalg.norm(faint_px - p, axis=1) * um_per_px).min() if len(faint_px) else np.inf
        j = int(np.argmin(d_tip))
        if d_tip[j] <= positive_um:
            label[k] = 1
            offset[k] = (tips_px[j] - p) * crop_px_per_px
        elif d_tip[j] > negative_um and d_faint > FAINT_UM:
            label[k] = 0
    return label, offset


_WORKER: dict[str, Any] = {}


def _init_worker(first_stage: str, cfg: VerifierConfig, radii_um: tuple[float, float]) -> None:
    from localisation.inference import TipLocaliser

    torch.set_num_threads(1)
    loc = TipLocaliser.load(first_stage, device="cpu", threads=1, use_verifier=False, score_threshold=cfg.min_first_score)
    loc.model.n_max = cfg.candidates  # type: ignore[assignment]
    _WORKER.update(loc=loc, cfg=cfg, radii_um=radii_um)


def _frame_candidates(record: TipRecord) -> Candidates:
    """One frame's candidates (``frame`` all 0; ``collect_candidates`` numbers the frames)."""
    loc, cfg = _WORKER["loc"], _WORKER["cfg"]
    pixels = load_image(record)
    dets, pred, _ = loc.locate_with_heatmap(pixels, record.um_per_px)
    context = first_stage_context(pred, loc.model, cfg)
    if context is None:
        context = np.zeros((len(dets), 0), np.float32)
    xy = np.array([[d.x_px, d.y_px] for d in dets], dtype=np.float64).reshape(-1, 2)
    score = np.array([d.score for d in dets], dtype=np.float64)
    positive_um, negative_um = _WORKER["radii_um"]
    label, offset = label_candidates(xy, record.tips_px.reshape(-1, 2), faint_tips_px(record), record.um_per_px, cfg,
                                     positive_um=positive_um, negative_um=negative_um)
    grid, rs = crop_grid(pixels, record.um_per_px, cfg)
    crops = crops_at(grid, rs.to_model(xy), cfg.crop_size_px).astype(np.float16)
    return Candidates(
        frame=np.zeros(len(xy), np.int64), xy_px=xy, score=score, label=label, offset=offset, crops=crops,
        context=context.astype(np.float16), frame_shape=np.array([pixels.shape[:2]], np.int64),
        grid_scale=np.array([[rs.sx, rs.sy]], np.float64),
    )


def _no_candidates(cfg: VerifierConfig) -> Candidates:
    """``Candidates`` of no frame, with every field's dtype and trailing shape."""
    s = cfg.crop_size_px
    return Candidates(
        frame=np.zeros(0, np.int64), xy_px=np.zeros((0, 2)), score=np.zeros(0), label=np.zeros(0, np.int8),
        offset=np.zeros((0, 2), np.float32), crops=np.zeros((0, s, s), np.float16),
        context=np.zeros((0, cfg.context_channels), np.float16), frame_shape=np.zeros((0, 2), np.int64),
        grid_scale=np.zeros((0, 2)),
    )


def collect_candidates(
    first_stage: Path,
    records: list[TipRecord],
    cfg: VerifierConfig,
    *,
    workers: int,
    progress: bool,
    desc: str,
    radii_um: tuple[float, float] = (POSITIVE_UM, NEGATIVE_UM),
) -> Candidates:
    """Run the first stage on every record (``workers`` processes, one thread each) and label
    the candidates (``radii_um``: the positive and negative radii of ``label_candidates``)."""
    if workers > 1:
        with get_context("fork").Pool(workers, _init_worker, (str(first_stage), cfg, radii_um)) as pool:
            per_frame = list(bar(pool.imap(_frame_candidates, records, chunksize=8), enabled=progress,
                                 total=len(records), desc=desc, unit="frame"))
    else:
        _init_worker(str(first_stage), cfg, radii_um)
        per_frame = [_frame_candidates(r) for r in bar(records, enabled=progress, desc=desc, unit="frame")]
    parts = [_no_candidates(cfg), *(dataclasses.replace(f, frame=f.frame + i) for i, f in enumerate(per_frame))]
    return Candidates(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                         for f in dataclasses.fields(Candidates)})


def augment(crops: torch.Tensor, offsets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rotation by a multiple of 90° and optional left-right flip for the whole batch,
    the offsets (x, y crop pixels) moved with the pixels; per-crop gain 0.8-1.2 and bias +-0.1."""
    k = int(torch.randint(4, (1,), generator=generator))
    flip = bool(torch.randint(2, (1,), generator=generator))
    crops = torch.rot90(crops, k, (2, 3))
    ox, oy = offsets[:, 0], offsets[:, 1]
    for _ in range(k):  # rot90 moves the pixel at (x, y) from the centre to (y, -x)
        ox, oy = oy, -ox
    if flip:
        crops = torch.flip(crops, (3,))
        ox = -ox
    n = crops.shape[0]
    gain = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
    bias = torch.empty(n, 1, 1, 1).uniform_(-0.1, 0.1, generator=generator)
    return crops * gain + bias, torch.stack([ox, oy], 1)


@torch.inference_mode()
def verifier_outputs(verifier: TipVerifier, cands: Candidates, batch: int = 1024) -> np.ndarray:
    """(n, 3) raw outputs for every candidate (eval mode)."""
    verifier.eval()
    outs = [np.zeros((0, 3), np.float32)]
    for i in range(0, len(cands.score), batch):
        crops = torch.from_numpy(cands.crops[i : i + batch].astype(np.float32))[:, None]
        context = torch.from_numpy(cands.context[i : i + batch].astype(np.float32)) if verifier.context_channels else None
        outs.append(verifier(crops, torch.from_numpy(score_logit(cands.score[i : i + batch])), context).numpy())
    return np.concatenate(outs)


def sweep(
    outputs: np.ndarray, cands: Candidates, records: list[TipRecord], n_max: int
) -> list[dict[str, Any]]:
    """End-to-end validation metrics of the cascade at each of ``metrics.SWEEP_THRESHOLDS``: the
    outputs read as ``verify`` reads them (``read_outputs``), the inference's selection
    (``select_verified``) and the evaluator's metrics (``metrics.threshold_sweep``)."""
    frames = []
    for i, rec in enumerate(records):
        sel = cands.frame == i
        rs = Resampling(*(float(v) for v in cands.grid_scale[i]))
        tips, probs = read_outputs(outputs[sel], rs.to_model(cands.xy_px[sel]), rs)
        h, w = cands.frame_shape[i]
        kept, scores = select_verified(tips, probs, score_threshold=0.0, frame_shape=(int(h), int(w)),
                                       um_per_px=rec.um_per_px, n_max=n_max)
        frames.append((kept, scores, rec.tips_px, rec.um_per_px, faint_tips_px(rec)))
    return threshold_sweep(frames, SWEEP_THRESHOLDS)


def train_verifier(
    first_stage: Path,
    data: Path | list[Path],
    val_data: Path,
    out_dir: Path,
    *,
    frames: int | None = None,
    epochs: int = 6,
    lr: float = 2e-3,
    batch_size: int = 128,
    workers: int = 2,
    threads: int = 2,
    seed: int = 0,
    cfg: VerifierConfig | None = None,
    positive_um: float = POSITIVE_UM,
    negative_um: float = NEGATIVE_UM,
    context: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """See the module docstring (``cfg``: None = ``VerifierConfig()``; ``positive_um`` and
    ``negative_um``: the labelling radii, µm; ``context``: the verifier also reads the first
    stage's decoder features at each candidate, ``cfg.context_channels`` set to their width).
    Returns a summary (best epoch, threshold, validation metrics)."""
    cfg = cfg or VerifierConfig()
    if epochs < 1:
        raise DataError("--epochs must be at least 1")
    earlier = [name for name in ("best.pt", "metrics.jsonl", "last.pt") if (Path(out_dir) / name).exists()]
    if earlier:  # as train: a run directory is never overwritten (nor mixed with another run)
        raise DataError(f"{out_dir} already holds a run ({', '.join(earlier)}); choose another --out "
                        "(nothing was overwritten)")
    if not 0 < positive_um < negative_um:
        raise DataError(f"need 0 < --positive-um < --negative-um, got {positive_um} and {negative_um}")
    radii_um = (float(positive_um), float(negative_um))
    model, first_cfg, payload = load_model(first_stage)
    if first_cfg.model != "fast":
        raise DataError(f"{first_stage}: a verifier needs a 'fast' first stage, not {first_cfg.model!r}")
    width = feature_width(model)
    if context and not width:
        raise DataError(f"{first_stage}: this first stage gives no features for --context")
    cfg = dataclasses.replace(cfg, context_channels=int(width or 0) if context else 0)
    data_dirs = [data] if isinstance(data, Path) else list(data)
    train_records = [r for d in data_dirs for r in read_dataset(d).records][: frames if frames else None]
    val_records = read_dataset(val_data).records
    if not train_records or not val_records:
        raise DataError("the training and validation sets must not be empty")
    if not any(len(r.tips_px) for r in val_records):
        raise DataError(f"{val_data}: the validation set has no labelled tip: nothing to pick a threshold on")
    first_threshold = first_stage_threshold(payload, first_cfg)
    t_start = time.monotonic()
    train = collect_candidates(first_stage, train_records, cfg, workers=workers, progress=progress,
                               desc="candidates (train)", radii_um=radii_um)
    val = collect_candidates(first_stage, val_records, cfg, workers=workers, progress=progress,
                             desc="candidates (val)", radii_um=radii_um)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    use = train.label >= 0
    crops = torch.from_numpy(train.crops[use])
    logits = torch.from_numpy(score_logit(train.score[use]))
    labels = torch.from_numpy(train.label[use].astype(np.float32))
    offsets = torch.from_numpy(train.offset[use])
    contexts = torch.from_numpy(train.context[use].astype(np.float32))
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise DataError("the first stage's candidates hold only one class; more training frames are needed")
    verifier = TipVerifier(cfg)
    opt = torch.optim.AdamW(verifier.parameters(), lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(labels) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    best: dict[str, Any] | None = None
    for epoch in range(epochs):
        verifier.train()
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for i in bar(range(0, len(labels), batch_size), enabled=progress, desc=f"verifier epoch {epoch + 1}/{epochs}",
                     total=steps_per_epoch, unit="batch"):
            b = order[i : i + batch_size]
            x, off = augment(crops[b].float()[:, None], offsets[b], gen)
            out = verifier(x, logits[b], contexts[b] if cfg.context_channels else None)
            loss = F.binary_cross_entropy_with_logits(out[:, 0], labels[b])
            tip = labels[b] > 0
            if tip.any():
                loss = loss + 0.2 * F.smooth_l1_loss(out[tip, 1:3], off[tip])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        rows = sweep(verifier_outputs(verifier, val), val, val_records, first_cfg.n_max)
        chosen = pick_threshold(rows, PRECISION_TARGET)
        line = {"epoch": epoch, "lr": sched.get_last_lr()[0], "minutes": (time.monotonic() - t_start) / 60,
                "train": {"total": total / len(labels)},
                "val": {"threshold": chosen["threshold"], "acc_5um": chosen["acc_5um"], "acc_10um": chosen["acc_10um"],
                        "precision": chosen["precision"]}}
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        if best is None or chosen["acc_5um"] > best["val"]["acc_5um"]:
            best = {**line, "sweep": rows}
            save_checkpoint(
                out_dir / "best.pt", model, first_cfg.with_overrides(score_threshold=chosen["threshold"]),
                metrics={"val": line["val"], "epoch": epoch, "validation_threshold_sweep": rows,
                         "candidates": {"train": int(len(train.label)), "train_tips": int((train.label == 1).sum()),
                                        "val": int(len(val.label))}},
                verifier=verifier_payload(verifier, cfg, first_stage_threshold=first_threshold),
            )
    assert best is not None
    summary = {"best_epoch": best["epoch"], "threshold": best["val"]["threshold"], "val": best["val"],
               "train_candidates": int(len(train.label)), "train_tips": int((train.label == 1).sum()),
               "label_radii_um": {"positive": radii_um[0], "negative": radii_um[1]},
               "context_channels": cfg.context_channels,
               "minutes": (time.monotonic() - t_start) / 60}
    with atomic_open(out_dir / "summary.json", "w") as fh:
        fh.write(json.dumps(summary, indent=1))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--first-stage", type=Path, required=True, help="a 'fast' localiser checkpoint")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="patchrig-tips/1 training set(s)")
    parser.add_argument("--val-data", type=Path, required=True, help="patchrig-tips/1 validation set")
    parser.add_argument("--out", type=Path, required=True, help="run directory (best.pt, metrics.jsonl)")
    parser.add_argument("--frames", type=int, help="use the first N training frames (default: all)")
    parser.add_argument("--widths", type=int, nargs=4, default=list(VerifierConfig().widths), metavar="C",
                        help="channels of the verifier's 4 stages (default: 12 24 48 96)")
    parser.add_argument("--candidates", type=int, default=VerifierConfig().candidates, metavar="N",
                        help=f"first-stage peaks examined per frame, in training and at inference "
                             f"(default {VerifierConfig().candidates}; more find more tips and cost more time)")
    parser.add_argument("--crop-px", type=int, default=VerifierConfig().crop_size_px, metavar="S",
                        help=f"side of the verifier's crop in pixels of {VerifierConfig().crop_um_per_px:g} µm, a "
                             f"multiple of 16 (default {VerifierConfig().crop_size_px}; larger sees more context "
                             "and costs more time)")
    parser.add_argument("--context", action="store_true",
                        help="the verifier also reads the first stage's decoder features at each candidate "
                             "(what the first stage saw around the crop; stored in the checkpoint)")
    parser.add_argument("--positive-um", type=float, default=POSITIVE_UM,
                        help=f"a candidate this close to a labelled tip is a tip (µm, default {POSITIVE_UM:g})")
    parser.add_argument("--negative-um", type=float, default=NEGATIVE_UM,
                        help=f"a candidate farther than this from every labelled tip is not one (µm, default {NEGATIVE_UM:g})")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the candidates (default 6)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="processes proposing candidates")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = VerifierConfig(widths=tuple(args.widths), candidates=args.candidates, crop_size_px=args.crop_px)
    except ValueError as exc:
        raise DataError(f"--candidates / --widths / --crop-px: {exc}") from exc
    summary = train_verifier(
        args.first_stage, args.data, args.val_data, args.out, frames=args.frames, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, workers=args.workers, threads=args.threads, seed=args.seed, cfg=cfg,
        positive_um=args.positive_um, negative_um=args.negative_um, context=args.context, progress=not args.no_progress,
    )
    print(json.dumps(summary))
    return 0
