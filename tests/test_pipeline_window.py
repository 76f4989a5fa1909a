"""The pipeline window: calls close together share a write, a call after a quiet spell goes at
once, a held call waits at most the window (or until the limit) and never past its deadline.
Against a real redis-server (one server) and a real Sentinel group (redis-py's path)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from ratelimit.client import AsyncRateLimitClient
from ratelimit.config.model import Algorithm
from ratelimit.limiter import BackendError
from ratelimit.limiter.pipeline_window import BUSY_RELEASE, RATE_INTERVAL_S, PipelineWindow
from ratelimit.limiter.pipelined import Endpoint, PipelinedRedis
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.limiter.types import CounterRequest, WindowSpec
from tests.support.cpu import spin
from tests.support.processes import RedisServer
from tests.support.redis_topologies import SentinelTopology, running_sentinel_group
from tests.support.replica import running_replica

CALLS = 20


def reads_by(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_reads_processed"])


async def calls_one_per_turn(client: PipelinedRedis, count: int, key: str) -> list[Any]:
    """`count` calls, each in a loop turn of its own (as grpc.aio hands them over), close together."""
    calls = []
    for _ in range(count):
        calls.append(asyncio.ensure_future(client.execute("INCR", key)))
        await asyncio.sleep(0)
    return await asyncio.gather(*calls)


def run_client(endpoint: Endpoint, scenario: Any, *, window: PipelineWindow | None, timeout_s: float = 1.0) -> Any:
    async def main() -> Any:
        client = PipelinedRedis(endpoint, timeout_s=timeout_s, window=window)
        try:
            return await scenario(client)
        finally:
            await client.close()

    return asyncio.run(main())


def test_calls_close_together_share_one_write_and_keep_their_order(redis_server: RedisServer, redis_url: str) -> None:
    endpoint = Endpoint(port=redis_server.port)
    admin = redis.Redis(port=redis_server.port)

    async def scenario(client: PipelinedRedis) -> tuple[list[Any], int, int]:
        await client.execute("PING")
        await asyncio.sleep(0.3)  # a quiet spell: the next call goes at once
        before, reads_before = client.round_trips, reads_by(admin)
        replies = await calls_one_per_turn(client, CALLS, "windowed")
        # The second INFO is one read of its own.
        return replies, client.round_trips - before, reads_by(admin) - reads_before - 1

    try:
        replies, writes, reads = run_client(endpoint, scenario, window=PipelineWindow(0.2))
    finally:
        admin.close()
    assert replies == list(range(1, CALLS + 1))
    assert writes == 2  # the first at once, the other 19 when the window ends
    assert 1 <= reads <= 2  # seen from Redis too

    async def unwindowed(client: PipelinedRedis) -> int:
        await client.execute("PING")
        before = client.round_trips
        await calls_one_per_turn(client, CALLS, "unwindowed")
        return client.round_trips - before

    # The same calls without a window: two go at once, the rest as replies come back (how many
    # writes that takes depends on how fast Redis answers; always more than two).
    assert run_client(endpoint, unwindowed, window=None) > 2


def test_a_call_after_a_quiet_spell_goes_at_once_and_a_held_one_waits_the_window(
    redis_server: RedisServer, redis_url: str
) -> None:
    window_s = 0.3

    async def scenario(client: PipelinedRedis) -> tuple[float, float]:
        await client.execute("PING")
        await asyncio.sleep(window_s * 1.5)
        started = time.monotonic()
        first = asyncio.ensure_future(client.execute("PING"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(client.execute("PING"))
        await first
        first_s = time.monotonic() - started
        await second
        return first_s, time.monotonic() - started

    first_s, second_s = run_client(Endpoint(port=redis_server.port), scenario, window=PipelineWindow(window_s))
    assert first_s < window_s / 2  # not held: nothing came within a window before it
    assert window_s * 0.9 <= second_s < window_s * 2  # held for the window, then sent


def test_the_limit_sends_the_calls_held_before_the_window_ends(redis_server: RedisServer, redis_url: str) -> None:
    async def scenario(client: PipelinedRedis) -> tuple[list[Any], int, float]:
        await client.execute("PING")
        await asyncio.sleep(1.1)  # a quiet spell longer than the window
        before, started = client.round_trips, time.monotonic()
        replies = await calls_one_per_turn(client, 1 + 5, "limited")  # one at once, five held
        return replies, client.round_trips - before, time.monotonic() - started

    replies, writes, took_s = run_client(
        Endpoint(port=redis_server.port), scenario, window=PipelineWindow(1.0, limit=5), timeout_s=3.0
    )
    assert replies == list(range(1, 7))
    assert writes == 2
    assert took_s < 0.5  # the fifth held call sent them all, long before the window's end


def test_a_held_call_fails_at_its_own_deadline_not_the_windows_end_plus_the_timeout(
    redis_server: RedisServer, redis_url: str
) -> None:
    admin = redis.Redis(port=redis_server.port)

    async def scenario(client: PipelinedRedis) -> tuple[list[Any], float]:
        await client.execute("PING")  # connected
        await asyncio.sleep(0.2)  # a quiet spell longer than the window
        admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # Redis answers nobody for 1 s
        first = asyncio.ensure_future(client.execute("PING"))  # goes at once
        await asyncio.sleep(0)
        started = time.monotonic()
        held = asyncio.ensure_future(client.execute("PING"))  # held for the window, then sent
        outcomes = await asyncio.gather(first, held, return_exceptions=True)
        return outcomes, time.monotonic() - started

    try:
        outcomes, took_s = run_client(
            Endpoint(port=redis_server.port), scenario, window=PipelineWindow(0.15), timeout_s=0.2
        )
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert all(isinstance(outcome, BackendError) and outcome.kind == "timeout" for outcome in outcomes)
    assert 0.19 <= took_s < 0.3  # 0.2 s from the call; 0.35 s if the window's wait were not counted


def test_the_rules_hold_a_call_within_a_window_of_the_previous_one_and_fill_at_the_limit() -> None:
    window = PipelineWindow(0.5, limit=3)  # times exact in binary: the edge is the edge
    assert window.enabled
    assert not window.hold(10.0)  # the first call: nothing came before it
    assert window.hold(10.25)  # a quarter-window after the previous one
    assert not window.hold(10.75)  # exactly a window after the previous one: a quiet spell
    assert [window.full(held) for held in (0, 1, 2, 3, 4)] == [False, False, False, True, True]
    assert PipelineWindow(0.5, limit=1).full(1)  # a limit of one: every call goes at once
    assert not PipelineWindow(0.5).full(10**6)  # 0: no limit
    off = PipelineWindow(0.0)  # the default: accepted, and off
    assert not off.enabled


def test_with_a_minimum_rate_calls_are_held_only_once_an_interval_of_them_was_faster_than_it() -> None:
    assert RATE_INTERVAL_S == 0.1  # the times below are laid out around it
    window = PipelineWindow(0.5, min_rate=32.0)
    # 64 calls/s from time 0, each well within the window of the last. The interval from 0 to
    # 0.1 s counts 7 calls, more than 3.2, and decides from the call that ends it (at exactly
    # 0.1 s) on; the calls before it were counted while nothing said fast.
    fast = [window.hold(k / 64) for k in range(7)] + [window.hold(0.1)]
    fast += [window.hold(0.1 + k / 64) for k in range(1, 8)]
    assert fast == [False] * 7 + [True] * 8
    # A quiet spell: the call after it goes at once, the interval that spans it says slow, so a
    # burst after it waits for an interval of its own.
    assert not window.hold(100.0)
    assert not window.hold(100.015625)
    # Exactly at the rate is not above it: 4 calls in 0.125 s is 32/s; 5 is more. (An interval
    # ends at the first call 0.1 s or more after it began: none comes between 0.1 and 0.125 s.)
    edge = PipelineWindow(0.5, min_rate=32.0)
    times = [20.0, 20.03125, 20.0625, 20.09375, 20.125, 20.140625, 20.15625, 20.1875, 20.21875, 20.25]
    assert [edge.hold(t) for t in times] == [False] * 9 + [True]
    # Each interval counts its own calls only: 4 more in the next 0.125 s say slow again.
    assert [edge.hold(t) for t in (20.28125, 20.3125, 20.34375, 20.375)] == [True, True, True, False]
    # Within the window but slower than the rate: never held.
    slow = PipelineWindow(0.5, min_rate=32.0)
    assert not any(slow.hold(30.0 + 0.25 * k) for k in range(40))
    # Faster than the rate but each call a window after the last: never held either.
    apart = PipelineWindow(0.01, min_rate=32.0)
    assert not any(apart.hold(40.0 + k / 64) for k in range(40))


@pytest.mark.parametrize(("rate", "held_share"), [(1_500, (0.0, 0.0)), (1_800, (0.0, 0.2)), (3_000, (0.99, 1.0))])
def test_a_steady_load_of_independent_callers_below_the_gate_is_never_held(
    rate: float, held_share: tuple[float, float]
) -> None:
    """Calls from many clients come at near-exponential gaps: a gate at 2,000 calls/s holds none
    of 20 s of a steady 1,500/s, few of 1,800/s, and nearly all of 3,000/s. (An average of the
    last eight gaps held one in six at 1,500/s.)"""
    chance = random.Random(12)
    window = PipelineWindow(0.003, min_rate=2_000.0)
    now, held = 100.0, 0
    for _ in range(int(rate * 20)):
        now += chance.expovariate(rate)
        held += window.hold(now)
    share = held / int(rate * 20)
    assert held_share[0] <= share <= held_share[1]


class BusyShares:
    """Stands in for the loop thread's busy meter: one share per reading, in order."""

    def __init__(self, shares: list[float]) -> None:
        self.shares = list(shares)
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.shares.pop(0)


def test_with_a_minimum_busy_share_calls_are_held_from_two_busy_intervals_until_one_well_below() -> None:
    assert (RATE_INTERVAL_S, BUSY_RELEASE) == (0.1, 0.7)  # the shares below are laid out around them
    # Calls every 1/64 s, each well within the window. The first call's reading begins the first
    # span; every 7th call (7/64 s after the one that began its interval) ends an interval, and
    # what that interval read decides for it and the next six: one row each below.
    shares = BusyShares([0.0, 0.9, 0.95, 0.6, 0.55, 0.9, 0.5, 0.9, 0.85, 0.8])
    window = PipelineWindow(0.5, min_busy=0.8, busy_share=shares)
    held = [window.hold(10.0 + k / 64) for k in range(70)]
    rows = [set(held[7 * k : 7 * k + 7]) for k in range(10)]
    assert rows == [
        {False},  # the first interval: nothing read yet
        {False},  # 0.9: one busy interval is not two
        {True},  # 0.95: two in a row: saturated
        {True},  # 0.6: still at or above 0.7 x 0.8 = 0.56
        {False},  # 0.55: below it: let go
        {False},  # 0.9: one again
        {False},  # 0.5: a single busy interval between idle ones (a stall) never holds
        {False},  # 0.9
        {True},  # 0.85: two in a row
        {True},  # 0.8: exactly the share is enough
    ]
    assert shares.readings == 10 and not shares.shares  # once per interval, not per call


def test_a_busy_replica_is_held_only_while_its_calls_also_come_close_together_and_fast_enough() -> None:
    # Saturated and within the window, but slower than the minimum rate: never held.
    slow = PipelineWindow(0.5, min_rate=1_000.0, min_busy=0.5, busy_share=lambda: 1.0)
    assert not any(slow.hold(10.0 + k / 64) for k in range(64))
    # Saturated and fast, but each call a window after the last: never held.
    apart = PipelineWindow(0.01, min_busy=0.5, busy_share=lambda: 1.0)
    assert not any(apart.hold(10.0 + k / 64) for k in range(64))
    # An interval that spans a quiet spell is read over all of it (idle): holding lets go, so
    # the burst after the spell goes at once until two busy intervals of its own.
    shares = BusyShares([0.0, 1.0, 1.0, 0.01])
    window = PipelineWindow(0.5, min_busy=0.5, busy_share=shares)
    times = (1.0, 1.0625, 1.125, 1.25, 1.3125, 5.0, 5.0625)
    assert [window.hold(t) for t in times] == [False, False, False, True, True, False, False]


def test_a_trickle_below_the_minimum_rate_is_never_held(redis_server: RedisServer, redis_url: str) -> None:
    window_s = 0.2

    async def scenario(client: PipelinedRedis) -> list[float]:
        async def timed() -> float:
            started = time.monotonic()
            await client.execute("PING")
            return time.monotonic() - started

        await client.execute("PING")
        calls = []
        for _ in range(8):  # one call every 50 ms: each within the window of the last, 20 calls/s
            await asyncio.sleep(0.05)
            calls.append(asyncio.ensure_future(timed()))
        return list(await asyncio.gather(*calls))

    endpoint = Endpoint(port=redis_server.port)
    gated = run_client(endpoint, scenario, window=PipelineWindow(window_s, min_rate=100.0))
    assert max(gated) < window_s / 2  # below 100 calls/s: every call went at once
    held = run_client(endpoint, scenario, window=PipelineWindow(window_s))
    assert held[0] >= window_s * 0.9  # without the rate, the first call waited out the window


def test_a_window_gated_on_saturation_holds_calls_while_the_loop_is_busy_and_never_while_it_waits(
    redis_server: RedisServer, redis_url: str
) -> None:
    """The default gate, with the real meter of the loop thread: calls a millisecond apart, each
    within the 3 ms window, go alone while the loop waits for them; once the loop spends its time
    computing (as a saturated replica's does), they share writes; when it waits again, they go
    alone again."""

    async def phase(client: PipelinedRedis, seconds: float, busy: bool) -> tuple[int, int]:
        before, calls = client.round_trips, []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            calls.append(asyncio.ensure_future(client.execute("INCR", "gated")))
            if busy:
                spin(0.0005)  # the loop computes between calls
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.001)  # the loop waits for the next call
        await asyncio.gather(*calls)
        return len(calls), client.round_trips - before

    async def scenario(client: PipelinedRedis) -> list[tuple[int, int]]:
        await client.execute("PING")
        waiting = await phase(client, 0.5, busy=False)
        await phase(client, 0.3, busy=True)  # two busy tenths of a second and more
        saturated = await phase(client, 0.5, busy=True)
        await phase(client, 0.2, busy=False)  # a tenth of a second or two to let go
        waiting_again = await phase(client, 0.5, busy=False)
        return [waiting, saturated, waiting_again]

    window = PipelineWindow(0.003, min_busy=0.85)
    phases = run_client(Endpoint(port=redis_server.port), scenario, window=window)
    (calls, writes), (busy_calls, busy_writes), (later_calls, later_writes) = phases
    assert calls > 100 and writes >= calls * 0.9, phases  # never held (a write can only wait for two in flight)
    assert busy_calls > 100 and busy_writes <= busy_calls / 3, phases  # held: about 6 calls per 3 ms
    assert later_writes >= later_calls * 0.9, phases


def test_windows_that_are_not_numbers_of_seconds_or_limits_below_zero_are_refused() -> None:
    for window_s in (-0.001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pipeline window"):
            PipelineWindow(window_s)
    with pytest.raises(ValueError, match="pipeline limit"):
        PipelineWindow(0.001, limit=-1)
    for rate in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pipeline minimum rate"):
            PipelineWindow(0.001, min_rate=rate)
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="pipeline minimum busy share"):
            PipelineWindow(0.001, min_busy=share)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--redis-pipeline-window-us", "20000"], "--redis-pipeline-window-us: '20000' is not between 0 and 10000"),
        (["--redis-pipeline-window-us", "nan"], "--redis-pipeline-window-us: 'nan' is not between 0 and 10000"),
        (["--redis-pipeline-limit", "-1"], "--redis-pipeline-limit: '-1' is not between 0 and 1e+06"),
        (["--redis-pipeline-min-rate", "-5"], "--redis-pipeline-min-rate: '-5' is not between 0 and 1e+07"),
        (["--redis-pipeline-min-busy", "1.5"], "--redis-pipeline-min-busy: '1.5' is not between 0 and 1"),
        (
            ["--redis-pipeline-window-us", "6000", "--redis-timeout-ms", "5"],
            "--redis-pipeline-window-us 6000 must be below --redis-timeout-ms 5",
        ),
    ],
)
def test_serve_refuses_a_window_it_cannot_honour_in_one_line(tmp_path: Any, flags: list[str], message: str) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "ratelimit", "serve", "--config", str(limits), *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelTopology]:
    with running_sentinel_group(replicas=0, sentinels=1) as topology:
        yield topology


@pytest.mark.parametrize("store", ["one server", "sentinel"])
def test_decisions_close_together_share_one_write_and_each_counts_once(
    store: str, redis_url: str, request: pytest.FixtureRequest
) -> None:
    if store == "sentinel":
        group: SentinelTopology = request.getfixturevalue("sentinel_group")
        url = group.url
        group.current_primary().client().flushall()
    else:
        url = redis_url
    window = WindowSpec.for_rule(Algorithm.SLIDING_WINDOW, 60)

    async def scenario() -> tuple[list[int], int]:
        backend = RedisBackend(url, timeout_s=1.0, pipeline_window=PipelineWindow(0.2))
        try:
            await backend.prepare()
            await asyncio.sleep(0.3)  # a quiet spell: the next call goes at once
            before = backend.round_trips
            calls = []
            for _ in range(CALLS):
                request = CounterRequest(key="windowed-decisions", limit=1000, window=window, hits=1)
                calls.append(asyncio.ensure_future(backend.evaluate([request])))
                await asyncio.sleep(0)
            decisions = await asyncio.gather(*calls)
            return sorted(decision.results[0].used for decision in decisions), backend.round_trips - before
        finally:
            await backend.close()

    used, round_trips = asyncio.run(scenario())
    assert used == list(range(1, CALLS + 1))  # every call counted once, all-or-nothing each
    assert round_trips == 2  # the first alone, the other 19 together when the window ends


@pytest.mark.parametrize("limit", [1, 5])
@pytest.mark.parametrize("store", ["one server", "sentinel"])
def test_the_limit_sends_held_decisions_long_before_the_window_ends(
    store: str, limit: int, redis_url: str, request: pytest.FixtureRequest
) -> None:
    if store == "sentinel":
        group: SentinelTopology = request.getfixturevalue("sentinel_group")
        url = group.url
        group.current_primary().client().flushall()
    else:
        url = redis_url
    window = WindowSpec.for_rule(Algorithm.SLIDING_WINDOW, 60)

    async def scenario() -> tuple[int, int, float]:
        backend = RedisBackend(url, timeout_s=5.0, pipeline_window=PipelineWindow(2.0, limit=limit))
        try:
            await backend.prepare()
            await asyncio.sleep(2.1)  # a quiet spell longer than the window
            before, started = backend.round_trips, time.monotonic()
            calls = []
            for _ in range(1 + 5):  # one at once, then five held: each fills a limit of 1, the fifth one of 5
                request = CounterRequest(key="limited-decisions", limit=1000, window=window, hits=1)
                calls.append(asyncio.ensure_future(backend.evaluate([request])))
                await asyncio.sleep(0)
            decisions = await asyncio.gather(*calls)
            took_s = time.monotonic() - started
            return max(decision.results[0].used for decision in decisions), backend.round_trips - before, took_s
        finally:
            await backend.close()

    most_used, round_trips, took_s = asyncio.run(scenario())
    assert most_used == 6
    if limit == 5:
        assert round_trips == 2  # the first alone, the five together
    assert took_s < 1.0  # not the 2 s window


def test_a_flood_held_by_a_window_leaves_in_few_writes_each_counted_once(
    redis_server: RedisServer, redis_url: str
) -> None:
    # An attacker's burst: 2,000 calls in one loop turn, no limit. The window holds them all
    # (the queue is bounded by the calls in flight, each a packed command of a few hundred
    # bytes); they leave together, each with its own exact reply, within the window plus a
    # round trip.
    flood = 2_000

    async def scenario(client: PipelinedRedis) -> tuple[list[Any], int, float]:
        await client.execute("PING")
        await asyncio.sleep(0.1)  # a quiet spell: the flood's first call goes at once
        before, started = client.round_trips, time.monotonic()
        replies = await asyncio.gather(*(client.execute("INCR", "flooded") for _ in range(flood)))
        return replies, client.round_trips - before, time.monotonic() - started

    replies, writes, took_s = run_client(Endpoint(port=redis_server.port), scenario, window=PipelineWindow(0.05))
    assert replies == list(range(1, flood + 1))
    assert writes == 2  # the first call, then the other 1,999 together
    assert took_s < 1.0


def test_a_replica_with_a_window_answers_concurrent_calls_in_fewer_redis_reads(
    tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    calls = 30
    admin = redis.Redis(port=redis_server.port)
    limits = tmp_path / "limits.yaml"
    limits.write_text("domain: d\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 5}\n")
    # Held whenever calls come close (the default holds only while the replica is saturated).
    extra = ["--redis-pipeline-window-us", "9000", "--redis-pipeline-min-busy", "0", "--over-limit-cache", "false"]

    async def burst(target: str) -> list[str]:
        async with AsyncRateLimitClient(target, timeout_s=5) as client:
            await client.should_rate_limit("d", [[("user", "warm-up")]])  # connected, script loaded
            await asyncio.sleep(0.1)
            before = int(admin.info("stats")["total_reads_processed"])
            results = await asyncio.gather(
                *(client.should_rate_limit("d", [[("user", "burst")]]) for _ in range(calls))
            )
            reads.append(int(admin.info("stats")["total_reads_processed"]) - before - 1)
            return [result.overall_code for result in results]

    reads: list[int] = []
    try:
        with running_replica(tmp_path, [limits], redis_url=redis_url, extra_args=extra) as replica:
            codes = asyncio.run(burst(replica.target))
    finally:
        admin.close()
    assert sorted(codes) == ["OK"] * 5 + ["OVER_LIMIT"] * (calls - 5)  # one counter, exactly its limit
    assert reads[0] <= calls // 3, reads  # the calls shared writes; without a window, most go alone
