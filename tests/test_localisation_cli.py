"""The localiser commands end to end on tiny data: train (+ resume, + DDP in one process and in two under torchrun),
evaluate, locate, bench. Real files, real checkpoints, the real CLI dispatcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from localisation.checkpoint import load_model, read_checkpoint, save_checkpoint
from localisation.configs import get_config
from localisation.dataset_format import read_dataset, write_dataset
from localisation.train import TrainOptions, train
from rig.cli import main
from rig.errors import DataError
from simulators.synth import sample_example

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic frames (1-3 tips, 256 px) written as patchrig-tips/1."""
    root = tmp_path_factory.mktemp("tiny") / "ds"
    recs = []
    for i in range(6):
        ex = sample_example(40_000_000 + i, n_tips=(1, 3), size_px=256)
        recs.append((f"images/{i:06d}.png", ex.pixels, ex.um_per_px, ex.tips_px))
    write_dataset(root, recs)
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = get_config("fast-tiny")
    train(cfg, TrainOptions(out_dir=out, data=tiny_dataset, progress=False, threads=1))
    return out / "last.pt"


def test_train_stops_on_budget_and_resumes(tmp_path: Path, tiny_dataset: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", "fast-tiny", "--out", str(out), "--data", str(tiny_dataset), "--threads", "1",
            "--no-progress", "--epochs", "2"]
    assert main([*args, "--max-minutes", "0"]) == 0
    state = read_checkpoint(out / "last.pt", expect_config="fast-tiny")["trainer_state"]
    assert state["epochs_done"] == 0 and state["global_step"] == 1  # stopped after one step
    assert not (out / "metrics.jsonl").exists()
    assert main([*args, "--resume"]) == 0
    state = read_checkpoint(out / "last.pt")["trainer_state"]
    assert state["epochs_done"] == 2 and state["stage"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert {"train", "val_loss", "val", "lr"} <= set(lines[0])
    assert (out / "best.pt").is_file()


def test_the_paper_study_resumes_a_model_stopped_mid_run(tmp_path: Path, tiny_dataset: Path) -> None:
    """``paper_eval`` trains each model of the study in turn; one stopped mid-run (last.pt, no
    done.json) goes on from its checkpoint, and a finished one is not trained again."""
    from localisation.configs import Stage
    from localisation.paper_eval import StudyPlan, train_study_model

    cfg = get_config("fast-tiny").with_overrides(stages=(Stage("all", 2, 2e-3, None),))
    run = tmp_path / "runs" / "model"
    train(cfg, TrainOptions(out_dir=run, data=tiny_dataset, val_data=tiny_dataset, progress=False, threads=1,
                            max_minutes=0))
    assert read_checkpoint(run / "last.pt")["trainer_state"]["global_step"] == 1  # stopped after one step
    _, summary = train_study_model(cfg, "model", (tiny_dataset, tiny_dataset), tmp_path, StudyPlan(), progress=False)
    assert summary["epochs_done"] == 2
    state = read_checkpoint(run / "last.pt")["trainer_state"]
    steps_per_epoch = 6 // cfg.batch_size  # six frames, whole batches only
    # the step before the stop, then two epochs: the step counter went on (a fresh run counts 2)
    assert state["epochs_done"] == 2 and state["global_step"] == 1 + 2 * steps_per_epoch
    weights = (run / "last.pt").read_bytes()
    _, again = train_study_model(cfg, "model", (tiny_dataset, tiny_dataset), tmp_path, StudyPlan(), progress=False)
    assert again == summary and (run / "last.pt").read_bytes() == weights  # done.json: not trained again


def test_train_refuses_to_overwrite_a_run_without_resume(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from support_cli import one_line_error

    run = tiny_checkpoint.parent
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--config", "fast-tiny", "--out", str(run), "--data", str(tiny_dataset), "--threads", "1",
                 "--epochs", "1", "--no-progress"]) == 1
    assert "already holds a run" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_train_um_per_px_sets_the_scale_inference_resamples_to(tmp_path: Path, tiny_dataset: Path) -> None:
    from localisation.inference import TipLocaliser

    out = tmp_path / "run"
    args = ["train", "--config", "fast-tiny", "--out", str(out), "--data", str(tiny_dataset), "--threads", "1",
            "--no-progress", "--epochs", "1", "--max-minutes", "0"]
    assert main([*args, "--um-per-px", "2.0"]) == 0
    assert read_checkpoint(out / "last.pt")["config"]["model_um_per_px"] == 2.0
    loc = TipLocaliser.load(out / "last.pt", device="cpu", threads=1)
    image, _ = loc.prepare(np.full((256, 256), 100, np.uint16), um_per_px=1.0)
    assert image.shape[-2:] == (128, 128)  # 256 µm at 2 µm per model pixel
    # resuming never changes the scale: without the run's --um-per-px it is refused, unchanged
    before = (out / "last.pt").read_bytes()
    assert main([*args[:-2], "--resume"]) == 1
    assert (out / "last.pt").read_bytes() == before
    assert main([*args[:-2], "--resume", "--um-per-px", "2.0"]) == 0
    assert read_checkpoint(out / "last.pt")["trainer_state"]["epochs_done"] == 1


@pytest.mark.parametrize(("config", "value"), [("fast-tiny", "0"), ("fast-tiny", "-1.5"), ("paper-small", "1.0")])
def test_train_um_per_px_refuses_bad_values_and_resizing_configs(
    tmp_path: Path, tiny_dataset: Path, config: str, value: str
) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--config", config, "--out", str(out), "--data", str(tiny_dataset), "--threads", "1",
               "--no-progress", "--max-minutes", "0", "--um-per-px", value])
    assert rc == 1
    assert not out.exists()


def test_resume_refuses_another_config(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(tiny_checkpoint.read_bytes())
    rc = main(["train", "--config", "fast", "--out", str(out), "--data", str(tiny_dataset), "--resume", "--no-progress"])
    assert rc == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_distributed_training_single_process_gloo(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torchrun code path (process group, DistributedSampler, DDP) with one CPU process."""
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    result = train(get_config("fast-tiny"), TrainOptions(out_dir=tmp_path, data=tiny_dataset, progress=False,
                                                          threads=1, device="cpu"))
    assert result["epochs_done"] == 1
    assert not torch.distributed.is_initialized()
    assert (tmp_path / "last.pt").is_file()


def test_distributed_training_two_processes_under_torchrun(tmp_path: Path) -> None:
    """Two real CPU processes under torchrun (gloo): each trains on its half of every epoch,
    the gradients are all-reduced between them, and only rank 0 writes the run directory."""
    data = tmp_path / "ds"
    write_dataset(data, [(f"images/{i:06d}.png", ex.pixels, ex.um_per_px, ex.tips_px)
                         for i in range(17) for ex in [sample_example(41_000_000 + i, n_tips=(1, 3), size_px=256)]])
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "rig.cli", "train", "--config", "fast-tiny", "--out", str(out),
           "--data", str(data), "--threads", "1", "--device", "cpu", "--no-progress", "--epochs", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # 17 frames: 1 held out for validation, 16 trained on; fast-tiny's batch is 4. One process
    # would take 4 steps per epoch; each of the two ranks takes 2 (8 frames each).
    assert get_config("fast-tiny").batch_size == 4
    state = read_checkpoint(out / "last.pt", expect_config="fast-tiny")["trainer_state"]
    assert state["epochs_done"] == 2 and state["global_step"] == 2 * 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]  # one log line per epoch: rank 0 alone writes
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


def test_evaluate_writes_metrics_and_figures(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "eval" / "results.json"
    rc = main(["evaluate", "--data", str(tiny_dataset), "--checkpoint", str(tiny_checkpoint), "--checkpoint",
               "classical", "--out", str(out), "--threads", "1", "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "patchrig-evaluation/1" and doc["images"] == 6
    assert [m["spec"] for m in doc["models"]] == [str(tiny_checkpoint), "classical"]
    overall = doc["models"][0]["metrics"]["overall"]
    assert overall["true_tips"] == sum(len(r.tips_px) for r in read_dataset(tiny_dataset).records)
    for key in ("acc_3um", "acc_5um", "acc_10um", "mean_error_um", "precision", "recall", "f1", "heatmap_iou"):
        assert key in overall
    counts = {str(len(r.tips_px)) for r in read_dataset(tiny_dataset).records}
    assert set(doc["models"][0]["metrics"]["by_n_tips"]) == counts
    for fig in ("results.accuracy.png", "results.overlays.png"):
        assert (out.parent / fig).stat().st_size > 1000
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.accuracy.png", "results.json", "results.overlays.png"]


def test_evaluate_refuses_bad_options_and_leaves_no_partial_output(
    tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from support_cli import one_line_error

    out = tmp_path / "ev.json"
    base = ["evaluate", "--data", str(tiny_dataset), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            "--threads", "1", "--no-progress"]
    for extra, message in ((["--threshold", "nan"], "--threshold must be a score"),
                           (["--threshold", "-1"], "--threshold must be a score"),
                           (["--limit", "-5"], "--limit must be at least 1")):
        assert main([*base, *extra]) == 1
        assert message in one_line_error(capsys)
    (tmp_path / "ev.overlays.png").mkdir()  # a figure that cannot be written
    assert main(base) == 1
    assert "is a directory" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.overlays.png"]  # nothing else written


def test_evaluate_refuses_checkpoint_of_other_config(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path) -> None:
    rc = main(["evaluate", "--data", str(tiny_dataset), "--checkpoint", str(tiny_checkpoint), "--config", "paper",
               "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 1
    assert not (tmp_path / "r.json").exists()


def _check_predictions(doc: dict, files: list[str]) -> None:
    assert doc["format"] == "patchrig-predictions/1"
    assert isinstance(doc["checkpoint"], str) and doc["device"] in ("cpu", "cuda", "cuda:0")
    assert [i["file"] for i in doc["images"]] == files
    for img in doc["images"]:
        assert isinstance(img["latency_ms"], float)
        for tip in img["tips"]:
            assert set(tip) == {"x", "y", "score"}
            assert 0.0 <= tip["score"] <= 1.0
        scores = [t["score"] for t in img["tips"]]
        assert scores == sorted(scores, reverse=True)


def test_locate_dataset_folder_and_single_image(
    tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--checkpoint", str(tiny_checkpoint), "--threads", "1", "--no-progress", "--threshold", "0.05"]
    out = tmp_path / "p1.json"
    assert main(["locate", str(tiny_dataset), "--out", str(out), *base]) == 0
    files = [r.file for r in read_dataset(tiny_dataset).records]
    _check_predictions(json.loads(out.read_text()), files)
    out2 = tmp_path / "p2.json"
    assert main(["locate", str(tiny_dataset / "images"), "--um-per-px", "0.5", "--out", str(out2), *base]) == 0
    _check_predictions(json.loads(out2.read_text()), [Path(f).name for f in files])
    one = tiny_dataset / files[0]
    out3 = tmp_path / "p3.json"
    assert main(["locate", str(one), "--um-per-px", "0.5", "--out", str(out3), *base]) == 0
    _check_predictions(json.loads(out3.read_text()), [str(one)])
    assert "note:" not in capsys.readouterr().err
    # an image at a pixel size the shipped localiser was not validated at: located, with one note
    out4 = tmp_path / "p4.json"
    assert main(["locate", str(one), "--um-per-px", "1.6", "--out", str(out4), *base]) == 0
    _check_predictions(json.loads(out4.read_text()), [str(one)])
    assert "note: 1 image(s) at pixel sizes outside 0.2-1 µm" in capsys.readouterr().err
    # plain images without a pixel size, a missing input, an unreadable image: one clear error
    assert main(["locate", str(one), "--out", str(tmp_path / "x.json"), *base]) == 1
    assert main(["locate", str(tmp_path / "missing.png"), "--um-per-px", "1", "--out", str(tmp_path / "x.json"), *base]) == 1
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["locate", str(bad), "--um-per-px", "1", "--out", str(tmp_path / "x.json"), *base]) == 1
    assert not (tmp_path / "x.json").exists()


def test_locate_refuses_bad_options_with_one_line(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from support_cli import one_line_error

    base = ["locate", str(tiny_dataset), "--out", str(tmp_path / "p.json"), "--checkpoint", str(tiny_checkpoint),
            "--no-progress"]
    for extra, message in ((["--threshold", "nan"], "--threshold must be a score"),
                           (["--threshold", "5"], "--threshold must be a score"),
                           (["--threads", "0"], "--threads must be at least 1"),
                           (["--device", "bogus"], "error: ")):  # caught by the CLI's last resort: one line
        assert main([*base, *extra]) == 1
        assert message in one_line_error(capsys)
    assert not (tmp_path / "p.json").exists()
    # an --out that is one of the inputs (the dataset's labels or an image) or a directory
    labels = tiny_dataset / "labels.json"
    before = labels.read_bytes()
    image = next((tiny_dataset / "images").iterdir())
    image_bytes = image.read_bytes()
    for argv, message in ((["locate", str(tiny_dataset), "--out", str(labels)], "is one of the inputs"),
                          (["locate", str(image), "--um-per-px", "0.5", "--out", str(image)], "is one of the inputs"),
                          (["locate", str(tiny_dataset), "--out", str(tmp_path)], "is a directory")):
        assert main([*argv, "--checkpoint", str(tiny_checkpoint), "--no-progress"]) == 1
        assert message in one_line_error(capsys)
    assert labels.read_bytes() == before and image.read_bytes() == image_bytes
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "labels.json").write_text(json.dumps({"format": "patchrig-tips/1", "images": []}))
    assert main(["locate", str(empty), "--out", str(tmp_path / "e.json"), "--checkpoint", str(tiny_checkpoint)]) == 1
    assert "has no images" in one_line_error(capsys)


def test_bench_reports_every_stage(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "localiser", "--checkpoint", str(tiny_checkpoint), "--iters", "3", "--batch-iters", "1",
               "--warmup", "1", "--threads", "1", "--devices", "cpu", "--size", "128", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    for stage in ("preprocess", "denoiser", "model", "postprocess", "total"):
        assert row[f"b1_{stage}_ms"]["median"] >= 0.0
    assert row["b32_per_image_ms"] > 0.0
    assert np.isfinite(row["b1_total_ms"]["p95"])
    assert os.path.getsize(out) > 100


def test_denoiser_runs_in_training_and_inference(tmp_path: Path, tiny_dataset: Path) -> None:
    """A configuration with a CycleGAN denoiser trains on denoised frames and runs the same
    denoiser first at inference (the shipped reduced generator)."""
    from localisation.inference import TipLocaliser

    out = tmp_path / "run"
    assert main(["train", "--config", "fast-tiny", "--out", str(out), "--data", str(tiny_dataset), "--threads", "1",
                 "--no-progress", "--denoiser", "checkpoints/cyclegan-small.pt"]) == 0
    loc = TipLocaliser.load(out / "last.pt", threads=1, device="cpu")
    assert loc.denoiser is not None
    loc.locate(np.random.default_rng(0).random((96, 96)), 0.5)
    assert loc.last_timings_ms["denoiser"] > 0.0
    assert main(["train", "--config", "fast-tiny", "--out", str(tmp_path / "r2"), "--data", str(tiny_dataset),
                 "--no-progress", "--denoiser", "missing.pt"]) == 1


def test_ship_records_commands_threshold_and_measured_metrics(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path) -> None:
    """``localisation.ship`` turns a run into a shipped checkpoint + JSON: the threshold is
    picked on the validation set, the metrics are measured on the test set, nothing by hand."""
    from localisation.inference import TipLocaliser
    from localisation.metrics import SWEEP_THRESHOLDS
    from localisation.ship import main as ship_main

    out = tmp_path / "shipped.pt"
    assert ship_main(["--run", str(tiny_checkpoint.parent), "--test", str(tiny_dataset), "--val-data", str(tiny_dataset),
                      "--train-command", "patchrig train --config fast-tiny ...", "--test-command", "synth ...",
                      "--pick-threshold", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    sweep = doc["validation_threshold_sweep"]
    assert [t["threshold"] for t in sweep] == list(SWEEP_THRESHOLDS)  # 0.20, 0.25, ..., 0.95
    picked = doc["score_threshold"]
    ok = [t["threshold"] for t in sweep if t["precision"] >= 0.98]
    assert picked == (ok[0] if ok else max(sweep, key=lambda t: t["f1"])["threshold"])
    assert doc["training_command"].startswith("patchrig train") and doc["test_set"]["images"] == 6
    assert set(doc["targets"]) == {"acc_5um", "acc_10um", "precision"}
    assert doc["targets"]["precision"]["measured"] == doc["metrics"]["overall"]["precision"]
    loc = TipLocaliser.load(out, threads=1)
    assert loc.score_threshold == picked and loc.cfg.name == "fast-tiny"


def test_ship_refuses_bad_input_before_it_writes_anything(
    tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing or empty test set, a missing run, a bad threshold or a failure during the
    measurement: one line, exit 1, and the existing ``--out`` (by default the shipped
    checkpoint) and its record are untouched."""
    from localisation.ship import main as ship_main

    out = tmp_path / "shipped.pt"
    out.write_bytes(b"the checkpoint that is shipped now")
    out.with_suffix(".json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "labels.json").write_text(json.dumps({"format": "patchrig-tips/1", "images": []}))
    common = ["--train-command", "t", "--test-command", "t", "--out", str(out), "--no-progress"]
    cases = [
        ["--run", str(tiny_checkpoint.parent), "--test", str(tmp_path / "missing"), *common],
        ["--run", str(tiny_checkpoint.parent), "--test", str(empty), *common],
        ["--run", str(tmp_path / "no-run"), "--test", str(tiny_dataset), *common],
    ]
    for argv in cases:
        assert ship_main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("localisation.ship: error:"), err
    with pytest.raises(SystemExit):  # argparse: one usage line and exit 2
        ship_main(["--run", str(tiny_checkpoint.parent), "--test", str(tiny_dataset), "--score-threshold", "nan", *common])
    import localisation.ship as ship

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full while measuring")

    real = ship.evaluate
    ship.evaluate = broken  # type: ignore[assignment]
    try:
        assert ship_main(["--run", str(tiny_checkpoint.parent), "--test", str(tiny_dataset), *common]) == 1
    finally:
        ship.evaluate = real  # type: ignore[assignment]
    assert out.read_bytes() == b"the checkpoint that is shipped now"
    assert out.with_suffix(".json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "shipped.json", "shipped.pt"]


def test_ship_verifier_from_puts_another_cascades_verifier_on_the_runs_first_stage(
    tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path
) -> None:
    """``ship --verifier-from``: the run's first stage with the donor's verifier, unchanged, and a
    threshold picked end to end on the validation frames through both stages."""
    from localisation.checkpoint import DEFAULT_CHECKPOINT
    from localisation.inference import TipLocaliser
    from localisation.ship import main as ship_main

    donor = tmp_path / "donor.pt"
    donor.write_bytes(DEFAULT_CHECKPOINT.read_bytes())
    out = tmp_path / "pair.pt"
    common = ["--run", str(tiny_checkpoint.parent), "--test", str(tiny_dataset), "--val-data", str(tiny_dataset),
              "--train-command", "train ...", "--test-command", "synth ...", "--out", str(out), "--no-progress"]
    assert ship_main([*common, "--verifier-from", str(donor), "--pick-threshold"]) == 0
    pair, donor_payload = read_checkpoint(out), read_checkpoint(donor)
    run_payload = read_checkpoint(tiny_checkpoint.parent / "best.pt")
    for key, value in donor_payload["verifier"]["model_state"].items():
        assert torch.equal(pair["verifier"]["model_state"][key], value), key
    for key, value in run_payload["model_state"].items():
        assert torch.equal(pair["model_state"][key], value), key
    assert pair["verifier"]["first_stage_threshold"] == run_payload["config"]["score_threshold"]
    doc = json.loads(out.with_suffix(".json").read_text())
    sweep = doc["validation_threshold_sweep"]
    ok = [t["threshold"] for t in sweep if t["precision"] >= 0.98]
    assert doc["score_threshold"] == (ok[0] if ok else max(sweep, key=lambda t: t["f1"])["threshold"])
    assert doc["verifier"]["source_checkpoint"] == str(donor)
    loc = TipLocaliser.load(out, threads=1)
    assert loc.verifier is not None and loc.cfg.name == "fast-tiny" and loc.score_threshold == doc["score_threshold"]

    # refused, and nothing written: no threshold pick, a donor without a verifier, a run with one
    out.unlink()
    with pytest.raises(SystemExit, match="needs --pick-threshold"):
        ship_main([*common, "--verifier-from", str(donor)])
    with pytest.raises(SystemExit, match="has no verifier"):
        ship_main([*common, "--verifier-from", str(tiny_checkpoint), "--pick-threshold"])
    cascade_run = tmp_path / "cascade"
    cascade_run.mkdir()
    (cascade_run / "best.pt").write_bytes(donor.read_bytes())
    (cascade_run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="already has a verifier"):
        ship_main([*common[:1], str(cascade_run), *common[2:], "--verifier-from", str(donor), "--pick-threshold"])
    assert not out.exists()


def test_train_verifier_writes_a_cascade_that_ships_and_evaluates(tmp_path: Path, tiny_dataset: Path) -> None:
    """``patchrig train-verifier`` on the shipped first stage: a complete cascade checkpoint
    whose threshold comes from the validation sweep; ``localisation.ship`` keeps the verifier;
    ``evaluate --ablation no-verifier`` runs the first stage alone."""
    from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model
    from localisation.inference import TipLocaliser
    from localisation.ship import main as ship_main
    from localisation.verifier import first_stage_threshold

    first_stage = tmp_path / "first.pt"
    model, cfg, shipped_payload = load_model(DEFAULT_CHECKPOINT)
    first_threshold = first_stage_threshold(shipped_payload, cfg)
    cfg = cfg.with_overrides(score_threshold=first_threshold)
    save_checkpoint(first_stage, model, cfg)  # the shipped first stage without any verifier
    out = tmp_path / "verifier"
    rc = main(["train-verifier", "--first-stage", str(first_stage), "--data", str(tiny_dataset), "--val-data",
               str(tiny_dataset), "--out", str(out), "--epochs", "2", "--workers", "1", "--threads", "1", "--no-progress"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    payload = read_checkpoint(out / "best.pt")
    sweep = payload["metrics"]["validation_threshold_sweep"]
    ok = [r["threshold"] for r in sweep if r["precision"] is not None and r["precision"] >= 0.98]
    picked = ok[0] if ok else max(sweep, key=lambda r: r["f1"])["threshold"]
    assert payload["config"]["score_threshold"] == picked
    assert payload["verifier"]["first_stage_threshold"] == cfg.score_threshold
    assert payload["metrics"]["candidates"]["train_tips"] > 0
    loc = TipLocaliser.load(out / "best.pt", threads=1)
    assert loc.verifier is not None and loc.score_threshold == picked

    shipped = tmp_path / "shipped.pt"
    assert ship_main(["--run", str(out), "--test", str(tiny_dataset), "--train-command", "patchrig train-verifier ...",
                      "--test-command", "synth ...", "--out", str(shipped), "--no-progress"]) == 0
    doc = json.loads(shipped.with_suffix(".json").read_text())
    assert doc["verifier"]["config"]["candidates"] == 16 and doc["validation_threshold_sweep"] == sweep
    assert TipLocaliser.load(shipped, threads=1).verifier is not None
    with pytest.raises(SystemExit, match="needs --val-data"):
        ship_main(["--run", str(out), "--test", str(tiny_dataset), "--train-command", "x", "--test-command", "y",
                   "--out", str(tmp_path / "again.pt"), "--pick-threshold", "--no-progress"])
    # picked again, end to end, on a validation set: the same rule as train-verifier's
    again = tmp_path / "again.pt"
    assert ship_main(["--run", str(out), "--test", str(tiny_dataset), "--val-data", str(tiny_dataset), "--train-command",
                      "x", "--test-command", "y", "--out", str(again), "--pick-threshold", "--no-progress"]) == 0
    resweep = json.loads(again.with_suffix(".json").read_text())["validation_threshold_sweep"]
    ok = [r["threshold"] for r in resweep if r["precision"] >= 0.98]
    assert read_checkpoint(again)["config"]["score_threshold"] == (ok[0] if ok else max(resweep, key=lambda r: r["f1"])["threshold"])
    assert len(resweep) == len(sweep)  # one threshold grid (metrics.SWEEP_THRESHOLDS)
    for mine, trainers in zip(resweep, sweep, strict=True):  # both sweeps measure the same cascade
        assert mine["threshold"] == trainers["threshold"]
        assert mine["precision"] == pytest.approx(trainers["precision"], abs=1e-9)
        assert mine["acc_5um"] == pytest.approx(trainers["acc_5um"], abs=1e-9)

    res = tmp_path / "ablation.json"
    assert main(["evaluate", "--data", str(tiny_dataset), "--checkpoint", str(shipped), "--ablation", "no-verifier",
                 "--out", str(res), "--no-figures", "--no-progress", "--threads", "1"]) == 0
    assert json.loads(res.read_text())["models"][0]["name"].endswith("without verifier")
    assert main(["evaluate", "--data", str(tiny_dataset), "--checkpoint", str(first_stage), "--ablation", "no-verifier",
                 "--out", str(res), "--no-figures", "--no-progress"]) == 1


def test_train_verifier_candidates_option_sets_the_examined_peaks(tmp_path: Path, tiny_dataset: Path) -> None:
    """``--candidates N`` is stored in the cascade and is what inference examines; 0 is refused
    with a clear error before anything is written."""
    from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model
    from localisation.inference import TipLocaliser

    first_stage = tmp_path / "first.pt"
    model, cfg, _ = load_model(DEFAULT_CHECKPOINT)
    save_checkpoint(first_stage, model, cfg)
    common = ["train-verifier", "--first-stage", str(first_stage), "--data", str(tiny_dataset), "--val-data",
              str(tiny_dataset), "--epochs", "1", "--workers", "1", "--threads", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "bad"), "--candidates", "0"]) == 1
    assert not (tmp_path / "bad").exists()
    assert main([*common, "--out", str(tmp_path / "four"), "--candidates", "4"]) == 0
    assert read_checkpoint(tmp_path / "four" / "best.pt")["verifier"]["config"]["candidates"] == 4
    loc = TipLocaliser.load(tmp_path / "four" / "best.pt", threads=1)
    assert loc.verifier_cfg is not None and loc.verifier_cfg.candidates == 4 and loc.model.n_max == 4


def test_train_verifier_crop_option_sets_the_crop_the_verifier_sees(tmp_path: Path, tiny_dataset: Path) -> None:
    """``--crop-px S`` is stored in the cascade and is the crop inference cuts (its verifier's
    fully connected layer has (S/16)^2 cells); a size that is not a multiple of 16 is refused
    with a clear error before anything is written."""
    from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model
    from localisation.dataset_format import load_image, read_dataset
    from localisation.inference import TipLocaliser

    first_stage = tmp_path / "first.pt"
    model, cfg, _ = load_model(DEFAULT_CHECKPOINT)
    save_checkpoint(first_stage, model, cfg)
    common = ["train-verifier", "--first-stage", str(first_stage), "--data", str(tiny_dataset), "--val-data",
              str(tiny_dataset), "--epochs", "1", "--workers", "1", "--threads", "1", "--no-progress",
              "--widths", "4", "8", "8", "8"]
    assert main([*common, "--out", str(tmp_path / "bad"), "--crop-px", "90"]) == 1
    assert not (tmp_path / "bad").exists()
    assert main([*common, "--out", str(tmp_path / "wide"), "--crop-px", "96"]) == 0
    assert read_checkpoint(tmp_path / "wide" / "best.pt")["verifier"]["config"]["crop_size_px"] == 96
    loc = TipLocaliser.load(tmp_path / "wide" / "best.pt", threads=1)
    assert loc.verifier_cfg is not None and loc.verifier_cfg.crop_size_px == 96
    rec = read_dataset(tiny_dataset).records[0]
    dets = loc.locate(load_image(rec), rec.um_per_px)
    assert loc.last_cascade is not None and len(loc.last_cascade.verifier_scores) > 0
    assert [(d.x_px, d.y_px, d.score) for d in dets] == [
        (d.x_px, d.y_px, d.score) for d in loc.locate(load_image(rec), rec.um_per_px)]


def test_train_verifier_context_option_trains_and_infers_on_the_same_features(tmp_path: Path, tiny_dataset: Path) -> None:
    """``--context``: the verifier reads the first stage's 32 decoder channels at each
    candidate; the trainer's validation sweep (features stored at collection) equals the sweep
    through ``TipLocaliser.locate`` (features read at inference), so both read the same
    features at the same points."""
    from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model
    from localisation.inference import TipLocaliser
    from localisation.ship import main as ship_main

    first_stage = tmp_path / "first.pt"
    model, cfg, _ = load_model(DEFAULT_CHECKPOINT)
    save_checkpoint(first_stage, model, cfg)
    out = tmp_path / "ctx"
    assert main(["train-verifier", "--first-stage", str(first_stage), "--data", str(tiny_dataset), "--val-data",
                 str(tiny_dataset), "--epochs", "2", "--workers", "1", "--threads", "1", "--no-progress",
                 "--widths", "4", "8", "8", "8", "--context", "--out", str(out)]) == 0
    payload = read_checkpoint(out / "best.pt")
    assert payload["verifier"]["config"]["context_channels"] == 32
    loc = TipLocaliser.load(out / "best.pt", threads=1)
    assert loc.verifier_cfg is not None and loc.verifier_cfg.context_channels == 32
    again = tmp_path / "again.pt"
    assert ship_main(["--run", str(out), "--test", str(tiny_dataset), "--val-data", str(tiny_dataset), "--train-command",
                      "x", "--test-command", "y", "--out", str(again), "--pick-threshold", "--no-progress"]) == 0
    resweep = json.loads(again.with_suffix(".json").read_text())["validation_threshold_sweep"]
    sweep = payload["metrics"]["validation_threshold_sweep"]
    assert any(r["acc_5um"] > 0 for r in sweep)  # the comparison is not between two empty cascades
    for mine, trainers in zip(resweep, sweep, strict=True):
        assert mine["threshold"] == trainers["threshold"]
        assert mine["acc_5um"] == pytest.approx(trainers["acc_5um"], abs=1e-9)
        assert mine["precision"] == pytest.approx(trainers["precision"], abs=1e-9)


def test_ship_takes_a_soup_and_records_its_ingredients(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path) -> None:
    """``localisation.soup`` writes a run directory that ``ship --run`` reads; the shipped JSON
    names the soup's ingredients."""
    from localisation.ship import main as ship_main
    from localisation.soup import write_soup

    model, cfg, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    other = tmp_path / "other.pt"
    save_checkpoint(other, model, cfg)
    soup_dir = tmp_path / "soup"
    write_soup(soup_dir, [tiny_checkpoint, other])
    out = tmp_path / "shipped.pt"
    assert ship_main(["--run", str(soup_dir), "--test", str(tiny_dataset), "--val-data", str(tiny_dataset),
                      "--train-command", "python -m localisation.soup ...", "--test-command", "synth ...",
                      "--pick-threshold", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [i["path"] for i in doc["training"]["soup"]["ingredients"]] == [str(tiny_checkpoint), str(other)]
    assert doc["training"]["epochs_run"] == 0 and doc["test_set"]["images"] == 6


def test_a_multi_stage_run_resumes_from_a_stage_boundary(tmp_path: Path, tiny_dataset: Path, monkeypatch) -> None:
    """A run killed early in its second stage resumes: the last.pt saved at the boundary holds
    no optimiser state of the previous stage (whose parameters differ)."""
    import shutil

    import localisation.train as trainer
    from localisation.configs import Stage

    cfg = get_config("paper-small").with_overrides(
        model_kwargs={"vit_depth": 1, "vit_dim": 32, "vit_heads": 1, "head_channels": 8}, input_size=32,
        batch_size=2, stages=(Stage("encoder", 1, 1e-4, ("encoder",)), Stage("decoder", 1, 1e-3, ("decoder",)),
                              Stage("joint", 1, 1e-4, None)))
    boundary = tmp_path / "boundary.pt"
    real_save = trainer.save_checkpoint

    def keep_the_first_boundary(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        ts = kwargs.get("trainer_state") or {}
        if Path(path).name == "last.pt" and ts.get("stage") == 1 and ts.get("epoch_in_stage") == 0 \
                and not boundary.exists():
            shutil.copy(path, boundary)

    monkeypatch.setattr(trainer, "save_checkpoint", keep_the_first_boundary)
    train(cfg, TrainOptions(out_dir=tmp_path / "run", data=tiny_dataset, progress=False, threads=1))
    assert boundary.is_file()
    assert "optimizer" not in read_checkpoint(boundary)["trainer_state"]
    (tmp_path / "killed").mkdir()
    shutil.copy(boundary, tmp_path / "killed" / "last.pt")  # killed during the decoder stage's first epoch
    result = train(cfg, TrainOptions(out_dir=tmp_path / "killed", data=tiny_dataset, progress=False, threads=1,
                                     resume=True))
    assert result["epochs_done"] == 3
    assert read_checkpoint(tmp_path / "killed" / "last.pt")["trainer_state"]["stage"] == 3


def test_resume_refuses_a_run_trained_with_another_denoiser(tmp_path: Path, tiny_dataset: Path,
                                                           tiny_checkpoint: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(tiny_checkpoint.read_bytes())  # trained without a denoiser
    cfg = get_config("fast-tiny").with_overrides(denoiser=str(tmp_path / "some-denoiser.pt"))
    with pytest.raises(DataError, match="denoiser"):
        train(cfg, TrainOptions(out_dir=out, data=tiny_dataset, progress=False, threads=1, resume=True))


def test_damaged_checkpoints_are_one_clear_error(tmp_path: Path, tiny_dataset: Path, tiny_checkpoint: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not a checkpoint, one without weights, one with NaN weights or with
    values inference cannot use: one line naming the file, exit 1, no predictions written."""
    import torch
    from support_cli import one_line_error

    good = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)

    def variant(name: str, change) -> Path:  # type: ignore[no-untyped-def]
        payload = {**good, "config": dict(good["config"]), "model_state": dict(good["model_state"])}
        change(payload)
        path = tmp_path / name
        torch.save(payload, path)
        return path

    first = next(iter(good["model_state"]))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 not a checkpoint at all" * 10)
    cases = [
        (garbage, "unreadable"),
        (variant("no-state.pt", lambda p: p.pop("model_state")), "no model weights"),
        (variant("nan-weights.pt", lambda p: p["model_state"].__setitem__(first, torch.full_like(good["model_state"][first], float("nan")))),
         "not finite"),
        (variant("nan-threshold.pt", lambda p: p["config"].__setitem__("score_threshold", float("nan"))), "score_threshold"),
        (variant("bad-scale.pt", lambda p: p["config"].__setitem__("model_um_per_px", -1.0)), "model_um_per_px"),
        (variant("no-threads.pt", lambda p: p["config"].__setitem__("threads", 0)), "threads"),
    ]
    out = tmp_path / "p.json"
    for path, words in cases:
        assert main(["locate", str(tiny_dataset), "--out", str(out), "--checkpoint", str(path), "--no-progress"]) == 1
        message = one_line_error(capsys)
        assert path.name in message and words in message and "weights_only" not in message, message
    assert not out.exists()


def test_the_shipping_sweep_forgives_faint_tips_as_evaluate_does(monkeypatch) -> None:
    """On synthetic validation frames the sweep that picks the shipped threshold passed no faint
    tips, so it counted detections of real faint glass as false and picked too high."""
    import localisation.ship as ship
    from localisation.configs import build_model

    cfg = get_config("fast-tiny").with_overrides(val_examples=12, val_seed=20_000_000)
    seen: list[np.ndarray] = []
    monkeypatch.setattr(ship, "threshold_sweep", lambda frames, thresholds: seen.extend(f[4] for f in frames) or [])
    torch.manual_seed(0)
    ship.sweep_thresholds(build_model(cfg).eval(), cfg, None, progress=False)
    from localisation.data import render_synthetic

    expected = [f.resampling.to_input(f.faint_model_px)
                for f in render_synthetic(cfg, cfg.val_seed, cfg.val_examples, progress=False)]
    assert sum(len(f) for f in expected) > 0  # these frames have faint tips
    assert [np.asarray(f).tolist() for f in seen] == [f.tolist() for f in expected]


def test_resume_refuses_other_data_or_options_and_the_metrics_keep_one_line_per_epoch(
        tmp_path: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed run silently trained on other frames, for other epochs, at a learning rate its
    restored optimiser then ignored; and a stop between an epoch's metrics line and last.pt
    wrote that epoch twice."""
    import shutil

    from support_cli import one_line_error

    out = tmp_path / "run"
    args = ["train", "--config", "fast-tiny", "--out", str(out), "--data", str(tiny_dataset), "--threads", "1",
            "--no-progress", "--epochs", "2"]
    assert main([*args, "--max-minutes", "0"]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    labels = json.loads((other / "labels.json").read_text())
    labels["images"] = labels["images"][:4]
    (other / "labels.json").write_text(json.dumps(labels))
    last = (out / "last.pt").read_bytes()
    for change in (["--data", str(other)], ["--epochs", "3"], ["--lr", "0.5"], ["--seed", "9"]):
        swapped = [*args, "--resume"]
        if change[0] in swapped:
            swapped[swapped.index(change[0]) + 1] = change[1]
        else:
            swapped += change
        assert main(swapped) == 1
        assert "--resume needs the run's own options and data" in one_line_error(capsys)
        assert (out / "last.pt").read_bytes() == last
    assert main([*args, "--resume"]) == 0  # the same options: it goes on
    capsys.readouterr()
    # a torn line and a line of an epoch last.pt does not count yet: both dropped at resume
    state = read_checkpoint(out / "last.pt")["trainer_state"]
    assert state["epochs_done"] == 2
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"epoch": 2}) + "\n" + '{"epoch": 3, "tr')
    assert main([*args, "--resume"]) == 0  # nothing left to train; the log is cleaned
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize(("option", "value"), [("--epochs", "0"), ("--batch-size", "0"), ("--lr", "-1"),
                                               ("--max-minutes", "-5"), ("--workers", "-1"), ("--seed", "-1")])
def test_train_refuses_unusable_options_and_writes_nothing(tmp_path: Path, tiny_dataset: Path, option: str, value: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from support_cli import one_line_error

    out = tmp_path / "run"
    assert main(["train", "--config", "fast-tiny", "--out", str(out), "--data", str(tiny_dataset), "--threads", "1",
                 "--no-progress", option, value]) == 1
    assert option in one_line_error(capsys)
    assert not out.exists()
