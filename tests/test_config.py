"""Configuration loading: shipped profiles validate, unknown keys and bad values are rejected
with the key and the file named, environment overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
from support_cli import one_line_error

from config import default_config_path, load_config
from rig.cli import main
from rig.errors import ConfigError

CONFIG_DIR = Path(default_config_path()).parent


@pytest.mark.parametrize("name", ["sim.toml", "example-rig.toml"])
def test_shipped_profiles_validate(name: str) -> None:
    cfg = load_config(CONFIG_DIR / name, environ={})
    assert len(cfg.channels) >= 2


def test_sim_profile_is_a_quad_rig() -> None:
    cfg = load_config(environ={})
    drivers = sorted(c.driver for c in cfg.channels)
    assert drivers == ["scientifica", "scientifica", "sensapex", "sensapex"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rig.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    text = default_config_path().read_text().replace("[server]", "[server]\nbogus_key = 1")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "server.bogus_key" in str(info.value)
    assert str(path) in str(info.value)
    assert "unknown key" in str(info.value)


def test_inverted_limits_rejected(tmp_path: Path) -> None:
    text = default_config_path().read_text().replace(
        "min_um = [0.0, 0.0, 0.0], max_um = [20000.0, 20000.0, 20000.0]",
        "min_um = [0.0, 0.0, 0.0], max_um = [20000.0, -5.0, 20000.0]",
    )
    with pytest.raises(ConfigError, match=r"channels\[B\]\.limits"):
        load_config(_write(tmp_path, text), environ={})


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[rig\nname="), environ={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", environ={})


def test_env_overrides_section_and_channel() -> None:
    cfg = load_config(
        environ={
            "PATCHRIG__SERVER__COMMAND_ENDPOINT": "tcp://127.0.0.1:6001",
            "PATCHRIG__CHANNELS__B__MAX_SPEED_UM_S": "500",
            "PATCHRIG__LOCALISER__MIN_SCORE": "0.8",
        }
    )
    assert cfg.server.command_endpoint == "tcp://127.0.0.1:6001"
    assert cfg.channel("B").max_speed_um_s == 500.0
    assert cfg.localiser.min_score == 0.8


def test_env_override_validated() -> None:
    with pytest.raises(ConfigError, match="max_speed_um_s"):
        load_config(environ={"PATCHRIG__CHANNELS__A__MAX_SPEED_UM_S": "-3"})


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(default_config_path())]) == 0
    assert "OK" in capsys.readouterr().out
    bad = _write(tmp_path, "nonsense = 1\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nonsense" in err


def test_env_override_errors_name_the_variable_and_the_channel() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"PATCHRIG__CHANNELS__A__BOGUS": "1"})
    text = str(info.value)
    assert "PATCHRIG__CHANNELS__A__BOGUS" in text and "sim.toml" in text
    assert "channels[A].bogus: unknown key" in text


def test_check_config_prints_one_line_per_outcome(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(CONFIG_DIR / "sim.toml")]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    bad = _write(tmp_path, default_config_path().read_text().replace("[server]", "[server]\nbogus_key = 1"))
    assert main(["check-config", str(bad)]) == 1
    err = one_line_error(capsys)
    assert "server.bogus_key: unknown key" in err and str(bad) in err


def test_check_config_warns_about_paths_that_do_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATCHRIG__FRAMES__SOURCE", "replay")
    monkeypatch.setenv("PATCHRIG__FRAMES__REPLAY_PATH", f'"{tmp_path / "missing.tif"}"')
    monkeypatch.setenv("PATCHRIG__LOCALISER__CHECKPOINT", f'"{tmp_path / "missing.pt"}"')
    assert main(["check-config", str(CONFIG_DIR / "sim.toml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("OK (4 channels: A=sensapex, B=sensapex, C=scientifica, D=scientifica)")
    assert any("warning: frames.replay_path" in line and "missing.tif" in line for line in out)
    assert any("warning: localiser.checkpoint" in line and "missing.pt" in line for line in out)
    (tmp_path / "missing.tif").write_bytes(b"")
    (tmp_path / "missing.pt").write_bytes(b"")
    assert main(["check-config", str(CONFIG_DIR / "sim.toml")]) == 0
    assert "warning" not in capsys.readouterr().out  # simulated serial ports are not checked


def test_check_config_names_a_missing_serial_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (CONFIG_DIR / "example-rig.toml").read_text()
    assert main(["check-config", str(_write(tmp_path, text.replace("/dev/ttyUSB0", str(tmp_path / "ttyNONE"))))]) == 0
    assert f"serial port {tmp_path / 'ttyNONE'} does not exist" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("before", "after", "key"),
    [
        ("telemetry_endpoint = \"tcp://127.0.0.1:5556\"", "telemetry_endpoint = \"tcp://127.0.0.1:5556\"\nlease_s = inf",
         "server.lease_s"),
        ("frame_rate_hz = 30.0", "frame_rate_hz = nan", "simulation.frame_rate_hz"),
        ("max_speed_um_s = 1000.0", "max_speed_um_s = \"1000\"", "max_speed_um_s"),  # a quoted number
        ("seed = 0", "seed = true", "simulation.seed"),  # a boolean is not a number
        ("min_um = [0.0, 0.0, 0.0, 0.0]", "min_um = [false, false, false, false]", "min_um"),  # inside a list
        ("max_um = [20000.0, 20000.0, 20000.0]", "max_um = [\"20000\", 20000.0, 20000.0]", "max_um"),
    ],
)
def test_non_finite_quoted_and_boolean_numbers_are_refused(tmp_path: Path, before: str, after: str, key: str) -> None:
    text = default_config_path().read_text()
    assert before in text
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, text.replace(before, after, 1)), environ={})


def test_an_infinite_staleness_limit_from_the_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"frames\.stale_after_s"):
        load_config(environ={"PATCHRIG__FRAMES__STALE_AFTER_S": "inf"})


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("PATCHRIG__FRAMES__STALE_AFTER_S", "1e300", r"frames\.stale_after_s"),  # frames would never be stale
    ("PATCHRIG__FRAMES__STALE_AFTER_S", "10.5", r"frames\.stale_after_s"),
    ("PATCHRIG__SIMULATION__SEED", "-1", r"simulation\.seed"),  # check-config said OK, sim then failed
])
def test_values_that_would_fail_later_are_refused_by_the_config(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(environ={variable: value})
    assert load_config(environ={"PATCHRIG__FRAMES__STALE_AFTER_S": "10", "PATCHRIG__SIMULATION__SEED": "0"})


def test_two_channels_on_one_manipulator_and_one_endpoint_for_both_servers_are_refused() -> None:
    base = load_config(environ={})
    data = base.model_dump(mode="json")
    sensapex = [c for c in data["channels"] if c["driver"] == "sensapex"]
    assert len(sensapex) >= 2
    sensapex[1]["sensapex"] = dict(sensapex[0]["sensapex"])
    from config.loader import config_from_mapping

    with pytest.raises(ConfigError, match="same Sensapex device"):
        config_from_mapping(data)
    data = base.model_dump(mode="json")
    data["server"]["telemetry_endpoint"] = data["server"]["command_endpoint"]
    with pytest.raises(ConfigError, match="must differ"):
        config_from_mapping(data)


def test_env_overrides_that_do_not_reach_a_key_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="'min_um' is not a section"):
        load_config(environ={"PATCHRIG__CHANNELS__A__LIMITS__MIN_UM__X": "1"})
    with pytest.raises(ConfigError, match="name a channel and one of its keys"):
        load_config(environ={"PATCHRIG__CHANNELS__A": "1"})


def test_the_configs_log_level_applies_unless_the_command_line_gives_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse
    import logging

    import rig.simrig
    from rig import cmd_run
    from rig.logs import configure_logging

    path = _write(tmp_path, default_config_path().read_text().replace("[rig]", "log_level = \"WARNING\"\n\n[rig]", 1))

    class ConfigLoaded(Exception):
        pass

    def stop_here(_cfg: object) -> bool:
        raise ConfigLoaded

    monkeypatch.setattr(rig.simrig, "needs_simulation", stop_here)  # nothing after the config runs
    try:
        for given, expected in ((None, logging.WARNING), ("ERROR", logging.ERROR)):
            configure_logging(given or "INFO")  # what rig.cli.main did first
            args = argparse.Namespace(config=path, calibration_dir=None, localiser=None,
                                      log_level_from_command_line=given, log_json_from_command_line=False)
            with pytest.raises(ConfigLoaded):
                cmd_run.run(args)
            assert logging.getLogger().getEffectiveLevel() == expected
    finally:
        configure_logging("INFO")


def test_channel_names_differing_only_in_case_are_refused() -> None:
    data = load_config(environ={}).model_dump(mode="json")
    data["channels"][1]["name"] = data["channels"][0]["name"].lower()
    from config.loader import config_from_mapping

    with pytest.raises(ConfigError, match="unique"):
        config_from_mapping(data)


def test_a_file_that_is_not_utf8_or_nested_too_deeply_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8"):
        load_config(bad, environ={})
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.toml: not valid TOML"):
        load_config(deep, environ={})


def test_a_channel_override_on_a_file_without_channel_tables_is_a_clear_error(tmp_path: Path) -> None:
    odd = _write(tmp_path, 'channels = [1, 2]\n')
    with pytest.raises(ConfigError, match="not a list of \\[\\[channels\\]\\] tables"):
        load_config(odd, environ={"PATCHRIG__CHANNELS__A__MAX_SPEED_UM_S": "5"})


def test_a_simulated_sensapex_on_a_broadcast_address_is_refused_up_front() -> None:
    """After discovery the SDK sends its requests unicast, which a simulator bound to a
    broadcast address never receives: every read then timed out, after pages of SDK tracebacks."""
    from rig.simrig import SimulatedRig

    cfg = load_config(environ={"PATCHRIG__CHANNELS__A__SENSAPEX__ADDRESS": "127.255.255.255"})
    with pytest.raises(ConfigError, match="unicast loopback address"):
        SimulatedRig(cfg).start()


def test_the_z_sign_of_a_channel_is_configurable_and_reaches_the_calibration(tmp_path: Path) -> None:
    """The calibration assumes whether +z moves a 3-axis tip up; the daemon had no way to say."""
    text = (CONFIG_DIR / "example-rig.toml").read_text()
    cfg = load_config(_write(tmp_path, text.replace("z_up_sign = 1 ", "z_up_sign = -1 ")), environ={})
    assert [c.z_up_sign for c in cfg.channels] == [1, -1]
    with pytest.raises(ConfigError, match="z_up_sign"):
        load_config(_write(tmp_path, text.replace("z_up_sign = 1 ", "z_up_sign = 0 ")), environ={})
    from support_daemon import running_daemon

    with running_daemon(["A", "B"], calibration_dir=tmp_path / "cal",
                        channel_keys={"B": {"z_up_sign": -1}}) as rig:
        assert rig.daemon.calibration.z_up_signs == {"A": 1.0, "B": -1.0}
