"""Counters in Redis: one EVALSHA per request, whatever the number of descriptors.

Store exceptions are translated here, once, into BackendError with a bounded `kind`.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any, Sequence

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from ratelimit.limiter.types import Backend, BackendError, CounterRequest, CounterResult, Decision

SCRIPT_SOURCE = resources.files("ratelimit.limiter").joinpath("lua/evaluate.lua").read_text()


class RedisBackend(Backend):
    """Evaluates requests with `lua/evaluate.lua`.

    `timeout_s` bounds each call (connection included): on expiry the call fails with
    BackendError("timeout") instead of holding Envoy past its own RLS deadline.
    """

    def __init__(self, url: str, *, timeout_s: float, max_connections: int = 64) -> None:
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=max(timeout_s, 0.05),
            socket_connect_timeout=max(timeout_s, 0.05),
            max_connections=max_connections,
            decode_responses=False,
        )
        self._timeout_s = timeout_s
        self._sha: str | None = None

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        keys = [request.key for request in requests]
        args: list[Any] = []
        for request in requests:
            args += (
                request.limit,
                request.window.bucket_ms,
                request.window.span,
                request.hits,
                int(request.role),
            )
        reply = await self._guarded(self._run_script(keys, args))
        return _decision_from_reply(reply, len(requests))

    async def _run_script(self, keys: list[str], args: list[Any]) -> Any:
        if self._sha is None:
            self._sha = await self._client.script_load(SCRIPT_SOURCE)
        try:
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            # Redis restarted or SCRIPT FLUSH: load again, invisibly to the caller.
            self._sha = await self._client.script_load(SCRIPT_SOURCE)
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)

    async def _guarded(self, call: Any) -> Any:
        try:
            return await asyncio.wait_for(call, self._timeout_s)
        except (TimeoutError, redis_errors.TimeoutError) as exc:
            raise BackendError("timeout", f"redis did not answer within {self._timeout_s * 1000:g} ms") from exc
        except redis_errors.ConnectionError as exc:
            raise BackendError("connection", f"redis connection failed: {exc}") from exc
        except redis_errors.ResponseError as exc:
            raise BackendError("script", f"redis error: {exc}") from exc
        except redis_errors.RedisError as exc:
            raise BackendError("other", f"redis failure: {exc}") from exc
        except OSError as exc:
            raise BackendError("connection", f"redis connection failed: {exc}") from exc

    async def ping(self) -> None:
        await self._guarded(self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()


def _decision_from_reply(reply: Sequence[Any], count: int) -> Decision:
    if len(reply) != 2 + 3 * count:
        raise BackendError("script", f"unexpected script reply of {len(reply)} items for {count} counters")
    results = tuple(
        CounterResult(
            over_limit=bool(reply[2 + 3 * i]),
            used=int(reply[3 + 3 * i]),
            reset_ms=int(reply[4 + 3 * i]),
        )
        for i in range(count)
    )
    return Decision(admitted=bool(reply[0]), now_ms=int(reply[1]), results=results)
