"""Train a ``PhotonDenoiser`` on pairs of single frames and averaged frames of the same scenes.

``python -m localisation.denoiser_train --single DIR --averaged DIR --out FILE``. The two datasets must hold the same scenes: ``patchrig data
synth`` with the same ``--seed``, the second with ``--frames-averaged K`` (K > 1); the first
N scenes of a seed are the same whatever ``--n``, so the averaged set may be shorter. Each pair
is checked (same seed, pixel size and shape) and refused with a clear error otherwise.

Both frames go onto the first stage's model grid (``--um-per-px``, default the shipped
checkpoint's); the single frame is normalised as the localiser normalises it, and the averaged
frame is mapped with the SAME linear map, so the target differs from the input only by the
noise. Loss: mean squared error on random crops (flips and 90 degree turns), Adam with a cosine
schedule. A held-out share of the pairs gives the validation loss, printed beside the identity's
(no denoiser) every ``--eval-every`` steps; the best is written atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localisation.dataset_format import TipRecord, load_image, read_dataset
from localisation.models.cyclegan import atomic_torch_save, read_denoiser_file
from localisation.models.photon_denoiser import DenoiserSpec, PhotonDenoiser
from localisation.preprocess import resample, robust_range, validate_frame
from localisation.progress import bar
from rig.errors import DataError

DENOISER_FORMAT = "patchrig-photon-denoiser/1"


@dataclass
class FramePair:
    """One scene on the model grid: ``single`` normalised to the localiser's [0, 1] (clipped),
    ``averaged`` mapped with the single frame's map (not clipped); float32 (h, w)."""

    single: np.ndarray
    averaged: np.ndarray


def pair_of(single: TipRecord, averaged: TipRecord, model_um_per_px: float) -> FramePair | None:
    """The training pair of two records of the same scene (None for a flat frame)."""
    if single.extra.get("seed") != averaged.extra.get("seed") or single.um_per_px != averaged.um_per_px:
        raise DataError(f"{single.file} and {averaged.file} are not the same scene "
                        f"(seed {single.extra.get('seed')} vs {averaged.extra.get('seed')})")
    a = validate_frame(load_image(single), single.um_per_px, what=str(single.path))
    b = validate_frame(load_image(averaged), averaged.um_per_px, what=str(averaged.path))
    if a.shape != b.shape:
        raise DataError(f"{single.file}: shapes differ ({a.shape} vs {b.shape})")
    kw: dict[str, Any] = {"mode": "fixed_scale", "size": 0, "model_um_per_px": model_um_per_px}
    ra, _ = resample(a, single.um_per_px, **kw)
    rb, _ = resample(b, single.um_per_px, **kw)
    lo, hi = robust_range(ra)
    if not hi > lo:
        return None
    scale = np.float32(1.0 / (hi - lo))
    return FramePair(np.clip((ra - lo) * scale, 0.0, 1.0), (rb - np.float32(lo)) * scale)


def load_pairs(single_dir: Path, averaged_dir: Path, model_um_per_px: float, *, progress: bool) -> list[FramePair]:
    """Every scene of ``averaged_dir`` paired with the same scene of ``single_dir``."""
    single, averaged = read_dataset(single_dir), read_dataset(averaged_dir)
    k_single = int(single.meta.get("frames_averaged", 1))
    k_avg = int(averaged.meta.get("frames_averaged", 1))
    if k_single != 1 or k_avg < 2:
        raise DataError(f"need single frames and averaged frames; got frames_averaged {k_single} "
                        f"({single_dir}) and {k_avg} ({averaged_dir})")
    if single.meta.get("seed") != averaged.meta.get("seed"):
        raise DataError(f"{single_dir} and {averaged_dir} have different seeds "
                        f"({single.meta.get('seed')} vs {averaged.meta.get('seed')})")
    n = min(len(single), len(averaged))
    pairs = []
    for i in bar(range(n), enabled=progress, desc="load pairs", unit="pair"):
        p = pair_of(single[i], averaged[i], model_um_per_px)
        if p is not None:
            pairs.append(p)
    return pairs


def random_crops(
    pairs: list[FramePair], n: int, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``size`` x ``size`` crops (random flips and quarter turns), as (n, 1, s, s)
    input and target tensors. Frames smaller than ``size`` are padded by edge replication."""
    xs = np.empty((n, 1, size, size), np.float32)
    ys = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        p = pairs[int(rng.integers(len(pairs)))]
        a, b = p.single, p.averaged
        h, w = a.shape
        if h < size or w < size:
            pad = ((0, max(0, size - h)), (0, max(0, size - w)))
            a, b = np.pad(a, pad, mode="edge"), np.pad(b, pad, mode="edge")
            h, w = a.shape
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        ca, cb = a[y0:y0 + size, x0:x0 + size], b[y0:y0 + size, x0:x0 + size]
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        ca, cb = np.rot90(ca, k), np.rot90(cb, k)
        if flip:
            ca, cb = ca[:, ::-1], cb[:, ::-1]
        xs[i, 0], ys[i, 0] = ca, cb
    return torch.from_numpy(xs), torch.from_numpy(ys)


@torch.no_grad()
def validation_mse(model: PhotonDenoiser, pairs: list[FramePair]) -> tuple[float, float]:
    """(denoiser MSE, identity MSE) over whole validation frames, pixel-weighted."""
    model.eval()
    err = ident = 0.0
    count = 0
    for p in pairs:
        x = torch.from_numpy(p.single)[None, None]
        y = torch.from_numpy(p.averaged)[None, None]
        err += float(((model(x) - y) ** 2).sum())
        ident += float(((x - y) ** 2).sum())
        count += p.single.size
    model.train()
    return err / count, ident / count


def save_denoiser(path: Path, model: PhotonDenoiser, meta: dict[str, Any]) -> None:
    """Write ``{"format", "spec", "state", "meta"}`` atomically."""
    payload = {"format": DENOISER_FORMAT, "spec": model.spec.to_dict(), "state": model.state_dict(), "meta": meta}
    atomic_torch_save(payload, Path(path))


def denoiser_from_payload(payload: Any, where: str) -> PhotonDenoiser:
    """A ``PhotonDenoiser`` from a saved payload (DataError for anything else)."""
    if not isinstance(payload, dict) or payload.get("format") != DENOISER_FORMAT:
        raise DataError(f"{where}: not a patchrig photon denoiser ({DENOISER_FORMAT})")
    try:
        model = PhotonDenoiser(DenoiserSpec(**payload["spec"]))
        model.load_state_dict(payload["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where}: damaged photon denoiser: {exc}") from exc
    return model.eval()


def load_denoiser(path: str | Path) -> PhotonDenoiser:
    """Read a file written by ``save_denoiser``."""
    return denoiser_from_payload(read_denoiser_file(Path(path)), str(path))


def train_denoiser(
    pairs: list[FramePair],
    val_pairs: list[FramePair],
    out: Path,
    *,
    spec: DenoiserSpec,
    steps: int,
    batch: int,
    crop: int,
    lr: float,
    eval_every: int,
    seed: int,
    meta: dict[str, Any],
    max_minutes: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and write the best (lowest validation MSE) denoiser to ``out``; returns a summary."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = PhotonDenoiser(spec)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    best = (float("inf"), 0)
    history = []
    t0 = time.monotonic()
    identity = validation_mse(model, val_pairs)[1]
    it = bar(range(1, steps + 1), enabled=progress, desc="train denoiser", unit="step")
    for step in it:
        x, y = random_crops(pairs, batch, crop, rng)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_mse = loss.item()
        out_of_time = max_minutes is not None and time.monotonic() - t0 > 60 * max_minutes
        if step % eval_every == 0 or step == steps or out_of_time:
            val, _ = validation_mse(model, val_pairs)
            history.append({"step": step, "train_mse": train_mse, "val_mse": val})
            if val < best[0]:
                best = (val, step)
                save_denoiser(out, model, {**meta, "step": step, "val_mse": val, "identity_mse": identity})
            print(f"step {step}: train {train_mse:.3g}  val {val:.3g}  (identity {identity:.3g})", flush=True)
        if out_of_time:
            break
    return {"best_val_mse": best[0], "best_step": best[1], "identity_val_mse": identity, "history": history}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--single", type=Path, required=True, help="dataset of single frames (patchrig data synth)")
    parser.add_argument("--averaged", type=Path, required=True,
                        help="the same scenes averaged (data synth, same --seed, --frames-averaged K > 1)")
    parser.add_argument("--out", type=Path, required=True, help="denoiser file to write (the best by validation)")
    parser.add_argument("--um-per-px", type=float, default=None,
                        help="model grid in µm per pixel (default: the shipped checkpoint's first stage)")
    parser.add_argument("--val-share", type=float, default=0.05, help="share of pairs held out (default 0.05)")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--factor", type=int, default=2, help="space-to-depth factor (default 2)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=96, help="training crop side in model pixels")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise DataError(f"--threads must be at least 1, got {args.threads}")
    if args.um_per_px is not None and not (math.isfinite(args.um_per_px) and args.um_per_px > 0):
        raise DataError(f"--um-per-px must be a positive number of µm per model pixel, got {args.um_per_px}")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        raise DataError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    torch.set_num_threads(args.threads)
    um = args.um_per_px
    if um is None:
        from localisation.checkpoint import DEFAULT_CHECKPOINT, read_checkpoint
        from localisation.configs import LocaliserConfig

        um = LocaliserConfig.from_dict(read_checkpoint(DEFAULT_CHECKPOINT)["config"]).model_um_per_px
    if not (0 < args.val_share < 1):
        raise DataError(f"--val-share must be between 0 and 1, got {args.val_share}")
    for name in ("steps", "batch", "eval_every"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.crop < 8 or not args.lr > 0:
        raise DataError(f"--crop must be at least 8 and --lr positive, got {args.crop} and {args.lr}")
    try:
        spec = DenoiserSpec(args.channels, args.depth, args.factor)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    pairs = load_pairs(args.single, args.averaged, float(um), progress=not args.no_progress)
    n_val = max(1, round(len(pairs) * args.val_share))
    if len(pairs) - n_val < 1:
        raise DataError(f"only {len(pairs)} usable pairs: too few to train and validate")
    meta = {
        "single": str(args.single), "averaged": str(args.averaged), "model_um_per_px": float(um),
        "pairs": len(pairs) - n_val, "val_pairs": n_val, "command": " ".join(sys.argv),
    }
    summary = train_denoiser(
        pairs[n_val:], pairs[:n_val], args.out, spec=spec, steps=args.steps, batch=args.batch, crop=args.crop,
        lr=args.lr, eval_every=args.eval_every, seed=args.seed, meta=meta, max_minutes=args.max_minutes,
        progress=not args.no_progress,
    )
    print(f"best validation MSE {summary['best_val_mse']:.4g} at step {summary['best_step']} "
          f"(identity {summary['identity_val_mse']:.4g}); wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localisation.denoiser_train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
