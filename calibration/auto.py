"""Automatic calibration of one channel, driven by the tip localiser.

From the current position ``p0`` the routine steps the pipette along each axis, looks at a
fresh frame after every move (see ``calibration.observe``), finds its own tip among all the
tips in view, and fits the calibration robustly (``calibration.fit``).

1. **Identify the tip.** Look at ``p0``, step the x axis by ``first_step_um`` and look again.
   Other pipettes do not move: detections within ``static_gate_um`` of a detection at ``p0``
   are static. This channel's tip is the detection that left its place and reappeared
   0.3x-3x the step away (any direction: the axis sign and scale are unknown). When a second
   detection made the same move (a dye bleb on the shank, say), which one is the tip cannot
   be told from motion and the calibration is refused rather than guessed. Failing that,
   x steps the other way, and then both ways by ``identify_far_step_um`` (a tip merged with a
   neighbour at ``p0`` separates from it further out).
2. **Expand.** For each axis, after a small first step the axis' image gain is estimated; the
   next stops go ``expanded_step_um`` to the other side and back, shrunk until the predicted
   tip stays inside the frame (``fov_margin_px``) and the target inside the soft limits.
   Targets are checked against the limits before moving, never clipped; a stop that cannot be
   reached within the limits is skipped (or the other direction is used). When no expanded
   stop finds the tip where the first step's gain predicts it, that first detection was
   probably not this tip (clutter, another pipette's shank): it is forgotten and the axis
   starts again with a first step the other way.
3. **Focus.** z steps are small (``z_step_um``) because a tip more than a few µm from the focal
   plane is not detected. The approach axis of a 4-axis device dives into the tissue, so its
   steps are compensated with z to keep the tip in focus; if a compensated step loses the tip,
   the opposite z sign is tried, which also tells whether +z moves the tip up or down.
   A stop where the tip is not detected is retried once at half the step; if it is still not
   seen, the routine goes on without that stop. When this channel's tip sits within
   ``isolation_um`` of another tip at ``p0``, z and the approach axis step from the stop where
   it stands furthest from the others instead.
   At every stop up to ``max_looks`` fresh frames are localised until the tip was found on
   ``looks_per_stop`` of them (their mean is used): a localiser that misses a tip on one frame
   costs a frame, not a move. Identification merges the detections of ``identify_looks`` frames.
4. **Check** the fit at a held-out diagonal stop (x and y ``check_step_um`` from ``p0``): a tip
   seen there more than ``check_tolerance_um`` from where the fit of the other stops puts it
   fails the calibration (see ``_check_stop``); ``checked`` in the result says whether the
   check ran.
5. **Fit** all positions with outlier rejection; the tip returns to ``p0`` and is looked at one
   last time. The calibration fails with ``NotCalibrated`` (and the tip returns to ``p0``; the
   message says so) when the tip is not visible, cannot be identified, disagrees with the
   fit at the check stop, the move budget
   (``max_moves``, default 20) runs out, or the fit is poor (residual above
   ``max_residual_um``, too many outliers, x and y do not span the image, or the tip was seen
   at fewer than 3 positions along an in-plane axis).

Frames: positions in device µm, tips in microscope µm (X, Y) computed from the frame's own
pixel size and shape. Stop/stop-all raise ``Stopped`` (propagated); ``cancel`` is honoured
between and during moves.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.fit import XYFit, build_calibration
from calibration.observe import Eye, Look, move_and_settle
from calibration.transform import ChannelCalibration, px_to_um, um_to_px
from manipulators.base import Manipulator
from rig.errors import NotCalibrated, OutOfBounds, PatchrigError, Stopped
from rig.logs import get_logger

Progress = Callable[..., None]


@dataclass(frozen=True)
class AutoCalibrationSettings:
    """Knobs of the routine (µm unless named otherwise)."""

    first_step_um: float = 15.0
    expanded_step_um: float = 60.0
    z_step_um: float = 4.0
    approach_first_step_um: float = 5.0
    max_moves: int = 20
    looks_per_stop: int = 2
    max_looks: int = 4
    identify_looks: int = 3
    identify_far_step_um: float = 40.0
    fov_margin_px: float = 24.0
    static_gate_um: float = 2.0
    track_gate_um: float = 5.0
    isolation_um: float = 15.0
    extrapolation_gate: float = 0.08
    max_residual_um: float = 1.5
    min_inlier_fraction: float = 0.6
    check_step_um: float = 30.0
    check_tolerance_um: float = 3.0
    z_up_sign: float = 1.0
    speed_um_s: float | None = None


@dataclass
class Sample:
    """One stop: manipulator position (device µm), tip (microscope X, Y µm), focal plane Z (µm)."""

    position_um: np.ndarray
    tip_xy_um: np.ndarray
    focal_z_um: float
    score: float


@dataclass
class AutoCalibrationResult:
    """What the routine found (``as_dict`` is JSON-able)."""

    calibration: ChannelCalibration
    fit: XYFit
    moves: int
    samples: list[Sample] = field(default_factory=list)
    lost_stops: int = 0
    z_sign_measured: bool = False
    checked: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "channel": self.calibration.channel,
            "moves": self.moves,
            "n_points": len(self.samples),
            "n_inliers": int(self.fit.inliers.sum()),
            "residual_um": float(self.fit.residual_um),
            "noise_um": float(self.fit.noise_um),
            "lost_stops": self.lost_stops,
            "z_sign_measured": self.z_sign_measured,
            "checked": self.checked,
            "z_model": self.calibration.z_model,
            "uncertainty_um": self.calibration.uncertainty_um(self.samples[0].position_um),
            "points": [
                {
                    "position_um": s.position_um.tolist(),
                    "tip_xy_um": s.tip_xy_um.tolist(),
                    "residual_um": float(r),
                    "inlier": bool(ok),
                }
                for s, r, ok in zip(self.samples, self.fit.residuals_um, self.fit.inliers, strict=True)
            ],
        }


class AutoCalibrator:
    """One run of the automatic calibration of ``manipulator`` (see the module docstring)."""

    def __init__(
        self,
        manipulator: Manipulator,
        eye: Eye,
        settings: AutoCalibrationSettings | None = None,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.m = manipulator
        self.eye = eye
        self.s = settings or AutoCalibrationSettings()
        self.progress = progress
        self.cancel = cancel
        self.channel = manipulator.name
        self.log = get_logger("patchrig.calibration.auto", channel=self.channel)
        self.moves = 0
        self.lost = 0
        self.samples: list[Sample] = []
        self.p0 = np.zeros(manipulator.n_axes)
        self.base = np.zeros(manipulator.n_axes)
        self.t0 = np.zeros(2)
        self.gains: dict[int, np.ndarray] = {}
        self.others_um: np.ndarray = np.zeros((0, 2))
        self.z_sign = float(np.sign(self.s.z_up_sign) or 1.0)
        self.z_sign_measured = False
        self.checked = False
        self._shape: tuple[int, int] = (512, 512)
        self._um_per_px = 1.0

    # -- small helpers ------------------------------------------------------------------
    def _report(self, stage: str, **fields: Any) -> None:
        if self.progress is not None:
            self.progress(stage=stage, moves=self.moves, max_moves=self.s.max_moves, **fields)

    def _tips_um(self, look: Look) -> np.ndarray:
        self._shape = look.frame.shape
        self._um_per_px = float(look.frame.um_per_px)
        if not look.detections:
            return np.zeros((0, 2))
        px = np.array([[d.x_px, d.y_px] for d in look.detections])
        return px_to_um(px, look.frame.um_per_px, look.frame.shape)

    def _predict(self, position_um: np.ndarray) -> np.ndarray:
        """In-plane tip (µm) predicted from the gains known so far (unknown axes count 0)."""
        tip = self.t0.copy()
        for axis, gain in self.gains.items():
            tip += gain * (position_um[axis] - self.p0[axis])
        return tip

    def _in_view(self, tip_um: np.ndarray) -> bool:
        h, w = self._shape
        half = np.array([(w - 1) / 2.0, (h - 1) / 2.0]) - self.s.fov_margin_px
        return bool(np.all(np.abs(tip_um / self._um_per_px) <= half))

    def _within_limits(self, position_um: np.ndarray) -> bool:
        return self.m.limits.contains(position_um.tolist())

    def _move(self, target_um: np.ndarray) -> float:
        """One counted move; returns time.monotonic() when it ended."""
        if self.moves >= self.s.max_moves:
            raise NotCalibrated(
                f"calibration needs more than {self.s.max_moves} moves (tip lost {self.lost} times); "
                "check that the tip is visible and in focus",
                channel=self.channel,
            )
        self.moves += 1
        return move_and_settle(self.m, target_um, speed_um_s=self.s.speed_um_s, cancel=self.cancel)

    def _merged_tips(self, end_s: float, n_looks: int) -> tuple[np.ndarray, Look]:
        """Detections (µm) of ``n_looks`` fresh frames, merged (within static_gate_um) into one
        list, so that a tip the localiser misses on one frame is still seen."""
        merged: list[list[np.ndarray]] = []
        look = self.eye.look_after(end_s, cancel=self.cancel)
        for k in range(n_looks):
            if k:
                look = self.eye.look_after(end_s, cancel=self.cancel)
            for tip in self._tips_um(look):
                _add_to_group(merged, tip, self.s.static_gate_um)
        tips = np.array([np.mean(g, axis=0) for g in merged]) if merged else np.zeros((0, 2))
        return tips, look

    def _observe(
        self, end_s: float, predicted: np.ndarray, *, unknown_step_um: float = 0.0, extrapolation_um: float = 0.0
    ) -> tuple[np.ndarray | None, Look]:
        """Our tip after a move: up to ``max_looks`` fresh frames until ``looks_per_stop``
        detections were found; their mean (µm), or None."""
        found: list[np.ndarray] = []
        look = None
        for _ in range(self.s.max_looks):
            look = self.eye.look_after(end_s, cancel=self.cancel)
            tip = self._find(look, predicted if not found else found[0], unknown_step_um=0.0 if found else unknown_step_um,
                             extrapolation_um=extrapolation_um)
            if tip is not None:
                found.append(tip)
                if len(found) >= self.s.looks_per_stop:
                    break
        assert look is not None
        return (np.mean(found, axis=0) if found else None), look

    def _moving_candidates(self, tips: np.ndarray) -> np.ndarray:
        """Indices of detections that are not one of the static other tips."""
        if len(self.others_um) == 0 or len(tips) == 0:
            return np.arange(len(tips))
        d = np.linalg.norm(tips[:, None, :] - self.others_um[None, :, :], axis=2)
        return np.flatnonzero(d.min(axis=1) > self.s.static_gate_um)

    def _find(
        self, look: Look, predicted: np.ndarray, *, unknown_step_um: float = 0.0, extrapolation_um: float = 0.0
    ) -> np.ndarray | None:
        """Our tip on ``look``: nearest non-static detection to ``predicted`` (µm).

        The gate is ``track_gate_um`` plus ``extrapolation_gate`` times how far (manipulator µm)
        the position lies beyond the stops measured so far on that axis.
        With ``unknown_step_um`` > 0 (first step of an axis whose gain is unknown) the tip must
        lie 0.3x-3x that distance from the prediction, in any direction.
        """
        tips = self._tips_um(look)
        idx = self._moving_candidates(tips)
        if len(idx) == 0:
            return None
        dist = np.linalg.norm(tips[idx] - predicted, axis=1)
        if unknown_step_um > 0:
            ok = (dist >= 0.3 * unknown_step_um) & (dist <= 3.0 * unknown_step_um)
            if not ok.any():
                return None
            cand = idx[ok]
            best = cand[np.argmin(np.abs(np.linalg.norm(tips[cand] - predicted, axis=1) - unknown_step_um))]
            return tips[best]
        gate = self.s.track_gate_um + extrapolation_um * self.s.extrapolation_gate
        best_i = int(np.argmin(dist))
        return tips[idx[best_i]] if dist[best_i] <= gate else None

    def _record(self, look: Look, position_um: np.ndarray, tip_um: np.ndarray) -> None:
        tips = self._tips_um(look)
        score = 0.0
        if len(tips):
            nearest = int(np.argmin(np.linalg.norm(tips - tip_um, axis=1)))
            score = float(look.detections[nearest].score)
        self.samples.append(Sample(np.asarray(position_um, float).copy(), np.asarray(tip_um, float).copy(), look.focal_z_um, score))

    def _fit_axis(self, axis: int) -> None:
        """Gain of ``axis`` (µm/µm): regress the tip, less the known contributions of the other
        axes, on this axis' displacement, over the stops where no other axis of unknown gain moved."""
        ds, ts = [], []
        for smp in self.samples:
            delta = smp.position_um - self.p0
            unknown = [a for a in range(len(delta)) if a != axis and a not in self.gains and abs(delta[a]) > 1e-6]
            if unknown:
                continue
            tip = smp.tip_xy_um - sum(
                (self.gains[a] * delta[a] for a in self.gains if a != axis), start=np.zeros(2)
            )
            ds.append(delta[axis])
            ts.append(tip)
        d = np.asarray(ds)
        if len(d) < 2 or np.ptp(d) <= 0:
            return
        design = np.column_stack([d, np.ones(len(d))])
        coef, *_ = np.linalg.lstsq(design, np.asarray(ts), rcond=None)
        self.gains[axis] = coef[0]

    def _extrapolation(self, axis: int, target_um: np.ndarray) -> float:
        """How far (µm) ``target_um`` lies outside the measured range of ``axis`` (from p0)."""
        measured = [smp.position_um[axis] - self.p0[axis] for smp in self.samples]
        d = target_um[axis] - self.p0[axis]
        return float(max(d - max(measured), min(measured) - d, 0.0))

    def _choose_base(self) -> None:
        """Where the z and approach axes step from: p0, unless this channel's tip there sits
        within ``isolation_um`` of another tip (a localiser may merge two close tips); then the
        stop so far whose tip is furthest from every other tip."""
        if len(self.others_um) == 0:
            return
        def isolation(tip: np.ndarray) -> float:
            return float(np.min(np.linalg.norm(self.others_um - tip, axis=1)))
        if isolation(self.t0) >= self.s.isolation_um:
            return
        best = max(self.samples, key=lambda smp: isolation(smp.tip_xy_um))
        if isolation(best.tip_xy_um) > isolation(self.t0):
            self.base = best.position_um.copy()
            self.log.info("stepping z from a stop where the tip stands apart", base_um=[round(float(v), 1) for v in self.base])

    def _step_target(self, axis: int, step_um: float, z_comp: float = 0.0) -> np.ndarray:
        target = self.base.copy()
        target[axis] += step_um
        if z_comp:
            target[2] += z_comp * step_um
        return target

    # -- the routine ----------------------------------------------------------------------
    def run(self) -> AutoCalibrationResult:
        """Calibrate; on failure (NotCalibrated, NoFrame, OutOfBounds) the pipette is moved
        back to where it started and the error says so. Stopped propagates without moving."""
        check_start(self.m)
        self.first_look_s = self.eye.first_look_after_s(self.m)  # Busy while moving: p0 and the look agree
        self.p0 = self.m.position_um.copy()
        self.base = self.p0.copy()
        try:
            return self._run()
        except Stopped:
            raise
        except PatchrigError as exc:
            if self.moves == 0:
                raise
            try:
                move_and_settle(self.m, self.p0, speed_um_s=self.s.speed_um_s, cancel=self.cancel)
                back = "returned to the start position"
            except Stopped:
                raise
            except PatchrigError as again:
                back = f"could NOT return to the start position: {again}"
            self.log.warning("calibration failed", reason=str(exc), moves=self.moves)
            raise type(exc)(f"{_strip_channel(exc)}; {back}", channel=self.channel) from exc

    def _run(self) -> AutoCalibrationResult:
        self._report("looking")
        tips0, look0 = self._merged_tips(self.first_look_s, self.s.identify_looks)
        if len(tips0) == 0:
            raise NotCalibrated("no tip visible: the localiser found no confident tip in the frame", channel=self.channel)
        self._identify(look0, tips0)
        self._report("identified", tip_xy_um=self.t0.tolist())
        axes = [0, 1, 2] + ([3] if self.m.n_axes == 4 else [])
        for axis in axes:
            if axis == 0:
                self._horizontal_axis(0, first_done=True)
            elif axis == 1:
                self._horizontal_axis(1, first_done=False)
            elif axis == 2:
                self._choose_base()
                self._z_axis()
            else:
                self._approach_axis()
        self._check_stop()
        # back to where we started, look once more
        self._report("returning")
        tip, look = self._observe(self._move(self.p0), self._predict(self.p0))
        if tip is not None:
            self._record(look, self.p0, tip)
        return self._fit()

    def _unmatched_pairs(self, a: np.ndarray, b: np.ndarray, distance_um: float) -> list[tuple[float, int, int]]:
        """Pairs (i in a, j in b) of detections that are not static between a and b and lie
        0.3x-3x ``distance_um`` apart, best (closest to ``distance_um``) first."""
        if len(a) == 0 or len(b) == 0:
            return []
        d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
        stayed_a = d.min(axis=1) <= self.s.static_gate_um
        stayed_b = d.min(axis=0) <= self.s.static_gate_um
        pairs = [
            (abs(d[i, j] - distance_um), int(i), int(j))
            for i in np.flatnonzero(~stayed_a)
            for j in np.flatnonzero(~stayed_b)
            if 0.3 * distance_um <= d[i, j] <= 3.0 * distance_um
        ]
        return sorted(pairs)

    def _identify(self, look0: Look, tips0: np.ndarray) -> None:
        """Find our tip by stepping x by +step and -step (see the module docstring).

        The tip is the detection that moved by about the step between p0 and a stepped stop;
        failing that, between the +step and -step stops (twice the step; the tip at p0 is then
        their midpoint, for a localiser that missed it at p0). If the first step size fails
        (e.g. the tip is merged with a neighbour), a larger one (``identify_far_step_um``) is tried."""
        for step in (self.s.first_step_um, self.s.identify_far_step_um):
            if self._identify_with(look0, tips0, step):
                return
        raise NotCalibrated(
            f"could not identify this channel's tip: no detection moved when the x axis stepped "
            f"{self.s.first_step_um:.0f} and {self.s.identify_far_step_um:.0f} µm ({len(tips0)} tips in view)",
            channel=self.channel,
        )

    def _identify_with(self, look0: Look, tips0: np.ndarray, step: float) -> bool:
        seen: list[tuple[np.ndarray, np.ndarray, Look]] = []  # (target, tips, look) per stepped stop
        for sign in (1.0, -1.0):
            target = self._step_target(0, sign * step)
            if not self._within_limits(target):
                continue
            tips, look = self._merged_tips(self._move(target), self.s.identify_looks)
            pairs = self._unmatched_pairs(tips0, tips, step)
            if pairs:
                _, i, j = pairs[0]
                self._refuse_if_ambiguous(tips0, tips, pairs, look)
                self.t0 = tips0[i]
                self.others_um = np.delete(tips0, i, axis=0)
                self._record(look0, self.p0, tips0[i])
                self._record(look, target, tips[j])
                self._fit_axis(0)
                self.log.info("tip identified", tip_xy_um=[round(float(v), 2) for v in self.t0], others=len(self.others_um))
                return True
            seen.append((target, tips, look))
        if len(seen) == 2:
            (t_plus, tips_plus, look_plus), (t_minus, tips_minus, look_minus) = seen
            pairs = self._unmatched_pairs(tips_plus, tips_minus, 2 * step)
            if pairs:
                _, i, j = pairs[0]
                self._refuse_if_ambiguous(tips_plus, tips_minus, pairs, look_plus)
                self.t0 = 0.5 * (tips_plus[i] + tips_minus[j])
                self.others_um = tips0
                self._record(look_plus, t_plus, tips_plus[i])
                self._record(look_minus, t_minus, tips_minus[j])
                self._fit_axis(0)
                self.log.info("tip identified from +-step", tip_xy_um=[round(float(v), 2) for v in self.t0], step_um=step)
                return True
        return False

    def _refuse_if_ambiguous(self, a: np.ndarray, b: np.ndarray, pairs: list[tuple[float, int, int]], look: Look) -> None:
        """Raise NotCalibrated when a second detection moved exactly as the chosen one did
        (within ``static_gate_um``): two points follow this pipette (its tip and, say, a dye
        bleb on its shank) and which one is the tip cannot be told from motion. Picking one
        would calibrate to the wrong point with a perfect residual."""
        _, i, j = pairs[0]
        shift = b[j] - a[i]
        for _, i2, j2 in pairs[1:]:
            if i2 != i and j2 != j and np.linalg.norm((b[j2] - a[i2]) - shift) <= self.s.static_gate_um:
                apart = float(np.linalg.norm(a[i2] - a[i]))
                px = [np.round(um_to_px(p, look.frame.um_per_px, look.frame.shape), 1).tolist() for p in (a[i], a[i2])]
                raise NotCalibrated(
                    f"two detections moved with this pipette, {apart:.1f} µm apart (at px {px[0]} and {px[1]} "
                    "before the step): cannot tell which one is its tip; move the pipette until only its tip "
                    "is detected, or calibrate by hand and use set_tip",
                    channel=self.channel,
                )

    def _stop(
        self, axis: int, step_um: float, *, z_comp: float = 0.0, unknown: bool = False, retry: bool = True
    ) -> bool:
        """Go to ``p0 + step`` on ``axis``, find the tip, record it. Retries once at half the
        step when the tip is not seen (if ``retry``). Returns whether a sample was recorded."""
        for attempt in range(2 if retry else 1):
            s = step_um if attempt == 0 else step_um / 2
            target = self._step_target(axis, s, z_comp)
            if not self._within_limits(target):
                return False
            end_s = self._move(target)
            tip, look = self._observe(
                end_s,
                self._predict(target),
                unknown_step_um=abs(s) if unknown else 0.0,
                extrapolation_um=self._extrapolation(axis, target),
            )
            if tip is not None:
                self._record(look, target, tip)
                if axis != 2:  # z's in-plane gain is tiny and noisy over small steps: tracked as 0
                    self._fit_axis(axis)
                return True
            self.lost += 1
            self.log.info("tip not found at stop", axis=axis, step_um=round(s, 2), attempt=attempt + 1)
        return False

    def _expanded_step(self, axis: int, direction: float, z_comp: float = 0.0) -> float | None:
        """The largest step <= expanded_step_um in ``direction`` keeping tip in view, target in limits."""
        gain = self.gains.get(axis)
        size = self.s.expanded_step_um
        while size >= self.s.first_step_um * 0.99:
            target = self._step_target(axis, direction * size, z_comp)
            in_view = gain is None or self._in_view(self._predict(target))
            if in_view and self._within_limits(target):
                return direction * size
            size *= 0.7
        return None

    def _horizontal_axis(self, axis: int, *, first_done: bool) -> None:
        self._report("axis", axis=axis)
        if first_done:
            first_sign = float(np.sign(self.samples[-1].position_um[axis] - self.p0[axis]) or 1.0)
            self._expanded_stops(axis, first_sign)
            return
        preferred = 1.0 if self._within_limits(self._step_target(axis, self.s.first_step_um)) else -1.0
        for first_sign in (preferred, -preferred):
            kept = len(self.samples)
            if not self._stop(axis, first_sign * self.s.first_step_um, unknown=True):
                continue
            if self._expanded_stops(axis, first_sign):
                return
            # The gain from the first step predicted the expanded stops wrongly: that first
            # detection was probably not our tip (clutter, another pipette's shank). Forget it
            # and start the axis again from the other side.
            self.log.info("first step of the axis not confirmed; retrying from the other side", axis=axis)
            del self.samples[kept:]
            self.gains.pop(axis, None)
        raise NotCalibrated(
            f"tip lost when stepping axis {axis}: not seen, or not seen again where its first step predicted it",
            channel=self.channel,
        )

    def _expanded_stops(self, axis: int, first_sign: float) -> bool:
        """The expanded stops of ``axis`` (against, then along, the first step); whether the
        tip was found at one of them at least."""
        found = False
        for direction in (-first_sign, first_sign):
            expanded = self._expanded_step(axis, direction)
            if expanded is not None:
                found = self._stop(axis, expanded) or found
        return found

    def _z_axis(self) -> None:
        self._report("axis", axis=2)
        self.gains[2] = np.zeros(2)  # nearly vertical: for tracking, no in-plane motion (the final fit measures it)
        for direction in (1.0, -1.0):
            target = self._step_target(2, direction * self.s.z_step_um)
            if self._within_limits(target):
                self._stop(2, direction * self.s.z_step_um)

    def _approach_axis(self) -> None:
        """Approach axis: small uncompensated steps both ways, then z-compensated steps."""
        self._report("axis", axis=3)
        first = self.s.approach_first_step_um
        found = [self._stop(3, sign * first, unknown=3 not in self.gains, retry=False) for sign in (1.0, -1.0)]
        if not any(found):
            raise NotCalibrated("tip lost when stepping the approach axis", channel=self.channel)
        for size in (self.s.first_step_um, self.s.expanded_step_um):
            for direction in (-1.0, 1.0):
                gain_xy = float(np.linalg.norm(self.gains.get(3, np.zeros(2))))
                dz_per_d = -math.sqrt(max(1.0 - min(gain_xy, 1.0) ** 2, 0.0))  # approach Z gain (down)
                comp = -dz_per_d / (self.z_sign * self._z_gain())
                step = self._expanded_step(3, direction, comp) if size > self.s.first_step_um else direction * size
                if step is None or not self._within_limits(self._step_target(3, step, comp)):
                    continue
                if self._stop(3, step, z_comp=comp, retry=False):
                    if size == self.s.expanded_step_um:
                        self.z_sign_measured = True
                    continue
                # lost: maybe +z moves the tip the other way; try the opposite z sign once
                flipped = -comp
                if self._within_limits(self._step_target(3, step, flipped)) and self._stop(3, step, z_comp=flipped, retry=False):
                    self.z_sign = -self.z_sign
                    self.z_sign_measured = True
                    self.log.info("z sign inferred from focus", z_up_sign=self.z_sign)
                else:  # neither: the compensation is not good enough yet; a smaller step
                    self._stop(3, step / 3.0, z_comp=comp, retry=False)

    def _z_gain(self) -> float:
        gains = [np.linalg.norm(self.gains[a]) for a in (0, 1) if a in self.gains]
        return float(np.mean(gains)) if gains else 1.0

    def _check_stop(self) -> None:
        """A held-out stop: x and y both ``check_step_um`` from ``p0`` (a diagonal no axis stop
        visited), predicted by a fit of every stop so far, then looked at. A tip seen more than
        ``check_tolerance_um`` from the prediction fails the calibration: the fit agrees with
        its own stops but not with the pipette (the localiser put the tip beside itself at some
        stops, e.g. next to another tip, and the fit absorbed it into a wrong gain or offset,
        with a small residual). The tip there is the nearest detection that is not one of the
        other (static) tips, however far (so a calibration wrong by many µm is caught rather
        than read as "tip not seen"), seen at the same place on ``looks_per_stop`` of up to
        ``max_looks`` frames (so one stray detection decides nothing). When the first diagonal
        shows no tip, the opposite one is tried (one more move, budget permitting). A
        disagreement is not outvoted by an agreement elsewhere: a wrong fit can be right at one
        diagonal and 15 µm off at the other (measured). Without a reachable diagonal, a fit to
        check, a sighting, or room in the move budget for a check and the return, the
        calibration is not checked (``checked`` False in the result). A confirmed sighting is
        kept as one more stop."""
        step = self.s.check_step_um
        if step <= 0:
            return
        if self.moves + 2 > self.s.max_moves:
            self.log.info("held-out check skipped: no moves left for it", moves=self.moves)
            return
        if len(self.samples) < 4 or any(self._distinct_positions(a) < 3 for a in (0, 1)):
            return  # the fit fails on its own, with its own message
        try:
            cal, _ = self._fit_samples()
        except (ValueError, np.linalg.LinAlgError):
            return
        diagonals = []
        for sx, sy in ((1.0, 1.0), (-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0)):
            target = self.p0.copy()
            target[0] += sx * step
            target[1] += sy * step
            predicted = cal.to_microscope_um(target)[:2]
            if self._within_limits(target) and self._in_view(predicted):
                diagonals.append((target, predicted))
        if not diagonals:
            self.log.info("held-out check skipped: no diagonal stop within the limits and in view")
            return
        for target, predicted in diagonals[:2]:
            if self.moves + 2 > self.s.max_moves:
                break
            tip, look = self._check_observe(self._move(target), predicted)
            if tip is None:
                self.lost += 1
                self.log.info("held-out check: tip not seen at a diagonal stop")
                continue
            off_um = float(np.linalg.norm(tip - predicted))
            if off_um > self.s.check_tolerance_um:
                raise NotCalibrated(
                    f"the fit did not predict a held-out check stop: the tip was seen {off_um:.1f} µm from where it "
                    f"put it (tolerance {self.s.check_tolerance_um:.1f} µm), so the localiser misplaced the tip at "
                    "some stops (another tip or clutter nearby?); move the pipette away from other tips and recalibrate",
                    channel=self.channel,
                )
            self._record(look, target, tip)
            self.checked = True
            self.log.info("held-out check passed", off_um=round(off_um, 2))
            return
        self.log.info("held-out check: tip not seen; calibration not checked")

    def _check_observe(self, end_s: float, predicted: np.ndarray) -> tuple[np.ndarray | None, Look]:
        """The tip at the check stop (see ``_check_stop``): on each of ``max_looks`` fresh frames
        the moving detection nearest ``predicted``; those within ``static_gate_um`` of each other
        are grouped, and the group seen on at least ``looks_per_stop`` frames nearest the
        prediction gives the mean (µm); None without such a group."""
        groups: list[list[np.ndarray]] = []
        look = None
        for _ in range(self.s.max_looks):
            look = self.eye.look_after(end_s, cancel=self.cancel)
            tips = self._tips_um(look)
            idx = self._moving_candidates(tips)
            if len(idx) == 0:
                continue
            tip = tips[idx[int(np.argmin(np.linalg.norm(tips[idx] - predicted, axis=1)))]]
            _add_to_group(groups, tip, self.s.static_gate_um)
        assert look is not None
        confirmed = [np.mean(g, axis=0) for g in groups if len(g) >= self.s.looks_per_stop]
        if not confirmed:
            return None, look
        return min(confirmed, key=lambda t: float(np.linalg.norm(t - predicted))), look

    def _distinct_positions(self, axis: int, kept: np.ndarray | None = None) -> int:
        """How many distinct positions (to 1 nm) along ``axis`` the tip was recorded at (only
        the samples where ``kept`` is True, when given)."""
        samples = self.samples if kept is None else [smp for smp, k in zip(self.samples, kept, strict=True) if k]
        return len(np.unique(np.round([smp.position_um[axis] for smp in samples], 3)))

    def _check_axes_seen(self, kept: np.ndarray | None = None) -> None:
        """NotCalibrated unless every in-plane axis has the tip at >= 3 distinct positions along
        it (among the samples ``kept``): so that one wrong detection cannot define an axis on its
        own (it would fit with no residual)."""
        for axis in [0, 1] + ([3] if self.m.n_axes == 4 else []):
            distinct = self._distinct_positions(axis, kept)
            if distinct < 3:
                among = "" if kept is None else " that agree with the fit"
                raise NotCalibrated(
                    f"the tip was seen at only {distinct} positions along axis {axis}{among} (3 needed); "
                    "check that it is visible and apart from other tips",
                    channel=self.channel,
                )

    def _fit_samples(self) -> tuple[ChannelCalibration, XYFit]:
        """The robust fit of every recorded stop (``build_calibration``)."""
        return build_calibration(
            self.channel,
            np.array([smp.position_um for smp in self.samples]),
            np.array([smp.tip_xy_um for smp in self.samples]),
            np.array([smp.focal_z_um for smp in self.samples]),
            z_up_sign=self.z_sign,
            min_threshold_um=self.s.max_residual_um * 1.5,
        )

    def _fit(self) -> AutoCalibrationResult:
        self._check_axes_seen()
        # the stops with z compensation are not "along one axis", but the fit is global
        calibration, fit = self._fit_samples()
        # again among the inliers: the robust fit may have rejected a good stop and kept a
        # wrong one, leaving an axis defined by two points, one of them wrong
        self._check_axes_seen(fit.inliers)
        n_in = int(fit.inliers.sum())
        if fit.residual_um > self.s.max_residual_um:
            raise NotCalibrated(
                f"calibration fit is poor: residual {fit.residual_um:.2f} µm > {self.s.max_residual_um:.2f} µm",
                channel=self.channel,
            )
        if n_in < self.s.min_inlier_fraction * len(self.samples):
            raise NotCalibrated(
                f"calibration fit is poor: only {n_in} of {len(self.samples)} tip positions agree", channel=self.channel
            )
        a = calibration.matrix[:2, :2]
        scale = float(np.mean(np.linalg.norm(a, axis=0)))
        if abs(np.linalg.det(a)) < 0.2 * scale**2 or scale < 0.05:
            raise NotCalibrated(
                "calibration fit is poor: the x and y axes do not span the image plane", channel=self.channel
            )
        self.log.info(
            "calibrated", moves=self.moves, residual_um=round(fit.residual_um, 3), inliers=n_in, points=len(self.samples)
        )
        self._report("done", residual_um=float(fit.residual_um))
        return AutoCalibrationResult(
            calibration=calibration,
            fit=fit,
            moves=self.moves,
            samples=self.samples,
            lost_stops=self.lost,
            z_sign_measured=self.z_sign_measured,
            checked=self.checked,
        )


def _add_to_group(groups: list[list[np.ndarray]], point: np.ndarray, radius_um: float) -> None:
    """Put ``point`` (µm) into the first group whose mean lies within ``radius_um``, else into a
    new group (in place)."""
    for group in groups:
        if np.linalg.norm(np.mean(group, axis=0) - point) <= radius_um:
            group.append(point)
            return
    groups.append([point])


def check_start(manipulator: Manipulator) -> None:
    """Raise OutOfBounds if the channel is outside its own limits (nothing can be planned)."""
    position = manipulator.position_um
    if not manipulator.limits.contains(position.tolist()):
        raise OutOfBounds("the manipulator is outside its limits; move it inside first", channel=manipulator.name)


def _strip_channel(exc: PatchrigError) -> str:
    """The message of ``exc`` without the "channel 'X': " prefix PatchrigError adds."""
    text = str(exc)
    prefix = f"channel {exc.channel!r}: "
    return text[len(prefix) :] if exc.channel is not None and text.startswith(prefix) else text
