"""``patchrig bench [TARGET]``: dispatches to each area's benchmark module."""

from __future__ import annotations

import argparse
import importlib

# target -> module exposing add_arguments(parser) and run(args)
TARGETS: dict[str, str] = {
    "localiser": "localisation.bench",
    "manipulators": "manipulators.bench",
    "microscope": "simulators.bench",
    "calibration": "calibration.bench",
    "daemon": "rig.bench",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        default="localiser",
        choices=sorted(TARGETS),
        help="what to benchmark (default: localiser, the paper's Table III)",
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(TARGETS[args.target])
    parser = argparse.ArgumentParser(prog=f"patchrig bench {args.target}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)) or 0)
