"""The over-limit cache answers exactly what the store would, without asking it."""

from __future__ import annotations

import asyncio
from typing import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.config.model import Unit
from ratelimit.limiter import CounterRequest, Decision, Role
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
        ):
            await cache.evaluate(request)
        assert store.calls == calls + 6
        await cache.evaluate([full, full])
        assert store.calls == calls + 6

    asyncio.run(scenario())


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 120), min_size=1, max_size=200),
    limits=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    picks=st.lists(st.integers(0, 2), min_size=200, max_size=200),
)
def test_cached_and_uncached_decisions_are_identical(gaps: list[int], limits: list[int], picks: list[int]) -> None:
    plain_clock, cached_clock = ManualClock(), ManualClock()
    plain = MemoryBackend(plain_clock.ms)
    cache = OverLimitCache(MemoryBackend(cached_clock.ms), clock_s=cached_clock.seconds)

    async def scenario() -> None:
        for gap, pick in zip(gaps, picks):
            plain_clock.now_ms += gap
            cached_clock.now_ms += gap
            limit = limits[pick % len(limits)]
            request = [counter(f"k{pick % len(limits)}", limit, unit=Unit.SECOND)]
            expected, got = await plain.evaluate(request), await cache.evaluate(request)
            assert got.admitted == expected.admitted
            assert got.results[0].over_limit == expected.results[0].over_limit
            assert got.results[0].remaining(limit) == expected.results[0].remaining(limit)
            assert got.results[0].reset_ms <= expected.results[0].reset_ms

    asyncio.run(scenario())


def test_the_cache_in_front_of_redis_keeps_the_promise(redis_url: str) -> None:
    async def scenario() -> None:
        cache = OverLimitCache(RedisBackend(redis_url, timeout_s=1.0))
        request = counter("redis-cached", 3, unit=Unit.SECOND)
        admitted = 0
        for _ in range(20):
            admitted += (await cache.evaluate([request])).admitted
        assert admitted == 3
        assert cache.hits >= 15
        rejected = await cache.evaluate([request])
        await asyncio.sleep(rejected.results[0].reset_ms / 1000)
        assert (await cache.evaluate([request])).admitted
        await cache.close()

    asyncio.run(scenario())
