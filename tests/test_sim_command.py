"""``patchrig sim`` end to end in a subprocess: the real Sensapex SDK over UDP, pyserial over ptys,
the microscope and the daemon; the scripted session over ZeroMQ; the report's exact keys.

The localiser here is the oracle (simulation truth + 0.3 px noise) so that the test measures
the control path in bounded time on a shared 2-core machine; the trained model is exercised by
the localiser's own tests and by ``patchrig sim`` itself (numbers in docs/readme/daemon.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support_sensapex import free_group

REPO = Path(__file__).resolve().parents[1]
KEYS = {"name", "driver", "calibration_residual_um", "calibration_true_error_um", "final_true_error_um",
        "iterations", "seconds"}


def test_patchrig_sim_session_and_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    (tmp_path / "out" / "calibration").mkdir(parents=True)  # a folder of the user's, never deleted
    (tmp_path / "out" / "calibration" / "notes.txt").write_text("precious")
    env = dict(os.environ)
    # a Sensapex group of its own (protocols/sensapex-smcp.md §7.1) so parallel runs do not
    # clash; another one if something on this machine holds its port
    group = str(free_group(9))
    env["PATCHRIG__CHANNELS__A__SENSAPEX__GROUP"] = group
    env["PATCHRIG__CHANNELS__B__SENSAPEX__GROUP"] = group
    proc = subprocess.run(
        [sys.executable, "-m", "rig.cli", "--log-level", "WARNING", "sim", "--headless", "--localiser", "oracle",
         "--out", str(tmp_path / "out"), "--report", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert set(data) == {"channels", "total_seconds"}
    assert [c["name"] for c in data["channels"]] == ["A", "B", "C", "D"]
    assert [c["driver"] for c in data["channels"]] == ["sensapex", "sensapex", "scientifica", "scientifica"]
    for ch in data["channels"]:
        assert set(ch) == KEYS
        assert ch["final_true_error_um"] < 2.0, ch
        assert ch["calibration_residual_um"] < 1.5 and ch["calibration_true_error_um"] < 2.0, ch
        assert 1 <= ch["iterations"] <= 6 and ch["seconds"] > 0
    assert 0 < data["total_seconds"] < 120
    assert (tmp_path / "out" / "sim-session.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "calibration" / "notes.txt").read_text() == "precious"
    (session,) = (tmp_path / "out").glob("calibration-*")  # the session's calibrations, a folder of their own
    assert sorted(p.name for p in session.glob("*.json")) == ["A.json", "B.json", "C.json", "D.json"]
    assert "per-channel results" in proc.stdout and "final err" in proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_patchrig_sim_serve_until_shutdown(tmp_path: Path) -> None:
    from rig.client import PatchrigClient
    from rig.protocol import RpcError

    cmd_ep, tel_ep = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    env["PATCHRIG__CHANNELS__A__SENSAPEX__GROUP"] = "9"
    env["PATCHRIG__CHANNELS__B__SENSAPEX__GROUP"] = "9"
    env["PATCHRIG__SERVER__COMMAND_ENDPOINT"] = f'"{cmd_ep}"'
    env["PATCHRIG__SERVER__TELEMETRY_ENDPOINT"] = f'"{tel_ep}"'
    env["PATCHRIG__CALIBRATION__DIRECTORY"] = f'"{tmp_path / "cal"}"'
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.cli", "--log-level", "WARNING", "sim", "--serve", "--localiser", "oracle"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with PatchrigClient(cmd_ep, timeout_s=0.5, retries=60) as c:
            try:
                status = c.status()
            except RpcError:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"daemon did not answer; rc={proc.returncode}\n{out[-2000:]}\n{err[-3000:]}") from None
            assert set(status["channels"]) == {"A", "B", "C", "D"}
            assert {ch["driver"] for ch in status["channels"].values()} == {"sensapex", "scientifica"}
            assert len(c.get_position("A")) == 4  # the 4-axis uMp
            assert c.shutdown() == {"shutting_down": True}
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err[-2000:]
        assert f"commands {cmd_ep}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_patchrig_sim_refuses_a_negative_seed_in_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    from support_cli import one_line_error

    from rig.cli import main

    assert main(["sim", "--headless", "--seed", "-1"]) == 1
    assert "--seed must be 0 or more" in one_line_error(capsys)
