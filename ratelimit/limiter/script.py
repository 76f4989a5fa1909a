"""The one Lua script that decides a request (`lua/evaluate.lua`): its source, arguments and reply."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from importlib import resources
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from ratelimit.limiter.types import BackendError, CounterRequest, CounterResult, Decision

SCRIPT_SOURCE = resources.files("ratelimit.limiter").joinpath("lua/evaluate.lua").read_text()
# What Redis calls the script (EVALSHA), known without asking it.
SCRIPT_SHA = hashlib.sha1(SCRIPT_SOURCE.encode()).hexdigest()

Reply = TypeVar("Reply")


async def with_script_loaded(
    call: Callable[[], Awaitable[Reply]],
    load: Callable[[], Awaitable[object]],
    is_missing: Callable[[BaseException], bool],
    deadline: float | None = None,
) -> Reply:
    """Runs `call` (an EVALSHA); if Redis lost the script (restart, SCRIPT FLUSH), loads it
    and runs `call` once more, invisibly to the caller, by `deadline` (loop time) if given.
    The one NOSCRIPT fallback."""
    try:
        return await call()
    except Exception as exc:
        if not is_missing(exc):
            raise
    async with asyncio.timeout_at(deadline):
        await load()
        return await call()


# ARGV is one string: five little-endian doubles per counter. Redis hands every argument to
# Lua as a string, and a number read out of one costs a strtod; one string read by
# struct.unpack costs Redis 12% fewer instructions per decision than five numbers as text
# (callgrind; README, "The state tier"). Every number sent is an integer below 2^53, which a
# double holds exactly: limits below 2^32, hits capped at limit + 1, bucket lengths in ms.
COUNTER_ARGUMENTS = struct.Struct("<5d")


def script_arguments(requests: Sequence[CounterRequest]) -> tuple[list[str], list[bytes]]:
    """KEYS and ARGV: one key per counter; limit, bucket_ms, span, hits and role per counter."""
    keys = [request.key for request in requests]
    packed = b"".join(
        COUNTER_ARGUMENTS.pack(request.limit, request.window.bucket_ms, request.window.span, request.hits, request.role)
        for request in requests
    )
    return keys, [packed]


def decision_from_reply(reply: Any, count: int) -> Decision:
    """{admitted, now_ms, then over_limit, used, reset_ms per counter} as a Decision."""
    if not isinstance(reply, list) or len(reply) != 2 + 3 * count:
        size = len(reply) if isinstance(reply, list) else type(reply).__name__
        raise BackendError("script", f"unexpected script reply ({size}) for {count} counters")
    results = tuple(
        CounterResult(
            over_limit=bool(reply[2 + 3 * i]),
            used=int(reply[3 + 3 * i]),
            reset_ms=int(reply[4 + 3 * i]),
        )
        for i in range(count)
    )
    return Decision(admitted=bool(reply[0]), now_ms=int(reply[1]), results=results)
