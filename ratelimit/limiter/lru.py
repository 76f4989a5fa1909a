"""A least-recently-used cache bounded in bytes, for values derived from request data.

`functools.lru_cache` bounds the number of entries, not their size: keyed by request data,
65,536 entries of 900 KB values held 64 GB at worst. Here each entry is charged its size
(the caller's estimate), the total never exceeds `max_bytes`, and an entry larger than
`max_entry_bytes` is not kept at all (computing it again is cheaper than the memory).
Every operation is O(1) amortised: a hit moves the entry to the end of an OrderedDict, and
eviction pops from its front.
"""

from __future__ import annotations

import collections
import sys
from typing import Generic, Hashable, Iterable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# What an entry costs beyond its strings: the OrderedDict's slot and link, the key tuple.
ENTRY_OVERHEAD_BYTES = 200


def strings_size(strings: Iterable[str]) -> int:
    """The memory of these strings, as Python holds them (1 to 4 bytes a character)."""
    return sum(sys.getsizeof(text) for text in strings)


class ByteBoundedLru(Generic[K, V]):
    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        if not 0 < max_entry_bytes <= max_bytes:
            raise ValueError("need 0 < max_entry_bytes <= max_bytes")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._entries: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()
        self.bytes = 0

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: K, value: V, size: int) -> None:
        size += ENTRY_OVERHEAD_BYTES
        if size > self.max_entry_bytes:
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.bytes -= previous[1]
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._entries[key] = (value, size)
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
