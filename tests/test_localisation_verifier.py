"""The second stage of the fast localiser (localisation/verifier.py): crop geometry, labels,
augmentation, selection, the first-stage context, checkpoints carrying a verifier, and the
cascade end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model, read_checkpoint, save_checkpoint
from localisation.inference import TipLocaliser
from localisation.verifier import (
    TipVerifier,
    VerifierConfig,
    crop_grid,
    crops_at,
    first_stage_threshold,
    sample_context,
    select_verified,
    verifier_payload,
)
from localisation.verifier_train import augment, label_candidates, train_verifier
from rig.errors import DataError
from simulators.synth import sample_example

torch.set_num_threads(1)


def test_crops_follow_the_pixel_centre_convention() -> None:
    """On a linear ramp bilinear sampling is exact: the crop's centre (between pixels 31 and
    32 of 64) lies exactly on the requested point."""
    h, w = 200, 300
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = xx + 1000 * yy
    crop = crops_at(grid, np.array([[120.25, 80.5]]), 64)[0]
    centre = (crop[31, 31] + crop[31, 32] + crop[32, 31] + crop[32, 32]) / 4
    assert centre == pytest.approx(120.25 + 1000 * 80.5, abs=0.01)
    assert crop[0, 0] == pytest.approx((120.25 - 31.5) + 1000 * (80.5 - 31.5), abs=0.01)


def test_crop_grid_is_at_the_crop_scale() -> None:
    cfg = VerifierConfig()
    pixels = np.random.default_rng(0).integers(0, 1000, (256, 320)).astype(np.uint16)
    grid, rs = crop_grid(pixels, 0.375, cfg)  # 0.375 µm/px -> 0.75 µm/px halves the size
    assert grid.shape == (128, 160)
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    np.testing.assert_allclose(rs.to_input(rs.to_model(np.array([[10.0, 20.0]]))), [[10.0, 20.0]])


def test_candidates_are_labelled_by_distance_and_faint_tips_are_left_out() -> None:
    cfg = VerifierConfig()
    tips = np.array([[100.0, 100.0]])
    faint = np.array([[300.0, 300.0]])
    cands = np.array([[103.0, 100.0], [106.0, 100.0], [110.0, 100.0], [200.0, 200.0], [305.0, 300.0]])
    label, offset = label_candidates(cands, tips, faint, 1.0, cfg)  # 1 µm/px
    # 3 µm from a tip: a tip; 6 µm: ambiguous, left out; 10 and 141 µm: not a tip;
    # 5 µm from a faint real tip: left out
    assert label.tolist() == [1, -1, 0, 0, -1]
    np.testing.assert_allclose(offset[0], [-3.0 / 0.75, 0.0])
    assert np.all(offset[1:] == 0)
    # wider radii: 6 µm is now a tip (offset to it), 10 µm ambiguous, 141 µm still not a tip
    label, offset = label_candidates(cands, tips, faint, 1.0, cfg, positive_um=6.5, negative_um=12.0)
    assert label.tolist() == [1, 1, -1, 0, -1]
    np.testing.assert_allclose(offset[1], [-6.0 / 0.75, 0.0])


def test_train_verifier_refuses_crossed_label_radii(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="positive-um"):
        train_verifier(DEFAULT_CHECKPOINT, tmp_path, tmp_path, tmp_path / "out", positive_um=8.0, negative_um=8.0)
    assert not (tmp_path / "out").exists()


def test_train_verifier_never_overwrites_a_run_and_needs_validation_tips(tmp_path: Path) -> None:
    """It used to truncate another run's metrics.jsonl and replace its best.pt; and a
    validation set without tips crashed after writing them."""
    from localisation.dataset_format import write_dataset
    from simulators.synth import sample_example

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(DataError, match="already holds a run"):
        train_verifier(DEFAULT_CHECKPOINT, tmp_path, tmp_path, run)
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 0}\n'
    no_tips = tmp_path / "no-tips"
    ex = sample_example(3, n_tips=(0, 0), size_px=64)
    write_dataset(no_tips, [("images/0.png", ex.pixels, ex.um_per_px, ex.tips_px)])
    with pytest.raises(DataError, match="no labelled tip"):
        train_verifier(DEFAULT_CHECKPOINT, no_tips, no_tips, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", range(8))
def test_augmentation_moves_offsets_with_the_pixels(seed: int) -> None:
    """A dot drawn at centre + offset is, after any rotation and flip, at centre + the
    returned offset."""
    size = 64
    offs = torch.tensor([[5.0, -9.0], [-12.0, 3.0]])
    crops = torch.zeros(2, 1, size, size)
    c = (size - 1) / 2
    for i, (dx, dy) in enumerate(offs.tolist()):
        crops[i, 0, int(c + dy + 0.5), int(c + dx + 0.5)] = 1.0
    out, moved = augment(crops, offs, torch.Generator().manual_seed(seed))
    for i in range(2):
        row, col = np.unravel_index(int(out[i, 0].argmax()), (size, size))
        assert (col - c, row - c) == pytest.approx(tuple(moved[i].tolist()), abs=0.51)


def test_select_verified_thresholds_keeps_inside_drops_duplicates_and_caps() -> None:
    tips = np.array([[10.0, 10.0], [11.0, 10.0], [50.0, 50.0], [-3.0, 5.0], [80.0, 20.0], [30.0, 30.0]])
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.6, 0.1])
    kept, s = select_verified(tips, scores, score_threshold=0.5, frame_shape=(64, 100), um_per_px=1.0, n_max=2)
    # (11, 10) is 1 µm from a better one; (-3, 5) is outside; (30, 30) is below threshold; cap 2
    np.testing.assert_allclose(kept, [[10.0, 10.0], [50.0, 50.0]])
    np.testing.assert_allclose(s, [0.9, 0.7])


@pytest.fixture(scope="module")
def cascade_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped first stage with an (untrained, deterministic) verifier attached."""
    model, cfg, payload = load_model(DEFAULT_CHECKPOINT)
    first_threshold = first_stage_threshold(payload, cfg)
    torch.manual_seed(0)
    vcfg = VerifierConfig()
    verifier = TipVerifier(vcfg).eval()
    path = tmp_path_factory.mktemp("cascade") / "cascade.pt"
    save_checkpoint(path, model, cfg.with_overrides(score_threshold=0.0),
                    verifier=verifier_payload(verifier, vcfg, first_stage_threshold=first_threshold))
    return path


def test_cascade_locates_in_input_pixels_deterministically(cascade_checkpoint: Path) -> None:
    ex = sample_example(30_000_001, n_tips=(2, 3))
    loc = TipLocaliser.load(cascade_checkpoint, device="cpu", threads=1)
    assert loc.verifier is not None and loc.model.n_max == VerifierConfig().candidates
    first = loc.locate(ex.pixels, ex.um_per_px)
    again = loc.locate(ex.pixels, ex.um_per_px)
    assert [(d.x_px, d.y_px, d.score) for d in first] == [(d.x_px, d.y_px, d.score) for d in again]
    assert 0 < len(first) <= loc.cfg.n_max
    h, w = ex.pixels.shape
    assert all(-0.5 <= d.x_px <= w - 0.5 and -0.5 <= d.y_px <= h - 0.5 for d in first)
    assert loc.last_timings_ms["verifier"] > 0
    # the untrained verifier's offsets move each candidate by at most a crop
    alone = TipLocaliser.load(cascade_checkpoint, device="cpu", threads=1, use_verifier=False, score_threshold=0.02)
    alone.model.n_max = VerifierConfig().candidates
    cands = np.array([[d.x_px, d.y_px] for d in alone.locate(ex.pixels, ex.um_per_px)])
    half_crop_px = 32 * 0.75 / ex.um_per_px
    for d in first:
        assert np.min(np.linalg.norm(cands - [d.x_px, d.y_px], axis=1)) <= half_crop_px * np.sqrt(2)
    # the per-stage record: the candidates are the first stage's own peaks, each refined once,
    # and every final detection is one of the refined tips with its verifier score
    loc.locate(ex.pixels, ex.um_per_px)
    stages = loc.last_cascade
    assert stages is not None
    np.testing.assert_allclose(stages.candidates_px, cands)
    assert stages.refined_px.shape == stages.candidates_px.shape and stages.verifier_scores.shape == (len(cands),)
    for d in first:
        k = int(np.argmin(np.linalg.norm(stages.refined_px - [d.x_px, d.y_px], axis=1)))
        assert stages.refined_px[k] == pytest.approx([d.x_px, d.y_px]) and stages.verifier_scores[k] == pytest.approx(d.score)


def test_first_stage_alone_uses_its_own_threshold(cascade_checkpoint: Path) -> None:
    loc = TipLocaliser.load(cascade_checkpoint, device="cpu", threads=1, use_verifier=False)
    assert loc.verifier is None
    expected = read_checkpoint(cascade_checkpoint)["verifier"]["first_stage_threshold"]
    assert loc.score_threshold == pytest.approx(expected)


def test_malformed_verifier_is_refused(tmp_path: Path, cascade_checkpoint: Path) -> None:
    payload = read_checkpoint(cascade_checkpoint)
    payload["verifier"]["model_state"].pop(next(iter(payload["verifier"]["model_state"])))
    broken = tmp_path / "broken.pt"
    torch.save(payload, broken)
    with pytest.raises(DataError, match="malformed verifier") as info:
        TipLocaliser.load(broken, device="cpu", threads=1)
    assert "\n" not in str(info.value)  # torch's missing-keys report is several lines; one is shown
    payload = read_checkpoint(cascade_checkpoint)
    payload["verifier"]["config"]["colour"] = 3
    torch.save(payload, broken)
    with pytest.raises(DataError, match="unknown verifier config"):
        TipLocaliser.load(broken, device="cpu", threads=1)


def test_context_is_read_at_the_candidates_model_pixels() -> None:
    """Features of cells of 4 model pixels, read bilinearly at model pixels with the
    pixel-centre convention: model pixel 4 j + 1.5 is the centre of cell j; beyond the last
    cell centre the edge is replicated."""
    h, w = 5, 6
    feats = torch.stack([
        torch.arange(w, dtype=torch.float32)[None, :].expand(h, w),  # channel 0: cell column
        torch.arange(h, dtype=torch.float32)[:, None].expand(h, w),  # channel 1: cell row
    ])[None]
    points = np.array([[9.5, 5.5], [11.5, 5.5], [-10.0, 100.0], [1.5, 17.5]])
    np.testing.assert_allclose(sample_context(feats, points, 4), [[2, 1], [2.5, 1], [0, 4], [0, 4]], atol=1e-6)
    assert sample_context(feats, np.zeros((0, 2)), 4).shape == (0, 2)


def test_a_context_verifier_needs_and_uses_its_features() -> None:
    torch.manual_seed(0)
    verifier = TipVerifier(VerifierConfig(context_channels=4)).eval()
    crops, logits = torch.rand(3, 1, 64, 64), torch.zeros(3)
    with pytest.raises(ValueError, match="needs context features"):
        verifier(crops, logits)
    with pytest.raises(ValueError, match="needs context features"):
        verifier(crops, logits, torch.zeros(3, 5))
    a = verifier(crops, logits, torch.zeros(3, 4))
    b = verifier(crops, logits, torch.full((3, 4), 3.0))
    assert a.shape == (3, 3) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="context_channels"):
        VerifierConfig(context_channels=-1)


def test_a_context_verifier_of_another_width_is_refused(tmp_path: Path) -> None:
    """The shipped first stage's decoder has 32 channels: a verifier reading 7 is refused when
    the checkpoint loads, not at the first frame."""
    model, cfg, payload = load_model(DEFAULT_CHECKPOINT)
    vcfg = VerifierConfig(context_channels=7)
    path = tmp_path / "wrong.pt"
    save_checkpoint(path, model, cfg, verifier=verifier_payload(TipVerifier(vcfg).eval(), vcfg,
                                                                first_stage_threshold=first_stage_threshold(payload, cfg)))
    with pytest.raises(DataError, match="reads 7 first-stage feature channels; the first stage gives 32"):
        TipLocaliser.load(path, device="cpu", threads=1)
