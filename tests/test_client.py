"""The Python client: lazy pirate retries, error mapping, and ``patchrig client`` on top of it."""

from __future__ import annotations

import json
import threading

import pytest
import zmq
from support_daemon import START_UM, running_daemon

from rig.cli import main
from rig.client import PatchrigClient
from rig.protocol import RpcError, ok_reply


class DroppingServer:
    """A ROUTER that ignores the first ``drop`` requests, then answers ``ping`` (a real socket)."""

    def __init__(self, drop: int, *, only_pings: bool = False) -> None:
        self.only_pings = only_pings  # answer pings only (a daemon busy or stuck on everything else)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.drop = drop
        self.seen: list[str] = []
        self.methods: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            request = json.loads(frames[-1])
            self.seen.append(request["id"])
            self.methods.append(request["method"])
            if len(self.seen) <= self.drop or (self.only_pings and request["method"] != "ping"):
                continue
            self.sock.send_multipart([*frames[:-1], ok_reply(request["id"], {"pong": True})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)
        self.ctx.term()


def test_lazy_pirate_resends_after_a_dropped_request() -> None:
    server = DroppingServer(drop=1)
    try:
        with PatchrigClient(server.endpoint, timeout_s=0.3, retries=2) as client:
            assert client.ping() == {"pong": True}
            assert client.resends == 1
            assert len(server.seen) == 2 and server.seen[0] == server.seen[1]  # same id resent
            assert client.ping() == {"pong": True}  # the recreated socket keeps working
    finally:
        server.close()


def test_gives_up_with_timeout_after_all_retries() -> None:
    server = DroppingServer(drop=10)
    try:
        with PatchrigClient(server.endpoint, timeout_s=0.1, retries=2) as client:
            with pytest.raises(RpcError) as info:
                client.ping()
            assert info.value.code == "timeout" and client.resends == 2
        assert len(server.seen) == 3
    finally:
        server.close()


@pytest.mark.parametrize("method", ["calibrate", "move_tip", "set_tip"])
def test_routines_are_never_re_sent_after_a_timeout(method: str) -> None:
    """A repeated calibrate (or move_tip, set_tip) would restart the routine part-way while the
    first may still run: it is sent once, and the timeout says it may still be running."""
    server = DroppingServer(drop=10)
    try:
        with PatchrigClient(server.endpoint, timeout_s=0.1, retries=2) as client:
            with pytest.raises(RpcError, match="not re-sent") as info:
                client.call(method, {"channel": "A"})
            assert info.value.code == "timeout" and client.resends == 0
        assert len(server.seen) == 1
    finally:
        server.close()


def test_a_waiting_motion_call_is_never_re_sent_and_a_dead_daemon_is_reported_at_once() -> None:
    """A waiting move re-sent after its timeout superseded, and so restarted, the move still
    running; and a daemon that was not there was reported only after the operation's timeout
    (300 s in ``patchrig client``) times the attempts."""
    import time

    busy = DroppingServer(drop=0, only_pings=True)
    try:
        with PatchrigClient(busy.endpoint, timeout_s=0.2, op_timeout_s=0.3, retries=2) as client:
            with pytest.raises(RpcError) as info:
                client.move("A", [1.0, 2.0, 3.0], 100.0)
            assert info.value.code == "timeout" and client.resends == 0
        assert busy.methods == ["ping", "move"]
    finally:
        busy.close()
    dead = DroppingServer(drop=100)
    try:
        with PatchrigClient(dead.endpoint, timeout_s=0.2, op_timeout_s=300.0, retries=2) as client:
            t0 = time.monotonic()
            with pytest.raises(RpcError, match="does not answer.*nothing was sent"):
                client.calibrate("A")
            assert time.monotonic() - t0 < 5.0
        assert dead.methods == ["ping"]
    finally:
        dead.close()


def test_typed_methods_and_error_codes_against_the_daemon() -> None:
    with running_daemon(["A"]) as rig:
        c = rig.client()
        assert c.move("A", [START_UM + 3, START_UM, START_UM], 1000.0)["position_um"][0] == pytest.approx(START_UM + 3)
        with pytest.raises(RpcError) as info:
            c.move("A", [START_UM, START_UM, -1.0])
        assert info.value.code == "out_of_bounds"
        op = c.move("A", [START_UM, START_UM, START_UM], 1000.0, wait=False)
        assert set(op) == {"op", "channel", "method"}


def test_patchrig_client_command(capsys) -> None:
    with running_daemon(["A"]) as rig:
        ep = rig.daemon.command_endpoint
        capsys.readouterr()  # the daemon's start-up log lines
        assert main(["client", "--endpoint", ep, "get_position", '{"channel": "A"}']) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["position_um"] == pytest.approx([START_UM] * 3)
        assert main(["client", "--endpoint", ep, "move", '{"channel": "A", "position_um": [0, 0, 99999]}']) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "out_of_bounds" in err[0]
        assert main(["client", "--endpoint", ep, "ping", "[not json"]) == 1
        assert "params are not JSON" in capsys.readouterr().err


def test_a_malformed_endpoint_is_one_clear_line_not_a_hang(capsys) -> None:
    """A failed connect used to leave its socket open, and closing the context then waited for
    ever."""
    from support_cli import one_line_error

    done: list[int] = []
    runner = threading.Thread(target=lambda: done.append(main(["client", "ping", "--endpoint", "foo"])), daemon=True)
    runner.start()
    runner.join(10.0)
    assert done == [1]
    assert "cannot connect to 'foo'" in one_line_error(capsys)
    assert main(["client", "ping", "--retries", "-1"]) == 1
    assert "--retries must be 0 or more" in one_line_error(capsys)
    for bad in ("-2", "inf", "nan", "1e12"):
        assert main(["client", "ping", "--timeout", bad]) == 1
        assert "--timeout must be a number of seconds" in one_line_error(capsys)
    assert main(["client", "--watch", "hearbeat"]) == 1  # a typo used to wait for ever in silence
    assert "unknown telemetry topic(s) ['hearbeat']" in one_line_error(capsys)


def test_patchrig_client_never_resends_a_move_that_does_not_wait(capsys) -> None:
    server = DroppingServer(drop=100)
    try:
        assert main(["client", "--endpoint", server.endpoint, "--timeout", "0.2", "--retries", "2", "move",
                     '{"channel": "A", "position_um": [1, 2, 3], "wait": false}']) == 1
        assert "timeout" in capsys.readouterr().err
        assert server.methods == ["move"]  # sent once
    finally:
        server.close()
