"""``patchrig bench manipulators``: command latency and position-poll rate per backend.

Each backend runs through its real protocol path against its simulator:

- ``simulated``: the in-process backend (no protocol; the floor of the interface's overhead);
- ``sensapex``: the vendor SDK (libum.so) -> SMCP over UDP -> ``SensapexSimulator`` (loopback);
- ``scientifica``: pyserial -> pseudo-terminal -> ``ScientificaSimulator`` (LinLab text protocol).

Measured, per backend (milliseconds, median and 99th percentile over ``--n`` samples):

- ``query``: one fresh position query, request to reply (Sensapex GET_POSITIONS; Scientifica
  ``P`` through the port thread; simulated: a read);
- ``read``: ``position_um``, the read-back path the daemon uses (the Sensapex SDK's cache when it
  is younger than 20 ms; the Scientifica driver's port-thread cache);
- ``move_cmd``: ``move_to`` for a 1 µm move, until the call returns (the command is sent, and
  for Sensapex acknowledged);
- ``move_done``: the same 1 µm move, from ``move_to`` until its handle is finished (includes
  the device's completion report or the driver's completion polling);
- ``stop``: ``stop()`` on an idle channel, until it returns;
- ``poll_hz``: sustained fresh position queries per second over ``--poll-seconds``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from manipulators.base import Limits, Manipulator
from rig.atomic import atomic_path, write_json_atomic
from rig.errors import InvalidParams, PatchrigError

BACKENDS = ("simulated", "sensapex", "scientifica")
PATHS = {
    "simulated": "in-process motion model",
    "sensapex": "sensapex SDK -> UDP loopback -> SensapexSimulator",
    "scientifica": "pyserial -> pty -> ScientificaSimulator",
}


@dataclass
class Rig:
    manipulator: Manipulator
    query: Callable[[], Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Command latency (median, p99) and position-poll rate of each manipulator backend, "
        "through its real protocol path against its simulator: simulated (in-process), "
        "sensapex (vendor SDK -> UDP loopback), scientifica (pyserial -> pty)."
    )
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated subset of {', '.join(BACKENDS)} (default: all)")
    parser.add_argument("--n", type=int, default=200, help="samples per measurement (default 200)")
    parser.add_argument("--poll-seconds", type=float, default=1.0,
                        help="duration of the poll-rate measurement per backend (default 1 s)")
    parser.add_argument("--sensapex-group", type=int, default=4, choices=range(0, 11), metavar="G",
                        help="SDK group for the Sensapex path (default 4; UDP ports 55557/55559)")
    parser.add_argument("--scientifica-version", type=int, default=2, choices=(2, 3),
                        help="Scientifica controller version to simulate (default 2)")
    parser.add_argument("--baud", type=int, default=9600, choices=(9600, 38400),
                        help="Scientifica baud rate (default 9600)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the results (with every sample) as JSON to FILE (atomically)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="also draw the latency distributions per backend and operation to PNG")


@contextmanager
def _open_backend(name: str, args: argparse.Namespace) -> Iterator[Rig]:
    limits = Limits((0.0, 0.0, 0.0), (20000.0, 20000.0, 20000.0))
    with ExitStack() as stack:
        if name == "simulated":
            from manipulators.simulated import SimulatedManipulator

            sim_m = SimulatedManipulator("bench", limits, 1000.0, initial_position_um=[10000.0] * 3)
            stack.callback(sim_m.close)
            yield Rig(sim_m, lambda: sim_m.position_um)
        elif name == "sensapex":
            from manipulators.sensapex import SensapexManipulator
            from simulators.sensapex_device import SensapexSimulator

            sx_sim = SensapexSimulator(devices={1: "bench"}, n_axes={1: 3}, group=args.sensapex_group)
            sx_sim.start()
            stack.callback(sx_sim.close)
            sx = SensapexManipulator("bench", limits, 1000.0, device_id=1, address="127.0.0.1",
                                     group=args.sensapex_group)
            stack.callback(sx.close)
            yield Rig(sx, sx.query_position_um)
        elif name == "scientifica":
            from manipulators.scientifica import ScientificaManipulator
            from simulators.scientifica_device import ScientificaSimulator

            sc_sim = ScientificaSimulator(version=args.scientifica_version, baud=args.baud,
                                          initial_position_um=np.full(3, 10000.0))
            port = sc_sim.start()
            stack.callback(sc_sim.close)
            sc = ScientificaManipulator("bench", limits, 1000.0, port=port, baud=args.baud,
                                        expected_version=args.scientifica_version)
            stack.callback(sc.close)
            yield Rig(sc, lambda: sc.call(lambda proto: proto.read_position_um()))
        else:
            raise PatchrigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def _summary(samples_s: list[float]) -> dict[str, Any]:
    ms = np.asarray(samples_s) * 1000.0
    return {
        "median_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "n": int(ms.size),
        "samples_ms": [round(float(v), 4) for v in ms],
    }


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_backend(rig: Rig, n: int, poll_seconds: float) -> dict[str, Any]:
    """All measurements of one open backend (see the module docstring)."""
    m = rig.manipulator
    rig.query()  # warm-up
    results: dict[str, Any] = {"query": _summary(_timed(rig.query, n))}
    results["read"] = _summary(_timed(lambda: m.position_um, n))
    base = np.asarray(m.position_um, float)
    step = np.zeros_like(base)
    step[0] = 1.0
    cmd_s: list[float] = []
    done_s: list[float] = []
    for i in range(n):
        target = base + (step if i % 2 == 0 else 0.0)
        t0 = time.perf_counter()
        handle = m.move_to(target.tolist(), 500.0)
        t1 = time.perf_counter()
        handle.wait(10.0)
        t2 = time.perf_counter()
        cmd_s.append(t1 - t0)
        done_s.append(t2 - t0)
    results["move_cmd"] = _summary(cmd_s)
    results["move_done"] = _summary(done_s)
    results["stop"] = _summary(_timed(m.stop, max(10, n // 4)))
    count = 0
    t_end = time.perf_counter() + poll_seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        rig.query()
        count += 1
    results["poll_hz"] = count / (time.perf_counter() - t0)
    return results


def _table(results: dict[str, dict[str, Any]]) -> str:
    ops = ("query", "read", "move_cmd", "move_done", "stop")
    head = f"{'backend':<12} {'path':<50} " + " ".join(f"{op + ' med/p99 ms':>21}" for op in ops) + f" {'poll Hz':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = " ".join(f"{r[op]['median_ms']:>9.2f} / {r[op]['p99_ms']:<9.2f}" for op in ops)
        lines.append(f"{name:<12} {PATHS[name]:<50} {cells} {r['poll_hz']:>9.0f}")
    return "\n".join(lines)


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Box plots (log scale) of every operation's latency, one colour per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = ("query", "read", "move_cmd", "move_done", "stop")
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    width = 0.8 / max(1, len(results))
    for i, (name, r) in enumerate(results.items()):
        data = [np.maximum(np.asarray(r[op]["samples_ms"]), 1e-3) for op in ops]
        pos = [k + (i - (len(results) - 1) / 2) * width for k in range(len(ops))]
        box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=True,
                         flierprops={"markersize": 2}, medianprops={"color": "black"})
        colour = f"C{i}"
        for patch in box["boxes"]:
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
        ax.plot([], [], color=colour, linewidth=6, alpha=0.6, label=f"{name}: {r['poll_hz']:.0f} polls/s")
    ax.set_xticks(range(len(ops)), ops)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("patchrig bench manipulators")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, indent=2, allow_nan=True)


def run(args: argparse.Namespace) -> int:
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise PatchrigError(f"unknown backend(s) {unknown or names}; choose from {', '.join(BACKENDS)}")
    if args.n < 2:
        raise InvalidParams(f"--n must be at least 2, got {args.n}")
    if not 0 < args.poll_seconds <= 60:
        raise InvalidParams(f"--poll-seconds must be in (0, 60] s, got {args.poll_seconds}")
    results: dict[str, dict[str, Any]] = {}
    quiet = logging.getLogger("patchrig")  # one log line per benchmark move would drown the table
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for name in names:
            print(f"benchmarking {name}: {PATHS[name]} ...", file=sys.stderr, flush=True)
            with _open_backend(name, args) as rig:
                results[name] = bench_backend(rig, args.n, args.poll_seconds)
                results[name]["path"] = PATHS[name]
    finally:
        quiet.setLevel(level)
    print(_table(results))
    if args.json is not None:
        payload = {
            "benchmark": "manipulators",
            "results": results,
            "n": args.n,
            "poll_seconds": args.poll_seconds,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count()},
            "scientifica": {"version": args.scientifica_version, "baud": args.baud},
            "sensapex_group": args.sensapex_group,
            "unix_time": time.time(),
        }
        _write_json_atomic(args.json, payload)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        _plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0

