"""Typed configuration: schema (dataclasses), loading (YAML + overrides), validation."""

from chunkflow.config.loader import ConfigError, apply_overrides, dump_config, load_config
from chunkflow.config.schema import Config
from chunkflow.config.validate import validate_config, validate_layout

__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "dump_config",
    "load_config",
    "validate_config",
    "validate_layout",
]
