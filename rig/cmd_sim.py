"""``patchrig sim``: the whole rig in simulation, and a scripted session through the ZeroMQ API.

Starts the simulated world, two Sensapex devices on UDP loopback (driven through the vendor
SDK), two Scientifica devices on pseudo-terminals (driven through pyserial), the two-photon
microscope and the daemon; then plays what rig software such as RITA does, as a client of the
daemon's patchrig-rpc/1 socket (``rig.client``): calibrate every channel, one after the other,
then send every tip to a target at once (``move_tip`` with ``wait: false``, completion from
the ``op`` telemetry topic). The targets are chosen from what the daemon reports (each tip
advanced 20 µm toward the others, as pipettes converging on neighbouring cells), never from
the simulation's truth.

At the end it prints a table per channel: the TRUE final distance of the tip from its target
and the TRUE error of the calibration (both from the simulated world, which the daemon never
sees), the calibration residual, the ``move_tip`` iterations and the time, and writes a
picture (the last frame with each tip's path, its target and where it truly ended) to
``--out``. ``--report FILE`` writes the figures as JSON::

    {"channels": [{"name", "driver", "calibration_residual_um", "calibration_true_error_um",
                   "final_true_error_um", "iterations", "seconds"}], "total_seconds"}

``--serve`` starts the same rig and keeps the daemon serving on the config's endpoints (default
tcp://127.0.0.1:5555 and :5556) until Ctrl-C or a ``shutdown`` request, for developing rig
software against it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from config.loader import default_config_path, load_config
from rig.atomic import atomic_path, write_json_atomic
from rig.client import RpcTimeout
from rig.errors import PatchrigError
from rig.logs import get_logger
from simulators.signals import sigterm_as_ctrl_c

TARGET_SHIFT_UM = 20.0
SESSION_BUDGET_S = 100.0  # the scripted session's steps; start-up and the picture come on top
MIN_SPACING_UM = 15.0
TOLERANCE_UM = 1.5
PICTURE = "sim-session.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=default_config_path(),
                        help="rig configuration (default: the shipped config/sim.toml)")
    parser.add_argument("--headless", action="store_true",
                        help="never open a window (the picture is always written to --out)")
    parser.add_argument("--report", type=Path, default=None, help="write the session's figures as JSON here")
    parser.add_argument("--out", type=Path, default=Path("patchrig-sim"),
                        help="output folder for the picture and the session's calibrations, in a new "
                             "calibration-<UTC time>-* folder each run; nothing in it is deleted (default: %(default)s)")
    parser.add_argument("--serve", action="store_true",
                        help="no scripted session: keep the daemon serving on the config's endpoints until interrupted")
    parser.add_argument("--localiser", choices=["model", "classical", "oracle"], default="model",
                        help="tip localiser: the shipped trained model (default), the classical detector, or "
                        "the simulation's truth with 0.3 px noise (to separate control from localisation error)")
    parser.add_argument("--seed", type=int, default=None, help="simulated world seed, >= 0 (default: [simulation] seed)")


# -- the session display ------------------------------------------------------------------------


class SessionWatcher:
    """Follows the daemon's telemetry during the session: a progress line per operation, tip
    paths (assigned detections of every ``tips`` message), and final ``op`` messages."""

    def __init__(self, endpoint: str, bar: tqdm) -> None:
        from rig.client import TelemetrySubscriber

        self._sub = TelemetrySubscriber(endpoint, ("tips", "op", "event"))
        self._bar = bar
        self.paths: dict[str, list[tuple[float, float]]] = {}
        self.status: dict[str, str] = {}
        self.finished: dict[str, dict[str, Any]] = {}
        self.frames_seen = 0
        self.last_latency_ms: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="patchrig-sim-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._sub.recv(0.1)
            if item is None:
                continue
            topic, msg = item
            if topic == "tips":
                self.frames_seen += 1
                self.last_latency_ms = msg.get("latency_ms")
                for tip in msg.get("tips", []):
                    if tip.get("channel"):
                        with self._lock:
                            self.paths.setdefault(tip["channel"], []).append((tip["x_px"], tip["y_px"]))
            elif topic == "op":
                self._on_op(msg)
            elif topic == "event" and msg.get("level") in ("warning", "alarm"):
                self._bar.write(f"  ! {msg.get('kind')}: {msg.get('message')}")

    def _on_op(self, msg: dict[str, Any]) -> None:
        ch, state = msg.get("channel", "?"), msg.get("state")
        if state == "progress":
            fields = {k: v for k, v in msg.items() if k in ("stage", "moves", "max_moves", "iteration", "error_um")}
            text = msg["method"] + " " + " ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
            )
        else:
            text = f"{msg.get('method')} {state}"
        if state in ("done", "failed", "stopped"):
            with self._lock:
                self.finished[msg["op"]] = msg
        with self._lock:
            self.status[ch] = text
            postfix = "  ".join(f"{k}: {v}" for k, v in sorted(self.status.items()))
        self._bar.set_postfix_str(postfix[:160], refresh=True)

    def wait_ops(self, op_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(o in self.finished for o in op_ids):
                    return {o: self.finished[o] for o in op_ids}
            time.sleep(0.02)
        with self._lock:
            return {o: self.finished.get(o, {"state": "timeout"}) for o in op_ids}

    def paths_snapshot(self) -> dict[str, np.ndarray]:
        with self._lock:
            return {k: np.asarray(v, float) for k, v in self.paths.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sub.close()


# -- the scripted session -----------------------------------------------------------------------


def choose_targets(tips_px: dict[str, np.ndarray], um_per_px: float) -> dict[str, np.ndarray]:
    """Each tip advanced up to ``TARGET_SHIFT_UM`` toward the centroid of all tips, as when
    several pipettes converge on neighbouring cells, stopping ``MIN_SPACING_UM`` short of it.
    Uses only what the daemon reported (never the simulation's truth)."""
    centre = np.mean(list(tips_px.values()), axis=0)
    targets = {}
    for ch, xy in tips_px.items():
        d = centre - xy
        dist_um = float(np.linalg.norm(d)) * um_per_px
        unit = d / np.linalg.norm(d) if dist_um > 1e-6 else np.array([1.0, 0.0])
        shift_um = min(TARGET_SHIFT_UM, max(dist_um - MIN_SPACING_UM, 5.0))
        targets[ch] = xy + unit * shift_um / um_per_px
    return targets


def run_session(client: Any, watcher: SessionWatcher, sim: Any, cfg: Any, bar: tqdm,
                deadline: float | None = None) -> list[dict[str, Any]]:
    """Calibrate every channel, then move every tip to its target; return the per-channel rows
    (with the true errors from the simulated world). ``deadline`` (time.monotonic()): no new
    step starts after it, and the daemon is told to stop what still runs, so that the whole
    session keeps its time budget."""
    deadline = deadline if deadline is not None else time.monotonic() + SESSION_BUDGET_S
    names = [c.name for c in cfg.channels]
    rows: dict[str, dict[str, Any]] = {
        c.name: {"name": c.name, "driver": c.driver, "calibration_residual_um": None,
                 "calibration_true_error_um": None, "final_true_error_um": None,
                 "iterations": None, "seconds": 0.0, "error": None}
        for c in cfg.channels
    }
    for ch in names:
        bar.set_description(f"calibrating {ch}")
        t0 = time.monotonic()
        if t0 > deadline:
            rows[ch]["error"] = "calibrate: not started, the session's time budget is spent"
            bar.update(1)
            continue
        try:
            result = client.calibrate(ch, timeout_s=max(5.0, deadline - t0))
            rows[ch]["calibration_residual_um"] = float(result["residual_um"])
            cal = client.get_calibration(ch)
            predicted = np.asarray(cal["tip_um"], float)[:2]
            truth = sim.world.true_tip_um(ch)[:2]
            rows[ch]["calibration_true_error_um"] = float(np.linalg.norm(predicted - truth))
            bar.write(f"  {ch}: calibrated in {result['moves']} moves, residual {result['residual_um']:.2f} µm "
                      f"({time.monotonic() - t0:.1f} s)")
        except PatchrigError as exc:
            if isinstance(exc, RpcTimeout):  # no answer in time: make sure it does not go on
                client.stop(ch)
            rows[ch]["error"] = f"calibrate: {exc}"
            bar.write(f"  {ch}: calibration failed: {exc}")
        rows[ch]["seconds"] += time.monotonic() - t0
        bar.update(1)

    ready = [ch for ch in names if rows[ch]["error"] is None]
    try:
        located = client.locate()
    except PatchrigError as exc:
        for ch in ready:
            rows[ch]["error"] = f"locate before move_tip: {exc}"
        bar.update(len(names))
        return [rows[ch] for ch in names]
    tips = {t["channel"]: np.array([t["x_px"], t["y_px"]]) for t in located["tips"] if t.get("channel") in ready}
    for ch in ready:
        if ch not in tips:  # not seen on this frame: use the calibration's prediction
            cal = client.get_calibration(ch)
            tips[ch] = np.asarray(cal["tip_um"], float)[:2] / located["um_per_px"] + (np.asarray(located["shape"][::-1]) - 1) / 2
    targets = choose_targets(tips, float(located["um_per_px"]))
    bar.set_description("moving tips")
    bar.write(f"  moving {', '.join(ready)} to their targets at once (move_tip, wait: false)")
    started: dict[str, tuple[str, float]] = {}
    for ch in ready:
        try:
            op = client.move_tip(ch, target_px=targets[ch].tolist(), tolerance_um=TOLERANCE_UM, wait=False)
            started[op["op"]] = (ch, time.monotonic())
        except PatchrigError as exc:
            rows[ch]["error"] = f"move_tip: {exc}"
    finals = watcher.wait_ops(list(started), timeout_s=max(5.0, deadline - time.monotonic()))
    if any(m.get("state") == "timeout" for m in finals.values()):
        client.stop_all()  # over budget: stop what still runs (reported as not finished)
    for op_id, msg in finals.items():
        ch, t0 = started[op_id]
        rows[ch]["seconds"] += float(msg.get("seconds", time.monotonic() - t0))
        if msg.get("state") == "done":
            rows[ch]["iterations"] = int(msg["result"]["iterations"])
            bar.write(f"  {ch}: move_tip done in {rows[ch]['iterations']} iteration(s), "
                      f"error seen by the daemon {msg['result']['error_um']:.2f} µm")
        else:
            err = msg.get("error", {})
            rows[ch]["error"] = f"move_tip {msg.get('state')}: {err.get('code', '')} {err.get('message', '')}".strip()
            bar.write(f"  {ch}: {rows[ch]['error']}")
        rows[ch]["target_px"] = targets[ch].tolist()
        rows[ch]["final_true_error_um"] = sim.true_error_um(ch, targets[ch])
        bar.update(1)
    for ch in names:
        if ch not in [c for c, _ in started.values()]:
            bar.update(1)
    return [rows[ch] for ch in names]


# -- output -------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], total_s: float) -> None:
    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    header = f"{'channel':8} {'driver':12} {'final err µm':>12} {'cal resid µm':>12} {'cal true µm':>11} {'iter':>5} {'seconds':>8}"
    print()
    print("patchrig sim: per-channel results (errors are TRUE errors from the simulated world)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:8} {r['driver']:12} {f(r['final_true_error_um']):>12} {f(r['calibration_residual_um']):>12} "
              f"{f(r['calibration_true_error_um']):>11} {f(r['iterations'], '{:d}'):>5} {f(r['seconds'], '{:.1f}'):>8}")
        if r.get("error"):
            print(f"  {r['name']}: {r['error']}")
    print(f"total {total_s:.1f} s; move_tip tolerance {TOLERANCE_UM} µm")


def draw_picture(path: Path, frame: Any, rows: list[dict[str, Any]], paths: dict[str, np.ndarray], sim: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 8), dpi=110)
    pixels = np.asarray(frame.pixels, float)
    lo, hi = np.percentile(pixels, [1, 99.5])
    ax.imshow(pixels, cmap="gray", vmin=lo, vmax=hi)
    colours = ["#ff595e", "#ffca3a", "#8ac926", "#1982c4", "#6a4c93", "#ff924c", "#52a675", "#c5ca30"]
    tol_px = TOLERANCE_UM / frame.um_per_px
    for i, r in enumerate(rows):
        ch, colour = r["name"], colours[i % len(colours)]
        p = paths.get(ch)
        if p is not None and len(p):
            ax.plot(p[:, 0], p[:, 1], "-", color=colour, lw=1.6, alpha=0.9)
            ax.plot(p[0, 0], p[0, 1], "o", color=colour, ms=4, mfc="none")
        true_px = sim.world.true_tip_px(ch)
        ax.plot(true_px[0], true_px[1], "x", color=colour, ms=9, mew=2)
        if r.get("target_px") is not None:
            tx, ty = r["target_px"]
            ax.add_patch(plt.Circle((tx, ty), tol_px, fill=False, color=colour, lw=1.5))
            ax.plot(tx, ty, "+", color=colour, ms=12, mew=1)
        err = r.get("final_true_error_um")
        label = f"{ch} ({r['driver']})" + ("" if err is None else f": {err:.2f} µm")
        ax.annotate(label, (true_px[0], true_px[1]), xytext=(10, 10 + 14 * (i % 2)), textcoords="offset points",
                    color=colour, fontsize=9, bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "lw": 0})
    # zoom on where the tips worked (paths, targets, true tips) with a margin, plus a scale bar
    points = [sim.world.true_tip_px(r["name"]) for r in rows]
    points += [np.asarray(r["target_px"]) for r in rows if r.get("target_px") is not None]
    points += [p for p in paths.values() if len(p)]
    xy = np.vstack([np.atleast_2d(p) for p in points])
    h, w = frame.shape
    margin = 60.0
    half = max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1])) / 2 + margin
    cx, cy = xy[:, 0].min() + np.ptp(xy[:, 0]) / 2, xy[:, 1].min() + np.ptp(xy[:, 1]) / 2
    x0, x1 = max(-0.5, cx - half), min(w - 0.5, cx + half)
    y0, y1 = max(-0.5, cy - half), min(h - 0.5, cy + half)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    bar_px = 10.0 / frame.um_per_px
    bx, by = x0 + 0.05 * (x1 - x0), y1 - 0.05 * (y1 - y0)
    ax.plot([bx, bx + bar_px], [by, by], "-", color="white", lw=3)
    ax.annotate("10 µm", (bx + bar_px / 2, by), xytext=(0, 6), textcoords="offset points", color="white",
                ha="center", fontsize=9)
    ax.set_title("patchrig sim: tip paths (lines, from the tips topic; o = start), targets (circles: tolerance),\n"
                 "true final tips (x)", fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def write_report(path: Path, rows: list[dict[str, Any]], total_s: float) -> None:
    keys = ["name", "driver", "calibration_residual_um", "calibration_true_error_um", "final_true_error_um",
            "iterations", "seconds"]
    data = {"channels": [{k: r[k] for k in keys} for r in rows], "total_seconds": total_s}
    write_json_atomic(path, data, indent=2, allow_nan=True)


# -- entry point --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the session (or serve); SIGTERM stops it as Ctrl-C does: devices stopped, the
    daemon and every simulator closed."""
    with sigterm_as_ctrl_c():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from rig.client import PatchrigClient
    from rig.cmd_run import serve
    from rig.simrig import SimulatedRig, build_daemon, load_localiser

    log = get_logger("patchrig.sim")
    t_start = time.monotonic()
    if args.seed is not None and args.seed < 0:
        raise PatchrigError(f"--seed must be 0 or more, got {args.seed}")
    cfg = load_config(args.config)
    sim = SimulatedRig(cfg, seed=args.seed)
    out: Path = args.out.expanduser()
    try:
        cfg = sim.start()
        localiser, device = load_localiser(cfg, args.localiser, sim.microscope)
        if args.serve:
            daemon = build_daemon(cfg, world=sim.world, microscope=sim.microscope, localiser=localiser,
                                  localiser_device=device)
            serve(daemon, log)
            return 0
        out.mkdir(parents=True, exist_ok=True)
        # every session starts uncalibrated, in a folder of its own: nothing of the user's is
        # ever deleted (this used to empty OUT/calibration, whatever it held)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        calibration_dir = Path(tempfile.mkdtemp(prefix=f"calibration-{stamp}-", dir=out))
        daemon = build_daemon(cfg, world=sim.world, microscope=sim.microscope, localiser=localiser,
                              localiser_device=device, calibration_dir=calibration_dir,
                              command_endpoint="tcp://127.0.0.1:0", telemetry_endpoint="tcp://127.0.0.1:0")
        n = len(cfg.channels)
        with daemon:
            print(f"patchrig sim: {n} channels ({', '.join(f'{c.name}={c.driver}' for c in cfg.channels)}), "
                  f"localiser {args.localiser} on {device}, daemon at {daemon.command_endpoint}", flush=True)
            bar = tqdm(total=2 * n, unit="step", dynamic_ncols=True, desc="starting",
                       disable=not sys.stderr.isatty())
            watcher = SessionWatcher(daemon.telemetry_endpoint, bar)
            try:
                # no resends: a repeated calibrate would start the routine again
                with PatchrigClient(daemon.command_endpoint, timeout_s=10.0, retries=0) as client:
                    deadline = time.monotonic() + 20.0
                    while daemon.localiser_worker is not None and daemon.localiser_worker.latest is None:
                        if time.monotonic() > deadline:
                            raise PatchrigError("no localised frame within 20 s of start")
                        time.sleep(0.05)
                    rows = run_session(client, watcher, sim, cfg, bar)
                    frame = sim.microscope.latest() or sim.microscope.render_frame()
                    paths = watcher.paths_snapshot()
            finally:
                watcher.close()
                bar.close()
        total_s = time.monotonic() - t_start
        print_table(rows, total_s)
        picture = out / PICTURE
        draw_picture(picture, frame, rows, paths, sim)
        print(f"picture: {picture}")
        if args.report is not None:
            write_report(args.report, rows, total_s)
            print(f"report: {args.report}")
        if not args.headless and os.environ.get("DISPLAY"):
            _show(picture)
        failed = [r["name"] for r in rows if r.get("error")]
        if failed:
            print(f"patchrig sim: channels with errors: {', '.join(failed)}")
            return 1
        return 0
    finally:
        sim.close()


def _show(picture: Path) -> None:
    """Open the picture in a window when a display is available (not with --headless)."""
    try:
        import matplotlib.image as mpimg
        import matplotlib.pyplot as plt

        plt.figure(figsize=(8, 8))
        plt.imshow(mpimg.imread(picture))
        plt.axis("off")
        plt.show()
    except Exception as exc:  # no GUI backend: the file is there anyway
        get_logger("patchrig.sim").info("no window", reason=str(exc))
