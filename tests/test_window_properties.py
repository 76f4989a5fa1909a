"""Property tests of the sliding window on the in-memory twin with a controlled clock,
and a differential test that the Lua script and the Python reference agree exactly."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.config.model import Algorithm, Unit
from ratelimit.guards import RequestCaps
from ratelimit.limiter import CounterRequest, Role
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.limiter.window import BUCKETS_PER_WINDOW
from tests.limiter_cases import counter, max_hits_in_any_window


class ManualClock:
    def __init__(self, start_ms: int) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms


WINDOW_MS = 1000
BUCKET_MS = WINDOW_MS // BUCKETS_PER_WINDOW
START_MS = 1_700_000_000_000


arrivals = st.lists(
    st.tuples(
        # offsets chosen to land on, just before and just after bucket and window edges
        st.one_of(
            st.integers(0, 5000),
            st.builds(lambda n, d: n * BUCKET_MS + d, st.integers(0, 200), st.sampled_from([-1, 0, 1])),
            st.builds(lambda n, d: n * WINDOW_MS + d, st.integers(0, 5), st.sampled_from([-1, 0, 1])),
        ),
        st.integers(0, 3),  # hits: 0 = check only
        st.integers(0, 2),  # which of three clients (replicas) asks
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(arrivals=arrivals, limit=st.integers(1, 15))
def test_no_interval_of_one_unit_ever_holds_more_than_the_limit(
    arrivals: list[tuple[int, int, int]], limit: int
) -> None:
    clock = ManualClock(START_MS)
    backend = MemoryBackend(clock)
    admitted_hits: list[int] = []
    for offset, hits, _client in sorted(arrivals):
        clock.now_ms = START_MS + max(offset, 0)
        decision = backend.evaluate_now([counter("p", limit, hits=hits, unit=Unit.SECOND)])
        if decision.admitted:
            admitted_hits += [clock.now_ms] * hits
    assert max_hits_in_any_window(admitted_hits, WINDOW_MS) <= limit


def ideal_sliding_log(arrivals_ms: list[int], limit: int) -> list[int]:
    """A perfect strict limiter (a full log of hits), the yardstick for efficiency."""
    admitted: list[int] = []
    for now in arrivals_ms:
        if max_hits_in_any_window([*admitted, now], WINDOW_MS) <= limit:
            admitted.append(now)
    return admitted


def run_constant_rate(limit: int, interval_ms: int, units: int, seed: int) -> tuple[list[int], list[int]]:
    clock = ManualClock(START_MS + seed)
    backend = MemoryBackend(clock)
    arrivals = [START_MS + seed + step * interval_ms for step in range(units * WINDOW_MS // interval_ms)]
    admitted = []
    for now in arrivals:
        clock.now_ms = now
        if backend.evaluate_now([counter("steady", limit, unit=Unit.SECOND)]).admitted:
            admitted.append(now)
    return arrivals, admitted


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(100, 1000), rate_factor=st.floats(1.2, 6.0), seed=st.integers(0, 2**16))
def test_a_steady_over_limit_rate_gets_at_least_95_percent_of_the_limit(
    limit: int, rate_factor: float, seed: int
) -> None:
    """Limits of 100 and more: arrivals come at most a few ms apart (see the next test)."""
    interval_ms = max(1, int(WINDOW_MS / (limit * rate_factor)))
    _arrivals, admitted = run_constant_rate(limit, interval_ms, units=20, seed=seed)
    steady_from = START_MS + seed + 5 * WINDOW_MS
    steady = [t for t in admitted if t >= steady_from]
    units = (admitted[-1] + interval_ms - steady_from) / WINDOW_MS
    assert len(steady) >= 0.95 * limit * units
    assert max_hits_in_any_window(admitted, WINDOW_MS) <= limit


@settings(max_examples=40, deadline=None)
@given(limit=st.integers(1, 30), interval_ms=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_any_constant_rate_gets_at_least_95_percent_of_a_perfect_sliding_log(
    limit: int, interval_ms: int, seed: int
) -> None:
    """Small limits: compare with a perfect limiter on the same arrivals.

    Arrivals come every few ms, finer than a bucket (25 ms); with coarser arrivals both
    limiters lose up to one arrival interval per window to the arrival grid itself.
    """
    arrivals, admitted = run_constant_rate(limit, interval_ms, units=12, seed=seed)
    ideal = ideal_sliding_log(arrivals, limit)
    assert len(admitted) >= 0.95 * len(ideal) - 1
    assert max_hits_in_any_window(admitted, WINDOW_MS) <= limit


def test_memory_per_counter_stays_bounded() -> None:
    clock = ManualClock(START_MS)
    backend = MemoryBackend(clock)
    request = counter("bounded", 10**9, unit=Unit.SECOND)
    for step in range(10_000):
        clock.now_ms = START_MS + step * 3
        backend.evaluate_now([request])
    assert len(backend.raw_buckets(request.key)) <= 41  # README: at most K + 1 = 41 integers per counter


def test_idle_counters_are_dropped() -> None:
    clock = ManualClock(START_MS)
    backend = MemoryBackend(clock)
    backend.evaluate_now([counter("idle", 3, unit=Unit.SECOND)])
    clock.now_ms += 2 * WINDOW_MS
    backend.evaluate_now([counter("other", 3, unit=Unit.SECOND, hits=0)])
    assert backend.counter_count() == 0


def test_lua_script_and_python_reference_agree(redis_url: str) -> None:
    """Replay random requests against Redis, then into the twin at Redis's own clock."""
    rng = random.Random(7)
    shapes = [
        (name, limit, unit, algorithm)
        for name, limit in (("a", 3), ("b", 7), ("c", 1))
        for unit in (Unit.SECOND,)
        for algorithm in Algorithm
    ]
    plans: list[list[CounterRequest]] = []
    for _ in range(400):
        chosen = rng.sample(shapes, rng.randint(1, 3))
        plans.append(
            [
                counter(
                    name,
                    limit,
                    unit=unit,
                    algorithm=algorithm,
                    hits=rng.randint(0, 3),
                    role=rng.choice([Role.ENFORCE, Role.ENFORCE, Role.SHADOW, Role.QUOTA]),
                )
                for name, limit, unit, algorithm in chosen
            ]
        )

    async def drive() -> list:
        backend = RedisBackend(redis_url, timeout_s=1.0)
        decisions = []
        for plan in plans:
            decisions.append(await backend.evaluate(plan))
            await asyncio.sleep(rng.random() * 0.01)
        await backend.close()
        return decisions

    decisions = asyncio.run(drive())
    clock = ManualClock(0)
    twin = MemoryBackend(clock)
    for plan, from_redis in zip(plans, decisions):
        clock.now_ms = from_redis.now_ms
        assert twin.evaluate_now(plan) == from_redis


def test_the_interval_checker_flags_limit_plus_one_hits() -> None:
    """The checker itself must flag limit + 1 hits inside one closed unit interval."""
    assert max_hits_in_any_window([0, 500, 1000], 1000) == 3
    assert max_hits_in_any_window([0, 500, 1001], 1000) == 2


def test_the_largest_request_the_caps_allow_agrees_with_the_reference(redis_url: str) -> None:
    """As many counters as --max-descriptors lets through (64), a quarter of them named twice,
    every unit, limits from 0 to 2^32 - 1 and hits up to their cap of limit + 1: the packed
    arguments carry every number exactly, each request is one round trip, and Redis and the
    twin agree on every answer."""
    rng = random.Random(11)
    size = RequestCaps().max_descriptors
    units = [unit for unit in Unit if unit is not Unit.UNKNOWN]
    # (limit, role): a shadow counter that is always over, quota counters over after one hit,
    # and enforcing ones, the widest limit included.
    kinds = ((0, Role.SHADOW), (1, Role.QUOTA), (50, Role.ENFORCE), (2**32 - 1, Role.ENFORCE))
    names = [(f"wide{i}", *kinds[i % len(kinds)], units[i % len(units)]) for i in range(size * 3 // 4)]
    plans: list[list[CounterRequest]] = []
    for _ in range(40):
        mentions = names + rng.sample(names, size - len(names))
        rng.shuffle(mentions)
        extreme = rng.random() < 0.5  # hits up to the cap of limit + 1, which rejects
        plans.append(
            [
                counter(name, limit, unit=unit, role=role, hits=rng.choice((0, 1, limit + 1) if extreme else (0, 1)))
                for name, limit, role, unit in mentions
            ]
        )

    async def drive() -> tuple[list, int]:
        backend = RedisBackend(redis_url, timeout_s=2.0)
        await backend.prepare()
        before = backend.round_trips
        decisions = [await backend.evaluate(plan) for plan in plans]
        round_trips = backend.round_trips - before
        await backend.close()
        return decisions, round_trips

    decisions, round_trips = asyncio.run(drive())
    assert round_trips == len(plans)
    assert any(d.admitted for d in decisions) and not all(d.admitted for d in decisions)
    clock = ManualClock(0)
    twin = MemoryBackend(clock)
    for plan, from_redis in zip(plans, decisions):
        assert len(plan) == size
        clock.now_ms = from_redis.now_ms
        assert twin.evaluate_now(plan) == from_redis
