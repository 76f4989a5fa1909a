"""The lean pipelined Redis client: URLs, ordering, batching, errors, reconnects, timeouts."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import redis
import uvloop

from ratelimit.limiter import BackendError
from ratelimit.limiter.pipelined import Endpoint, PipelinedRedis, RedisReplyError, pack_command
from ratelimit.limiter.redis_connect import endpoint_from_url
from ratelimit.limiter.redis_url import parse_redis_url
from tests.support.processes import RedisServer, free_port, running_redis

ClientRunner = Callable[..., Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def with_client(request: pytest.FixtureRequest) -> ClientRunner:
    """Runs scenario(client) for an endpoint on each loop the server may use (their transports differ)."""
    run = uvloop.run if request.param == "uvloop" else asyncio.run

    def runner(endpoint: Endpoint, scenario: Callable[[PipelinedRedis], Awaitable[Any]], **options: Any) -> Any:
        async def main() -> Any:
            client = PipelinedRedis(endpoint, timeout_s=options.pop("timeout_s", 1.0), **options)
            try:
                return await scenario(client)
            finally:
                await client.close()

        return run(main())

    return runner


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Polls `condition` on the running loop (so the client's callbacks run meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not true after {timeout_s} s"
        await asyncio.sleep(0.005)


def local(server: RedisServer, **fields: Any) -> Endpoint:
    return Endpoint(host="127.0.0.1", port=server.port, **fields)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6380/2", Endpoint(port=6380, db=2)),
        ("redis://redis-host", Endpoint(host="redis-host")),
        ("redis://user:p%40ss@h:1/0", Endpoint(host="h", port=1, username="user", password="p@ss")),
        ("redis://:secret@h:1", Endpoint(host="h", port=1, password="secret")),
        ("redis://h:1?db=5", Endpoint(host="h", port=1, db=5)),
        ("unix:///run/redis.sock?db=3", Endpoint(path="/run/redis.sock", db=3)),
    ],
)
def test_single_server_urls(url: str, expected: Endpoint) -> None:
    assert endpoint_from_url(parse_redis_url(url), {}) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:1", "unsupported Redis URL scheme 'http'"),
        ("redis://h:1/0?socket_timeout=1", "unsupported Redis URL parameter(s): socket_timeout"),
        ("redis://h:1/zero", "the Redis database must be a number, got 'zero'"),
        ("redis://h:port/0", "bad port in the Redis URL"),
        ("unix://", "unix:// needs the socket's path"),
    ],
)
def test_bad_single_server_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        endpoint_from_url(parse_redis_url(url), {})
    assert message in str(caught.value)


def test_rediss_verifies_the_server_with_the_given_ca() -> None:
    endpoint = endpoint_from_url(parse_redis_url("rediss://h:6380/0"), {})
    assert endpoint.ssl_context is not None and endpoint.ssl_context.check_hostname


def test_calls_beyond_two_writes_in_flight_leave_together_and_replies_keep_order(
    with_client: ClientRunner, redis_server: RedisServer, redis_url: str
) -> None:

    admin = redis.Redis(port=redis_server.port)

    def reads_by_redis() -> int:
        return int(admin.info("stats")["total_reads_processed"])

    async def scenario(client: PipelinedRedis) -> tuple[list[Any], int, int]:
        await client.execute("PING")  # connected
        before, reads_before = client.round_trips, reads_by_redis()
        replies = await asyncio.gather(*(client.execute("INCR", "ordered") for _ in range(200)))
        # Seen from Redis too: the second INFO is one read of its own.
        return replies, client.round_trips - before, reads_by_redis() - reads_before - 1

    try:
        replies, writes, reads = with_client(local(redis_server), scenario)
    finally:
        admin.close()
    assert replies == list(range(1, 201))
    assert writes == 3  # two out at once, then the other 198 of the turn in one write
    assert 1 <= reads <= writes


def test_without_batching_each_command_is_its_own_write(
    with_client: ClientRunner, redis_server: RedisServer, redis_url: str
) -> None:

    async def scenario(client: PipelinedRedis) -> int:
        await client.execute("PING")
        before = client.round_trips
        await asyncio.gather(*(client.execute("INCR", "unbatched") for _ in range(20)))
        return client.round_trips - before

    assert with_client(local(redis_server), scenario, batching=False) == 20


def test_an_error_reply_fails_only_its_own_call(
    with_client: ClientRunner, redis_server: RedisServer, redis_url: str
) -> None:

    async def scenario(client: PipelinedRedis) -> list[Any]:
        await client.execute("SET", "text", "not a number")
        return await asyncio.gather(
            client.execute("INCR", "n"),
            client.execute("INCR", "text"),
            client.execute("INCR", "n"),
            return_exceptions=True,
        )

    first, failed, second = with_client(local(redis_server), scenario)
    assert (first, second) == (1, 2)
    assert isinstance(failed, RedisReplyError) and "not an integer" in str(failed)


def test_selects_the_database_of_the_url(with_client: ClientRunner, redis_server: RedisServer, redis_url: str) -> None:
    async def scenario(client: PipelinedRedis) -> Any:
        return await client.execute("SET", "in-db-3", "yes")

    with_client(endpoint_from_url(parse_redis_url(f"redis://127.0.0.1:{redis_server.port}/3"), {}), scenario)
    assert redis.Redis(port=redis_server.port, db=3).get("in-db-3") == b"yes"
    assert redis.Redis(port=redis_server.port, db=0).get("in-db-3") is None


def test_a_connection_redis_closed_is_replaced_on_the_next_call(
    with_client: ClientRunner, redis_server: RedisServer, redis_url: str
) -> None:
    async def scenario(client: PipelinedRedis) -> Any:
        await client.execute("CLIENT", "SETNAME", "doomed")
        redis.Redis(port=redis_server.port).client_kill_filter(_type="normal", skipme=True)
        # The close reaches the client while it is idle: it lets go of the connection.
        await wait_until(lambda: client._connection is None, timeout_s=2.0)
        return await client.execute("CLIENT", "GETNAME")

    assert with_client(local(redis_server), scenario) is None  # a new, unnamed connection


def test_unix_socket(with_client: ClientRunner) -> None:
    directory = Path(tempfile.mkdtemp(prefix="ratelimit-sock-"))
    socket_path = directory / "redis.sock"
    with running_redis(extra_args=["--unixsocket", str(socket_path)]):

        async def scenario(client: PipelinedRedis) -> Any:
            return await client.execute("PING")

        assert with_client(endpoint_from_url(parse_redis_url(f"unix://{socket_path}"), {}), scenario) == b"PONG"


def test_a_server_that_never_answers_times_out_every_call_at_its_deadline(with_client: ClientRunner) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts (in the backlog), never reads or answers

        async def scenario(client: PipelinedRedis) -> tuple[list[Any], float]:
            started = time.monotonic()
            outcomes = await asyncio.gather(*(client.execute("PING") for _ in range(5)), return_exceptions=True)
            return outcomes, time.monotonic() - started

        endpoint = Endpoint(port=silent.getsockname()[1])
        outcomes, took_s = with_client(endpoint, scenario, timeout_s=0.2)
    assert all(isinstance(outcome, BackendError) and outcome.kind == "timeout" for outcome in outcomes)
    assert 0.19 <= took_s < 0.6


def test_a_silent_redis_is_handed_at_most_two_writes(with_client: ClientRunner) -> None:
    # Calls queued behind the writes in flight are never sent once their callers gave up, so a
    # Redis that wakes up later cannot carry them out without anyone getting the answer.
    received = bytearray()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)

        def swallow() -> None:
            connection, _ = silent.accept()
            with connection:
                while chunk := connection.recv(65536):
                    received.extend(chunk)

        reader = threading.Thread(target=swallow, daemon=True)
        reader.start()

        async def scenario(client: PipelinedRedis) -> tuple[list[Any], int]:
            calls = []
            for turn in range(6):  # one command per loop turn: six would-be writes
                calls.append(asyncio.ensure_future(client.execute("INCR", f"turn-{turn}")))
                await asyncio.sleep(0.01)
            return await asyncio.gather(*calls, return_exceptions=True), client.round_trips

        outcomes, writes = with_client(Endpoint(port=silent.getsockname()[1]), scenario, timeout_s=0.2)
        reader.join(timeout=2)
    assert all(isinstance(outcome, BackendError) and outcome.kind == "timeout" for outcome in outcomes)
    assert writes == 2
    assert received.count(b"INCR") == 2


def test_nothing_listening_is_a_connection_error_at_once(with_client: ClientRunner) -> None:
    async def scenario(client: PipelinedRedis) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            await client.execute("PING")
        except BackendError as exc:
            return exc, time.monotonic() - started
        return None, 0.0

    error, took_s = with_client(Endpoint(port=free_port()), scenario, timeout_s=2.0)
    assert isinstance(error, BackendError) and error.kind == "connection"
    assert took_s < 0.5


def test_a_wrong_password_is_refused_without_naming_it(with_client: ClientRunner) -> None:
    with running_redis(extra_args=["--requirepass", "right-secret"]) as server:

        async def scenario(client: PipelinedRedis) -> BaseException | None:
            try:
                await client.execute("PING")
            except BackendError as exc:
                return exc
            return None

        error = with_client(local(server, password="wrong-secret"), scenario)
        assert isinstance(error, BackendError) and error.kind == "connection"
        assert "WRONGPASS" in str(error) and "wrong-secret" not in str(error)

        async def logged_in(client: PipelinedRedis) -> Any:
            return await client.execute("PING")

        assert with_client(local(server, password="right-secret"), logged_in) == b"PONG"


def test_packed_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert pack_command("SET", "k", 12, b"\r\n") == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\r\n\r\n"


TIMER_TOLERANCE_S = 0.001
# Keeps Redis busy (no other command runs meanwhile) for ARGV[1] microseconds of its own clock.
BUSY_SCRIPT = """
local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local until_us = now() + tonumber(ARGV[1])
while now() < until_us do end
return 1
"""


def test_a_timed_out_call_fails_alone_and_later_calls_get_their_replies_in_their_own_deadlines(
    with_client: ClientRunner, redis_server: RedisServer, redis_url: str
) -> None:
    # Redis busy for 200 ms, calls wait 150 ms: A (sent at 0) times out at 150 ms while Redis
    # is busy; B (sent at 110 ms, before A's deadline) is answered at ~200 ms, inside its own
    # deadline (260 ms).
    timeout_s, busy_s, b_sent_at_s = 0.15, 0.2, 0.11

    async def scenario(client: PipelinedRedis) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        connection_id = await client.execute("CLIENT", "ID")
        started = loop.time()
        busy = client.send(pack_command("EVAL", BUSY_SCRIPT, 0, int(busy_s * 1_000_000)))
        call_a = client.send(pack_command("INCR", "a"))
        a_failed_at: list[float] = []
        call_a.add_done_callback(lambda _: a_failed_at.append(loop.time() - started))
        await asyncio.sleep(b_sent_at_s)  # the scenario's clock, not a synchronisation
        call_b = client.send(pack_command("INCR", "b"))
        outcomes = await asyncio.gather(busy, call_a, call_b, return_exceptions=True)
        return {
            "outcomes": outcomes,
            "a_failed_at": a_failed_at[0],
            "b_answered_at": loop.time() - started,
            "same_connection": await client.execute("CLIENT", "ID") == connection_id,
            "in_step": await client.execute("INCR", "b"),
        }

    found = with_client(local(redis_server), scenario, timeout_s=timeout_s, max_writes_in_flight=4)
    _busy, call_a, call_b = found["outcomes"]
    assert isinstance(call_a, BackendError) and call_a.kind == "timeout"
    # At its own deadline (asyncio may fire a timer up to a clock tick early), not at Redis's answer.
    assert timeout_s - TIMER_TOLERANCE_S <= found["a_failed_at"] < busy_s
    assert call_b == 1, f"B failed at {found['b_answered_at'] * 1000:.0f} ms, before its own deadline"
    assert found["b_answered_at"] < b_sent_at_s + timeout_s
    assert found["same_connection"]  # the timeout dropped nothing
    assert found["in_step"] == 2  # the skipped replies kept later calls in step
    # A's INCR was carried out though its caller gave up: that is what a timeout can mean.
    assert redis.Redis(port=redis_server.port).get("a") == b"1"


def test_a_connection_owing_a_reply_past_the_stale_bound_is_dropped(with_client: ClientRunner) -> None:
    # A Redis that never answers (no RST ever comes) must not hold the client forever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)

        async def scenario(client: PipelinedRedis) -> list[Any]:
            first = await asyncio.gather(client.execute("PING"), return_exceptions=True)
            # Past the stale bound, the next call's expiry drops the connection it waited on.
            await asyncio.sleep(0.35)  # the scenario's clock: time passing with a reply owed
            second = await asyncio.gather(client.execute("PING"), return_exceptions=True)
            return [*first, *second, client._connection]

        first, second, connection = with_client(
            Endpoint(port=silent.getsockname()[1]), scenario, timeout_s=0.1, stale_after_s=0.3
        )
    assert isinstance(first, BackendError) and first.kind == "timeout"
    assert isinstance(second, BackendError) and second.kind == "timeout"
    assert connection is None
