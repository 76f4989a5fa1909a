"""Limits config: envoyproxy/ratelimit's YAML format, loaded, validated and matched.

`load_config` reads files or directories into an immutable `RateLimitConfig`;
`RateLimitConfig.lookup` resolves one request descriptor to a `Match` (or None);
`validate_paths` lists every file's error for the `validate-config` command.
"""

from __future__ import annotations

from ratelimit.config.errors import ConfigError
from ratelimit.config.loader import (
    CONFIG_SUFFIXES,
    discover_config_files,
    load_config,
    validate_paths,
)
from ratelimit.config.matcher import RateLimitConfig
from ratelimit.config.model import UNIT_SECONDS, Algorithm, Match, RateLimitRule, Unit
from ratelimit.config.parser import VALID_KEYS

__all__ = [
    "CONFIG_SUFFIXES",
    "UNIT_SECONDS",
    "VALID_KEYS",
    "Algorithm",
    "ConfigError",
    "Match",
    "RateLimitConfig",
    "RateLimitRule",
    "Unit",
    "discover_config_files",
    "load_config",
    "validate_paths",
]
