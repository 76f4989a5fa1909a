"""Health probes of the local cluster's processes, each answering (healthy?, what it saw).

The same checks compose runs (redis PING, gRPC health, Prometheus /-/ready, Envoy /ready),
plus the two that say the topology works: Prometheus scrapes every running replica, and
Envoy's `ratelimit` cluster sends to every running replica and to no stopped one.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import AbstractSet, Callable, Sequence

import redis
from cluster_topology import LOOPBACK, REPLICAS, PortMap
from healthcheck import is_serving

PROBE_TIMEOUT_S = 1.0

Health = tuple[bool, str]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def run_probe(probe: Callable[[], Health]) -> Health:
    """The probe's answer, or (False, the error) when it could not ask."""
    try:
        return probe()
    except (OSError, ValueError, KeyError, redis.RedisError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def redis_health(ports: PortMap) -> Health:
    client = redis.Redis(host=LOOPBACK, port=ports.host_port("redis", 6379), socket_timeout=PROBE_TIMEOUT_S)
    try:
        return bool(client.ping()), "PONG"
    finally:
        client.close()


def replica_health(ports: PortMap, replica: str) -> Health:
    return is_serving(ports.address(replica, 8081), timeout_s=PROBE_TIMEOUT_S)


def prometheus_health(ports: PortMap) -> Health:
    code, body = http_get(f"http://{ports.address('prometheus', 9090)}/-/ready")
    return code == 200, body.strip() or f"HTTP {code}"


def prometheus_targets_health(ports: PortMap, running_replicas: Sequence[str]) -> Health:
    """Every running replica's target is up (and every stopped one is not)."""
    _, body = http_get(f"http://{ports.address('prometheus', 9090)}/api/v1/targets?state=active")
    targets = [t for t in json.loads(body)["data"]["activeTargets"] if t["labels"].get("job") == "ratelimit"]
    up = {t["labels"].get("replica") for t in targets if t["health"] == "up"}
    return _matches(up, running_replicas, f"{len(up)}/{len(targets)} ratelimit targets up", "up in Prometheus")


def envoy_health(ports: PortMap) -> Health:
    code, body = http_get(f"http://{ports.address('envoy', 9901)}/ready")
    return code == 200, body.strip() or f"HTTP {code}"


def envoy_upstreams_health(ports: PortMap, running_replicas: Sequence[str]) -> Health:
    """Envoy's `ratelimit` cluster sends to every running replica, and to no stopped one."""
    _, body = http_get(f"http://{ports.address('envoy', 9901)}/clusters")
    flags = {}
    for line in body.splitlines():
        cluster, _, rest = line.partition("::")
        address, _, stat = rest.partition("::")
        if cluster == "ratelimit" and stat.startswith("health_flags::"):
            flags[address] = stat.removeprefix("health_flags::")
    healthy = {replica for replica in REPLICAS if flags.get(ports.address(replica, 8081)) == "healthy"}
    summary = f"{len(healthy)}/{len(REPLICAS)} replicas healthy in Envoy"
    return _matches(healthy, running_replicas, summary, "healthy in Envoy")


def _matches(seen: AbstractSet[str | None], running_replicas: Sequence[str], summary: str, seen_as: str) -> Health:
    """Healthy when exactly the running replicas are seen; otherwise the detail names the ones
    out of step, so that "3/3 healthy" next to a stopped replica reads as what it is: news
    that has not reached Envoy or Prometheus yet."""
    if seen == set(running_replicas):
        return True, summary
    behind = [f"{replica} runs but is not {seen_as} yet" for replica in running_replicas if replica not in seen]
    stale = [
        f"{replica} is stopped but still {seen_as}"
        for replica in REPLICAS
        if replica in seen and replica not in running_replicas
    ]
    return False, f"{summary}: {'; '.join(behind + stale)}"


@dataclass(frozen=True)
class Check:
    name: str
    service: str  # applies while this service runs
    probe: Callable[[], Health]


def checks(ports: PortMap, running: Sequence[str]) -> list[Check]:
    running_replicas = [replica for replica in REPLICAS if replica in running]
    result = [Check("redis", "redis", lambda: redis_health(ports))]
    result += [Check(replica, replica, functools.partial(replica_health, ports, replica)) for replica in REPLICAS]
    result += [
        Check("prometheus", "prometheus", lambda: prometheus_health(ports)),
        Check("prometheus targets", "prometheus", lambda: prometheus_targets_health(ports, running_replicas)),
        Check("envoy", "envoy", lambda: envoy_health(ports)),
        Check("envoy upstreams", "envoy", lambda: envoy_upstreams_health(ports, running_replicas)),
    ]
    return [check for check in result if check.service in running]
