"""Counters in Redis: one script call per request, whatever the number of descriptors.

One server (`redis://`, `rediss://`, `unix://`) goes through the lean pipelined client
(`pipelined`): one connection, calls written at once or, under load, several in one write,
each still its own atomic EVALSHA. Redis Cluster and Sentinel go through redis-py, which
follows redirections and failovers (`redis_py_scripts`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from ratelimit.limiter.pipeline_window import PipelineWindow
from ratelimit.limiter.pipelined import PipelinedRedis, RedisReplyError, pack_command
from ratelimit.limiter.redis_connect import endpoint_from_url, parse_target
from ratelimit.limiter.redis_py_scripts import RedisPyScripts
from ratelimit.limiter.redis_url import RedisUrl, parse_redis_url
from ratelimit.limiter.script import (
    SCRIPT_SHA,
    SCRIPT_SOURCE,
    decision_from_reply,
    script_arguments,
    with_script_loaded,
)
from ratelimit.limiter.types import Backend, BackendError, CounterRequest, Decision


class ScriptRunner(Protocol):
    @property
    def round_trips(self) -> int: ...

    async def run(self, keys: list[str], args: list[bytes]) -> Any: ...
    async def ping(self) -> None: ...
    async def prepare(self) -> None: ...
    async def close(self) -> None: ...


class RedisBackend(Backend):
    """Evaluates requests with `lua/evaluate.lua`.

    `timeout_s` bounds each call (connection included): on expiry the call fails with
    BackendError("timeout") instead of holding Envoy past its own RLS deadline.
    `max_connections` sizes redis-py's pools (Cluster, Sentinel). One server needs one
    connection, as Redis answers pipelined calls in order; there it bounds the calls out at
    once when batching is off (batches: two writes out at once).
    `pipeline_window` (batching only) holds calls that come close together so that they share
    a write (see `pipeline_window`); a cluster sends each call alone, so it has none there.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_connections: int = 64,
        batching: bool = True,
        connection_options: Mapping[str, Any] | None = None,
        on_round_trip: Callable[[float], None] | None = None,
        pipeline_window: PipelineWindow | None = None,
    ) -> None:
        options = connection_options or {}
        # Called with the seconds of each script call that went to Redis (failed ones too):
        # answers of the over-limit cache or the open breaker never get here.
        self._on_round_trip = on_round_trip
        parsed = parse_redis_url(url)
        target = parse_target(parsed)
        common: dict[str, Any] = dict(
            timeout_s=timeout_s,
            max_connections=max_connections,
            batching=batching,
            options=options,
            window=pipeline_window,
        )
        self._runner: ScriptRunner = (
            PipelinedScripts(parsed, **common) if target.kind == "single" else RedisPyScripts(target, **common)
        )

    @property
    def round_trips(self) -> int:
        """Writes of script calls to Redis: batches, or single calls."""
        return self._runner.round_trips

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        keys, args = script_arguments(requests)
        if self._on_round_trip is None:
            return decision_from_reply(await self._runner.run(keys, args), len(requests))
        started = time.perf_counter()
        try:
            reply = await self._runner.run(keys, args)
        finally:
            self._on_round_trip(time.perf_counter() - started)
        return decision_from_reply(reply, len(requests))

    async def ping(self) -> None:
        await self._runner.ping()

    async def prepare(self) -> None:
        # Connect and load the script now, so the first request does not pay for both
        # within its timeout.
        await self._runner.prepare()

    async def close(self) -> None:
        await self._runner.close()


class PipelinedScripts:
    """The script over one server's pipelined connection."""

    def __init__(
        self,
        url: RedisUrl,
        *,
        timeout_s: float,
        max_connections: int,
        batching: bool,
        options: Mapping[str, Any],
        window: PipelineWindow | None = None,
    ) -> None:
        self._redis = PipelinedRedis(
            endpoint_from_url(url, options),
            timeout_s=timeout_s,
            batching=batching,
            max_writes_in_flight=2 if batching else max_connections,
            window=window,
        )
        self._timeout_s = timeout_s

    @property
    def round_trips(self) -> int:
        return self._redis.round_trips

    async def run(self, keys: list[str], args: list[bytes]) -> Any:
        evalsha = pack_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
        deadline = asyncio.get_running_loop().time() + self._timeout_s  # a reload included
        try:
            return await with_script_loaded(lambda: self._redis.send(evalsha), self._load, _is_noscript, deadline)
        except TimeoutError:
            raise BackendError("timeout", f"redis did not answer within {self._timeout_s * 1000:g} ms") from None
        except RedisReplyError as exc:
            raise BackendError("script", f"redis error: {exc}") from None

    async def _load(self) -> None:
        await self._redis.execute("SCRIPT", "LOAD", SCRIPT_SOURCE)

    async def ping(self) -> None:
        try:
            await self._redis.execute("PING")
        except RedisReplyError as exc:
            raise BackendError("other", f"redis error: {exc}") from None

    async def prepare(self) -> None:
        try:
            await self._load()
        except RedisReplyError as exc:
            raise BackendError("connection", f"redis not ready: {exc}") from None

    async def close(self) -> None:
        await self._redis.close()


def _is_noscript(exc: BaseException) -> bool:
    return isinstance(exc, RedisReplyError) and str(exc).startswith("NOSCRIPT")
