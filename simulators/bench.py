"""``patchrig bench microscope``: how fast the simulated microscope and the dataset generator
render, on one core (OpenCV limited to one thread; torch is not involved).

Reports, per frame, the CPU time of the rendering thread (median and 95th percentile; what one
core must spend, whatever else the machine is doing) and the wall time (median; what a loaded
machine gave), with frames per second from each, for:
- the live microscope: 512x512, four pipettes, Gaussian shot-noise approximation;
- ``sample_example``: a random in vivo / ex vivo training frame with exact Poisson noise,
  including its new random background.
The microscope must sustain 30 Hz: the command exits 1 if its median CPU time per frame is
above 1/30 s (the wall-time figure is printed too, to show what the machine gave today).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cv2
import numpy as np

from rig.errors import InvalidParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Frames rendered per second on one core: the simulated microscope (must sustain 30 Hz) "
        "and the synthetic training-data generator."
    )
    parser.add_argument("--frames", type=int, default=150, help="frames per measurement, >= 10 (default 150)")
    parser.add_argument("--size", type=int, default=512, help="frame size in pixels, 64-2048 (default 512)")
    parser.add_argument("--pipettes", type=int, default=4, help="pipettes in the microscope frame, 0-8 (default 4)")
    parser.add_argument("--skip-synth", action="store_true", help="only time the microscope")


def _time(fn: Callable[[], object], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(CPU ms, wall ms) of ``n`` calls of ``fn`` after three warm-up calls."""
    for _ in range(3):
        fn()
    cpu = np.empty(n)
    wall = np.empty(n)
    for i in range(n):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        cpu[i] = time.thread_time() - c0
        wall[i] = time.perf_counter() - t0
    return cpu * 1e3, wall * 1e3


def _row(name: str, cpu_ms: np.ndarray, wall_ms: np.ndarray) -> str:
    cpu_med = float(np.median(cpu_ms))
    wall_med = float(np.median(wall_ms))
    return (
        f"{name:<34} {cpu_med:8.2f} {float(np.percentile(cpu_ms, 95)):8.2f} {1000.0 / cpu_med:8.1f}"
        f" {wall_med:9.2f} {1000.0 / wall_med:9.1f}"
    )


def run(args: argparse.Namespace) -> int:
    from simulators.microscope import SimMicroscope
    from simulators.synth import sample_example
    from simulators.world import SimWorld

    if args.frames < 10:
        raise InvalidParams(f"--frames must be at least 10, got {args.frames}")
    if not 64 <= args.size <= 2048:
        raise InvalidParams(f"--size must be 64..2048 pixels, got {args.size}")
    if not 0 <= args.pipettes <= 8:
        raise InvalidParams(f"--pipettes must be 0..8, got {args.pipettes}")
    cv2.setNumThreads(1)
    n = args.frames
    world = SimWorld(seed=0, image_size_px=(args.size, args.size))
    for i in range(args.pipettes):
        world.add_channel(chr(ord("A") + i))
    microscope = SimMicroscope(world, seed=0)
    print(f"timing the microscope ({n} frames) ...", flush=True)
    mic_cpu, mic_wall = _time(microscope.render_frame, n)
    rows = [_row(f"microscope {args.size}px, {args.pipettes} pipettes", mic_cpu, mic_wall)]
    if not args.skip_synth:
        seeds = iter(range(10**9))
        for domain in ("in_vivo", "ex_vivo"):
            print(f"timing sample_example {domain} ({max(10, n // 3)} frames) ...", flush=True)
            def one_example(domain: str = domain) -> object:
                return sample_example(next(seeds), domain=domain, size_px=args.size)

            cpu, wall = _time(one_example, max(10, n // 3))
            rows.append(_row(f"sample_example {domain} {args.size}px", cpu, wall))
    print(
        f"{'one core (cv2 threads = 1)':<34} {'cpu med':>8} {'cpu p95':>8} {'cpu fps':>8}"
        f" {'wall med':>9} {'wall fps':>9}   (ms per frame)"
    )
    print("\n".join(rows))
    mic_ms = float(np.median(mic_cpu))
    ok = mic_ms <= 1000.0 / 30.0
    print(
        f"microscope sustains 30 Hz on one core: {'yes' if ok else 'NO'} "
        f"({1000.0 / mic_ms:.0f} frames/s of CPU time; {1000.0 / float(np.median(mic_wall)):.0f} frames/s wall "
        "on this machine now)"
    )
    return 0 if ok else 1
