"""ZeroMQ CURVE keys for the daemon's sockets when they are bound beyond loopback.

Key directory layout (made by ``patchrig keygen DIR``)::

    DIR/server.key, DIR/server.key_secret        the daemon's key pair
    DIR/client.key, DIR/client.key_secret        one client key pair (copy to the client host)
    DIR/authorized_clients/client.key            public keys of the clients allowed in

A client needs ``client.key_secret`` and ``server.key`` (the server's public key). The daemon
needs ``server.key_secret`` and ``authorized_clients/``; a client whose public key is not there
is refused by the ZAP authenticator (zmq.auth ThreadAuthenticator).
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from rig.errors import ConfigError

AUTHORIZED = "authorized_clients"


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and ``tcp://`` bound to 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a wildcard such as "*"


def generate_keys(directory: Path, *, client_name: str = "client", overwrite: bool = False) -> dict[str, Path]:
    """Create the server pair, one client pair and ``authorized_clients/`` in ``directory``."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    targets = [directory / "server.key_secret", directory / f"{client_name}.key_secret"]
    if not overwrite and any(p.exists() for p in targets):
        raise ConfigError(f"{directory}: keys already exist (pass --force to replace them)")
    server_public, server_secret = zmq.auth.create_certificates(str(directory), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(directory), client_name)
    authorized = directory / AUTHORIZED
    authorized.mkdir(exist_ok=True)
    shutil.copy(client_public, authorized / Path(client_public).name)
    for secret in (server_secret, client_secret):
        Path(secret).chmod(0o600)
    return {
        "server_public": Path(server_public),
        "server_secret": Path(server_secret),
        "client_public": Path(client_public),
        "client_secret": Path(client_secret),
        "authorized": authorized,
    }


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized_dir: Path

    @classmethod
    def load(cls, directory: Path) -> ServerKeys:
        directory = Path(directory).expanduser()
        secret_file = directory / "server.key_secret"
        authorized = directory / AUTHORIZED
        if not secret_file.is_file():
            raise ConfigError(f"{secret_file}: no server key; run `patchrig keygen {directory}`")
        if not authorized.is_dir():
            raise ConfigError(f"{authorized}: no authorized client keys directory")
        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            raise ConfigError(f"{secret_file}: not a secret key file")
        return cls(public, secret, authorized)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server (call before bind)."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, directory: Path, *, client_name: str = "client") -> ClientKeys:
        directory = Path(directory).expanduser()
        secret_file = directory / f"{client_name}.key_secret"
        server_file = directory / "server.key"
        for f in (secret_file, server_file):
            if not f.is_file():
                raise ConfigError(f"{f}: missing CURVE key file")
        public, secret = zmq.auth.load_certificate(str(secret_file))
        server_public, _ = zmq.auth.load_certificate(str(server_file))
        if secret is None:
            raise ConfigError(f"{secret_file}: not a secret key file")
        return cls(public, secret, server_public)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE client of the server (call before connect)."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public


def start_authenticator(context: zmq.Context, keys: ServerKeys) -> ThreadAuthenticator:
    """A ZAP handler thread that admits only the clients in ``keys.authorized_dir``."""
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    return auth
