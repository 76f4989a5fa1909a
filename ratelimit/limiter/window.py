"""Window arithmetic shared by the backends: bucket layout, admission and reset times.

A counter is a map from bucket index (absolute: `now_ms // bucket_ms`) to hits.

- sliding_window: a unit of W ms is cut into K = BUCKETS_PER_WINDOW buckets of W/K ms,
  and a decision counts the K+1 most recent buckets (the current one included). Any
  interval of length W that ends now lies inside those K+1 buckets, so counting them all
  is conservative: no interval of length W ever holds more than the limit. Under a steady
  over-limit load the K+1 buckets span W + W/K, so at least K/(K+1) of the limit is
  admitted per unit (97.6% with K = 40). Memory is at most K+1 integers per counter,
  whatever the limit.
- fixed_window: one bucket of W ms aligned to the Unix epoch, as envoyproxy/ratelimit.

`evaluate_counter` is the reference for `lua/evaluate.lua`; the two must agree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

from ratelimit.config.model import Algorithm

BUCKETS_PER_WINDOW = 40


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """How one counter's hits are bucketed: `span` buckets of `bucket_ms` are counted."""

    bucket_ms: int
    span: int

    @classmethod
    @functools.cache  # a handful of (algorithm, unit) pairs; called for every descriptor
    def for_rule(cls, algorithm: Algorithm, unit_seconds: int) -> WindowSpec:
        window_ms = unit_seconds * 1000
        if algorithm is Algorithm.FIXED_WINDOW:
            return cls(bucket_ms=window_ms, span=1)
        return cls(bucket_ms=window_ms // BUCKETS_PER_WINDOW, span=BUCKETS_PER_WINDOW + 1)

    def current_bucket(self, now_ms: int) -> int:
        return now_ms // self.bucket_ms

    def first_counted_bucket(self, now_ms: int) -> int:
        return self.current_bucket(now_ms) - self.span + 1

    def leaves_window_at_ms(self, bucket: int) -> int:
        """The instant from which `bucket` is no longer counted."""
        return (bucket + self.span) * self.bucket_ms


@dataclass(frozen=True, slots=True)
class CounterCheck:
    over_limit: bool
    used: int  # hits counted before this request


def prune(buckets: dict[int, int], spec: WindowSpec, now_ms: int) -> None:
    """Drop buckets that left the window (mirrors the script's HDEL)."""
    first = spec.first_counted_bucket(now_ms)
    for stale in [index for index in buckets if index < first]:
        del buckets[stale]


def charged_bucket(buckets: Mapping[int, int], spec: WindowSpec, now_ms: int) -> int:
    """The bucket admitted hits go to: the current one, or the newest held if the clock stepped
    back (a counter's clock never goes back: the hits then leave later, never sooner)."""
    return max(spec.current_bucket(now_ms), max(buckets, default=0))


def check(buckets: Mapping[int, int], limit: int, need: int) -> CounterCheck:
    """Whether `need` more hits fit; buckets must be pruned. Future buckets (clock steps back) count."""
    used = sum(buckets.values())
    return CounterCheck(over_limit=used + need > limit, used=used)


def reset_ms(
    buckets: Mapping[int, int],
    spec: WindowSpec,
    now_ms: int,
    limit: int,
    need: int,
    over_limit: bool,
) -> int:
    """The wait promised by a status (see CounterResult.reset_ms), from the buckets as they
    were before this request: over the limit, until `need` hits fit; otherwise until the
    oldest counted hit leaves (or, with none, until a hit made now would).

    Measured from `now_ms` exactly, for fixed windows too: rounded up to whole seconds (as the
    server reports it) this is the reset envoyproxy/ratelimit reports, and the over-limit cache
    needs the exact instant (measured from the whole second, a cached "full" would outlive the
    window)."""
    reference = now_ms
    ordered = sorted(index for index, count in buckets.items() if count > 0)
    if not ordered:
        return spec.leaves_window_at_ms(spec.current_bucket(now_ms)) - reference
    if not over_limit:
        return spec.leaves_window_at_ms(ordered[0]) - reference
    running = sum(buckets[index] for index in ordered)
    for index in ordered:
        running -= buckets[index]
        if running + need <= limit:
            return spec.leaves_window_at_ms(index) - reference
    # More hits than the limit never fit; promise only what we know: a clear window.
    return spec.leaves_window_at_ms(max(ordered[-1], spec.current_bucket(now_ms))) - reference
