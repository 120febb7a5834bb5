"""``patchrig keygen DIR``: CURVE key pairs for a daemon bound beyond loopback.

Writes ``DIR/server.key`` and ``DIR/server.key_secret`` (the daemon's pair), ``DIR/client.key``
and ``DIR/client.key_secret`` (one client's pair) and ``DIR/authorized_clients/client.key``.
Point ``[server] curve_dir`` at DIR; give clients ``client.key_secret`` and ``server.key``
(``patchrig client --curve-dir DIR ...``). Add more clients by copying their public ``.key``
files into ``authorized_clients/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rig.curve import generate_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="where to write the keys (created if missing)")
    parser.add_argument("--client-name", default="client", help="name of the client key pair (default: client)")
    parser.add_argument("--force", action="store_true", help="replace existing keys")


def run(args: argparse.Namespace) -> int:
    paths = generate_keys(args.directory, client_name=args.client_name, overwrite=args.force)
    print(f"server key pair:  {paths['server_public']} (public), {paths['server_secret']} (secret)")
    print(f"client key pair:  {paths['client_public']} (public), {paths['client_secret']} (secret)")
    print(f"authorized clients: {paths['authorized']}/")
    print(f"daemon config: [server] curve_dir = \"{Path(args.directory).expanduser()}\"")
    return 0
