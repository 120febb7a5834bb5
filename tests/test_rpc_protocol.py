"""patchrig-rpc/1 parsing and replies: every error path of ``parse_request``, strict params."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rig.errors import DeviceTimeout, OutOfBounds, Stopped
from rig.protocol import (
    ERROR_CODES,
    METHODS,
    RpcError,
    dumps,
    error_reply,
    exception_reply,
    make_request,
    ok_reply,
    parse_request,
    peek_id,
)


def req(method: str, params: object = None, **envelope: object) -> bytes:
    data: dict[str, object] = {"v": 1, "id": "r1", "method": method}
    if params is not None:
        data["params"] = params
    data.update(envelope)
    return json.dumps(data).encode()


def code_of(payload: bytes, **kw: int) -> str:
    with pytest.raises(RpcError) as info:
        parse_request(payload, **kw)
    return info.value.code


def test_error_codes_are_exactly_the_design_list() -> None:
    assert ERROR_CODES == (
        "bad_request", "unknown_method", "invalid_params", "out_of_bounds", "not_calibrated",
        "no_frame", "not_found", "busy", "device_error", "timeout", "stopped", "internal",
    )


def test_every_design_method_is_known() -> None:
    for m in ["ping", "status", "get_position", "move", "move_tip", "locate", "calibrate", "set_tip",
              "get_calibration", "stop", "stop_all"]:
        assert m in METHODS


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"id": 1, "method": "ping"}',  # no v
        b'{"v": 2, "id": 1, "method": "ping"}',
        b'{"v": true, "id": 1, "method": "ping"}',
        b'{"v": 1, "id": 1}',  # no method
        b'{"v": 1, "id": 1, "method": 5}',
        b'{"v": 1, "id": {"nested": 1}, "method": "ping"}',
        b'{"v": 1, "id": 1, "method": "ping", "extra": 1}',
        b"[" * 100000 + b"]" * 100000,
    ],
)
def test_malformed_envelopes_are_bad_request(payload: bytes) -> None:
    assert code_of(payload, max_bytes=1 << 20) == "bad_request"


def test_size_limit_is_bad_request_before_parsing() -> None:
    big = req("ping", {"pad": "x" * 5000})
    with pytest.raises(RpcError) as info:
        parse_request(big, max_bytes=1024)
    assert info.value.code == "bad_request"
    assert "exceeds the limit of 1024 bytes" in str(info.value)


def test_unknown_method() -> None:
    assert code_of(req("fly_to_the_moon", {})) == "unknown_method"
    assert code_of(req("x" * 1000, {})) == "unknown_method"


@pytest.mark.parametrize(
    "method,params",
    [
        ("ping", {"unexpected": 1}),
        ("get_position", {}),
        ("get_position", {"channel": 3}),
        ("get_position", {"channel": ""}),
        ("move", {"channel": "A"}),
        ("move", {"channel": "A", "position_um": "1,2,3"}),
        ("move", {"channel": "A", "position_um": ["1", "2", "3"]}),
        ("move", {"channel": "A", "position_um": [1, 2, True]}),
        ("move", {"channel": "A", "position_um": []}),
        ("move", {"channel": "A", "position_um": [1, 2, 3, 4, 5]}),
        ("move", {"channel": "A", "position_um": [1, 2, 3], "speed_um_s": -5}),
        ("move", {"channel": "A", "position_um": [1, 2, 3], "speed_um_s": 0}),
        ("move", {"channel": "A", "position_um": [1, 2, 3], "wait": "yes"}),
        ("move", {"channel": "A", "position_um": [1, 2, 3], "sped_um_s": 5}),
        ("move_tip", {"channel": "A"}),
        ("move_tip", {"channel": "A", "target_px": [1, 2], "target_um": [1, 2]}),
        ("move_tip", {"channel": "A", "target_px": [1]}),
        ("move_tip", {"channel": "A", "target_px": [1, 2], "tolerance_um": 0}),
        ("calibrate", {"channel": "A", "wait": 1}),
        ("set_tip", {"channel": "A", "px": [1, 2, 3]}),
        ("lease", {"action": "steal", "holder": "me"}),
        ("lease", {"action": "acquire"}),
        ("stop_all", {"channel": "A"}),
    ],
)
def test_invalid_params(method: str, params: dict) -> None:
    assert code_of(req(method, params)) == "invalid_params"


def test_params_must_be_an_object() -> None:
    assert code_of(req("ping", [1, 2])) == "invalid_params"


def test_nan_and_infinity_are_rejected() -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        payload = b'{"v":1,"id":1,"method":"move","params":{"channel":"A","position_um":[1,2,' + literal + b"]}}"
        assert code_of(payload) == "invalid_params"


def test_valid_requests_parse_to_typed_params() -> None:
    r = parse_request(req("move", {"channel": "A", "position_um": [1, 2.5, 3], "speed_um_s": 100}))
    assert r.id == "r1" and r.method == "move"
    assert r.params.position_um == [1.0, 2.5, 3.0]  # type: ignore[attr-defined]
    assert r.params.wait is True  # type: ignore[attr-defined]
    r = parse_request(req("move_tip", {"channel": "B", "target_um": [1, 2], "wait": False}))
    assert r.params.target_um == [1.0, 2.0] and r.params.wait is False  # type: ignore[attr-defined]
    assert parse_request(req("ping")).params.model_dump() == {}
    assert parse_request(b'{"v":1,"id":null,"method":"ping"}').id is None
    with pytest.raises(RpcError, match="missing field 'id'") as info:  # DESIGN.md: missing fields
        parse_request(b'{"v":1,"method":"ping"}')
    assert info.value.code == "bad_request"
    assert parse_request(b'{"v":1,"id":7,"method":"status","params":null}').id == 7


def test_replies_follow_the_wire_format() -> None:
    assert json.loads(ok_reply("x", {"a": 1})) == {"v": 1, "id": "x", "ok": True, "result": {"a": 1}}
    assert json.loads(error_reply(3, "busy", "no")) == {
        "v": 1, "id": 3, "ok": False, "error": {"code": "busy", "message": "no"}
    }
    assert json.loads(error_reply(3, "made_up", "?"))["error"]["code"] == "internal"


def test_exception_replies_carry_the_error_code() -> None:
    for exc, code in [(OutOfBounds("far"), "out_of_bounds"), (DeviceTimeout("late"), "timeout"),
                      (Stopped("halt"), "stopped"), (RpcError("no_frame", "dark"), "no_frame"),
                      (ZeroDivisionError("bug"), "internal")]:
        reply = json.loads(exception_reply("i", exc))
        assert reply["ok"] is False and reply["error"]["code"] == code
    assert "ZeroDivisionError" in json.loads(exception_reply("i", ZeroDivisionError("bug")))["error"]["message"]


def test_dumps_handles_numpy_and_non_finite() -> None:
    data = json.loads(dumps({"a": np.arange(3), "b": np.float32(1.5), "c": math.nan, "d": (1, 2)}))
    assert data == {"a": [0, 1, 2], "b": 1.5, "c": None, "d": [1, 2]}


def test_peek_id_recovers_the_id_of_a_bad_request() -> None:
    assert peek_id(b'{"v": 9, "id": "abc"}') == "abc"
    assert peek_id(b"garbage") is None
    assert peek_id(b'{"id": {"x": 1}}') is None


def test_make_request_round_trips() -> None:
    r = parse_request(make_request("stop", {"channel": "C"}, "q"))
    assert (r.id, r.method, r.params.channel) == ("q", "stop", "C")  # type: ignore[attr-defined]
