"""Helpers for the limiter tests: build requests, check the sliding-window promise."""

from __future__ import annotations

import bisect
from typing import Sequence

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter import CounterRequest, Role, WindowSpec
from ratelimit.limiter.keys import counter_key


def counter(
    name: str,
    limit: int,
    *,
    hits: int = 1,
    unit: Unit = Unit.MINUTE,
    algorithm: Algorithm = Algorithm.SLIDING_WINDOW,
    role: Role = Role.ENFORCE,
    domain: str = "tests",
) -> CounterRequest:
    return CounterRequest(
        key=counter_key("rl:", domain, (("name", name),), unit, algorithm),
        limit=limit,
        window=WindowSpec.for_rule(algorithm, unit.seconds),
        hits=hits,
        role=role,
    )


def max_hits_in_any_window(times_ms: Sequence[int], window_ms: int) -> int:
    """The most admissions in any closed interval [t, t + window_ms]."""
    ordered = sorted(times_ms)
    best = 0
    for i, start in enumerate(ordered):
        end = bisect.bisect_right(ordered, start + window_ms)
        best = max(best, end - i)
    return best
