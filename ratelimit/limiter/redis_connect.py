"""Redis clients from one URL: a single server, a Redis Cluster, or a Sentinel-managed primary.

- `redis://[user:password@]host:port/db`, `rediss://...` (TLS): one server.
- `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://`): a Redis
  Cluster, discovered from any of the listed nodes; MOVED/ASK and slot migrations are
  followed by the client.
- `redis+sentinel://[user:password@]host:port[,host:port...]/primary-name[/db]`
  (`rediss+sentinel://`): the primary that the sentinels name; after a failover new
  connections go to the new primary. The password is the data nodes' password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}


@dataclass(frozen=True)
class RedisTarget:
    kind: str  # "single", "cluster" or "sentinel"
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool
    primary_name: str = ""
    db: int = 0


def parse_target(url: str) -> RedisTarget:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES and scheme not in SENTINEL_SCHEMES:
        return RedisTarget("single", (), None, None, scheme == "rediss")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    nodes = tuple(_host_port(item) for item in hosts.split(",") if item)
    if not nodes:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    path = [segment for segment in parts.path.split("/") if segment]
    user, secret = unquote(username) or None, unquote(password) or None
    if scheme in CLUSTER_SCHEMES:
        return RedisTarget("cluster", nodes, user, secret, CLUSTER_SCHEMES[scheme])
    if not path:
        raise ValueError("redis+sentinel:// needs the primary's name as its path: redis+sentinel://host:26379/mymaster")
    db = int(path[1]) if len(path) > 1 else 0
    return RedisTarget("sentinel", nodes, user, secret, SENTINEL_SCHEMES[scheme], unquote(path[0]), db)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def make_client(url: str, *, timeout_s: float, max_connections: int, options: Mapping[str, Any]) -> Any:
    """A redis.asyncio client (or RedisCluster) for `url`; `options` are TLS file settings."""
    target = parse_target(url)
    socket_options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": False,
        # No retries inside the client: a failed call fails within its timeout, and the
        # circuit breaker and failure mode decide what happens next.
        "retry": Retry(NoBackoff(), 0),
        # RESP2: with RESP3, redis-py 8 turns on maintenance notifications by default and
        # its pool then stops checking idle connections, so one closed by Redis (timeout,
        # restart, proxy) would fail the next call.
        "protocol": 2,
    }
    if target.kind == "single":
        # A blocking pool: a burst waits for a free connection (within the call's timeout)
        # instead of failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, **socket_options, **options
        )
        return aioredis.Redis(connection_pool=pool)
    tls: dict[str, Any] = {"ssl": True, **options} if target.tls else {}
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=max_connections,
            **auth,
            **socket_options,
            **tls,
        )
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs={**socket_options, **tls}, **socket_options, **tls)
    return sentinel.master_for(target.primary_name, db=target.db, **auth)
