"""The service on a real 3-primary/3-replica Redis Cluster: one limit, one slot, failover."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from ratelimit.client import RateLimitClient
from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter.keys import counter_key
from ratelimit.limiter.redis_backend import RedisBackend
from tests.limiter_cases import counter
from tests.redis_failover import drive_through_fault
from tests.support.counters import held_hits
from tests.support.redis_topologies import RedisClusterTopology, running_redis_cluster
from tests.support.replica import ReplicaProcess, running_replica

FAILOVER_YAML = Path(__file__).parent / "data" / "failover.yaml"
# Documented in the README: a cluster failover (node timeout 2 s here) resumes within this.
CLUSTER_FAILOVER_BOUND_S = 10.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterTopology]:
    with running_redis_cluster() as topology:
        yield topology


@contextlib.contextmanager
def three_replicas(tmp_path: Path, url: str) -> Iterator[list[ReplicaProcess]]:
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(running_replica(tmp_path, [FAILOVER_YAML], redis_url=url)) for _ in range(3)]
        for replica in replicas:
            wait_until_deciding(replica.target)
        yield replicas


def wait_until_deciding(target: str, timeout_s: float = 15.0) -> None:
    """A replica decides once the cluster is settled (a loaded machine may delay that)."""
    deadline = time.monotonic() + timeout_s
    with RateLimitClient(target) as client:
        while True:
            try:
                client.should_rate_limit("failover", [[("user", "warm-up")]])
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def sync_cluster(topology: RedisClusterTopology) -> RedisCluster:
    live = [n for n in topology.nodes if n.process.poll() is None]
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in live], socket_timeout=2)


def counted_hits(topology: RedisClusterTopology, domain: str, entries: tuple[tuple[str, str], ...], unit: Unit) -> int:
    key = counter_key("ratelimit:", domain, entries, unit, Algorithm.SLIDING_WINDOW)
    client = sync_cluster(topology)
    try:
        return held_hits(client, key)
    finally:
        client.close()


def test_a_global_limit_holds_across_three_replicas_on_the_cluster(
    cluster: RedisClusterTopology, tmp_path: Path
) -> None:
    with three_replicas(tmp_path, cluster.url) as replicas:
        clients = [RateLimitClient(r.target) for r in replicas]
        codes = [clients[i % 3].should_rate_limit("failover", [[("tight", "global")]]).overall_code for i in range(30)]
        for client in clients:
            client.close()
    assert codes.count("OK") == 10
    assert codes[:10] == ["OK"] * 10


def test_every_key_of_a_request_lives_on_one_node_and_admission_stays_all_or_nothing(
    cluster: RedisClusterTopology,
) -> None:
    async def scenario() -> None:
        backend = RedisBackend(cluster.url, timeout_s=2.0)
        roomy, tight = counter("roomy", 5, domain="slots"), counter("tight", 1, domain="slots")
        assert (await backend.evaluate([roomy, tight])).admitted
        rejected = await backend.evaluate([roomy, tight])
        assert not rejected.admitted and rejected.results[0].used == 1
        await backend.close()
        slots = {redis.cluster.key_slot(k.key.encode()) for k in (roomy, tight)}
        assert len(slots) == 1

    asyncio.run(scenario())


def test_a_primary_failover_under_load_resumes_and_loses_few_admitted_hits(
    cluster: RedisClusterTopology, tmp_path: Path
) -> None:
    domain, entries = "failover", (("user", "failover-load"),)
    key = counter_key("ratelimit:", domain, entries, Unit.HOUR, Algorithm.SLIDING_WINDOW)
    victim = cluster.primary_for_slot(redis.cluster.key_slot(key.encode()))
    with three_replicas(tmp_path, cluster.url) as replicas:
        run = drive_through_fault([r.target for r in replicas], list(entries), domain, victim.kill)
    counted = counted_hits(cluster, domain, entries, Unit.HOUR)
    lost = run.admitted - counted
    print(
        f"\ncluster failover: outage {run.outage_s:.2f} s, admitted {run.admitted}, counted {counted}, "
        f"lost {lost}, failed {run.failed} {run.errors}"
    )
    assert run.outage_s < CLUSTER_FAILOVER_BOUND_S
    assert 0 <= lost <= 50  # asynchronous replication: the last writes before the crash
    assert cluster.primary_for_slot(redis.cluster.key_slot(key.encode())).port != victim.port
    victim.restart()  # rejoins as a replica; the module's later tests see a whole cluster
