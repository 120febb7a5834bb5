"""CURVE: required beyond loopback; an authenticated client works, others are refused."""

from __future__ import annotations

import time

import pytest
from support_daemon import make_config, make_manipulators, make_world

from rig.client import PatchrigClient, TelemetrySubscriber
from rig.curve import generate_keys, is_loopback_endpoint
from rig.daemon import Daemon
from rig.errors import ConfigError
from rig.protocol import RpcError


def test_loopback_detection() -> None:
    for ep in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5555", "ipc:///tmp/x", "tcp://127.0.0.2:9"):
        assert is_loopback_endpoint(ep), ep
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.5:5555", "tcp://eth0:5555"):
        assert not is_loopback_endpoint(ep), ep


def test_non_loopback_without_keys_refuses_to_start() -> None:
    cfg = make_config(["A"])
    devices = make_manipulators(cfg, make_world(["A"]))
    try:
        with pytest.raises(ConfigError, match="curve_dir"):
            Daemon(cfg, devices, command_endpoint="tcp://0.0.0.0:0", telemetry_endpoint="tcp://127.0.0.1:0")
    finally:
        for m in devices.values():
            m.close()


def test_keygen_refuses_to_overwrite(tmp_path) -> None:
    generate_keys(tmp_path / "k")
    with pytest.raises(ConfigError, match="already exist"):
        generate_keys(tmp_path / "k")
    generate_keys(tmp_path / "k", overwrite=True)


def test_authenticated_client_works_and_others_are_refused(tmp_path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    stranger_keys = tmp_path / "stranger"
    generate_keys(stranger_keys)  # a valid key pair the daemon does not know
    (keys / "server.key").read_bytes()
    # the stranger knows the right server public key but is not authorised
    (stranger_keys / "server.key").write_bytes((keys / "server.key").read_bytes())

    cfg = make_config(["A"])
    world = make_world(["A"])
    daemon = Daemon(cfg, make_manipulators(cfg, world), command_endpoint="tcp://0.0.0.0:0",
                    telemetry_endpoint="tcp://0.0.0.0:0", curve_dir=keys)
    daemon.start()
    port = daemon.command_endpoint.rsplit(":", 1)[1]
    tport = daemon.telemetry_endpoint.rsplit(":", 1)[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        with PatchrigClient(endpoint, curve_dir=keys, timeout_s=5.0) as good:
            assert good.ping()["pong"] is True
            assert good.get_position("A") == pytest.approx(world.manipulator_position_um("A").tolist())
        with TelemetrySubscriber(f"tcp://127.0.0.1:{tport}", ("heartbeat",), curve_dir=keys) as sub:
            assert sub.recv(6.0) is not None  # CURVE handshake, then the next 1 Hz heartbeat
        for kwargs in ({}, {"curve_dir": stranger_keys}):
            with PatchrigClient(endpoint, timeout_s=0.5, retries=1, **kwargs) as bad:
                with pytest.raises(RpcError) as info:
                    bad.ping()
                assert info.value.code == "timeout"
        with TelemetrySubscriber(f"tcp://127.0.0.1:{tport}", ("heartbeat",)) as plain:
            assert plain.recv(1.5) is None
        time.sleep(0.05)
    finally:
        daemon.close()
