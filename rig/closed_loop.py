"""The daemon's bridge to ``calibration.service.CalibrationService``.

Everything that needs a calibration goes through here: the ``calibrate`` and ``move_tip``
bodies run by the channel controllers (with the operation's ``progress`` and cancel event, so
progress reaches the ``op`` topic and stop/supersession end them at once), ``set_tip``,
``get_calibration``, and the localiser worker's ``on_detections`` (assignment of detections to
channels plus continuous offset correction; the service gates every correction: confidence,
freshness, motion, jump size, outliers). Without a service every one of them answers
``not_calibrated``.
"""

from __future__ import annotations

from typing import Any

from rig.errors import NotCalibrated


class ClosedLoop:
    """Adapter between the daemon and the calibration service (``service`` may be None)."""

    def __init__(self, daemon: Any, service: Any) -> None:
        self.daemon = daemon
        self.service = service

    def _require(self, channel: str) -> Any:
        if self.service is None:
            raise NotCalibrated("no calibration service in this daemon (no frames or no localiser)", channel=channel)
        return self.service

    def is_calibrated(self, channel: str) -> bool:
        return self.service is not None and bool(self.service.is_calibrated(channel))

    def get_calibration(self, channel: str) -> dict[str, Any]:
        result = dict(self._require(channel).get_calibration(channel))
        if not result.get("calibrated"):
            raise NotCalibrated(result.get("refused") or "not calibrated; run calibrate first", channel=channel)
        return result

    def set_tip(self, channel: str, px: list[float] | None) -> dict[str, Any]:
        return dict(self._require(channel).set_tip(channel, px))

    def on_detections(self, frame: Any, detections: list[Any]) -> dict[str, Any]:
        """Assignment and correction of one localised frame; ``assigned`` maps channel -> index."""
        if self.service is None:
            return {}
        out = dict(self.service.observe(frame, detections))
        details = out.pop("assigned", {}) or {}
        indices: dict[str, int] = {}
        for channel, tip in details.items():
            for i, d in enumerate(detections):
                if d.x_px == tip["x_px"] and d.y_px == tip["y_px"] and i not in indices.values():
                    indices[channel] = i
                    break
        return {"assigned": indices, "assignment": details, **out}

    def move_tip_body(self, ctl: Any, params: Any) -> Any:
        service = self._require(ctl.name)
        if not service.is_calibrated(ctl.name):
            raise NotCalibrated("not calibrated; run calibrate first", channel=ctl.name)
        if params.target_px is not None:  # refused before it supersedes the running operation
            service.check_target_px(ctl.name, params.target_px)

        def body(op: Any) -> dict[str, Any]:
            return dict(service.move_tip(ctl.name, **_move_tip_request(params), progress=op.progress,
                                         cancel=op.cancel_event))

        return body

    def move_tip_check(self, ctl: Any, params: Any) -> Any:
        """A callable making every check of ``move_tip`` (it reads device positions: the daemon
        runs it off the server loop, before the request supersedes anything)."""
        service = self._require(ctl.name)

        def check() -> None:
            service.check_move_tip(ctl.name, **_move_tip_request(params))

        return check

    def calibrate_body(self, ctl: Any) -> Any:
        service = self._require(ctl.name)

        def body(op: Any) -> dict[str, Any]:
            return dict(service.calibrate(ctl.name, progress=op.progress, cancel=op.cancel_event))

        return body

    def close(self) -> None:
        if self.service is not None:
            self.service.close()


def _move_tip_request(params: Any) -> dict[str, Any]:
    """A ``move_tip`` request's parameters as ``CalibrationService.move_tip`` and
    ``check_move_tip`` take them."""
    return {name: getattr(params, name) for name in
            ("target_px", "target_um", "tolerance_um", "max_iterations", "speed_um_s")}
