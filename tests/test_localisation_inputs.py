"""Bad input to the localiser's tools is refused clearly and changes nothing: the weight soup's
output directory, the patchrig-tips/1 reader and COCO importer (duplicate files, numbers too
large for a float, TIFF layouts) and ``patchrig bench localiser``'s options."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from support_cli import one_line_error

from localisation.checkpoint import save_checkpoint
from localisation.configs import build_model, get_config
from localisation.dataset_format import import_coco, load_image, read_dataset, write_dataset
from localisation.soup import main as soup_main
from rig.cli import main as cli_main
from rig.errors import DataError

HUGE = 10**400  # json.dumps writes it as 1 followed by 400 zeros; too large for a float


def _ingredient(path: Path) -> Path:
    cfg = get_config("fast-tiny")
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg).eval(), cfg)
    return path


# --------------------------------------------------------------------------------------------
# localisation.soup


def test_soup_out_through_a_file_is_one_line_and_leaves_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _ingredient(tmp_path / "a.pt")
    afile = tmp_path / "afile.png"
    afile.write_bytes(b"not a directory")
    for out in (afile, afile / "x"):
        assert soup_main([str(a), "--out", str(out)]) != 0
        line = one_line_error(capsys)
        assert f"{afile} is not a directory" in line
    assert afile.read_bytes() == b"not a directory"


# --------------------------------------------------------------------------------------------
# patchrig-tips/1 reader


def _dataset_with_labels(tmp_path: Path, entries: list[dict[str, object]]) -> Path:
    """A dataset whose one real image is images/000000.png, with labels.json holding ``entries``."""
    root = tmp_path / "ds"
    write_dataset(root, [("images/000000.png", np.zeros((8, 8), np.uint8), 0.5, [])])
    (root / "labels.json").write_text(json.dumps({"format": "patchrig-tips/1", "images": entries}))
    return root


@pytest.mark.parametrize("alias", ["./images/000000.png", "images//000000.png", "images/./000000.png"])
def test_one_file_named_two_ways_is_a_duplicate(tmp_path: Path, alias: str) -> None:
    entry = {"file": "images/000000.png", "um_per_px": 0.5, "tips": []}
    root = _dataset_with_labels(tmp_path, [entry, {**entry, "file": alias}])
    with pytest.raises(DataError, match=r"labels\.json: images\[1\]: duplicate file .*same file as images\[0\]"):
        read_dataset(root)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"um_per_px": HUGE, "tips": []}, "'um_per_px' must be a positive number"),
        ({"um_per_px": 0.5, "tips": [[HUGE, 3]]}, r"tips\[0\] must be \[x, y\] with finite numbers"),
        ({"um_per_px": 0.5, "tips": [[3, -HUGE]]}, r"tips\[0\] must be \[x, y\] with finite numbers"),
    ],
)
def test_numbers_too_large_for_a_float_are_data_errors(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    root = _dataset_with_labels(tmp_path, [{"file": "images/000000.png", **entry}])
    with pytest.raises(DataError, match=r"labels\.json: images\[0\] \(images/000000\.png\): " + message) as info:
        read_dataset(root)
    assert len(str(info.value)) < 300  # the 401-digit number is cut short


def test_coco_keypoint_too_large_for_a_float_is_a_data_error(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((8, 8), np.uint8))
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "category_id": 1, "keypoints": [HUGE, 2, 2]}],
        "categories": [{"id": 1, "name": "pipette", "keypoints": ["tip"]}],
    }))
    with pytest.raises(DataError, match=r"coco\.json: annotations\[0\]: 'keypoints'"):
        import_coco(coco, images, tmp_path / "out", um_per_px=0.5)
    assert not (tmp_path / "out").exists()


def test_planar_rgb_tiff_is_converted_to_grey_like_contiguous(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (3, 12, 10), dtype=np.uint8)  # (samples, h, w)
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    grey = load_image(tmp_path / "planar.tif")
    expected = cv2.cvtColor(np.ascontiguousarray(np.moveaxis(rgb, 0, -1)), cv2.COLOR_RGB2GRAY)
    assert grey.shape == (12, 10)
    assert np.array_equal(grey, expected)


def test_tiff_with_a_thumbnail_series_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "thumb.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.zeros((4, 4), np.uint8))  # a thumbnail first: the old reader returned it
        tw.write(np.full((16, 16), 7, np.uint8))
    with pytest.raises(DataError, match=r"thumb\.tif: holds 2 image series"):
        load_image(path)


def test_stack_of_narrow_pages_is_refused_not_read_as_colour(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 40, 3), np.uint8), photometric="minisblack")  # 5 pages of 40x3
    with pytest.raises(DataError, match=r"stack\.tif: a stack of 5 pages"):
        load_image(path)


# --------------------------------------------------------------------------------------------
# patchrig bench localiser

BENCH = ["bench", "localiser", "--config", "fast-tiny", "--iters", "1", "--batch-iters", "1", "--warmup", "0",
         "--threads", "1", "--size", "32"]


def test_bench_refuses_unknown_or_missing_devices_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bench.json"
    for devices, message in (("foo", "--devices must be all, cpu, cuda or cuda:N, got 'foo'"),
                             ("cuda:99", "--devices cuda:99: no such CUDA GPU")):
        assert cli_main([*BENCH, "--devices", devices, "--out", str(out)]) == 1
        assert message in one_line_error(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    assert cli_main([*BENCH, "--devices", "cuda", "--out", str(out)]) == 1
    assert "--devices cuda: no such CUDA GPU" in one_line_error(capsys)
    assert not out.exists()
    assert cli_main([*BENCH, "--devices", "cpu", "--out", str(out)]) == 0  # a usable device still runs
    (row,) = json.loads(out.read_text())["results"]
    assert row["device"] == "CPU (1 threads)"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--iters", "0"], "--iters must be at least 1, got 0"),
        (["--batch-iters", "0"], "--batch-iters must be at least 1, got 0"),
        (["--batch-iters", "-3"], "--batch-iters must be at least 1, got -3"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--size", "8"], "--size must be at least 32, got 8"),
    ],
)
def test_bench_refuses_counts_below_one_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    out = tmp_path / "bench.json"
    assert cli_main([*BENCH, "--devices", "cpu", *option, "--out", str(out)]) == 1
    assert message in one_line_error(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# outputs that would overwrite the dataset they read


def _small_dataset(root: Path) -> Path:
    from simulators.synth import sample_example

    ex = sample_example(7, n_tips=(1, 2), size_px=64)
    write_dataset(root, [("images/000000.png", ex.pixels, ex.um_per_px, ex.tips_px)])
    return root


@pytest.mark.parametrize("target", ["labels.json", "images/000000.png"])
def test_evaluate_and_show_refuse_to_write_over_their_dataset(tmp_path: Path, target: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate --out D/labels.json` replaced the labels with its results and `data show
    --out D/images/x.png` replaced an image with the contact sheet."""
    data = _small_dataset(tmp_path / "ds")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    out = data / target
    if target.endswith(".json"):
        args = ["evaluate", "--data", str(data), "--out", str(out), "--no-figures", "--no-progress"]
    else:
        args = ["data", "show", str(data), "--out", str(out)]
    assert cli_main(args) == 1
    assert "part of the dataset" in one_line_error(capsys)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_data_show_skips_hand_edited_hidden_tips_without_coordinates(tmp_path: Path) -> None:
    data = _small_dataset(tmp_path / "ds")
    labels = json.loads((data / "labels.json").read_text())
    labels["images"][0]["all_tips"] = [{"visible": False}, {"visible": False, "x": 3.0, "y": "4"}]
    (data / "labels.json").write_text(json.dumps(labels))
    assert cli_main(["data", "show", str(data), "--out", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").is_file()


def _coco(tmp_path: Path, annotation: dict, categories: list[dict]) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    cv2.imwrite(str(images / "a.png"), np.zeros((128, 128), np.uint8))
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"image_id": 1, **annotation}], "categories": categories}))
    return coco, images


SHANK_TIP = [{"id": 1, "name": "pipette", "keypoints": ["shank", "tip"]}]
TWO_KINDS = [*SHANK_TIP, {"id": 5, "name": "other", "keypoints": ["tip"]}]


@pytest.mark.parametrize(("annotation", "categories", "message"), [
    ({"category_id": 2, "keypoints": [110, 110, 2, 20, 20, 2]}, SHANK_TIP, "category_id 2 is not among"),
    ({"keypoints": [110, 110, 2, 20, 20, 2]}, TWO_KINDS, "no 'category_id'"),
    ({"category_id": 1, "keypoints": [110, 110, 2, 20, 20, 5]}, SHANK_TIP, "visibility must be 0, 1 or 2"),
    ({"category_id": 1, "keypoints": [110, 110, 2, 500, -30, 2]}, SHANK_TIP, r"tip \(499.5, -30.5\) lies outside"),
])
def test_coco_annotations_that_cannot_be_read_safely_are_refused(tmp_path: Path, annotation: dict,
                                                                 categories: list, message: str) -> None:
    """An unknown or missing category made the import take the first keypoint (a shank point)
    for the tip, even with --keypoint tip; odd visibilities were dropped and tips outside the
    image kept, silently."""
    coco, images = _coco(tmp_path, annotation, categories)
    with pytest.raises(DataError, match=message):
        import_coco(coco, images, tmp_path / "out", um_per_px=0.5, keypoint_name="tip")
    assert not (tmp_path / "out").exists()


def test_coco_without_a_category_id_uses_the_one_category(tmp_path: Path) -> None:
    coco, images = _coco(tmp_path, {"keypoints": [110, 110, 2, 20, 20, 2]}, SHANK_TIP)
    dataset = import_coco(coco, images, tmp_path / "out", um_per_px=0.5, keypoint_name="tip")
    np.testing.assert_allclose(dataset.records[0].tips_px, [[19.5, 19.5]])


def test_a_labelled_tip_outside_its_image_is_an_error_naming_the_file(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = _small_dataset(tmp_path / "ds")
    labels = json.loads((data / "labels.json").read_text())
    labels["images"][0]["tips"].append([-500.0, 9999.0])
    (data / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(DataError, match=r"images/000000.png: tip \(-500, 9999\) lies outside the 64x64 image"):
        load_image(read_dataset(data).records[0])
    assert cli_main(["evaluate", "--data", str(data), "--out", str(tmp_path / "e.json"), "--no-figures",
                     "--no-progress"]) == 1
    assert "lies outside" in one_line_error(capsys) and not (tmp_path / "e.json").exists()


# --------------------------------------------------------------------------------------------
# one clear line


def test_bad_options_and_files_are_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each of these printed several lines (tifffile's own log lines, torch's device list) or a
    message that did not name the option."""
    data = _small_dataset(tmp_path / "ds")
    assert cli_main(["locate", str(data), "--out", str(tmp_path / "p.json"), "--device", "bogus"]) == 1
    assert "device must be auto, cpu, cuda or cuda:N, got 'bogus'" in one_line_error(capsys)
    assert cli_main(["locate", str(data), "--out", str(tmp_path / "p.json"), "--device", "cuda:7"]) == 1
    assert "no such CUDA GPU" in one_line_error(capsys)
    truncated = tmp_path / "cut.tif"
    tifffile.imwrite(truncated, np.zeros((64, 64), np.uint16))
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert cli_main(["locate", str(truncated), "--um-per-px", "0.5", "--out", str(tmp_path / "p.json"),
                     "--no-progress"]) == 1
    assert "cut.tif" in one_line_error(capsys)
    for option, value, words in (("--seed", "-1", "--seed must be a non-negative integer"),
                                 ("--um-per-px", "0.5-inf", "--um-per-px must be 0 < MIN <= MAX <= 10")):
        assert cli_main(["data", "synth", "--out", str(tmp_path / "s"), "--n", "1", option, value]) == 1
        assert words in one_line_error(capsys)
    assert not (tmp_path / "s").exists() and not (tmp_path / "p.json").exists()
