"""The half-open circuit lets exactly one probe through at a time, and a probe that never
finished (its caller gave up) does not keep the circuit shut for good."""

from __future__ import annotations

import asyncio
from typing import Sequence

import pytest

from ratelimit.limiter import BackendError, CounterRequest, Decision
from ratelimit.limiter.breaker import CircuitBreaker, CircuitState
from ratelimit.limiter.memory import MemoryBackend
from tests.limiter_cases import counter
from tests.test_breaker import ManualClock


class GatedStore(MemoryBackend):
    """Fails while `down`; otherwise each call waits for `gate` (a store that is slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.gate = asyncio.Event()
        self.calls = 0

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        self.calls += 1
        if self.down:
            raise BackendError("connection", "refused")
        await self.gate.wait()
        return await super().evaluate(requests)


async def opened(store: GatedStore, clock: ManualClock) -> CircuitBreaker:
    """A breaker opened by two failures, its cool-down over: the next call is the probe."""
    breaker = CircuitBreaker(store, failure_threshold=2, cooldown_s=0.5, clock_s=clock)
    for _ in range(2):
        with pytest.raises(BackendError):
            await breaker.evaluate([counter("probe", 5)])
    assert breaker.state is CircuitState.OPEN
    clock.now += 0.5
    store.down = False
    return breaker


def test_half_open_lets_one_probe_through_and_fails_the_others_fast() -> None:
    async def scenario() -> None:
        store, clock = GatedStore(), ManualClock()
        breaker = await opened(store, clock)
        probe = asyncio.ensure_future(breaker.evaluate([counter("probe", 5)]))
        await asyncio.sleep(0)  # the probe is now waiting on the store
        with pytest.raises(BackendError) as second:
            await breaker.evaluate([counter("probe", 5)])
        assert second.value.kind == "circuit_open"
        assert store.calls == 3  # two failures, one probe
        store.gate.set()
        assert (await probe).admitted
        assert breaker.state is CircuitState.CLOSED

    asyncio.run(scenario())


def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    async def scenario() -> None:
        store, clock = GatedStore(), ManualClock()
        breaker = await opened(store, clock)
        probe = asyncio.ensure_future(breaker.evaluate([counter("probe", 5)]))
        await asyncio.sleep(0)
        probe.cancel()  # the caller's deadline passed: neither success nor failure
        with pytest.raises(asyncio.CancelledError):
            await probe
        store.gate.set()
        assert (await breaker.evaluate([counter("probe", 5)])).admitted
        assert breaker.state is CircuitState.CLOSED

    asyncio.run(scenario())
