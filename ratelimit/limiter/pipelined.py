"""A lean pipelined Redis client for the hot path: one connection, RESP2, replies parsed by hiredis.

Why not redis-py for one server: every call there checks a connection out of a pool, goes
through a retry wrapper and a StreamReader, and wakes a task of its own; the server profile put
that at a tenth of the server's CPU, more than this project's own code. Here a call is one
packed command and one future. It goes out at once, or, while writes are waiting for their
replies, together with the other calls that queued meanwhile (Redis answers pipelined commands
in order), or, with a pipeline window (`pipeline_window`), together with the calls that come
within the window. One `data_received` parses the replies of a whole write and resolves their
futures directly, with no task in between.

Failures reach callers as BackendError with a bounded kind:
- "timeout": no reply within `timeout_s` of the call (connecting included). Only that call
  fails: the connection stays, and its reply, when it comes, is read and skipped in order, so
  calls written after it still get theirs within their own deadlines. What is owed is bounded
  by the writes in flight. A connection that has owed a reply for `stale_after_s` is dead to
  us (a partition, a Redis that never wakes) and is dropped.
- "connection": connecting, authenticating or the connection itself failed. Nothing is
  retried here: the circuit breaker and the failure mode decide what happens next. The next
  call connects again.
Error replies (`-ERR ...`) resolve the call's future with a RedisReplyError for the caller.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Iterable, cast

import hiredis

from ratelimit.limiter.pipeline_window import PipelineWindow
from ratelimit.limiter.types import BackendError

DEFAULT_PORT = 6379  # the IANA port of Redis
# Connecting (TCP, TLS, AUTH) may take longer than one call may wait: the calls waiting for it
# give up at their own deadlines, and the connection is then ready for the next ones.
MIN_CONNECT_TIMEOUT_S = 0.5
# A reply owed this long means the connection is dead (no RST reached us): start afresh. Well
# past any call's deadline, so a Redis that is only slow keeps its connection.
MIN_STALE_S = 1.0


class RedisReplyError(Exception):
    """An error reply from Redis (`-NOSCRIPT ...`, `-WRONGPASS ...`)."""


@dataclass(frozen=True)
class Endpoint:
    """Where one Redis server is and how to log in; `path` for a Unix socket."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str = ""
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl_context: ssl.SSLContext | None = None


def pack_command(*args: str | bytes | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    """One socket: futures wait in the order their commands were written, in batches (writes)."""

    def __init__(self, on_lost: Callable[[_Connection], None], on_batch_done: Callable[[], None]) -> None:
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._batch_sizes: collections.deque[int] = collections.deque()  # replies owed per write
        self._on_lost = on_lost
        self._on_batch_done = on_batch_done
        self._transport: asyncio.Transport | None = None
        self._owed_since = 0.0  # loop time of the oldest owed write, or of the last answer
        self.lost = False  # set once, never cleared: a lost connection is never used again

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)

    @property
    def batches_in_flight(self) -> int:
        return len(self._batch_sizes)

    def write(self, data: bytes, futures: list[asyncio.Future[Any]]) -> None:
        assert self._transport is not None
        if not self._batch_sizes:
            self._owed_since = asyncio.get_running_loop().time()
        self._waiting.extend(futures)
        self._batch_sizes.append(len(futures))
        self._transport.write(data)

    def owed_for(self, now: float) -> float:
        """How long the oldest reply still owed has been waited for (0 when nothing is owed)."""
        return now - self._owed_since if self._batch_sizes else 0.0

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting, batch_sizes = self._waiting, self._batch_sizes
        batches_done = 0
        try:
            while (reply := self._reader.gets()) is not False:
                future = waiting.popleft()
                batch_sizes[0] -= 1
                if not batch_sizes[0]:
                    batch_sizes.popleft()
                    batches_done += 1
                    self._owed_since = asyncio.get_running_loop().time()  # Redis is answering
                if future.done():  # its caller gave up; the reply still belongs here
                    continue
                if isinstance(reply, RedisReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort("connection", f"redis protocol error: {exc or 'unexpected reply'}")
            return
        if batches_done:
            self._on_batch_done()

    def abort(self, kind: str, reason: str) -> None:
        self.lost = True
        self._fail_waiting(BackendError(kind, reason))
        self._on_lost(self)  # at once: nothing more may be written here
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_waiting(
            BackendError("connection", f"redis connection lost: {exc}" if exc else "redis closed the connection")
        )
        self._on_lost(self)

    def _fail_waiting(self, error: BackendError) -> None:
        self._batch_sizes.clear()
        waiting, self._waiting = self._waiting, collections.deque()
        _fail(waiting, error)


class PipelinedRedis:
    """Commands pipelined on one connection, opened on first use and again after a loss.

    A command goes out at once while fewer than `max_writes_in_flight` writes wait for their
    replies. Beyond that, commands queue; with `batching`, the queue leaves in one write at
    the end of the loop turn or when a write is answered, whichever allows it first (so
    batches grow with the load, and a light load pays no wait); without, one write each.
    With a `window` (batching only), a call that the window holds queues too, and the queue
    leaves when the window ends or fills; a write answered meanwhile does not end it.
    The bound also limits what a frozen Redis can be handed: queued commands whose callers
    gave up are never sent, so they can never be carried out later without an answer.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout_s: float,
        batching: bool = True,
        max_writes_in_flight: int = 2,
        stale_after_s: float | None = None,
        window: PipelineWindow | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._stale_after_s = stale_after_s if stale_after_s is not None else max(4 * timeout_s, MIN_STALE_S)
        self._batching = batching
        self._max_writes_in_flight = max_writes_in_flight
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._unarmed: list[asyncio.Future[Any]] = []  # queued calls without a deadline timer yet
        self._unarmed_since = 0.0  # loop time the oldest of them was queued
        self._flush_scheduled = False
        self._window = window if batching and window is not None and window.enabled else None
        self._window_end: asyncio.TimerHandle | None = None  # set while a window holds the queue
        self.round_trips = 0  # writes of commands (one per batch)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Send a packed command; the future gets the reply, a RedisReplyError or a BackendError."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        connection = self._connection
        held = self._window is not None and self._window.hold(loop.time())
        if (
            connection is not None
            and not self._queue
            and not held
            and connection.batches_in_flight < self._max_writes_in_flight
        ):
            # Nothing to wait for: out at once (under light load every call goes this way).
            self._write(connection, command, [future])
            loop.call_later(self._timeout_s, self._expire, [future])
            return future
        self._queue.append((command, future))
        if not self._unarmed:
            self._unarmed_since = loop.time()
        self._unarmed.append(future)
        if not self._batching:
            self._flush()
        elif self._window is not None and (held or self._window_end is not None):
            if self._window.full(len(self._queue)):
                self._end_window()
            elif self._window_end is None:
                self._window_end = loop.call_later(self._window.window_s, self._end_window)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def execute(self, *args: str | bytes | int) -> Any:
        """One command, its reply returned (an error reply raised as RedisReplyError)."""
        return await self.send(pack_command(*args))

    def _end_window(self) -> None:
        self._close_window()
        self._flush()

    def _close_window(self) -> None:
        if self._window_end is not None:
            self._window_end.cancel()
            self._window_end = None

    def _batch_answered(self) -> None:
        if self._window_end is None:  # a window still open keeps its calls until it ends
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._unarmed:
            # One timer per batch instead of one per call, from when its oldest call was made:
            # a call held by a window gets no more than its own deadline.
            loop = asyncio.get_running_loop()
            waited = loop.time() - self._unarmed_since
            loop.call_later(max(self._timeout_s - waited, 0.0), self._expire, self._unarmed)
            self._unarmed = []
        connection = self._connection
        if connection is None:
            if self._queue and self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # written once connected
        while self._queue and connection.batches_in_flight < self._max_writes_in_flight:
            if self._batching:
                batch, self._queue = self._queue, []
            else:
                batch, self._queue = self._queue[:1], self._queue[1:]
            live = [(command, future) for command, future in batch if not future.done()]
            if live:
                self._write(connection, b"".join(command for command, _ in live), [future for _, future in live])

    def _write(self, connection: _Connection, data: bytes, futures: list[asyncio.Future[Any]]) -> None:
        self.round_trips += 1
        connection.write(data, futures)

    def _expire(self, futures: list[asyncio.Future[Any]]) -> None:
        late = [future for future in futures if not future.done()]
        if not late:
            return
        message = f"redis did not answer within {self._timeout_s * 1000:g} ms"
        # Only these calls fail; replies owed for them are skipped in order when they come.
        _fail(late, BackendError("timeout", message))
        connection = self._connection
        if connection is not None and connection.owed_for(asyncio.get_running_loop().time()) > self._stale_after_s:
            connection.abort("timeout", f"redis owed a reply for over {self._stale_after_s * 1000:g} ms")
        self._queue = [(command, future) for command, future in self._queue if not future.done()]

    async def _connect(self) -> None:
        endpoint = self._endpoint
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        connect_timeout_s = max(self._timeout_s, MIN_CONNECT_TIMEOUT_S)
        try:
            async with asyncio.timeout(connect_timeout_s):
                if endpoint.path:
                    _, connection = await loop.create_unix_connection(self._new_connection, endpoint.path)
                else:
                    _, connection = await loop.create_connection(
                        self._new_connection, endpoint.host, endpoint.port, ssl=endpoint.ssl_context
                    )
                await self._handshake(connection)
                if connection.lost:  # closed after its last handshake reply, before we got here
                    raise BackendError("connection", "redis closed the connection during the handshake")
        except BaseException as exc:
            if connection is not None:
                connection.abort("connection", "connect failed")
            self._fail_queue(_connect_error(exc, connect_timeout_s))
            if not isinstance(exc, Exception):  # cancelled: pass it on
                raise
        else:
            self._connection = connection
            self._flush()
        finally:
            self._connecting = None

    async def _handshake(self, connection: _Connection) -> None:
        endpoint = self._endpoint
        commands = []
        if endpoint.password is not None:
            login = (endpoint.username, endpoint.password) if endpoint.username else (endpoint.password,)
            commands.append(pack_command("AUTH", *login))
        if endpoint.db:
            commands.append(pack_command("SELECT", endpoint.db))
        if not commands:
            return
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        connection.write(b"".join(commands), futures)
        for future in futures:
            await future

    def _fail_queue(self, error: BackendError) -> None:
        queue, self._queue = self._queue, []
        _fail((future for _, future in queue), error)

    def _new_connection(self) -> _Connection:
        return _Connection(self._lost, self._batch_answered)

    def _lost(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None

    async def close(self) -> None:
        self._close_window()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.abort("connection", "client closed")
            self._connection = None
        self._fail_queue(BackendError("connection", "client closed"))


def _fail(futures: Iterable[asyncio.Future[Any]], error: BackendError) -> None:
    for future in futures:
        if not future.done():  # its caller may have given up already
            future.set_exception(error)


def _connect_error(exc: BaseException, timeout_s: float) -> BackendError:
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, TimeoutError):
        return BackendError("timeout", f"redis did not accept a connection within {timeout_s * 1000:g} ms")
    if isinstance(exc, RedisReplyError):  # AUTH or SELECT refused; the reply names no secret
        return BackendError("connection", f"redis refused the login: {exc}")
    return BackendError("connection", f"redis connection failed: {exc}")
