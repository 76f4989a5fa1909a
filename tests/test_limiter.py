"""Behaviour of the limiter, the same cases on the in-memory twin and on a real redis-server."""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, Callable, TypeVar

import pytest
import redis

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter import Backend, Role
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.redis_backend import RedisBackend
from tests.limiter_cases import counter, max_hits_in_any_window
from tests.support.counters import add_hits, buckets_of, encode, held_hits, slot_count

T = TypeVar("T")
BackendFactory = Callable[[], Backend]


@pytest.fixture(params=["memory", "redis", "redis-unbatched"])
def make_backend(request: pytest.FixtureRequest) -> BackendFactory:
    if request.param == "memory":
        return MemoryBackend
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBackend(url, timeout_s=1.0, batching=request.param == "redis")


def run(make_backend: BackendFactory, scenario: Callable[[Backend], Awaitable[T]]) -> T:
    async def main() -> T:
        backend = make_backend()
        try:
            return await scenario(backend)
        finally:
            await backend.close()

    return asyncio.run(main())


def test_admits_exactly_the_limit_then_rejects(make_backend: BackendFactory) -> None:
    async def scenario(backend: Backend) -> None:
        remaining = []
        for _ in range(3):
            decision = await backend.evaluate([counter("a", 3)])
            assert decision.admitted
            remaining.append(decision.results[0].remaining(3))
        assert remaining == [2, 1, 0]
        rejected = await backend.evaluate([counter("a", 3)])
        assert not rejected.admitted
        assert rejected.results[0].over_limit
        assert rejected.results[0].used == 3
        assert 0 < rejected.results[0].reset_ms <= 60_000 + 60_000 // 40

    run(make_backend, scenario)


def test_rejected_request_consumes_no_budget_of_any_descriptor(make_backend: BackendFactory) -> None:
    async def scenario(backend: Backend) -> None:
        roomy, tight = counter("roomy", 5), counter("tight", 1)
        assert (await backend.evaluate([roomy, tight])).admitted
        rejected = await backend.evaluate([roomy, tight])
        assert not rejected.admitted
        assert [r.over_limit for r in rejected.results] == [False, True]
        alone = await backend.evaluate([counter("roomy", 5, hits=0)])
        assert alone.results[0].used == 1  # the rejected request charged nothing

    run(make_backend, scenario)


def test_multi_hit_request_over_the_room_is_rejected_and_charges_nothing(make_backend: BackendFactory) -> None:
    async def scenario(backend: Backend) -> None:
        assert (await backend.evaluate([counter("m", 5, hits=3)])).admitted
        rejected = await backend.evaluate([counter("m", 5, hits=3)])
        assert not rejected.admitted and rejected.results[0].used == 3
        assert (await backend.evaluate([counter("m", 5, hits=2)])).admitted

    run(make_backend, scenario)


def test_zero_hits_checks_without_charging(make_backend: BackendFactory) -> None:
    async def scenario(backend: Backend) -> None:
        for _ in range(3):
            decision = await backend.evaluate([counter("z", 1, hits=0)])
            assert decision.admitted and decision.results[0].used == 0
        assert (await backend.evaluate([counter("z", 1)])).admitted
        check = await backend.evaluate([counter("z", 1, hits=0)])
        assert check.admitted and check.results[0].remaining(1) == 0

    run(make_backend, scenario)


def test_shadow_counter_over_limit_does_not_reject_but_is_charged(make_backend: BackendFactory) -> None:
    async def scenario(backend: Backend) -> None:
        for expected_used in (1, 2, 3):
            decision = await backend.evaluate([counter("s", 1, role=Role.SHADOW)])
            assert decision.admitted
            assert decision.results[0].used == expected_used
        assert decision.results[0].over_limit

    run(make_backend, scenario)


def test_zero_limit_rejects_every_hit(make_backend: BackendFactory) -> None:
    async def scenario(backend: Backend) -> None:
        decision = await backend.evaluate([counter("zero", 0)])
        assert not decision.admitted and decision.results[0].over_limit

    run(make_backend, scenario)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_waiting_duration_until_reset_lets_the_same_request_in(
    make_backend: BackendFactory, algorithm: Algorithm
) -> None:
    async def scenario(backend: Backend) -> None:
        request = counter("promise", 2, unit=Unit.SECOND, algorithm=algorithm)
        for _ in range(2):
            assert (await backend.evaluate([request])).admitted
        for _attempt in range(3):
            rejected = await backend.evaluate([request])
            if rejected.admitted:  # a window edge passed between calls; fill again
                continue
            assert 0 < rejected.results[0].reset_ms <= 1000 + 25
            await asyncio.sleep(rejected.results[0].reset_ms / 1000)
            retried = await backend.evaluate([request])
            assert retried.admitted, f"not admitted {rejected.results[0].reset_ms} ms later"
            return
        pytest.fail("never saw an over-limit answer")

    run(make_backend, scenario)


def test_fixed_window_reset_is_exactly_the_epoch_aligned_window_end(make_backend: BackendFactory) -> None:
    """Exact to the millisecond; rounded up to whole seconds (as the server reports it), it is
    the seconds envoyproxy/ratelimit reports."""

    async def scenario(backend: Backend) -> None:
        decision = await backend.evaluate([counter("fixed", 10, algorithm=Algorithm.FIXED_WINDOW)])
        now_s = decision.now_ms // 1000
        window_end_ms = (decision.now_ms // 60_000 + 1) * 60_000
        assert decision.results[0].reset_ms == window_end_ms - decision.now_ms
        assert math.ceil(decision.results[0].reset_ms / 1000) == 60 - now_s % 60
        assert decision.results[0].remaining(10) == 9

    run(make_backend, scenario)


def test_boundary_bursts_from_concurrent_clients_never_exceed_the_limit(make_backend: BackendFactory) -> None:
    """Bursts fired right before and after bucket edges, from several clients at once."""
    limit, window_ms = 20, 1000
    admitted_at: list[int] = []

    async def client(backend: Backend, burst: int) -> None:
        for _ in range(burst):
            decision = await backend.evaluate([counter("edge", limit, unit=Unit.SECOND)])
            if decision.admitted:
                admitted_at.append(decision.now_ms)

    async def scenario(backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.2
        while loop.time() < deadline:
            # Aim at the 2 ms before a 25 ms bucket edge, then at the edge itself.
            now_ms = loop.time() * 1000
            await asyncio.sleep(((25 - now_ms % 25) - 2) % 25 / 1000)
            await asyncio.gather(*(client(backend, 6) for _ in range(4)))

    run(make_backend, scenario)
    assert len(admitted_at) >= limit
    assert max_hits_in_any_window(admitted_at, window_ms) <= limit


def test_steady_over_limit_load_gets_at_least_95_percent_of_the_limit(make_backend: BackendFactory) -> None:
    limit, offered_per_s, seconds = 100, 400, 4.0
    admitted_at: list[int] = []

    async def scenario(backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while (elapsed := loop.time() - start) < seconds:
            due = int(elapsed * offered_per_s)
            while sent < due:
                sent += 1
                decision = await backend.evaluate([counter("steady", limit, unit=Unit.SECOND)])
                if decision.admitted:
                    admitted_at.append(decision.now_ms)
            await asyncio.sleep(0.001)

    run(make_backend, scenario)
    first = min(admitted_at)
    # Steady state: skip the first second (the initial burst fills the window).
    steady = [t for t in admitted_at if t >= first + 1000]
    span_s = (max(steady) - min(steady)) / 1000
    assert max_hits_in_any_window(admitted_at, 1000) <= limit
    assert len(steady) / span_s >= 0.95 * limit, f"{len(steady)} admitted in {span_s:.2f} s"


def test_counter_memory_is_bounded_whatever_the_limit(redis_url: str) -> None:
    async def scenario(backend: Backend) -> None:
        request = counter("big", 1_000_000, unit=Unit.SECOND)
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while loop.time() < end:
            await backend.evaluate([request])
        client = redis.Redis.from_url(redis_url)
        assert slot_count(client, request.key) == 41  # README: at most K + 1 = 41 integers per counter
        assert 0 < client.pttl(request.key) <= 1000 + 25
        client.close()

    run(lambda: RedisBackend(redis_url, timeout_s=1.0), scenario)


@pytest.mark.parametrize("unit", [unit for unit in Unit if unit is not Unit.UNKNOWN], ids=lambda unit: unit.name)
def test_every_key_expires_when_its_last_hit_stops_counting_at_most_w_plus_w_over_40(
    redis_url: str, unit: Unit
) -> None:
    """README: every key carries a TTL of at most W + W/40. Read from Redis (PEXPIRETIME),
    it is exactly the instant the hit just made stops counting: the end of its bucket plus
    40 buckets of W/40 (sliding), the end of the epoch-aligned window (fixed)."""
    window_ms = unit.seconds * 1000
    requests = [counter(f"ttl-{algorithm.value}", 5, unit=unit, algorithm=algorithm) for algorithm in Algorithm]

    async def scenario(backend: Backend) -> list[int]:
        return [(await backend.evaluate([request])).now_ms for request in requests]

    decided_at = run(lambda: RedisBackend(redis_url, timeout_s=1.0), scenario)
    client = redis.Redis.from_url(redis_url)
    try:
        assert len(client.keys("*")) == len(requests)
        for request, now_ms in zip(requests, decided_at):
            expires_at = client.pexpiretime(request.key)
            if request.window.span == 1:  # fixed window
                assert expires_at == (now_ms // window_ms + 1) * window_ms
            else:
                bucket_ms = window_ms // 40
                assert expires_at == (now_ms // bucket_ms + 41) * bucket_ms
            assert now_ms < expires_at <= now_ms + window_ms + window_ms // 40
    finally:
        client.close()


def test_an_unreachable_redis_fails_fast_with_a_backend_error() -> None:
    from ratelimit.limiter import BackendError
    from tests.support.processes import free_port

    async def scenario(backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(BackendError) as caught:
            await backend.evaluate([counter("down", 1)])
        assert caught.value.kind in {"connection", "timeout"}
        assert loop.time() - start < 0.5

    run(lambda: RedisBackend(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05), scenario)


def test_concurrent_requests_share_round_trips_and_each_stays_atomic(redis_url: str) -> None:
    """Seen from Redis (INFO): 50 script calls, each one atomic, arrive in at most 3 reads."""
    admin = redis.Redis.from_url(redis_url)

    async def scenario(backend: Backend) -> tuple[int, int, list[bool]]:
        await backend.evaluate([counter("warm-up", 30)])  # connected, script loaded
        admin.config_resetstat()
        reads_before = admin.info("stats")["total_reads_processed"]
        decisions = await asyncio.gather(*(backend.evaluate([counter("batch", 30)]) for _ in range(50)))
        # This INFO's own command is one more read.
        reads = admin.info("stats")["total_reads_processed"] - reads_before - 1
        return reads, admin.info("commandstats")["cmdstat_evalsha"]["calls"], [d.admitted for d in decisions]

    try:
        reads, script_calls, admitted = run(lambda: RedisBackend(redis_url, timeout_s=1.0), scenario)
    finally:
        admin.close()
    assert admitted.count(True) == 30
    assert script_calls == 50
    assert reads <= 3, f"Redis read the 50 calls in {reads} reads"  # one or two pipelined writes


def test_script_cache_flush_is_invisible_to_callers(make_backend: BackendFactory, redis_url: str) -> None:
    async def scenario(backend: Backend) -> None:
        assert (await backend.evaluate([counter("flush", 5)])).admitted
        admin = redis.Redis.from_url(redis_url)
        admin.script_flush()
        admin.close()
        results = await asyncio.gather(*(backend.evaluate([counter("flush", 5)]) for _ in range(3)))
        assert sorted(r.results[0].used for r in results) == [2, 3, 4]

    run(make_backend, scenario)


def test_a_request_naming_one_counter_twice_charges_and_checks_them_together(make_backend: BackendFactory) -> None:
    async def scenario(backend: Backend) -> None:
        twice = [counter("twice", 5, hits=3), counter("twice", 5, hits=3)]
        rejected = await backend.evaluate(twice)
        assert not rejected.admitted  # 3 + 3 > 5, although each alone would fit
        assert [r.over_limit for r in rejected.results] == [False, True]
        pair = [counter("twice", 5, hits=2), counter("twice", 5, hits=2)]
        admitted = await backend.evaluate(pair)
        assert admitted.admitted and [r.used for r in admitted.results] == [2, 4]
        check = await backend.evaluate([counter("twice", 5, hits=0)])
        assert check.results[0].used == 4

    run(make_backend, scenario)


def test_a_check_only_first_mention_keeps_the_later_mentions_hits(make_backend: BackendFactory) -> None:
    """A fresh counter named twice, first with 0 hits (the in-memory twin once dropped the
    second mention's hits with the empty counter; the sliding-log oracle found it)."""

    async def scenario(backend: Backend) -> None:
        first = await backend.evaluate([counter("mention", 5, hits=0), counter("mention", 5, hits=1)])
        assert first.admitted and [r.used for r in first.results] == [0, 1]
        check = await backend.evaluate([counter("mention", 5, hits=0)])
        assert check.results[0].used == 1

    run(make_backend, scenario)


def test_a_check_only_request_writes_nothing_to_redis(redis_url: str) -> None:
    """hits 0 asks without charging: no key appears for it (SCAN)."""
    used = counter("peek-used", 5, unit=Unit.HOUR)

    async def scenario(backend: Backend) -> None:
        await backend.evaluate([used])
        await backend.evaluate([counter("peek-fresh", 5, hits=0)])
        await backend.evaluate([counter("peek-used", 5, unit=Unit.HOUR, hits=0)])

    run(lambda: RedisBackend(redis_url, timeout_s=1.0), scenario)
    admin = redis.Redis.from_url(redis_url)
    try:
        assert [key.decode() for key in admin.scan_iter()] == [used.key]
        assert held_hits(admin, used.key) == 1
    finally:
        admin.close()


def test_a_clock_that_steps_back_charges_the_newest_bucket_held_in_memory() -> None:
    """A counter's clock never goes back: hits made when the clock reads earlier than the
    newest bucket held go to that bucket, so they leave no sooner than the hits before them."""
    request = counter("clock-back", 10)
    bucket_ms = request.window.bucket_ms
    now_ms = [1_700_000_000_000]
    backend = MemoryBackend(lambda: now_ms[0])
    oldest = now_ms[0] // bucket_ms
    assert backend.evaluate_now([request]).admitted
    now_ms[0] += 3 * bucket_ms
    assert backend.evaluate_now([request]).admitted
    now_ms[0] -= 8 * bucket_ms  # the clock steps back below both buckets held
    decision = backend.evaluate_now([request])
    assert decision.admitted and decision.results[0].used == 3
    assert backend.raw_buckets(request.key) == {oldest: 1, oldest + 3: 2}


def test_a_clock_that_steps_back_charges_the_newest_bucket_held_in_redis(redis_url: str) -> None:
    """The same on Redis: a counter whose newest bucket is ahead of Redis's clock (written
    before Redis's clock stepped back) is charged in that bucket, and expires with it."""
    request = counter("clock-back-redis", 10)
    bucket_ms, span = request.window.bucket_ms, request.window.span
    client = redis.Redis.from_url(redis_url)
    try:
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        ahead = now_ms // bucket_ms + 3
        add_hits(client, request.key, ahead, 1, span, ttl_ms=120_000)
        client.pexpireat(request.key, (ahead + span) * bucket_ms)  # as a replica sets it: when that bucket leaves

        async def scenario(backend: Backend) -> None:
            decision = await backend.evaluate([request])
            assert decision.admitted and decision.results[0].used == 2
            assert buckets_of(client, request.key) == {ahead: 2}
            leaves_ms = (ahead + span) * bucket_ms - decision.now_ms
            assert leaves_ms - 5 <= client.pttl(request.key) <= leaves_ms

        run(lambda: RedisBackend(redis_url, timeout_s=1.0), scenario)
    finally:
        client.close()


def test_a_stored_counter_longer_than_its_window_counts_its_window_and_is_cut_to_it(redis_url: str) -> None:
    """A counter holding more buckets than K + 1 (as one written with another bucket count
    would) counts only the K + 1 newest, and its next charge cuts it to them."""
    request = counter("too-long", 1_000)
    bucket_ms, span = request.window.bucket_ms, request.window.span
    client = redis.Redis.from_url(redis_url)
    try:
        seconds, micros = client.time()
        current = (int(seconds) * 1000 + int(micros) // 1000) // bucket_ms
        seeded = {current - age: 1 for age in range(span + 4)}
        client.set(request.key, encode(seeded), px=120_000)

        async def scenario(backend: Backend) -> None:
            decision = await backend.evaluate([request])
            now_bucket = decision.now_ms // bucket_ms  # `current`, unless a bucket began meanwhile
            counted = {bucket: hits for bucket, hits in seeded.items() if bucket > now_bucket - span}
            assert decision.admitted and decision.results[0].used == sum(counted.values()) + 1
            counted[now_bucket] = counted.get(now_bucket, 0) + 1
            assert buckets_of(client, request.key) == counted
            assert slot_count(client, request.key) == span

        run(lambda: RedisBackend(redis_url, timeout_s=1.0), scenario)
    finally:
        client.close()


def test_a_bucket_saturates_at_the_uint32_ceiling_and_the_stored_sum_stays_its_buckets(redis_url: str) -> None:
    """Shadow counters are charged even when over, so a hostile addend (capped at limit + 1 =
    2^32 by the service) on the largest limit overflows a 4-byte bucket: it saturates, the stored
    sum stays the sum of the buckets (the decoder checks it), and the counter still says over."""
    limit = 2**32 - 1
    request = counter("saturated", limit, hits=limit + 1, role=Role.SHADOW)
    client = redis.Redis.from_url(redis_url)

    async def scenario(backend: Backend) -> None:
        for _ in range(3):
            decision = await backend.evaluate([request])
            assert decision.admitted  # a shadow counter never rejects
        assert set(buckets_of(client, request.key).values()) == {limit}  # one bucket, or two if a new one began
        assert (await backend.evaluate([request])).results[0].over_limit

    try:
        run(lambda: RedisBackend(redis_url, timeout_s=1.0), scenario)
    finally:
        client.close()
