"""The simulated microscope: tips follow the world's manipulators, drift and jumps; frames
stream in-process and over ZeroMQ in patchrig-frame/1."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from support_cli import ctrl_c_reaches_the_child, one_line_error

from rig.frame import Frame
from rig.frame_sender import FrameSender
from rig.frame_sources import ZmqFrameSource
from simulators.microscope import SimMicroscope
from simulators.world import PipetteLook, SimWorld


def make_world(n: int = 1) -> SimWorld:
    world = SimWorld(seed=2, um_per_px=0.5, image_size_px=(160, 192))
    for i in range(n):
        world.add_channel(
            "ABCD"[i],
            matrix=np.eye(3),
            offset_um=np.array([-10.0 + 12 * i, 5.0 - 8 * i, 0.0]),
            look=PipetteLook(azimuth_deg=40.0 + 90 * i),
        )
    return world


def patch_mean(frame: Frame, x_px: float, y_px: float) -> float:
    """Mean of the 3x3 pixels around (x, y)."""
    x, y = int(np.floor(x_px + 0.5)), int(np.floor(y_px + 0.5))
    return float(frame.pixels[y - 1 : y + 2, x - 1 : x + 2].astype(np.float64).mean())


def test_tips_move_when_the_manipulators_move() -> None:
    world = make_world()
    microscope = SimMicroscope(world, seed=1)
    before = microscope.render_frame()
    old = microscope.last_truth["A"]
    assert (old.x_px, old.y_px) == pytest.approx(tuple(world.true_tip_px("A")))
    world.set_manipulator_position_um("A", np.array([20.0, -15.0, 0.0]))  # identity mounting
    after = microscope.render_frame()
    new = microscope.last_truth["A"]
    assert (new.x_px - old.x_px, new.y_px - old.y_px) == pytest.approx((40.0, -30.0))
    assert after.frame_id == before.frame_id + 1
    # the image shows it: the bright dye spot left the old place and sits at the new one
    # (same places compared across frames, so the static background cancels; noise sd ~55 ADU)
    assert patch_mean(after, new.x_px, new.y_px) - patch_mean(before, new.x_px, new.y_px) > 150
    assert patch_mean(before, old.x_px, old.y_px) - patch_mean(after, old.x_px, old.y_px) > 150


def test_drift_jumps_and_hidden_pipettes_reach_the_frames() -> None:
    world = make_world(2)
    microscope = SimMicroscope(world, seed=1)
    microscope.render_frame()
    a0 = microscope.last_truth["A"]
    world.jump("A", np.array([5.0, 0.0, 0.0]))
    microscope.render_frame()
    assert microscope.last_truth["A"].x_px == pytest.approx(a0.x_px + 10.0)
    world.set_visible("B", False)
    microscope.render_frame()
    assert set(microscope.last_truth) == {"A"}
    world.set_manipulator_position_um("A", np.array([0.0, 0.0, 40.0]))  # lifted out of focus
    microscope.render_frame()
    assert microscope.last_truth["A"].reason == "out_of_focus"


def test_frames_are_deterministic_per_seed_and_world_state() -> None:
    a = SimMicroscope(make_world(2), seed=5).render_frame()
    b = SimMicroscope(make_world(2), seed=5).render_frame()
    c = SimMicroscope(make_world(2), seed=6).render_frame()
    assert np.array_equal(a.pixels, b.pixels)
    assert not np.array_equal(a.pixels, c.pixels)
    assert a.pixels.dtype == np.uint16 and a.shape == (160, 192) and a.um_per_px == 0.5
    eight = SimMicroscope(make_world(1), bit_depth=8).render_frame()
    assert eight.pixels.dtype == np.uint8
    assert not a.pixels.flags.writeable


def test_running_microscope_streams_to_subscribers_and_advances_the_world() -> None:
    world = make_world(2)
    world.drift_um_per_min = 60.0
    got: list[Frame] = []
    done = threading.Event()

    def on_frame(frame: Frame) -> None:
        got.append(frame)
        if len(got) >= 8:
            done.set()

    def broken(frame: Frame) -> None:
        raise RuntimeError("a subscriber bug must not stop the microscope")

    with SimMicroscope(world, rate_hz=60.0) as microscope:
        unsubscribe = microscope.subscribe(on_frame)
        microscope.subscribe(broken)
        microscope.start()
        assert done.wait(10.0)
        unsubscribe()
        # a frame already being delivered when we unsubscribed may still land: wait until two
        # more frames were rendered (so none is in flight), then count
        rendered = microscope.frames_rendered
        deadline = time.monotonic() + 5.0
        while microscope.frames_rendered < rendered + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        n = len(got)
        time.sleep(0.1)
        assert len(got) == n  # unsubscribed
        assert microscope.latest() is not None and microscope.running
    assert not microscope.running
    ids = [f.frame_id for f in got[:8]]
    assert ids == sorted(ids) and len(set(ids)) == 8
    assert world.time_s > 0 and np.any(world.truth("A").drift_um != 0)


def test_microscope_frames_over_zeromq_are_identical() -> None:
    world = make_world(3)
    sent: dict[int, np.ndarray] = {}
    with SimMicroscope(world, rate_hz=40.0) as microscope, FrameSender("tcp://127.0.0.1:*") as sender:

        def publish(frame: Frame) -> None:
            sent[frame.frame_id] = frame.pixels
            sender.send(frame.pixels, um_per_px=frame.um_per_px, z_um=frame.z_um, frame_id=frame.frame_id)

        microscope.subscribe(publish)
        with ZmqFrameSource(sender.endpoint) as source:
            microscope.start()
            frame = source.wait_for_frame(None, 10.0)
            assert frame is not None
            frame = source.wait_for_frame(frame.frame_id, 10.0)
            assert frame is not None
            microscope.close()
        assert np.array_equal(frame.pixels, sent[frame.frame_id])
        assert frame.um_per_px == 0.5 and frame.z_um == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_simulate_microscope_publishes_moving_frames() -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.cli", "simulate", "microscope", "--endpoint", endpoint,
         "--rate", "20", "--channels", "2", "--size", "256", "--duration", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        with ZmqFrameSource(endpoint) as source:
            first = source.wait_for_frame(None, 30.0)
            assert first is not None, proc.stderr.read().decode() if proc.poll() is not None else "no frame"
            time.sleep(1.0)
            later = source.wait_for_frame(first.frame_id, 10.0)
            assert later is not None
        assert first.shape == (256, 256) and first.pixels.dtype == np.uint16
        assert later.frame_id > first.frame_id
        assert not np.array_equal(first.pixels, later.pixels)
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_cli_simulate_microscope_rejects_bad_arguments_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from rig.cli import main

    assert main(["simulate", "microscope", "--endpoint", "nonsense://x", "--duration", "0.1"]) == 1
    assert "cannot publish on nonsense://x" in capsys.readouterr().err
    assert main(["simulate", "microscope", "--channels", "9"]) == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--um-per-px", "0", "--um-per-px must be in"),
        ("--um-per-px", "nan", "--um-per-px must be in"),
        ("--size", "0", "--size must be in"),
        ("--seed", "-1", "--seed must be >= 0"),
        ("--duration", "-1", "--duration must be a finite number"),
        ("--rate", "nan", "--rate must be in"),
    ],
)
def test_cli_simulate_microscope_bad_numbers_are_one_line_errors(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rig.cli import main

    assert main(["simulate", "microscope", "--duration", "0.1", option, value]) == 1
    err = one_line_error(capsys)
    assert message in err, err


def test_cli_simulate_microscope_runs_for_its_duration_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    from rig.cli import main

    assert main(["simulate", "microscope", "--duration", "0.3", "--size", "64", "--channels", "2",
                 "--endpoint", "tcp://127.0.0.1:*"]) == 0
    out = capsys.readouterr().out
    assert "Stops after 0.3 s" in out and "stopped after" in out


def test_microscope_rejects_a_world_without_a_usable_pixel_size() -> None:
    with pytest.raises(ValueError, match="um_per_px"):
        SimMicroscope(SimWorld(seed=0, um_per_px=0.0, image_size_px=(64, 64)))


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_cli_simulate_microscope_stops_cleanly_on_ctrl_c_or_sigterm(signal_name: str) -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.cli", "simulate", "microscope", "--endpoint", "tcp://127.0.0.1:*",
         "--size", "64", "--channels", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_the_child,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "publishing patchrig-frame/1 on tcp://127.0.0.1:" in first and "Ctrl-C stops" in first
        proc.send_signal(getattr(signal, signal_name))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped after" in out
    assert "Traceback" not in err


def test_bench_microscope_reports_cpu_and_wall_time_per_frame(capsys: pytest.CaptureFixture[str]) -> None:
    from rig.cli import main

    assert main(["bench", "microscope", "--frames", "10", "--size", "64", "--pipettes", "2"]) == 0
    out = capsys.readouterr().out
    assert "microscope 64px, 2 pipettes" in out and "sample_example ex_vivo 64px" in out
    assert "cpu med" in out and "wall med" in out
    assert "microscope sustains 30 Hz on one core: yes" in out
    assert main(["bench", "microscope", "--frames", "3"]) == 1
    assert "--frames must be at least 10" in capsys.readouterr().err
