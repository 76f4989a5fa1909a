"""The limiter against the brute-force sliding log (tests/oracles.py), on both stores.

Every decision must equal the oracle's exactly: admission, per counter over/used and the
reset to the millisecond, over random request sequences in every unit and both algorithms,
limits from 1 to a million, multi-hit requests up to limit + 1, a counter named twice in one
request (duplicates, and what two share_threshold descriptors send) and every role.

Time: the in-memory twin runs on a clock the test sets, so sequences jump across bucket and
window edges of every unit. Redis decides on its own clock (TIME inside the script): the
test observes it in each reply (`Decision.now_ms`) and asks the oracle at that instant. Since
a real minute, hour or year cannot be waited for, the Redis runs start from a history written
into the counters' hashes ({bucket index -> hits}, the layout the script's header documents),
with hits placed on, just inside and just outside the window's edges; the oracle's log holds
the same hits at the same instants.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import redis

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter import Decision, Role
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.redis_backend import RedisBackend
from tests.oracles import BUCKETS_PER_UNIT, Ask, SlidingLog
from tests.support.counters import add_hits

UNITS = [unit for unit in Unit if unit is not Unit.UNKNOWN]
LIMITS = (1, 2, 3, 5, 8, 40, 1000, 10**6)
START_MS = 1_700_000_000_000


def shapes(rng: random.Random, unit: Unit, scenario: int) -> list[Ask]:
    """Up to four counters of one unit, each with its own limit, algorithm and role."""
    roles = [Role.ENFORCE, Role.ENFORCE, Role.ENFORCE, Role.SHADOW, Role.QUOTA]
    return [
        Ask(
            name=f"s{scenario}-c{index}",
            limit=rng.choice(LIMITS),
            unit=unit,
            algorithm=rng.choice([Algorithm.SLIDING_WINDOW, Algorithm.SLIDING_WINDOW, Algorithm.FIXED_WINDOW]),
            role=rng.choice(roles),
        )
        for index in range(rng.randint(1, 4))
    ]


def hits_for(rng: random.Random, limit: int) -> int:
    # Mostly single hits (the common request), then the edges: 0, the room, limit + 1.
    return rng.choice([1, 1, 1, 1, 0, 2, limit, limit + 1, rng.randint(0, limit + 1)])


def plan(rng: random.Random, counters: list[Ask]) -> list[Ask]:
    """One request: 1-3 counters, sometimes one counter two or three times (duplicates, shared
    thresholds): each mention's hits add to the earlier ones'."""
    chosen = rng.sample(counters, rng.randint(1, min(3, len(counters))))
    for chance in (0.25, 0.1):
        if rng.random() < chance:
            chosen.insert(rng.randrange(len(chosen) + 1), rng.choice(chosen))
    return [_with_hits(ask, hits_for(rng, ask.limit)) for ask in chosen]


def _with_hits(ask: Ask, hits: int) -> Ask:
    return Ask(ask.name, ask.limit, ask.unit, ask.algorithm, hits, ask.role)


def step_ms(rng: random.Random, unit: Unit) -> int:
    """The clock's next move: nothing, a little, onto or around a bucket or a window edge."""
    window_ms = unit.seconds * 1000
    bucket_ms = window_ms // BUCKETS_PER_UNIT
    return rng.choice(
        [
            0,
            0,
            1,
            rng.randint(0, bucket_ms),
            bucket_ms + rng.choice([-1, 0, 1]),
            rng.randint(1, 3) * bucket_ms + rng.choice([-1, 0, 1]),
            window_ms + rng.choice([-1, 0, 1]),
            window_ms + bucket_ms + rng.choice([-1, 0, 1]),
            rng.randint(0, 2 * window_ms),
        ]
    )


def assert_agrees(decision: Decision, expected: Decision, asks: list[Ask], where: str) -> None:
    assert decision == expected, f"{where}: {[(a.name, a.limit, a.hits, a.role.name) for a in asks]}"


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_the_in_memory_twin_agrees_with_the_sliding_log_exactly(unit: Unit) -> None:
    rng = random.Random(f"memory-{unit.name}")
    now_ms = START_MS + rng.randint(0, 10**6)
    backend = MemoryBackend(lambda: now_ms)
    for scenario in range(6):
        oracle = SlidingLog()
        counters = shapes(rng, unit, scenario)
        for step in range(120):
            now_ms += step_ms(rng, unit)
            asks = plan(rng, counters)
            decision = backend.evaluate_now([ask.counter_request() for ask in asks])
            assert_agrees(decision, oracle.decide(asks, now_ms), asks, f"scenario {scenario} step {step}")
        for ask in counters:
            if ask.role is Role.ENFORCE and ask.algorithm is Algorithm.SLIDING_WINDOW:
                # The promise behind it all: no closed interval of one unit holds more.
                assert oracle.most_in_any_window(ask.key, ask.window_ms) <= ask.limit


def redis_now_ms(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def seed_history(rng: random.Random, client: redis.Redis, oracle: SlidingLog, ask: Ask) -> None:
    """Past hits on both sides of the window's edges, in Redis and in the oracle alike."""
    now_ms = redis_now_ms(client)
    window_ms = ask.window_ms
    bucket_ms = window_ms // BUCKETS_PER_UNIT if ask.algorithm is Algorithm.SLIDING_WINDOW else window_ms
    for _ in range(rng.randint(0, 6)):
        # Buckets back from now: the current one, a few, and the oldest counted one and beyond.
        back = rng.choice([0, 1, 2, BUCKETS_PER_UNIT - 1, BUCKETS_PER_UNIT, BUCKETS_PER_UNIT + 1])
        if ask.algorithm is Algorithm.FIXED_WINDOW:
            back = rng.choice([0, 1])
        bucket = now_ms // bucket_ms - back
        at_ms = min(now_ms, bucket * bucket_ms + rng.randrange(bucket_ms))
        hits = rng.randint(1, max(1, ask.limit // 3))
        span = BUCKETS_PER_UNIT + 1 if ask.algorithm is Algorithm.SLIDING_WINDOW else 1
        add_hits(client, ask.key, at_ms // bucket_ms, hits, span, ttl_ms=2 * window_ms)
        oracle.add(ask.key, at_ms, hits)


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_redis_agrees_with_the_sliding_log_exactly(unit: Unit, redis_url: str) -> None:
    rng = random.Random(f"redis-{unit.name}")
    client = redis.Redis.from_url(redis_url)

    async def drive() -> None:
        backend = RedisBackend(redis_url, timeout_s=1.0)
        try:
            for scenario in range(4):
                oracle = SlidingLog()
                counters = shapes(rng, unit, scenario)
                for ask in counters:
                    seed_history(rng, client, oracle, ask)
                for step in range(60):
                    asks = plan(rng, counters)
                    decision = await backend.evaluate([ask.counter_request() for ask in asks])
                    expected = oracle.decide(asks, decision.now_ms)
                    assert_agrees(decision, expected, asks, f"scenario {scenario} step {step}")
                    if unit is Unit.SECOND and rng.random() < 0.3:
                        await asyncio.sleep(rng.choice([0.001, 0.01, 0.026]))  # across 25 ms buckets
        finally:
            await backend.close()

    try:
        asyncio.run(drive())
    finally:
        client.close()


def test_the_oracle_matches_figures_worked_by_hand() -> None:
    """The oracle itself, on a case computed from the README's words with pencil and paper."""
    oracle = SlidingLog()
    two_per_second = Ask("hand", 2, Unit.SECOND)
    # Buckets of 25 ms: hits at 10 ms (bucket 0) and 30 ms (bucket 1); limit 2, so full.
    assert oracle.decide([two_per_second], 10).admitted
    assert oracle.decide([two_per_second], 30).admitted
    rejected = oracle.decide([two_per_second], 500)
    assert not rejected.admitted and rejected.results[0].used == 2
    # Bucket 0 is counted while the current bucket is at most 0 + 40, so until 1025 ms.
    assert rejected.results[0].reset_ms == 1025 - 500
    assert oracle.count(two_per_second, 1024) == 2 and oracle.count(two_per_second, 1025) == 1
    # Admitted: the wait until the oldest counted hit leaves.
    one_more = Ask("hand", 3, Unit.SECOND)
    assert oracle.decide([one_more], 600).results[0].reset_ms == 1025 - 600
    # More hits than the limit never fit: a clear window, a hit made now included (bucket 44).
    too_many = Ask("hand", 3, Unit.SECOND, hits=4)
    assert oracle.decide([too_many], 1100).results[0].reset_ms == (44 + 41) * 25 - 1100
    # A fixed minute: the epoch-aligned window's end.
    fixed = Ask("fixed", 1, Unit.MINUTE, Algorithm.FIXED_WINDOW)
    assert oracle.decide([fixed], 59_000).admitted
    assert oracle.decide([fixed], 59_500).results[0].reset_ms == 500
    assert oracle.decide([fixed], 60_000).admitted
    assert oracle.hits_between(fixed.key, 59_000, 60_000) == 2
