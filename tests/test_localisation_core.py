"""Localiser building blocks: heatmaps, Hungarian matching, losses, augmentation, metrics,
post-processing, preprocessing, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from localisation.augment import AugmentConfig, affine_matrix, apply_affine, random_geometric
from localisation.configs import CONFIGS, LocaliserConfig, build_model, get_config
from localisation.heatmaps import batch_heatmaps, gaussian_heatmap, heatmap_iou
from localisation.matching import (
    batched_match,
    dice_loss,
    hungarian_distance_loss,
    match,
    paper_total_loss,
    presence_targets,
)
from localisation.metrics import MetricsAccumulator, gated_match
from localisation.models.fast import FastTipNet, centernet_loss, decode_peaks
from localisation.postprocess import detections, suppress_duplicates
from localisation.preprocess import Resampling, normalise, pad_to_multiple, prepare, validate_frame
from rig.errors import DataError

torch.set_num_threads(1)


# ---- heatmaps ---------------------------------------------------------------------------


def test_gaussian_heatmap_peaks_at_tip_with_sigma_width() -> None:
    hm = gaussian_heatmap(torch.tensor([[10.0, 20.0]]), 40, 30, sigma_px=3.0)
    assert hm.shape == (40, 30)
    assert hm[20, 10] == pytest.approx(1.0)
    assert torch.argmax(hm).item() == 20 * 30 + 10
    # one sigma away along x: exp(-1/2)
    assert hm[20, 13].item() == pytest.approx(np.exp(-0.5), rel=1e-5)


def test_heatmap_sum_vs_max_and_padding_rows_ignored() -> None:
    tips = torch.tensor([[[5.0, 5.0], [6.0, 5.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])
    s = batch_heatmaps(tips, valid, 16, 16, sigma_px=2.0, mode="sum")
    m = batch_heatmaps(tips, valid, 16, 16, sigma_px=2.0, mode="max")
    assert s.shape == (1, 1, 16, 16)
    assert s.max() > 1.0 and m.max() == pytest.approx(1.0)
    # the padded (0, 0) row must not create a tip at the corner
    assert s[0, 0, 0, 0] < 0.01


def test_empty_heatmap_and_iou() -> None:
    empty = gaussian_heatmap(torch.zeros(0, 2), 8, 8, sigma_px=1.0)
    assert empty.sum() == 0
    a = gaussian_heatmap(torch.tensor([[4.0, 4.0]]), 16, 16, sigma_px=2.0)
    assert heatmap_iou(a, a) == 1.0
    b = gaussian_heatmap(torch.tensor([[12.0, 12.0]]), 16, 16, sigma_px=2.0)
    assert heatmap_iou(a, b) == 0.0
    assert heatmap_iou(empty, empty) == 1.0


# ---- matching and losses ----------------------------------------------------------------


def test_hungarian_match_finds_the_optimal_assignment() -> None:
    pred = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 5.0]])
    true = np.array([[9.0, 0.0], [0.0, 1.0]])
    r, c = match(pred, true)
    pairs = sorted(zip(r.tolist(), c.tolist(), strict=True))
    assert pairs == [(0, 1), (1, 0)]
    # greedy nearest would pair pred 0 with true 0 here; Hungarian minimises the total
    r, c = match(np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([[1.0, 0.0], [3.5, 0.0]]))
    assert sorted(zip(r.tolist(), c.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_batched_match_ignores_padding() -> None:
    pred = torch.tensor([[[1.0, 1.0], [50.0, 50.0]], [[3.0, 3.0], [0.0, 0.0]]])
    true = torch.tensor([[[50.0, 51.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, False], [False, False]])
    out = batched_match(pred, true, valid)
    assert out[0][0].tolist() == [1] and out[0][1].tolist() == [0]
    assert len(out[1][0]) == 0


def test_hungarian_loss_zero_at_perfect_prediction_and_positive_otherwise() -> None:
    true = torch.tensor([[[10.0, 20.0], [30.0, 40.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])
    perfect = torch.tensor([[[30.0, 40.0], [10.0, 20.0]]])  # order does not matter
    assert hungarian_distance_loss(perfect, true, valid).item() == pytest.approx(0.0, abs=1e-2)
    off = perfect + torch.tensor([3.0, 4.0])
    assert hungarian_distance_loss(off, true, valid).item() == pytest.approx(5.0, rel=1e-3)


def test_dice_loss_zero_at_perfect_and_presence_targets() -> None:
    target = batch_heatmaps(torch.tensor([[[8.0, 8.0]]]), torch.tensor([[True]]), 16, 16, sigma_px=2.0, mode="max")
    target = (target > 0.5).float()
    perfect_logits = (target * 2 - 1) * 50
    assert dice_loss(perfect_logits, target).item() == pytest.approx(0.0, abs=1e-3)
    assert dice_loss(-perfect_logits, target).item() > 0.9
    pred = torch.tensor([[[8.0, 8.0], [100.0, 100.0]]])
    t = presence_targets(pred, torch.tensor([[[8.5, 8.0]]]), torch.tensor([[True]]))
    assert t.tolist() == [[1.0, 0.0]]


def test_total_loss_decreases_when_optimised() -> None:
    torch.manual_seed(0)
    coords = torch.nn.Parameter(torch.rand(1, 3, 2) * 32)
    heat = torch.nn.Parameter(torch.zeros(1, 1, 32, 32))
    presence = torch.nn.Parameter(torch.zeros(1, 3))
    true = torch.tensor([[[5.0, 5.0], [20.0, 25.0]]])
    valid = torch.tensor([[True, True]])
    target = batch_heatmaps(true, valid, 32, 32, sigma_px=3.0)
    opt = torch.optim.Adam([coords, heat, presence], lr=0.5)
    losses = []
    for _ in range(60):
        terms = paper_total_loss({"heatmap": heat, "coords": coords, "presence": presence}, target, true, valid, alpha=0.15)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(terms["total"].item())
    assert losses[-1] < 0.3 * losses[0]
    assert set(terms) == {"dice", "hungarian", "presence", "total"}


def test_centernet_loss_decreases_on_fast_model() -> None:
    torch.manual_seed(0)
    model = FastTipNet(widths=(4, 8, 8, 8), n_max=4)
    x = torch.rand(2, 1, 32, 32)
    tips = torch.tensor([[[10.0, 12.0], [0.0, 0.0]], [[20.0, 5.0], [3.0, 28.0]]])
    valid = torch.tensor([[True, False], [True, True]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = last = None
    for _ in range(30):
        terms = centernet_loss(model(x), tips, valid, stride=4)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        first = terms["total"].item() if first is None else first
        last = terms["total"].item()
    assert last < 0.5 * first


def test_decode_peaks_recovers_subcell_positions() -> None:
    logits = torch.full((1, 1, 8, 8), -10.0) + 0.1 * torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    offset = torch.zeros(1, 2, 8, 8)
    logits[0, 0, 2, 5] = 5.0
    offset[0, :, 2, 5] = torch.tensor([0.25, -0.5])
    logits[0, 0, 6, 1] = 3.0
    coords, presence = decode_peaks(logits, offset, stride=4, k=3)
    assert coords.shape == (1, 3, 2) and presence.shape == (1, 3)
    # cell (5, 2) + offset -> ((5 + .25 + .5) * 4 - .5, (2 - .5 + .5) * 4 - .5)
    assert coords[0, 0].tolist() == pytest.approx([22.5, 7.5])
    assert coords[0, 1].tolist() == pytest.approx([5.5, 25.5])
    assert presence[0, 2] < -9  # the third 'peak' is background: dropped by any threshold


# ---- augmentation -------------------------------------------------------------------------


def _dot_image(tips: np.ndarray, h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w), np.float32)
    for x, y in tips:
        img[int(round(y)), int(round(x))] = 1.0
    return img


@pytest.mark.parametrize("flip_x,flip_y,k", [(True, False, 0), (False, True, 0), (True, True, 1), (False, False, 3)])
def test_flips_and_rotations_move_labels_with_pixels(flip_x: bool, flip_y: bool, k: int) -> None:
    tips = np.array([[3.0, 7.0], [20.0, 11.0]])
    img = _dot_image(tips, 24, 24)
    m = affine_matrix(scale=1.0, centre_in=(11.5, 11.5), centre_out=(11.5, 11.5), flip_x=flip_x, flip_y=flip_y, rot90_k=k)
    out, moved = apply_affine(img, tips, m, (24, 24), border_value=0.0)
    assert len(moved) == 2
    for x, y in moved:
        assert out[int(round(y)), int(round(x))] == pytest.approx(1.0)


def test_scaling_keeps_labels_on_the_feature_and_drops_tips_outside() -> None:
    rng = np.random.default_rng(1)
    tips = np.array([[30.0, 30.0], [1.0, 1.0]])
    img = np.zeros((64, 64), np.float32)
    img[28:33, 28:33] = 1.0  # a blob centred on the first tip
    for _ in range(5):
        out, moved = random_geometric(
            img, tips, (48, 48), AugmentConfig(flip=True, rot90=True, scale_range=(0.9, 1.1)), rng,
            random_crop=True, border_value=0.0,
        )
        # the blob's centre of mass follows the first tip whenever it is inside
        ys, xs = np.nonzero(out > 0.5)
        if len(xs):
            centre = np.array([xs.mean(), ys.mean()])
            assert np.min(np.linalg.norm(moved - centre, axis=1)) < 1.0
        assert ((moved >= -0.5) & (moved <= 47.5)).all()


# ---- preprocessing ------------------------------------------------------------------------


def test_resampling_maps_pixel_centres_both_ways() -> None:
    rs = Resampling(0.5, 0.25)
    pts = np.array([[0.0, 0.0], [9.5, 3.0]])
    assert np.allclose(rs.to_input(rs.to_model(pts)), pts)
    # the centre of input pixels 0 and 1 is the centre of model pixel 0 at scale 1/2
    assert rs.to_model(np.array([[0.5, 1.5]]))[0].tolist() == pytest.approx([0.0, 0.0])


def test_prepare_fixed_scale_and_resize() -> None:
    img = (np.arange(100 * 200).reshape(100, 200) % 251).astype(np.uint16)
    out, rs = prepare(img, 0.75, mode="fixed_scale", size=256, model_um_per_px=1.5)
    assert out.shape == (50, 100) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert rs.sx == pytest.approx(0.5)
    out, rs = prepare(img, 0.75, mode="resize", size=64, model_um_per_px=None)
    assert out.shape == (64, 64)
    assert pad_to_multiple(np.zeros((50, 100), np.float32), 16).shape == (64, 112)
    assert normalise(np.ones((10, 10), np.float32)).max() == 0.0


@pytest.mark.parametrize(
    "bad,upp",
    [
        (np.zeros((0, 5)), 1.0),
        (np.zeros((4, 4, 4, 4)), 1.0),
        (np.full((16, 16), np.nan), 1.0),
        (np.zeros((16, 16)), float("nan")),
        (np.zeros((16, 16)), -1.0),
        ("not an image", 1.0),
        (np.zeros((16, 16), dtype=bool), 1.0),
    ],
)
def test_bad_frames_raise_data_error(bad: object, upp: float) -> None:
    with pytest.raises(DataError):
        validate_frame(bad, upp)


# ---- metrics and post-processing --------------------------------------------------------------


def test_metrics_accuracy_precision_and_split_by_tip_count() -> None:
    acc = MetricsAccumulator(gate_um=10.0)
    # image 1: two tips, one found 2 µm off, one 8 µm off, plus a false positive far away
    acc.add(np.array([[10.0, 10.0], [50.0, 58.0], [200.0, 200.0]]), np.array([[10.0, 12.0], [50.0, 50.0]]), 1.0)
    # image 2: no tips, no predictions
    acc.add(np.zeros((0, 2)), np.zeros((0, 2)), 0.5)
    s = acc.summary()
    o = s["overall"]
    assert o["acc_3um"] == 0.5 and o["acc_5um"] == 0.5 and o["acc_10um"] == 1.0
    assert o["precision"] == pytest.approx(2 / 3) and o["recall"] == 1.0
    assert o["mean_error_um"] == pytest.approx(5.0)
    assert set(s["by_n_tips"]) == {"0", "2"}
    assert s["by_n_tips"]["0"]["precision"] == 1.0
    assert len(gated_match(np.array([[0.0, 0.0]]), np.array([[11.0, 0.0]]), 10.0)) == 0


def test_a_detection_of_a_faint_real_tip_is_neither_required_nor_a_false_positive() -> None:
    acc = MetricsAccumulator(gate_um=10.0)
    true = np.array([[10.0, 10.0]])
    faint = np.array([[100.0, 100.0], [300.0, 300.0]])
    # one hit, one detection at a faint real tip, one false positive far from everything
    preds = np.array([[11.0, 10.0], [102.0, 100.0], [200.0, 50.0]])
    acc.add(preds, true, 1.0, faint_px=faint)
    o = acc.summary()["overall"]
    assert o["recall"] == 1.0 and o["ignored_predictions"] == 1
    assert o["predicted_tips"] == 2 and o["precision"] == 0.5
    # a prediction matched to a true tip is never spent on a faint one (and vice versa)
    acc2 = MetricsAccumulator(gate_um=10.0)
    acc2.add(np.array([[10.0, 10.0]]), true, 1.0, faint_px=np.array([[12.0, 10.0]]))
    o2 = acc2.summary()["overall"]
    assert o2["precision"] == 1.0 and o2["ignored_predictions"] == 0
    # one faint tip forgives one detection: a second one on it is a duplicate, and false
    acc3 = MetricsAccumulator(gate_um=10.0)
    acc3.add(np.array([[53.0, 50.0], [50.0, 54.0]]), np.zeros((0, 2)), 1.0, faint_px=np.array([[50.0, 50.0]]))
    o3 = acc3.summary()["overall"]
    assert o3["ignored_predictions"] == 1 and o3["predicted_tips"] == 1 and o3["precision"] == 0.0


def test_postprocess_thresholds_and_suppresses_duplicates() -> None:
    out = {
        "coords": torch.tensor([[[10.0, 10.0], [10.5, 10.0], [40.0, 40.0], [60.0, 60.0]]]),
        "presence": torch.tensor([[3.0, 2.0, 1.0, -3.0]]),
    }
    (xy, scores), = detections(out, score_threshold=0.5, n_max=4, min_separation_px=3.0)
    assert xy.tolist() == [[10.0, 10.0], [40.0, 40.0]]
    assert scores[0] > scores[1]
    keep = suppress_duplicates(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([0.1, 0.9]), 2.0)
    assert keep.tolist() == [1]
    # a paper-style output without presence is scored by its own heatmap
    heat = torch.full((1, 1, 32, 32), -10.0)
    heat[0, 0, 5, 5] = 10.0
    out2 = {"coords": torch.tensor([[[5.0, 5.0], [20.0, 20.0]]]), "heatmap": heat}
    (xy2, _s2), = detections(out2, score_threshold=0.2, n_max=2)
    assert xy2.tolist() == [[5.0, 5.0]]


# ---- configs --------------------------------------------------------------------------------


def test_configs_are_typed_and_round_trip() -> None:
    for name in ("paper", "paper-small", "fast", "baseline-vgg16", "baseline-resnet18", "baseline-resnet50", "baseline-vit"):
        assert name in CONFIGS
    paper = get_config("paper")
    assert [(s.epochs, s.lr) for s in paper.stages] == [(50, 1e-4), (50, 1e-3), (100, 1e-4)]
    assert (paper.batch_size, paper.sigma_px, paper.alpha, paper.input_size, paper.n_max) == (32, 10.0, 0.15, 256, 4)
    assert paper.plateau_patience_epochs == 20 and paper.plateau_factor == 0.5
    fast = get_config("fast")
    assert fast.n_max >= 6
    assert LocaliserConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(DataError):
        get_config("nope")
    with pytest.raises(ValueError):
        fast.with_overrides(colour="red")


def test_fast_model_contract_shapes() -> None:
    model = build_model(get_config("fast-tiny")).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 96))
    assert out["coords"].shape == (2, model.n_max, 2)
    assert out["presence"].shape == (2, model.n_max)
    assert out["center_logits"].shape == (2, 1, 16, 24)


def test_a_trained_fast_model_grows_deeper_without_changing_its_output(tmp_path: Path) -> None:
    """Extra blocks start as the identity: a checkpoint of the shallower network loads into the
    deeper one (grow=True) and predicts exactly the same; without grow, or with a checkpoint that
    does not fit, loading is refused."""
    from localisation.checkpoint import load_weights, read_checkpoint, save_checkpoint

    tiny = get_config("fast-tiny")
    torch.manual_seed(0)
    small = build_model(tiny)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in small.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "small.pt"
    save_checkpoint(path, small, tiny)
    kwargs = dict(tiny.model_kwargs, extra_blocks=(1, 1, 2))
    deep_cfg = tiny.with_overrides(model_kwargs=kwargs)
    deep = build_model(deep_cfg)
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in small.parameters())
    payload = read_checkpoint(path)
    with pytest.raises(DataError, match="do not fit"):
        load_weights(deep, payload, path)
    load_weights(deep, payload, path, grow=True)
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        a, b = small.eval()(x), deep.eval()(x)
    assert torch.equal(a["center_logits"], b["center_logits"]) and torch.equal(a["offset"], b["offset"])
    # the other way round (checkpoint has tensors the model lacks) never loads
    deep_path = tmp_path / "deep.pt"
    save_checkpoint(deep_path, deep, deep_cfg)
    with pytest.raises(DataError, match="do not fit"):
        load_weights(build_model(tiny), read_checkpoint(deep_path), deep_path, grow=True)


def test_faint_tips_come_from_the_records_low_contrast_entries(tmp_path: Path) -> None:
    from localisation.dataset_format import TipRecord
    from localisation.evaluation import faint_tips_px

    entries = [
        {"x": 1.0, "y": 2.0, "visible": True, "reason": "visible"},
        {"x": 3.0, "y": 4.0, "visible": False, "reason": "low_contrast"},
        {"x": 900.0, "y": 4.0, "visible": False, "reason": "outside_frame"},
    ]
    rec = TipRecord("a.png", tmp_path / "a.png", 0.5, np.array([[1.0, 2.0]]), {"all_tips": entries})
    assert faint_tips_px(rec).tolist() == [[3.0, 4.0]]
    assert faint_tips_px(TipRecord("b.png", tmp_path / "b.png", 0.5, np.zeros((0, 2)))).shape == (0, 2)


def test_accuracy_by_cnr_band_uses_each_true_tips_contrast(tmp_path: Path) -> None:
    from localisation.dataset_format import TipRecord
    from localisation.evaluation import true_tip_cnr

    entries = [
        {"x": 10.0, "y": 10.0, "visible": True, "reason": "visible", "cnr": 8.5},
        {"x": 50.0, "y": 50.0, "visible": True, "reason": "visible", "cnr": 55.0},
        {"x": 90.0, "y": 90.0, "visible": False, "reason": "low_contrast", "cnr": 3.0},
    ]
    rec = TipRecord("a.png", tmp_path / "a.png", 1.0, np.array([[10.0, 10.0], [50.0, 50.0]]), {"all_tips": entries})
    cnr = true_tip_cnr(rec)
    assert cnr is not None and cnr.tolist() == [8.5, 55.0]
    acc = MetricsAccumulator(gate_um=10.0)
    acc.add(np.array([[51.0, 50.0]]), rec.tips_px, 1.0, true_cnr=cnr)  # the faint one is missed
    by = acc.summary()["by_cnr"]
    assert by == {
        "<10": {"true_tips": 1, "acc_3um": 0.0, "acc_5um": 0.0, "acc_10um": 0.0},
        "40+": {"true_tips": 1, "acc_3um": 1.0, "acc_5um": 1.0, "acc_10um": 1.0},
    }
    assert true_tip_cnr(TipRecord("b.png", tmp_path / "b.png", 1.0, np.zeros((0, 2)))) is None


def test_metrics_by_pixel_size_band_tally_each_frame_in_its_band() -> None:
    from localisation.metrics import PIXEL_SIZE_BAND_NAMES, pixel_size_band

    assert [pixel_size_band(v) for v in (0.2, 0.5, 0.69, 0.7, 0.99, 1.0, 1.6)] == [
        "<0.5", "0.5-0.7", "0.5-0.7", "0.7-1", "0.7-1", "1+", "1+"]
    assert PIXEL_SIZE_BAND_NAMES == ("<0.5", "0.5-0.7", "0.7-1", "1+")
    acc = MetricsAccumulator(gate_um=10.0)
    acc.add(np.array([[10.0, 10.0]]), np.array([[10.0, 10.0]]), 0.4)  # fine frame: found
    acc.add(np.array([[80.0, 80.0]]), np.array([[10.0, 10.0]]), 1.2)  # coarse frame: a miss and a false tip
    acc.add(np.zeros((0, 2)), np.array([[5.0, 5.0], [50.0, 50.0]]), 1.5)  # coarse frame: two misses
    by = acc.summary()["by_um_per_px"]
    assert list(by) == ["<0.5", "1+"]  # fine to coarse, empty bands left out
    assert (by["<0.5"]["images"], by["<0.5"]["true_tips"], by["<0.5"]["acc_5um"], by["<0.5"]["precision"]) == (1, 1, 1.0, 1.0)
    assert (by["1+"]["images"], by["1+"]["true_tips"], by["1+"]["acc_5um"], by["1+"]["precision"]) == (2, 3, 0.0, 0.0)


# ---- faint tips in training ----------------------------------------------------------------


def test_the_loss_ignores_the_background_around_faint_tips_but_not_the_tips() -> None:
    """A confident peak on a faint tip costs nothing once the faint tip is given as ignored
    (it is neither a tip nor background), while a missed real tip costs as much as before."""
    from localisation.models.fast import ignore_mask

    mask = ignore_mask(torch.tensor([[[41.5, 17.5]]]), torch.tensor([[True]]), (16, 16), 4, 1.5)
    assert mask.shape == (1, 1, 16, 16)
    assert bool(mask[0, 0, 4, 10]) and bool(mask[0, 0, 5, 10]) and not bool(mask[0, 0, 4, 13])
    assert int(mask.sum()) == 9  # the 3x3 cells within 1.5 cells of cell (10, 4)

    logits = torch.full((1, 1, 16, 16), -6.0)
    logits[0, 0, 4, 10] = 4.0  # a confident detection of the faint tip
    outputs = {"center_logits": logits, "offset": torch.zeros(1, 2, 16, 16)}
    tips, valid = torch.tensor([[[2.0, 50.0]]]), torch.tensor([[True]])  # one real tip, missed
    faint, faint_valid = torch.tensor([[[41.5, 17.5]]]), torch.tensor([[True]])
    plain = centernet_loss(outputs, tips, valid, stride=4)["focal"]
    ignored = centernet_loss(outputs, tips, valid, stride=4, ignore_px=faint, ignore_valid=faint_valid)["focal"]
    quiet = logits.clone()
    quiet[0, 0, 4, 10] = -6.0
    no_peak = centernet_loss({"center_logits": quiet, "offset": outputs["offset"]}, tips, valid, stride=4)["focal"]
    assert float(plain) > float(ignored) + 1.0
    assert float(ignored) == pytest.approx(float(no_peak), rel=1e-3)  # only the missed real tip is left
    none_valid = centernet_loss(outputs, tips, valid, stride=4, ignore_px=faint, ignore_valid=torch.tensor([[False]]))
    assert float(none_valid["focal"]) == pytest.approx(float(plain))


def test_training_samples_carry_faint_tips_through_the_same_augmentation(tmp_path: Path) -> None:
    """Faint tips are read from a dataset's low_contrast entries, survive the frame cache, and
    move with the pixels under flips, rotations and scaling, like the labelled tips."""
    import json

    import cv2

    from localisation.data import TipTrainingSet, load_cache, load_directory, save_cache

    img = np.full((96, 96), 3000, np.uint16)
    img[30, 70] = 60000  # the faint tip's pixel, made bright so it can be found after warping
    img[60, 20] = 40000  # the labelled tip's pixel
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), img)
    entries = [
        {"x": 20.0, "y": 60.0, "visible": True, "reason": "visible"},
        {"x": 70.0, "y": 30.0, "visible": False, "reason": "low_contrast"},
    ]
    labels = {"format": "patchrig-tips/1", "images": [{"file": "images/a.png", "um_per_px": 1.5, "tips": [[20.0, 60.0]], "all_tips": entries}]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    cfg = get_config("fast").with_overrides(input_size=64, augment=AugmentConfig(flip=True, rot90=True, scale_range=(0.9, 1.1)))
    frames = load_directory(cfg, tmp_path, progress=False)
    np.testing.assert_allclose(frames[0].faint_model_px, [[70.0, 30.0]], atol=1e-4)
    save_cache(frames, tmp_path / "c.npz")
    np.testing.assert_allclose(load_cache(tmp_path / "c.npz")[0].faint_model_px, [[70.0, 30.0]], atol=1e-4)

    ds = TipTrainingSet(frames, cfg, seed=3)
    seen = 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        image = item["image"][0].numpy()
        for xy, ok in zip(item["faint"].numpy(), item["faint_valid"].numpy(), strict=True):
            if ok:
                x, y = int(round(float(xy[0]))), int(round(float(xy[1])))
                assert image[y, x] == pytest.approx(float(image.max()), abs=0.15)  # on the bright pixel
                seen += 1
    assert seen >= 3
