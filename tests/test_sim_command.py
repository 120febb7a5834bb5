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

REPO = Path(__file__).resolve().parents[1]
KEYS = {"name", "driver", "calibration_residual_um", "calibration_true_error_um", "final_true_error_um",
        "iterations", "seconds"}


def test_patchrig_sim_session_and_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    env = dict(os.environ)
    # a Sensapex group of its own (protocols/sensapex-smcp.md §7.1) so parallel runs do not clash
    env["PATCHRIG__CHANNELS__A__SENSAPEX__GROUP"] = "9"
    env["PATCHRIG__CHANNELS__B__SENSAPEX__GROUP"] = "9"
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
    assert "per-channel results" in proc.stdout and "final err" in proc.stdout
