"""Rig configuration: pydantic models, TOML loading with environment overrides, shipped profiles."""

from config.loader import default_config_path, load_config
from config.models import RigConfig

__all__ = ["RigConfig", "default_config_path", "load_config"]
