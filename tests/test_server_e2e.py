"""The daemon end to end over real ZeroMQ sockets: every method, the error codes, wait/op
semantics, stop and stop_all while long operations run, telemetry topics."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq
from support_daemon import START_UM, raw_request, running_daemon, wait_until

from rig.client import PatchrigClient
from rig.protocol import RpcError


@pytest.fixture
def rig():
    with running_daemon(["A", "B"], server={"heartbeat_hz": 10.0}) as r:
        yield r


def rpc_code(fn, *args, **kwargs) -> str:
    with pytest.raises(RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code


def test_ping_status_get_position(rig) -> None:
    c = rig.client()
    pong = c.ping()
    assert pong["pong"] is True and pong["protocol"] == "patchrig-rpc/1"
    st = c.status()
    assert st["state"] == "running" and set(st["channels"]) == {"A", "B"}
    assert st["channels"]["A"]["driver"] == "simulated" and st["channels"]["A"]["calibrated"] is False
    assert c.get_position("A") == pytest.approx([START_UM] * 3)


def test_move_wait_true_reaches_the_target(rig) -> None:
    c = rig.client()
    target = [START_UM + 40.0, START_UM - 25.0, START_UM + 10.0]
    result = c.move("A", target, 1500.0)
    assert result["op"].startswith("A-")
    assert result["position_um"] == pytest.approx(target, abs=1e-6)
    assert rig.world.manipulator_position_um("A") == pytest.approx(target, abs=1e-6)
    assert rig.world.manipulator_position_um("B") == pytest.approx([START_UM] * 3)


def test_move_wait_false_replies_at_once_and_reports_on_the_op_topic(rig) -> None:
    sub = rig.subscriber(("op",))
    c = rig.client()
    reply = c.move("B", [START_UM + 100.0, START_UM, START_UM], 100.0, wait=False)
    op_id = reply["op"]
    assert rig.daemon.controllers["B"].current is not None  # replied while the 1 s move runs
    states = []
    final = None
    deadline = time.monotonic() + 5
    while final is None and time.monotonic() < deadline:
        item = sub.recv(1.0)
        if item and item[1]["op"] == op_id:
            states.append(item[1]["state"])
            if item[1]["state"] in ("done", "failed", "stopped"):
                final = item[1]
    assert final is not None and final["state"] == "done"
    assert states[0] == "queued" and "running" in states
    assert final["result"]["position_um"] == pytest.approx([START_UM + 100.0, START_UM, START_UM])
    assert final["seconds"] > 0.9


def test_error_codes_over_the_wire(rig) -> None:
    c = rig.client()
    ep = rig.daemon.command_endpoint
    assert raw_request(ep, b"{not json")["error"]["code"] == "bad_request"
    assert raw_request(ep, b'{"v":1,"id":"x","method":"warp"}') == {
        "v": 1, "id": "x", "ok": False,
        "error": {"code": "unknown_method", "message": raw_request(ep, b'{"v":1,"id":"x","method":"warp"}')["error"]["message"]},
    }
    assert rpc_code(c.call, "move", {"channel": "A", "position_um": "here"}) == "invalid_params"
    assert rpc_code(c.move, "A", [START_UM, START_UM, 1e9]) == "out_of_bounds"
    assert rpc_code(c.move, "A", [1.0, 2.0]) == "invalid_params"  # wrong axis count
    assert rpc_code(c.move, "A", [START_UM] * 3, 1e5) == "invalid_params"  # above max speed
    assert rpc_code(c.get_position, "Z") == "not_found"
    assert rpc_code(c.stop, "Z") == "not_found"
    assert rpc_code(c.locate) == "no_frame"
    assert rpc_code(c.get_calibration, "A") == "not_calibrated"
    assert rpc_code(c.move_tip, "A", target_px=[10.0, 10.0]) == "not_calibrated"
    assert rpc_code(c.calibrate, "A") == "not_calibrated"
    assert rpc_code(c.set_tip, "A", [1.0, 2.0]) == "not_calibrated"
    c.lease("acquire", "rita", 30.0)
    assert rpc_code(c.lease, "acquire", "someone-else") == "busy"
    c.lease("release", "rita")
    # nothing moved through any of this
    for pos in rig.positions().values():
        assert pos == pytest.approx([START_UM] * 3)


def test_request_with_a_null_or_missing_id_and_dealer_clients(rig) -> None:
    ep = rig.daemon.command_endpoint
    reply = raw_request(ep, b'{"v":1,"id":null,"method":"ping"}')
    assert reply["ok"] is True and reply["id"] is None
    reply = raw_request(ep, b'{"v":1,"method":"ping"}')
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request" and reply["id"] is None
    reply = raw_request(ep, b'{"v":1,"id":5,"method":"ping"}', socket_type=zmq.DEALER)
    assert reply["ok"] is True and reply["id"] == 5


def test_stop_interrupts_a_long_move_from_another_client(rig) -> None:
    mover, stopper = rig.client(), rig.client()
    outcome: dict = {}

    def long_move() -> None:
        try:
            mover.move("A", [START_UM + 2000.0, START_UM, START_UM], 200.0)  # ~10 s
        except RpcError as exc:
            outcome["code"] = exc.code
            outcome["t"] = time.monotonic()

    t = threading.Thread(target=long_move)
    t.start()
    assert wait_until(lambda: rig.world.manipulator_position_um("A")[0] > START_UM + 20, 3.0)
    t_stop = time.monotonic()
    reply = stopper.stop("A")
    assert reply["stopped"] is True
    t.join(5.0)
    assert outcome["code"] == "stopped"
    assert outcome["t"] - t_stop < 1.0
    stopped_at = rig.world.manipulator_position_um("A").copy()
    time.sleep(0.2)
    assert rig.world.manipulator_position_um("A") == pytest.approx(stopped_at)
    assert stopped_at[0] < START_UM + 1000.0


def test_one_client_is_never_blocked_by_another_clients_operation(rig) -> None:
    mover, waiter, other = rig.client(), rig.client(), rig.client()
    op = mover.move("A", [START_UM + 2400.0, START_UM, START_UM], 300.0, wait=False)["op"]
    codes: list[str] = []

    def wait_for_b() -> None:
        try:
            waiter.move("B", [START_UM + 2400.0, START_UM, START_UM], 300.0, timeout_s=20)
        except RpcError as exc:
            codes.append(exc.code)

    t = threading.Thread(target=wait_for_b)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    for _ in range(20):
        other.ping()
        other.get_position("A")
        other.status()
    assert time.monotonic() - t0 < 4.0  # generous: only catches waiting behind the 8 s moves
    assert rig.daemon.controllers["A"].current is not None  # still running
    other.stop_all()
    t.join(5.0)
    assert not t.is_alive() and codes == ["stopped"]
    assert wait_until(lambda: rig.daemon.controllers["A"].current is None, 1.0) and op


def test_stop_all_while_operations_run_on_every_channel(rig) -> None:
    c, estop = rig.client(), rig.client()
    sub = rig.subscriber(("event",))
    for name in ("A", "B"):
        c.move(name, [START_UM + 2000.0, START_UM, START_UM], 200.0, wait=False)
    assert wait_until(lambda: all(p[0] > START_UM + 10 for p in rig.positions().values()), 3.0)
    t0 = time.perf_counter()
    reply = estop.stop_all()
    elapsed = time.perf_counter() - t0
    assert reply["all_stopped"] is True and sorted(reply["stopped"]) == ["A", "B"]
    assert elapsed < 1.0  # generous: only catches a stop queued behind the 10 s moves
    frozen = rig.positions()
    time.sleep(0.2)
    for name, pos in rig.positions().items():
        assert pos == pytest.approx(frozen[name])
    ev = sub.wait_for(lambda t, m: m.get("kind") == "e-stop", 2.0)
    assert ev is not None


def test_a_new_move_supersedes_the_running_one(rig) -> None:
    c = rig.client()
    sub = rig.subscriber(("op",))
    first = c.move("A", [START_UM + 2000.0, START_UM, START_UM], 200.0, wait=False)["op"]
    time.sleep(0.1)
    second = c.move("A", [START_UM, START_UM + 30.0, START_UM], 1000.0)
    ended = sub.wait_op(first, 3.0)
    assert ended is not None and ended["state"] == "stopped" and "superseded" in ended["error"]["message"]
    assert second["position_um"] == pytest.approx([START_UM, START_UM + 30.0, START_UM])


def test_a_move_its_device_refuses_leaves_the_running_move_alone(rig) -> None:
    """The backend's own checks (the Sensapex driver refuses low diagonal speeds its SDK would
    exceed; it reads the device to know) run before the request supersedes anything."""
    from rig.errors import InvalidParams

    device = rig.daemon.controllers["A"].manipulator

    def refuse_slow_moves(target_um, speed_um_s) -> None:
        if speed_um_s < 5.0:
            raise InvalidParams("this device would move faster than 2 µm/s on that path", channel="A")

    device._check_move = refuse_slow_moves
    c = rig.client()
    for reads_device in (False, True):  # checked in the server loop, or in the check pool
        device.check_reads_device = reads_device
        running = c.move("A", [START_UM + 2000.0, START_UM, START_UM], 200.0, wait=False)["op"]
        time.sleep(0.1)
        assert rpc_code(c.move, "A", [START_UM, START_UM + 30.0, START_UM], 2.0) == "invalid_params"
        assert rpc_code(c.move, "A", [START_UM, START_UM + 30.0, START_UM], 2.0, wait=False) == "invalid_params"
        assert c.status()["channels"]["A"]["op"]["op"] == running  # still running, not superseded
        c.stop("A")


def test_a_superseding_operation_that_fails_at_once_still_halts_the_old_move(tmp_path) -> None:
    """``calibrate`` refused at its first look (frames outside the validated pixel sizes) must
    not leave the move it superseded running on to its old target."""
    with running_daemon(["A"], calibration_dir=str(tmp_path), localiser={"um_per_px_range": [0.1, 0.5]}) as rig:
        sub = rig.subscriber(("op",))
        c = rig.client(timeout_s=10.0)
        first = c.move("A", [START_UM, START_UM, START_UM + 200.0], 20.0, wait=False)["op"]  # 10 s of travel
        time.sleep(0.3)
        assert rpc_code(c.calibrate, "A") == "no_frame"
        ended = sub.wait_op(first, 3.0)
        assert ended is not None and ended["state"] == "stopped" and "superseded" in ended["error"]["message"]
        halted = rig.positions()["A"]
        time.sleep(0.5)  # at 20 µm/s a move left running would travel 10 µm
        assert rig.positions()["A"] == pytest.approx(halted, abs=0.05)
        assert halted[2] < START_UM + 20.0


def test_queries_queued_at_shutdown_are_answered(tmp_path) -> None:
    """Every request gets exactly one reply, also a query still waiting for a pool worker
    when the daemon shuts down."""
    from support_daemon import make_manipulators

    from manipulators.simulated import SimulatedManipulator

    class SlowRead(SimulatedManipulator):
        driver_name = "sensapex"  # its get_position goes through the query pool

        def _do_read_position_um(self):
            if threading.current_thread().name.startswith("patchrig-query"):
                time.sleep(1.0)
            return super()._do_read_position_um()

    def manipulators(cfg, world):
        return {n: SlowRead(n, m.limits, m.max_speed_um_s, m.default_speed_um_s, world=world,
                            initial_position_um=[START_UM] * 3) for n, m in make_manipulators(cfg, world).items()}

    with running_daemon(["A"], manipulators=manipulators) as rig:
        ctx = zmq.Context.instance()
        sockets = []
        try:
            for i in range(7):  # 4 pool workers: 3 queries wait in the queue
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.connect(rig.daemon.command_endpoint)
                sock.send_multipart([b"", json.dumps({"v": 1, "id": f"q{i}", "method": "get_position",
                                                      "params": {"channel": "A"}}).encode()])
                sockets.append(sock)
            time.sleep(0.3)
            assert rig.client().shutdown() == {"shutting_down": True}
            codes = []
            for sock in sockets:
                assert sock.poll(8000), "a request got no reply"
                reply = json.loads(sock.recv_multipart()[-1])
                codes.append("ok" if reply["ok"] else reply["error"]["code"])
                assert not sock.poll(200), "a request got two replies"
            assert codes.count("ok") == 4 and codes.count("stopped") == 3, codes
            assert rig.daemon.wait_closed(10.0)
        finally:
            for sock in sockets:
                sock.close()


def test_lease_acquire_renew_release(rig) -> None:
    c = rig.client()
    got = c.lease("acquire", "rita", 5.0)
    assert got["holder"] == "rita" and got["expires_in_s"] <= 5.0
    assert c.lease("renew", "rita")["holder"] == "rita"
    assert rpc_code(c.lease, "renew", "mallory") == "invalid_params"
    assert c.lease("release", "rita")["holder"] is None
    assert c.status()["lease"]["holder"] is None


def test_heartbeat_and_position_topics(rig) -> None:
    sub = rig.subscriber(("heartbeat", "position"))
    beats, positions = [], []
    deadline = time.monotonic() + 3.0
    while (len(beats) < 3 or not positions) and time.monotonic() < deadline:
        item = sub.recv(0.5)
        if item:
            (beats if item[0] == "heartbeat" else positions).append(item[1])
    assert len(beats) >= 3
    assert [b["seq"] for b in beats] == sorted(b["seq"] for b in beats)
    assert beats[-1]["state"] == "running"
    assert positions and positions[0]["channels"]["A"]["position_um"] == pytest.approx([START_UM] * 3)


def test_shutdown_request_is_graceful(rig) -> None:
    sub = rig.subscriber(("heartbeat", "event"))
    mover = rig.client()
    op = mover.move("A", [START_UM + 2000.0, START_UM, START_UM], 200.0, wait=False)["op"]
    assert op
    c = rig.client()
    assert c.shutdown() == {"shutting_down": True}
    assert rig.daemon.wait_closed(10.0)
    final = sub.wait_for(lambda t, m: t == "heartbeat" and m.get("state") == "stopped", 2.0)
    assert final is not None and final[1]["channels"]["A"]["op"] is None
    frozen = rig.world.manipulator_position_um("A")
    time.sleep(0.15)
    assert rig.world.manipulator_position_um("A") == pytest.approx(frozen)
    late = PatchrigClient(rig.daemon.command_endpoint, timeout_s=0.3, retries=0)
    try:
        assert rpc_code(late.ping) == "timeout"
    finally:
        late.close()


def test_default_heartbeat_is_one_hertz() -> None:
    from config.models import ServerConfig

    assert ServerConfig().heartbeat_hz == 1.0


def test_positions_never_change_without_a_command(rig) -> None:
    before = rig.positions()
    c = rig.client()
    for _ in range(5):
        c.status()
    time.sleep(0.1)
    after = rig.positions()
    for k in before:
        assert np.allclose(before[k], after[k])


# -- closed loop: simulated microscope, oracle localiser, calibration service -------------------


@pytest.fixture
def loop_rig(tmp_path):
    with running_daemon(["A", "B"], calibration_dir=tmp_path / "cal", server={"heartbeat_hz": 10.0}) as r:
        assert wait_until(lambda: r.daemon.localiser_worker.latest is not None, 5.0)
        yield r


def true_error_um(rig, channel: str, target_px) -> float:
    return float(np.linalg.norm(rig.world.true_tip_px(channel) - np.asarray(target_px)) * rig.world.um_per_px)


def test_calibrate_move_tip_locate_set_tip(loop_rig) -> None:
    rig = loop_rig
    c = rig.client(op_timeout_s=60)
    assert rpc_code(c.move_tip, "A", target_px=[200.0, 200.0]) == "not_calibrated"
    cal = c.calibrate("A")
    assert cal["moves"] <= 20 and cal["residual_um"] < 1.0
    assert c.status()["channels"]["A"]["calibrated"] is True
    assert c.get_calibration("A")["calibrated"] is True
    assert rpc_code(c.get_calibration, "B") == "not_calibrated"
    target = (rig.world.true_tip_px("A") + np.array([25.0, -15.0])).tolist()
    result = c.move_tip("A", target_px=target, tolerance_um=1.5)
    assert result["error_um"] <= 1.5 and result["iterations"] >= 1
    assert true_error_um(rig, "A", target) < 2.0
    assert wait_until(lambda: any(t["channel"] == "A" for t in c.locate()["tips"]), 3.0)
    tips = c.locate()["tips"]
    own = [t for t in tips if t["channel"] == "A"][0]
    assert np.hypot(own["x_px"] - target[0], own["y_px"] - target[1]) * rig.world.um_per_px < 2.5
    st = c.set_tip("A")
    assert st["channel"] == "A" and st["source"] == "detection"
    assert rig.positions()["B"] == pytest.approx([START_UM] * 3)  # B never moved


def test_move_tip_outside_the_limits_moves_nothing(loop_rig) -> None:
    rig = loop_rig
    c = rig.client(op_timeout_s=60)
    c.calibrate("B")
    before = rig.positions()
    assert rpc_code(c.move_tip, "B", target_um=[1e6, 0.0]) == "out_of_bounds"
    time.sleep(0.1)
    assert rig.positions()["B"] == pytest.approx(before["B"])
    # a target pixel outside the frame is refused before it supersedes the running move
    running = c.move("B", (before["B"] + np.array([200.0, 0.0, 0.0])).tolist(), speed_um_s=100.0, wait=False)["op"]
    assert rpc_code(c.move_tip, "B", target_px=[-3000.0, -3000.0]) == "invalid_params"
    # so are the checks that read the devices: limits, speed, separation, options
    assert rpc_code(c.move_tip, "B", target_um=[1e6, 0.0]) == "out_of_bounds"
    assert rpc_code(c.move_tip, "B", target_um=[1e6, 0.0], wait=False) == "out_of_bounds"  # no op id
    assert rpc_code(c.move_tip, "B", target_px=[10.0, 10.0], speed_um_s=1e6) == "invalid_params"
    assert rpc_code(c.move_tip, "B", target_px=[10.0, 10.0], max_iterations=500) == "invalid_params"
    assert c.status()["channels"]["B"]["op"]["op"] == running  # still running, not superseded
    c.stop("B")


def test_calibrate_without_wait_reports_progress_and_stop_ends_it(loop_rig) -> None:
    rig = loop_rig
    sub = rig.subscriber(("op",))
    c = rig.client()
    op = c.calibrate("A", wait=False)["op"]
    progress = sub.wait_for(lambda t, m: m.get("op") == op and m.get("state") == "progress", 5.0)
    assert progress is not None
    c.stop("A")
    final = sub.wait_op(op, 3.0)
    assert final is not None and final["state"] == "stopped" and final["error"]["code"] == "stopped"
    assert c.status()["channels"]["A"]["calibrated"] is False


def test_tips_topic_carries_every_localised_frame(loop_rig) -> None:
    sub = loop_rig.subscriber(("tips",))
    msgs = []
    deadline = time.monotonic() + 2.0
    while len(msgs) < 10 and time.monotonic() < deadline:
        item = sub.recv(0.5)
        if item:
            msgs.append(item[1])
    assert len(msgs) >= 10
    ids = [m["frame_id"] for m in msgs]
    assert ids == sorted(ids)
    assert all(len(m["tips"]) == 2 and m["latency_ms"] >= 0 for m in msgs)


def test_a_bug_behind_a_method_is_internal_and_the_server_stays_up(rig) -> None:
    class BrokenService:
        """Stands in for a calibration service with a bug (an unexpected exception type)."""

        def is_calibrated(self, channel: str) -> bool:
            return False

        def calibrate(self, channel: str, **kwargs: object) -> dict:
            raise ZeroDivisionError("a bug")

        def close(self) -> None:
            pass

    rig.daemon.closed_loop.service = BrokenService()
    c = rig.client()
    with pytest.raises(RpcError) as info:
        c.calibrate("A")
    assert info.value.code == "internal" and "ZeroDivisionError" in str(info.value)
    assert c.ping()["pong"] is True
    assert c.move("A", [START_UM + 1.0, START_UM, START_UM], 1000.0)["position_um"][0] == pytest.approx(START_UM + 1.0)


def test_an_endpoint_in_use_is_a_clear_error_and_leaves_nothing_running() -> None:
    from support_daemon import make_config, make_manipulators, make_world

    from rig.daemon import Daemon
    from rig.errors import ConfigError

    ctx = zmq.Context()
    squatter = ctx.socket(zmq.REP)
    squatter.linger = 0
    port = squatter.bind_to_random_port("tcp://127.0.0.1")
    cfg = make_config(["A"])
    devices = make_manipulators(cfg, make_world(["A"]))
    try:
        for kwargs in ({"command_endpoint": f"tcp://127.0.0.1:{port}", "telemetry_endpoint": "tcp://127.0.0.1:0"},
                       {"command_endpoint": "tcp://127.0.0.1:0", "telemetry_endpoint": f"tcp://127.0.0.1:{port}"}):
            with pytest.raises(ConfigError, match="another patchrig daemon"):
                Daemon(cfg, devices, **kwargs)
    finally:
        for m in devices.values():
            m.close()
        squatter.close()
        ctx.term()
