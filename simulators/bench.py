"""``patchrig bench microscope``: how fast the simulated microscope and the dataset generator
render, on one core (OpenCV limited to one thread; torch is not involved).

Reports milliseconds per frame (median and 95th percentile) and frames per second for:
- the live microscope: 512x512, four pipettes, Gaussian shot-noise approximation;
- ``sample_example``: a random in vivo / ex vivo training frame with exact Poisson noise,
  including its new random background.
The microscope must sustain 30 Hz; the command exits 1 if its median frame takes longer than
1/30 s.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=150, help="frames per measurement (default 150)")
    parser.add_argument("--size", type=int, default=512, help="frame size in pixels (default 512)")
    parser.add_argument("--pipettes", type=int, default=4, help="pipettes in the microscope frame")
    parser.add_argument("--skip-synth", action="store_true", help="only time the microscope")


def _time(fn, n: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out * 1e3


def _row(name: str, ms: np.ndarray) -> str:
    med = float(np.median(ms))
    return f"{name:<38} {med:8.2f} {float(np.percentile(ms, 95)):8.2f} {1000.0 / med:9.1f}"


def run(args: argparse.Namespace) -> int:
    from simulators.microscope import SimMicroscope
    from simulators.synth import sample_example
    from simulators.world import SimWorld

    cv2.setNumThreads(1)
    n = max(10, args.frames)
    world = SimWorld(seed=0, image_size_px=(args.size, args.size))
    for i in range(args.pipettes):
        world.add_channel(chr(ord("A") + i))
    microscope = SimMicroscope(world, seed=0)
    rows = [_row(f"microscope {args.size}px, {args.pipettes} pipettes", _time(microscope.render_frame, n))]
    mic_ms = float(np.median(_time(microscope.render_frame, n)))
    if not args.skip_synth:
        seeds = iter(range(10**9))
        for domain in ("in_vivo", "ex_vivo"):
            ms = _time(lambda d=domain: sample_example(next(seeds), domain=d, size_px=args.size), max(10, n // 3))
            rows.append(_row(f"sample_example {domain} {args.size}px", ms))
    print(f"{'one core (cv2 threads = 1)':<38} {'med ms':>8} {'p95 ms':>8} {'frames/s':>9}")
    print("\n".join(rows))
    ok = mic_ms <= 1000.0 / 30.0
    print(f"microscope sustains 30 Hz: {'yes' if ok else 'NO'} ({1000.0 / mic_ms:.0f} frames/s possible)")
    return 0 if ok else 1
