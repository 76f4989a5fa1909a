"""The Python client library: sync and asyncio, plain results, deadlines, channel reuse."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc

from ratelimit.client import AsyncRateLimitClient, RateLimitClient
from tests.support.replica import running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"


def test_sync_client_returns_plain_results(tmp_path: Path) -> None:
    with running_replica(tmp_path, [SERVICE_YAML]) as replica, RateLimitClient(replica.target) as client:
        results = [client.should_rate_limit("svc", [{"user": "sync"}, [("roomy", "x")]]) for _ in range(4)]
    assert [r.overall_code for r in results] == ["OK", "OK", "OK", "OVER_LIMIT"]
    assert results[-1].over_limit
    first = results[0].statuses[0]
    assert (first.code, first.requests_per_unit, first.unit, first.limit_remaining) == ("OK", 3, "MINUTE", 2)
    assert first.duration_until_reset_s in (61.0, 62.0)  # whole seconds, rounded up
    assert results[0].statuses[1].limit_remaining == 99
    assert results[1].statuses[1].limit_remaining == 98  # one channel, many calls


def test_async_client_runs_concurrent_calls_on_one_channel(tmp_path: Path) -> None:
    async def scenario(target: str) -> list[str]:
        async with AsyncRateLimitClient(target) as client:
            results = await asyncio.gather(*(client.should_rate_limit("svc", [[("user", "async")]]) for _ in range(6)))
        return sorted(r.overall_code for r in results)

    with running_replica(tmp_path, [SERVICE_YAML]) as replica:
        assert asyncio.run(scenario(replica.target)) == ["OK"] * 3 + ["OVER_LIMIT"] * 3


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Accepts TCP connections, reads what comes, and never answers (not even HTTP/2's
    preface): a call to it can only end at its deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.setblocking(False)
                held.append(connection)
            for connection in held:
                with contextlib.suppress(BlockingIOError, OSError):
                    connection.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()


DEADLINE_S = 0.3
# The call ends at its deadline: not before it, and after it only by scheduling noise.
DEADLINE_SLACK_S = 0.5


def test_a_deadline_is_enforced_by_the_sync_client_when_nothing_answers() -> None:
    outcome: list[BaseException | float] = []

    def call(target: str) -> None:
        started = time.monotonic()
        try:
            with RateLimitClient(target, timeout_s=DEADLINE_S) as client:
                client.should_rate_limit("svc", [[("user", "x")]])
        except grpc.RpcError as exc:
            outcome.extend([exc, time.monotonic() - started])

    with silent_server() as target:
        # In a thread: a client without a deadline would wait forever; this test must not.
        caller = threading.Thread(target=call, args=(target,), daemon=True)
        caller.start()
        caller.join(timeout=DEADLINE_S + DEADLINE_SLACK_S + 5)
        assert not caller.is_alive(), "the call outlived its deadline by seconds"
    error, elapsed = outcome
    assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(elapsed, float) and DEADLINE_S <= elapsed < DEADLINE_S + DEADLINE_SLACK_S


def test_a_deadline_is_enforced_by_the_async_client_when_nothing_answers() -> None:
    async def scenario(target: str) -> tuple[grpc.StatusCode, float]:
        started = time.monotonic()
        async with AsyncRateLimitClient(target, timeout_s=DEADLINE_S) as client:
            try:
                # The outer bound only keeps a client without a deadline from hanging the suite.
                async with asyncio.timeout(DEADLINE_S + DEADLINE_SLACK_S + 5):
                    await client.should_rate_limit("svc", [[("user", "x")]])
            except grpc.aio.AioRpcError as exc:
                return exc.code(), time.monotonic() - started
        raise AssertionError("a call to a server that never answers returned")

    with silent_server() as target:
        code, elapsed = asyncio.run(scenario(target))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert DEADLINE_S <= elapsed < DEADLINE_S + DEADLINE_SLACK_S
