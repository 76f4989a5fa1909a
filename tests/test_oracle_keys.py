"""Counter keys, seen from Redis: descriptors that a naive encoding would merge get distinct
counters, found by SCAN and counted by HGETALL, never through the project's key function."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry

from ratelimit.config import load_config
from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter import keys
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.metrics import Metrics
from ratelimit.service import Code, DescriptorRequest, RateLimitService, ServiceOptions
from tests.support.counters import held_hits

PREFIX = "ratelimit:"  # the default prefix; README: keys are then 69 bytes long
KEY_BYTES = 69
LONG = "v" * 5000  # over the key cache's 4 KiB entry cap: hashed on every call

# Each pair (or group) differs, yet would share one counter under a careless encoding:
# joined with a separator, truncated, normalised, or with keys and values run together.
TRICKY: list[tuple[tuple[str, str], ...]] = [
    (("a_b", "c"),),
    (("a", "b_c"),),
    (("ab", "c"),),  # run together with no separator at all
    (("a", "bc"),),
    (("a", "b"), ("cd", "")),
    (("a", "b"), ("c", "d"), ("", "")),
    (("a", "b"), ("c", "d")),
    (("a", "b_c_d"),),
    (("a_b_c", "d"),),
    (("a:b", "c"),),
    (("a", "b:c"),),
    (("1:a", "1:b"),),
    (("1", "a1:b"),),
    (("k", ""), ("", "k")),
    (("k", ""),),
    (("", "k"),),
    (("k", "v"), ("k", "v")),
    (("k", "v"),),
    (("v", "k"),),
    (("é", "x"),),  # precomposed
    (("e\u0301", "x"),),  # e + combining acute: looks the same, another string
    (("ﬁ", "x"),),  # the ligature, which NFKC turns into "fi"
    (("fi", "x"),),
    (("{tag}", "x"),),  # braces: a Redis Cluster hash tag in a naive key
    (("k", LONG + "a"),),
    (("k", LONG + "b"),),
    (("k", LONG),),
    (("k", LONG[:-1]),),
]


def test_tricky_descriptors_get_distinct_counters_in_redis(redis_url: str, tmp_path: Path) -> None:
    config_file = tmp_path / "limits.yaml"
    config_file.write_text("domain: collide\ndescriptors:\n  - key: anything\n")
    config = load_config([config_file])
    # Limit overrides take any entries to a counter of their own (as envoyproxy/ratelimit).
    override = (1000, int(Unit.HOUR))

    async def drive() -> None:
        backend = RedisBackend(redis_url, timeout_s=1.0)
        service = RateLimitService(lambda: config, backend, Metrics(CollectorRegistry()), ServiceOptions(PREFIX))
        try:
            # Descriptor i is charged i + 1 times: two descriptors sharing a counter would show
            # up as one key holding the sum of their charges.
            for index, entries in enumerate(TRICKY):
                for _ in range(index + 1):
                    decision = await service.should_rate_limit(
                        "collide", [DescriptorRequest(entries=entries, override=override)]
                    )
                    assert decision.overall_code is Code.OK
        finally:
            await backend.close()

    asyncio.run(drive())
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{PREFIX}*", count=1000))
        held = sorted(held_hits(client, key) for key in keys)
        assert held == [index + 1 for index in range(len(TRICKY))]
        assert {len(key) for key in keys} == {KEY_BYTES}
    finally:
        client.close()


def test_domain_unit_and_algorithm_each_separate_counters(redis_url: str, tmp_path: Path) -> None:
    """The same entries under another domain, unit or algorithm are another counter."""
    (tmp_path / "one.yaml").write_text(
        "domain: one\ndescriptors:\n"
        "  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 100}\n"
        "  - key: fixed\n    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: fixed_window}\n"
    )
    (tmp_path / "two.yaml").write_text(
        "domain: two\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 100}\n"
    )
    config = load_config([tmp_path / "one.yaml", tmp_path / "two.yaml"])
    asked = [
        ("one", (("k", "v"),), None),
        ("two", (("k", "v"),), None),
        ("one", (("k", "v"),), (100, int(Unit.HOUR))),
        ("one", (("k", "v"),), (100, int(Unit.DAY))),
        ("one", (("fixed", "v"),), None),
        ("one", (("fixed", "v"),), (100, int(Unit.MINUTE))),  # an override is a sliding window
    ]

    async def drive() -> None:
        backend = RedisBackend(redis_url, timeout_s=1.0)
        service = RateLimitService(lambda: config, backend, Metrics(CollectorRegistry()), ServiceOptions(PREFIX))
        try:
            for index, (domain, entries, override) in enumerate(asked):
                for _ in range(index + 1):
                    await service.should_rate_limit(domain, [DescriptorRequest(entries=entries, override=override)])
        finally:
            await backend.close()

    asyncio.run(drive())
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{PREFIX}*", count=1000))
        held = sorted(held_hits(client, key) for key in keys)
        assert held == [index + 1 for index in range(len(asked))]
        # One hash slot per domain: the {tag} of every key of a domain is the same.
        tags = {key.split(b"}")[0] for key in keys}
        assert len(tags) == 2
    finally:
        client.close()


README_KEY_CACHE_BYTES = 16 * 1024 * 1024  # README: "LRU bounded in bytes: 16 MiB"


def test_the_key_cache_fills_up_to_16_mib_of_memory_and_no_further() -> None:
    """Measured from the outside (tracemalloc): 60 MB of distinct 3 KB values leave at most
    16 MiB behind, the cache's table included; and the cache does keep recent keys, up to that."""
    cache = keys.key_cache()
    cache.clear()

    def fill() -> None:
        for index in range(20_000):
            value = f"{index:06d}" + "y" * 3_000
            keys.counter_key(PREFIX, "d", (("path", value),), Unit.MINUTE, Algorithm.SLIDING_WINDOW)

    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert retained <= README_KEY_CACHE_BYTES, f"{retained / 2**20:.2f} MiB retained"
        # Kept: within one entry (about 3.3 KB here) of the budget.
        assert README_KEY_CACHE_BYTES - 8 * 1024 <= cache.bytes <= README_KEY_CACHE_BYTES
    finally:
        cache.clear()
