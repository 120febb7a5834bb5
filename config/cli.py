"""``patchrig check-config FILE``: validate a configuration without touching hardware.

Prints one ``OK`` line for a valid file, then one ``warning:`` line for each file or device
path the configuration names that does not exist on this machine (a replay source, a localiser
checkpoint, a serial port), since those only fail later, when the daemon starts. Exits 1 with
one error line naming the key and the file for an invalid configuration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from config.loader import load_config
from config.models import RigConfig
from manipulators.factory import SIMULATED_PORT_PLACEHOLDER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="TOML rig configuration to validate")


def missing_paths(cfg: RigConfig) -> list[str]:
    """Human-readable notes on paths of ``cfg`` that do not exist here (nothing is opened)."""
    notes = []
    if cfg.frames.source == "replay" and cfg.frames.replay_path is not None:
        path = Path(cfg.frames.replay_path).expanduser()
        if not path.exists():
            notes.append(f"frames.replay_path {path} does not exist")
    if cfg.localiser.checkpoint is not None:
        path = Path(cfg.localiser.checkpoint).expanduser()
        if not path.is_file():
            notes.append(f"localiser.checkpoint {path} does not exist")
    for channel in cfg.channels:
        sc = channel.scientifica
        if channel.driver != "scientifica" or sc is None or sc.port == SIMULATED_PORT_PLACEHOLDER:
            continue
        is_url = sc.port.startswith(("socket://", "rfc2217://", "loop://"))  # pyserial URLs
        if not is_url and not Path(sc.port).exists():
            notes.append(f"channel {channel.name!r}: serial port {sc.port} does not exist on this machine")
    return notes


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    print(f"{args.file}: OK ({len(cfg.channels)} channels: "
          + ", ".join(f"{c.name}={c.driver}" for c in cfg.channels) + ")")
    for note in missing_paths(cfg):
        print(f"  warning: {note}")
    return 0
