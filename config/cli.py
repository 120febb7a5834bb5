"""``patchrig check-config FILE``: validate a configuration without touching hardware."""

from __future__ import annotations

import argparse

from config.loader import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="TOML rig configuration to validate")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    print(f"{args.file}: OK ({len(cfg.channels)} channels: "
          + ", ".join(f"{c.name}={c.driver}" for c in cfg.channels) + ")")
    return 0
