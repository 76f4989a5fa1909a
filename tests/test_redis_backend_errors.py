"""What the Redis backend reports: its duration metric times only real Redis round trips, and
Redis's own error text goes to the log, never to gRPC clients."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from ratelimit.app import Replica
from ratelimit.service import BackendUnavailable, DescriptorRequest
from ratelimit.settings import settings_from_environment
from tests.support.processes import running_redis

FAILOVER_YAML = Path(__file__).parent / "data" / "failover.yaml"
TIGHT = [DescriptorRequest(entries=(("tight", "duration"),))]


def replica(redis_url: str, **environment: str) -> tuple[Replica, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = settings_from_environment(
        {
            "RATELIMIT_REDIS_URL": redis_url,
            "RATELIMIT_CONFIG": str(FAILOVER_YAML),
            "RATELIMIT_GRPC_PORT": "0",  # bound, never served: the tests ask the service directly
            "RATELIMIT_METRICS_PORT": "0",
            **environment,
        }
    )
    return Replica(settings, registry), registry


def round_trips_timed(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("ratelimit_backend_duration_seconds_count") or 0.0


def test_the_backend_duration_counts_redis_round_trips_not_cache_hits(redis_url: str) -> None:
    async def scenario() -> tuple[list[str], float]:
        served, registry = replica(redis_url, RATELIMIT_OVER_LIMIT_CACHE="true")
        codes = [(await served.service.should_rate_limit("failover", TIGHT, 1)).overall_code.name for _ in range(15)]
        await served.backend.close()
        return codes, round_trips_timed(registry)

    codes, timed = asyncio.run(scenario())
    assert codes == ["OK"] * 10 + ["OVER_LIMIT"] * 5
    assert timed == 11  # ten admitted and the first refusal went to Redis; the cache answered the rest


def test_the_backend_duration_skips_answers_of_the_open_breaker() -> None:
    with running_redis() as server:
        url = server.url
    # Nothing listens any more: the first call fails at Redis, then the open breaker answers.

    async def scenario() -> float:
        served, registry = replica(url, RATELIMIT_BREAKER_FAILURES="1", RATELIMIT_ON_BACKEND_ERROR="allow")
        for _ in range(5):
            await served.service.should_rate_limit("failover", TIGHT, 1)
        await served.backend.close()
        return round_trips_timed(registry)

    assert asyncio.run(scenario()) == 1


def test_redis_error_text_is_logged_and_clients_get_only_its_kind(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(redis_url)

    async def scenario() -> BaseException | None:
        served, _registry = replica(redis_url, RATELIMIT_ON_BACKEND_ERROR="unavailable")
        try:
            await served.service.should_rate_limit("failover", TIGHT, 1)  # creates the counter
            # A Redis out of memory refuses the script with its own text (OOM ...).
            client.config_set("maxmemory", 1)
            await served.service.should_rate_limit("failover", TIGHT, 1)
        except BackendUnavailable as exc:
            return exc
        finally:
            client.config_set("maxmemory", 0)
            await served.backend.close()
        return None

    with caplog.at_level(logging.WARNING):
        refused = asyncio.run(scenario())
    assert refused is not None and str(refused) == "script"  # the bounded kind, nothing of Redis's text
    assert "OOM command not allowed" in caplog.text  # the operator's log has it
