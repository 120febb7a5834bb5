"""Load a RigConfig from TOML, with environment overrides.

Overrides: ``PATCHRIG__SECTION__KEY=value`` sets ``[section] key``; the value is parsed as
TOML when it can be (numbers, booleans, arrays, quoted strings), else taken as a string.
Example: ``PATCHRIG__SERVER__COMMAND_ENDPOINT=tcp://127.0.0.1:6000``. Channel entries are
addressed by name: ``PATCHRIG__CHANNELS__A__MAX_SPEED_UM_S=500``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from config.models import RigConfig
from rig.errors import ConfigError

ENV_PREFIX = "PATCHRIG__"


def default_config_path() -> Path:
    """The shipped simulated quad-rig profile, ``config/sim.toml``."""
    return Path(__file__).with_name("sim.toml")


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_override(data: dict[str, Any], keys: list[str], value: Any, var: str) -> None:
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if key == "channels":
            if len(keys) < i + 3:
                raise ConfigError(f"{var}: name a channel and one of its keys, as in "
                                  f"{ENV_PREFIX}CHANNELS__A__MAX_SPEED_UM_S=500")
            name = keys[i + 1]
            channels = node.get("channels", [])
            if not isinstance(channels, list) or not all(isinstance(c, dict) for c in channels):
                raise ConfigError(f"{var}: 'channels' in the file is not a list of [[channels]] tables")
            matches = [c for c in channels if c.get("name") == name]
            if not matches:
                raise ConfigError(f"{var}: no channel named {name!r}")
            node = matches[0]
            rest = keys[i + 2 :]
            for k in rest[:-1]:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{var}: {k!r} is not a section")
            node[rest[-1]] = value
            return
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{var}: {key!r} is not a section")
    node[keys[-1]] = value


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply every ``PATCHRIG__A__B=v`` variable of ``environ`` to ``data`` (in place)."""
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in var[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            raise ConfigError(f"{var}: empty override path")
        if keys[0] == "channels" and len(keys) >= 2:  # channel names keep their case
            keys = ["channels", var[len(ENV_PREFIX) :].split("__")[1], *keys[2:]]
        _apply_override(data, keys, _parse_env_value(raw), var)
    return data


def _location(loc: tuple[Any, ...], data: Mapping[str, Any] | None) -> str:
    """``channels.0.max_speed_um_s`` -> ``channels[A].max_speed_um_s`` when channel 0 is named A."""
    parts = [str(p) for p in loc]
    if data is not None and len(loc) >= 2 and loc[0] == "channels" and isinstance(loc[1], int):
        channels = data.get("channels")
        if isinstance(channels, list) and 0 <= loc[1] < len(channels):
            entry = channels[loc[1]]
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                parts[0:2] = [f"channels[{entry['name']}]"]
    return ".".join(parts) or "(top level)"


def _format_validation_error(
    exc: ValidationError, source: str, data: Mapping[str, Any] | None = None
) -> str:
    parts = []
    for err in exc.errors():
        loc = _location(tuple(err["loc"]), data)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"{source}: invalid configuration: " + "; ".join(parts)


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> RigConfig:
    """Validate an already parsed mapping; errors name the key (channels by name) and ``source``."""
    try:
        return RigConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, data)) from None


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> RigConfig:
    """Read ``path`` (default: the shipped ``sim.toml``), apply env overrides, validate."""
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{file}: not valid TOML: nested too deeply") from None
    environ = os.environ if environ is None else environ
    apply_env_overrides(data, environ)
    overrides = sorted(var for var in environ if var.startswith(ENV_PREFIX))
    source = str(file) if not overrides else f"{file} (with environment overrides {', '.join(overrides)})"
    return config_from_mapping(data, source)
