"""The service on a Sentinel-managed primary (+2 replicas, 3 sentinels): failover without restart."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest

from ratelimit.client import RateLimitClient
from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter.keys import counter_key
from tests.redis_failover import drive_through_fault
from tests.support.counters import held_hits
from tests.support.redis_topologies import SentinelTopology, running_sentinel_group
from tests.support.replica import ReplicaProcess, running_replica

FAILOVER_YAML = Path(__file__).parent / "data" / "failover.yaml"
# Documented in the README: down-after-milliseconds 1000 + election + reconnect.
SENTINEL_FAILOVER_BOUND_S = 10.0


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelTopology]:
    with running_sentinel_group() as topology:
        yield topology


@contextlib.contextmanager
def three_replicas(tmp_path: Path, url: str) -> Iterator[list[ReplicaProcess]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_replica(tmp_path, [FAILOVER_YAML], redis_url=url)) for _ in range(3)]


def test_a_global_limit_holds_across_three_replicas_through_sentinel(
    sentinel_group: SentinelTopology, tmp_path: Path
) -> None:
    with three_replicas(tmp_path, sentinel_group.url) as replicas:
        clients = [RateLimitClient(r.target) for r in replicas]
        codes = [clients[i % 3].should_rate_limit("failover", [[("tight", "s")]]).overall_code for i in range(30)]
        for client in clients:
            client.close()
    assert codes.count("OK") == 10


def test_a_primary_failover_under_load_resumes_without_restart(
    sentinel_group: SentinelTopology, tmp_path: Path
) -> None:
    domain, entries = "failover", (("user", "sentinel-load"),)
    old_primary = sentinel_group.current_primary()
    with three_replicas(tmp_path, sentinel_group.url) as replicas:
        run = drive_through_fault([r.target for r in replicas], list(entries), domain, old_primary.kill)
    new_primary = sentinel_group.current_primary()
    key = counter_key("ratelimit:", domain, entries, Unit.HOUR, Algorithm.SLIDING_WINDOW)
    counted = held_hits(new_primary.client(), key)
    lost = run.admitted - counted
    print(
        f"\nsentinel failover: outage {run.outage_s:.2f} s, admitted {run.admitted}, counted {counted}, "
        f"lost {lost}, failed {run.failed} {run.errors}"
    )
    assert new_primary.port != old_primary.port
    assert run.outage_s < SENTINEL_FAILOVER_BOUND_S
    assert 0 <= lost <= 50
