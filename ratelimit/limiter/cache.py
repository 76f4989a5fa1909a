"""An exact local cache of counters known to be over their limit.

When the store rejects a single hit on an enforcing counter, it also says how long the
counter stays full (`reset_ms`, from the store's clock). Until then the counter can
only stay full: its hits leave no earlier, and rejected hits charge nothing. So a request
whose enforcing single-hit counters are all known full gets the store's answer without
asking it. The local deadline starts when the question was *sent*, which is no later than
the store's clock read, so an entry expires at or before the true instant: the cache may
ask the store again early, never answer later than the store would.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

from ratelimit.limiter.types import Backend, CounterRequest, CounterResult, Decision, Role, WrappingBackend

CacheKey = tuple[str, int]  # (counter key, limit): an override with another limit is another entry


class OverLimitCache(WrappingBackend):
    def __init__(
        self,
        inner: Backend,
        *,
        max_entries: int = 100_000,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner)
        self._max_entries = max_entries
        self._clock_s = clock_s
        self._full_until: dict[CacheKey, float] = {}
        self._store_offset_ms = 0  # store clock minus local wall clock, for Decision.now_ms
        self.hits = 0

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        sent_at = self._clock_s()
        cached = self._answer_from_cache(requests, sent_at)
        if cached is not None:
            self.hits += 1
            return cached
        decision = await self._inner.evaluate(requests)
        self._store_offset_ms = decision.now_ms - time.time_ns() // 1_000_000
        for request, result in zip(requests, decision.results):
            if result.over_limit and _cacheable(request):
                self._remember((request.key, request.limit), sent_at + result.reset_ms / 1000)
        return decision

    def _answer_from_cache(self, requests: Sequence[CounterRequest], now_s: float) -> Decision | None:
        """The store's answer when every counter is an enforcing single hit known full."""
        results = []
        for request in requests:
            if not _cacheable(request):
                return None
            full_until = self._full_until.get((request.key, request.limit))
            if full_until is None or full_until <= now_s:
                return None
            results.append(CounterResult(over_limit=True, used=request.limit, reset_ms=_ms_until(full_until, now_s)))
        if not results:
            return None
        now_ms = time.time_ns() // 1_000_000 + self._store_offset_ms
        return Decision(admitted=False, now_ms=now_ms, results=tuple(results))

    def _remember(self, key: CacheKey, until_s: float) -> None:
        if len(self._full_until) >= self._max_entries:
            self._evict(self._clock_s())
        self._full_until[key] = until_s

    def _evict(self, now_s: float) -> None:
        for key in [key for key, until in self._full_until.items() if until <= now_s]:
            del self._full_until[key]
        # Still full of live entries: forget the oldest half; the store stays the truth.
        while len(self._full_until) >= self._max_entries // 2 and self._full_until:
            del self._full_until[next(iter(self._full_until))]

    def __len__(self) -> int:
        return len(self._full_until)


def _ms_until(deadline_s: float, now_s: float) -> int:
    # Rounded up: a reset a fraction of a millisecond short would send the caller back while
    # the counter is still full. (Rounding to the microsecond first absorbs float noise.)
    return max(1, math.ceil(round((deadline_s - now_s) * 1000, 3)))


def _cacheable(request: CounterRequest) -> bool:
    # The store's reset is computed for this request's hits: only a single hit's reset
    # bounds every later request (any hits >= 1 needs at least as much room).
    return request.role is Role.ENFORCE and request.hits == 1
