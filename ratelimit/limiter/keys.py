"""Counter keys: collision-free, bounded in length, one Redis Cluster hash slot per domain.

A key is `<prefix>{<domain tag>}:<digest>`. The digest is BLAKE2b-160 of an unambiguous,
length-prefixed encoding of (counter layout, domain, algorithm, unit, entries), so ("a_b", "c") and
("a", "b_c") never share a counter, and a value of any length gives a key of fixed size.
The hash tag depends on the domain only: every counter a request touches is in the same
slot, which keeps one request one script call on Redis Cluster.

Keys are computed for every descriptor of every request, so recent ones are cached; the
cache is bounded in bytes (request data of any size cannot grow it past KEY_CACHE_BYTES).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter.lru import ByteBoundedLru, strings_size

# The layout of a stored counter (lua/evaluate.lua), part of every digest: counters an earlier
# layout wrote (hashes of buckets) are never read as this one's, so replicas of two versions
# side by side during a rolling upgrade count apart for at most one window, without errors.
COUNTER_LAYOUT = "packed-1"
KEY_CACHE_BYTES = 16 * 1024 * 1024
# Inputs larger than this are hashed on every call instead: a hash of a few KB costs
# microseconds, and caching them would let a few hostile requests evict everything else.
KEY_CACHE_MAX_ENTRY_BYTES = 4096

CacheInput = tuple[str, str, tuple[tuple[str, str], ...], Unit, Algorithm]
_key_cache: ByteBoundedLru[CacheInput, str] = ByteBoundedLru(KEY_CACHE_BYTES, KEY_CACHE_MAX_ENTRY_BYTES)


def _encode(parts: Sequence[str]) -> bytes:
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        out += b"%d:" % len(raw)
        out += raw
    return bytes(out)


def domain_tag(domain: str) -> str:
    return hashlib.blake2b(_encode([domain]), digest_size=8).hexdigest()


def counter_key(
    prefix: str,
    domain: str,
    entries: tuple[tuple[str, str], ...],
    unit: Unit,
    algorithm: Algorithm,
) -> str:
    cache_input = (prefix, domain, entries, unit, algorithm)
    key = _key_cache.get(cache_input)
    if key is not None:
        return key
    parts = [COUNTER_LAYOUT, domain, algorithm.value, unit.name]
    for entry_key, value in entries:
        parts.append(entry_key)
        parts.append(value)
    digest = hashlib.blake2b(_encode(parts), digest_size=20).hexdigest()
    key = f"{prefix}{{{domain_tag(domain)}}}:{digest}"
    size = strings_size(parts) + strings_size((prefix, key)) + 64 * len(entries)  # + the entry tuples
    _key_cache.put(cache_input, key, size)
    return key


def key_cache() -> ByteBoundedLru[CacheInput, str]:
    """The process's key cache (tests attack it; the README states its bound)."""
    return _key_cache
