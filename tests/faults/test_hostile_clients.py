"""The hostile-client table: each attack a caller could mount on a replica (real redis-server,
`ratelimit serve`), what it sent, what it got, and what it cost the replica in memory and
latency. Each row asserts the promise it names and adds its figures to the fault table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import redis

from ratelimit.config.model import Unit
from ratelimit.generated.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from tests.faults import probes
from tests.faults.report import FaultTable, outcome_row
from tests.support.processes import RedisServer, free_port, running_redis
from tests.support.replica import ReplicaProcess, running_replica, wait_until_serving

CONFIG = """\
domain: hostile
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: path
    value: "/api/*"
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: roomy
    rate_limit: {unit: hour, requests_per_unit: 1000000}
"""
DEADLINE_S = 10.0
MB_KIB = 1024


@pytest.fixture(scope="module")
def hostile_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


def limits_file(directory: Path) -> Path:
    path = directory / "limits.yaml"
    path.write_text(CONFIG)
    return path


def descriptor(*entries: tuple[str, str], override: tuple[int, int] | None = None, hits: int | None = None
               ) -> ratelimit_pb2.RateLimitDescriptor:  # fmt: skip
    message = ratelimit_pb2.RateLimitDescriptor()
    for key, value in entries:
        message.entries.add(key=key, value=value)
    if override is not None:
        message.limit.requests_per_unit, message.limit.unit = override
    if hits is not None:
        message.hits_addend.value = hits
    return message


def ask(stub: rls_pb2_grpc.RateLimitServiceStub, *descriptors: ratelimit_pb2.RateLimitDescriptor) -> str:
    """The overall code, or the gRPC status name of a refusal."""
    try:
        response = stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="hostile", descriptors=descriptors),
                                        timeout=DEADLINE_S)  # fmt: skip
    except grpc.RpcError as exc:
        assert exc.details(), "a refusal without a message"
        return str(exc.code().name)
    return str(rls_pb2.RateLimitResponse.Code.Name(response.overall_code))


@pytest.fixture
def replica_with(tmp_path: Path, hostile_redis: RedisServer) -> Iterator[object]:
    opened: list[object] = []

    def start(*extra_args: str) -> tuple[ReplicaProcess, rls_pb2_grpc.RateLimitServiceStub]:
        context = running_replica(tmp_path, [limits_file(tmp_path)], redis_url=hostile_redis.url,
                                  extra_args=["--redis-timeout-ms", "2000", *extra_args])  # fmt: skip
        replica = context.__enter__()
        channel = grpc.insecure_channel(replica.target)
        opened.append((context, channel))
        return replica, rls_pb2_grpc.RateLimitServiceStub(channel)

    yield start
    for context, channel in reversed(opened):  # type: ignore[misc]
        channel.close()
        context.__exit__(None, None, None)


def test_a_request_naming_one_counter_twice_poisons_nothing(
    replica_with: object, hostile_redis: RedisServer, fault_table: FaultTable
) -> None:
    """Attack 1: refused, nothing charged, and the next single request answered as Redis would."""
    _replica, stub = replica_with()  # type: ignore[operator]
    store = redis.Redis.from_url(hostile_redis.url)
    outcomes: Counter[str] = Counter()
    bob = descriptor(("user", "bob"))
    outcomes[twice := ask(stub, bob, bob)] += 1
    outcomes[shared := ask(stub, descriptor(("path", "/api/a")), descriptor(("path", "/api/b")))] += 1
    charged = probes.counted_hits(store, probes.sliding_key("hostile", [("user", "bob")], Unit.MINUTE))
    charged += probes.counted_hits(store, probes.sliding_key("hostile", [("path", "/api/*")], Unit.MINUTE))
    outcomes[single := ask(stub, bob)] += 1
    outcomes[other_path := ask(stub, descriptor(("path", "/api/c")))] += 1
    fault_table.add(outcome_row("attack 1: one counter named twice, shared threshold", "refused, 0 charged, "
                                "the next single request admitted", outcomes, charged_by_refused=charged))  # fmt: skip
    assert (twice, shared) == ("OVER_LIMIT", "OVER_LIMIT")
    assert charged == 0
    assert (single, other_path) == ("OK", "OK")


def test_huge_distinct_values_leave_memory_bounded(replica_with: object, fault_table: FaultTable) -> None:
    """Attack 2: 300 distinct 900 KB values, with the value cap raised so they reach the caches."""
    replica, stub = replica_with("--max-entry-bytes", "1000000")  # type: ignore[operator]
    outcomes: Counter[str] = Counter()
    ask(stub, descriptor(("roomy", "warm-up")))
    before = probes.rss_kib(replica.process.pid)
    slowest = 0.0
    for index in range(300):
        started = time.monotonic()
        outcomes[ask(stub, descriptor(("roomy", f"{index:04d}" + "v" * 900_000)))] += 1
        slowest = max(slowest, time.monotonic() - started)
    grown = probes.rss_kib(replica.process.pid) - before
    fault_table.add(outcome_row("attack 2: 300 distinct 900 KB values", "RSS grows < 64 MB", outcomes,
                                rss_growth_mb=grown / MB_KIB, slowest_ms=slowest * 1000))  # fmt: skip
    assert outcomes == Counter(OK=300)
    assert grown < 64 * MB_KIB, f"RSS grew by {grown / MB_KIB:.1f} MB"


def test_overrides_with_huge_keys_keep_metrics_small_and_ttls_short(
    replica_with: object, hostile_redis: RedisServer, fault_table: FaultTable
) -> None:
    """Attack 6: 200 overrides with 200 KB keys. Unit YEAR is refused by default; with DAY the
    labels stay short, /metrics stays small and no key lives longer than a day and a bucket."""
    replica, stub = replica_with("--max-entry-bytes", "300000")  # type: ignore[operator]
    store = redis.Redis.from_url(hostile_redis.url)
    outcomes: Counter[str] = Counter()
    before = probes.rss_kib(replica.process.pid)
    year = ask(stub, descriptor(("k" * 200_000, "v"), override=(0, Unit.YEAR)))
    for index in range(200):
        outcomes[ask(stub, descriptor((f"{index:04d}" + "k" * 200_000, "v"), override=(5, Unit.DAY)))] += 1
    body = probes.scrape(replica.metrics_port)
    grown = probes.rss_kib(replica.process.pid) - before
    longest_ttl_ms = max(store.pttl(key) for key in store.scan_iter(count=1000))
    fault_table.add(outcome_row("attack 6: 200 overrides, 200 KB keys", "/metrics < 4 MB, RSS < 64 MB, "
                                "TTL <= unit + W/40, YEAR refused", outcomes, year_override=year,
                                metrics_mb=len(body) / 2**20, rss_growth_mb=grown / MB_KIB,
                                longest_ttl_h=longest_ttl_ms / 3_600_000))  # fmt: skip
    assert year == "INVALID_ARGUMENT"
    assert outcomes == Counter(OK=200)
    assert len(body) < 4 * 2**20
    assert grown < 64 * MB_KIB
    assert longest_ttl_ms <= 86_400_000 * 41 // 40


def test_absurd_addends_keep_hit_counters_exact(replica_with: object, fault_table: FaultTable) -> None:
    """Attack 7: hits_addend 2^64 - 1 counts limit + 1 (2 here); later single hits still count."""
    replica, stub = replica_with()  # type: ignore[operator]
    outcomes: Counter[str] = Counter()
    for _ in range(50):
        outcomes[ask(stub, descriptor(("user", "absurd"), hits=2**64 - 1))] += 1
    outcomes[ask(stub, descriptor(("user", "absurd-2")))] += 1
    total = probes.metric_value(
        probes.scrape(replica.metrics_port),
        "ratelimit_service_rate_limit_total_hits",
        'domain="hostile",key1="user",key2=""',
    )
    fault_table.add(outcome_row("attack 7: hits_addend 2^64-1", "total_hits counts at most limit + 1 a request",
                                outcomes, total_hits=total))  # fmt: skip
    assert outcomes == Counter(OVER_LIMIT=50, OK=1)
    assert total == 50 * 2 + 1


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_serve_with_no_host_flags_listens_on_loopback_only(tmp_path: Path, fault_table: FaultTable) -> None:
    """Attack 11: with no --grpc-host/--metrics-host, both ports are bound to 127.0.0.1 only."""
    grpc_port, metrics_port = free_port(), free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RATELIMIT_")}
    args = [sys.executable, "-m", "ratelimit", "serve", "--config", str(limits_file(tmp_path)), "--backend", "memory",
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]  # fmt: skip
    process = subprocess.Popen(args, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_serving(f"127.0.0.1:{grpc_port}", process=process)
        bound = {"grpc": listening_addresses(grpc_port), "metrics": listening_addresses(metrics_port)}
    finally:
        process.terminate()
        process.wait(timeout=30)
    # 127.0.0.1 as /proc/net/tcp writes it, and as tcp6 writes ::ffff:127.0.0.1 (gRPC's dual-stack socket).
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    fault_table.add(outcome_row("attack 11: serve with no host flags", "gRPC and metrics on 127.0.0.1 only",
                                Counter(OK=1), grpc_bound=sorted(bound["grpc"]),
                                metrics_bound=sorted(bound["metrics"])))  # fmt: skip
    assert bound["grpc"] and bound["metrics"]
    assert bound["grpc"] <= loopback and bound["metrics"] <= loopback, bound


def test_many_distinct_full_counters_never_stall_the_replica(replica_with: object, fault_table: FaultTable) -> None:
    """Attack 3: requests of 64 distinct full counters each, through an over-limit cache of 2,000
    entries, so it evicts all the time; every call stays well inside Envoy's timeout."""
    _replica, stub = replica_with("--over-limit-cache-entries", "2000")  # type: ignore[operator]
    outcomes: Counter[str] = Counter()
    latencies = []
    for batch in range(150):  # 9,600 distinct counters, each admitted once then refused (cached)
        request = [descriptor(("roomy", f"evict-{batch}-{index}"), override=(1, Unit.MINUTE)) for index in range(64)]
        for _ in range(2):
            started = time.monotonic()
            outcomes[ask(stub, *request)] += 1
            latencies.append(time.monotonic() - started)
    latencies.sort()
    fault_table.add(outcome_row("attack 3: 9,600 distinct full counters, cache of 2,000", "no stall: calls stay "
                                "fast while the cache evicts", outcomes, p99_ms=latencies[len(latencies) * 99 // 100]
                                * 1000, slowest_ms=latencies[-1] * 1000))  # fmt: skip
    assert outcomes == Counter(OK=150, OVER_LIMIT=150)
    assert latencies[-1] < 0.5, f"slowest call {latencies[-1] * 1000:.0f} ms"
