"""``move_tip``: move a tip to a target in closed loop: move, look, correct, repeat.

0. Before moving, the tip is looked at: if it is seen within ``max_pin_um`` of where the
   calibration puts it, the offset is re-pinned there (drift since the last correction is
   removed before the first move).
1. The target (microscope µm) goes through the calibration's inverse to a manipulator
   position; a position outside the soft limits is rejected before anything moves
   (``OutOfBounds``, never clipped). The move uses the channel's speed limit (the default
   speed unless a valid ``speed_um_s`` is given).
2. After the move has ended, FRESH frames (newer than the move's end plus the settle time) are
   localised and this channel's tip found by assignment against every channel's prediction;
   up to ``max_looks`` frames are used to find it on ``looks_per_stop`` of them (mean taken),
   so a localiser that misses the tip on one frame costs a frame, not the operation.
3. The error target - seen is measured; the calibration's offset is re-pinned to what was
   seen (so the next iteration aims right); within ``tolerance_um`` it is done, except that
   a first landing beyond ``refine_above_fraction`` of the tolerance gets one more correction
   (while iterations remain), so one look's localisation error does not decide the result.
   Follow check: after every move the tip must appear where the calibration pinned at the
   previous observation predicts it, within ``follow_tolerance_um`` plus ``follow_fraction``
   of the move. A detection that does not follow the pipette (clutter, another tip, a bad
   localisation on one frame) is never used; the next fresh frames are looked at (up to
   ``max_looks``), and when none shows a detection that follows, the loop ends rather than
   chasing it.
4. A tip not found after a move may have left focus (the Z row of a calibration is assumed,
   not measured, so long moves can drift in Z): the loop then steps the target's Z by
   ``focus_steps_um`` (XY held through the calibration) until the tip is seen again, and
   re-pins the calibration's Z offset to the focal plane there (a seen tip is in focus).
5. When the tip is still not seen (after a focus search), or only detections that do not
   follow are, the target itself may hide it (another pipette's shank crossing there, a
   bright cell). If the tip was seen earlier in the call, it backs off
   ``unverified_final_um`` (15 µm) toward the start, finds the tip there, re-pins the offset
   on it and steps onto the target open loop. The result then says ``verified: false`` and
   how far was moved without seeing the tip (``unverified_um``); ``error_um`` is the
   calibration's prediction there. 0 turns this off (the call fails instead).
6. After ``max_iterations`` without success, or when the tip is lost or a correction leads
   out of the limits, the tip goes back to where it started, the calibration is left as it
   was before the call (the last good state), and ``MoveTipFailed`` says why.

Stop/stop-all (``Stopped``) and ``cancel`` end it at once, where it is, without moving back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.observe import Eye, Look, move_and_settle
from calibration.set_tip import set_tip_offset
from calibration.transform import ChannelCalibration, px_to_um
from localisation.types import TipDetection
from manipulators.base import Manipulator
from rig.errors import OutOfBounds, PatchrigError, Stopped
from rig.logs import get_logger

FindTip = Callable[[Look, ChannelCalibration, np.ndarray], TipDetection | None]
Progress = Callable[..., None]


MIN_FOLLOW_MOTION_UM = 6.0  # a move this long shows a tip following the pipette, not static clutter

class MoveTipFailed(PatchrigError):
    """move_tip did not reach the tolerance; the tip was returned to its start position."""

    code = "timeout"


@dataclass
class MoveTipResult:
    """The outcome of a successful move_tip (``as_dict`` is JSON-able)."""

    channel: str
    target_um: np.ndarray
    calibration: ChannelCalibration
    iterations: int
    error_um: float
    position_um: np.ndarray
    seen_xy_um: np.ndarray
    errors_um: list[float] = field(default_factory=list)
    focus_searches: int = 0
    verified: bool = True  # False: the last ``unverified_um`` were moved open loop (tip not detected there)
    unverified_um: float = 0.0
    requested_z_um: float | None = None  # the Z asked for, when a focus search replaced it (``target_um``)

    def as_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "target_um": self.target_um.tolist(),
            "iterations": self.iterations,
            "error_um": float(self.error_um),
            "errors_um": [float(e) for e in self.errors_um],
            "position_um": self.position_um.tolist(),
            "tip_xy_um": self.seen_xy_um.tolist(),
            "focus_searches": self.focus_searches,
            "verified": self.verified,
            "unverified_um": float(self.unverified_um),
            # a focus search found the tip out of the asked plane: the loop can only check a tip
            # in focus, so the target's Z became the focal plane; the Z asked for is given here
            "requested_z_um": None if self.requested_z_um is None else float(self.requested_z_um),
        }


def check_move_tip_goal(
    manipulator: Manipulator,
    calibration: ChannelCalibration,
    target_um: np.ndarray,
    position_um: np.ndarray,
    speed_um_s: float | None,
) -> None:
    """Refuse a ``move_tip`` before anything moves: OutOfBounds when the manipulator position
    that puts the tip at ``target_um`` (microscope µm) from ``position_um`` (device µm) is
    outside the limits, InvalidParams for a speed the channel refuses."""
    target = np.asarray(target_um, float).reshape(3)
    first_goal = calibration.to_manipulator_um(target, np.asarray(position_um, float))
    if not manipulator.limits.contains(first_goal.tolist()):
        raise OutOfBounds(
            f"target {np.round(target, 2).tolist()} µm needs manipulator position "
            f"{np.round(first_goal, 1).tolist()} µm, outside the limits; rejected, nothing moved",
            channel=manipulator.name,
        )
    manipulator.validate_speed(speed_um_s)


def move_tip(
    manipulator: Manipulator,
    eye: Eye,
    calibration: ChannelCalibration,
    target_um: np.ndarray,
    find_tip: FindTip,
    *,
    tolerance_um: float,
    max_iterations: int,
    speed_um_s: float | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    focus_steps_um: tuple[float, ...] = (3.0, -3.0, 6.0, -6.0),
    looks_per_stop: int = 2,
    max_looks: int = 4,
    max_pin_um: float = 10.0,
    follow_tolerance_um: float = 3.0,
    follow_fraction: float = 0.05,
    refine_above_fraction: float = 0.5,
    unverified_final_um: float = 15.0,
) -> MoveTipResult:
    """Bring the tip of ``manipulator`` to ``target_um`` (microscope X, Y, Z µm) within
    ``tolerance_um`` in X, Y. Returns the result with the corrected calibration."""
    channel = manipulator.name
    log = get_logger("patchrig.calibration.move_tip", channel=channel)
    target = np.asarray(target_um, float).reshape(3)
    requested_z_um = float(target[2])
    start = manipulator.position_um.copy()
    check_move_tip_goal(manipulator, calibration, target, start, speed_um_s)
    cal = calibration
    errors: list[float] = []
    focus_searches = 0

    def fail(reason: str, code: str | None = None) -> MoveTipFailed:
        """Return the pipette to its start; the error to raise (``code``: keep another
        error's patchrig-rpc/1 code, such as ``no_frame``)."""
        log.warning("move_tip failed, returning to start", reason=reason)
        try:
            move_and_settle(manipulator, start, speed_um_s=speed_um_s, cancel=cancel)
            back = "returned to the start position"
        except Stopped:
            raise
        except PatchrigError as exc:
            back = f"could NOT return to the start position: {exc}"
        error = MoveTipFailed(f"{reason}; {back}, calibration unchanged", channel=channel)
        if code is not None:
            error.code = code
        return error


    moved = False  # nothing to return from before the first move (a Busy first look, say)
    try:
        # look before moving: re-pin the offset to the tip seen now (if it is seen, and near where
        # the calibration expects it), and keep the sighting, pinned or not, as the reference of
        # the follow check: where the tip was seen, and the position it was seen at
        reference: tuple[np.ndarray, np.ndarray] | None = None  # (position µm, seen X, Y µm)
        # whether a detection that follows the reference is trusted: the reference is a sighting
        # where the calibration expected the tip (pinned on), or a detection that was itself
        # trusted; a sighting too far to pin on only after a move of at least
        # ``MIN_FOLLOW_MOTION_UM``, which static clutter cannot follow
        reference_trusted = False
        # the first sighting was too far to pin on: provisional, dropped if nothing follows it
        reference_before_moving = False
        detection, look, position = _observe(
            manipulator, eye, cal, find_tip, eye.first_look_after_s(manipulator), cancel, looks_per_stop, max_looks
        )
        if detection is not None:
            seen = _seen_um(detection, look)
            reference = (position.copy(), seen)
            if np.linalg.norm(seen - cal.to_microscope_um(position)[:2]) <= max_pin_um:
                cal = _pinned(cal, position, seen)
                reference_trusted = True
            else:
                reference_before_moving = True

        not_following: list[tuple[float, float]] = []  # (off_um, moved_um) of rejected detections

        def find_following(look: Look, trial: ChannelCalibration, position: np.ndarray) -> TipDetection | None:
            """``find_tip``, less a detection that fails the follow check (noted, never used): it
            must lie where the reference sighting, moved by the calibration's matrix with the
            pipette, puts the tip."""
            detection = find_tip(look, trial, position)
            if detection is None or reference is None:
                return detection
            seen = _seen_um(detection, look)
            ref_position, ref_seen = reference
            moved = trial.matrix[:2] @ (position - ref_position)
            moved_um = float(np.linalg.norm(moved))
            off_um = float(np.linalg.norm(seen - (ref_seen + moved)))
            if off_um > follow_tolerance_um + follow_fraction * moved_um:
                not_following.append((off_um, moved_um))
                return None
            return detection

        moved = True
        cal_trusted = cal  # the calibration as last pinned on a trusted sighting: what an unchecked landing leaves
        for iteration in range(1, max_iterations + 1):
            position = manipulator.position_um
            goal = cal.to_manipulator_um(target, position)
            if not manipulator.limits.contains(goal.tolist()):
                raise fail(f"iteration {iteration}: the corrected target {np.round(goal, 1).tolist()} µm is outside the limits")
            end_s = move_and_settle(manipulator, goal, speed_um_s=speed_um_s, cancel=cancel)
            not_following.clear()
            detection, look, position = _observe(manipulator, eye, cal, find_following, end_s, cancel, looks_per_stop, max_looks)
            if detection is None and not_following and reference_before_moving:
                # the sighting too far to pin on was not this tip (clutter, a neighbour): forget it;
                # what is seen now is unchecked (and the call can only end unverified)
                log.info("move_tip: the first sighting was not followed; it is dropped", iteration=iteration)
                reference, reference_before_moving = None, False
                not_following.clear()
                detection, look, position = _observe(manipulator, eye, cal, find_following, end_s, cancel,
                                                     looks_per_stop, max_looks)
            if detection is None and not not_following:
                found = _focus_search(manipulator, eye, cal, target, find_following, focus_steps_um, speed_um_s, cancel)
                if found is not None:
                    detection, look, position, cal = found
                    target = np.array([target[0], target[1], look.focal_z_um])
                    focus_searches += 1
                    log.info("tip found again by a focus search", iteration=iteration)
            if detection is None:
                if not_following:
                    off_um, moved_um = not_following[0]
                    reason = (
                        f"iteration {iteration}: the detection did not follow the pipette ({off_um:.1f} µm off "
                        f"after a {moved_um:.1f} µm move); it may not be this channel's tip"
                    )
                else:
                    reason = f"iteration {iteration}: tip not found near its predicted position, nor above or below it"
                # where the offset was last pinned on a sighting (none: nothing to back off to)
                pinned_at = None if reference is None or reference_before_moving else reference[0]
                if unverified_final_um > 0 and pinned_at is not None:
                    approached = _approach_unseen(
                        manipulator, eye, cal, target, start, pinned_at, find_following, unverified_final_um, speed_um_s,
                        cancel, looks_per_stop, max_looks,
                    )
                    if approached is not None:
                        cal, position, step_um = approached
                        predicted = cal.to_microscope_um(position)[:2]
                        error = float(np.linalg.norm(target[:2] - predicted))
                        log.warning("move_tip: final step open loop, the tip is not detected at the target",
                                    reason=reason, unverified_um=round(step_um, 1))
                        return MoveTipResult(channel, target, cal, iteration + 1, error, position, predicted,
                                             [*errors, error], focus_searches, verified=False, unverified_um=step_um,
                                             requested_z_um=_replaced(requested_z_um, target))
                    reason += f"; nor seen {unverified_final_um:.0f} µm back toward the start"
                raise fail(reason)
            seen = _seen_um(detection, look)
            if reference is None:
                checked = False  # nothing showed that this detection moves with the pipette
            elif reference_before_moving:
                checked = float(np.linalg.norm(cal.matrix[:2] @ (position - reference[0]))) >= MIN_FOLLOW_MOTION_UM
            else:
                checked = reference_trusted
            reference, reference_trusted, reference_before_moving = (position.copy(), seen), checked, False
            error = float(np.linalg.norm(target[:2] - seen))
            errors.append(error)
            cal = _pinned(cal, position, seen)
            if checked:
                cal_trusted = cal
            if progress is not None:
                progress(stage="iteration", iteration=iteration, error_um=error)
            log.info("move_tip iteration", iteration=iteration, error_um=round(error, 3))
            # aim for the inner part of the tolerance: a first landing in its outer part gets one
            # more (small) correction, so that the localiser's own error on one look does not
            # carry the true error past the tolerance; any later landing within it is accepted
            refine = iteration == 1 and max_iterations > 1
            if error <= tolerance_um * (refine_above_fraction if refine else 1.0):
                if not checked:
                    # nothing showed that this detection follows the pipette (no trusted sighting
                    # before it: static clutter on the target would pass): reported unverified,
                    # with the calibration last pinned on a trusted sighting
                    log.warning("move_tip: the detection at the target was not checked against the pipette's "
                                "motion (no trusted sighting before it); calibration not re-pinned on it")
                    return MoveTipResult(channel, target, cal_trusted, iteration, error, position, seen, errors,
                                         focus_searches, verified=False,
                                         requested_z_um=_replaced(requested_z_um, target))
                return MoveTipResult(channel, target, cal, iteration, error, position, seen, errors, focus_searches,
                                     requested_z_um=_replaced(requested_z_um, target))
        raise fail(
            f"not within {tolerance_um:.2f} µm after {max_iterations} iterations "
            f"(errors {', '.join(f'{e:.2f}' for e in errors)} µm)"
        )
    except (Stopped, MoveTipFailed):
        raise
    except PatchrigError as exc:  # a lost frame stream, a device error: back to the start too
        if not moved:
            raise
        message = str(exc).removeprefix(f"channel {channel!r}: ")
        raise fail(message, exc.code) from exc


def _replaced(requested_z_um: float, target: np.ndarray) -> float | None:
    """The Z asked for if the target's Z is no longer it (a focus search), else None."""
    return None if float(target[2]) == requested_z_um else requested_z_um


def _seen_um(detection: TipDetection, look: Look) -> np.ndarray:
    """A detection's position in microscope X, Y µm, from its frame's pixel size and shape."""
    return px_to_um(np.array([detection.x_px, detection.y_px]), look.frame.um_per_px, look.frame.shape)


def _pinned(cal: ChannelCalibration, position: np.ndarray, seen_xy_um: np.ndarray) -> ChannelCalibration:
    """``cal`` with its offset moved so that the tip at ``position`` (device µm) is where it was
    seen (X, Y µm); Z stays where the calibration puts it."""
    return set_tip_offset(cal, position, seen_xy_um, float(cal.to_microscope_um(position)[2]))


def _approach_unseen(
    manipulator: Manipulator,
    eye: Eye,
    cal: ChannelCalibration,
    target: np.ndarray,
    start: np.ndarray,
    pinned_at: np.ndarray,
    find_tip: FindTip,
    step_um: float,
    speed_um_s: float | None,
    cancel: threading.Event | None,
    looks_per_stop: int,
    max_looks: int,
    min_motion_um: float = 6.0,
) -> tuple[ChannelCalibration, np.ndarray, float] | None:
    """The tip cannot be seen at the target (another pipette's shank crosses there, a bright
    cell...). Back off ``step_um`` (microscope µm, in the image plane) toward where the call
    started, find the tip there (``find_tip``: follow-checked), re-pin the offset on it and
    step onto the target open loop: the final error is then the calibration's error over
    ``step_um`` instead of over the whole move. Returns (calibration, position, the open-loop
    distance in µm), or None when the tip is not seen there either, a goal is out of limits, or
    the back-off point lies within ``min_motion_um`` of where the tip was last seen
    (``pinned_at``): a sighting there would not be checked by motion, so static clutter could
    pass for the tip."""
    start_xy = cal.to_microscope_um(start)[:2]
    back = start_xy - target[:2]
    distance_um = float(np.linalg.norm(back))
    if distance_um < 1e-6:
        return None
    step = min(step_um, distance_um)
    retreat = np.array([*(target[:2] + back / distance_um * step), target[2]])
    if np.linalg.norm(retreat[:2] - cal.to_microscope_um(pinned_at)[:2]) < min_motion_um:
        return None
    goal = cal.to_manipulator_um(retreat, manipulator.position_um)
    if not manipulator.limits.contains(goal.tolist()):
        return None
    end_s = move_and_settle(manipulator, goal, speed_um_s=speed_um_s, cancel=cancel)
    detection, look, position = _observe(manipulator, eye, cal, find_tip, end_s, cancel, looks_per_stop, max_looks)
    if detection is None:
        return None
    seen = _seen_um(detection, look)
    cal = _pinned(cal, position, seen)
    goal = cal.to_manipulator_um(target, position)
    if not manipulator.limits.contains(goal.tolist()):
        return None
    move_and_settle(manipulator, goal, speed_um_s=speed_um_s, cancel=cancel)
    return cal, manipulator.position_um, float(np.linalg.norm(target[:2] - seen))


def _focus_search(
    manipulator: Manipulator,
    eye: Eye,
    cal: ChannelCalibration,
    target: np.ndarray,
    find_tip: FindTip,
    steps_um: tuple[float, ...],
    speed_um_s: float | None,
    cancel: threading.Event | None,
) -> tuple[TipDetection, Look, np.ndarray, ChannelCalibration] | None:
    """Step the target's Z (XY held) until the tip is seen; return the detection, the look,
    the position and the calibration with its Z offset re-pinned to the focal plane."""
    for dz in steps_um:
        position = manipulator.position_um
        goal = cal.to_manipulator_um(target + np.array([0.0, 0.0, dz]), position)
        if not manipulator.limits.contains(goal.tolist()):
            continue
        end_s = move_and_settle(manipulator, goal, speed_um_s=speed_um_s, cancel=cancel)
        detection, look, position = _observe(manipulator, eye, cal, find_tip, end_s, cancel, 1, 2)
        if detection is not None:
            offset = cal.offset_um.copy()
            offset[2] += look.focal_z_um - float(cal.to_microscope_um(position)[2])
            return detection, look, position, cal.with_offset(offset)
    return None


def _observe(
    manipulator: Manipulator,
    eye: Eye,
    cal: ChannelCalibration,
    find_tip: FindTip,
    end_s: float,
    cancel: threading.Event | None,
    looks_per_stop: int,
    max_looks: int,
) -> tuple[TipDetection | None, Look, np.ndarray]:
    """The tip on up to ``max_looks`` fresh frames after ``end_s``: the mean of the first
    ``looks_per_stop`` consistent detections (within 2 µm of each other), or None.

    When the looks disagree (a detection on one frame more than 2 µm from one on another: a
    bright spot up the shank, a cell passing for the tip on some frames), every look is taken
    and the group of consistent detections nearest the calibration's prediction at the
    current position wins, whatever its size: after a pin or a calibrated move the prediction
    is good to about a micrometre, while a false detection sits wherever the clutter is.
    """
    groups: list[list[TipDetection]] = []
    look: Look | None = None
    position = manipulator.position_um
    for _ in range(max(max_looks, 1)):
        look = eye.look_after(end_s, cancel=cancel)
        position = manipulator.position_um
        detection = find_tip(look, cal, position)
        if detection is None:
            continue
        for group in groups:
            if np.hypot(detection.x_px - group[0].x_px, detection.y_px - group[0].y_px) * look.frame.um_per_px <= 2.0:
                group.append(detection)
                break
        else:
            groups.append([detection])
        if len(groups) == 1 and len(groups[0]) >= looks_per_stop:
            break
    assert look is not None
    if not groups:
        return None, look, position
    chosen = groups[0]
    if len(groups) > 1:
        predicted = cal.to_microscope_um(position)[:2]
        chosen = min(groups, key=lambda g: float(np.linalg.norm(_seen_um(_mean(g), look) - predicted)))
    return _mean(chosen), look, position


def _mean(detections: list[TipDetection]) -> TipDetection:
    """One detection at the mean position of ``detections`` with the lowest of their scores."""
    return TipDetection(
        float(np.mean([d.x_px for d in detections])),
        float(np.mean([d.y_px for d in detections])),
        float(min(d.score for d in detections)),
    )
