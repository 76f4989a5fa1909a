"""An in-process counter store with the same semantics as the Redis backend.

For unit tests and single-replica development (`--backend memory`); counters are not
shared between processes. The clock is injectable so tests can place hits exactly.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from ratelimit.limiter import window
from ratelimit.limiter.types import Backend, CounterRequest, CounterResult, Decision, admits

SWEEP_INTERVAL_MS = 1000


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryBackend(Backend):
    def __init__(self, clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._clock_ms = clock_ms
        self._counters: dict[str, dict[int, int]] = {}
        self._expiry_ms: dict[str, int] = {}
        self._next_sweep_ms = 0

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        return self.evaluate_now(requests)

    def evaluate_now(self, requests: Sequence[CounterRequest]) -> Decision:
        """Synchronous core: no await in between, so a decision is atomic."""
        now_ms = self._clock_ms()
        self._sweep_expired(now_ms)
        counters = [self._live_counter(request.key, now_ms) for request in requests]
        # Hits that earlier counters of this request put on the same key (a request may
        # name one counter twice): they must fit together.
        planned: dict[str, int] = {}
        checks, resets, through = [], [], []
        for request, buckets in zip(requests, counters):
            window.prune(buckets, request.window, now_ms)
            earlier = planned.get(request.key, 0)
            planned[request.key] = earlier + request.hits
            through.append(earlier + request.hits)
            counter_check = window.check(buckets, request.limit, earlier + request.hits)
            checks.append(counter_check)
            resets.append(
                window.reset_ms(
                    buckets, request.window, now_ms, request.limit, earlier + request.hits, counter_check.over_limit
                )
            )
        admitted = admits([r.role for r in requests], [c.over_limit for c in checks])
        results = []
        for request, buckets, counter_check, reset, hits_through in zip(requests, counters, checks, resets, through):
            # Admitted: the count once this request's hits up to this counter are in.
            used = counter_check.used + hits_through if admitted else counter_check.used
            if admitted and request.hits > 0:
                bucket = window.charged_bucket(buckets, request.window, now_ms)
                buckets[bucket] = buckets.get(bucket, 0) + request.hits
                self._expiry_ms[request.key] = request.window.leaves_window_at_ms(bucket)
            results.append(CounterResult(over_limit=counter_check.over_limit, used=used, reset_ms=reset))
        # Only once every mention is charged: a counter named twice shares one dict, and
        # forgetting it after a check-only first mention would drop the later mention's hits.
        for request, buckets in zip(requests, counters):
            if not buckets:
                self._forget(request.key)
        return Decision(admitted=admitted, now_ms=now_ms, results=tuple(results))

    def _live_counter(self, key: str, now_ms: int) -> dict[int, int]:
        if self._expiry_ms.get(key, now_ms + 1) <= now_ms:
            self._forget(key)
        return self._counters.setdefault(key, {})

    def _sweep_expired(self, now_ms: int) -> None:
        # Like Redis TTLs: idle counters go away; swept at most once a second.
        if now_ms < self._next_sweep_ms:
            return
        self._next_sweep_ms = now_ms + SWEEP_INTERVAL_MS
        for key in [key for key, expiry in self._expiry_ms.items() if expiry <= now_ms]:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._counters.pop(key, None)
        self._expiry_ms.pop(key, None)

    def counter_count(self) -> int:
        """How many counters are held (tests check that idle ones are dropped)."""
        return len(self._counters)

    def raw_buckets(self, key: str) -> dict[int, int]:
        return dict(self._counters.get(key, {}))

    async def ping(self) -> None:
        return None
