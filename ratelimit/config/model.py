"""The immutable rule tree that a limits config loads into, and what a lookup returns.

The loader (`config.loader`) builds these; the matcher (`config.matcher`) walks them;
the service reads `RateLimitRule` and `Match` and nothing else of the config package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


class Unit(enum.IntEnum):
    """Mirrors envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit numbers."""

    UNKNOWN = 0
    SECOND = 1
    MINUTE = 2
    HOUR = 3
    DAY = 4
    MONTH = 5
    YEAR = 6
    WEEK = 7

    @property
    def seconds(self) -> int:
        return UNIT_SECONDS[self]


# Month and year are fixed lengths, as in envoyproxy/ratelimit (30 and 365 days).
UNIT_SECONDS: Mapping[Unit, int] = MappingProxyType(
    {
        Unit.SECOND: 1,
        Unit.MINUTE: 60,
        Unit.HOUR: 3600,
        Unit.DAY: 86400,
        Unit.WEEK: 7 * 86400,
        Unit.MONTH: 30 * 86400,
        Unit.YEAR: 365 * 86400,
    }
)


# The units a config may name, shortest first: for error messages and flag choices.
UNIT_NAMES: tuple[str, ...] = tuple(unit.name.lower() for unit in sorted(UNIT_SECONDS, key=UNIT_SECONDS.__getitem__))


class Algorithm(enum.StrEnum):
    """`rate_limit.algorithm`: this project's additive config key."""

    SLIDING_WINDOW = "sliding_window"
    FIXED_WINDOW = "fixed_window"


@dataclass(frozen=True)
class RateLimitRule:
    """One `rate_limit` block of the config, with the flags of the descriptor that owns it.

    `full_key` is the stats key of the descriptor node, e.g. "test-domain.key1_value1.subkey1".
    """

    full_key: str
    requests_per_unit: int = 0
    unit: Unit = Unit.UNKNOWN
    unlimited: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    shadow_mode: bool = False
    quota_mode: bool = False
    detailed_metric: bool = False
    algorithm: Algorithm = Algorithm.SLIDING_WINDOW
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Match:
    """What a request descriptor resolves to.

    - `rule`: the limit that applies (for a request override, a synthesized rule).
    - `stats_key`: the metric key envoyproxy/ratelimit would report, e.g.
      "test-domain.key1_value1.subkey1"; `stats_key_parts` is the same split per level
      (domain excluded), so metric labels never need to re-split on "." or "_".
    - `counter_entries`: the (key, value) pairs that identify the counter: the request's
      entries, except that a wildcard node with share_threshold contributes its pattern
      (so all matching values share one counter).
    """

    rule: RateLimitRule
    stats_key: str
    stats_key_parts: tuple[str, ...]
    counter_entries: tuple[tuple[str, str], ...]
    share_threshold_patterns: tuple[str, ...] | None = field(default=None)
