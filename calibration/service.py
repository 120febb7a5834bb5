"""The calibration service: what the daemon calls for everything that needs a calibration.

    service = CalibrationService(rig, cfg, manipulators, frames, localiser,
                                 store_dir=None, localiser_lock=None, focal_z_um=None,
                                 stale_after_s=1.0, z_up_signs=None, settings=None,
                                 settle_s=0.05, min_score=0.5, um_per_px_range=None)

``rig``: ``config.models.RigIdentity`` (a stored calibration made for another rig name,
objective or pixel size is refused); ``cfg``: ``config.models.CalibrationConfig`` (gate,
confidence, jump limit, tolerance, iterations, directory); ``manipulators``: channel name ->
``Manipulator``; ``frames``: a ``rig.frame_sources.FrameSource`` (started by the caller);
``localiser``: anything with ``locate(pixels, um_per_px)``. ``localiser_lock``: pass the lock
the daemon's localiser worker holds while it uses the same model (the service takes it around
every ``locate`` call); without one, the localiser must be safe to call from two threads.
``focal_z_um``: the focal plane when frames carry no ``z_um``. ``z_up_signs``: per channel,
+1 if manipulator +z moves the tip up (default), -1 if down (4-axis devices measure it).
``min_score``: detections below it, or below ``cfg.min_confidence`` (the higher of the two
counts), are ignored by calibrate, set_tip and move_tip, which re-pin and store offsets from
what they see (and also gate by position); continuous correction uses ``cfg.min_confidence``.
calibrate and move_tip refuse (Busy) a pipette that is moving, and look only at frames taken
after its last move ended plus the settling time.
``um_per_px_range``: frames whose pixel size (µm) lies outside it are refused by calibrate,
set_tip and move_tip (NoFrame, raised at the first look, before anything moves); None: no
limit. The daemon passes ``[localiser] um_per_px_range`` and ``min_score``.

Methods (every returned dict is JSON-able; units are in the key names):

- ``calibrate(channel, *, progress=None, cancel=None) -> dict``: the automatic calibration
  (``calibration.auto``): moves, residual_um, points, the calibration. Persisted at once.
  Raises NotCalibrated (tip not visible, not identified, poor fit, move budget), Stopped,
  OutOfBounds, NoFrame, DeviceError, Busy (another operation runs on the channel).
- ``set_tip(channel, px=None) -> dict``: offset-only recalibration at the current position from
  the tip detected now (the detection assigned to this channel, else the only unassigned one)
  or from the pixel ``px`` = [x, y] the user gives. Persisted at once.
- ``get_calibration(channel) -> dict``: ``calibrated``, the calibration, ``uncertainty_um``
  at the current position, the rig identity, the recent offset history, ``refused`` (why a
  stored file was not loaded) and ``path``.
- ``is_calibrated(channel) -> bool``; ``predicted_tip_px(channel) -> (x, y) | None`` (read-back
  position through the calibration, in the pixels of the newest frame).
- ``assign(detections, frame) -> dict``: Hungarian assignment: ``assigned`` {channel: {x_px,
  y_px, score, distance_um, predicted_x_px, predicted_y_px}}, ``unassigned`` [{x_px, y_px,
  score}], ``missing`` [channel].
- ``observe(frame, detections) -> dict``: ``assign`` plus continuous correction (for the
  daemon's localiser worker): adds ``corrections`` {channel: {accepted, reason,
  innovation_xy_um, applied_delta_xy_um}}. Channels busy with calibrate/move_tip/set_tip are
  not corrected ("busy"). Cheap: no device I/O besides reading positions.
- ``move_tip(channel, *, target_px=None, target_um=None, tolerance_um=None,
  max_iterations=None, speed_um_s=None, progress=None, cancel=None) -> dict``: closed loop
  (``calibration.closed_loop``). ``target_px`` = [x, y] in the newest frame's pixels;
  ``target_um`` = [X, Y] or [X, Y, Z] microscope µm. Without Z the target is in the focal
  plane (a pixel target is where the user sees it: in focus).
  ``verified`` is False when the tip could not be detected at the target and the last
  ``unverified_um`` (at most ``[calibration] unverified_final_um``) were moved open loop
  from where it was seen, or when nothing showed that the detection at the target moves with
  the pipette (the calibration is then not re-pinned on it; see ``calibration.closed_loop``).
  Raises OutOfBounds (target outside the limits, or closer than ``min_tip_separation_um``
  to another channel's tip; nothing moved), MoveTipFailed (returned to the start; code
  "timeout", or the code of the error that ended it after the first move, such as
  "no_frame" or "device_error"), NotCalibrated, Stopped.
- ``check_separation(channel, target_um) -> None``: the collision guard of move_tip alone.
  Raises OutOfBounds when the target (microscope X, Y, Z µm) lies within
  ``[calibration] min_tip_separation_um`` (3-D distance) of another calibrated channel's tip,
  predicted from its read-back position. Only the end point is checked, not the path, and
  uncalibrated channels are unknown to it.
- ``close()``: writes any correction not yet persisted.

``progress`` is called with keyword fields only (e.g. ``Operation.progress``); ``cancel`` is a
``threading.Event``. ``manipulator.stop()`` during an operation raises ``Stopped`` out of it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from calibration.assignment import Assignment, assign_detections
from calibration.auto import AutoCalibrationSettings, AutoCalibrator
from calibration.closed_loop import check_move_tip_goal
from calibration.closed_loop import move_tip as closed_loop_move_tip
from calibration.correction import OffsetCorrector
from calibration.observe import Eye, Look
from calibration.set_tip import set_tip_offset
from calibration.store import CalibrationStore, StoredCalibration
from calibration.transform import ChannelCalibration, px_to_um, um_to_px
from config.models import CalibrationConfig, RigIdentity
from localisation.types import TipDetection
from manipulators.base import Manipulator
from rig.errors import (
    Busy,
    DataError,
    InvalidParams,
    NoFrame,
    NotCalibrated,
    NotFound,
    OutOfBounds,
    PatchrigError,
)
from rig.frame import Frame
from rig.logs import get_logger

Progress = Callable[..., None]

#: minimum seconds between two writes caused by continuous correction (calibrate/set_tip write at once)
CORRECTION_SAVE_INTERVAL_S = 5.0
OPERATION_WAIT_S = 0.5  # how long an operation waits for a continuous correction to release the channel


class CalibrationService:
    """Calibrations of all channels, their persistence, assignment and correction (see module doc)."""

    def __init__(
        self,
        rig: RigIdentity,
        cfg: CalibrationConfig,
        manipulators: dict[str, Manipulator],
        frames: Any,
        localiser: Any,
        *,
        store_dir: Path | None = None,
        localiser_lock: threading.Lock | None = None,
        focal_z_um: float | None = None,
        stale_after_s: float = 1.0,
        z_up_signs: dict[str, float] | None = None,
        settings: AutoCalibrationSettings | None = None,
        settle_s: float = 0.05,
        min_score: float = 0.5,
        um_per_px_range: tuple[float, float] | None = None,
    ) -> None:
        self.rig = rig
        self.cfg = cfg
        self.manipulators = dict(manipulators)
        self.frames = frames
        self.settle_s = float(settle_s)
        self.stale_after_s = float(stale_after_s)
        self.settings = settings or AutoCalibrationSettings()
        self.z_up_signs = dict(z_up_signs or {})
        self.eye = Eye(
            frames,
            localiser,
            # closed-loop looks re-pin and store offsets: below [calibration] min_confidence a
            # detection never does that (nor corrects continuously), whatever min_score is
            min_score=max(float(min_score), float(cfg.min_confidence)),
            localiser_lock=localiser_lock,
            settle_s=settle_s,
            focal_z_um=focal_z_um,
            frames_averaged=cfg.frames_averaged,
            um_per_px_range=um_per_px_range,
            rig_um_per_px=rig.um_per_px,  # the pixel size the stored calibrations are for
        )
        self.log = get_logger("patchrig.calibration")
        self.store = CalibrationStore(store_dir if store_dir is not None else cfg.directory, rig)
        self._lock = threading.RLock()  # guards _stored, _dirty, _saved_s, _refused, _save_generation
        self._op_locks = {name: threading.Lock() for name in self.manipulators}
        self._stored: dict[str, StoredCalibration | None] = {}
        self._refused: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._saved_s: dict[str, float] = {}
        self._save_locks = {name: threading.Lock() for name in self.manipulators}  # one file write at a time
        self._save_generation: dict[str, int] = {}  # snapshots taken, per channel (under _lock)
        self._written_generation: dict[str, int] = {}  # the newest on disk (under the save lock)
        self._correctors = {
            name: OffsetCorrector(
                name,
                min_confidence=cfg.min_confidence,
                max_jump_um=cfg.max_offset_jump_um,
                stale_after_s=self.stale_after_s,
            )
            for name in self.manipulators
        }
        for name in self.manipulators:
            self._load(name)

    # -- persistence ------------------------------------------------------------------------
    def _load(self, channel: str) -> None:
        try:
            stored = self.store.load(channel)
            n_axes = self.manipulators[channel].n_axes
            if stored is not None and stored.calibration.n_axes != n_axes:
                raise DataError(f"calibration file {self.store.path(channel)} is for {stored.calibration.n_axes} "
                                f"axes, channel {channel!r} has {n_axes}; refused, recalibrate this channel")
        except PatchrigError as exc:
            self._refused[channel] = str(exc)
            self._stored[channel] = None
            self.log.warning("stored calibration not loaded", channel=channel, reason=str(exc))
            return
        self._stored[channel] = stored
        if stored is not None:
            self.log.info("calibration loaded", channel=channel, path=str(self.store.path(channel)))

    def _save(self, channel: str, *, force: bool) -> None:
        """Write ``channel``'s calibration file (at most every ``CORRECTION_SAVE_INTERVAL_S``
        unless ``force``). The file is written outside ``self._lock``: the server loop takes
        that lock (``is_calibrated``, for ``status`` and ``move_tip``), and a ``stop`` queued
        behind it must never wait on a disk. Saves of one channel are ordered: an older
        snapshot never overwrites a newer one."""
        with self._lock:
            stored = self._stored.get(channel)
            if stored is None:
                return
            now = time.monotonic()
            if not force and now - self._saved_s.get(channel, -math.inf) < CORRECTION_SAVE_INTERVAL_S:
                self._dirty.add(channel)
                return
            snapshot = StoredCalibration(stored.calibration, list(stored.offset_history))
            refused_file = channel in self._refused  # the file on disk was refused at load
            self._save_generation[channel] = generation = self._save_generation.get(channel, 0) + 1
            self._saved_s[channel] = now  # also spaces out retries after a failed write
            self._dirty.discard(channel)
        with self._save_locks[channel]:
            if generation < self._written_generation.get(channel, 0):
                return  # a newer snapshot is already on disk
            try:
                if refused_file:
                    aside = self.store.set_aside(channel)
                    if aside is not None:
                        self.log.warning("refused calibration file kept aside", channel=channel, path=str(aside))
                self.store.save(channel, snapshot)
            except (OSError, ValueError, DataError) as exc:
                with self._lock:
                    self._dirty.add(channel)
                message = f"calibration file could not be written ({exc}); the calibration is in use but NOT saved"
                if not force:  # background correction: log, never break the localiser worker
                    self.log.warning("calibration not saved", channel=channel, reason=str(exc))
                    return
                raise DataError(message, channel=channel) from exc
            self._written_generation[channel] = generation
        with self._lock:
            self._refused.pop(channel, None)

    def _install(self, channel: str, calibration: ChannelCalibration, source: str, *, keep_history: bool = True) -> None:
        with self._lock:
            old = self._stored.get(channel)
            history = list(old.offset_history) if (old is not None and keep_history) else []
            stored = StoredCalibration(calibration, history)
            delta = None if old is None else (calibration.offset_um - old.calibration.offset_um).tolist()
            stored.record(source, delta)
            self._stored[channel] = stored
        self._correctors[channel].reset()
        self._save(channel, force=True)

    def close(self) -> None:
        """Persist corrections not yet written: every channel is tried; DataError naming those
        that could not be written."""
        with self._lock:
            dirty = list(self._dirty)
        failed = []
        for channel in sorted(dirty):
            try:
                self._save(channel, force=True)
            except DataError as exc:
                failed.append(str(exc))
        if failed:
            raise DataError("; ".join(failed))

    # -- helpers ----------------------------------------------------------------------------
    def _manipulator(self, channel: str) -> Manipulator:
        try:
            return self.manipulators[channel]
        except KeyError:
            raise NotFound(f"unknown channel {channel!r}; channels: {sorted(self.manipulators)}") from None

    def _calibration(self, channel: str) -> ChannelCalibration:
        self._manipulator(channel)
        with self._lock:
            stored = self._stored.get(channel)
            if stored is None:
                why = self._refused.get(channel)
                raise NotCalibrated(why or "not calibrated; run calibrate first", channel=channel)
            return stored.calibration

    def _operation(self, channel: str) -> threading.Lock:
        """The channel's operation lock, held by calibrate, set_tip and move_tip. A continuous
        correction also holds it, for milliseconds (plus an occasional atomic save), so an
        operation waits up to ``OPERATION_WAIT_S`` for it instead of failing as busy because a
        frame was being corrected at that instant; another operation still fails it (Busy)."""
        self._manipulator(channel)
        lock = self._op_locks[channel]
        if not lock.acquire(timeout=OPERATION_WAIT_S):
            raise Busy("another calibration operation is running on this channel", channel=channel)
        return lock

    def _geometry(self) -> tuple[float, tuple[int, int]] | None:
        frame = self.frames.latest()
        if frame is None:
            return None
        return float(frame.um_per_px), frame.shape

    def _predictions_px(self, um_per_px: float, shape: tuple[int, int], overrides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, m in self.manipulators.items():
            if overrides and name in overrides:
                out[name] = overrides[name]
                continue
            with self._lock:
                stored = self._stored.get(name)
            if stored is None:
                continue
            try:
                out[name] = stored.calibration.to_px(m.position_um, um_per_px, shape)
            except PatchrigError as exc:  # a lost device must not break the others' assignment
                self.log.warning("no prediction", channel=name, reason=str(exc))
        return out

    def _assign(self, detections: list[TipDetection], frame: Frame, overrides: dict[str, np.ndarray] | None = None) -> Assignment:
        predicted = self._predictions_px(frame.um_per_px, frame.shape, overrides)
        return assign_detections(predicted, detections, um_per_px=frame.um_per_px, gate_um=self.cfg.assignment_gate_um)

    def _moving_during(self, m: Manipulator, frame: Frame) -> bool:
        if m.is_busy():
            return True
        handle = m.current_move
        if handle is None:
            return False
        if handle.finished_s is None:
            return True
        return frame.received_s < handle.finished_s + self.settle_s

    # -- public API -------------------------------------------------------------------------
    def is_calibrated(self, channel: str) -> bool:
        self._manipulator(channel)
        with self._lock:
            return self._stored.get(channel) is not None

    def get_calibration(self, channel: str) -> dict[str, Any]:
        m = self._manipulator(channel)
        with self._lock:
            stored = self._stored.get(channel)
            refused = self._refused.get(channel)
        out: dict[str, Any] = {
            "channel": channel,
            "calibrated": stored is not None,
            "rig": {"name": self.rig.name, "objective": self.rig.objective, "um_per_px": self.rig.um_per_px},
            "path": str(self.store.path(channel)),
            "refused": refused,
        }
        if stored is not None:
            cal = stored.calibration
            out["calibration"] = cal.as_dict()
            try:
                position = m.position_um
                out["position_um"] = position.tolist()
                out["tip_um"] = cal.to_microscope_um(position).tolist()
                out["uncertainty_um"] = cal.uncertainty_um(position)
            except PatchrigError as exc:
                out["position_error"] = str(exc)
            out["offset_history"] = stored.offset_history[-20:]
            out["offset_history_length"] = len(stored.offset_history)
            out["corrections"] = dict(self._correctors[channel].counts)
        return out

    def check_target_px(self, channel: str, px: Any) -> tuple[np.ndarray, tuple[float, tuple[int, int]]]:
        """``px`` as a pixel (x, y) inside the newest frame, with that frame's geometry
        (µm per pixel, shape); InvalidParams or NoFrame otherwise. The daemon calls it to refuse
        a bad ``move_tip`` before it supersedes anything, and ``move_tip`` again."""
        xy = _pixel(px)
        geometry = self._geometry()
        if geometry is None:
            raise NoFrame("no frame yet: cannot convert the target pixel to µm", channel=channel)
        _check_in_frame(xy, geometry[1], channel)
        return xy, geometry

    def predicted_tip_px(self, channel: str) -> tuple[float, float] | None:
        m = self._manipulator(channel)
        with self._lock:
            stored = self._stored.get(channel)
        geometry = self._geometry()
        if stored is None or geometry is None:
            return None
        xy = stored.calibration.to_px(m.position_um, *geometry)
        return float(xy[0]), float(xy[1])

    def assign(self, detections: list[TipDetection], frame: Frame) -> dict[str, Any]:
        return self._assign(list(detections), frame).as_dict(list(detections))

    def observe(self, frame: Frame, detections: list[TipDetection]) -> dict[str, Any]:
        detections = list(detections)
        assignment = self._assign(detections, frame)
        out = assignment.as_dict(detections)
        corrections: dict[str, Any] = {}
        age_s = time.monotonic() - frame.received_s
        for channel, tip in assignment.assigned.items():
            lock = self._op_locks[channel]
            if not lock.acquire(blocking=False):
                corrections[channel] = {"accepted": False, "reason": "busy: an operation is running"}
                continue
            try:
                corrections[channel] = self._correct(channel, tip.detection, frame, age_s)
            finally:
                lock.release()
        out["corrections"] = corrections
        self._save_due_corrections()
        return out

    def _save_due_corrections(self) -> None:
        """Write the corrections held back by ``CORRECTION_SAVE_INTERVAL_S`` once it has passed
        (on every observed frame: a converged offset gets no more corrections, and would
        otherwise stay unsaved until shutdown)."""
        with self._lock:
            now = time.monotonic()
            due = [c for c in self._dirty if now - self._saved_s.get(c, -math.inf) >= CORRECTION_SAVE_INTERVAL_S]
        for channel in due:
            self._save(channel, force=False)

    def _correct(self, channel: str, detection: TipDetection, frame: Frame, age_s: float) -> dict[str, Any]:
        m = self.manipulators[channel]
        try:
            move_before = m.current_move
            moving = self._moving_during(m, frame)
            position = m.position_um
            # a move may have started while the position was being read (a plain move does not
            # take the operation lock): that read-back is not the frame's position
            moving = moving or m.is_busy() or m.current_move is not move_before
        except PatchrigError as exc:
            return {"accepted": False, "reason": f"device: {exc}"}
        with self._lock:
            stored = self._stored.get(channel)
            if stored is None:
                return {"accepted": False, "reason": "not calibrated"}
            cal = stored.calibration
            predicted = cal.to_microscope_um(position)[:2]
            seen = px_to_um(np.array([detection.x_px, detection.y_px]), frame.um_per_px, frame.shape)
            decision = self._correctors[channel].update(seen - predicted, score=detection.score, frame_age_s=age_s, moving=moving)
            if decision.applied_delta_xy_um is not None:
                stored.calibration = cal.shifted_xy(np.array(decision.applied_delta_xy_um))
                stored.record("correction", [*decision.applied_delta_xy_um, 0.0])
        if decision.applied_delta_xy_um is not None:
            self._save(channel, force=False)
        return decision.as_dict()

    def calibrate(self, channel: str, *, progress: Progress | None = None, cancel: threading.Event | None = None) -> dict[str, Any]:
        m = self._manipulator(channel)
        lock = self._operation(channel)
        try:
            settings = self.settings
            sign = self.z_up_signs.get(channel)
            if sign is not None:
                settings = dataclasses.replace(settings, z_up_sign=float(sign))
            result = AutoCalibrator(m, self.eye, settings, progress=progress, cancel=cancel).run()
            self._install(channel, result.calibration, "calibrate")
            self.log.info("calibration saved", channel=channel, moves=result.moves, residual_um=round(result.fit.residual_um, 3))
            return {**result.as_dict(), "calibration": result.calibration.as_dict(), "path": str(self.store.path(channel))}
        finally:
            lock.release()

    def set_tip(self, channel: str, px: list[float] | tuple[float, float] | None = None) -> dict[str, Any]:
        m = self._manipulator(channel)
        self._calibration(channel)  # NotCalibrated before waiting for the lock
        lock = self._operation(channel)
        try:
            cal = self._calibration(channel)  # under the lock: after a calibration that just ended
            if px is not None:
                xy = _pixel(px)
                frame = self.frames.latest()
                if frame is None:
                    raise NoFrame("no frame yet: cannot convert the pixel to µm")
                _check_in_frame(xy, frame.shape, channel)
                focal = self.eye.focal_z_of(frame)
                source = "user pixel"
            else:
                look = self.eye.look_after(time.monotonic() - self.settle_s)
                detection = self._own_tip(channel, look)
                frame, focal = look.frame, look.focal_z_um
                xy = np.array([detection.x_px, detection.y_px])
                source = "detection"
            # the tip's pixel and the read-back position must describe the same instant: a
            # pipette that moved during or after the frame would give a wrong offset
            move_before = m.current_move
            if self._moving_during(m, frame):
                raise Busy("the pipette is moving (or was, during the frame): set_tip needs it still; "
                           "wait for the move to end or stop it", channel=channel)
            position = m.position_um
            if m.is_busy() or m.current_move is not move_before:  # a move, even one that ended during the read
                raise Busy("the pipette moved during set_tip; nothing was changed", channel=channel)
            tip_xy_um = px_to_um(xy, frame.um_per_px, frame.shape)
            new = set_tip_offset(cal, position, tip_xy_um, focal)
            self._install(channel, new, "set_tip")
            delta = new.offset_um - cal.offset_um
            self.log.info("tip set", channel=channel, source=source, delta_um=np.round(delta, 3).tolist())
            return {
                "channel": channel,
                "source": source,
                "tip_px": [float(xy[0]), float(xy[1])],
                "tip_um": new.to_microscope_um(position).tolist(),
                "offset_um": new.offset_um.tolist(),
                "offset_change_um": delta.tolist(),
                "position_um": position.tolist(),
            }
        finally:
            lock.release()

    def check_separation(self, channel: str, target_um: np.ndarray | list[float]) -> None:
        """Refuse (OutOfBounds) a target within ``min_tip_separation_um`` of another calibrated
        channel's predicted tip (microscope µm, 3-D): two tips driven together can collide,
        and the localiser cannot tell them apart."""
        limit_um = float(self.cfg.min_tip_separation_um)
        target = np.asarray(target_um, float).reshape(-1)[:3]
        if limit_um <= 0:
            return
        for name, m in self.manipulators.items():
            with self._lock:
                stored = self._stored.get(name)
            if name == channel or stored is None:
                continue
            try:
                other = stored.calibration.to_microscope_um(m.position_um)
            except PatchrigError:
                raise OutOfBounds(
                    f"cannot check the target against channel {name!r}'s tip (its position cannot be read); refused",
                    channel=channel,
                ) from None
            apart_um = float(np.linalg.norm(other[: target.size] - target))
            if apart_um < limit_um:
                raise OutOfBounds(
                    f"target {np.round(target, 1).tolist()} µm is {apart_um:.1f} µm from channel {name!r}'s tip "
                    f"(minimum separation {limit_um:.1f} µm); rejected, nothing moved",
                    channel=channel,
                )

    def _own_tip(self, channel: str, look: Look) -> TipDetection:
        """This channel's tip on ``look``: the assigned detection, else the only unassigned one."""
        if not look.detections:
            raise NotCalibrated("no tip visible: the localiser found no confident tip", channel=channel)
        assignment = self._assign(look.detections, look.frame)
        if channel in assignment.assigned:
            return assignment.assigned[channel].detection
        if len(assignment.unassigned) == 1:
            return look.detections[assignment.unassigned[0]]
        raise NotCalibrated(
            f"cannot tell which tip is this channel's ({len(assignment.unassigned)} unassigned tips); give px",
            channel=channel,
        )

    def move_tip(
        self,
        channel: str,
        *,
        target_px: list[float] | tuple[float, float] | None = None,
        target_um: list[float] | tuple[float, ...] | None = None,
        tolerance_um: float | None = None,
        max_iterations: int | None = None,
        speed_um_s: float | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        m = self._manipulator(channel)
        tolerance, iterations = self._move_tip_options(channel, target_px, target_um, tolerance_um, max_iterations)
        lock = self._operation(channel)
        try:
            cal = self._calibration(channel)  # under the lock: after any correction it waited for
            target = self._move_tip_target(channel, target_px, target_um)
            self.check_separation(channel, target)

            def find(look: Look, trial: ChannelCalibration, position: np.ndarray) -> TipDetection | None:
                own = trial.to_px(position, look.frame.um_per_px, look.frame.shape)
                assignment = self._assign(look.detections, look.frame, {channel: own})
                tip = assignment.assigned.get(channel)
                return None if tip is None else tip.detection

            result = closed_loop_move_tip(
                m,
                self.eye,
                cal,
                target,
                find,
                tolerance_um=tolerance,
                max_iterations=iterations,
                speed_um_s=speed_um_s,
                progress=progress,
                cancel=cancel,
                unverified_final_um=float(self.cfg.unverified_final_um),
            )
            self._install(channel, result.calibration, "move_tip")
            final_geometry = self._geometry()
            out = result.as_dict()
            if final_geometry is not None:
                out["tip_px"] = um_to_px(result.seen_xy_um, *final_geometry).tolist()
            out["tolerance_um"] = tolerance
            return out
        finally:
            lock.release()

    def check_move_tip(
        self,
        channel: str,
        *,
        target_px: list[float] | tuple[float, float] | None = None,
        target_um: list[float] | tuple[float, ...] | None = None,
        tolerance_um: float | None = None,
        max_iterations: int | None = None,
        speed_um_s: float | None = None,
    ) -> None:
        """Every check ``move_tip`` makes before it moves anything, for the daemon to run before
        the request supersedes the running operation: calibrated, options, target (in the
        newest frame, or finite µm), separation from the other tips, speed, and the first goal
        inside the limits. Reads device positions; raises and changes nothing."""
        m = self._manipulator(channel)
        self._move_tip_options(channel, target_px, target_um, tolerance_um, max_iterations)
        target = self._move_tip_target(channel, target_px, target_um)
        self.check_separation(channel, target)
        check_move_tip_goal(m, self._calibration(channel), target, m.position_um, speed_um_s)

    def _move_tip_options(
        self, channel: str, target_px: Any, target_um: Any, tolerance_um: float | None, max_iterations: int | None
    ) -> tuple[float, int]:
        """(tolerance µm, iterations) of a ``move_tip`` request; NotCalibrated or InvalidParams."""
        self._calibration(channel)  # NotCalibrated before anything else
        if (target_px is None) == (target_um is None):
            raise InvalidParams("give exactly one of target_px and target_um", channel=channel)
        tolerance = float(self.cfg.tolerance_um if tolerance_um is None else tolerance_um)
        iterations = int(self.cfg.max_iterations if max_iterations is None else max_iterations)
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise InvalidParams(f"tolerance_um must be positive, got {tolerance_um!r}", channel=channel)
        if not 1 <= iterations <= 50:
            raise InvalidParams(f"max_iterations must be 1..50, got {max_iterations!r}", channel=channel)
        return tolerance, iterations

    def _move_tip_target(self, channel: str, target_px: Any, target_um: Any) -> np.ndarray:
        """A ``move_tip`` target as microscope (X, Y, Z) µm: a pixel of the newest frame at its
        focal plane, or 2-3 finite µm (Z defaults to the focal plane)."""
        latest = self.frames.latest()
        focal_z = self.eye.focal_z_of(latest) if latest is not None else float(self.eye.focal_z_um or 0.0)
        if target_px is not None:
            xy, geometry = self.check_target_px(channel, target_px)
            return np.array([*px_to_um(xy, *geometry), focal_z])
        values = np.asarray(target_um, float).reshape(-1)
        if values.size not in (2, 3) or not np.all(np.isfinite(values)):
            raise InvalidParams("target_um must be 2 or 3 finite numbers (microscope µm)", channel=channel)
        return np.array([values[0], values[1], values[2] if values.size == 3 else focal_z])


def _pixel(px: Any) -> np.ndarray:
    try:
        xy = np.asarray(px, float).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidParams(f"pixel {px!r} is not two numbers") from None
    if xy.shape != (2,) or not np.all(np.isfinite(xy)):
        raise InvalidParams(f"pixel {px!r} must be two finite numbers [x, y]")
    return xy


def _check_in_frame(xy: np.ndarray, shape: tuple[int, int], channel: str) -> None:
    """InvalidParams unless pixel ``xy`` (x, y; pixel-centre origin) lies inside a frame of
    ``shape`` (h, w): a point the microscope cannot see cannot be checked by looking."""
    h, w = shape
    if not (-0.5 <= xy[0] <= w - 0.5 and -0.5 <= xy[1] <= h - 0.5):
        raise InvalidParams(f"pixel {xy.tolist()} is outside the {w}x{h} frame", channel=channel)
