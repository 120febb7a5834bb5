"""patchrig-rpc/1: the request envelope, one parameter model per method, errors and replies.

Wire format (one ZeroMQ frame, UTF-8 JSON):
    request  {"v": 1, "id": any scalar, "method": "name", "params": {...}}
    success  {"v": 1, "id": ..., "ok": true, "result": {...}}
    failure  {"v": 1, "id": ..., "ok": false, "error": {"code": "...", "message": "..."}}

Validation is strict (pydantic strict mode): unknown keys, wrong JSON types ("12" for a
number, true for a number), NaN/inf and missing required fields are ``invalid_params``; a
payload that is not JSON, not an object, or lacks ``v``/``method`` is ``bad_request``.
Units follow the names: device µm (``position_um``), microscope µm (``target_um``), pixels
(``target_px``, ``px``; x = column, y = row, origin at the centre of the top-left pixel).

Nothing here touches a device: parsing a request can only produce a model or an error.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rig.errors import PatchrigError

PROTOCOL = "patchrig-rpc/1"
VERSION = 1

ERROR_CODES: tuple[str, ...] = (
    "bad_request",
    "unknown_method",
    "invalid_params",
    "out_of_bounds",
    "not_calibrated",
    "no_frame",
    "not_found",
    "busy",
    "device_error",
    "timeout",
    "stopped",
    "internal",
)

DEFAULT_MAX_MESSAGE_BYTES = 65536


class RpcError(PatchrigError):
    """An error with an explicit patchrig-rpc/1 ``code`` (any of ``ERROR_CODES``)."""

    def __init__(self, code: str, message: str, *, channel: str | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown rpc error code {code!r}")
        self.code = code
        super().__init__(message, channel=channel)


def error_code_of(exc: BaseException) -> str:
    """The wire code for any exception: PatchrigError codes, else ``internal``."""
    code = getattr(exc, "code", None) if isinstance(exc, PatchrigError) else None
    return code if code in ERROR_CODES else "internal"


# -- models ---------------------------------------------------------------------------------


class Params(BaseModel):
    """Base of every params model: strict JSON types, unknown keys forbidden, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


ChannelName = Annotated[str, Field(min_length=1, max_length=32)]
PositionUm = Annotated[list[float], Field(min_length=1, max_length=4)]
Point2 = Annotated[list[float], Field(min_length=2, max_length=2)]
Point2or3 = Annotated[list[float], Field(min_length=2, max_length=3)]
SpeedUmS = Annotated[float, Field(gt=0, le=100_000)]


class NoParams(Params):
    """ping, status, locate, stop_all, shutdown."""


class ChannelParams(Params):
    """get_position, get_calibration, stop."""

    channel: ChannelName


class MoveParams(Params):
    """move: open-loop move to ``position_um`` (device µm) at ``speed_um_s`` (default: the
    channel's default speed; above the channel maximum is rejected)."""

    channel: ChannelName
    position_um: PositionUm
    speed_um_s: SpeedUmS | None = None
    wait: bool = True


class MoveTipParams(Params):
    """move_tip: closed loop until the tip is within ``tolerance_um`` of the target.

    Exactly one of ``target_px`` ([x, y] pixels of the current frame geometry, tip in the focal
    plane) or ``target_um`` ([X, Y] or [X, Y, Z] microscope µm; Z defaults to the focal plane).
    """

    channel: ChannelName
    target_px: Point2 | None = None
    target_um: Point2or3 | None = None
    tolerance_um: Annotated[float, Field(gt=0, le=100)] | None = None
    max_iterations: Annotated[int, Field(ge=1, le=50)] | None = None
    speed_um_s: SpeedUmS | None = None
    wait: bool = True

    @model_validator(mode="after")
    def _one_target(self) -> MoveTipParams:
        if (self.target_px is None) == (self.target_um is None):
            raise ValueError("give exactly one of target_px or target_um")
        return self


class CalibrateParams(Params):
    """calibrate: the automatic calibration routine of one channel."""

    channel: ChannelName
    wait: bool = True


class SetTipParams(Params):
    """set_tip: offset-only recalibration. ``px`` = where the tip is now ([x, y] pixels); when
    omitted, the channel's assigned detection on the newest localised frame is used."""

    channel: ChannelName
    px: Point2 | None = None


class LeaseParams(Params):
    """lease: the controlling-client dead-man switch.

    ``acquire`` takes the lease for ``holder`` (``busy`` if another holder has it), ``renew``
    extends it, ``release`` gives it back. While a lease is held and not renewed within
    ``lease_s`` seconds, the watchdog stops every manipulator and raises an alarm. The lease does
    not lock other clients out of commands (a second console may still stop or move); it makes
    sure that motion never outlives the controlling program.
    """

    action: Literal["acquire", "renew", "release"]
    holder: Annotated[str, Field(min_length=1, max_length=64)]
    lease_s: Annotated[float, Field(gt=0, le=3600)] | None = None


METHODS: dict[str, type[Params]] = {
    "ping": NoParams,
    "status": NoParams,
    "get_position": ChannelParams,
    "move": MoveParams,
    "move_tip": MoveTipParams,
    "locate": NoParams,
    "calibrate": CalibrateParams,
    "set_tip": SetTipParams,
    "get_calibration": ChannelParams,
    "stop": ChannelParams,
    "stop_all": NoParams,
    "shutdown": NoParams,
    "lease": LeaseParams,
}

MOTION_METHODS = frozenset({"move", "move_tip", "calibrate"})
"""Methods that start an operation on a channel's controller and accept ``wait``."""


class Request(BaseModel):
    """A validated request: ``id`` echoed back, ``method`` known, ``params`` typed."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    id: Any
    method: str
    params: Params


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "params"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _valid_id(value: Any) -> bool:
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= 256


def peek_id(payload: bytes) -> Any:
    """The request ``id`` if it can be recovered from ``payload``, else None (for errors)."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(data, dict) and _valid_id(data.get("id")):
        return data.get("id")
    return None


def parse_request(payload: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """Decode and validate one request frame; raise ``RpcError`` with the right code.

    Order: size (bad_request), JSON (bad_request), envelope (bad_request), version
    (bad_request), method (unknown_method), params (invalid_params).
    """
    if len(payload) > max_bytes:
        raise RpcError("bad_request", f"message of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise RpcError("bad_request", "message is not UTF-8") from None
    except RecursionError:
        raise RpcError("bad_request", "message is nested too deeply") from None
    except ValueError as exc:
        raise RpcError("bad_request", f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RpcError("bad_request", f"message must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"v", "id", "method", "params"})
    if unknown:
        raise RpcError("bad_request", f"unknown envelope keys {unknown}; allowed: v, id, method, params")
    if "v" not in data:
        raise RpcError("bad_request", "missing field 'v' (protocol version, 1)")
    if data["v"] != VERSION or isinstance(data["v"], bool):
        raise RpcError("bad_request", f"unsupported protocol version {data['v']!r}; this is {PROTOCOL}")
    if "id" not in data:  # DESIGN.md: a missing field is bad_request
        raise RpcError("bad_request", "missing field 'id' (a string, a number or null; the reply echoes it)")
    request_id = data["id"]
    if not _valid_id(request_id):
        raise RpcError("bad_request", "'id' must be a string (at most 256 characters), a number or null")
    method = data.get("method")
    if not isinstance(method, str):
        raise RpcError("bad_request", "missing or non-string field 'method'")
    model = METHODS.get(method)
    if model is None:
        shown = method if len(method) <= 40 else method[:40] + "..."
        raise RpcError("unknown_method", f"unknown method {shown!r}; methods: {', '.join(METHODS)}")
    raw_params = data.get("params", {})
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, dict):
        raise RpcError("invalid_params", "'params' must be a JSON object")
    try:
        params = model.model_validate(raw_params)
    except ValidationError as exc:
        raise RpcError("invalid_params", f"{method}: {_format_validation(exc)}") from None
    return Request(id=request_id, method=method, params=params)


# -- encoding -------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and non-finite floats (-> None) for JSON."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy arrays and scalars
        return to_jsonable(tolist())
    if hasattr(value, "__fspath__"):
        return str(value)
    return str(value)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj`` (numpy-safe, never NaN)."""
    return json.dumps(to_jsonable(obj), separators=(",", ":"), allow_nan=False).encode("utf-8")


def ok_reply(request_id: Any, result: dict[str, Any] | None = None) -> bytes:
    return dumps({"v": VERSION, "id": request_id, "ok": True, "result": result or {}})


def error_reply(request_id: Any, code: str, message: str) -> bytes:
    if code not in ERROR_CODES:
        code = "internal"
    return dumps({"v": VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}})


def exception_reply(request_id: Any, exc: BaseException) -> bytes:
    """An error reply for ``exc``; unexpected exceptions become ``internal`` with their text."""
    code = error_code_of(exc)
    message = str(exc) if code != "internal" else f"{type(exc).__name__}: {exc}"
    return error_reply(request_id, code, message)


def make_request(method: str, params: dict[str, Any] | None = None, request_id: Any = None) -> bytes:
    """Encode a request (used by the Python client and tests)."""
    return dumps({"v": VERSION, "id": request_id, "method": method, "params": params or {}})
