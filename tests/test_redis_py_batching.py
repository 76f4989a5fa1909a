"""The redis-py path's batching (Sentinel): a call whose caller gave up is never sent."""

from __future__ import annotations

import asyncio
from typing import Callable, Iterator

import pytest

from ratelimit.config.model import Algorithm
from ratelimit.limiter import BackendError
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.limiter.types import CounterRequest, WindowSpec
from tests.support.redis_topologies import SentinelTopology, running_sentinel_group

TIMEOUT_S = 0.1
PAUSE_MS = 400  # Redis holds every write (scripts included) this long: the callers give up first


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelTopology]:
    with running_sentinel_group(replicas=0, sentinels=1) as topology:
        yield topology


def one_hit(key: str) -> list[CounterRequest]:
    return [CounterRequest(key=key, limit=10, window=WindowSpec.for_rule(Algorithm.SLIDING_WINDOW, 60), hits=1)]


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)  # one loop turn: the scheduler's flushes run in between


def test_a_call_queued_behind_the_pipelines_in_flight_is_never_sent_once_its_caller_gave_up(
    sentinel_group: SentinelTopology,
) -> None:
    # The caller of the queued call gives up as gRPC does when Envoy's deadline passes: its
    # task is cancelled while the two pipelines in flight wait on a paused Redis.
    primary = sentinel_group.current_primary().client()
    primary.flushall()

    async def scenario() -> tuple[list[BaseException | None], int]:
        backend = RedisBackend(sentinel_group.url, timeout_s=TIMEOUT_S, batching=True)
        try:
            await backend.prepare()
            primary.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            before = backend.round_trips
            calls = []
            for name, sent in (("in-flight-1", 1), ("in-flight-2", 2), ("queued", 2)):
                calls.append(asyncio.ensure_future(backend.evaluate(one_hit(name))))
                await until(lambda sent=sent: backend.round_trips - before == sent)
            # The queued call's task took its first step (it waits on its future) before ours
            # resumes: both were ready in the same turn, and it was scheduled first.
            await asyncio.sleep(0)
            calls[-1].cancel()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            # Writes are accepted again: the queue moves on.
            await asyncio.to_thread(primary.set, "paused", "no longer")
            await backend.evaluate(one_hit("after"))
            return [outcome if isinstance(outcome, BaseException) else None for outcome in outcomes], (
                backend.round_trips - before
            )
        finally:
            await backend.close()

    outcomes, sent = asyncio.run(scenario())
    *in_flight, queued = outcomes
    assert all(isinstance(outcome, BackendError) and outcome.kind == "timeout" for outcome in in_flight)
    assert isinstance(queued, asyncio.CancelledError)
    assert sent == 3  # two pipelines in flight, then "after"; never the abandoned call
    assert not primary.exists("queued")  # nobody was answered for it, so nothing may be charged
    assert primary.exists("after")


@pytest.mark.parametrize("batching", [True, False])
def test_after_script_flush_calls_reload_the_script_and_are_answered(
    sentinel_group: SentinelTopology, batching: bool
) -> None:
    primary = sentinel_group.current_primary().client()
    primary.flushall()

    async def scenario() -> list[bool]:
        backend = RedisBackend(sentinel_group.url, timeout_s=1.0, batching=batching)
        try:
            await backend.prepare()
            primary.script_flush()
            decisions = await asyncio.gather(*(backend.evaluate(one_hit(f"flushed-{n}")) for n in range(5)))
            return [decision.admitted for decision in decisions]
        finally:
            await backend.close()

    assert asyncio.run(scenario()) == [True] * 5
    assert all(primary.exists(f"flushed-{n}") for n in range(5))
