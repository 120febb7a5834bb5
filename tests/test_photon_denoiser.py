"""The supervised single-frame denoiser (``PhotonDenoiser``) and its trainer: real pairs of
single and averaged synthetic frames of the same scenes, real training, real files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from localisation.data import load_frame_denoiser
from localisation.denoiser_train import (
    load_denoiser,
    load_pairs,
    main,
    random_crops,
    save_denoiser,
    train_denoiser,
    validation_mse,
)
from localisation.inference import TipLocaliser
from localisation.models.cyclegan import Denoiser, GeneratorSpec, ResnetGenerator
from localisation.models.photon_denoiser import DenoiserSpec, PhotonDenoiser, renormalise
from localisation.preprocess import normalise
from rig.errors import DataError
from simulators.synth import synthesise_dataset

UM_PER_PX = 1.25


@pytest.fixture(scope="module")
def pair_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pairs")
    common = {"seed": 21, "tips_range": (1, 3), "workers": 1, "size_px": 192, "progress": False}
    synthesise_dataset(root / "single", 8, **common)  # type: ignore[arg-type]
    synthesise_dataset(root / "avg", 8, frames_averaged=8, **common)  # type: ignore[arg-type]
    return root / "single", root / "avg"


def test_a_new_denoiser_is_the_identity_on_any_size() -> None:
    model = PhotonDenoiser(DenoiserSpec(channels=4, depth=3, factor=2))
    x = torch.rand(2, 1, 37, 50)  # not multiples of the factor
    torch.testing.assert_close(model(x), x)


def test_renormalise_matches_the_localisers_normalisation() -> None:
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 3.0, (200, 230)).astype(np.float32)
    ours = renormalise(torch.from_numpy(img)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(ours, normalise(img), atol=1e-5)
    assert float(renormalise(torch.full((1, 1, 20, 20), 0.3)).abs().max()) == 0.0  # flat -> 0


def test_pairs_put_the_averaged_frame_in_the_single_frames_units(pair_sets: tuple[Path, Path]) -> None:
    pairs = load_pairs(*pair_sets, UM_PER_PX, progress=False)
    assert len(pairs) == 8
    for p in pairs:
        assert p.single.shape == p.averaged.shape
        assert p.single.min() >= 0.0 and p.single.max() <= 1.0
        # same scene: smoothed, the two agree closely (a display gamma relative to each
        # frame's own 99.9th percentile may differ, so the levels need not be equal); the
        # averaged frame is the less noisy one
        smooth_a, smooth_b = (cv2.GaussianBlur(im, (0, 0), 3.0) for im in (p.single, p.averaged))
        assert np.corrcoef(smooth_a.ravel(), smooth_b.ravel())[0, 1] > 0.9
        assert np.diff(p.averaged, axis=1).std() < np.diff(p.single, axis=1).std()


def test_mismatched_sets_are_refused(pair_sets: tuple[Path, Path], tmp_path: Path) -> None:
    single, avg = pair_sets
    with pytest.raises(DataError, match="single frames and averaged frames"):
        load_pairs(single, single, UM_PER_PX, progress=False)
    other = synthesise_dataset(tmp_path / "other", 2, seed=22, workers=1, size_px=96, frames_averaged=4,
                               progress=False)
    with pytest.raises(DataError, match="different seeds"):
        load_pairs(single, other.root, UM_PER_PX, progress=False)


def test_training_beats_the_identity_and_writes_the_best(pair_sets: tuple[Path, Path], tmp_path: Path) -> None:
    pairs = load_pairs(*pair_sets, UM_PER_PX, progress=False)
    out = tmp_path / "den.pt"
    summary = train_denoiser(
        pairs[2:], pairs[:2], out, spec=DenoiserSpec(channels=8, depth=3, factor=2), steps=300, batch=16, crop=48,
        lr=2e-3, eval_every=50, seed=0, meta={"test": True}, progress=False,
    )
    assert summary["best_val_mse"] < 0.85 * summary["identity_val_mse"]
    model = load_denoiser(out)
    val, ident = validation_mse(model, pairs[:2])
    assert val == pytest.approx(summary["best_val_mse"], rel=1e-5)
    assert ident == pytest.approx(summary["identity_val_mse"], rel=1e-6)
    # deterministic: the same frame gives the same result
    x = torch.from_numpy(pairs[0].single)[None, None]
    torch.testing.assert_close(model.denoise(x), model.denoise(x.clone()), rtol=0, atol=0)


def test_random_crops_move_input_and_target_together(pair_sets: tuple[Path, Path]) -> None:
    pairs = load_pairs(*pair_sets, UM_PER_PX, progress=False)
    for p in pairs:
        p.averaged = p.single.copy()
    x, y = random_crops(pairs, 16, 300, np.random.default_rng(1))  # larger than the frames: padded
    assert x.shape == (16, 1, 300, 300)
    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_files_load_by_format_and_bad_files_are_refused(tmp_path: Path) -> None:
    photon = tmp_path / "photon.pt"
    save_denoiser(photon, PhotonDenoiser(DenoiserSpec(channels=4, depth=2)), {})
    assert isinstance(load_frame_denoiser(photon), PhotonDenoiser)
    gan = tmp_path / "gan.pt"
    Denoiser(ResnetGenerator(ngf=4, n_blocks=1), GeneratorSpec(ngf=4, n_blocks=1)).save(gan)
    assert isinstance(load_frame_denoiser(gan), Denoiser)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read"):
        load_frame_denoiser(junk)
    other = tmp_path / "other.pt"
    torch.save({"format": "patchrig-photon-denoiser/1", "spec": {"channels": 4}, "state": {}}, other)
    with pytest.raises(DataError, match="damaged"):
        load_denoiser(other)


def test_the_localiser_runs_a_photon_denoiser_first(tmp_path: Path) -> None:
    path = tmp_path / "photon.pt"
    save_denoiser(path, PhotonDenoiser(DenoiserSpec(channels=4, depth=2)), {})  # the identity
    plain = TipLocaliser.load(device="cpu", threads=1)
    denoised = TipLocaliser.load(device="cpu", threads=1, denoiser=path)
    frame = np.random.default_rng(3).poisson(5.0, (256, 256)).astype(np.uint16)
    a = plain.locate(frame, 0.6)
    b = denoised.locate(frame, 0.6)
    assert "denoiser" in denoised.last_timings_ms and denoised.last_timings_ms["denoiser"] > 0
    # an identity denoiser only re-normalises an image that is already normalised
    assert [(round(d.x_px, 2), round(d.y_px, 2)) for d in a] == [(round(d.x_px, 2), round(d.y_px, 2)) for d in b]


def test_cli_trains_and_refuses_bad_input(pair_sets: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    single, avg = pair_sets
    out = tmp_path / "cli.pt"
    rc = main(["--single", str(single), "--averaged", str(avg), "--out", str(out), "--um-per-px", "1.25",
               "--val-share", "0.25", "--channels", "4", "--depth", "2", "--steps", "4", "--batch", "2",
               "--crop", "32", "--eval-every", "2", "--no-progress"])
    assert rc == 0 and out.is_file()
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["pairs"] == 6 and meta["val_pairs"] == 2 and meta["model_um_per_px"] == 1.25
    assert "best validation MSE" in capsys.readouterr().out
    rc = main(["--single", str(single), "--averaged", str(single), "--out", str(tmp_path / "x.pt"),
               "--um-per-px", "1.25", "--no-progress"])
    assert rc == 2 and not (tmp_path / "x.pt").exists()
    assert "error:" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--depth", "1"], ["--crop", "4"], ["--val-share", "1"]):
        rc = main(["--single", str(single), "--averaged", str(avg), "--out", str(tmp_path / "x.pt"),
                   "--um-per-px", "1.25", "--no-progress", *bad])
        assert rc == 2 and not (tmp_path / "x.pt").exists(), bad
        assert "error:" in capsys.readouterr().err
    assert json.dumps(meta)  # the meta stays plain JSON
