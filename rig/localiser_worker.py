"""The localiser worker: newest frame in, tips out, one thread.

Loop: wait for a frame newer than the last one processed (the frame source keeps only the
newest, so a slow localiser skips frames instead of building a backlog: skipped frames are
counted as ``dropped``), run the localiser (GPU when the localiser was loaded on one, else
CPU), keep detections scoring at least ``min_score``, hand them to ``on_detections`` (the
calibration service: assignment to channels and offset correction) and publish the ``tips``
topic. A frame whose pixel size lies outside ``um_per_px_range``, or differs from the rig's
(``rig_um_per_px``: the calibrations' pixel size), is localised and published,
but never handed to ``on_detections`` (its tips must not steer a manipulator); its message
says why under ``"not_for_steering"``. The newest result is kept for ``locate`` and for closed-loop operations
(``wait_for_result``).

``tips`` message: ``{"frame_id", "t_frame" (acquisition time.time()), "um_per_px", "shape",
"z_um", "latency_ms" (frame received -> published), "localise_ms", "dropped",
"tips": [{"x_px", "y_px", "score", "channel" | null}], ...assignment fields,
"not_for_steering" (only when the frame may not steer: why)}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localisation.types import Localiser, TipDetection, pixel_size_refusal
from rig.frame import Frame
from rig.frame_sources import frames_lost_between
from rig.logs import get_logger

OnDetections = Callable[[Frame, list[TipDetection]], dict[str, Any]]
"""Called with each localised frame; returns extra JSON for the ``tips`` message, with
``"assigned": {channel: detection index}`` when it assigns tips to channels."""


@dataclass(frozen=True)
class LocalisedFrame:
    """One localised frame: detections (input pixels), the assignment and timings."""

    frame: Frame
    detections: list[TipDetection]
    assigned: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)
    localise_ms: float = 0.0
    done_s: float = 0.0  # time.monotonic() when published

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.frame.received_s

    def detection_of(self, channel: str) -> TipDetection | None:
        index = self.assigned.get(channel)
        return None if index is None else self.detections[index]

    def tips_json(self) -> list[dict[str, Any]]:
        owner = {i: ch for ch, i in self.assigned.items()}
        return [
            {"x_px": d.x_px, "y_px": d.y_px, "score": d.score, "channel": owner.get(i)}
            for i, d in enumerate(self.detections)
        ]


class LocaliserWorker:
    """Runs ``localiser.locate`` on the newest frame of ``frames`` (a FrameSource).

    ``lock``: held around every model call; other users of the same model (the calibration
    service) take it too, or better use ``shared_localiser()``, which reuses this worker's
    result when they ask about a frame it has already localised (no second model run).
    """

    def __init__(
        self,
        frames: Any,
        localiser: Localiser,
        *,
        min_score: float = 0.5,
        um_per_px_range: tuple[float, float] | None = None,
        rig_um_per_px: float | None = None,
        on_detections: OnDetections | None = None,
        publish: Callable[[str, dict[str, Any]], Any] | None = None,
        device: str = "cpu",
        lock: threading.Lock | None = None,
    ) -> None:
        self._frames = frames
        self._localiser = localiser
        self.lock = lock or threading.Lock()
        self._recent: list[tuple[Any, list[TipDetection]]] = []  # (pixels array, raw detections)
        self._in_progress: Any = None
        self.min_score = float(min_score)
        self.um_per_px_range = um_per_px_range
        self.rig_um_per_px = rig_um_per_px
        self._refusing: str | None = None  # the last refusal logged (logged once per change)
        self._on_detections = on_detections
        self._publish = publish
        self.device = device
        self.log = get_logger("patchrig.localiser")
        self._cond = threading.Condition()
        self._latest: LocalisedFrame | None = None
        self._stop = threading.Event()
        self.stats: dict[str, Any] = {"localised": 0, "dropped": 0, "errors": 0, "last_localise_ms": None}
        self._thread = threading.Thread(target=self._run, name="patchrig-localiser", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)

    @property
    def latest(self) -> LocalisedFrame | None:
        with self._cond:
            return self._latest

    def wait_for_result(self, after_frame_id: int | None, timeout_s: float) -> LocalisedFrame | None:
        """The newest result whose frame is newer than ``after_frame_id`` (None: any), or None
        when none arrives within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                r = self._latest
                if r is not None and (after_frame_id is None or r.frame.frame_id > after_frame_id):
                    return r
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)

    def wait_for_frame_after(self, received_after_s: float, timeout_s: float) -> LocalisedFrame | None:
        """The first result of a frame received after ``received_after_s`` (monotonic)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                r = self._latest
                if r is not None and r.frame.received_s > received_after_s:
                    return r
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)

    def shared_localiser(self) -> SharedLocaliser:
        """A localiser for other threads that shares this worker's model and results."""
        return SharedLocaliser(self)

    def _cached(self, pixels: Any) -> list[TipDetection] | None:
        with self._cond:
            for array, detections in self._recent:
                if array is pixels:
                    return list(detections)
        return None

    def locate_shared(self, pixels: Any, um_per_px: float) -> list[TipDetection]:
        """Raw detections of ``pixels``: this worker's result if it localised (or is localising)
        the very same array, else a model run under the lock."""
        deadline = time.monotonic() + 5.0
        with self._cond:
            while self._in_progress is pixels and time.monotonic() < deadline:
                self._cond.wait(0.05)
        cached = self._cached(pixels)
        if cached is not None:
            return cached
        with self.lock:
            return list(self._localiser.locate(pixels, um_per_px))

    def process(self, frame: Frame) -> LocalisedFrame:
        """Localise one frame, assign, publish and store it (the loop calls this)."""
        with self._cond:
            self._in_progress = frame.pixels
        raw: list[TipDetection] | None = None
        try:
            t0 = time.perf_counter()
            with self.lock:
                raw = list(self._localiser.locate(frame.pixels, frame.um_per_px))
            localise_ms = (time.perf_counter() - t0) * 1e3
        finally:
            with self._cond:
                self._in_progress = None
                if raw is not None:
                    self._recent = [*self._recent[-3:], (frame.pixels, raw)]
                self._cond.notify_all()
        detections = [d for d in raw if d.score >= self.min_score]
        extra: dict[str, Any] = {}
        assigned: dict[str, int] = {}
        refusal = pixel_size_refusal(frame.um_per_px, self.um_per_px_range, self.rig_um_per_px)
        self._log_refusal(refusal, frame)
        if refusal is not None:
            extra["not_for_steering"] = refusal
        elif self._on_detections is not None:
            try:
                extra = dict(self._on_detections(frame, detections) or {})
                assigned = {str(k): int(v) for k, v in extra.pop("assigned", {}).items()}
            except Exception as exc:  # correction must never kill localisation
                self.stats["errors"] += 1
                self.log.warning("assignment failed", frame_id=frame.frame_id, error=str(exc))
        result = LocalisedFrame(frame, detections, assigned, extra, localise_ms, time.monotonic())
        with self._cond:
            self._latest = result
            self._cond.notify_all()
        self.stats["localised"] += 1
        self.stats["last_localise_ms"] = localise_ms
        if self._publish is not None:
            self._publish(
                "tips",
                {
                    "frame_id": frame.frame_id,
                    "t_frame": frame.t_s,
                    "um_per_px": frame.um_per_px,
                    "shape": list(frame.shape),
                    "z_um": frame.z_um,
                    "latency_ms": (time.monotonic() - frame.received_s) * 1e3,
                    "localise_ms": localise_ms,
                    "dropped": self.stats["dropped"],
                    "device": self.device,
                    "tips": result.tips_json(),
                    **extra,
                },
            )
        return result

    def _log_refusal(self, refusal: str | None, frame: Frame) -> None:
        """One warning when frames start being refused for steering, one line when they stop."""
        if refusal is not None and self._refusing is None:
            self.log.warning("frames not used for steering", frame_id=frame.frame_id, reason=refusal)
        elif refusal is None and self._refusing is not None:
            self.log.info("frames used for steering again", frame_id=frame.frame_id, um_per_px=frame.um_per_px)
        self._refusing = refusal

    def _run(self) -> None:
        last_id: int | None = None
        while not self._stop.is_set():
            frame = self._frames.wait_for_frame(last_id, 0.2)
            if frame is None or self._stop.is_set():
                continue
            self.stats["dropped"] += frames_lost_between(last_id, frame.frame_id)
            last_id = frame.frame_id
            try:
                self.process(frame)
            except Exception as exc:
                self.stats["errors"] += 1
                self.log.warning("localisation failed", frame_id=frame.frame_id, error=str(exc))


class SharedLocaliser:
    """``Localiser`` facade over a ``LocaliserWorker`` (see ``LocaliserWorker.shared_localiser``)."""

    def __init__(self, worker: LocaliserWorker) -> None:
        self._worker = worker

    def locate(self, pixels: Any, um_per_px: float) -> list[TipDetection]:
        return self._worker.locate_shared(pixels, um_per_px)
