"""Typed, documented run configuration: `load_config(preset, overrides)`."""

from pipeline.config.loading import (
    ConfigError,
    available_presets,
    config_digest,
    config_from_dict,
    config_from_yaml,
    config_to_dict,
    config_to_yaml,
    describe,
    flatten,
    load_config,
    parse_yaml,
    read_preset,
)
from pipeline.config.settings import Config

__all__ = [
    "Config",
    "ConfigError",
    "available_presets",
    "config_digest",
    "config_from_dict",
    "config_from_yaml",
    "config_to_dict",
    "config_to_yaml",
    "describe",
    "flatten",
    "load_config",
    "parse_yaml",
    "read_preset",
]
