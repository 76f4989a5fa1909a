"""Redis clients from one URL: a single server, a Redis Cluster, or a Sentinel-managed primary.

- `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS), `unix:///path[?db=N]`:
  one server, for the pipelined client (`endpoint_from_url`).
- `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://`): a Redis
  Cluster, discovered from any of the listed nodes; MOVED/ASK and slot migrations are
  followed by the client.
- `redis+sentinel://[user:password@]host:port[,host:port...]/primary-name[/db]`
  (`rediss+sentinel://`): the primary that the sentinels name; after a failover new
  connections go to the new primary. The password is the data nodes' password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ratelimit.limiter.pipelined import DEFAULT_PORT, Endpoint
from ratelimit.limiter.redis_url import MAX_QUOTED_CHARS, RedisUrl

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


def parse_target(url: RedisUrl) -> RedisTarget:
    """A cluster or sentinel target; any other scheme is one server (see `endpoint_from_url`)."""
    scheme = url.scheme
    if scheme not in CLUSTER_SCHEMES and scheme not in SENTINEL_SCHEMES:
        return RedisTarget("single", (), None, None, scheme == "rediss")
    nodes = tuple((host, port) for host, port in url.nodes if host and port is not None)
    if not nodes or len(nodes) != len(url.nodes):
        raise ValueError(f"{scheme}:// needs host:port for each node, at least one")
    path = [segment for segment in url.path.split("/") if segment]
    if scheme in CLUSTER_SCHEMES:
        return RedisTarget("cluster", nodes, url.username, url.password, CLUSTER_SCHEMES[scheme])
    if not path:
        raise ValueError("redis+sentinel:// needs the primary's name as its path: redis+sentinel://host:26379/mymaster")
    db = _database(path[1]) if len(path) > 1 else 0
    return RedisTarget("sentinel", nodes, url.username, url.password, SENTINEL_SCHEMES[scheme], unquote(path[0]), db)


def endpoint_from_url(url: RedisUrl, tls_files: Mapping[str, str]) -> Endpoint:
    """`redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS) or `unix:///path[?db=N]`.

    `tls_files` may name `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` for rediss://.
    """
    scheme = url.scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss:// or unix://")
    unknown = sorted(set(url.query) - {"db"})
    if unknown:
        raise ValueError(f"unsupported Redis URL parameter(s): {', '.join(unknown)} (only db is known)")
    db_text = url.query.get("db", [""])[-1] or (url.path.strip("/") if scheme != "unix" else "") or "0"
    credentials = {"username": url.username, "password": url.password, "db": _database(db_text)}
    if scheme == "unix":
        if url.nodes or url.path in ("", "/"):
            raise ValueError("unix:// needs the socket's path: unix:///run/redis.sock")
        return Endpoint(path=url.path, **credentials)  # type: ignore[arg-type]
    if len(url.nodes) > 1:
        raise ValueError(f"{scheme}:// names one server; use redis+cluster:// or redis+sentinel:// for several")
    host, port = url.nodes[0] if url.nodes else ("", None)
    tls = _ssl_context(tls_files) if scheme == "rediss" else None
    return Endpoint(host=host or "127.0.0.1", port=port or DEFAULT_PORT, ssl_context=tls, **credentials)  # type: ignore[arg-type]


def _database(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the Redis database must be a number, got {text[:MAX_QUOTED_CHARS]!r}")
    return int(text)


def _ssl_context(files: Mapping[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files.get("ssl_ca_certs") or None)
    if files.get("ssl_certfile"):
        context.load_cert_chain(files["ssl_certfile"], files.get("ssl_keyfile") or None)
    return context


def make_client(target: RedisTarget, *, timeout_s: float, max_connections: int, options: Mapping[str, Any]) -> Any:
    """A redis-py client for a cluster or sentinel target; `options` are TLS file settings."""
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
