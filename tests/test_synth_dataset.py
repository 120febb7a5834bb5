"""patchrig-tips/1 datasets: `patchrig data synth|show|import-coco`, strict readers, atomic
writers, COCO keypoint import."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from support_cli import one_line_error

from localisation.dataset_format import (
    TipRecord,
    import_coco,
    load_image,
    read_dataset,
    write_dataset,
    write_labels,
)
from rig.cli import main
from rig.errors import DataError
from simulators.synth import synthesise_dataset


def test_cli_synth_writes_a_complete_dataset_and_show_draws_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    rc = main(["data", "synth", "--out", str(out), "--n", "6", "--seed", "3", "--tips", "1-3", "--size", "128", "--workers", "2"])
    assert rc == 0
    assert "wrote 6 images" in capsys.readouterr().out
    ds = read_dataset(out)
    assert len(ds) == 6 and ds.meta["seed"] == 3 and ds.meta["domain"] == "in_vivo"
    for record in ds:
        image = load_image(record)
        assert image.shape == (128, 128) and image.dtype in (np.uint8, np.uint16)
        assert 1 <= len(record.extra["all_tips"]) <= 3
        assert len(record.tips_px) == sum(t["visible"] for t in record.extra["all_tips"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    sheet_path = tmp_path / "sheet.png"
    assert main(["data", "show", str(out), "--out", str(sheet_path), "--cols", "3", "--tile", "128"]) == 0
    sheet = cv2.imread(str(sheet_path))
    assert sheet.shape[:2] == (2 * (128 + 18), 3 * 128)
    # red label circles are drawn where the labels are
    record = next(r for r in ds if len(r.tips_px))
    i = ds.records.index(record)
    r, c = divmod(i, 3)
    x, y = record.tips_px[0]
    tile = sheet[r * 146 : r * 146 + 128, c * 128 : c * 128 + 128].astype(int)
    red = (tile[:, :, 2] > 200) & (tile[:, :, 1] < 80) & (tile[:, :, 0] < 80)
    ys, xs = np.nonzero(red)
    assert np.any(np.hypot(xs - x, ys - y) < 9)


def test_synth_is_deterministic_whatever_the_number_of_workers(tmp_path: Path) -> None:
    a = synthesise_dataset(tmp_path / "a", 5, seed=9, size_px=96, workers=1, progress=False)
    b = synthesise_dataset(tmp_path / "b", 5, seed=9, size_px=96, workers=2, progress=False)
    for ra, rb in zip(a, b, strict=True):
        assert ra.file == rb.file and np.array_equal(ra.tips_px, rb.tips_px)
        assert np.array_equal(load_image(ra), load_image(rb))


def test_frame_averaging_keeps_the_scenes_and_reveals_faint_tips(tmp_path: Path) -> None:
    """--frames-averaged K: the same seed gives the same scenes (pixel sizes, pipettes), less
    noise, and every tip visible in one frame stays visible (its contrast-to-noise ratio only
    grows); K is recorded in the dataset's meta."""
    one = synthesise_dataset(tmp_path / "one", 8, seed=5, size_px=256, workers=1, progress=False)
    avg = synthesise_dataset(tmp_path / "avg", 8, seed=5, size_px=256, workers=1, frames_averaged=8, progress=False)
    assert "frames_averaged" not in one.meta or one.meta["frames_averaged"] == 1
    assert avg.meta["frames_averaged"] == 8
    gained = 0
    for r1, r8 in zip(one, avg, strict=True):
        assert r1.um_per_px == r8.um_per_px
        tips8 = np.asarray(r8.tips_px).reshape(-1, 2)
        for tip in np.asarray(r1.tips_px).reshape(-1, 2):
            assert np.abs(tips8 - tip).max(axis=1).min() < 1e-3
        cnr1 = {(round(t["x"], 2), round(t["y"], 2)): t["cnr"] for t in r1.extra["all_tips"] if t["cnr"] is not None}
        for t in r8.extra["all_tips"]:
            if t["cnr"] is not None:
                assert t["cnr"] >= cnr1[(round(t["x"], 2), round(t["y"], 2))]
                gained += t["cnr"] > cnr1[(round(t["x"], 2), round(t["y"], 2))]
        # less noise: the frame is closer to its own smoothed self
        pix1, pix8 = (load_image(r).astype(np.float64) for r in (r1, r8))
        rough1 = np.abs(pix1 - cv2.blur(pix1, (3, 3))).mean() / max(pix1.mean(), 1.0)
        rough8 = np.abs(pix8 - cv2.blur(pix8, (3, 3))).mean() / max(pix8.mean(), 1.0)
        assert rough8 < rough1
    assert gained > 0
    with pytest.raises(DataError, match="frames averaged"):
        synthesise_dataset(tmp_path / "bad", 2, seed=5, size_px=64, workers=1, frames_averaged=0, progress=False)
    assert not (tmp_path / "bad").exists()


def test_synth_ex_vivo_and_refuses_to_overwrite(tmp_path: Path) -> None:
    ds = synthesise_dataset(tmp_path / "ex", 4, seed=1, domain="ex_vivo", size_px=96, workers=1, progress=False)
    assert all(len(r.extra["all_tips"]) == 1 and r.extra["domain"] == "ex_vivo" for r in ds)
    with pytest.raises(DataError, match="refusing to overwrite"):
        synthesise_dataset(tmp_path / "ex", 2, seed=1, size_px=96, workers=1, progress=False)
    assert main(["data", "synth", "--out", str(tmp_path / "ex"), "--n", "2"]) == 1
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--n", "2", "--tips", "4-2"]) == 1
    assert not (tmp_path / "bad").exists()


def _write_valid(tmp_path: Path) -> Path:
    root = tmp_path / "valid"
    write_dataset(
        root,
        [
            ("images/a.png", np.full((16, 20), 7, np.uint8), 0.5, [[1.0, 2.5]]),
            ("images/b.tif", np.full((16, 20), 700, np.uint16), 0.5, [], {"note": "kept"}),
        ],
    )
    return root


def test_roundtrip_keeps_bit_depth_tips_and_extra_keys(tmp_path: Path) -> None:
    ds = read_dataset(_write_valid(tmp_path))
    a, b = ds.records
    assert load_image(a).dtype == np.uint8 and load_image(b).dtype == np.uint16
    assert load_image(b)[0, 0] == 700
    assert a.tips_px.shape == (1, 2) and b.tips_px.shape == (0, 2)
    assert b.extra == {"note": "kept"}


@pytest.mark.parametrize(
    "labels, message",
    [
        ("{not json", "invalid JSON"),
        ('{"format": "other/1", "images": []}', "format must be"),
        ('{"format": "patchrig-tips/1"}', "'images' must be a list"),
        ('{"format": "patchrig-tips/1", "images": [{"file": "images/a.png", "tips": []}]}', "um_per_px"),
        ('{"format": "patchrig-tips/1", "images": [{"file": "images/a.png", "um_per_px": 0.5, "tips": [[1]]}]}', r"tips\[0\]"),
        ('{"format": "patchrig-tips/1", "images": [{"file": "images/a.png", "um_per_px": 0.5, "tips": [[1, NaN]]}]}', "finite"),
        ('{"format": "patchrig-tips/1", "images": [{"file": "../a.png", "um_per_px": 0.5, "tips": []}]}', "inside the dataset"),
        ('{"format": "patchrig-tips/1", "images": [{"file": "images/a.jpg", "um_per_px": 0.5, "tips": []}]}', "PNG or TIFF"),
        ('{"format": "patchrig-tips/1", "images": [{"file": "images/a.png", "um_per_px": -1, "tips": []}]}', "positive"),
    ],
)
def test_reader_rejects_malformed_labels_naming_the_file(tmp_path: Path, labels: str, message: str) -> None:
    root = _write_valid(tmp_path)
    (root / "labels.json").write_text(labels)
    with pytest.raises(DataError, match=message) as err:
        read_dataset(root)
    assert "labels.json" in str(err.value)


def test_reader_rejects_a_missing_image_naming_it(tmp_path: Path) -> None:
    root = _write_valid(tmp_path)
    (root / "images" / "b.tif").unlink()
    with pytest.raises(DataError, match=r"b\.tif.*missing"):
        read_dataset(root)
    with pytest.raises(DataError, match="no labels file"):
        read_dataset(tmp_path / "nowhere")


def test_load_image_converts_colour_and_rejects_corrupt_files(tmp_path: Path) -> None:
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 2] = 200  # red in BGR
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    grey = load_image(tmp_path / "c.png")
    assert grey.shape == (8, 8) and 55 <= grey[0, 0] <= 65  # 0.299 * 200
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([np.full((8, 8), 200, np.uint8)] + [np.zeros((8, 8), np.uint8)] * 2))
    assert 55 <= load_image(tmp_path / "rgb.tif")[0, 0] <= 65  # TIFF is RGB, not BGR
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_image(tmp_path / "broken.png")
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match="8- or 16-bit"):
        load_image(tmp_path / "f.tif")


def test_write_labels_is_atomic_and_validates_first(tmp_path: Path) -> None:
    root = _write_valid(tmp_path)
    before = (root / "labels.json").read_text()
    bad = [TipRecord("images/a.png", root / "images/a.png", 0.5, np.array([[1.0, float("nan")]]))]
    with pytest.raises(DataError, match="finite"):
        write_labels(root, bad)
    assert (root / "labels.json").read_text() == before
    assert sorted(p.name for p in root.iterdir()) == ["images", "labels.json"]


def _coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "coco_images"
    images.mkdir()
    cv2.imwrite(str(images / "one.png"), np.full((20, 30, 3), 90, np.uint8))
    cv2.imwrite(str(images / "two.png"), np.full((20, 30), 40, np.uint8))
    doc = {
        "images": [
            {"id": 1, "file_name": "one.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "sub/two.png", "width": 30, "height": 20},
        ],
        "categories": [{"id": 7, "name": "pipette", "keypoints": ["shank", "tip"]}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "keypoints": [0, 0, 2, 10.5, 5.5, 2]},
            {"id": 2, "image_id": 1, "category_id": 7, "keypoints": [0, 0, 2, 20.0, 8.0, 1]},
            {"id": 3, "image_id": 1, "category_id": 7, "keypoints": [0, 0, 2, 0, 0, 0]},
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(doc))
    return path, images


def test_coco_import_shifts_to_pixel_centres_and_keeps_visible_tips(tmp_path: Path) -> None:
    coco, images = _coco(tmp_path)
    ds = import_coco(coco, images, tmp_path / "imported", um_per_px=0.7)
    assert [r.file for r in ds] == ["images/one.png", "images/two.png"]
    one, two = ds.records
    assert one.tips_px.tolist() == [[10.0, 5.0]]  # corner origin -> centre origin, v=1 and v=0 dropped
    assert two.tips_px.shape == (0, 2) and two.um_per_px == 0.7
    assert load_image(one).ndim == 2
    ds2 = import_coco(coco, images, tmp_path / "occluded", um_per_px=0.7, include_occluded=True, coco_corner_origin=False)
    assert ds2.records[0].tips_px.tolist() == [[10.5, 5.5], [20.0, 8.0]]
    rc = main(["data", "import-coco", str(coco), "--images", str(images), "--out", str(tmp_path / "cli"), "--um-per-px", "0.7"])
    assert rc == 0 and len(read_dataset(tmp_path / "cli")) == 2


def test_coco_import_rejects_missing_or_mismatched_images(tmp_path: Path) -> None:
    coco, images = _coco(tmp_path)
    (images / "two.png").unlink()
    with pytest.raises(DataError, match=r"two\.png.*missing"):
        import_coco(coco, images, tmp_path / "x", um_per_px=0.7)
    cv2.imwrite(str(images / "two.png"), np.zeros((21, 30), np.uint8))
    with pytest.raises(DataError, match="does not match"):
        import_coco(coco, images, tmp_path / "y", um_per_px=0.7)
    assert not (tmp_path / "y" / "labels.json").exists()
    with pytest.raises(DataError, match="no keypoint 'apex'"):
        import_coco(coco, images, tmp_path / "z", um_per_px=0.7, keypoint_name="apex")


def test_coco_import_rejects_repeated_and_malformed_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco, images = _coco(tmp_path)
    doc = json.loads(coco.read_text())
    doc["images"][1]["id"] = doc["images"][0]["id"]  # two images, one id: their tips would merge
    coco.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="repeats the id"):
        import_coco(coco, images, tmp_path / "x", um_per_px=0.7)
    doc["images"][1]["id"] = [7]  # not an id at all
    coco.write_text(json.dumps(doc))
    assert main(["data", "import-coco", str(coco), "--images", str(images), "--out", str(tmp_path / "y"),
                 "--um-per-px", "0.7"]) == 1
    assert "'id' must be an integer or a string" in one_line_error(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_coco_import_never_overwrites_an_existing_dataset(tmp_path: Path) -> None:
    coco, images = _coco(tmp_path)
    out = tmp_path / "imported"
    import_coco(coco, images, out, um_per_px=0.7)
    before = (out / "labels.json").read_bytes()
    with pytest.raises(DataError, match="refusing to overwrite"):
        import_coco(coco, images, out, um_per_px=0.5)
    assert (out / "labels.json").read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(import_coco(coco, images, empty, um_per_px=0.7)) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["synth", "--n", "2", "--workers", "0"], "--workers must be at least 1"),
        (["synth", "--n", "2", "--tips", "0-1000"], "MAX <= 32"),
        (["synth", "--n", "0"], "--n must be at least 1"),
        (["synth", "--n", "2", "--frames-averaged", "0"], "--frames-averaged must be at least 1"),
        (["synth", "--n", "2", "--um-per-px", "nan-1"], "--um-per-px must be"),
        (["show", "DATASET", "--max", "0"], "--max must be at least 1"),
        (["show", "DATASET", "--cols", "0"], "--cols must be at least 1"),
        (["show", "DATASET", "--tile", "-1"], "--tile must be 32..2048"),
        (["show", "NO_SUCH_DIR"], "no labels file"),
        (["figure", "--rows", "1"], "--rows must be at least 2"),
        (["figure", "--tile", "0"], "--tile must be 32..2048"),
        (["show", "DATASET", "--out", "SHEET_NO_SUFFIX"], "--out must end in .png"),
        (["figure", "--out", "SHEET_NO_SUFFIX"], "--out must end in .png"),
    ],
)
def test_cli_data_bad_numbers_and_paths_are_one_line_errors_that_write_nothing(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = tmp_path / "ds"
    write_dataset(dataset, [("images/a.png", np.zeros((40, 40), np.uint8), 0.5, np.zeros((0, 2)))])
    out = tmp_path / "out.png" if argv[0] != "synth" else tmp_path / "new"
    if "SHEET_NO_SUFFIX" in argv:
        out = tmp_path / "sheet"
        argv = argv[: argv.index("--out")]
    argv = [str(dataset) if a == "DATASET" else str(tmp_path / "missing") if a == "NO_SUCH_DIR" else a for a in argv]
    assert main(["data", *argv, "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert message in err, err
    assert not out.exists()


def test_an_unwritable_output_place_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["data", "synth", "--out", str(blocker / "ds"), "--n", "2", "--size", "64"]) == 1
    err = one_line_error(capsys)
    assert "cannot create the dataset directory" in err and str(blocker / "ds") in err


def test_coco_import_never_reads_outside_the_images_folder_and_checks_types(tmp_path: Path) -> None:
    coco, images = _coco(tmp_path)
    secret = tmp_path / "secret.png"  # beside the images folder, not in it
    cv2.imwrite(str(secret), np.full((20, 30), 200, np.uint8))
    doc = json.loads(coco.read_text())
    doc["images"][1]["file_name"] = "../secret.png"
    coco.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="missing"):
        import_coco(coco, images, tmp_path / "a", um_per_px=0.7)
    doc["images"][1]["file_name"] = str(secret)  # absolute: only its base name is looked up, in --images
    coco.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="missing"):
        import_coco(coco, images, tmp_path / "b", um_per_px=0.7)
    doc["images"][1]["file_name"] = "two.png"
    doc["images"][1]["width"] = "30"
    coco.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="'width' must be a positive integer"):
        import_coco(coco, images, tmp_path / "c", um_per_px=0.7)
    doc["images"][1]["width"] = 30
    doc["annotations"][0]["category_id"] = [7]
    coco.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="'category_id' must be"):
        import_coco(coco, images, tmp_path / "d", um_per_px=0.7)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_coco_import_follows_symlinks_inside_the_images_folder_and_takes_integral_float_sizes(tmp_path: Path) -> None:
    coco, images = _coco(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    (images / "two.png").rename(raw / "two.png")
    (images / "two.png").symlink_to(raw / "two.png")  # a folder of links into raw storage
    doc = json.loads(coco.read_text())
    doc["images"][0]["width"], doc["images"][0]["height"] = 30.0, 20.0  # some tools write floats
    coco.write_text(json.dumps(doc))
    assert len(import_coco(coco, images, tmp_path / "ok", um_per_px=0.7)) == 2
