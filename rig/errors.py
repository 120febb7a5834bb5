"""The error hierarchy shared by every patchrig package.

Every error carries a patchrig-rpc/1 error ``code`` so that the daemon can turn any failure
into a wire reply without guessing, and the CLI can print it as one clear line.
"""

from __future__ import annotations


class PatchrigError(Exception):
    """Base class of every error patchrig raises on purpose. ``code`` is a patchrig-rpc/1 code."""

    code: str = "internal"

    def __init__(self, message: str, *, channel: str | None = None) -> None:
        self.channel = channel
        text = f"channel {channel!r}: {message}" if channel is not None else message
        super().__init__(text)


class ConfigError(PatchrigError):
    """An invalid configuration file or value; the message names the key and the file."""

    code = "invalid_params"


class InvalidParams(PatchrigError):
    """A request or argument has a wrong type or value (NaN, negative speed, ...)."""

    code = "invalid_params"


class OutOfBounds(PatchrigError):
    """A target lies outside the soft limits. Nothing was sent to the device (never clipped)."""

    code = "out_of_bounds"


class NotCalibrated(PatchrigError):
    """The channel has no calibration, or it was made for another rig."""

    code = "not_calibrated"


class NoFrame(PatchrigError):
    """No fresh frame is available."""

    code = "no_frame"


class NotFound(PatchrigError):
    """An unknown channel, device id, file or operation."""

    code = "not_found"


class Busy(PatchrigError):
    """The resource is busy with another operation."""

    code = "busy"


class DeviceError(PatchrigError):
    """A device answered wrongly, garbled, or not at all."""

    code = "device_error"


class DeviceTimeout(DeviceError):
    """A device did not answer within its timeout."""

    code = "timeout"


class Stopped(PatchrigError):
    """The operation was interrupted by stop, stop-all, a supersession or shutdown."""

    code = "stopped"


class DataError(PatchrigError):
    """A dataset, image, checkpoint or label file is malformed; the message names it."""

    code = "invalid_params"
