"""``patchrig bench calibration``: calibration, move_tip, assignment and correction in simulation.

Each seed builds a quad rig in the shared simulated world (channel A with 4 axes, B-D with 3,
random hidden mountings), the simulated manipulators, the simulated two-photon microscope and
the real shipped localiser (``--localiser oracle`` swaps in ``rig.sim_oracle``, which reads the truth of each rendered frame
plus noise, to separate calibration logic from localiser quality). The calibration service
never sees the truth; the benchmark compares its results with it:

- calibration: moves per channel, residual, TRUE error (median |predicted - true| in X, Y over
  25 positions within +-40 µm of the calibration position), failures;
- move_tip: TRUE final error of the tip (µm) and iterations, ``--trials`` per channel, to
  random targets up to 100 px away; a target the daemon's collision guard refuses (closer
  than ``min_tip_separation_um`` to another calibrated tip) is redrawn and counted
  (``move_tip_targets_refused``); each trial records its target and the TRUE distance from
  it to the nearest other tip;
- assignment: frames in which every assigned detection went to the right channel, with the
  four pipettes moving (and crossing) between frames;
- correction: after a 6 µm jump of one channel's hidden offset (plus the world's drift), TRUE
  error before and after ``--correction-s`` seconds of continuous correction.

Targets (issue 5): <= 20 moves and median true error <= 1 µm per calibration; move_tip <= 2 µm
in >= 99 % of trials with median iterations <= 3; assignment correct in >= 99.5 % of frames.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rig.errors import InvalidParams, PatchrigError

TARGETS = {
    "calibration_moves_max": 20,
    "calibration_true_error_median_um": 1.0,
    "move_tip_within_2um_fraction": 0.99,
    "move_tip_iterations_median": 3,
    "assignment_correct_fraction": 0.995,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Calibration benchmark in simulation (true errors against the hidden world)."
    parser.add_argument("--seeds", type=int, default=10, help="number of simulated rigs (default 10)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=5, help="move_tip trials per channel and seed (default 5)")
    parser.add_argument("--assignment-frames", type=int, default=60, help="frames per seed for assignment (default 60)")
    parser.add_argument("--correction-s", type=float, default=3.0, help="seconds of continuous correction after a jump")
    parser.add_argument("--localiser", choices=["real", "oracle"], default="real", help="real shipped model or the oracle double")
    parser.add_argument("--checkpoint", type=Path, default=None, help="localiser checkpoint (default: shipped fast.pt)")
    parser.add_argument("--device", default="cpu", help="localiser device: cpu, cuda, auto (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--drift-um-per-min", type=float, default=0.5)
    parser.add_argument("--speed-um-s", type=float, default=500.0, help="manipulator speed (default 500 µm/s)")
    parser.add_argument("--frame-rate-hz", type=float, default=30.0, help="simulated frame rate (default 30)")
    parser.add_argument("--frames-averaged", type=int, default=1, metavar="K",
                        help="each closed-loop look localises the mean of K fresh frames "
                        "([calibration] frames_averaged; default 1)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the error distributions here")


def _build(seed: int, args: argparse.Namespace, localiser_model: Any):
    """World, manipulators, frame source, localiser for one seed."""
    from manipulators.base import Limits
    from manipulators.simulated import SimulatedManipulator
    from simulators.world import SimWorld

    world = SimWorld(seed=seed, drift_um_per_min=args.drift_um_per_min)
    for name, n_axes in zip("ABCD", (4, 3, 3, 3), strict=True):
        world.add_channel(name, n_axes=n_axes, position_um=np.full(n_axes, 10000.0))
    manipulators = {
        name: SimulatedManipulator(
            name, Limits((0.0,) * world.truth(name).n_axes, (20000.0,) * world.truth(name).n_axes),
            max_speed_um_s=max(1000.0, args.speed_um_s), default_speed_um_s=args.speed_um_s, world=world,
        )
        for name in world.channel_names
    }
    from rig.frame_sources import SimulatedFrameSource
    from simulators.microscope import SimMicroscope

    microscope = SimMicroscope(world, rate_hz=args.frame_rate_hz, seed=seed)
    frames = SimulatedFrameSource(microscope)
    if args.localiser == "oracle":
        from rig.sim_oracle import OracleLocaliser  # truth of each rendered frame + 0.3 px noise

        localiser = OracleLocaliser(microscope, seed=seed)
    else:
        localiser = localiser_model
    frames.start()
    return world, manipulators, frames, localiser


def _true_error_um(world, calibration, position_um: np.ndarray, rng: np.random.Generator, box_um: float = 40.0) -> float:
    errors = []
    for _ in range(25):
        p = np.asarray(position_um, float).copy()
        p[:2] += rng.uniform(-box_um, box_um, 2)
        predicted = calibration.to_microscope_um(p)[:2]
        errors.append(float(np.linalg.norm(predicted - world.tip_um_for(calibration.channel, p)[:2])))
    return float(np.median(errors))


def _one_seed(seed: int, args: argparse.Namespace, localiser_model: Any) -> dict[str, Any]:
    from calibration.service import CalibrationService
    from config.models import CalibrationConfig, RigIdentity

    rng = np.random.default_rng(1000 + seed)
    world, manipulators, frames, localiser = _build(seed, args, localiser_model)
    out: dict[str, Any] = {"seed": seed, "calibration": [], "move_tip": [], "assignment": {}, "correction": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            service = CalibrationService(
                RigIdentity(um_per_px=world.um_per_px), CalibrationConfig(frames_averaged=args.frames_averaged), manipulators, frames, localiser, store_dir=Path(tmp)
            )
            # -- calibration ---------------------------------------------------------------
            for name, m in manipulators.items():
                row: dict[str, Any] = {"channel": name, "n_axes": m.n_axes}
                try:
                    result = service.calibrate(name)
                    cal = service._calibration(name)
                    row.update(
                        ok=True,
                        moves=result["moves"],
                        residual_um=result["residual_um"],
                        true_error_um=_true_error_um(world, cal, m.position_um, rng),
                        z_sign_right=bool(np.sign(cal.z_up_sign) == np.sign(world.truth(name).matrix[2, 2])),
                        checked=bool(result.get("checked", False)),
                    )
                except PatchrigError as exc:
                    row.update(ok=False, error=str(exc))
                out["calibration"].append(row)
            calibrated = [n for n in manipulators if service.is_calibrated(n)]
            # -- move_tip --------------------------------------------------------------------
            for name in calibrated:
                for _ in range(args.trials):
                    target, refused = _draw_target(world, service, name, rng)
                    others = [world.true_tip_px(o) for o in world.channel_names if o != name]
                    row = {
                        "channel": name,
                        "target_px": target.tolist(),
                        "targets_refused": refused,
                        "nearest_other_tip_um": min(float(np.linalg.norm(o - target)) for o in others) * world.um_per_px,
                    }
                    try:
                        result = service.move_tip(name, target_px=target.tolist())
                        row.update(
                            ok=True, iterations=result["iterations"], reported_error_um=result["error_um"],
                            verified=result["verified"],
                        )
                    except PatchrigError as exc:
                        row.update(ok=False, error=str(exc))
                    row["true_error_um"] = float(np.linalg.norm(world.true_tip_px(name) - target)) * world.um_per_px
                    out["move_tip"].append(row)
            # -- assignment with four pipettes moving and crossing ---------------------------
            out["assignment"] = _assignment(world, manipulators, frames, localiser, service, rng, args.assignment_frames)
            # -- correction after a jump -----------------------------------------------------
            if calibrated:
                out["correction"] = _correction(world, manipulators, frames, localiser, service, calibrated[0], args.correction_s)
    finally:
        for m in manipulators.values():
            m.close()
        frames.close()
        if hasattr(localiser, "close"):
            localiser.close()
    return out


def _draw_target(world, service, name: str, rng: np.random.Generator, max_draws: int = 50) -> tuple[np.ndarray, int]:
    """A move_tip target (pixels) up to 100 px from the tip in x and y and at least 40 px
    inside the frame, redrawn while the daemon's collision guard refuses it (within
    ``min_tip_separation_um`` of another calibrated tip, as the daemon predicts them: a user
    would not ask for it, and move_tip would refuse it). Returns it and the refused draws."""
    from calibration.transform import px_to_um

    h, w = world.image_size_px
    refused = 0
    for _ in range(max_draws):
        target = np.clip(world.true_tip_px(name) + rng.uniform(-100, 100, 2), 40, np.array([w, h]) - 41)
        try:
            service.check_separation(name, [*px_to_um(target, world.um_per_px, (h, w)), world.focal_z_um])
            return target, refused
        except PatchrigError:
            refused += 1
    raise RuntimeError(f"no target for channel {name} clear of the other tips in {max_draws} draws")


def _assignment(world, manipulators, frames, localiser, service, rng, n_frames: int) -> dict[str, Any]:
    """Move all calibrated pipettes along random straight lines toward the other tips (so
    they cross), and judge the assignment on fresh frames."""
    from calibration.observe import Eye

    eye = Eye(frames, localiser, min_score=0.5)
    names = [n for n in manipulators if service.is_calibrated(n)]
    correct = complete = judged = 0
    for _ in range(n_frames):
        for name in names:
            m = manipulators[name]
            cal = service._calibration(name)
            goal_um = np.array([*rng.uniform(-110, 110, 2), cal.to_microscope_um(m.position_um)[2]])
            target = cal.to_manipulator_um(goal_um, m.position_um)
            if m.limits.contains(target.tolist()):
                m.move_to(target)
        for name in names:
            handle = manipulators[name].current_move
            if handle is not None:
                handle.wait(10.0, check=False)
        look = eye.look_after(time.monotonic())
        result = service.assign(look.detections, look.frame)
        truth = {n: world.true_tip_px(n) for n in names}
        wrong = 0
        for name, a in result["assigned"].items():
            d_own = np.hypot(a["x_px"] - truth[name][0], a["y_px"] - truth[name][1])
            d_other = min((np.hypot(a["x_px"] - truth[o][0], a["y_px"] - truth[o][1]) for o in names if o != name), default=np.inf)
            wrong += d_own >= d_other  # the detection is another channel's tip (or nobody's)
        judged += 1
        correct += wrong == 0
        complete += wrong == 0 and len(result["assigned"]) == len(names)
    return {
        "frames": judged,
        "channels": len(names),
        "correct_fraction": correct / judged if judged else float("nan"),
        "complete_fraction": complete / judged if judged else float("nan"),
    }


def _correction(world, manipulators, frames, localiser, service, name: str, seconds: float) -> dict[str, Any]:
    from calibration.observe import Eye

    eye = Eye(frames, localiser, min_score=0.0)
    m = manipulators[name]
    world.jump(name, np.array([4.8, -3.6, 0.0]))
    before = float(np.linalg.norm(service._calibration(name).to_microscope_um(m.position_um)[:2] - world.true_tip_um(name)[:2]))
    accepted = rejected = 0
    deadline = time.monotonic() + seconds
    last = time.monotonic()
    while time.monotonic() < deadline:
        look = eye.look_after(last - eye.settle_s)
        last = look.frame.received_s
        result = service.observe(look.frame, look.detections)
        c = result["corrections"].get(name)
        if c is not None:
            accepted += bool(c["accepted"])
            rejected += not c["accepted"]
    after = float(np.linalg.norm(service._calibration(name).to_microscope_um(m.position_um)[:2] - world.true_tip_um(name)[:2]))
    return {"channel": name, "jump_um": 6.0, "true_error_before_um": before, "true_error_after_um": after, "accepted": accepted, "rejected": rejected}


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    cal = [r for s in seeds for r in s["calibration"]]
    ok = [r for r in cal if r["ok"]]
    mt = [r for r in seeds for r in r["move_tip"]]
    asg = [s["assignment"] for s in seeds if s["assignment"].get("frames")]
    cor = [s["correction"] for s in seeds if s["correction"]]
    frames = sum(a["frames"] for a in asg)
    summary = {
        "calibrations": len(cal),
        "calibration_failures": len(cal) - len(ok),
        "calibration_moves_median": float(np.median([r["moves"] for r in ok])) if ok else None,
        "calibration_moves_max": int(max(r["moves"] for r in ok)) if ok else None,
        "calibration_true_error_median_um": float(np.median([r["true_error_um"] for r in ok])) if ok else None,
        "calibration_true_error_p90_um": float(np.percentile([r["true_error_um"] for r in ok], 90)) if ok else None,
        "calibration_residual_median_um": float(np.median([r["residual_um"] for r in ok])) if ok else None,
        "calibrations_checked": sum(bool(r.get("checked")) for r in ok),
        "calibrations_refused_by_check": sum("held-out check" in r.get("error", "") for r in cal if not r["ok"]),
        "z_sign_right_fraction_4axis": _frac([r["z_sign_right"] for r in ok if r["n_axes"] == 4]),
        "move_tip_trials": len(mt),
        "move_tip_targets_refused": sum(r.get("targets_refused", 0) for r in mt),
        "move_tip_within_2um_fraction": _frac([r["true_error_um"] <= 2.0 for r in mt]),
        "move_tip_true_error_median_um": float(np.median([r["true_error_um"] for r in mt])) if mt else None,
        "move_tip_failures": sum(not r["ok"] for r in mt),
        "move_tip_unverified": sum(r["ok"] and not r.get("verified", True) for r in mt),
        "move_tip_iterations_median": float(np.median([r["iterations"] for r in mt if r["ok"]])) if any(r["ok"] for r in mt) else None,
        "assignment_frames": frames,
        "assignment_correct_fraction": sum(a["correct_fraction"] * a["frames"] for a in asg) / frames if frames else None,
        "assignment_complete_fraction": sum(a["complete_fraction"] * a["frames"] for a in asg) / frames if frames else None,
        "correction_true_error_before_median_um": float(np.median([c["true_error_before_um"] for c in cor])) if cor else None,
        "correction_true_error_after_median_um": float(np.median([c["true_error_after_um"] for c in cor])) if cor else None,
    }
    return summary


def _frac(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rig.logs import configure_logging

    tqdm.monitor_interval = 0  # no monitor thread: the bench leaves no thread behind

    if args.frames_averaged < 1:
        raise InvalidParams(f"--frames-averaged must be at least 1, got {args.frames_averaged}")
    if args.frames_averaged > 1 and args.localiser == "oracle":
        raise InvalidParams("--frames-averaged needs the real localiser (the oracle reads each frame's id from its pixels)")
    configure_logging("WARNING")
    localiser_model = None
    if args.localiser == "real":
        import torch

        from localisation.inference import TipLocaliser

        torch.set_num_threads(args.threads)
        localiser_model = TipLocaliser.load(args.checkpoint, device=args.device, threads=args.threads)
    results = []
    t0 = time.monotonic()
    for seed in tqdm(range(args.first_seed, args.first_seed + args.seeds), desc="calibration bench", unit="rig"):
        results.append(_one_seed(seed, args, localiser_model))
    summary = summarise(results)
    summary["seconds"] = time.monotonic() - t0
    summary["frames_averaged"] = args.frames_averaged
    summary["localiser"] = args.localiser if localiser_model is None else f"real ({localiser_model.checkpoint})"
    width = max(len(k) for k in summary)
    print(f"calibration benchmark: {args.seeds} simulated quad rigs, localiser {summary['localiser']}")
    for key, value in summary.items():
        target = TARGETS.get(key)
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}" + (f"   (target {target})" if target is not None else ""))
    if args.plot is not None:
        plot(results, summary, args.plot)
        print(f"wrote {args.plot}")
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "targets": TARGETS, "seeds": results}, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


def plot(seeds: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Three panels: calibration true error, move_tip final true error, correction after a jump."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = [r["true_error_um"] for s in seeds for r in s["calibration"] if r["ok"]]
    mt = [r["true_error_um"] for s in seeds for r in s["move_tip"]]
    cor = [s["correction"] for s in seeds if s["correction"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.hist(np.clip(cal, 0, 3), bins=np.linspace(0, 3, 31), color="tab:blue")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="target median 1 µm")
    ax.set(title=f"calibration: true error (n={len(cal)}, {summary['calibration_failures']} failed)", xlabel="µm (clipped at 3)", ylabel="channels")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.hist(np.clip(mt, 0, 5), bins=np.linspace(0, 5, 41), color="tab:green")
    ax.axvline(2.0, color="k", ls="--", lw=1, label="tolerance 2 µm")
    ax.set(title=f"move_tip: final true error (n={len(mt)})", xlabel="µm (clipped at 5)", ylabel="trials")
    ax.legend(fontsize=8)
    ax = axes[2]
    for c in cor:
        ax.plot([0, 1], [c["true_error_before_um"], c["true_error_after_um"]], "o-", color="tab:red", alpha=0.6)
    ax.set_xticks([0, 1], ["after the jump", "after correction"])
    ax.set(title="continuous correction of a 6 µm jump", ylabel="true error, µm")
    fig.suptitle(f"patchrig bench calibration: localiser {summary.get('localiser', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
