"""``patchrig locate INPUT --out FILE``: tips in an image, a folder of images or a dataset.

INPUT may be one PNG/TIFF image, a folder of them (sorted by name), or a ``patchrig-tips/1``
dataset directory (its labels give each image's pixel size; labels' tips are not used).
For plain images the pixel size comes from ``--um-per-px``. Writes ``patchrig-predictions/1``
(DESIGN.md) atomically: coordinates in each input image's own pixels, best tip first.
Images at pixel sizes outside ``localisation.types.VALIDATED_UM_PER_PX`` are located like any
other, with one note on stderr: the shipped localiser was not validated there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rig.errors import DataError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="an image, a folder of images, or a patchrig-tips/1 dataset")
    parser.add_argument("--out", type=Path, required=True, help="predictions JSON (patchrig-predictions/1)")
    parser.add_argument("--checkpoint", help="localiser checkpoint (default: the shipped fast.pt)")
    parser.add_argument("--um-per-px", type=float, help="pixel size of plain images (µm/px)")
    parser.add_argument("--threshold", type=float, help="score threshold (default: the configuration's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def collect_inputs(path: Path, um_per_px: float | None) -> list[tuple[str, Path, float]]:
    """(file string for the output, image path, µm/px) for every image of INPUT."""
    from localisation.dataset_format import LABELS_NAME, read_dataset

    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir() and (path / LABELS_NAME).is_file():
        ds = read_dataset(path)
        if not ds.records:
            raise DataError(f"{path}: the dataset has no images")
        return [(r.file, r.path, r.um_per_px) for r in ds.records]
    if um_per_px is None or not um_per_px > 0:
        raise DataError("plain images need --um-per-px (the pixel size in µm, > 0)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no PNG or TIFF images in this folder")
        return [(p.name, p, um_per_px) for p in files]
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not a PNG or TIFF image")
    return [(str(path), path, um_per_px)]


def run(args: argparse.Namespace) -> int:
    from localisation.dataset_format import LABELS_NAME, load_image
    from localisation.inference import TipLocaliser
    from localisation.progress import bar
    from localisation.types import VALIDATED_UM_PER_PX, pixel_size_refusal
    from rig.atomic import write_json_atomic

    items = collect_inputs(args.input, args.um_per_px)
    out = Path(args.out).resolve()
    inputs = {path.resolve() for _, path, _ in items}
    if args.input.is_dir():
        inputs.add((args.input / LABELS_NAME).resolve())
    if out in inputs:
        raise DataError(f"--out {args.out} is one of the inputs: it would be overwritten; choose another file")
    if out.is_dir():
        raise DataError(f"--out {args.out} is a directory; give a file name")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # NaN fails too
        raise DataError(f"--threshold must be a score from 0 to 1, got {args.threshold}")
    if args.threads is not None and args.threads < 1:
        raise DataError(f"--threads must be at least 1, got {args.threads}")
    loc = TipLocaliser.load(args.checkpoint, device=args.device, threads=args.threads, score_threshold=args.threshold)
    images: list[dict[str, Any]] = []
    for file, path, upp in bar(items, enabled=not args.no_progress, desc="locate", unit="image"):
        pixels = load_image(path)
        t0 = time.perf_counter()
        dets = loc.locate(pixels, upp)
        latency = (time.perf_counter() - t0) * 1e3
        images.append(
            {
                "file": file,
                "tips": [{"x": round(d.x_px, 3), "y": round(d.y_px, 3), "score": round(d.score, 4)} for d in dets],
                "latency_ms": round(latency, 3),
            }
        )
    doc = {
        "format": "patchrig-predictions/1",
        "checkpoint": loc.checkpoint,
        "config": loc.cfg.name,
        "device": str(loc.device),
        "images": images,
    }
    write_json_atomic(args.out, doc, allow_nan=True)
    n_tips = sum(len(i["tips"]) for i in images)
    print(f"{len(images)} image(s), {n_tips} tip(s) -> {args.out}")
    outside = sum(pixel_size_refusal(upp, VALIDATED_UM_PER_PX) is not None for _, _, upp in items)
    if outside:
        lo, hi = VALIDATED_UM_PER_PX
        print(f"note: {outside} image(s) at pixel sizes outside {lo:g}-{hi:g} µm, where the shipped localiser "
              "was not validated (its precision fell to 86.5 % at 1.0-2.0 µm per pixel)", file=sys.stderr)
    return 0
