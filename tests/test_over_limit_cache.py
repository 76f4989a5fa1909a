"""The over-limit cache answers exactly what the store would, without asking it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter import CounterRequest, CounterResult, Decision, Role
from ratelimit.limiter.cache import OverLimitCache
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.redis_backend import RedisBackend
from tests.limiter_cases import counter

START_MS = 1_700_000_000_000


class ManualClock:
    def __init__(self) -> None:
        self.now_ms = START_MS

    def ms(self) -> int:
        return self.now_ms

    def seconds(self) -> float:
        return self.now_ms / 1000


class CountingBackend(MemoryBackend):
    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock.ms)
        self.calls = 0

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        self.calls += 1
        return await super().evaluate(requests)


def cached_pair() -> tuple[ManualClock, CountingBackend, OverLimitCache]:
    clock = ManualClock()
    store = CountingBackend(clock)
    return clock, store, OverLimitCache(store, clock_s=clock.seconds)


def test_a_full_counter_is_answered_locally_until_its_reset_then_the_store_admits() -> None:
    clock, store, cache = cached_pair()
    request = counter("c", 2, unit=Unit.SECOND)

    async def scenario() -> None:
        for _ in range(2):
            assert (await cache.evaluate([request])).admitted
        rejected = await cache.evaluate([request])
        assert not rejected.admitted
        calls = store.calls
        reset_ms = rejected.results[0].reset_ms
        for step in range(5):
            clock.now_ms += 10
            local = await cache.evaluate([request])
            assert not local.admitted and local.results[0].over_limit
            assert local.results[0].remaining(2) == 0
            assert local.results[0].reset_ms == reset_ms - 10 * (step + 1)
        assert store.calls == calls  # not asked
        clock.now_ms += reset_ms - 50
        assert (await cache.evaluate([request])).admitted  # exactly when the store admits again
        assert store.calls == calls + 1

    asyncio.run(scenario())


def test_requests_the_cache_cannot_answer_exactly_go_to_the_store() -> None:
    _clock, store, cache = cached_pair()
    full = counter("full", 1)

    async def scenario() -> None:
        await cache.evaluate([full])
        await cache.evaluate([full])  # now known full
        calls = store.calls
        for request in (
            [counter("full", 1, hits=2)],  # reset for 2 hits differs
            [counter("full", 1, hits=0)],  # check only: the store knows the exact count
            [counter("full", 1, role=Role.SHADOW)],
            [counter("full", 1, role=Role.QUOTA)],
            [full, counter("other", 5)],  # the other counter's status is unknown here
            [counter("full", 3)],  # same key, another limit (an override)
            [full, full],  # named twice: the second's answer depends on the first's hit
            [counter("zero", 0)],  # never met: its reset moves with the clock
        ):
            await cache.evaluate(request)
        assert store.calls == calls + 8

    asyncio.run(scenario())


# A small config: each counter has one limit, unit, algorithm and role, as a rule does.
# "shared" is named by two descriptors of a request when it is picked twice (share_threshold).
POOL = (
    ("a", 1, Unit.SECOND, Algorithm.SLIDING_WINDOW, Role.ENFORCE),
    ("b", 3, Unit.SECOND, Algorithm.FIXED_WINDOW, Role.ENFORCE),
    ("c", 2, Unit.MINUTE, Algorithm.SLIDING_WINDOW, Role.ENFORCE),
    ("d", 5, Unit.MINUTE, Algorithm.FIXED_WINDOW, Role.ENFORCE),
    ("shared", 2, Unit.SECOND, Algorithm.SLIDING_WINDOW, Role.ENFORCE),
    ("shadow", 1, Unit.SECOND, Algorithm.SLIDING_WINDOW, Role.SHADOW),
    ("quota", 2, Unit.SECOND, Algorithm.FIXED_WINDOW, Role.QUOTA),
    ("zero", 0, Unit.SECOND, Algorithm.SLIDING_WINDOW, Role.ENFORCE),
)

descriptor_choice = st.tuples(
    st.integers(0, len(POOL) - 1),
    st.sampled_from(("one", "one", "one", "zero", "two", "over")),  # hits: 1, 0, 2, limit + 1
)
step = st.tuples(st.integers(0, 700), st.lists(descriptor_choice, min_size=1, max_size=4))


def pool_request(index: int, hits_kind: str) -> CounterRequest:
    name, limit, unit, algorithm, role = POOL[index]
    hits = {"one": 1, "zero": 0, "two": 2, "over": limit + 1}[hits_kind]
    return counter(name, limit, hits=hits, unit=unit, algorithm=algorithm, role=role)


@settings(max_examples=300, deadline=None)
@given(start_ms=st.integers(0, 999), steps=st.lists(step, min_size=1, max_size=120))
def test_cached_and_uncached_decisions_are_identical(start_ms: int, steps: list[tuple[int, list[Any]]]) -> None:
    """Random sequences with duplicates, shared counters, multi-hit, zero-hit, shadow, quota,
    fixed and sliding windows: with the cache on, every answer is the store's own."""
    plain_clock, cached_clock = ManualClock(), ManualClock()
    plain_clock.now_ms += start_ms
    cached_clock.now_ms += start_ms
    plain = MemoryBackend(plain_clock.ms)
    cache = OverLimitCache(MemoryBackend(cached_clock.ms), clock_s=cached_clock.seconds)

    async def scenario() -> None:
        for gap_ms, picks in steps:
            plain_clock.now_ms += gap_ms
            cached_clock.now_ms += gap_ms
            request = [pool_request(index, hits) for index, hits in picks]
            expected, got = await plain.evaluate(request), await cache.evaluate(request)
            assert got.admitted == expected.admitted
            assert got.results == expected.results  # over_limit, used and reset_ms, exactly

    asyncio.run(scenario())


def test_a_counter_named_twice_is_refused_without_poisoning_the_cache() -> None:
    """Attack 1: limit 1; one request names the counter twice (or two descriptors share one
    share_threshold counter). Refused, nothing charged, and the next single request is
    answered as without the cache: admitted."""
    _clock, store, cache = cached_pair()
    bob = counter("bob", 1)

    async def scenario() -> None:
        twice = await cache.evaluate([bob, bob])
        assert not twice.admitted
        assert store.raw_buckets(bob.key) == {}  # nothing charged
        assert len(cache) == 0
        assert (await cache.evaluate([bob])).admitted

    asyncio.run(scenario())


def test_a_refused_multi_hit_request_does_not_make_the_counter_look_full() -> None:
    _clock, _store, cache = cached_pair()

    async def scenario() -> None:
        assert not (await cache.evaluate([counter("big", 3, hits=4)])).admitted
        assert (await cache.evaluate([counter("big", 3)])).admitted

    asyncio.run(scenario())


def test_a_full_fixed_window_is_cached_until_the_window_ends_not_a_second_later() -> None:
    """Attack 4: a 2/s fixed window refused at ms 701 of a second is admitted again at ms
    1000 by the store, and so by the cache."""
    clock, store, cache = cached_pair()
    clock.now_ms = START_MS - START_MS % 1000 + 701
    request = counter("fixed", 2, unit=Unit.SECOND, algorithm=Algorithm.FIXED_WINDOW)

    async def scenario() -> None:
        for _ in range(2):
            assert (await cache.evaluate([request])).admitted
        refused = await cache.evaluate([request])
        assert not refused.admitted
        assert refused.results[0].reset_ms == 299  # exactly until the window ends
        clock.now_ms += 298
        assert not (await cache.evaluate([request])).admitted
        calls = store.calls
        clock.now_ms += 1  # the next window
        assert (await cache.evaluate([request])).admitted
        assert store.calls == calls + 1

    asyncio.run(scenario())


def test_eviction_is_constant_time_with_many_distinct_full_counters() -> None:
    """Attack 3: 150,000 distinct full counters through a cache of 100,000 entries. Evicting by
    deleting a plain dict's first key again and again rescanned its dead slots: single calls
    took seconds. Every call here stays far below Envoy's timeout, and the size stays capped."""
    clock, _store, cache = cached_pair()
    slowest = 0.0

    async def scenario() -> None:
        nonlocal slowest
        for index in range(150_000):
            full = [counter(f"full-{index}", 1)]
            await cache.evaluate(full)  # admitted: now at its limit
            started = time.perf_counter()
            await cache.evaluate(full)  # refused: remembered, evicting the oldest entry
            slowest = max(slowest, time.perf_counter() - started)
            clock.now_ms += 0 if index % 1000 else 1

    asyncio.run(scenario())
    assert len(cache) == 100_000
    assert slowest < 0.1, f"slowest call {slowest * 1000:.1f} ms"


def test_the_cache_in_front_of_redis_keeps_the_promise(redis_url: str) -> None:
    """Seen from Redis (INFO commandstats): of 20 calls, the 3 admitted and the first refusal
    reach it; the other 16 are answered locally."""
    admin = redis.Redis.from_url(redis_url)

    def script_calls() -> int:
        stats = admin.info("commandstats").get("cmdstat_evalsha", {"calls": 0})
        return int(stats["calls"])

    async def scenario() -> None:
        cache = OverLimitCache(RedisBackend(redis_url, timeout_s=1.0))
        await cache.evaluate([counter("warm-up", 3, unit=Unit.SECOND)])  # connected, script loaded
        request = counter("redis-cached", 3, unit=Unit.SECOND)
        before = script_calls()
        admitted = 0
        for _ in range(20):
            admitted += (await cache.evaluate([request])).admitted
        assert admitted == 3
        assert script_calls() - before == 4
        rejected = await cache.evaluate([request])
        await asyncio.sleep(rejected.results[0].reset_ms / 1000)
        assert (await cache.evaluate([request])).admitted
        await cache.close()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def full_counter_in(cache: OverLimitCache, name: str) -> CounterRequest:
    """A counter with limit 1, filled and then refused once: the cache knows it is full."""
    request = counter(name, 1)
    asyncio.run(cache.evaluate([request]))
    assert not asyncio.run(cache.evaluate([request])).admitted
    return request


def asks_the_store(store: CountingBackend, cache: OverLimitCache, request: list[CounterRequest]) -> bool:
    before = store.calls
    asyncio.run(cache.evaluate(request))
    return store.calls > before


def test_a_request_of_several_counters_all_known_full_is_answered_locally() -> None:
    _clock, store, cache = cached_pair()
    first, second = full_counter_in(cache, "first"), full_counter_in(cache, "second")
    assert not asks_the_store(store, cache, [first, second])


def test_when_full_the_oldest_entry_goes_and_one_entry_is_enough() -> None:
    clock, store, _ = cached_pair()
    cache = OverLimitCache(store, max_entries=1, clock_s=clock.seconds)
    old = full_counter_in(cache, "old")
    new = full_counter_in(cache, "new")
    assert len(cache) == 1
    assert not asks_the_store(store, cache, [new])
    assert asks_the_store(store, cache, [old])


def test_a_counter_refused_again_is_the_newest_entry() -> None:
    """Refused by the store once more (here beside a counter the cache does not know), a known
    counter moves to the end of the eviction order: the entry evicted next is another one."""
    clock, store, _ = cached_pair()
    cache = OverLimitCache(store, max_entries=2, clock_s=clock.seconds)
    a, b = full_counter_in(cache, "a"), full_counter_in(cache, "b")
    assert asks_the_store(store, cache, [a, counter("roomy", 100)])  # refused because of a
    full_counter_in(cache, "c")  # evicts the oldest: b
    assert not asks_the_store(store, cache, [a])
    assert asks_the_store(store, cache, [b])


def test_an_expired_entry_is_dropped_when_met() -> None:
    clock, _store, cache = cached_pair()
    full = full_counter_in(cache, "expires")
    assert len(cache) == 1
    clock.now_ms += 60_000 + 60_000 // 40  # every hit has left the window
    assert asyncio.run(cache.evaluate([full])).admitted
    assert len(cache) == 0


def test_a_cached_reset_is_exact_to_the_last_millisecond() -> None:
    clock, store, cache = cached_pair()
    full = full_counter_in(cache, "last-ms")
    reset_ms = asyncio.run(store.evaluate([full])).results[0].reset_ms
    clock.now_ms += reset_ms - 1
    local = asyncio.run(cache.evaluate([full]))
    assert not local.admitted and local.results[0].reset_ms == 1
    assert asyncio.run(store.evaluate([full])).results[0].reset_ms == 1  # what the store says too


def test_a_cached_answer_carries_the_store_clock(redis_url: str) -> None:
    """Decision.now_ms is Redis's TIME, for a locally answered request too."""
    admin = redis.Redis.from_url(redis_url)

    def redis_ms() -> int:
        seconds, microseconds = admin.time()
        return int(seconds) * 1000 + int(microseconds) // 1000

    async def scenario() -> None:
        cache = OverLimitCache(RedisBackend(redis_url, timeout_s=1.0))
        try:
            request = counter("clock", 1)
            await cache.evaluate([request])
            await cache.evaluate([request])  # refused by Redis: now known full
            before = redis_ms()
            local = await cache.evaluate([request])
            after = redis_ms()
            # Redis and this process read one machine's clock: equal up to rounding.
            assert before - 2 <= local.now_ms <= after + 2
        finally:
            await cache.close()

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_a_cached_answer_carries_the_store_clock_when_it_is_not_this_machines() -> None:
    """A store an hour ahead of this machine's wall clock (Redis on another host): the answer
    given locally is stamped with the store's time, not with the local time."""
    ahead_ms = 3_600_000
    store = MemoryBackend(lambda: time.time_ns() // 1_000_000 + ahead_ms)
    cache = OverLimitCache(store)
    request = counter("elsewhere", 1)

    async def scenario() -> tuple[int, Decision, int]:
        await cache.evaluate([request])
        assert not (await cache.evaluate([request])).admitted  # now known full
        before = time.time_ns() // 1_000_000 + ahead_ms
        local = await cache.evaluate([request])
        return before, local, time.time_ns() // 1_000_000 + ahead_ms

    before, local, after = asyncio.run(scenario())
    assert not local.admitted
    assert before - 2 <= local.now_ms <= after + 2


class AlwaysFull(MemoryBackend):
    """A store that finds every counter over its limit, with a minute to wait."""

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        results = tuple(CounterResult(over_limit=True, used=r.limit, reset_ms=60_000) for r in requests)
        return Decision(admitted=False, now_ms=self._clock_ms(), results=results)


def test_the_default_bound_is_the_readmes_100000_entries() -> None:
    cache = OverLimitCache(AlwaysFull())

    async def fill() -> None:
        for index in range(100_001):
            await cache.evaluate([counter(f"bound-{index}", 1)])

    asyncio.run(fill())
    assert len(cache) == 100_000  # README, "Memory bounds": --over-limit-cache-entries (100,000)


def test_a_counter_with_a_limit_of_zero_is_never_answered_from_the_cache() -> None:
    """A limit of 0 refuses every request, and its reset ("until a hit made now would leave")
    moves with the clock: a remembered one would shrink. The store answers each time."""
    clock, store, cache = cached_pair()
    closed = counter("closed", 0)
    assert not asyncio.run(cache.evaluate([closed])).admitted
    clock.now_ms += 10_000
    assert asks_the_store(store, cache, [closed])
    later = asyncio.run(cache.evaluate([closed]))
    assert later.results[0].reset_ms == asyncio.run(store.evaluate([closed])).results[0].reset_ms
