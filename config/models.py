"""Pydantic models of the rig configuration. Unknown keys are rejected everywhere.

Units are in the key names: ``*_um`` micrometres, ``*_um_s`` micrometres per second,
``*_s`` seconds, ``*_px`` pixels, ``*_hz`` hertz.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from localisation.types import VALIDATED_UM_PER_PX

SIMULATED_PORT = "<simulated>"  # a Scientifica port the simulated rig makes (one pty per channel)


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is made of numbers (int or float; possibly optional, or a list or
    tuple of them), not strings."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Literal:
        return False
    args = get_args(annotation)
    return bool(args) and str not in args and any(_numeric(a) for a in args)


def _loose_number(value: Any) -> bool:
    """A boolean or a string where a number belongs, at any depth of lists and tuples."""
    if isinstance(value, bool | str):
        return True
    return isinstance(value, list | tuple) and any(_loose_number(v) for v in value)


class Strict(BaseModel):
    """Base: unknown keys are an error, assignment is validated, numbers must be finite and
    must be numbers (a quoted "500" or a boolean is refused, never converted)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_loose_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _numeric(field.annotation) and _loose_number(value):
            raise ValueError(f"expected numbers, got {value!r}")
        return value


class LimitsConfig(Strict):
    """Per-axis soft limits in the device's own µm. Targets outside are rejected, never clipped."""

    min_um: list[float]
    max_um: list[float]

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        if len(self.min_um) != len(self.max_um):
            raise ValueError("min_um and max_um must have the same number of axes")
        if not 1 <= len(self.min_um) <= 4:
            raise ValueError("limits need 1 to 4 axes")
        for lo, hi in zip(self.min_um, self.max_um, strict=True):
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise ValueError(f"each axis needs finite min_um < max_um, got {lo} .. {hi}")
        return self


class SensapexConfig(Strict):
    """A Sensapex uMp/uMs reached through the vendor SDK (libum) over UDP."""

    device_id: Annotated[int, Field(ge=1, le=19)]
    address: str = "169.254.255.255"
    group: Annotated[int, Field(ge=0, le=10)] = 0
    timeout_ms: Annotated[int, Field(ge=10, le=5000)] = 200


class ScientificaConfig(Strict):
    """A Scientifica PatchStar/MicroStar on a serial port (LinLab protocol)."""

    port: str
    baud: Literal[9600, 38400] = 9600
    timeout_s: Annotated[float, Field(gt=0, le=10)] = 0.5
    expected_version: Literal[2, 3] | None = None


class SimulatedDriverConfig(Strict):
    """The in-process simulated backend (no protocol), for fast tests."""

    acceleration_um_s2: Annotated[float, Field(gt=0)] = 20000.0


class ChannelConfig(Strict):
    """One pipette channel: a manipulator, its limits and speed policy."""

    name: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]
    driver: Literal["sensapex", "scientifica", "simulated"]
    n_axes: Annotated[int, Field(ge=3, le=4)] = 3
    limits: LimitsConfig
    max_speed_um_s: Annotated[float, Field(gt=0, le=5000)] = 1000.0
    default_speed_um_s: Annotated[float, Field(gt=0)] = 200.0
    # whether +z moves the tip up (1) or down (-1); the calibration assumes it for a 3-axis
    # device and measures it on a 4-axis one
    z_up_sign: Literal[-1, 1] = 1
    sensapex: SensapexConfig | None = None
    scientifica: ScientificaConfig | None = None
    simulated: SimulatedDriverConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> ChannelConfig:
        if len(self.limits.min_um) != self.n_axes:
            raise ValueError(f"limits have {len(self.limits.min_um)} axes, n_axes is {self.n_axes}")
        if self.default_speed_um_s > self.max_speed_um_s:
            raise ValueError("default_speed_um_s exceeds max_speed_um_s")
        section = getattr(self, self.driver)
        if self.driver != "simulated" and section is None:
            raise ValueError(f"driver {self.driver!r} needs a [{self.driver}] section")
        for other in ("sensapex", "scientifica", "simulated"):
            if other != self.driver and getattr(self, other) is not None:
                raise ValueError(f"section [{other}] given but driver is {self.driver!r}")
        return self


class RigIdentity(Strict):
    """What a calibration is valid for: the rig, the objective and the pixel size."""

    name: Annotated[str, Field(min_length=1)] = "sim-rig"
    objective: str = "25x/1.05"
    um_per_px: Annotated[float, Field(gt=0.05, le=10)] = 0.62


class FramesConfig(Strict):
    """Where frames come from and when they count as stale."""

    source: Literal["simulated", "zmq", "replay"] = "simulated"
    zmq_endpoint: str = "tcp://127.0.0.1:5560"
    replay_path: Path | None = None
    replay_rate_hz: Annotated[float, Field(gt=0, le=1000)] = 30.0
    stale_after_s: Annotated[float, Field(gt=0, le=10)] = 1.0  # a frame older than 10 s is never fresh
    focal_z_um: float | None = None

    @model_validator(mode="after")
    def _check(self) -> FramesConfig:
        if self.source == "replay" and self.replay_path is None:
            raise ValueError("source 'replay' needs replay_path")
        return self


class LocaliserConfig(Strict):
    """The tip localiser: checkpoint (None = the shipped default), device and gates.

    ``min_score``: detections below it are not published and never used. ``um_per_px_range``:
    the frame pixel sizes (µm per pixel, inclusive) whose detections may steer manipulators;
    outside it tips are still published (marked), but calibrate, set_tip and move_tip refuse
    the frame and continuous correction skips it (the shipped localiser was validated only
    inside the default range)."""

    checkpoint: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    min_score: Annotated[float, Field(ge=0, le=1)] = 0.5
    threads: Annotated[int, Field(ge=1, le=64)] = 2
    um_per_px_range: tuple[Annotated[float, Field(gt=0, le=10)], Annotated[float, Field(gt=0, le=10)]] = (
        VALIDATED_UM_PER_PX
    )

    @field_validator("um_per_px_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] >= value[1]:
            raise ValueError(f"um_per_px_range must be [smallest, largest] with smallest < largest, got {list(value)}")
        return value


class CalibrationConfig(Strict):
    """Calibration persistence and the gates of continuous correction."""

    directory: Path = Path("~/.local/share/patchrig/calibration")
    assignment_gate_um: Annotated[float, Field(gt=0)] = 15.0
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.7
    max_offset_jump_um: Annotated[float, Field(gt=0)] = 10.0
    tolerance_um: Annotated[float, Field(gt=0)] = 2.0
    max_iterations: Annotated[int, Field(ge=1, le=50)] = 6
    min_tip_separation_um: Annotated[float, Field(ge=0)] = 10.0
    unverified_final_um: Annotated[float, Field(ge=0, le=50)] = 15.0
    frames_averaged: Annotated[int, Field(ge=1, le=32)] = 1


class ServerConfig(Strict):
    """ZeroMQ endpoints, security and limits of the command server."""

    command_endpoint: str = "tcp://127.0.0.1:5555"
    telemetry_endpoint: str = "tcp://127.0.0.1:5556"
    curve_dir: Path | None = None
    max_message_bytes: Annotated[int, Field(ge=256, le=10_000_000)] = 65536
    lease_s: Annotated[float, Field(gt=0)] = 10.0
    heartbeat_hz: Annotated[float, Field(gt=0, le=100)] = 1.0


class SimulationConfig(Strict):
    """The simulated world (only used when devices or frames are simulated)."""

    seed: Annotated[int, Field(ge=0)] = 0
    frame_rate_hz: Annotated[float, Field(gt=0, le=200)] = 30.0
    image_size_px: Annotated[int, Field(ge=64, le=4096)] = 512
    # random-walk drift of each hidden transform: RMS displacement = this x sqrt(minutes)
    drift_um_per_min: Annotated[float, Field(ge=0)] = 0.5
    jump_probability_per_min: Annotated[float, Field(ge=0)] = 0.0  # 0: no spontaneous jumps


class RigConfig(Strict):
    """The whole rig configuration (one TOML file)."""

    rig: RigIdentity = RigIdentity()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    frames: FramesConfig = FramesConfig()
    localiser: LocaliserConfig = LocaliserConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    server: ServerConfig = ServerConfig()
    simulation: SimulationConfig | None = None
    channels: list[ChannelConfig] = Field(min_length=1, max_length=8)

    @field_validator("channels")
    @classmethod
    def _unique_names(cls, channels: list[ChannelConfig]) -> list[ChannelConfig]:
        names = [c.name for c in channels]
        if len({n.casefold() for n in names}) != len(names):
            # case-insensitive: their calibration files A.json and a.json are one file on
            # some file systems, and people confuse them
            raise ValueError(f"channel names must be unique (ignoring case), got {names}")
        return channels

    @model_validator(mode="after")
    def _one_device_per_channel(self) -> RigConfig:
        """Two channels must never drive one manipulator (the separation check would count
        one tip twice), and the two server endpoints must differ."""
        seen: dict[tuple[Any, ...], str] = {}
        for c in self.channels:
            if c.sensapex is not None:
                key: tuple[Any, ...] = ("Sensapex device", c.sensapex.address, c.sensapex.group, c.sensapex.device_id)
            elif c.scientifica is not None and c.scientifica.port != SIMULATED_PORT:
                key = ("serial port", c.scientifica.port)
            else:
                continue
            if key in seen:
                raise ValueError(f"channels {seen[key]!r} and {c.name!r} name the same {key[0]} "
                                 f"({', '.join(str(k) for k in key[1:])}): one manipulator per channel")
            seen[key] = c.name
        if self.server.command_endpoint == self.server.telemetry_endpoint:
            raise ValueError(f"server.command_endpoint and server.telemetry_endpoint are both "
                             f"{self.server.command_endpoint!r}; they must differ")
        return self

    def channel(self, name: str) -> ChannelConfig:
        """The channel called ``name``; KeyError if there is none."""
        for c in self.channels:
            if c.name == name:
                return c
        raise KeyError(name)
