"""What the benchmark asks: the limits config, and the requests of each scenario.

Every contender sees the same rules: the project reads them as YAML, the naive baseline
from `NAIVE_LIMITS`. Values carry a per-phase salt so each phase starts on fresh counters.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from ratelimit.client import build_request
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2

DOMAIN = "bench"
DISTINCT_KEYS = 100_000
HUGE_LIMIT = 1_000_000_000
HOT_LIMIT_PER_MINUTE = 1000
USER_LIMIT_PER_MINUTE = 1000

CONFIG_YAML = f"""\
# Benchmark limits: written by scripts/bench for the phase's server.
domain: {DOMAIN}
descriptors:
  - key: bench_one            # never over: every request charges the counter
    rate_limit: {{unit: second, requests_per_unit: {HUGE_LIMIT}}}
  - key: bench_a
    rate_limit: {{unit: second, requests_per_unit: {HUGE_LIMIT}}}
  - key: bench_b
    rate_limit: {{unit: second, requests_per_unit: {HUGE_LIMIT}}}
  - key: bench_c
    rate_limit: {{unit: second, requests_per_unit: {HUGE_LIMIT}}}
  - key: bench_d
    rate_limit: {{unit: second, requests_per_unit: {HUGE_LIMIT}}}
  - key: bench_hot            # one key, over its limit after the first {HOT_LIMIT_PER_MINUTE} hits
    rate_limit: {{unit: minute, requests_per_unit: {HOT_LIMIT_PER_MINUTE}}}
  - key: bench_user           # one counter per value: {DISTINCT_KEYS} values
    rate_limit: {{unit: minute, requests_per_unit: {USER_LIMIT_PER_MINUTE}}}
"""

# (requests per unit, unit seconds) by descriptor key: the same rules for the naive baseline.
NAIVE_LIMITS: dict[str, tuple[int, int]] = {
    "bench_one": (HUGE_LIMIT, 1),
    "bench_a": (HUGE_LIMIT, 1),
    "bench_b": (HUGE_LIMIT, 1),
    "bench_c": (HUGE_LIMIT, 1),
    "bench_d": (HUGE_LIMIT, 1),
    "bench_hot": (HOT_LIMIT_PER_MINUTE, 60),
    "bench_user": (USER_LIMIT_PER_MINUTE, 60),
}

SCENARIOS = {
    "1 desc": "one descriptor, never over its limit",
    "4 desc": "four descriptors in one request, never over",
    "hot key": f"every request the same key, {HOT_LIMIT_PER_MINUTE}/minute: over limit after the first hits",
    "100k keys": f"one descriptor, value drawn from {DISTINCT_KEYS:,} users ({USER_LIMIT_PER_MINUTE}/minute each)",
}


def write_config(directory: Path) -> Path:
    path = directory / "bench-limits.yaml"
    path.write_text(CONFIG_YAML)
    return path


class RequestSource:
    """Builds the requests of one scenario; `next()` is cheap (pre-built where possible)."""

    def __init__(self, scenario: str, salt: str, seed: int) -> None:
        self._random = random.Random(seed)
        self._fixed: rls_pb2.RateLimitRequest | None = None
        self._pool: Sequence[rls_pb2.RateLimitRequest] = ()
        if scenario == "1 desc":
            self._fixed = build_request(DOMAIN, [[("bench_one", salt)]])
        elif scenario == "4 desc":
            self._fixed = build_request(DOMAIN, [[(key, salt)] for key in ("bench_a", "bench_b", "bench_c", "bench_d")])
        elif scenario == "hot key":
            self._fixed = build_request(DOMAIN, [[("bench_hot", salt)]])
        elif scenario == "100k keys":
            # Serialising 100k messages up front costs seconds; build on demand instead.
            self._salt = salt
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
        self._scenario = scenario

    def next(self) -> rls_pb2.RateLimitRequest:
        if self._fixed is not None:
            return self._fixed
        user = self._random.randrange(DISTINCT_KEYS)
        return build_request(DOMAIN, [[("bench_user", f"{self._salt}-u{user}")]])
