"""The ``patchrig`` command line: a thin dispatcher.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``patchrig --help`` is instant and a
broken optional dependency of one command cannot break the others. Every failure prints one
clear line on stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from rig.errors import PatchrigError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("rig.cmd_sim", "run the whole simulated rig and a scripted session (the main job)"),
    "run": ("rig.cmd_run", "run the daemon on the devices a config names"),
    "client": ("rig.cmd_client", "send one patchrig-rpc/1 command to a running daemon"),
    "keygen": ("rig.cmd_keygen", "generate ZeroMQ CURVE key pairs for non-loopback binding"),
    "check-config": ("config.cli", "validate a rig configuration file without touching hardware"),
    "simulate": ("simulators.cli_simulate", "run one device simulator on its own"),
    "data": ("simulators.cli_data", "synthesise, import and view labelled tip datasets"),
    "train": ("localisation.cli_train", "train a localiser configuration"),
    "train-verifier": ("localisation.verifier_train", "train the second stage (verifier) of a fast localiser"),
    "evaluate": ("localisation.cli_evaluate", "evaluate a localiser checkpoint on a dataset"),
    "locate": ("localisation.cli_locate", "localise tips in an image, a folder or a dataset"),
    "bench": ("rig.cmd_bench", "benchmarks: localiser, manipulators, microscope, calibration, daemon"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; sub-parsers get their arguments lazily in ``main``."""
    parser = argparse.ArgumentParser(
        prog="patchrig",
        description="Closed-loop control daemon for robot-assisted two-photon multi-pipette "
        "in vivo patch-clamp. Run `patchrig COMMAND --help` for a command's options.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: the config's log_level for `patchrig run`, else INFO)",
    )
    parser.add_argument(
        "--log-json", action="store_true", help="JSON log lines even on a terminal"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``patchrig`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    top_args, rest = top.parse_known_args(args_list)
    if top_args.command is None:
        top.print_help()
        return 2
    module_name, help_text = COMMANDS[top_args.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"patchrig {top_args.command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from rig.logs import configure_logging, flush_logs

    configure_logging(top_args.log_level or "INFO", json_lines=True if top_args.log_json else None)
    args.log_level_from_command_line = top_args.log_level  # None: a command may take its config's
    args.log_json_from_command_line = bool(top_args.log_json)
    try:
        return _run_command(module, args, top_args)
    finally:
        flush_logs()  # the command's log lines are written before it returns


def _run_command(module: Any, args: argparse.Namespace, top_args: argparse.Namespace) -> int:
    """``module.run(args)``, with every error one line on stderr, after the log lines before it."""
    from rig.logs import flush_logs

    name = top_args.command
    try:
        return int(module.run(args) or 0)
    except PatchrigError as exc:
        flush_logs()
        print(f"patchrig {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        flush_logs()
        print(f"patchrig {name}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        flush_logs()
        print(f"patchrig {name}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # bad input a command did not foresee: one line, never a traceback
        import traceback

        flush_logs()
        if (top_args.log_level or "INFO") == "DEBUG":
            traceback.print_exc()
        print(f"patchrig {name}: error: {type(exc).__name__}: {exc} "
              f"(rerun with --log-level DEBUG for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
