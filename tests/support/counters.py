"""Counters as Redis holds them, read and written from the outside by the README's layout
("The sliding window and its bounds"), never through the project's script: a string whose first
8 bytes are the newest bucket's index and the next 8 the sum of the hits stored (little-endian
doubles), then 4 bytes (little-endian unsigned) of hits per bucket, newest first, one bucket
older each."""

from __future__ import annotations

import struct

import redis

HEADER = struct.Struct("<dd")
SLOT = struct.Struct("<I")


def decode(raw: bytes) -> dict[int, int]:
    """{bucket index: hits} of a stored counter, zero buckets left out."""
    assert len(raw) >= HEADER.size + SLOT.size and (len(raw) - HEADER.size) % SLOT.size == 0, raw
    newest, total = HEADER.unpack_from(raw)
    assert newest == int(newest) >= 0, newest
    slots = [hits for (hits,) in SLOT.iter_unpack(raw[HEADER.size :])]
    assert total == sum(slots), f"the stored sum {total} is not the sum of the buckets stored {slots}"
    return {int(newest) - age: hits for age, hits in enumerate(slots) if hits}


def encode(buckets: dict[int, int]) -> bytes:
    newest = max(buckets)
    ages = range(newest - min(buckets) + 1)
    slots = [buckets.get(newest - age, 0) for age in ages]
    return HEADER.pack(newest, sum(slots)) + b"".join(SLOT.pack(hits) for hits in slots)


def buckets_of(client: redis.Redis, key: str | bytes) -> dict[int, int]:
    raw = client.get(key)
    return {} if raw is None else decode(raw)


def slot_count(client: redis.Redis, key: str | bytes) -> int:
    """How many buckets the stored counter holds (the README: at most K + 1 = 41)."""
    raw = client.get(key)
    return 0 if raw is None else (len(raw) - HEADER.size) // SLOT.size


def held_hits(client: redis.Redis, key: str | bytes) -> int:
    """Hits the counter holds: those in the window as of its last charge."""
    return sum(buckets_of(client, key).values())


def add_hits(client: redis.Redis, key: str, bucket: int, hits: int, span: int, ttl_ms: int) -> None:
    """Put `hits` into `bucket` of the stored counter, as a replica would have (buckets more than
    `span` older than the newest are dropped, as a replica drops them)."""
    buckets = buckets_of(client, key)
    buckets[bucket] = buckets.get(bucket, 0) + hits
    newest = max(buckets)
    client.set(key, encode({b: h for b, h in buckets.items() if b > newest - span}), px=ttl_ms)
