"""``localisation.miss_analysis``: each true tip classed by the cascade stage that missed it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from localisation.dataset_format import read_dataset
from localisation.evaluation import evaluate
from localisation.inference import CascadeStages, TipLocaliser
from localisation.miss_analysis import CLASSES, analyse, classify_tips, main, plot_misses
from rig.cli import main as rig_main


def test_each_tip_gets_the_class_of_the_stage_that_missed_it() -> None:
    """0.5 µm/px: 10 px = 5 µm. Tip A: refined onto it with a high score (found); B: refined
    onto it with a low score (rejected); C: a candidate 5 µm away refined 20 µm off
    (refined_off); D: nothing near (no_candidate)."""
    stages = CascadeStages(
        candidates_px=np.array([[100.0, 100.0], [200.0, 208.0], [310.0, 300.0]]),
        first_scores=np.array([0.9, 0.3, 0.2]),
        refined_px=np.array([[101.0, 100.0], [200.0, 201.0], [350.0, 300.0]]),
        verifier_scores=np.array([0.9, 0.4, 0.95]),
    )
    tips = np.array([[100.0, 100.0], [200.0, 200.0], [300.0, 300.0], [400.0, 50.0]])
    assert classify_tips(stages, tips, 0.5, threshold=0.75) == ["found", "rejected", "refined_off", "no_candidate"]
    # the threshold moves B between rejected and found; a tighter candidate radius moves C
    assert classify_tips(stages, tips, 0.5, threshold=0.3)[1] == "found"
    assert classify_tips(stages, tips, 0.5, threshold=0.75, candidate_um=4.0)[2] == "no_candidate"


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic frames with their ``all_tips`` labels (CNR), written by the real CLI."""
    out = tmp_path_factory.mktemp("misses") / "ds"
    assert rig_main(["data", "synth", "--out", str(out), "--n", "6", "--seed", "5", "--tips", "1-3", "--workers", "1"]) == 0
    return out


def test_miss_analysis_counts_every_tip_once_and_agrees_with_evaluate(tmp_path: Path, labelled_set: Path) -> None:
    """The shipped cascade on real frames: one class per labelled tip, fractions that add up,
    CNR bands that partition the tips, and every tip ``evaluate`` finds within 5 µm is
    ``found`` (``found`` can only be larger: it skips duplicate suppression and n_max)."""
    out = tmp_path / "misses.json"
    assert main(["--data", str(labelled_set), "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    records = read_dataset(labelled_set).records
    n_tips = sum(len(r.tips_px) for r in records)
    overall = doc["overall"]
    assert overall["tips"] == n_tips and sum(overall[c]["count"] for c in CLASSES) == n_tips
    assert sum(b["tips"] for b in doc["by_cnr"].values()) == n_tips
    assert sum(overall[c]["fraction"] for c in CLASSES) == pytest.approx(1.0)
    loc = TipLocaliser.load(None, device="cpu", threads=1)
    found_by_evaluate = evaluate("shipped", loc, records, progress=False).metrics["overall"]["acc_5um"] * n_tips
    assert overall["found"]["count"] >= round(found_by_evaluate)
    assert doc["threshold"] == loc.score_threshold


def test_miss_analysis_refuses_a_checkpoint_without_a_verifier(tmp_path: Path, labelled_set: Path) -> None:
    from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model, save_checkpoint

    model, cfg, _ = load_model(DEFAULT_CHECKPOINT)
    first = tmp_path / "first.pt"
    save_checkpoint(first, model, cfg)
    out = tmp_path / "misses.json"
    assert main(["--data", str(labelled_set), "--out", str(out), "--checkpoint", str(first), "--no-progress"]) == 1
    assert not out.exists()


def test_miss_figure_is_written(tmp_path: Path, labelled_set: Path) -> None:
    records = read_dataset(labelled_set).records
    loc = TipLocaliser.load(None, device="cpu", threads=1)
    _, _, per_frame = analyse(loc, records, progress=False)
    path = tmp_path / "new" / "misses.png"  # folders are created
    with_tips = [i for i, r in enumerate(records) if len(r.tips_px)]
    assert len(with_tips) >= 2
    per_tip = [(with_tips[0], 0, "rejected", 15.0), (with_tips[1], 0, "no_candidate", 12.0), (with_tips[0], 0, "found", 30.0)]
    plot_misses(records, per_tip, per_frame, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
