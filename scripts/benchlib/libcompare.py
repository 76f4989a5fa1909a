"""Decisions per second from one process, no gRPC: the `limits` library against this project.

Both decide "may this user spend one hit of its per-minute sliding-window limit?" on the
same Redis, for users drawn from the same pool, with the same number of concurrent
callers in one asyncio loop (plus a one-at-a-time run). A decision is one descriptor
checked and charged: `SlidingWindowCounterRateLimiter.hit` for `limits`,
`RedisBackend.evaluate` with one `CounterRequest` for this project.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

USERS = 1000
MAX_DECISIONS = 2_000_000  # a backstop beside the time bound
LIMIT_PER_MINUTE = 1_000_000  # never reached: every decision charges


@dataclass(frozen=True)
class LibraryResult:
    contender: str
    concurrency: int
    decisions: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.decisions / self.seconds


async def _drive(
    decide: Callable[[str], Awaitable[object]], concurrency: int, warmup_s: float, duration_s: float
) -> int:
    """Run `concurrency` callers for warm-up + duration; count decisions finished in the window."""
    started = time.monotonic()
    measure_from, measure_to = started + warmup_s, started + warmup_s + duration_s
    counted, started_calls = 0, 0

    async def caller(seed: int) -> None:
        nonlocal counted, started_calls
        users = random.Random(seed)
        while time.monotonic() < measure_to and started_calls < MAX_DECISIONS:
            started_calls += 1
            await decide(f"user-{users.randrange(USERS)}")
            if measure_from <= time.monotonic() < measure_to:
                counted += 1

    await asyncio.gather(*(caller(seed) for seed in range(concurrency)))
    return counted


async def _limits_library(redis_url: str, concurrency: int, warmup_s: float, duration_s: float) -> LibraryResult:
    from limits import RateLimitItemPerMinute
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import SlidingWindowCounterRateLimiter

    storage = RedisStorage(
        redis_url.replace("redis://", "async+redis://", 1), implementation="redispy", max_connections=64
    )
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = RateLimitItemPerMinute(LIMIT_PER_MINUTE)

    async def decide(user: str) -> bool:
        return await limiter.hit(item, "bench", user)

    decisions = await _drive(decide, concurrency, warmup_s, duration_s)
    return LibraryResult("limits", concurrency, decisions, duration_s)


async def _project_limiter(
    redis_url: str, concurrency: int, warmup_s: float, duration_s: float, batching: bool
) -> LibraryResult:
    from ratelimit.config.model import Algorithm, Unit
    from ratelimit.limiter import CounterRequest, WindowSpec
    from ratelimit.limiter.keys import counter_key
    from ratelimit.limiter.redis_backend import RedisBackend

    options: dict[str, object] = {"timeout_s": 1.0, "max_connections": 64}
    if "batching" in inspect.signature(RedisBackend).parameters:
        options["batching"] = batching
    backend = RedisBackend(redis_url, **options)  # type: ignore[arg-type]
    window = WindowSpec.for_rule(Algorithm.SLIDING_WINDOW, Unit.MINUTE.seconds)

    async def decide(user: str) -> object:
        key = counter_key("bench-lib:", "bench", (("user", user),), Unit.MINUTE, Algorithm.SLIDING_WINDOW)
        return await backend.evaluate([CounterRequest(key=key, limit=LIMIT_PER_MINUTE, window=window, hits=1)])

    try:
        decisions = await _drive(decide, concurrency, warmup_s, duration_s)
    finally:
        await backend.close()
    name = "project limiter" + ("" if batching else " (batching off)")
    return LibraryResult(name, concurrency, decisions, duration_s)


def measure(contender: str, redis_url: str, concurrency: int, warmup_s: float, duration_s: float) -> LibraryResult:
    """Process entry point (run in a fresh process per measurement)."""
    if contender == "limits":
        return asyncio.run(_limits_library(redis_url, concurrency, warmup_s, duration_s))
    batching = contender != "project-unbatched"
    return asyncio.run(_project_limiter(redis_url, concurrency, warmup_s, duration_s, batching))
