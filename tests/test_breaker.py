"""The circuit breaker fails fast while the store is down and recovers without a restart."""

from __future__ import annotations

import asyncio
import time
from typing import Sequence

import pytest

from ratelimit.limiter import Backend, BackendError, CounterRequest, Decision
from ratelimit.limiter.breaker import CircuitBreaker, CircuitState
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.redis_backend import RedisBackend
from tests.limiter_cases import counter
from tests.support.processes import running_redis


class FlakyStore(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        self.calls += 1
        if self.down:
            raise BackendError("connection", "refused")
        return await super().evaluate(requests)


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_probes_once_and_closes_on_success() -> None:
    store, clock = FlakyStore(), ManualClock()
    breaker = CircuitBreaker(store, failure_threshold=3, cooldown_s=0.5, clock_s=clock)

    async def scenario() -> None:
        store.down = True
        for _ in range(3):
            with pytest.raises(BackendError) as failed:
                await breaker.evaluate([counter("b", 5)])
            assert failed.value.kind == "connection"
        assert breaker.state is CircuitState.OPEN
        for _ in range(10):
            with pytest.raises(BackendError) as fast:
                await breaker.evaluate([counter("b", 5)])
            assert fast.value.kind == "circuit_open"
        assert store.calls == 3  # the store was not asked while open
        clock.now += 0.5
        with pytest.raises(BackendError):
            await breaker.evaluate([counter("b", 5)])  # the probe fails: open again
        assert store.calls == 4 and breaker.state is CircuitState.OPEN
        store.down = False
        clock.now += 0.5
        assert (await breaker.evaluate([counter("b", 5)])).admitted
        assert breaker.state is CircuitState.CLOSED

    asyncio.run(scenario())


def test_a_success_resets_the_failure_count() -> None:
    store = FlakyStore()
    breaker = CircuitBreaker(store, failure_threshold=3)

    async def scenario() -> None:
        for _ in range(5):
            store.down = True
            for _ in range(2):
                with pytest.raises(BackendError):
                    await breaker.evaluate([counter("r", 50)])
            store.down = False
            await breaker.evaluate([counter("r", 50)])
        assert breaker.state is CircuitState.CLOSED

    asyncio.run(scenario())


def test_decisions_resume_within_a_second_of_redis_coming_back() -> None:
    with running_redis() as server:
        port = server.port

        async def scenario() -> float:
            backend: Backend = CircuitBreaker(RedisBackend(server.url, timeout_s=0.05), cooldown_s=0.5)
            assert (await backend.evaluate([counter("up", 100)])).admitted
            server.stop()
            failures = 0
            for _ in range(20):
                try:
                    await backend.evaluate([counter("up", 100)])
                except BackendError:
                    failures += 1
            assert failures == 20
            with running_redis(port):
                back_at = time.monotonic()
                while time.monotonic() - back_at < 3:
                    try:
                        await backend.evaluate([counter("up", 100)])
                        break
                    except BackendError:
                        await asyncio.sleep(0.01)
                recovered_after = time.monotonic() - back_at
            await backend.close()
            return recovered_after

        assert asyncio.run(scenario()) < 1.0
