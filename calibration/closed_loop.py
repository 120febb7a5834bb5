"""``move_tip``: move a tip to a target in closed loop: move, look, correct, repeat.

1. The target (microscope µm) goes through the calibration's inverse to a manipulator
   position; a position outside the soft limits is rejected before anything moves
   (``OutOfBounds``, never clipped). The move uses the channel's speed limit (the default
   speed unless a valid ``speed_um_s`` is given).
2. After the move has ended, a FRESH frame (newer than the move's end plus the settle time) is
   localised and this channel's tip found by assignment against every channel's prediction.
3. The error target - seen is measured; the calibration's offset is re-pinned to what was
   seen (so the next iteration aims right); within ``tolerance_um`` it is done.
4. After ``max_iterations`` without success, or when the tip is lost or a correction leads
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "target_um": self.target_um.tolist(),
            "iterations": self.iterations,
            "error_um": float(self.error_um),
            "errors_um": [float(e) for e in self.errors_um],
            "position_um": self.position_um.tolist(),
            "tip_xy_um": self.seen_xy_um.tolist(),
        }


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
) -> MoveTipResult:
    """Bring the tip of ``manipulator`` to ``target_um`` (microscope X, Y, Z µm) within
    ``tolerance_um`` in X, Y. Returns the result with the corrected calibration."""
    channel = manipulator.name
    log = get_logger("patchrig.calibration.move_tip", channel=channel)
    target = np.asarray(target_um, float).reshape(3)
    start = manipulator.position_um.copy()
    first_goal = calibration.to_manipulator_um(target, start)
    if not manipulator.limits.contains(first_goal.tolist()):
        raise OutOfBounds(
            f"target {np.round(target, 2).tolist()} µm needs manipulator position "
            f"{np.round(first_goal, 1).tolist()} µm, outside the limits; rejected, nothing moved",
            channel=channel,
        )
    manipulator.validate_speed(speed_um_s)
    cal = calibration
    errors: list[float] = []

    def fail(reason: str) -> MoveTipFailed:
        log.warning("move_tip failed, returning to start", reason=reason)
        try:
            move_and_settle(manipulator, start, speed_um_s=speed_um_s, cancel=cancel)
            back = "returned to the start position"
        except Stopped:
            raise
        except PatchrigError as exc:
            back = f"could NOT return to the start position: {exc}"
        return MoveTipFailed(f"{reason}; {back}, calibration unchanged", channel=channel)

    for iteration in range(1, max_iterations + 1):
        position = manipulator.position_um
        goal = cal.to_manipulator_um(target, position)
        if not manipulator.limits.contains(goal.tolist()):
            raise fail(f"iteration {iteration}: the corrected target {np.round(goal, 1).tolist()} µm is outside the limits")
        end_s = move_and_settle(manipulator, goal, speed_um_s=speed_um_s, cancel=cancel)
        look = eye.look_after(end_s, cancel=cancel)
        position = manipulator.position_um
        detection = find_tip(look, cal, position)
        if detection is None:
            raise fail(f"iteration {iteration}: tip not found near its predicted position")
        seen = px_to_um(np.array([detection.x_px, detection.y_px]), look.frame.um_per_px, look.frame.shape)
        error = float(np.linalg.norm(target[:2] - seen))
        errors.append(error)
        cal = set_tip_offset(cal, position, seen, float(cal.to_microscope_um(position)[2]))
        if progress is not None:
            progress(stage="iteration", iteration=iteration, error_um=error)
        log.info("move_tip iteration", iteration=iteration, error_um=round(error, 3))
        if error <= tolerance_um:
            return MoveTipResult(channel, target, cal, iteration, error, position, seen, errors)
    raise fail(
        f"not within {tolerance_um:.2f} µm after {max_iterations} iterations "
        f"(errors {', '.join(f'{e:.2f}' for e in errors)} µm)"
    )
