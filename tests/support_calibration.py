"""Test support for calibration: a simulated rig, and ORACLE test doubles.

ORACLE DOUBLES (clearly not the product): ``OracleCamera`` is a frame source that makes a
blank frame whenever asked and notes the world's TRUE tips at that instant;
``OracleLocaliser`` returns those true tips plus Gaussian noise (and, if asked, outliers and
false detections). They let the calibration logic be tested fast and against known truth.
The integration test (tests/test_calibration_sim.py) uses the real SimMicroscope frames and
the real TipLocaliser instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from localisation.types import TipDetection
from manipulators.base import Limits
from manipulators.simulated import SimulatedManipulator
from rig.frame import Frame
from simulators.world import SimWorld


class OracleCamera:
    """ORACLE frame source: each new frame is blank, its id is written into its first pixels,
    and the world's true visible tips (pixels) at that instant are remembered for the oracle.
    A tip is visible when inside the frame and within ``visible_defocus_um`` of focus."""

    def __init__(self, world: SimWorld, *, rate_hz: float = 200.0, visible_defocus_um: float = 6.0, advance_world: bool = True) -> None:
        self.world = world
        self.period_s = 1.0 / rate_hz
        self.visible_defocus_um = visible_defocus_um
        self.advance_world = advance_world
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._next_id = 0
        self._last_t: float | None = None
        self.truth: dict[int, dict[str, np.ndarray]] = {}

    def start(self) -> None:
        self.render()

    def close(self) -> None:
        pass

    def render(self) -> Frame:
        with self._lock:
            now = time.monotonic()
            if self.advance_world and self._last_t is not None:
                self.world.advance(now - self._last_t)
            self._last_t = now
            h, w = self.world.image_size_px
            pixels = np.zeros((h, w), np.uint8)
            frame_id = self._next_id
            self._next_id += 1
            pixels[0, :8] = np.frombuffer(np.int64(frame_id).tobytes(), np.uint8)
            tips = {}
            for name in self.world.channel_names:
                truth = self.world.truth(name)
                tip = self.world.true_tip_um(name)
                px = self.world.um_to_px(tip)
                inside = 0 <= px[0] <= w - 1 and 0 <= px[1] <= h - 1
                if truth.visible and inside and abs(tip[2] - self.world.focal_z_um) <= self.visible_defocus_um:
                    tips[name] = px
            self.truth[frame_id] = tips
            self.truth.pop(frame_id - 200, None)
            frame = Frame(frame_id, time.time(), pixels, self.world.um_per_px, self.world.focal_z_um, time.monotonic())
            self._latest = frame
            return frame

    def latest(self) -> Frame | None:
        with self._lock:
            return self._latest

    def wait_for_frame(self, after_frame_id: int | None, timeout_s: float) -> Frame | None:
        time.sleep(self.period_s)
        return self.render()

    @property
    def stats(self) -> dict[str, int]:
        return {"received": self._next_id, "dropped": 0, "rejected": 0}


@dataclass
class OracleLocaliser:
    """ORACLE localiser: true tips of the frame + N(0, noise_um) per coordinate; with
    probability ``outlier_p`` a tip is displaced by ``outlier_um``; ``false_tips`` random
    false detections per frame with ``false_score``; ``clutter_px`` static false detections."""

    camera: OracleCamera
    noise_um: float = 0.3
    outlier_p: float = 0.0
    outlier_um: float = 20.0
    false_tips: int = 0
    false_score: float = 0.9
    score: float = 0.95
    seed: int = 0
    clutter_px: list[tuple[float, float]] | None = None  # static false detections (pixels)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.calls = 0

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
        self.calls += 1
        frame_id = int(np.frombuffer(np.ascontiguousarray(pixels[0, :8]).tobytes(), np.int64)[0])
        tips = self.camera.truth.get(frame_id, {})
        out = []
        h, w = pixels.shape
        for px in tips.values():
            xy = px + self.rng.normal(0, self.noise_um / um_per_px, 2)
            if self.rng.random() < self.outlier_p:
                angle = self.rng.uniform(0, 2 * np.pi)
                xy = xy + self.outlier_um / um_per_px * np.array([np.cos(angle), np.sin(angle)])
            out.append(TipDetection(float(xy[0]), float(xy[1]), self.score))
        for x, y in self.clutter_px or []:
            out.append(TipDetection(float(x), float(y), self.false_score))
        for _ in range(self.false_tips):
            out.append(TipDetection(float(self.rng.uniform(0, w - 1)), float(self.rng.uniform(0, h - 1)), self.false_score))
        return sorted(out, key=lambda d: -d.score)


def make_world(
    seed: int,
    n_channels: int = 1,
    *,
    n_axes: int | tuple[int, ...] = 3,
    drift_um_per_min: float = 0.0,
    start_um: float | tuple[float, ...] = 10000.0,
) -> SimWorld:
    """A world with channels A, B, C, D (n_axes per channel), started at ``start_um`` per axis
    (limits of make_manipulators: 0..20000 µm); each tip starts in view and in focus."""
    world = SimWorld(seed=seed, drift_um_per_min=drift_um_per_min)
    axes = (n_axes,) * n_channels if isinstance(n_axes, int) else n_axes
    for i in range(n_channels):
        start = np.resize(np.asarray(start_um, float), axes[i])
        world.add_channel("ABCD"[i], n_axes=axes[i], position_um=start)
    return world


def make_manipulators(world: SimWorld, *, speed_um_s: float = 2000.0) -> dict[str, SimulatedManipulator]:
    out = {}
    for name in world.channel_names:
        n = world.truth(name).n_axes
        out[name] = SimulatedManipulator(
            name, Limits((0.0,) * n, (20000.0,) * n), max_speed_um_s=5000.0, default_speed_um_s=speed_um_s, world=world,
            acceleration_um_s2=200000.0,
        )
    return out


@contextmanager
def closing_all(manipulators: dict[str, SimulatedManipulator]) -> Iterator[dict[str, SimulatedManipulator]]:
    try:
        yield manipulators
    finally:
        for m in manipulators.values():
            m.close()


def true_xy_error_um(world: SimWorld, calibration, position_um: np.ndarray) -> float:
    """|predicted - true| in microscope X, Y (µm) at a manipulator position."""
    name = calibration.channel
    return float(np.linalg.norm(calibration.to_microscope_um(position_um)[:2] - world.tip_um_for(name, position_um)[:2]))


class OnceAwayFromStart:
    """Wraps an ORACLE localiser's ``locate``: the first frame localised after ``manipulator``
    has left where it stood when armed (by more than ``away_um``, device µm) is answered by
    ``replace(found, um_per_px)`` instead, where ``found`` is the oracle's answer; a
    ``replace`` that returns None leaves that frame alone and stays armed. Every other frame
    gets the oracle's answer. ``hits`` counts replaced frames; ``arm()`` starts again from
    the current position."""

    def __init__(self, localiser: OracleLocaliser, manipulator, replace, *, away_um: float = 5.0) -> None:
        self.oracle_locate = localiser.locate
        self.manipulator = manipulator
        self.replace = replace
        self.away_um = away_um
        self.hits = 0
        self.arm()
        localiser.locate = self.locate

    def arm(self) -> None:
        self.start_um = self.manipulator.position_um.copy()
        self.armed = True

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
        found = self.oracle_locate(pixels, um_per_px)
        if self.armed and np.linalg.norm(self.manipulator.position_um - self.start_um) > self.away_um:
            replaced = self.replace(found, um_per_px)
            if replaced is not None:
                self.armed = False
                self.hits += 1
                return replaced
        return found
