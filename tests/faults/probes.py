"""Looking at a running replica and its Redis from outside: metrics, health, memory, counters."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from typing import Callable, Sequence

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter.keys import counter_key
from tests.support.counters import held_hits

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RLS_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
BACKEND_HEALTH = "ratelimit.Backend"
CONFIG_HEALTH = "ratelimit.Config"


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def metric_value(body: str, name: str, labels: str = "") -> float:
    """A sample's value, 0 when the series does not exist; `labels` as exposed: 'kind="timeout"'."""
    selector = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    found = re.search(rf"^{selector} (\S+)$", body, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def health(target: str, service: str, timeout_s: float = 2.0) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
        return int(reply.status)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Threads for process {pid}")


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> float | None:
    """Seconds until `condition()` held, or None when it did not within `timeout_s`."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout_s:
            return None
        time.sleep(interval_s)


def sliding_key(domain: str, entries: Sequence[tuple[str, str]], unit: Unit, prefix: str = "ratelimit:") -> str:
    """The Redis key of a sliding-window counter (see ratelimit/limiter/keys.py)."""
    return counter_key(prefix, domain, tuple(entries), unit, Algorithm.SLIDING_WINDOW)


def counted_hits(client: redis.Redis, key: str) -> int:
    """All hits a counter holds: the sum of its buckets."""
    return held_hits(client, key)


def rpc_latency_buckets(body: str) -> dict[float, float]:
    """ShouldRateLimit handler durations as seen by the replica: {upper bound s: calls}, all codes summed."""
    buckets: dict[float, float] = {}
    for match in re.finditer(r'^ratelimit_rpc_duration_seconds_bucket\{code="[^"]*",le="([^"]+)"\} (\S+)$', body, re.M):
        bound = float(match.group(1))  # "+Inf" parses as inf
        buckets[bound] = buckets.get(bound, 0.0) + float(match.group(2))
    return buckets


def backend_errors(body: str) -> dict[str, float]:
    """ratelimit_backend_errors_total by kind."""
    return {
        match.group(1): float(match.group(2))
        for match in re.finditer(r'^ratelimit_backend_errors_total\{kind="([^"]+)"\} (\S+)$', body, re.M)
    }
