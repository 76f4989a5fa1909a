"""Shared fixtures: a real redis-server per session, and a fresh database per test."""

from __future__ import annotations

from typing import Iterator

import pytest
import redis

from tests.support.processes import RedisServer, running_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url
