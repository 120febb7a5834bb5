"""Hungarian tip-to-channel assignment with a gate; four pipettes that cross."""

from __future__ import annotations

import numpy as np

from calibration.assignment import assign_detections
from localisation.types import TipDetection


def _det(x, y, score=0.9):
    return TipDetection(float(x), float(y), score)


def test_four_crossing_pipettes_are_assigned_correctly_all_along_their_paths():
    # four tips moving along paths that cross (pass within ~6 µm of each other, as tips at
    # different depths do); the predictions carry a ~2 µm error, the detections 0.3 µm noise;
    # the order of the detections is shuffled
    rng = np.random.default_rng(0)
    um_per_px = 0.62
    starts = np.array([[100, 100], [400, 100], [400, 400], [100, 400]], float)
    ends = starts[[2, 3, 0, 1]] + np.array([[0, -20], [-20, 0], [0, 20], [20, 0]])
    names = ["A", "B", "C", "D"]
    correct = 0
    frames = 0
    closest_um = np.inf
    for s in np.linspace(0, 1, 201):
        true = starts + (ends - starts) * s
        gaps = np.linalg.norm(true[:, None] - true[None], axis=2) + np.eye(4) * 1e9
        closest_um = min(closest_um, float(gaps.min()) * um_per_px)
        predicted = {n: true[i] + rng.normal(0, 2.0 / um_per_px / 1.4, 2) for i, n in enumerate(names)}
        order = rng.permutation(4)
        detections = [_det(*(true[i] + rng.normal(0, 0.3 / um_per_px, 2))) for i in order]
        result = assign_detections(predicted, detections, um_per_px=um_per_px, gate_um=15.0)
        frames += 1
        ok = all(order[result.assigned[n].index] == i for i, n in enumerate(names) if n in result.assigned)
        correct += ok and len(result.assigned) == 4
    assert closest_um < 8.0  # the paths really cross
    assert correct / frames >= 0.995


def test_gate_leaves_far_detections_unassigned_and_channels_missing():
    predicted = {"A": (100.0, 100.0), "B": (300.0, 300.0)}
    detections = [_det(102, 101), _det(350, 300), _det(10, 500)]
    result = assign_detections(predicted, detections, um_per_px=0.5, gate_um=10.0)
    assert set(result.assigned) == {"A"}
    assert result.assigned["A"].index == 0
    assert result.unassigned == [1, 2]
    assert result.missing == ["B"]
    out = result.as_dict(detections)
    assert out["assigned"]["A"]["x_px"] == 102.0
    assert [u["x_px"] for u in out["unassigned"]] == [350.0, 10.0]


def test_a_far_pair_never_displaces_a_near_one():
    # A is near detection 0; B is far from everything but nearer to detection 0 than 1 is to A
    predicted = {"A": (100.0, 100.0), "B": (112.0, 100.0)}
    detections = [_det(103, 100)]
    result = assign_detections(predicted, detections, um_per_px=1.0, gate_um=20.0)
    assert result.assigned["A"].index == 0
    assert result.missing == ["B"]


def test_swapped_predictions_are_resolved_by_total_distance():
    predicted = {"A": (100.0, 100.0), "B": (110.0, 100.0)}
    detections = [_det(109, 100), _det(101, 100)]
    result = assign_detections(predicted, detections, um_per_px=1.0, gate_um=15.0)
    assert result.assigned["A"].index == 1 and result.assigned["B"].index == 0


def test_empty_inputs():
    assert assign_detections({}, [_det(1, 1)], um_per_px=1.0, gate_um=5.0).unassigned == [0]
    assert assign_detections({"A": (1.0, 1.0)}, [], um_per_px=1.0, gate_um=5.0).missing == ["A"]


def test_a_chain_of_far_pairs_never_takes_another_channels_tip():
    """Leaving one channel and one detection unmatched costs two gates, so the optimum chained
    A to B's tip and B to clutter (9 + 9 µm < 0 + 30): both were then corrected by 9 µm. Such
    pairs, whose channel or detection has a clearly closer partner, are left unassigned."""
    predicted = {"A": (100.0, 100.0), "B": (109.0, 100.0)}
    detections = [_det(109, 100), _det(118, 100)]  # B's tip, and clutter
    result = assign_detections(predicted, detections, um_per_px=1.0, gate_um=15.0)
    assert set(result.assigned) == {"B"} and result.assigned["B"].index == 0  # B keeps its own tip
    assert result.missing == ["A"] and result.unassigned == [1]
    # a closer chain (7 + 7 µm against 0 + one gate) still never takes B's tip for A
    result = assign_detections({"A": (100.0, 100.0), "B": (107.0, 100.0)}, [_det(107, 100), _det(114, 100)],
                               um_per_px=1.0, gate_um=15.0)
    assert "A" not in result.assigned and result.assigned["B"].index == 0
