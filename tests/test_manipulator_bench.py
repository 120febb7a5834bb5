"""`patchrig bench manipulators` and `patchrig simulate sensapex` from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support_cli import ctrl_c_reaches_the_child, one_line_error
from support_sensapex import free_group

from rig.cli import main


def test_bench_runs_every_backend_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench" / "manipulators.json"
    png = tmp_path / "bench" / "manipulators.png"
    rc = main(["bench", "manipulators", "--n", "6", "--poll-seconds", "0.1", "--sensapex-group", str(free_group(4)),
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    table = capsys.readouterr().out
    for name in ("simulated", "sensapex", "scientifica"):
        assert name in table
    data = json.loads(out.read_text())
    assert data["benchmark"] == "manipulators" and data["n"] == 6
    for name in ("simulated", "sensapex", "scientifica"):
        r = data["results"][name]
        for op in ("query", "read", "move_cmd", "move_done", "stop"):
            assert r[op]["n"] >= 6
            assert 0 <= r[op]["median_ms"] <= r[op]["p99_ms"] < 5000
            assert len(r[op]["samples_ms"]) == r[op]["n"]
            assert r[op]["median_ms"] == pytest.approx(float(np.median(r[op]["samples_ms"])), abs=1e-3)
        assert r["poll_hz"] > 0
    # a 1 µm move cannot finish before its command returned
    assert data["results"]["sensapex"]["move_done"]["median_ms"] >= data["results"]["sensapex"]["move_cmd"]["median_ms"]
    assert not list(out.parent.glob(".*.tmp")) and not list(out.parent.glob(".*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "manipulators", "--backends", "simulated,teleporter"]) == 1
    assert "teleporter" in capsys.readouterr().err


def test_simulate_sensapex_serves_the_sdk_until_interrupted() -> None:
    """The standalone simulator, in its own process, answers the vendor SDK in this one."""
    from manipulators.base import Limits
    from manipulators.sensapex import SensapexManipulator

    group = free_group(4)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.cli", "simulate", "sensapex", "--group", str(group), "--ids", "1,2", "--axes", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=ctrl_c_reaches_the_child,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert f"udp 127.0.0.1:{55555 + group} (group {group})" in lines[0], lines
        assert lines[1].strip().startswith("device 1: 3 axes")
        assert f"UMP.get_ump(address=b'127.0.0.1', group={group})" in lines[3]
        m = SensapexManipulator("cli", Limits((0.0,) * 3, (20000.0,) * 3), 1000.0,
                                device_id=2, address="127.0.0.1", group=group)
        try:
            target = m.position_um + np.array([25.0, 0.0, 0.0])
            m.move_to(target, 1000.0).wait(5)
            assert np.allclose(m.position_um, target, atol=0.1)
        finally:
            m.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped" in out


@pytest.mark.parametrize("ids", ["0", "1,1", "x", "20"])
def test_simulate_sensapex_rejects_bad_ids(ids: str) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rig.cli", "simulate", "sensapex", "--ids", ids],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--ids" in proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("start_um", ["nan", "inf", "-inf", "3e6", "ten"])
def test_simulate_sensapex_rejects_bad_start_positions(start_um: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "sensapex", f"--start-um={start_um}"])
    assert exit_info.value.code == 2
    assert "--start-um must be" in capsys.readouterr().err


def test_sensapex_simulator_rejects_non_finite_start_positions() -> None:
    from simulators.sensapex_device import SensapexSimulator

    with pytest.raises(ValueError, match="must be finite"):
        SensapexSimulator(devices={1: "1"}, n_axes={1: 3}, initial_position_um={1: [0.0, float("nan"), 0.0]})


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--n", "1", "--n must be at least 2"), ("--poll-seconds", "nan", "--poll-seconds must be"),
     ("--poll-seconds", "-1", "--poll-seconds must be"), ("--poll-seconds", "inf", "--poll-seconds must be")],
)
def test_bench_rejects_bad_numbers_in_one_line(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "manipulators", "--backends", "simulated", option, value]) == 1
    err = one_line_error(capsys)
    assert message in err, err


def test_simulate_sensapex_stops_cleanly_on_sigterm() -> None:
    group = free_group(4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.cli", "simulate", "sensapex", "--group", str(group)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stdout is not None
        assert "Sensapex simulator on udp" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err
