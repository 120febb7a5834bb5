"""``patchrig data synth|show|import-coco``: make, look at and import labelled tip datasets.

- ``synth``: a synthetic patchrig-tips/1 dataset (both CPU cores, progress bar, atomic).
- ``show``: a contact sheet PNG of a dataset with its tip labels drawn (red circles; tips the
  generator marked as not visible, yellow crosses).
- ``figure``: a labelled grid of in vivo and ex vivo synthetic frames (the docs picture).
- ``import-coco``: a COCO keypoints file (CVAT, Label Studio export) into patchrig-tips/1.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rig.errors import DataError, InvalidParams


def _range(text: str, kind: type = int) -> tuple[Any, Any]:
    """Parse 'MIN-MAX' (or a single value) into a pair."""
    parts = text.split("-") if kind is int else text.split(":") if ":" in text else text.split("-")
    try:
        if len(parts) == 1:
            value = kind(parts[0])
            return value, value
        if len(parts) == 2:
            return kind(parts[0]), kind(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected MIN-MAX, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser(
        "synth",
        help="write a synthetic labelled dataset (patchrig-tips/1)",
        description="Render N randomised synthetic frames with exact tip labels into DIR "
        "(patchrig-tips/1). DIR must not exist or be empty; it appears only when complete.",
    )
    p.add_argument("--out", required=True, type=Path, help="output dataset directory")
    p.add_argument("--n", required=True, type=int, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--domain", choices=["in_vivo", "ex_vivo"], default="in_vivo")
    p.add_argument(
        "--tips", type=_range, default=(0, 6), metavar="MIN-MAX",
        help="pipettes per image, inclusive (default 0-6; ex vivo images hold at most one)",
    )
    p.add_argument(
        "--um-per-px", type=lambda s: _range(s, float), default=(0.35, 1.0), metavar="MIN-MAX",
        help="pixel size range in µm, log-uniform (default 0.35-1.0)",
    )
    p.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    p.add_argument("--workers", type=int, default=2, help="render processes (default 2)")
    p.add_argument(
        "--frames-averaged", type=int, default=1, metavar="K",
        help="each image the mean of K frames of its still scene, as acquisition software "
        "averages them: K times the photons, read and scan-line noise / sqrt(K); the same "
        "--seed gives the same scenes (default 1)",
    )

    p = sub.add_parser(
        "show",
        help="draw a contact sheet of a dataset with its labels",
        description="Draw up to --max images of a patchrig-tips/1 dataset in a grid, contrast-"
        "stretched, with labelled tips circled in red and tips labelled not visible (out of "
        "frame or focus) marked with yellow crosses.",
    )
    p.add_argument("dataset", type=Path, help="dataset directory (with labels.json)")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--max", type=int, default=24, help="images to show (default 24)")
    p.add_argument("--cols", type=int, default=6, help="columns (default 6)")
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")

    p = sub.add_parser(
        "figure",
        help="draw a labelled grid of in vivo and ex vivo synthetic frames (for docs)",
        description="Render --rows x 4 synthetic frames (the last row ex vivo) with their tip "
        "labels into one PNG. Deterministic per --seed.",
    )
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--rows", type=int, default=3, help="rows, the last one ex vivo (default 3)")
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")

    p = sub.add_parser(
        "import-coco",
        help="import a COCO keypoints file (CVAT, Label Studio) into patchrig-tips/1",
        description="Each COCO annotation is one pipette; its 'tip' keypoint (or the first) "
        "becomes a tip. COCO coordinates start at the top-left pixel corner; they are shifted "
        "by -0.5 to patchrig's pixel-centre convention.",
    )
    p.add_argument("coco_json", type=Path, help="COCO keypoints JSON file")
    p.add_argument("--images", required=True, type=Path, help="folder holding the images")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory")
    p.add_argument("--um-per-px", required=True, type=float, help="pixel size of the images")
    p.add_argument("--keypoint", default=None, help="keypoint name of the tip (default 'tip')")
    p.add_argument("--include-occluded", action="store_true", help="also keep visibility-1 points")
    p.add_argument(
        "--centre-origin", action="store_true",
        help="the file already uses pixel-centre coordinates (no -0.5 shift)",
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        return _run_synth(args)
    if args.action == "show":
        return _run_show(args)
    if args.action == "figure":
        return _run_figure(args)
    return _run_import(args)


MAX_SYNTH_UM_PER_PX = 10.0  # the rig configuration's largest pixel size


def _run_synth(args: argparse.Namespace) -> int:
    from simulators.synth import synthesise_dataset

    if args.n < 1:
        raise InvalidParams(f"--n must be at least 1, got {args.n}")
    if args.size < 32:
        raise InvalidParams(f"--size must be at least 32, got {args.size}")
    if args.workers < 1:
        raise InvalidParams(f"--workers must be at least 1, got {args.workers}")
    if args.frames_averaged < 1:
        raise InvalidParams(f"--frames-averaged must be at least 1, got {args.frames_averaged}")
    if args.seed < 0:
        raise InvalidParams(f"--seed must be a non-negative integer, got {args.seed}")
    lo_um, hi_um = args.um_per_px
    if not (0 < lo_um <= hi_um <= MAX_SYNTH_UM_PER_PX):  # NaN fails too
        raise InvalidParams(f"--um-per-px must be 0 < MIN <= MAX <= {MAX_SYNTH_UM_PER_PX:g} µm, got {lo_um}-{hi_um}")
    ds = synthesise_dataset(
        args.out, args.n, args.seed, args.domain, args.tips, args.workers,
        um_per_px=(lo_um, hi_um), size_px=args.size, frames_averaged=args.frames_averaged,
    )
    n_tips = sum(len(r.tips_px) for r in ds)
    print(f"wrote {len(ds)} images with {n_tips} visible tips to {args.out}")
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from localisation.dataset_format import (
        finite_number,
        load_image,
        read_dataset,
        refuse_overwriting,
    )

    _check_sheet_layout(args.tile, max_images=args.max, cols=args.cols)
    _check_picture_path(args.out)
    ds = read_dataset(args.dataset)
    refuse_overwriting([args.out], ds)
    if len(ds) == 0:
        raise DataError(f"{args.dataset}: dataset has no images")
    items = []
    for record in ds.records[: args.max]:
        hidden = [  # hand-edited entries without both coordinates are left out
            (t["x"], t["y"]) for t in record.extra.get("all_tips", [])
            if isinstance(t, dict) and not t.get("visible", True) and finite_number(t.get("x")) and finite_number(t.get("y"))
        ]
        caption = f"{Path(record.file).name}  {len(record.tips_px)} tips  {record.um_per_px:.2f} um/px"
        items.append((load_image(record), record.tips_px, hidden, caption))
    sheet = contact_sheet(items, cols=args.cols, tile_px=args.tile)
    write_picture(args.out, sheet)
    print(f"wrote {args.out} ({len(items)} images)")
    return 0


def _run_figure(args: argparse.Namespace) -> int:
    from simulators.synth import example_seed, sample_example

    if args.rows < 2:
        raise InvalidParams(f"--rows must be at least 2 (the last row is ex vivo), got {args.rows}")
    if args.seed < 0:
        raise InvalidParams(f"--seed must be a non-negative integer, got {args.seed}")
    _check_sheet_layout(args.tile)
    _check_picture_path(args.out)
    rows = args.rows
    items = []
    for i in range(4 * rows):
        domain = "ex_vivo" if i >= 4 * (rows - 1) else "in_vivo"
        ex = sample_example(example_seed(args.seed, i), domain=domain, n_tips=(1, 5))
        hidden = [(t["x"], t["y"]) for t in ex.meta["all_tips"] if not t["visible"]]
        caption = f"{domain.replace('_', ' ')}  {ex.um_per_px:.2f} um/px  {ex.meta['bit_depth']}-bit"
        items.append((ex.pixels, ex.tips_px, hidden, caption))
    sheet = contact_sheet(items, cols=4, tile_px=args.tile)
    write_picture(args.out, sheet)
    print(f"wrote {args.out}")
    return 0


def _check_sheet_layout(tile_px: int, *, max_images: int = 1, cols: int = 1) -> None:
    if not 32 <= tile_px <= 2048:
        raise InvalidParams(f"--tile must be 32..2048 pixels, got {tile_px}")
    if max_images < 1:
        raise InvalidParams(f"--max must be at least 1, got {max_images}")
    if cols < 1:
        raise InvalidParams(f"--cols must be at least 1, got {cols}")


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _check_picture_path(path: Path) -> None:
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise InvalidParams(f"{path}: --out must end in {', '.join(PICTURE_SUFFIXES)}")


def write_picture(path: Path, image: np.ndarray) -> None:
    """Encode ``image`` by ``path``'s suffix and write it atomically (temp file, rename)."""
    import os
    import tempfile

    _check_picture_path(path)
    ok, buf = cv2.imencode(path.suffix.lower(), image)
    if not ok:
        raise DataError(f"{path}: cannot encode the picture")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise DataError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.tobytes())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run_import(args: argparse.Namespace) -> int:
    from localisation.dataset_format import import_coco

    ds = import_coco(
        args.coco_json, args.images, args.out, args.um_per_px,
        keypoint_name=args.keypoint, include_occluded=args.include_occluded,
        coco_corner_origin=not args.centre_origin,
    )
    n_tips = sum(len(r.tips_px) for r in ds)
    print(f"imported {len(ds)} images with {n_tips} tips into {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# contact sheet


def display_8bit(pixels: np.ndarray) -> np.ndarray:
    """Contrast-stretch an 8/16-bit frame to uint8 (0.5th-99.8th percentile)."""
    p = pixels.astype(np.float32)
    lo, hi = np.percentile(p[::2, ::2], [0.5, 99.8])
    return np.clip((p - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)


def contact_sheet(
    items: Sequence[tuple[np.ndarray, np.ndarray, Sequence[tuple[float, float]], str]],
    *,
    cols: int = 6,
    tile_px: int = 256,
) -> np.ndarray:
    """A BGR grid of (pixels, visible tips (n, 2), hidden tips, caption) tiles.

    Visible tips: red circles centred on the label (pixel-centre convention kept exactly when
    scaling); hidden tips: small yellow crosses.
    """
    cols = max(1, min(cols, len(items)))
    rows = math.ceil(len(items) / cols)
    cap_h = 18
    sheet = np.full((rows * (tile_px + cap_h), cols * tile_px, 3), 24, np.uint8)
    shift = 4
    for i, (pixels, tips, hidden, caption) in enumerate(items):
        h, w = pixels.shape[:2]
        scale = tile_px / max(h, w)
        tile = cv2.resize(display_8bit(pixels), (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)

        def to_tile(x: float, y: float, scale: float = scale) -> tuple[int, int]:
            # pixel-centre convention: centre of pixel 0 maps to tile coordinate scale/2 - 0.5
            return (round(((x + 0.5) * scale - 0.5) * 2**shift), round(((y + 0.5) * scale - 0.5) * 2**shift))

        for x, y in np.asarray(tips, float).reshape(-1, 2):
            cv2.circle(tile, to_tile(x, y), 7 * 2**shift, (40, 40, 255), 1, cv2.LINE_AA, shift)
            cv2.circle(tile, to_tile(x, y), 1 * 2**shift, (40, 40, 255), -1, cv2.LINE_AA, shift)
        for x, y in hidden:
            if -0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5:
                cx, cy = to_tile(x, y)
                d = 4 * 2**shift
                cv2.line(tile, (cx - d, cy - d), (cx + d, cy + d), (0, 220, 255), 1, cv2.LINE_AA, shift)
                cv2.line(tile, (cx - d, cy + d), (cx + d, cy - d), (0, 220, 255), 1, cv2.LINE_AA, shift)
        r, c = divmod(i, cols)
        y0, x0 = r * (tile_px + cap_h), c * tile_px
        sheet[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] = tile
        cv2.putText(
            sheet, caption[:42], (x0 + 3, y0 + tile_px + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.36,
            (220, 220, 220), 1, cv2.LINE_AA,
        )
    return sheet
