"""The ``patchrig-tips/1`` labelled dataset format: reading, writing, and COCO import.

Layout::

    DIR/labels.json
    DIR/images/...   (PNG or TIFF, 8- or 16-bit greyscale; colour is converted to grey)

``labels.json``::

    {"format": "patchrig-tips/1",
     "images": [{"file": "images/000000.png", "um_per_px": 0.62, "tips": [[x, y], ...]}]}

Tips are in the image's own pixels: x = column, y = row, floats, origin at the CENTRE of the
top-left pixel. ``tips`` may be empty. Extra keys (per image or top level) are kept in
``TipRecord.extra`` / ``TipDataset.meta`` and ignored otherwise.

Readers are strict: a malformed labels file, a bad entry, or a missing or unreadable image
raises ``rig.errors.DataError`` naming the file (and the entry). Writers are atomic: labels are
written to a temporary file in the same directory, fsynced, then renamed over the old one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from rig.atomic import write_text_atomic
from rig.errors import DataError

# tifffile logs its own parse errors before it raises; load_image raises one DataError naming
# the file, so those lines would only be a second, noisier report of the same fault
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

FORMAT = "patchrig-tips/1"
LABELS_NAME = "labels.json"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass(frozen=True)
class TipRecord:
    """One labelled image. ``file``: path relative to the dataset directory (as in
    labels.json); ``path``: absolute path; ``tips_px``: (n, 2) float64 x, y pixel-centre
    coordinates; ``extra``: the entry's other keys."""

    file: str
    path: Path
    um_per_px: float
    tips_px: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "file": self.file,
            "um_per_px": float(self.um_per_px),
            "tips": [[float(x), float(y)] for x, y in np.asarray(self.tips_px).reshape(-1, 2)],
        }
        for key, value in self.extra.items():
            if key not in entry:
                entry[key] = value
        return entry


@dataclass
class TipDataset:
    """A dataset read from ``root``: its records in file order and its top-level extra keys."""

    root: Path
    records: list[TipRecord]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TipRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> TipRecord:
        return self.records[index]


def refuse_overwriting(outputs: list[Path], dataset: TipDataset, option: str = "--out") -> None:
    """DataError if an output path is the dataset's labels.json or one of its images (a
    command writing its results there would destroy its own input)."""
    inputs = {(dataset.root / LABELS_NAME).resolve(), *(r.path.resolve() for r in dataset.records)}
    for out in outputs:
        if Path(out).resolve() in inputs:
            raise DataError(f"output {out} (from {option}) is part of the dataset {dataset.root}: it would be "
                            "overwritten; choose another file")


# --------------------------------------------------------------------------------------------
# reading


def read_dataset(directory: str | Path, *, check_images: bool = True) -> TipDataset:
    """Read ``DIR/labels.json``; with ``check_images`` every image file must exist.

    Raises DataError naming the labels file (and entry) or the missing image.
    """
    root = Path(directory)
    labels_path = root / LABELS_NAME
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: no labels file (expected a {FORMAT} dataset)")
    try:
        doc = json.loads(labels_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{labels_path}: not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{labels_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except ValueError as exc:  # an integer of more than 4300 digits
        raise DataError(f"{labels_path}: invalid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{labels_path}: top level must be a JSON object")
    if doc.get("format") != FORMAT:
        raise DataError(f"{labels_path}: format must be {FORMAT!r}, got {doc.get('format')!r}")
    images = doc.get("images")
    if not isinstance(images, list):
        raise DataError(f"{labels_path}: 'images' must be a list")
    records = []
    seen: dict[str, int] = {}  # normalised file -> its first index
    for index, entry in enumerate(images):
        record = _parse_entry(labels_path, index, entry)
        key = Path(record.file).as_posix()  # "./a.png", "a.png" and ".//a.png" are one file
        if key in seen:
            raise DataError(f"{labels_path}: images[{index}]: duplicate file {record.file!r} "
                            f"(the same file as images[{seen[key]}])")
        seen[key] = index
        if check_images and not record.path.is_file():
            raise DataError(f"{record.path}: image listed in {labels_path} (images[{index}]) is missing")
        records.append(record)
    meta = {k: v for k, v in doc.items() if k not in ("format", "images")}
    return TipDataset(root=root, records=records, meta=meta)


def finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float64; an integer too large for a
    float (a JSON 1 followed by 400 zeros) is not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value: Any) -> str:
    """``repr(value)`` cut to 40 characters, for messages (a huge number would fill the screen)."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's limit for str (4300 digits)
        return "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_entry(labels_path: Path, index: int, entry: Any) -> TipRecord:
    where = f"{labels_path}: images[{index}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: must be an object")
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        raise DataError(f"{where}: 'file' must be a non-empty string")
    rel = Path(file)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where} ({file}): 'file' must be a path inside the dataset directory")
    if rel.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{where} ({file}): images must be PNG or TIFF")
    where = f"{where} ({file})"
    um_per_px: Any = entry.get("um_per_px")
    if not finite_number(um_per_px) or um_per_px <= 0:
        raise DataError(f"{where}: 'um_per_px' must be a positive number, got {_show(um_per_px)}")
    tips = entry.get("tips")
    if not isinstance(tips, list):
        raise DataError(f"{where}: 'tips' must be a list of [x, y]")
    for j, tip in enumerate(tips):
        if not (isinstance(tip, list) and len(tip) == 2 and all(finite_number(c) for c in tip)):
            raise DataError(f"{where}: tips[{j}] must be [x, y] with finite numbers, got {_show(tip)}")
    extra = {k: v for k, v in entry.items() if k not in ("file", "um_per_px", "tips")}
    return TipRecord(
        file=file,
        path=labels_path.parent / rel,
        um_per_px=float(um_per_px),
        tips_px=np.asarray(tips, dtype=np.float64).reshape(-1, 2),
        extra=extra,
    )


def load_image(record: TipRecord | str | Path) -> np.ndarray:
    """The image as an (h, w) uint8 or uint16 array; colour is converted to grey, and signed
    16-bit pixels (as ScanImage saves them) become uint16 with negative values set to 0.

    Raises DataError naming the file if it is missing, unreadable, or not 8/16-bit, or is a
    TIFF holding more than one image (several series, such as a thumbnail, or a page stack);
    for a ``TipRecord``, also if a labelled tip lies outside the image (a wrong label would
    count as a missed tip in every metric, or silently drop out of training).
    """
    image = _load_pixels(record.path if isinstance(record, TipRecord) else Path(record))
    if isinstance(record, TipRecord):
        check_tips_inside(record.tips_px, image.shape, f"{record.file}")
    return image


def check_tips_inside(tips_px: np.ndarray, shape_hw: tuple[int, ...], what: str) -> None:
    """DataError unless every tip (n, 2; x, y pixels, pixel-centre origin) lies inside an image
    of ``shape_hw``: -0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5."""
    tips = np.asarray(tips_px, float).reshape(-1, 2)
    h, w = int(shape_hw[0]), int(shape_hw[1])
    outside = (tips[:, 0] < -0.5) | (tips[:, 0] > w - 0.5) | (tips[:, 1] < -0.5) | (tips[:, 1] > h - 0.5)
    if outside.any():
        x, y = tips[int(np.argmax(outside))]
        raise DataError(f"{what}: tip ({x:.6g}, {y:.6g}) lies outside the {w}x{h} image "
                        "(pixel centres from (0, 0) to (w - 1, h - 1))")


def _load_pixels(path: Path) -> np.ndarray:
    """``load_image`` of a path."""
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    suffix = path.suffix.lower()
    image: Any
    try:
        if suffix in (".tif", ".tiff"):
            image = _read_tiff(path)
            colour_order = "rgb"
        else:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            colour_order = "bgr"
    except DataError:
        raise
    except Exception as exc:  # tifffile raises several types on corrupt files
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    if image is None:
        raise DataError(f"{path}: cannot read image (corrupt or unsupported format)")
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        code = {
            ("rgb", 3): cv2.COLOR_RGB2GRAY,
            ("rgb", 4): cv2.COLOR_RGBA2GRAY,
            ("bgr", 3): cv2.COLOR_BGR2GRAY,
            ("bgr", 4): cv2.COLOR_BGRA2GRAY,
        }[(colour_order, image.shape[2])]
        if image.dtype not in (np.uint8, np.uint16):  # before cvtColor, which would raise cv2.error
            raise DataError(f"{path}: expected 8- or 16-bit pixels, got colour {image.dtype}")
        image = cv2.cvtColor(np.ascontiguousarray(image), code)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2:
        raise DataError(f"{path}: expected a 2D greyscale or colour image, got shape {image.shape}")
    if image.dtype == np.int16:  # ScanImage TIFFs: signed, negative values are noise around 0
        image = np.maximum(image, 0).astype(np.uint16)
    if image.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: expected 8- or 16-bit pixels, got {image.dtype}")
    return np.ascontiguousarray(image)


def _read_tiff(path: Path) -> np.ndarray:
    """The TIFF's one image as (h, w) or (h, w, samples), whatever its planar configuration.
    DataError for a file with several series (a thumbnail beside the image, say) or a stack of
    pages: which one is the image is not ours to guess."""
    with tifffile.TiffFile(path) as tif:
        if len(tif.series) != 1:
            raise DataError(f"{path}: holds {len(tif.series)} image series (a thumbnail or several images); "
                            "expected a TIFF with one image")
        pages = tif.series[0].pages
        if len(pages) != 1:
            raise DataError(f"{path}: a stack of {len(pages)} pages; expected a TIFF with one image")
        page = pages[0]
        if not isinstance(page, tifffile.TiffPage):  # a series' first page is one; never seen otherwise
            raise DataError(f"{path}: unsupported TIFF layout")
        image = page.asarray()
        if page.samplesperpixel > 1 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
            image = np.moveaxis(image, 0, -1)  # (samples, h, w) -> (h, w, samples), as for contiguous
    return image


# --------------------------------------------------------------------------------------------
# writing


def write_image(path: str | Path, pixels: np.ndarray) -> None:
    """Write an (h, w) uint8/uint16 image as PNG or TIFF (by suffix), atomically."""
    path = Path(path)
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: can only write 2D uint8/uint16 images, got {pixels.dtype} {pixels.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    try:
        if suffix in (".tif", ".tiff"):
            os.close(fd)
            tifffile.imwrite(tmp, pixels)
        else:
            with os.fdopen(fd, "wb") as fh:
                if suffix != ".png":
                    raise DataError(f"{path}: images must be .png or .tif/.tiff")
                ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                if not ok:
                    raise DataError(f"{path}: PNG encoding failed")
                fh.write(buf.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_labels(
    directory: str | Path,
    records: Iterable[TipRecord | Mapping[str, Any]],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``DIR/labels.json`` atomically (temp file, fsync, rename). Records may be
    ``TipRecord`` or dicts with file/um_per_px/tips. Every entry is validated first, so a bad
    record changes nothing on disk."""
    root = Path(directory)
    labels_path = root / LABELS_NAME
    entries = []
    for index, record in enumerate(records):
        entry = record.to_json() if isinstance(record, TipRecord) else dict(record)
        if "tips" in entry:
            entry["tips"] = [[float(x), float(y)] for x, y in np.asarray(entry["tips"], float).reshape(-1, 2)]
        _parse_entry(labels_path, index, entry)
        entries.append(entry)
    doc: dict[str, Any] = {"format": FORMAT}
    if meta:
        doc.update({k: v for k, v in meta.items() if k not in ("format", "images")})
    # one image per line: readable, diff-friendly and compact
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items())
    body = ",\n".join(f"  {json.dumps(e, separators=(', ', ': '))}" for e in entries)
    text = "{\n" + head + ',\n "images": [\n' + body + ("\n ]\n}\n" if entries else " ]\n}\n")
    write_text_atomic(labels_path, text)
    return labels_path


def write_dataset(
    directory: str | Path,
    records: Iterable[tuple[str, np.ndarray, float, np.ndarray] | tuple[str, np.ndarray, float, np.ndarray, Mapping[str, Any]]],
    *,
    meta: Mapping[str, Any] | None = None,
) -> TipDataset:
    """Write images and labels: ``records`` are (file, pixels, um_per_px, tips_px[, extra]).

    Images are written first, labels.json last and atomically, so a dataset is either
    complete or has no labels file. Returns the dataset as read back.
    """
    root = Path(directory)
    entries = []
    for record in records:
        file, pixels, um_per_px, tips = record[:4]
        extra = dict(record[4]) if len(record) > 4 else {}  # type: ignore[misc]
        write_image(root / file, pixels)
        entry = {"file": file, "um_per_px": float(um_per_px), "tips": np.asarray(tips, float).reshape(-1, 2)}
        entry.update({k: v for k, v in extra.items() if k not in entry})
        entries.append(entry)
    write_labels(root, entries, meta=meta)
    return read_dataset(root)


# --------------------------------------------------------------------------------------------
# COCO keypoints import


def refuse_existing_dataset(out: Path) -> None:
    """Raise DataError unless ``out`` is absent or an empty directory (never overwrite)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not an empty directory (refusing to overwrite)")


@contextlib.contextmanager
def new_dataset_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` to write a whole dataset into; it is renamed
    to ``out`` when the block ends without error, and removed otherwise, so ``out`` never holds
    a partial dataset. ``out`` must be absent or empty."""
    refuse_existing_dataset(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise DataError(f"{out}: cannot create the dataset directory here ({exc.strerror or exc})") from None
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_coco(
    coco_json: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    um_per_px: float,
    *,
    keypoint_name: str | None = None,
    include_occluded: bool = False,
    coco_corner_origin: bool = True,
) -> TipDataset:
    """Import a COCO keypoints file (as CVAT and Label Studio export) into patchrig-tips/1.

    Each annotation is one pipette; its tip is the keypoint called ``keypoint_name`` (default:
    "tip" if the category names one, else the first keypoint). Keypoints with visibility 2 are
    kept (and 1, "labelled but occluded", with ``include_occluded``); 0 means not labelled.
    COCO measures from the top-left CORNER of the image (pixel centres at +0.5), so 0.5 is
    subtracted unless ``coco_corner_origin=False``. Images are converted to greyscale PNG in
    ``out_dir/images``; images without annotations are kept with no tips. ``out_dir`` must not
    exist or be empty (an existing dataset is never overwritten); the dataset is written into a
    temporary directory beside it and renamed into place when complete. Raises DataError naming
    the file on malformed input or missing images; nothing is written then.
    """
    coco_path = Path(coco_json)
    out = Path(out_dir)
    if not finite_number(um_per_px) or um_per_px <= 0:
        raise DataError(f"um_per_px must be a positive number, got {_show(um_per_px)}")
    refuse_existing_dataset(out)
    try:
        doc = json.loads(coco_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{coco_path}: COCO file is missing") from exc
    except ValueError as exc:  # bad JSON or UTF-8, or an integer of more than 4300 digits
        raise DataError(f"{coco_path}: invalid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{coco_path}: not a COCO file (no 'images' list)")
    annotations = doc.get("annotations", [])
    categories = doc.get("categories", [])
    if not isinstance(annotations, list) or not isinstance(categories, list):
        raise DataError(f"{coco_path}: 'annotations' and 'categories' must be lists")
    tip_index = _coco_tip_indices(coco_path, categories, keypoint_name)

    images: dict[Any, dict[str, Any]] = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{coco_path}: images[{i}] needs 'id' and 'file_name'")
        if not isinstance(im["id"], int | str) or isinstance(im["id"], bool):
            raise DataError(f"{coco_path}: images[{i}] 'id' must be an integer or a string, got {im['id']!r}")
        if im["id"] in images:
            raise DataError(f"{coco_path}: images[{i}] repeats the id {im['id']!r}: its tips would be merged")
        for key in ("width", "height"):
            value: Any = im.get(key)
            if key in im and not (finite_number(value) and float(value).is_integer() and value >= 1):
                raise DataError(f"{coco_path}: images[{i}] '{key}' must be a positive integer, got {value!r}")
        images[im["id"]] = im
    tips: dict[Any, list[list[float]]] = {k: [] for k in images}
    shift = 0.5 if coco_corner_origin else 0.0
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int | str) or ann["image_id"] not in images:
            raise DataError(f"{coco_path}: annotations[{i}] refers to no known image")
        kps = ann.get("keypoints")
        if kps is None:
            continue
        if not isinstance(kps, list) or len(kps) % 3 or not all(finite_number(v) for v in kps):
            raise DataError(f"{coco_path}: annotations[{i}]: 'keypoints' must be [x, y, v, ...]")
        category = ann.get("category_id")
        if category is not None and (not isinstance(category, int | str) or isinstance(category, bool)):
            raise DataError(f"{coco_path}: annotations[{i}]: 'category_id' must be an integer or a string")
        k = _tip_keypoint(coco_path, i, category, tip_index, keypoint_name)
        if 3 * k + 2 >= len(kps):
            raise DataError(f"{coco_path}: annotations[{i}]: no keypoint number {k}")
        x, y, v = kps[3 * k : 3 * k + 3]
        if v not in (0, 1, 2):
            raise DataError(f"{coco_path}: annotations[{i}]: keypoint visibility must be 0, 1 or 2, got {v!r}")
        if v == 2 or (v == 1 and include_occluded):
            tips[ann["image_id"]].append([float(x) - shift, float(y) - shift])

    src_root = Path(images_dir)
    loaded = []
    used: set[str] = set()
    for image_id, im in images.items():
        # the file as named, else by its base name (exports often keep the annotating machine's
        # folders); never through "../" or an absolute path (symbolic links inside --images,
        # say into raw storage, are followed)
        given = Path(im["file_name"])
        named = None if given.is_absolute() or ".." in given.parts else src_root / given
        found = [p for p in (named, src_root / given.name) if p is not None and p.is_file()]
        if not found:
            raise DataError(f"{im['file_name']}: image named in {coco_path} is missing from {src_root}")
        src = found[0]
        pixels = load_image(src)
        h, w = pixels.shape
        if ("width" in im and im["width"] != w) or ("height" in im and im["height"] != h):
            raise DataError(
                f"{src}: size {w}x{h} does not match {coco_path} ({im.get('width')}x{im.get('height')})"
            )
        check_tips_inside(np.asarray(tips[image_id], float), pixels.shape, f"{coco_path}: image {im['file_name']}")
        stem = Path(im["file_name"]).stem
        name = f"images/{stem}.png"
        n = 1
        while name in used:
            name = f"images/{stem}_{n}.png"
            n += 1
        used.add(name)
        extra = {"source": str(im["file_name"]), "coco_id": image_id}
        loaded.append((name, pixels, float(um_per_px), np.asarray(tips[image_id], float), extra))
    with new_dataset_directory(out) as tmp:
        write_dataset(tmp, loaded, meta={"imported_from": str(coco_path)})
    return read_dataset(out)


def _tip_keypoint(coco_path: Path, i: int, category: Any, tip_index: dict[Any, int], keypoint_name: str | None) -> int:
    """Which keypoint of annotation ``i`` is its tip. An unknown category is refused, and a
    missing one is allowed only when there is one category: guessing would take another
    keypoint (a shank point, say) for the tip."""
    if category is None:
        if len(tip_index) == 1:
            return next(iter(tip_index.values()))
        if not tip_index and keypoint_name is None:
            return 0  # no categories at all: the first keypoint, as documented
        raise DataError(f"{coco_path}: annotations[{i}] has no 'category_id', and the file has "
                        f"{len(tip_index)} categories: which keypoint is the tip is unknown")
    if category not in tip_index:
        raise DataError(f"{coco_path}: annotations[{i}]: category_id {category!r} is not among the file's categories")
    return tip_index[category]


def _coco_tip_indices(
    coco_path: Path, categories: list[Any], keypoint_name: str | None
) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for cat in categories:
        if not isinstance(cat, dict):
            raise DataError(f"{coco_path}: categories must be objects")
        names = cat.get("keypoints") or []
        if keypoint_name is not None:
            if keypoint_name not in names:
                raise DataError(f"{coco_path}: category {cat.get('name')!r} has no keypoint {keypoint_name!r}")
            out[cat.get("id")] = names.index(keypoint_name)
        else:
            out[cat.get("id")] = names.index("tip") if "tip" in names else 0
    return out
