"""Continuous offset correction: drift and jumps followed; bad, low-confidence, stale, moving
and jumping detections rejected and never applied."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import support_calibration as sc

from calibration.correction import OffsetCorrector
from calibration.service import CalibrationService
from calibration.store import CalibrationStore, StoredCalibration
from calibration.transform import ChannelCalibration
from config.models import CalibrationConfig, RigIdentity
from localisation.types import TipDetection
from rig.frame import Frame


def _corrector(**kw) -> OffsetCorrector:
    args = dict(min_confidence=0.7, max_jump_um=10.0, stale_after_s=1.0)
    args.update(kw)
    return OffsetCorrector("A", **args)


def _feed(c: OffsetCorrector, offset: np.ndarray, truth: np.ndarray, rng, n=1, **kw):
    """Feed n observations of a tip whose true offset is ``truth``; return the new offset."""
    for _ in range(n):
        e = truth - offset + rng.normal(0, 0.3, 2)
        d = c.update(e, score=kw.get("score", 0.95), frame_age_s=kw.get("age", 0.05), moving=kw.get("moving", False))
        if d.applied_delta_xy_um is not None:
            offset = offset + np.array(d.applied_delta_xy_um)
    return offset


def test_drift_is_followed():
    rng = np.random.default_rng(0)
    c = _corrector()
    offset = np.zeros(2)
    truth = np.zeros(2)
    errors = []
    for _ in range(300):
        truth = truth + np.array([0.02, -0.01])  # slow drift: 6 µm / 3 µm over the run
        offset = _feed(c, offset, truth, rng)
        errors.append(np.linalg.norm(truth - offset))
    assert np.median(errors[50:]) < 0.8
    assert np.linalg.norm(truth - offset) < 1.0


def test_a_jump_is_confirmed_then_applied():
    rng = np.random.default_rng(1)
    c = _corrector()
    offset = _feed(c, np.zeros(2), np.zeros(2), rng, n=10)
    jumped = np.array([5.0, -3.0])  # 5.8 µm: below the jump limit, above the outlier limit
    decisions = [c.update(jumped - offset, score=0.95, frame_age_s=0.0, moving=False) for _ in range(2)]
    assert all(not d.accepted and d.reason.startswith("outlier") for d in decisions)
    d = c.update(jumped - offset + 0.1, score=0.95, frame_age_s=0.0, moving=False)
    assert d.accepted and "jump confirmed" in d.reason
    assert np.linalg.norm(np.array(d.applied_delta_xy_um) - jumped) < 0.5


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"score": 0.3}, "low confidence"),
        ({"age": 2.0}, "stale frame"),
        ({"moving": True}, "moving"),
    ],
)
def test_bad_observations_are_rejected_and_never_applied(kw, reason):
    c = _corrector()
    for _ in range(20):
        d = c.update(np.array([4.0, 4.0]), score=kw.get("score", 0.95), frame_age_s=kw.get("age", 0.0), moving=kw.get("moving", False))
        assert not d.accepted and d.reason.startswith(reason) and d.applied_delta_xy_um is None


def test_too_large_jumps_and_isolated_outliers_are_never_applied():
    rng = np.random.default_rng(2)
    c = _corrector()
    offset = _feed(c, np.zeros(2), np.zeros(2), rng, n=10)
    for _ in range(10):
        d = c.update(np.array([30.0, 0.0]), score=0.99, frame_age_s=0.0, moving=False)
        assert not d.accepted and d.reason.startswith("jump too large")
    for i in range(50):  # one wild detection in five, in random directions
        e = rng.normal(0, 0.3, 2) - offset
        if i % 5 == 0:
            e = e + np.array([6.0, 0.0]) * rng.choice([-1, 1]) + rng.normal(0, 2.0, 2)
        d = c.update(e, score=0.95, frame_age_s=0.0, moving=False)
        if d.applied_delta_xy_um is not None:
            offset = offset + np.array(d.applied_delta_xy_um)
    assert np.linalg.norm(offset) < 0.6


def test_non_finite_is_rejected():
    d = _corrector().update(np.array([np.nan, 0.0]), score=0.9, frame_age_s=0.0, moving=False)
    assert not d.accepted and d.reason == "not finite"


# -- through the service, in the simulated world (oracle localiser) ----------------------------


@contextlib.contextmanager
def _oracle_rig(seed: int, n_channels: int):
    """(world, oracle camera, oracle localiser, simulated manipulators, calibration service,
    its temporary store directory), closed on exit."""
    world = sc.make_world(seed, n_channels)
    cam = sc.OracleCamera(world, advance_world=False)
    loc = sc.OracleLocaliser(cam, seed=seed)
    with sc.closing_all(sc.make_manipulators(world)) as ms, tempfile.TemporaryDirectory() as tmp:
        yield world, cam, loc, ms, CalibrationService(RigIdentity(), CalibrationConfig(), ms, cam, loc, store_dir=tmp), tmp


def test_service_corrects_drift_and_jumps_in_the_world():
    with _oracle_rig(3, 2) as (world, cam, loc, ms, service, tmp):
        cam.start()
        for ch in ms:
            service.calibrate(ch)
        for ch in ms:
            assert sc.true_xy_error_um(world, service._calibration(ch), ms[ch].position_um) < 1.0
        time.sleep(0.1)
        world.jump("A", np.array([6.0, -4.0, 0.0]))
        drift = np.zeros(3)
        for _ in range(60):
            drift += np.array([0.02, 0.02, 0.0])
            world.jump("B", np.array([0.02, 0.02, 0.0]))  # slow drift of B
            frame = cam.render()
            result = service.observe(frame, loc.locate(frame.pixels, frame.um_per_px))
            assert set(result["assigned"]) == {"A", "B"}
        for ch in ms:
            assert sc.true_xy_error_um(world, service._calibration(ch), ms[ch].position_um) < 1.0, ch
        history = service.get_calibration("A")["offset_history"]
        assert any(h["source"] == "correction" for h in history)
        service.close()


def test_service_never_applies_low_confidence_stale_or_moving_frames():
    with _oracle_rig(4, 1) as (world, cam, loc, ms, service, tmp):
        cam.start()
        service.calibrate("A")
        time.sleep(0.1)
        before = service._calibration("A").offset_um.copy()
        world.jump("A", np.array([5.0, 0.0, 0.0]))
        px = world.true_tip_px("A")
        fresh = cam.render()
        low = [TipDetection(float(px[0]), float(px[1]), 0.2)]
        for _ in range(10):
            out = service.observe(cam.render(), low)
            assert out["corrections"]["A"]["reason"].startswith("low confidence")
        stale = Frame(fresh.frame_id, fresh.t_s, fresh.pixels, fresh.um_per_px, fresh.z_um, fresh.received_s - 5.0)
        good = [TipDetection(float(px[0]), float(px[1]), 0.95)]
        for _ in range(10):
            out = service.observe(stale, good)
            assert out["corrections"]["A"]["reason"].startswith("stale")
        # a frame received before the last move ended counts as taken while moving
        old_frame = cam.render()
        handle = ms["A"].move_to(ms["A"].position_um + np.array([0.5, 0.0, 0.0]))
        handle.wait(5.0)
        for _ in range(10):
            out = service.observe(old_frame, good)
            assert out["corrections"]["A"]["reason"].startswith(("moving", "stale"))
        np.testing.assert_array_equal(service._calibration("A").offset_um, before)


class _HeldStore(CalibrationStore):
    """Writes a calibration file only once ``release`` is set (a slow or busy disk)."""

    def __init__(self, directory, rig) -> None:
        super().__init__(directory, rig)
        self.saving = threading.Event()
        self.release = threading.Event()

    def save(self, channel, stored):
        self.saving.set()
        assert self.release.wait(10.0)
        return super().save(channel, stored)


def test_a_slow_calibration_write_never_blocks_status_reads():
    """The server loop asks ``is_calibrated`` for ``status``; it must not wait on a disk."""
    with _oracle_rig(5, 1) as (world, cam, loc, ms, service, tmp):
        cam.start()
        service.store = store = _HeldStore(service.store.directory, service.store.rig)
        calibrating = threading.Thread(target=service.calibrate, args=("A",))
        calibrating.start()
        try:
            assert store.saving.wait(30.0)  # calibrated; the file write is held
            reads: list[object] = []
            reader = threading.Thread(target=lambda: reads.extend(
                [service.is_calibrated("A"), service.get_calibration("A")["calibrated"]]))
            reader.start()
            reader.join(5.0)
            assert not reader.is_alive() and reads == [True, True]
            assert not (Path(tmp) / "A.json").exists()  # still being written
        finally:
            store.release.set()
            calibrating.join(30.0)
        assert (Path(tmp) / "A.json").is_file()
        assert CalibrationStore(tmp, service.store.rig).load("A") is not None
        service.close()


def test_a_move_that_starts_while_the_position_is_read_is_not_a_correction():
    """A plain move does not take the operation lock, so it can start between the "is it
    still" check and the position read-back. That read-back is not the frame's position: the
    correction must be refused as moving, not counted as a vote."""
    with _oracle_rig(6, 1) as (world, cam, loc, ms, service, tmp):
        cam.start()
        service.calibrate("A")
        m = ms["A"]
        time.sleep(service.settle_s + 0.05)
        world.jump("A", np.array([3.0, 0.0, 0.0]))
        frame = cam.render()
        px = world.true_tip_px("A")
        good = [TipDetection(float(px[0]), float(px[1]), 0.95)]
        handles: list = []
        armed: list[bool] = []
        real_read, real_moving_during = m._do_read_position_um, service._moving_during

        def still_check(manipulator, frame):  # type: ignore[no-untyped-def]
            moving = real_moving_during(manipulator, frame)
            armed.append(True)  # the window: checked still, position not yet read
            return moving

        def read_as_a_move_starts():  # type: ignore[no-untyped-def]
            position = real_read()
            if armed and not handles:
                handles.append(m.move_to(np.asarray(position) + np.array([30.0, 0.0, 0.0]), 10.0))
            return position

        m._do_read_position_um = read_as_a_move_starts  # type: ignore[method-assign]
        service._moving_during = still_check  # type: ignore[method-assign]
        try:
            out = service.observe(frame, good)
        finally:
            m._do_read_position_um = real_read  # type: ignore[method-assign]
            m.stop("test")
        assert handles, "the move never started"
        decision = out["corrections"]["A"]
        assert not decision["accepted"] and decision["reason"].startswith("moving"), decision


def _calibration_for(channel: str, n_axes: int) -> StoredCalibration:
    matrix = np.zeros((3, n_axes))
    matrix[:, :3] = np.eye(3)
    cal = ChannelCalibration(channel, matrix, np.zeros(3), np.zeros((2, n_axes, n_axes)), np.zeros(n_axes),
                             0.01, 0.1, 10, 10)
    stored = StoredCalibration(cal)
    stored.record("calibrate")
    return stored


def test_a_refused_calibration_file_is_kept_aside_when_the_channel_is_recalibrated():
    world = sc.make_world(7, 1)
    cam = sc.OracleCamera(world, advance_world=False)
    loc = sc.OracleLocaliser(cam, seed=7)
    with sc.closing_all(sc.make_manipulators(world)) as ms, tempfile.TemporaryDirectory() as tmp:
        other_objective = RigIdentity(objective="40x/0.8")
        old = CalibrationStore(Path(tmp), other_objective).save("A", _calibration_for("A", ms["A"].n_axes))
        old_text = old.read_text()
        service = CalibrationService(RigIdentity(), CalibrationConfig(), ms, cam, loc, store_dir=tmp)
        assert "40x/0.8" in service.get_calibration("A")["refused"]
        cam.start()
        service.calibrate("A")
        kept = list(Path(tmp).glob("A.refused-*.json"))
        assert len(kept) == 1 and kept[0].read_text() == old_text
        assert CalibrationStore(Path(tmp), RigIdentity()).load("A") is not None  # the new one
        service.close()


def test_a_calibration_file_for_another_number_of_axes_is_refused():
    world = sc.make_world(8, 1)
    cam = sc.OracleCamera(world, advance_world=False)
    loc = sc.OracleLocaliser(cam, seed=8)
    with sc.closing_all(sc.make_manipulators(world)) as ms, tempfile.TemporaryDirectory() as tmp:
        wrong = 4 if ms["A"].n_axes == 3 else 3
        CalibrationStore(Path(tmp), RigIdentity()).save("A", _calibration_for("A", wrong))
        service = CalibrationService(RigIdentity(), CalibrationConfig(), ms, cam, loc, store_dir=tmp)
        assert not service.is_calibrated("A")
        assert "axes" in service.get_calibration("A")["refused"]
        service.close()


def test_outliers_waiting_for_a_jump_confirmation_are_bounded() -> None:
    """Alternating ±5 µm innovations never confirm a jump; they used to pile up without limit."""
    corrector = OffsetCorrector("A", min_confidence=0.5, max_jump_um=20.0, stale_after_s=1.0)
    for _ in range(10):
        corrector.update(np.array([0.1, 0.0]), score=0.9, frame_age_s=0.0, moving=False)
    for i in range(2000):
        corrector.update(np.array([5.0 if i % 2 else -5.0, 0.0]), score=0.9, frame_age_s=0.0, moving=False)
    assert len(corrector._pending) <= corrector.jump_votes
