"""Every in-process cache keyed by request data is bounded in bytes, whatever the requests carry."""

from __future__ import annotations

import gc
import time
import tracemalloc
from typing import Iterator

import pytest

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter import keys
from ratelimit.limiter.lru import ENTRY_OVERHEAD_BYTES, ByteBoundedLru

MB = 1024 * 1024


@pytest.fixture
def empty_key_cache() -> Iterator[ByteBoundedLru[keys.CacheInput, str]]:
    cache = keys.key_cache()
    cache.clear()
    yield cache
    cache.clear()


def retained_bytes_after(fill: object) -> int:
    """Bytes still allocated once `fill()` returned and garbage was collected."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()  # type: ignore[operator]
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_lru_never_holds_more_than_its_byte_budget() -> None:
    cache: ByteBoundedLru[int, str] = ByteBoundedLru(max_bytes=10_000, max_entry_bytes=2_000)
    for index in range(1_000):
        cache.put(index, "v", size=700)
        assert cache.bytes <= 10_000
    assert len(cache) == 10_000 // (700 + ENTRY_OVERHEAD_BYTES)
    assert cache.get(999) == "v" and cache.get(0) is None  # the oldest went first


def test_the_lru_evicts_the_least_recently_used_and_skips_oversized_entries() -> None:
    cache: ByteBoundedLru[str, int] = ByteBoundedLru(max_bytes=3 * (100 + ENTRY_OVERHEAD_BYTES), max_entry_bytes=500)
    for name in "abc":
        cache.put(name, 1, size=100)
    assert cache.get("a") == 1  # now the most recent
    cache.put("d", 1, size=100)
    assert cache.get("b") is None and cache.get("a") == 1
    cache.put("huge", 1, size=5_000)
    assert cache.get("huge") is None and len(cache) == 3


def test_huge_descriptor_values_are_not_retained_by_the_key_cache(empty_key_cache: ByteBoundedLru) -> None:
    """Attack 2: 300 requests with distinct 900 KB values kept 266 MB alive in lru_cache."""

    def fill() -> None:
        for index in range(300):
            value = f"{index:06d}" + "x" * 900_000
            keys.counter_key("ratelimit:", "d", (("path", value),), Unit.MINUTE, Algorithm.SLIDING_WINDOW)

    retained = retained_bytes_after(fill)
    assert retained < 1 * MB, f"{retained / MB:.1f} MB retained"
    assert len(empty_key_cache) == 0


def test_many_medium_values_fill_the_key_cache_only_to_its_budget(empty_key_cache: ByteBoundedLru) -> None:
    def fill() -> None:
        for index in range(20_000):  # 20,000 x ~3 KB = 60 MB of request data
            value = f"{index:06d}" + "y" * 3_000
            keys.counter_key("ratelimit:", "d", (("path", value),), Unit.MINUTE, Algorithm.SLIDING_WINDOW)

    retained = retained_bytes_after(fill)
    assert empty_key_cache.bytes <= keys.KEY_CACHE_BYTES
    # The estimate charges what the entries hold; allow the OrderedDict's table on top.
    assert retained < keys.KEY_CACHE_BYTES + 2 * MB, f"{retained / MB:.1f} MB retained"


def test_the_cached_key_is_the_computed_key(empty_key_cache: ByteBoundedLru) -> None:
    entries = (("user", "alice"),)
    first = keys.counter_key("p:", "d", entries, Unit.SECOND, Algorithm.FIXED_WINDOW)
    empty_key_cache.clear()
    assert keys.counter_key("p:", "d", entries, Unit.SECOND, Algorithm.FIXED_WINDOW) == first
    assert keys.counter_key("p:", "d", entries, Unit.SECOND, Algorithm.FIXED_WINDOW) == first  # from the cache
    assert keys.counter_key("p:", "d", entries, Unit.MINUTE, Algorithm.FIXED_WINDOW) != first


def test_key_cache_eviction_stays_constant_time(empty_key_cache: ByteBoundedLru) -> None:
    slowest = 0.0
    for index in range(60_000):
        started = time.perf_counter()
        keys.counter_key("ratelimit:", "d", (("n", f"{index}" + "z" * 400),), Unit.MINUTE, Algorithm.SLIDING_WINDOW)
        slowest = max(slowest, time.perf_counter() - started)
    assert empty_key_cache.bytes <= keys.KEY_CACHE_BYTES
    assert slowest < 0.05, f"slowest call {slowest * 1000:.1f} ms"
