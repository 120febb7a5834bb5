"""Faults the daemon must survive: a device that dies mid-move, a client that disconnects
mid-operation, stale frames, a lapsed lease, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from support_daemon import START_UM, make_manipulators, running_daemon, wait_until
from support_sensapex import free_group

from manipulators.base import Limits
from rig.client import PatchrigClient, TelemetrySubscriber
from rig.protocol import RpcError, make_request

REPO = Path(__file__).resolve().parents[1]
SENSAPEX_GROUP = 5  # this module's preferred group (protocols/sensapex-smcp.md §7.1)


def test_a_sensapex_device_that_dies_mid_move(tmp_path: Path) -> None:
    from manipulators.sensapex import SensapexManipulator
    from simulators.sensapex_device import SensapexSimulator

    holder: dict = {}
    group = free_group(SENSAPEX_GROUP)  # another one if something on this machine holds its port

    def devices(cfg, world):
        out = make_manipulators(cfg, world)
        out["A"].close()
        sim = SensapexSimulator(world=world, devices={3: "A"}, n_axes={3: 3}, group=group)
        sim.start()
        holder["sim"] = sim
        m = SensapexManipulator("A", Limits((0.0,) * 3, (5000.0,) * 3), 2000.0, 500.0, device_id=3,
                                address="127.0.0.1", group=group)
        m.completion_margin_s = 0.5
        out["A"] = m
        return out

    try:
        with running_daemon(["A", "B"], manipulators=devices, daemon_kwargs={"device_silent_s": 0.5}) as rig:
            sim = holder["sim"]
            sub = rig.subscriber(("event",))
            c, other = rig.client(timeout_s=10.0), rig.client()
            outcome: dict = {}

            def long_move() -> None:
                t0 = time.monotonic()
                try:
                    c.move("A", [START_UM + 400.0, START_UM, START_UM], 400.0)
                    outcome["code"] = "ok"
                except RpcError as exc:
                    outcome["code"] = exc.code
                outcome["s"] = time.monotonic() - t0

            t = threading.Thread(target=long_move)
            t.start()
            assert wait_until(lambda: sim.position_um(3)[0] > START_UM + 20.0, 3.0)
            sim.faults.silent = True  # the device dies: no replies, no notifications
            died_at = sim.position_um(3).copy()
            # the rest of the rig keeps working while A is dead
            t0 = time.monotonic()
            assert other.ping()["pong"] is True
            assert other.move("B", [START_UM + 10.0, START_UM, START_UM], 1000.0)["position_um"][0] == pytest.approx(START_UM + 10.0)
            assert time.monotonic() - t0 < 3.0
            t.join(15.0)
            assert not t.is_alive()
            assert outcome["code"] in ("timeout", "device_error"), outcome
            assert outcome["s"] < 8.0
            alarm = sub.wait_for(lambda tp, m: m.get("level") == "alarm" and m.get("channel") == "A", 5.0)
            assert alarm is not None and alarm[1]["kind"] == "device_silent"
            assert rig.client().status()["channels"]["A"]["device_error"]
            with pytest.raises(RpcError) as info:
                other.get_position("A")
            assert info.value.code in ("timeout", "device_error")
            assert np.all(sim.position_um(3) <= 5000.0) and sim.position_um(3)[0] < START_UM + 400.0 + 1e-6
            assert died_at[0] > START_UM
            sim.faults.silent = False
    finally:
        if "sim" in holder:
            holder["sim"].close()


def test_a_client_that_disconnects_mid_operation() -> None:
    with running_daemon(["A", "B"]) as rig:
        ctx = zmq.Context.instance()
        quitter = ctx.socket(zmq.REQ)
        quitter.linger = 0
        quitter.connect(rig.daemon.command_endpoint)
        target = [START_UM + 300.0, START_UM, START_UM]
        quitter.send(make_request("move", {"channel": "A", "position_um": target, "speed_um_s": 1000.0}, "gone"))
        assert wait_until(lambda: rig.world.manipulator_position_um("A")[0] > START_UM + 5.0, 3.0)
        quitter.close(linger=0)  # gone before the reply
        c = rig.client()
        assert c.ping()["pong"] is True
        # the operation finishes on its own; the reply to nobody is dropped, nothing breaks
        assert wait_until(lambda: rig.daemon.controllers["A"].current is None, 3.0)
        assert rig.world.manipulator_position_um("A") == pytest.approx(target)
        assert c.move("B", [START_UM, START_UM + 5.0, START_UM], 1000.0)["position_um"][1] == pytest.approx(START_UM + 5.0)


def test_a_lapsed_lease_stops_all_motion() -> None:
    with running_daemon(["A", "B"]) as rig:
        sub = rig.subscriber(("event",))
        rita = rig.client()
        rita.lease("acquire", "rita", 0.3)
        for ch in ("A", "B"):
            rita.move(ch, [START_UM + 2000.0, START_UM, START_UM], 300.0, wait=False)
        t_silent = time.monotonic()  # rita now says nothing more (crashed, network gone)
        alarm = sub.wait_for(lambda t, m: m.get("kind") == "lease_lapsed", 3.0)
        assert alarm is not None and alarm[1]["level"] == "alarm" and alarm[1]["holder"] == "rita"
        assert time.monotonic() - t_silent < 2.5  # lease 0.3 s; generous for a loaded machine
        assert wait_until(lambda: all(ctl.current is None for ctl in rig.daemon.controllers.values()), 1.0)
        # the alarm goes out as the stops are asked for; the e-stop event once every device answered
        assert sub.wait_for(lambda t, m: m.get("kind") == "e-stop", 3.0) is not None
        frozen = rig.positions()
        time.sleep(0.2)
        for name, pos in rig.positions().items():
            assert pos == pytest.approx(frozen[name])
            assert pos[0] < START_UM + 500.0
        assert rita.status()["lease"]["holder"] is None


def test_a_lapsed_lease_never_waits_for_a_slow_device() -> None:
    """The watchdog's e-stop runs on the stopper threads: a device slow to answer STOP holds up
    neither the alarm, nor the other channel's stop, nor the watchdog's next checks."""
    with running_daemon(["A", "B"]) as rig:
        slow = rig.daemon.controllers["A"].manipulator
        real_stop = slow._do_stop
        answering = threading.Event()

        def slow_stop(reason: str) -> None:
            real_stop(reason)
            answering.wait(5.0)  # the STOP arrived; the device takes its time to confirm it

        slow._do_stop = slow_stop
        sub = rig.subscriber(("event",))
        rita = rig.client()
        rita.lease("acquire", "rita", 0.3)
        rita.move("B", [START_UM + 2000.0, START_UM, START_UM], 300.0, wait=False)
        t_silent = time.monotonic()
        alarm = sub.wait_for(lambda t, m: m.get("kind") == "lease_lapsed", 3.0)
        assert alarm is not None and time.monotonic() - t_silent < 2.0
        assert wait_until(lambda: rig.daemon.controllers["B"].current is None, 1.0)
        checks: list[float] = []
        real_check = rig.daemon.watchdog.check_once
        rig.daemon.watchdog.check_once = lambda: (checks.append(time.monotonic()), real_check())[1]
        assert wait_until(lambda: len(checks) >= 3, 2.0)  # the watchdog goes on checking meanwhile
        assert not answering.is_set()
        answering.set()


def test_stale_frames_stop_a_closed_loop_operation(tmp_path: Path) -> None:
    with running_daemon(["A"], calibration_dir=tmp_path / "cal", frames={"stale_after_s": 0.3}) as rig:
        assert wait_until(lambda: rig.daemon.localiser_worker.latest is not None, 5.0)
        sub = rig.subscriber(("event", "op"))
        c = rig.client()
        op = c.calibrate("A", wait=False)["op"]
        assert sub.wait_for(lambda t, m: t == "op" and m.get("state") == "progress", 5.0) is not None
        rig.microscope.close()  # the frame stream stops
        alarm = sub.wait_for(lambda t, m: m.get("kind") == "stale_frames", 3.0)
        assert alarm is not None and alarm[1]["level"] == "alarm" and alarm[1]["op"] == op
        assert wait_until(lambda: rig.daemon.controllers["A"].current is None, 3.0)
        frozen = rig.world.manipulator_position_um("A")
        time.sleep(0.2)
        assert rig.world.manipulator_position_um("A") == pytest.approx(frozen)
        with pytest.raises(RpcError) as info:
            c.locate()
        assert info.value.code == "no_frame"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_the_daemon_down_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    cmd_ep, tel_ep = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    config = tmp_path / "rig.toml"
    config.write_text(f"""
[frames]
source = "simulated"
[calibration]
directory = "{tmp_path / 'cal'}"
[server]
command_endpoint = "{cmd_ep}"
telemetry_endpoint = "{tel_ep}"
[simulation]
frame_rate_hz = 10.0
[[channels]]
name = "A"
driver = "simulated"
limits = {{ min_um = [0.0, 0.0, 0.0], max_um = [5000.0, 5000.0, 5000.0] }}
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.cli", "--log-level", "WARNING", "run", "--config", str(config), "--localiser", "oracle"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    try:
        with PatchrigClient(cmd_ep, timeout_s=0.5, retries=30) as c, TelemetrySubscriber(tel_ep, ("heartbeat", "event")) as sub:
            assert c.ping()["pong"] is True
            c.move("A", [4000.0, 2500.0, 2500.0], 100.0, wait=False)
            time.sleep(0.2)
            proc.send_signal(sig)
            final = sub.wait_for(lambda t, m: t == "heartbeat" and m.get("state") == "stopped", 10.0)
            assert final is not None
            assert final[1]["stop_errors"] == {"A": None} and final[1]["channels"]["A"]["op"] is None
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err[-2000:]
        assert "patchrig daemon stopped" in out
        status_lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        assert all(x.get("level") != "error" for x in status_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_frames_outside_the_validated_pixel_sizes_are_shown_but_never_steer(tmp_path: Path) -> None:
    """The simulated microscope scans at 0.62 µm per pixel; a rig whose localiser is validated
    only at 0.1-0.5 µm must publish the tips (marked) but assign, correct and calibrate with
    none of them, and refuse before anything moves (set_tip and move_tip look through the same
    ``Eye.locate``: tests/test_eye_averaging.py)."""
    with running_daemon(["A"], calibration_dir=tmp_path / "cal",
                        localiser={"um_per_px_range": [0.1, 0.5], "min_score": 0.8}) as rig:
        # [localiser] min_score reaches the closed loop (above [calibration] min_confidence, 0.7)
        assert rig.daemon.calibration.eye.min_score == 0.8
        sub = rig.subscriber(("tips",))
        message = sub.wait_for(lambda t, m: t == "tips" and m["tips"], 5.0)
        assert message is not None
        tips = message[1]
        assert "0.62 µm is outside the localiser's validated range 0.1-0.5" in tips["not_for_steering"]
        assert all(t["channel"] is None for t in tips["tips"]) and "corrections" not in tips
        c = rig.client()
        located = c.locate()
        assert located["tips"] and "not_for_steering" in located
        # the documented keys are there although nothing was assigned: every tip unassigned
        assert len(located["unassigned"]) == len(located["tips"]) and located["missing"] == []
        start = rig.world.manipulator_position_um("A")
        with pytest.raises(RpcError) as info:
            c.calibrate("A")
        assert info.value.code == "no_frame" and "validated range" in str(info.value)
        assert rig.world.manipulator_position_um("A") == pytest.approx(start)  # nothing moved


def test_frames_at_another_pixel_size_than_the_rigs_never_steer(tmp_path: Path) -> None:
    """Calibrations are made for ``[rig] um_per_px``; frames at another pixel size (another
    zoom sent by the acquisition software) are shown but never steer, and closed-loop
    operations refuse them before anything moves."""
    with running_daemon(["A"], calibration_dir=tmp_path / "cal", rig={"um_per_px": 0.5}) as rig:
        sub = rig.subscriber(("tips",))
        message = sub.wait_for(lambda t, m: t == "tips" and m["tips"], 5.0)
        assert message is not None
        assert "0.62 µm differs from the rig's 0.5 µm ([rig] um_per_px)" in message[1]["not_for_steering"]
        assert all(t["channel"] is None for t in message[1]["tips"])
        c = rig.client()
        start = rig.world.manipulator_position_um("A")
        with pytest.raises(RpcError) as info:
            c.calibrate("A")
        assert info.value.code == "no_frame" and "[rig] um_per_px" in str(info.value)
        assert rig.world.manipulator_position_um("A") == pytest.approx(start)  # nothing moved


def test_steering_resumes_when_frames_come_back_inside_the_validated_pixel_sizes() -> None:
    from localisation.types import TipDetection
    from rig.frame import Frame
    from rig.localiser_worker import LocaliserWorker

    class OneTip:
        def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
            return [TipDetection(10.0, 12.0, 0.9)]

    steered: list[float] = []
    published: list[dict] = []

    def on_detections(frame: Frame, detections: list[TipDetection]) -> dict:
        steered.append(frame.um_per_px)
        return {"assigned": {"A": 0}}

    worker = LocaliserWorker(None, OneTip(), um_per_px_range=(0.2, 1.0), on_detections=on_detections,
                             publish=lambda topic, message: published.append(message))
    pixels = np.zeros((32, 32), np.uint16)
    for i, um_per_px in enumerate((0.62, 1.6, 1.6, 0.62)):
        worker.process(Frame(i, float(i), pixels, um_per_px, None, time.monotonic()))
    assert steered == [0.62, 0.62]  # the 1.6 µm frames never reached the correction
    assert ["not_for_steering" in m for m in published] == [False, True, True, False]
    assert [m["tips"][0]["channel"] for m in published] == ["A", None, None, "A"]  # still published, unassigned
