"""``patchrig simulate sensapex|scientifica|microscope ...``: one device simulator on its own.

Each device module exposes ``add_cli_arguments(parser)`` and ``run_cli(args) -> int`` and runs
until interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib

DEVICES: dict[str, tuple[str, str]] = {
    "sensapex": ("simulators.sensapex_device", "Sensapex uMp over SMCP/UDP on loopback"),
    "scientifica": ("simulators.scientifica_device", "Scientifica LinLab serial device on a pty"),
    "microscope": ("simulators.microscope", "two-photon microscope publishing patchrig-frame/1"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="device", metavar="DEVICE", required=True)
    for name, (module_name, help_text) in DEVICES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_cli_arguments(p)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(DEVICES[args.device][0])
    return int(module.run_cli(args) or 0)
