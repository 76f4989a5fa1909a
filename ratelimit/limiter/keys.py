"""Counter keys: collision-free, bounded in length, one Redis Cluster hash slot per domain.

A key is `<prefix>{<domain tag>}:<digest>`. The digest is BLAKE2b-160 of an unambiguous,
length-prefixed encoding of (domain, algorithm, unit, entries), so ("a_b", "c") and
("a", "b_c") never share a counter, and a value of any length gives a key of fixed size.
The hash tag depends on the domain only: every counter a request touches is in the same
slot, which keeps one request one script call on Redis Cluster.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Sequence

from ratelimit.config.model import Algorithm, Unit

KEY_CACHE_SIZE = 65536


def _encode(parts: Sequence[str]) -> bytes:
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        out += b"%d:" % len(raw)
        out += raw
    return bytes(out)


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def domain_tag(domain: str) -> str:
    return hashlib.blake2b(_encode([domain]), digest_size=8).hexdigest()


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def counter_key(
    prefix: str,
    domain: str,
    entries: tuple[tuple[str, str], ...],
    unit: Unit,
    algorithm: Algorithm,
) -> str:
    parts = [domain, algorithm.value, unit.name]
    for key, value in entries:
        parts.append(key)
        parts.append(value)
    digest = hashlib.blake2b(_encode(parts), digest_size=20).hexdigest()
    return f"{prefix}{{{domain_tag(domain)}}}:{digest}"
