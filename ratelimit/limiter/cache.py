"""An exact local cache of counters known to be over their limit.

When the store rejects a single hit on an enforcing counter that the request names once, the
counter is full by itself: its own hits, before this request, leave no room for one more. The
store also says how long it stays full (`reset_ms`, exact, from the store's clock). Until then
the counter can only stay full: its hits leave no earlier, and rejected hits charge nothing.
So a request whose enforcing single-hit counters are all known full gets the store's answer
without asking it.

Only that verdict is stored. A counter named twice in one request (or two descriptors sharing
one `share_threshold` counter) may be refused because of the request's own hits, and a
multi-hit request because of its own size: those say nothing about the next single request,
so they are never cached, and requests that name a counter twice always go to the store.

The local deadline starts when the question was *sent*, which is no later than the store's
clock read, so an entry expires at or before the true instant: the cache may ask the store
again early, never answer later than the store would.

Memory: at most `max_entries` entries; a key is a fixed-size digest (see `keys`), so an entry
is about 270 bytes (with the default prefix) whatever the request carried. When full, the
oldest entry goes (O(1)); expired entries are dropped when met.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable, Sequence

from ratelimit.limiter.types import Backend, CounterRequest, CounterResult, Decision, Role, WrappingBackend

CacheKey = tuple[str, int]  # (counter key, limit): an override with another limit is another entry
DEFAULT_MAX_ENTRIES = 100_000


class OverLimitCache(WrappingBackend):
    def __init__(
        self,
        inner: Backend,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner)
        if max_entries < 1:
            raise ValueError("--over-limit-cache-entries must be at least 1")
        self._max_entries = max_entries
        self._clock_s = clock_s
        # Insertion order is the eviction order: popitem(last=False) is O(1), where deleting
        # the first key of a plain dict again and again rescans its dead slots (quadratic).
        self._full_until: collections.OrderedDict[CacheKey, float] = collections.OrderedDict()
        self._store_offset_ms = 0  # store clock minus local wall clock, for Decision.now_ms

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        sent_at = self._clock_s()
        cached = self._answer_from_cache(requests, sent_at)
        if cached is not None:
            return cached
        decision = await self._inner.evaluate(requests)
        self._store_offset_ms = decision.now_ms - time.time_ns() // 1_000_000
        if not decision.admitted:  # an enforcing counter over its limit always refuses
            self._remember_full(requests, decision, sent_at)
        return decision

    def _remember_full(self, requests: Sequence[CounterRequest], decision: Decision, sent_at: float) -> None:
        seen: set[str] = set()
        for request, result in zip(requests, decision.results):
            first_mention = request.key not in seen
            seen.add(request.key)
            # A first mention with one hit that is over: the counter's own usage, before this
            # request, is at or over its limit, and reset_ms is the wait for one hit.
            if first_mention and result.over_limit and _cacheable(request):
                self._remember((request.key, request.limit), sent_at + result.reset_ms / 1000)

    def _answer_from_cache(self, requests: Sequence[CounterRequest], now_s: float) -> Decision | None:
        """The store's answer when every counter is an enforcing single hit known full, each named once."""
        if len(requests) > 1 and len({request.key for request in requests}) < len(requests):
            return None  # a counter named twice: the later mentions' answers depend on the earlier hits
        results = []
        for request in requests:
            if not _cacheable(request):
                return None
            cache_key = (request.key, request.limit)
            full_until = self._full_until.get(cache_key)
            if full_until is None:
                return None
            if full_until <= now_s:
                del self._full_until[cache_key]
                return None
            results.append(CounterResult(over_limit=True, used=request.limit, reset_ms=_ms_until(full_until, now_s)))
        if not results:
            return None
        now_ms = time.time_ns() // 1_000_000 + self._store_offset_ms
        return Decision(admitted=False, now_ms=now_ms, results=tuple(results))

    def _remember(self, key: CacheKey, until_s: float) -> None:
        entries = self._full_until
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self._max_entries:
            entries.popitem(last=False)  # the store stays the truth: forgetting is always safe
        entries[key] = until_s

    def __len__(self) -> int:
        return len(self._full_until)


def _ms_until(deadline_s: float, now_s: float) -> int:
    # Rounded up: a reset a fraction of a millisecond short would send the caller back while
    # the counter is still full. (Rounding to the microsecond first absorbs float noise.)
    return max(1, math.ceil(round((deadline_s - now_s) * 1000, 3)))


def _cacheable(request: CounterRequest) -> bool:
    # The store's reset is computed for this request's hits: only a single hit's reset
    # bounds every later request (any hits >= 1 needs at least as much room). A limit of 0
    # is never met, so its reset ("until a hit made now would leave") moves with the clock.
    return request.role is Role.ENFORCE and request.hits == 1 and request.limit > 0
