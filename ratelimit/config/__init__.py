"""Limits config: envoyproxy/ratelimit's YAML format, loaded, validated and matched.

`load_config` reads files or directories into an immutable `RateLimitConfig`;
`RateLimitConfig.lookup` resolves one request descriptor to a `Match` (or None);
`check_config` is the one validator: every error of every file, with file, line and key
(`load_config` raises them as one `InvalidConfig`, `validate_paths` returns them).
"""

from __future__ import annotations

from ratelimit.config.errors import ConfigError, InvalidConfig
from ratelimit.config.loader import (
    CONFIG_SUFFIXES,
    check_config,
    discover_config_files,
    load_config,
    validate_paths,
)
from ratelimit.config.matcher import RateLimitConfig
from ratelimit.config.model import UNIT_NAMES, UNIT_SECONDS, Algorithm, Match, RateLimitRule, Unit
from ratelimit.config.parser import VALID_KEYS

__all__ = [
    "CONFIG_SUFFIXES",
    "UNIT_NAMES",
    "UNIT_SECONDS",
    "VALID_KEYS",
    "Algorithm",
    "ConfigError",
    "InvalidConfig",
    "Match",
    "RateLimitConfig",
    "RateLimitRule",
    "Unit",
    "check_config",
    "discover_config_files",
    "load_config",
    "validate_paths",
]
