"""Hostile input on the command socket: the daemon answers every message, stays up, and nothing
moves (checked on the simulated world's true positions)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import zmq
from support_daemon import START_UM, raw_request, running_daemon

from rig.protocol import ERROR_CODES, METHODS

HOSTILE_VALUES: list[object] = [
    None, True, False, 0, -1, 1e308, -1e308, 2**70, "", "A", "x" * 5000, [], [1], [1, 2, 3, 4, 5],
    ["1", "2", "3"], [None, None, None], {}, {"a": 1}, [[1, 2, 3]], "NaN", 1.5,
]
FIELDS = ["channel", "position_um", "speed_um_s", "wait", "target_px", "target_um", "tolerance_um",
          "px", "action", "holder", "lease_s", "max_iterations"]
# methods that could move something if a hostile message got through
MOTION = ["move", "move_tip", "calibrate", "set_tip"]


@pytest.fixture
def rig():
    with running_daemon(["A", "B"], server={"max_message_bytes": 4096}) as r:
        yield r


def exchange(endpoint: str, payloads: list[list[bytes]], timeout_s: float = 10.0) -> list[dict]:
    """Send every message on one DEALER (pipelined) and collect one reply per message."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    replies = []
    try:
        for frames in payloads:
            sock.send_multipart([b"", *frames])
        while len(replies) < len(payloads):
            if not sock.poll(int(timeout_s * 1000)):
                break
            replies.append(json.loads(sock.recv_multipart()[-1]))
    finally:
        sock.close(linger=0)
    return replies


def hostile_messages(seed: int, n: int) -> list[list[bytes]]:
    rnd = random.Random(seed)
    out: list[list[bytes]] = []
    methods = [*METHODS, "", "MOVE", "move ", "__init__", "stop_all\x00", "../../etc/passwd"]
    for _ in range(n):
        kind = rnd.randrange(6)
        if kind == 0:  # random bytes
            out.append([bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300)))])
        elif kind == 1:  # random JSON value that is not a request
            out.append([json.dumps(rnd.choice(HOSTILE_VALUES)).encode()])
        elif kind == 2:  # right envelope, hostile params, any method (never shutdown: it is valid)
            method = rnd.choice([m for m in methods if m not in ("shutdown",)])
            params = {rnd.choice(FIELDS): rnd.choice(HOSTILE_VALUES) for _ in range(rnd.randrange(0, 4))}
            if method in MOTION or method in ("stop", "get_position"):
                params.setdefault("channel", rnd.choice(["A", "B", "nope", 7]))
            if method in MOTION:  # make sure it cannot be valid: a hostile key that is not allowed
                params["hostile_key"] = 1
            out.append([json.dumps({"v": 1, "id": rnd.randrange(10**6), "method": method, "params": params}).encode()])
        elif kind == 3:  # wrong envelope types
            env = {"v": rnd.choice(HOSTILE_VALUES), "id": rnd.choice(HOSTILE_VALUES),
                   "method": rnd.choice(HOSTILE_VALUES), "params": rnd.choice(HOSTILE_VALUES)}
            if env["v"] == 1 and isinstance(env["method"], str):
                env["v"] = 0
            out.append([json.dumps(env).encode()])
        elif kind == 4:  # several frames
            out.append([b"a", b"{}", bytes(rnd.randrange(256) for _ in range(10))])
        else:  # truncated valid request
            full = json.dumps({"v": 1, "id": 1, "method": "move",
                               "params": {"channel": "A", "position_um": [1.0, 2.0, 3.0]}}).encode()
            out.append([full[: rnd.randrange(1, len(full) - 1)]])
    return out


def assert_nothing_moved(rig) -> None:
    for name, pos in rig.positions().items():
        assert pos == pytest.approx([START_UM] * 3), f"channel {name} moved to {pos}"
    for ctl in rig.daemon.controllers.values():
        assert ctl.current is None


def test_random_and_malformed_messages_are_all_answered(rig) -> None:
    messages = hostile_messages(seed=1234, n=400)
    replies = exchange(rig.daemon.command_endpoint, messages)
    assert len(replies) == len(messages)
    codes = {r["error"]["code"] for r in replies if not r["ok"]}
    assert codes <= set(ERROR_CODES) - {"internal"}, codes
    assert {"bad_request", "unknown_method", "invalid_params"} <= codes
    for r in replies:
        assert r["v"] == 1 and ("result" in r) == r["ok"]
    assert rig.client().ping()["pong"] is True
    assert_nothing_moved(rig)


def test_huge_messages_are_refused_and_the_server_stays_up(rig) -> None:
    ep = rig.daemon.command_endpoint
    for size in (4097, 100_000, 1_000_000):
        payload = json.dumps({"v": 1, "id": 1, "method": "ping", "params": {"pad": "x" * size}}).encode()
        reply = raw_request(ep, payload, timeout_s=5.0)
        assert reply is not None and reply["error"]["code"] == "bad_request"
        assert "exceeds the limit of 4096 bytes" in reply["error"]["message"]
    assert rig.client().ping()["pong"] is True


def test_out_of_limit_and_non_finite_targets_move_nothing(rig) -> None:
    ep = rig.daemon.command_endpoint
    bad_targets = [
        [START_UM, START_UM, 5000.001], [-0.001, START_UM, START_UM], [1e12, 0, 0], [-1e308, 0, 0],
    ]
    for target in bad_targets:
        for wait in (True, False):
            reply = raw_request(ep, json.dumps({"v": 1, "id": "t", "method": "move", "params": {
                "channel": "A", "position_um": target, "wait": wait}}).encode())
            assert reply["error"]["code"] == "out_of_bounds", reply
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        payload = ('{"v":1,"id":"n","method":"move","params":{"channel":"B","position_um":[1,2,' + literal + "]}}").encode()
        assert raw_request(ep, payload)["error"]["code"] == "invalid_params"
    assert raw_request(ep, json.dumps({"v": 1, "id": 1, "method": "move", "params": {
        "channel": "A", "position_um": [START_UM + 1] * 3, "speed_um_s": 1e6}}).encode())["error"]["code"] == "invalid_params"
    assert_nothing_moved(rig)


def test_wrong_type_for_every_field_of_every_method(rig) -> None:
    messages = []
    for method, model in METHODS.items():
        if method == "shutdown":
            continue
        for fld in model.model_fields:
            for bad in (None if fld not in ("speed_um_s", "px", "target_px", "target_um", "tolerance_um", "lease_s", "max_iterations") else "str", {"x": 1}, [[]], "12"):
                params = {"channel": "A", fld: bad}
                messages.append([json.dumps({"v": 1, "id": f"{method}.{fld}", "method": method, "params": params}).encode()])
    replies = exchange(rig.daemon.command_endpoint, messages)
    assert len(replies) == len(messages)
    for r in replies:
        assert r["ok"] is False and r["error"]["code"] in ("invalid_params", "not_found"), r
    assert_nothing_moved(rig)


def test_binary_garbage_from_many_sockets_then_normal_service(rig) -> None:
    rng = np.random.default_rng(7)
    ep = rig.daemon.command_endpoint
    for _ in range(20):
        reply = raw_request(ep, rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes())
        assert reply is not None and reply["ok"] is False
    c = rig.client()
    assert c.move("A", [START_UM + 5.0, START_UM, START_UM], 1000.0)["position_um"] == pytest.approx([START_UM + 5.0, START_UM, START_UM])


@pytest.mark.parametrize(("option", "value"), [("--stops", "0"), ("--rate", "0"), ("--clients", "0"),
                                               ("--seconds", "nan"), ("--requests", "-1")])
def test_bench_daemon_refuses_unusable_options_before_it_starts(option: str, value: str, capsys) -> None:
    """`--stops 0` crashed with a TypeError after the whole bench had run; `--rate 0` would
    divide by zero once the daemon was up."""
    from support_cli import one_line_error

    from rig.cli import main

    assert main(["bench", "daemon", "--localiser", "oracle", option, value]) == 1
    assert option in one_line_error(capsys)
