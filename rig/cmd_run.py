"""``patchrig run --config FILE``: the daemon on the devices the config names, until stopped.

Real devices are opened through their drivers (Sensapex SDK, Scientifica serial); frames come
from the configured source; the localiser from the configured checkpoint (default: shipped).
A config that names simulated parts (``frames.source = "simulated"``, ``"<simulated>"`` ports,
``driver = "simulated"``) gets the simulated world, device simulators and microscope started
for it (what ``patchrig sim --serve`` does). Stops gracefully on Ctrl-C, SIGTERM or a
``shutdown`` request: new commands refused, every manipulator stopped, final status published.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from config.loader import load_config
from rig.logs import get_logger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="rig configuration (TOML)")
    parser.add_argument("--localiser", choices=["model", "classical", "oracle"], default="model",
                        help="tip localiser: the trained model (default), the classical detector, "
                        "or the simulation's truth (simulated rigs only)")
    parser.add_argument("--calibration-dir", type=Path, default=None,
                        help="where calibrations are kept (default: [calibration] directory)")


def install_signal_handlers(daemon: Any) -> dict[int, Any]:
    """SIGINT and SIGTERM begin a graceful shutdown; returns the previous handlers."""
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, _frame: daemon.request_shutdown(signal.Signals(signum).name))
    return previous


def serve(daemon: Any, log: Any) -> None:
    """Start ``daemon`` and block until it has shut down (signals handled)."""
    previous = install_signal_handlers(daemon)
    try:
        daemon.start()
        log.info("serving", command=daemon.command_endpoint, telemetry=daemon.telemetry_endpoint,
                 channels=list(daemon.controllers))
        print(f"patchrig daemon serving: commands {daemon.command_endpoint}, telemetry {daemon.telemetry_endpoint}", flush=True)
        daemon.serve_forever()
    finally:
        daemon.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    from rig.simrig import SimulatedRig, build_daemon, load_localiser, needs_simulation

    log = get_logger("patchrig.run")
    cfg = load_config(args.config)
    if getattr(args, "log_level_from_command_line", None) is None:  # --log-level wins over the config
        from rig.logs import configure_logging

        configure_logging(cfg.log_level, json_lines=True if getattr(args, "log_json_from_command_line", False) else None)
    calibration_dir = args.calibration_dir.expanduser() if args.calibration_dir else None
    sim = SimulatedRig(cfg) if needs_simulation(cfg) else None
    try:
        if sim is not None:
            cfg = sim.start()
        localiser, device = load_localiser(cfg, args.localiser, sim.microscope if sim else None)
        daemon = build_daemon(
            cfg,
            world=sim.world if sim else None,
            microscope=sim.microscope if sim else None,
            localiser=localiser,
            localiser_device=device,
            calibration_dir=calibration_dir,
        )
        serve(daemon, log)
    finally:
        if sim is not None:
            sim.close()
    print("patchrig daemon stopped", flush=True)
    return 0
