"""Closed-loop looks through the mean of K fresh frames (``Eye(frames_averaged=K)``,
``[calibration] frames_averaged``): only fresh frames are averaged, one scan geometry at a time,
and K = 1 is the single fresh frame unchanged."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pydantic
import pytest

from calibration.observe import Eye
from calibration.service import CalibrationService
from config.models import CalibrationConfig, RigIdentity
from localisation.types import TipDetection
from rig.errors import NoFrame, Stopped
from rig.frame import Frame


class ScriptedFrames:
    """A frame source that hands out a fixed list of frames, one per ``wait_for_frame``.
    ``latest()`` is the newest frame handed out (or ``start``, a frame from before the move)."""

    def __init__(self, frames: list[Frame], start: Frame | None = None) -> None:
        self.queue = list(frames)
        self._latest = start

    def latest(self) -> Frame | None:
        return self._latest

    def wait_for_frame(self, after_frame_id: int | None, timeout_s: float) -> Frame | None:
        if not self.queue:
            time.sleep(min(timeout_s, 0.01))
            return None
        frame = self.queue.pop(0)
        assert after_frame_id is None or frame.frame_id > after_frame_id
        self._latest = frame
        return frame


def frame(frame_id: int, value: int, received_s: float, *, shape: tuple[int, int] = (32, 32),
          um_per_px: float = 0.5, dtype: type = np.uint16) -> Frame:
    return Frame(frame_id, 1000.0 + frame_id, np.full(shape, value, dtype), um_per_px, 0.0, received_s)


class RecordingLocaliser:
    """Records the pixels it is given; finds one tip at the frame's centre."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
        self.seen.append(pixels.copy())
        h, w = pixels.shape
        return [TipDetection((w - 1) / 2, (h - 1) / 2, 0.9)]


MOVE_END_S = 100.0  # the move ended here (monotonic seconds); settle_s is 0.05


def test_a_look_localises_the_mean_of_k_fresh_frames_and_never_an_early_one() -> None:
    old = frame(1, 5000, 99.0)  # the newest frame when the move ended: never averaged
    too_early = frame(2, 4000, MOVE_END_S + 0.01)  # received within the settle time
    fresh = [frame(3, 10, 100.10), frame(4, 20, 100.13), frame(5, 61, 100.16), frame(6, 999, 100.20)]
    loc = RecordingLocaliser()
    eye = Eye(ScriptedFrames([too_early, *fresh], start=old), loc, min_score=0.5, frames_averaged=3)
    look = eye.look_after(MOVE_END_S)
    assert len(loc.seen) == 1  # one model run on the mean, not one per frame
    assert loc.seen[0].dtype == np.uint16
    assert np.all(loc.seen[0] == 30)  # rint((10 + 20 + 61) / 3)
    assert look.frame.frame_id == 5 and look.frame.received_s == 100.16  # the newest frame's id and times
    assert [d.score for d in look.detections] == [0.9]


def test_a_change_of_scan_geometry_starts_the_mean_again() -> None:
    frames = [
        frame(3, 10, 100.1, shape=(64, 64)),
        frame(4, 50, 100.2),  # another frame size
        frame(5, 71, 100.3, um_per_px=0.8),  # another pixel size
        frame(6, 20, 100.4, um_per_px=0.8),
    ]
    loc = RecordingLocaliser()
    eye = Eye(ScriptedFrames(frames, start=frame(1, 0, 99.0)), loc, min_score=0.5, frames_averaged=2)
    look = eye.look_after(MOVE_END_S)
    assert look.frame.frame_id == 6 and look.frame.um_per_px == 0.8
    assert loc.seen[0].shape == (32, 32) and np.all(loc.seen[0] == 46)  # rint((71 + 20) / 2)


def test_one_frame_is_the_fresh_frame_itself() -> None:
    fresh = frame(3, 10, 100.1)
    loc = RecordingLocaliser()
    eye = Eye(ScriptedFrames([fresh], start=frame(1, 0, 99.0)), loc, min_score=0.5)
    look = eye.look_after(MOVE_END_S)
    assert look.frame is fresh and loc.seen[0].shape == (32, 32)


def test_waiting_for_the_frames_of_a_mean_honours_cancel_and_the_frame_timeout() -> None:
    loc = RecordingLocaliser()
    only_one = ScriptedFrames([frame(3, 10, 100.1)], start=frame(1, 0, 99.0))
    eye = Eye(only_one, loc, min_score=0.5, frames_averaged=4, frame_timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(NoFrame, match="no fresh frame"):
        eye.look_after(MOVE_END_S)
    assert time.monotonic() - t0 < 2.0 and loc.seen == []  # nothing localised from a partial mean
    cancel = threading.Event()
    cancel.set()
    eye = Eye(ScriptedFrames([frame(3, 10, 100.1)]), loc, min_score=0.5, frames_averaged=2)
    with pytest.raises(Stopped):
        eye.look_after(MOVE_END_S, cancel=cancel)


def test_frames_averaged_is_validated_and_reaches_the_calibration_service(tmp_path: Path) -> None:
    for bad in (0, -2):
        with pytest.raises(ValueError, match="whole number"):
            Eye(ScriptedFrames([]), RecordingLocaliser(), min_score=0.5, frames_averaged=bad)
        with pytest.raises(pydantic.ValidationError):
            CalibrationConfig(frames_averaged=bad)
    with pytest.raises(pydantic.ValidationError):
        CalibrationConfig.model_validate({"frames_averaged": 2.5})
    service = CalibrationService(RigIdentity(), CalibrationConfig(frames_averaged=4), {}, ScriptedFrames([]),
                                 RecordingLocaliser(), store_dir=tmp_path)
    try:
        assert service.eye.frames_averaged == 4
    finally:
        service.close()


def test_a_look_at_a_frame_outside_the_validated_pixel_sizes_is_refused_before_the_model_runs() -> None:
    loc = RecordingLocaliser()
    eye = Eye(ScriptedFrames([]), loc, min_score=0.5, um_per_px_range=(0.2, 1.0))
    for um_per_px in (0.2, 0.62, 1.0):  # the range is inclusive
        assert len(eye.locate(frame(1, 10, 0.0, um_per_px=um_per_px))) == 1
    for um_per_px in (0.15, 1.3):
        with pytest.raises(NoFrame, match=f"pixel size {um_per_px:g} µm is outside .* 0.2-1 µm per pixel"):
            eye.locate(frame(2, 10, 0.0, um_per_px=um_per_px))
    assert len(loc.seen) == 3  # refused frames never reached the model
    assert len(Eye(ScriptedFrames([]), loc, min_score=0.5).locate(frame(3, 10, 0.0, um_per_px=5.0))) == 1  # no limit


def test_the_validated_pixel_size_range_is_checked_and_reaches_the_calibration_service(tmp_path: Path) -> None:
    from config.models import LocaliserConfig

    assert LocaliserConfig().um_per_px_range == (0.2, 1.0)
    assert LocaliserConfig.model_validate({"um_per_px_range": [0.3, 1.5]}).um_per_px_range == (0.3, 1.5)
    for bad in ([1.0, 0.5], [0.5, 0.5], [0.0, 1.0], [0.5], [0.2, 1.0, 2.0], "wide"):
        with pytest.raises(pydantic.ValidationError, match="um_per_px_range"):
            LocaliserConfig.model_validate({"um_per_px_range": bad})
    service = CalibrationService(RigIdentity(), CalibrationConfig(), {}, ScriptedFrames([]), RecordingLocaliser(),
                                 store_dir=tmp_path, min_score=0.7, um_per_px_range=(0.3, 0.9))
    try:
        assert (service.eye.min_score, service.eye.um_per_px_range) == (0.7, (0.3, 0.9))
    finally:
        service.close()


def test_pixel_size_refusal_names_the_range_and_the_rigs_pixel_size() -> None:
    from localisation.types import pixel_size_refusal

    assert pixel_size_refusal(0.62, (0.2, 1.0), 0.62) is None
    assert pixel_size_refusal(0.626, (0.2, 1.0), 0.62) is None  # within 1 %: the same zoom, rounded
    assert "differs from the rig's 0.62 µm" in pixel_size_refusal(0.31, (0.2, 1.0), 0.62)
    assert "validated range" in pixel_size_refusal(1.5, (0.2, 1.0), 1.5)
    assert pixel_size_refusal(0.31, None, None) is None


def test_the_simulations_oracle_localises_an_averaged_frame() -> None:
    """``patchrig sim --localiser oracle`` with ``frames_averaged = 2`` found no tip: the oracle
    knew only the rendered arrays, and an average is a new one."""
    from rig.sim_oracle import OracleLocaliser
    from simulators.microscope import SimMicroscope
    from simulators.world import SimWorld

    world = SimWorld(seed=0, um_per_px=0.62, image_size_px=(128, 128))
    world.add_channel("A", n_axes=3, position_um=np.full(3, 10_000.0))
    microscope = SimMicroscope(world, rate_hz=20, seed=1)
    oracle = OracleLocaliser(microscope, noise_px=0.0)
    try:
        frames = [microscope.render_frame() for _ in range(10)]
        for frame in frames:
            oracle._on_frame(frame)
        truth = [(t.x_px, t.y_px) for t in microscope.last_truth.values() if t.visible]
        assert truth
        for first in (8, 1):  # the mean of the newest 2, and of the newest 9 (more than it once matched)
            mean = np.rint(np.mean(np.stack([f.pixels for f in frames[first:]]), axis=0)).astype(frames[0].pixels.dtype)
            assert [(d.x_px, d.y_px) for d in oracle.locate(mean, 0.62)] == truth
        assert oracle.locate(np.zeros_like(mean), 0.62) == []  # a frame it never saw: nothing
    finally:
        oracle.close()
        microscope.close()
