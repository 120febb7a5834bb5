"""Moving and looking, the two primitives every calibration routine is made of.

``move_and_settle`` checks the target against the limits *before* anything moves (never
clips), moves at a speed within the channel's limit, honours a ``cancel`` event (stops the
manipulator and raises ``Stopped``) and lets ``Stopped`` from a stop/stop-all propagate.

``Eye.look_after`` returns a frame that is FRESH for a move: its ``frame_id`` is newer than the
newest frame at the moment the move ended, and it was received at least ``settle_s`` after
that moment (so it was not scanned while the pipette was still moving). It then runs the
localiser on it, under the shared localiser lock if one was given (the daemon's localiser
worker may use the same model from another thread).

With ``frames_averaged`` K > 1 a look is the mean of K consecutive fresh frames of the still
scene, as acquisition software averages them: every one of them is fresh by the rule above,
so no frame scanned during the move is ever averaged in; a frame of another shape, pixel
size, focal plane or dtype starts the mean again. The mean keeps the frames' dtype (rounded)
and the newest frame's id and times. It cuts the detector noise by sqrt(K) and costs K - 1
more frame periods per look.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from localisation.types import Localiser, TipDetection, pixel_size_refusal
from manipulators.base import Manipulator, move_timeout_s
from rig.errors import Busy, DeviceTimeout, NoFrame, Stopped
from rig.frame import Frame


def still_since_s(manipulator: Manipulator) -> float:
    """time.monotonic() at which the channel's last move ended (-inf if it never moved).
    Raises Busy if it is moving now: a closed-loop look must not pair a frame with a position
    of another instant."""
    if manipulator.is_busy():
        raise Busy("the pipette is moving: stop it or wait for the move to end first", channel=manipulator.name)
    handle = manipulator.current_move
    if handle is None:
        return -math.inf
    if handle.finished_s is None:
        raise Busy("the pipette's last move has not ended: stop it first", channel=manipulator.name)
    return float(handle.finished_s)


def move_and_settle(
    manipulator: Manipulator,
    target_um: np.ndarray,
    *,
    speed_um_s: float | None = None,
    cancel: threading.Event | None = None,
    timeout_s: float | None = None,
) -> float:
    """Move to ``target_um`` (device µm) and wait until the move ended; return time.monotonic()
    at the end. Raises OutOfBounds/InvalidParams before moving, Stopped when interrupted or
    cancelled, DeviceError on device failures. ``timeout_s`` (default: twice the travel time
    at the move's speed plus 10 s) only catches a hung device; it stops the device."""
    if cancel is not None and cancel.is_set():
        raise Stopped("cancelled before the move", channel=manipulator.name)
    target = manipulator.validate_target(target_um)
    if timeout_s is None:
        speed = manipulator.validate_speed(speed_um_s)
        distance_um = float(np.linalg.norm(target - manipulator.position_um))
        timeout_s = move_timeout_s(distance_um, speed)
    handle = manipulator.move_to(target, speed_um_s)
    finished = threading.Event()
    handle.add_done_callback(lambda _h: finished.set())
    deadline = time.monotonic() + timeout_s
    while not finished.wait(0.02):  # short polls so that cancel is honoured quickly
        if cancel is not None and cancel.is_set():
            manipulator.stop("cancelled")
            raise Stopped("cancelled", channel=manipulator.name)
        if time.monotonic() > deadline:
            manipulator.stop("move timeout")
            raise DeviceTimeout(f"move not finished within {timeout_s:.0f} s; stopped", channel=manipulator.name)
    handle.wait(0.0, check=True)
    return time.monotonic()


@dataclass(frozen=True)
class Look:
    """One fresh frame and the confident detections on it (best first)."""

    frame: Frame
    detections: list[TipDetection]
    focal_z_um: float


class Eye:
    """Fresh frames plus the localiser. ``min_score``: detections below are dropped."""

    def __init__(
        self,
        frames,
        localiser: Localiser,
        *,
        min_score: float,
        localiser_lock: threading.Lock | None = None,
        settle_s: float = 0.05,
        frame_timeout_s: float = 3.0,
        focal_z_um: float | None = None,
        frames_averaged: int = 1,
        um_per_px_range: tuple[float, float] | None = None,
        rig_um_per_px: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if int(frames_averaged) != frames_averaged or frames_averaged < 1:
            raise ValueError(f"frames_averaged must be a whole number >= 1, got {frames_averaged}")
        self.frames = frames
        self.localiser = localiser
        self.min_score = float(min_score)
        self.localiser_lock = localiser_lock
        self.settle_s = float(settle_s)
        self.frame_timeout_s = float(frame_timeout_s)
        self.focal_z_um = focal_z_um
        self.frames_averaged = int(frames_averaged)
        self.um_per_px_range = um_per_px_range
        self.rig_um_per_px = rig_um_per_px
        self.clock = clock

    def focal_z_of(self, frame: Frame) -> float:
        """The focal plane of ``frame`` (µm): its header, else the configured value, else 0."""
        if frame.z_um is not None:
            return float(frame.z_um)
        return float(self.focal_z_um) if self.focal_z_um is not None else 0.0

    def fresh_frame(self, after_s: float, *, cancel: threading.Event | None = None) -> Frame:
        """A frame newer than any frame at ``after_s`` and received >= ``after_s + settle_s``."""
        latest = self.frames.latest()
        return self._next_frame(None if latest is None else latest.frame_id, after_s, cancel)

    def averaged_frame(self, after_s: float, *, cancel: threading.Event | None = None) -> Frame:
        """The mean of ``frames_averaged`` consecutive fresh frames (see the module docstring);
        the fresh frame itself when ``frames_averaged`` is 1."""
        frames = [self.fresh_frame(after_s, cancel=cancel)]
        while len(frames) < self.frames_averaged:
            frame = self._next_frame(frames[-1].frame_id, after_s, cancel)
            first = frames[0]
            same_scan = (frame.shape, frame.um_per_px, frame.z_um, frame.pixels.dtype) == (
                first.shape, first.um_per_px, first.z_um, first.pixels.dtype)
            frames = [*frames, frame] if same_scan else [frame]
        if len(frames) == 1:
            return frames[0]
        newest = frames[-1]
        mean = np.mean(np.stack([f.pixels for f in frames]), axis=0)
        pixels = np.rint(mean).astype(newest.pixels.dtype)
        return Frame(newest.frame_id, newest.t_s, pixels, newest.um_per_px, newest.z_um, newest.received_s)

    def _next_frame(self, last_id: int | None, after_s: float, cancel: threading.Event | None) -> Frame:
        """The first frame newer than ``last_id`` received >= ``after_s + settle_s`` (NoFrame
        after ``frame_timeout_s``; Stopped when ``cancel`` is set)."""
        deadline = self.clock() + self.frame_timeout_s
        while True:
            if cancel is not None and cancel.is_set():
                raise Stopped("cancelled while waiting for a frame")
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise NoFrame(f"no fresh frame within {self.frame_timeout_s:.1f} s after the move")
            frame = self.frames.wait_for_frame(last_id, min(remaining, 0.25))
            if frame is None:
                continue
            last_id = frame.frame_id
            if frame.received_s >= after_s + self.settle_s:
                return frame

    def locate(self, frame: Frame) -> list[TipDetection]:
        """Confident detections on ``frame`` (score >= min_score), best first. Raises NoFrame,
        before any model run, when the frame's pixel size lies outside ``um_per_px_range``: its
        detections must not steer a manipulator."""
        refusal = pixel_size_refusal(frame.um_per_px, self.um_per_px_range, self.rig_um_per_px)
        if refusal is not None:
            raise NoFrame(f"{refusal}; closed-loop operations need frames of that pixel size (change the zoom)")
        if self.localiser_lock is not None:
            with self.localiser_lock:
                found = self.localiser.locate(frame.pixels, frame.um_per_px)
        else:
            found = self.localiser.locate(frame.pixels, frame.um_per_px)
        return sorted((d for d in found if d.score >= self.min_score), key=lambda d: -d.score)

    def first_look_after_s(self, manipulator: Manipulator) -> float:
        """``after_s`` for an operation's first look: frames from now, and only from after the
        channel's last move ended (plus the settling time that ``look_after`` adds). Raises
        Busy while the channel moves."""
        return max(self.clock() - self.settle_s, still_since_s(manipulator))

    def look_after(self, after_s: float, *, cancel: threading.Event | None = None) -> Look:
        """The confident detections on a fresh (averaged, with ``frames_averaged`` > 1) frame."""
        frame = self.averaged_frame(after_s, cancel=cancel)
        return Look(frame, self.locate(frame), self.focal_z_of(frame))
