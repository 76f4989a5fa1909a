"""The Python client library: sync and asyncio, plain results, deadlines, channel reuse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

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


def test_a_deadline_is_enforced_when_nothing_answers() -> None:
    from tests.support.processes import free_port

    with RateLimitClient(f"127.0.0.1:{free_port()}", timeout_s=0.3) as client, pytest.raises(grpc.RpcError) as caught:
        client.should_rate_limit("svc", [[("user", "x")]])
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
