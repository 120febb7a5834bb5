"""``patchrig client METHOD [JSON]``: one patchrig-rpc/1 command to a running daemon.

Prints the ``result`` as JSON on stdout and exits 0; an error reply prints one line
``patchrig client: error: CODE: message`` on stderr and exits 1. Examples::

    patchrig client ping
    patchrig client get_position '{"channel": "A"}'
    patchrig client move '{"channel": "A", "position_um": [10000, 10000, 10000, 10000]}'
    patchrig client stop_all
    patchrig client --watch op           # print telemetry messages of topic "op" until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rig.client import (
    DEFAULT_COMMAND_ENDPOINT,
    DEFAULT_TELEMETRY_ENDPOINT,
    PatchrigClient,
    TelemetrySubscriber,
)
from rig.errors import InvalidParams
from rig.protocol import METHODS, MOTION_METHODS, RpcError
from rig.telemetry import TOPICS

MAX_TIMEOUT_S = 86400.0  # a day: longer is a typo (and inf overflowed in ZeroMQ's poll)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", nargs="?", help=f"one of: {', '.join(METHODS)}")
    parser.add_argument("params", nargs="?", default="{}", help="the params as a JSON object (default: {})")
    parser.add_argument("--endpoint", default=DEFAULT_COMMAND_ENDPOINT, help="command socket (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="reply timeout in s (default: 5, or 300 for motion methods that wait)")
    parser.add_argument("--retries", type=int, default=2,
                        help="resends of a query after a timeout (lazy pirate); move, move_tip, calibrate, set_tip "
                        "and shutdown are never re-sent")
    parser.add_argument("--curve-dir", type=Path, default=None, help="CURVE keys (client.key_secret, server.key)")
    parser.add_argument("--watch", metavar="TOPIC", nargs="*", default=None,
                        help="instead of a command, print telemetry (all topics if none named)")
    parser.add_argument("--telemetry", default=DEFAULT_TELEMETRY_ENDPOINT, help="telemetry socket for --watch")


def run(args: argparse.Namespace) -> int:
    if args.watch is not None:
        unknown = sorted(set(args.watch) - set(TOPICS))
        if unknown:  # a typo would otherwise wait for ever in silence
            raise InvalidParams(f"unknown telemetry topic(s) {unknown}; topics: {', '.join(TOPICS)}")
        with TelemetrySubscriber(args.telemetry, args.watch, curve_dir=args.curve_dir) as sub:
            for topic, message in sub:
                print(topic, json.dumps(message), flush=True)
        return 0
    if not args.method:
        raise InvalidParams("give a METHOD (or --watch); see `patchrig client --help`")
    try:
        params = json.loads(args.params)
    except ValueError as exc:
        raise InvalidParams(f"params are not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise InvalidParams("params must be a JSON object")
    if args.retries < 0:
        raise InvalidParams(f"--retries must be 0 or more, got {args.retries}")
    if args.timeout is not None and not 0 < args.timeout <= MAX_TIMEOUT_S:  # NaN and inf fail too
        raise InvalidParams(f"--timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {args.timeout}")
    waits = args.method in MOTION_METHODS and params.get("wait", True)
    timeout = args.timeout if args.timeout is not None else (300.0 if waits else 5.0)
    with PatchrigClient(args.endpoint, timeout_s=5.0 if waits else timeout, op_timeout_s=timeout,
                        retries=args.retries, curve_dir=args.curve_dir) as client:
        try:
            if args.method in MOTION_METHODS:  # never re-sent; waiting: a ping first
                motion = {k: v for k, v in params.items() if k != "wait"}
                result = client.motion(args.method, motion, params.get("wait", True))
            else:
                result = client.call(args.method, params)
        except RpcError as exc:
            print(f"patchrig client: error: {exc.code}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0
