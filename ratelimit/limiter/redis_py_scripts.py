"""The script over redis-py, for Redis Cluster and Sentinel (one server uses `pipelined`).

redis-py follows MOVED/ASK and slot migrations on a cluster and asks the sentinels for the
primary after a failover. With batching on (Sentinel), the EVALSHAs of all requests that
arrive in one event-loop turn (or, with a pipeline window, within the window) go out in one
pipeline, each still its own atomic script call; redis-py refuses script calls in cluster
pipelines, so on a cluster each request is its own EVALSHA to the node of its slot. redis-py's
exceptions are translated here, once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Mapping

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from ratelimit.limiter.pipeline_window import PipelineWindow
from ratelimit.limiter.redis_connect import RedisTarget, make_client
from ratelimit.limiter.script import SCRIPT_SHA, SCRIPT_SOURCE, with_script_loaded
from ratelimit.limiter.types import BackendError

# Pipelines out at once; more requests queue and go together when one comes back.
MAX_PIPELINES_IN_FLIGHT = 2


class RedisPyScripts:
    def __init__(
        self,
        target: RedisTarget,
        *,
        timeout_s: float,
        max_connections: int,
        batching: bool,
        options: Mapping[str, Any],
        window: PipelineWindow | None = None,
    ) -> None:
        floor_s = max(timeout_s, 0.05)  # redis-py's socket timeouts below this fail healthy calls
        self._client = make_client(target, timeout_s=floor_s, max_connections=max_connections, options=options)
        self._timeout_s = timeout_s
        self._batching = batching and not isinstance(self._client, RedisCluster)
        self._pending: list[_Call] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._window = window if window is not None and window.enabled else None
        self._window_end: asyncio.TimerHandle | None = None  # set while a window holds the queue
        self.round_trips = 0  # script calls sent: pipelines, or single EVALSHAs

    async def run(self, keys: list[str], args: list[bytes]) -> Any:
        send = self._batched if self._batching else self._evalsha
        return await self._guarded(with_script_loaded(lambda: send(keys, args), self._load, _is_noscript))

    async def _batched(self, keys: list[str], args: list[bytes]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Call(keys, args, future))
        window = self._window
        # As the pipelined client: a call the window holds, or one made while a window is open,
        # waits for its end, unless the calls waiting are enough to go (the limit).
        if window is not None and (window.hold(loop.time()) or self._window_end is not None):
            if window.full(len(self._pending)):
                self._end_window()
            elif self._window_end is None and not self._flush_scheduled:
                self._flush_scheduled = True  # by the window's end, not this loop turn's
                self._window_end = loop.call_later(window.window_s, self._end_window)
        self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        # Send at the end of this loop turn (so requests that arrive together go together),
        # unless enough pipelines are out: then the queue goes when one comes back.
        if self._pending and not self._flush_scheduled and len(self._flushes) < MAX_PIPELINES_IN_FLIGHT:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _end_window(self) -> None:
        if self._window_end is not None:
            self._close_window()
            self._flush_scheduled = False
        self._schedule_flush()

    def _close_window(self) -> None:
        if self._window_end is not None:
            self._window_end.cancel()
            self._window_end = None

    def _flush(self) -> None:
        self._flush_scheduled = False
        # A caller that gave up (its deadline passed while queued) was answered already: sent
        # now, its call would be charged with nobody told.
        batch = [call for call in self._pending if not call.future.done()]
        self._pending = []
        if not batch:
            return
        task = asyncio.create_task(self._execute(batch))
        self._flushes.add(task)  # keep a reference until done
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._schedule_flush()

    async def _execute(self, batch: list[_Call]) -> None:
        """Run one pipeline; every outcome lands on its caller's future, never in the loop."""
        try:
            for call, reply in zip(batch, await self._pipeline(batch)):
                call.settle(reply)  # an error reply (NOSCRIPT too) is raised to its caller
        except BaseException as exc:  # handed to the callers, who translate it
            for call in batch:
                call.settle(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:  # a plain call costs less than a pipeline of one
            return [await self._evalsha(batch[0].keys, batch[0].args)]
        self.round_trips += 1
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            pipe.evalsha(SCRIPT_SHA, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _evalsha(self, keys: list[str], args: list[bytes]) -> Any:
        self.round_trips += 1
        return await self._client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)

    async def _load(self) -> None:
        await self._client.script_load(SCRIPT_SOURCE)

    async def _guarded(self, call: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):  # no extra task, unlike wait_for
                return await call
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

    async def prepare(self) -> None:
        try:
            await self._load()
        except redis_errors.RedisError as exc:
            raise BackendError("connection", f"redis not ready: {exc}") from exc

    async def close(self) -> None:
        self._close_window()
        for task in list(self._flushes):
            task.cancel()
        if isinstance(self._client, RedisCluster):
            await self._client.aclose()
        else:  # the sentinel's primary: its pool is not closed with it by default
            await self._client.aclose(close_connection_pool=True)
            # Nor are the connections that asked the sentinels where the primary is.
            for sentinel in self._client.connection_pool.sentinel_manager.sentinels:
                await sentinel.aclose()


def _is_noscript(exc: BaseException) -> bool:
    return isinstance(exc, redis_errors.NoScriptError)


@dataclass(slots=True)
class _Call:
    keys: list[str]
    args: list[bytes]
    future: asyncio.Future[Any]

    def settle(self, outcome: Any) -> None:
        if self.future.done():  # the caller gave up (timeout) meanwhile
            return
        if isinstance(outcome, asyncio.CancelledError):
            self.future.cancel()
        elif isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)
