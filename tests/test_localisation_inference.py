"""The shipped localiser: loads, finds tips, maps coordinates back to the input's pixels at any
size and pixel size, is deterministic, and refuses bad input and wrong checkpoints."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from localisation.checkpoint import DEFAULT_CHECKPOINT, read_checkpoint, save_checkpoint
from localisation.configs import build_model, get_config
from localisation.inference import TipLocaliser
from localisation.metrics import MetricsAccumulator
from localisation.types import TipDetection
from rig.errors import DataError
from simulators.synth import sample_example

torch.set_num_threads(1)

# frames the model never saw (training seeds start at 10_000_000, validation at 20_000_000)
TEST_SEEDS = range(30_000_000, 30_000_012)


@pytest.fixture(scope="module")
def localiser() -> TipLocaliser:
    return TipLocaliser.load(threads=1, device="cpu")


@pytest.fixture(scope="module")
def frames() -> list:
    return [sample_example(s, n_tips=(1, 4)) for s in TEST_SEEDS]


def test_shipped_checkpoint_is_small_and_named() -> None:
    assert DEFAULT_CHECKPOINT.is_file()
    assert DEFAULT_CHECKPOINT.stat().st_size < 50 * 1024 * 1024
    payload = read_checkpoint(DEFAULT_CHECKPOINT, expect_config="fast")
    assert payload["config"]["n_max"] >= 6


def test_finds_tips_on_fresh_synthetic_frames(localiser: TipLocaliser, frames: list) -> None:
    """Loose bounds on 12 frames, set below what the shipped model measured on them (stop 16's
    cascade at its threshold 0.75: 16 of 20 tips found with 19 detections, 0.93 µm mean
    error). The full evaluation on 500 frames is in localisation/checkpoints/fast.json; it does
    NOT meet the issue's 95 % / 99 % accuracy targets (see docs/readme/localiser.md)."""
    acc = MetricsAccumulator()
    for ex in frames:
        dets = localiser.locate(ex.pixels, ex.um_per_px)
        assert all(isinstance(d, TipDetection) and 0.0 <= d.score <= 1.0 for d in dets)
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        acc.add(np.array([[d.x_px, d.y_px] for d in dets]).reshape(-1, 2), ex.tips_px, ex.um_per_px)
    o = acc.summary()["overall"]
    assert o["matched_tips"] >= 12, o
    assert o["precision"] >= 0.8, o
    assert o["mean_error_um"] < 2.0, o


def test_lower_threshold_trades_precision_for_recall(frames: list) -> None:
    """At threshold 0.4 the same model found 18 of the 20 tips (22 detections, 82 % precision)."""
    loose = TipLocaliser.load(threads=1, device="cpu", score_threshold=0.4)
    acc = MetricsAccumulator()
    for ex in frames:
        dets = loose.locate(ex.pixels, ex.um_per_px)
        acc.add(np.array([[d.x_px, d.y_px] for d in dets]).reshape(-1, 2), ex.tips_px, ex.um_per_px)
    o = acc.summary()["overall"]
    assert o["recall"] >= 0.8, o
    assert o["precision"] >= 0.7, o


@pytest.fixture(scope="module")
def permissive() -> TipLocaliser:
    """The shipped model with a low threshold: what a strong detection must still produce
    after resampling or cropping."""
    return TipLocaliser.load(threads=1, device="cpu", score_threshold=0.1)


def _strong_detections(frames: list, localiser: TipLocaliser):  # noqa: ANN202
    for ex in frames:
        dets = [d for d in localiser.locate(ex.pixels, ex.um_per_px) if d.score >= 0.6]
        if dets:
            return ex, np.array([[d.x_px, d.y_px] for d in dets])
    raise AssertionError("no frame with a confident detection")


def _nearest_um(points: list[TipDetection], p: np.ndarray, um_per_px: float) -> float:
    got = np.array([[d.x_px, d.y_px] for d in points]).reshape(-1, 2)
    return float(np.min(np.linalg.norm(got - p, axis=1)) * um_per_px) if len(got) else np.inf


def test_resampled_input_gives_input_pixel_coordinates(
    localiser: TipLocaliser, permissive: TipLocaliser, frames: list
) -> None:
    ex, base = _strong_detections(frames, localiser)
    # the same field of view at twice the pixel density: coordinates double (pixel-centre origin)
    big = cv2.resize(ex.pixels, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_LINEAR)
    dets2 = permissive.locate(big, ex.um_per_px / 2.0)
    for p in base:
        assert _nearest_um(dets2, (p + 0.5) * 2.0 - 0.5, ex.um_per_px / 2.0) < 3.0
    # a crop: coordinates are in the crop's own pixels
    x0, y0 = 37, 21
    dets3 = permissive.locate(ex.pixels[y0:, x0:], ex.um_per_px)
    for p in base[(base[:, 0] > x0 + 40) & (base[:, 1] > y0 + 40)]:
        assert _nearest_um(dets3, p - [x0, y0], ex.um_per_px) < 3.0


def test_accepts_uint8_uint16_float_and_colour(localiser: TipLocaliser, frames: list) -> None:
    ex = frames[0]
    f = ex.pixels.astype(np.float64)
    for pixels in (ex.pixels, f, np.repeat(f[..., None], 3, axis=2)):
        dets = localiser.locate(pixels, ex.um_per_px)
        assert isinstance(dets, list)


def test_deterministic(localiser: TipLocaliser, frames: list) -> None:
    ex = frames[1]
    a = localiser.locate(ex.pixels, ex.um_per_px)
    b = localiser.locate(ex.pixels.copy(), ex.um_per_px)
    other = TipLocaliser.load(threads=1, device="cpu")
    c = other.locate(ex.pixels, ex.um_per_px)
    assert a == b == c


@pytest.mark.parametrize(
    "pixels,um_per_px",
    [
        (np.zeros((0, 0), np.uint16), 0.5),
        (np.full((64, 64), np.nan), 0.5),
        (np.zeros((2, 64, 64), np.uint16), 0.5),
        (np.zeros(64, np.uint16), 0.5),
        (np.zeros((64, 64), np.uint16), 0.0),
        (np.zeros((64, 64), np.uint16), float("inf")),
        (np.zeros((64, 64), np.uint16), True),
        (np.zeros((512, 512), np.uint16), 620.0),  # 254,000 px a side on the model grid: refused, not allocated
        (np.zeros((512, 512), np.uint16), 1e308),  # infinite on the model grid (was an OverflowError)
        (np.zeros((512, 512), np.uint16), 1e-300),  # the whole frame smaller than one model pixel
        (np.zeros((512, 512), np.uint16), 0.001),
        (None, 0.5),
    ],
)
def test_bad_input_raises_data_error(localiser: TipLocaliser, pixels: object, um_per_px: float) -> None:
    with pytest.raises(DataError):
        localiser.locate(pixels, um_per_px)  # type: ignore[arg-type]


def test_a_numpy_pixel_size_is_accepted(localiser: TipLocaliser, frames: list) -> None:
    ex = frames[1]
    assert localiser.locate(ex.pixels, np.float32(ex.um_per_px)) == localiser.locate(ex.pixels, float(np.float32(ex.um_per_px)))


def test_flat_frame_has_no_tips(localiser: TipLocaliser) -> None:
    assert localiser.locate(np.full((256, 256), 1000, np.uint16), 0.6) == []


def test_wrong_or_broken_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="trained with config 'fast'"):
        TipLocaliser.load(DEFAULT_CHECKPOINT, expect_config="paper", threads=1)
    with pytest.raises(DataError, match="no such file"):
        TipLocaliser.load(tmp_path / "missing.pt", threads=1)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="unreadable"):
        TipLocaliser.load(junk, threads=1)
    # a checkpoint claiming config 'fast' with the weights of another network
    tiny = get_config("fast-tiny")
    mixed = tmp_path / "mixed.pt"
    save_checkpoint(mixed, build_model(tiny), get_config("fast"))
    with pytest.raises(DataError, match="do not fit"):
        TipLocaliser.load(mixed, threads=1)
    # not a localiser checkpoint at all
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(DataError, match="not a patchrig localiser checkpoint"):
        TipLocaliser.load(other, threads=1)


def test_tiny_weights_load_as_zero_and_outputs_do_not_change(tmp_path: Path) -> None:
    """Weights that decayed into the subnormal range are loaded as 0 (they made the shipped
    model 6x slower on x86), bigger ones are kept, and the network computes the same thing."""
    from localisation.checkpoint import TINY_WEIGHT, load_model

    cfg = get_config("fast-tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    with torch.no_grad():
        conv.weight[0].fill_(1e-39)  # subnormal, as found in the shipped fast.pt
        conv.weight[1].fill_(1e-35)  # normal but below TINY_WEIGHT
        conv.weight[2].fill_(1e-20)  # small but kept
    path = tmp_path / "tiny-weights.pt"
    save_checkpoint(path, model, cfg)
    loaded, _, _ = load_model(path)
    name = next(n for n, m in model.named_modules() if m is conv)
    w = dict(loaded.named_modules())[name].weight
    assert torch.all(w[0] == 0) and torch.all(w[1] == 0)
    assert torch.all(w[2] == torch.tensor(1e-20))
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        before, after = model(x), loaded(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-7)
    for t in loaded.state_dict().values():
        if t.is_floating_point():
            assert not torch.any((t != 0) & (t.abs() < TINY_WEIGHT))


def test_trainer_flushes_tiny_weights_in_place() -> None:
    from localisation.checkpoint import zero_tiny_

    p = torch.nn.Parameter(torch.tensor([1e-39, -1e-33, 1e-3, -2.0]))
    zero_tiny_([p])
    assert p.tolist() == [0.0, 0.0, pytest.approx(1e-3), -2.0]
