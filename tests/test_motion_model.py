"""The shared trapezoidal motion model of the simulated devices."""

from __future__ import annotations

import numpy as np
import pytest

from simulators.motion import LinearMove, MotionAxis


def test_trapezoid_reaches_target_at_duration() -> None:
    move = LinearMove(np.zeros(3), np.array([300.0, 400.0, 0.0]), 100.0, 1000.0, t0_s=10.0)
    assert move.length_um == pytest.approx(500.0)
    assert move.duration_s == pytest.approx(2 * 0.1 + (500 - 10) / 100)
    assert np.allclose(move.position_at(10.0 + move.duration_s), [300, 400, 0])
    mid = move.position_at(10.0 + move.duration_s / 2)
    assert np.allclose(mid, [150, 200, 0], atol=1e-6)


def test_short_move_is_a_triangle_and_monotonic() -> None:
    move = LinearMove(np.zeros(1), np.array([1.0]), 1000.0, 1000.0, t0_s=0.0)
    assert move.peak_um_s < 1000.0
    samples = [move.distance_at(t) for t in np.linspace(0, move.duration_s, 50)]
    assert all(b >= a for a, b in zip(samples, samples[1:], strict=False))
    assert samples[-1] == pytest.approx(1.0)


def test_axis_stop_and_supersede() -> None:
    axis = MotionAxis(np.zeros(2), acceleration_um_s2=1e6)
    axis.start(np.array([100.0, 0.0]), 100.0, now_s=0.0)
    stopped = axis.stop(now_s=0.5)
    assert 40 < stopped[0] < 60 and not axis.is_moving(1.0)
    axis.start(np.array([0.0, 10.0]), 100.0, now_s=1.0)
    axis.start(np.array([0.0, 0.0]), 100.0, now_s=1.05)  # supersedes from where it is
    assert axis.position_at(100.0).tolist() == [0.0, 0.0]
