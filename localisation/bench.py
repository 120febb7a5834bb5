"""``patchrig bench localiser``: the paper's Table III, per device and per stage.

For each localiser (checkpoints, or configurations with untrained weights: latency does not
depend on the weights) and each available device (CPU with ``--threads`` threads; every CUDA
GPU):

- batch 1, end to end on a 512x512 uint16 synthetic frame through ``TipLocaliser.locate``
  (pre-processing, denoiser, model, verifier, post-processing, each timed; CUDA synchronised
  around each GPU stage), after ``--warmup`` calls; median and 95th percentile over ``--iters``
  calls;
- batch 32: the (first-stage) model's forward pass alone on 32 prepared frames, per image (the paper's
  protocol: warm up, synchronise, average over iterations, divide by the batch size).

Prints a Markdown table and writes ``--out`` JSON when given. Bad options (a count below 1,
an unknown device, or one this machine lacks) are refused before anything runs or is written.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rig.errors import DataError

#: Smallest ``--size`` (pixels): the synthetic frame generator fails below 13 px and never
#: returns from 13 to 21 px (``simulators.synth.sample_example``, seed 0).
MIN_FRAME_PX = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", help="checkpoint to time (repeatable; 'default' or nothing: the shipped fast.pt)")
    parser.add_argument("--config", action="append", help="configuration to time with untrained weights (repeatable)")
    parser.add_argument("--denoiser", help="denoiser file (CycleGAN generator or PhotonDenoiser) to include as the denoiser stage")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, the issue's budget)")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations at batch 1")
    parser.add_argument("--batch-iters", type=int, default=5, help="timed iterations at batch 32")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", type=int, default=512, help=f"frame side in pixels (at least {MIN_FRAME_PX})")
    parser.add_argument("--um-per-px", type=float, default=1.0, help="frame pixel size (1.0: the largest field)")
    parser.add_argument("--devices", default="all", help="all, cpu, cuda (every CUDA GPU) or cuda:N")
    parser.add_argument("--out", type=Path, help="write the results JSON here")


def _frame(size: int, seed: int = 0) -> np.ndarray:
    try:
        from simulators.synth import sample_example

        ex = sample_example(seed, size_px=size)
        return ex.pixels
    except ImportError:  # the simulator is optional for timing
        return np.random.default_rng(seed).integers(0, 4000, (size, size), dtype=np.uint16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(loc: Any, pixels: np.ndarray, um_per_px: float, args: argparse.Namespace) -> dict[str, Any]:
    """Per-stage batch-1 latencies and batch-32 per-image model time for one TipLocaliser."""
    from localisation.inference import model_input

    for _ in range(args.warmup):
        loc.locate(pixels, um_per_px)
    stages: dict[str, list[float]] = {}
    for _ in range(args.iters):
        loc.locate(pixels, um_per_px)
        for k, v in loc.last_timings_ms.items():
            stages.setdefault(k, []).append(v)
    row: dict[str, Any] = {
        f"b1_{k}_ms": {"median": float(np.median(v)), "p95": float(np.percentile(v, 95))} for k, v in stages.items()
    }
    img, _ = loc.prepare(pixels, um_per_px)
    x1 = torch.from_numpy(model_input(img, loc.cfg, loc.model))[None, None]
    x = x1.expand(32, -1, -1, -1).contiguous().to(loc.device)
    with torch.inference_mode():
        for _ in range(max(1, args.warmup // 2)):
            loc.model(x if loc.denoiser is None else loc.denoiser.denoise(x))
        _sync(loc.device)
        t0 = time.perf_counter()
        for _ in range(args.batch_iters):
            xx = x if loc.denoiser is None else loc.denoiser.denoise(x)
            loc.model(xx)
        _sync(loc.device)
    row["b32_per_image_ms"] = (time.perf_counter() - t0) * 1e3 / (args.batch_iters * 32)
    row["model_input"] = list(x1.shape[-2:])
    return row


def _localisers(args: argparse.Namespace, device: str) -> list[tuple[str, Any]]:
    import tempfile

    from localisation.checkpoint import save_checkpoint
    from localisation.configs import build_model, get_config
    from localisation.inference import TipLocaliser

    out = []
    for ckpt in args.checkpoint or ([] if args.config else [None]):
        path = None if ckpt in (None, "default") else ckpt
        loc = TipLocaliser.load(path, device=device, threads=args.threads, denoiser=args.denoiser)
        out.append((f"{loc.cfg.name} ({Path(loc.checkpoint).name})", loc))
    for name in args.config or []:
        cfg = get_config(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "untrained.pt"
            save_checkpoint(path, build_model(cfg), cfg)
            loc = TipLocaliser.load(path, device=device, threads=args.threads, denoiser=args.denoiser)
        out.append((f"{cfg.name} (untrained weights)", loc))
    return out


def check_options(args: argparse.Namespace) -> list[str]:
    """The devices to time (see ``requested_devices``), after checking the other options:
    DataError for fewer than 1 iteration, batch iteration or thread, a negative warm-up, a
    frame smaller than ``MIN_FRAME_PX`` pixels, a pixel size (µm/px) that is not a positive
    number, or an ``--out`` that is a directory."""
    for name, least in (("iters", 1), ("batch_iters", 1), ("threads", 1), ("warmup", 0), ("size", MIN_FRAME_PX)):
        if getattr(args, name) < least:
            raise DataError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if not (math.isfinite(args.um_per_px) and args.um_per_px > 0):
        raise DataError(f"--um-per-px must be a positive number of µm per pixel, got {args.um_per_px}")
    if args.out is not None and args.out.is_dir():
        raise DataError(f"--out {args.out} is a directory; name the JSON file to write")
    return requested_devices(args.devices)


def requested_devices(spec: str) -> list[str]:
    """The torch devices ``--devices spec`` names: 'all' (the CPU and every CUDA GPU), 'cpu',
    'cuda' (every CUDA GPU) or 'cuda:N'. DataError for another name, or for GPUs this
    machine does not have."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    named = {"all": ["cpu", *gpus], "cpu": ["cpu"], "cuda": gpus, **{g: [g] for g in gpus}}
    if named.get(spec):
        return named[spec]
    if spec == "cuda" or re.fullmatch(r"cuda:\d+", spec):
        raise DataError(f"--devices {spec}: no such CUDA GPU on this machine ({len(gpus)} found)")
    raise DataError(f"--devices must be all, cpu, cuda or cuda:N, got {spec!r}")


def run(args: argparse.Namespace) -> int:
    import cv2

    devices = check_options(args)
    cv2.setNumThreads(1)  # as the daemon's localiser process does (rig/localiser_process.py)
    pixels = _frame(args.size)
    results = []
    for dev in devices:
        for name, loc in _localisers(args, dev):
            label = f"CPU ({args.threads} threads)" if dev == "cpu" else torch.cuda.get_device_name(int(dev.split(":")[1]))
            row = bench_one(loc, pixels, args.um_per_px, args)
            row.update({"localiser": name, "device": label})
            results.append(row)
            print(f"{name} on {label}: end to end {row['b1_total_ms']['median']:.2f} ms (batch 1), "
                  f"{row['b32_per_image_ms']:.3f} ms/image (batch 32)", flush=True)
    print()
    print(table(results, args))
    if args.out:
        from rig.atomic import write_json_atomic

        write_json_atomic(args.out, {
            "format": "patchrig-bench-localiser/1", "frame_px": args.size, "um_per_px": args.um_per_px,
            "host": platform.processor() or platform.machine(), "torch": torch.__version__, "results": results,
        }, allow_nan=True)
    return 0


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown Table III (milliseconds; medians, p95 for the total)."""
    lines = [
        f"Latency on a {args.size}x{args.size} frame at {args.um_per_px} µm/px (ms; batch-1 medians over {args.iters} calls)",
        "",
        "| localiser | device | model input | pre-processing | denoiser | model | verifier | post-processing | end to end (p95) | batch 32, model per image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        def m(k: str, r: dict[str, Any] = r) -> str:
            v = r.get(f"b1_{k}_ms")
            return "-" if v is None else f"{v['median']:.2f}"
        lines.append(
            f"| {r['localiser']} | {r['device']} | {r['model_input'][1]}x{r['model_input'][0]} | {m('preprocess')} | "
            f"{m('denoiser')} | {m('model')} | {m('verifier')} | {m('postprocess')} | {m('total')} ({r['b1_total_ms']['p95']:.2f}) | "
            f"{r['b32_per_image_ms']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    p = argparse.ArgumentParser(prog="python -m localisation.bench")
    add_arguments(p)
    try:
        raise SystemExit(run(p.parse_args()))
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
