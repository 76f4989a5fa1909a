"""Runs benchmark phases: load from the worker processes, CPU and Redis counters around it.

A phase is one server, one scenario and one load shape (closed loop at a concurrency, or
open loop at a rate). The server's CPU time (every process of its tree, workers included),
the load processes' CPU time and Redis's counters (of every node, on a Redis Cluster) are
read at the instants the workers start and stop counting, so everything is charged to the
same window. A row of the results pools the samples of several phases (rounds) of the
same server and scenario.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time
from array import array
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Sequence

import redis

from benchlib.loadworker import Phase, PhaseResult, serve_phases
from benchlib.procs import RedisCounters, cpu_seconds, process_tree

WORKER_STARTUP_S = 0.3  # lead time for the workers to connect before the load starts


@dataclass(frozen=True)
class LoadShape:
    concurrency: int  # per load process (closed loop)
    warmup_s: float
    duration_s: float


@dataclass
class Sample:
    """The raw outcome of one phase."""

    duration_s: float
    results: list[PhaseResult]
    server_cpu_s: float
    load_cpu_s: float
    redis: RedisCounters  # summed over the nodes
    redis_nodes: list[RedisCounters]  # by node, in the order of the clients the phase read


@dataclass
class Measurement:
    """One row of the results: what a contender did in one scenario (pooled over rounds)."""

    contender: str
    variant: str
    scenario: str
    mode: str  # "closed" or "open"
    offered_rate: float | None  # open loop: calls per second asked for
    concurrency: int  # closed loop: calls in flight over all load processes
    seconds_measured: float
    rounds: int
    requests_per_s: float  # the median over rounds (a slow spell of the machine moves it least)
    p50_ms: float
    p99_ms: float
    p999_ms: float
    over_limit_share: float
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    server_cpu_us_per_request: float = 0.0
    server_cores: float = 0.0
    load_cores: float = 0.0
    redis_cpu_us_per_request: float = 0.0  # summed over every Redis node (a cluster's replicas included)
    redis_cpu_us_per_request_by_node: list[float] = field(default_factory=list)
    evalsha_per_request: float = 0.0
    redis_commands_per_request: float = 0.0
    redis_reads_per_request: float = 0.0
    versus_ceiling: float | None = None  # req/s over the ceiling's with the same process model
    versus_naive: float | None = None  # req/s over the naive baseline's, same scenario
    requests_per_s_by_round: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def pooled(
        cls, labels: tuple[str, str, str], samples: Sequence[Sample], concurrency: int, rate: float | None = None
    ) -> Measurement:
        contender, variant, scenario = labels
        seconds = sum(sample.duration_s for sample in samples)
        results = [result for sample in samples for result in sample.results]
        latencies: array[float] = array("d")
        errors: dict[str, int] = {}
        for result in results:
            latencies.frombytes(result.latencies_ms)
            for code, count in result.errors.items():
                errors[code] = errors.get(code, 0) + count
        ordered = sorted(latencies)
        by_round = [sum(r.completed for r in sample.results) / sample.duration_s for sample in samples]
        completed = sum(result.completed for result in results)
        per_request = 1.0 / completed if completed else float("nan")
        server_cpu = sum(sample.server_cpu_s for sample in samples)
        nodes = min((len(sample.redis_nodes) for sample in samples), default=0)
        return cls(
            contender=contender,
            variant=variant,
            scenario=scenario,
            mode="open" if rate else "closed",
            offered_rate=rate,
            concurrency=0 if rate else concurrency,
            seconds_measured=seconds,
            rounds=len(samples),
            requests_per_s=statistics.median(by_round),
            requests_per_s_by_round=by_round,
            p50_ms=percentile(ordered, 0.50),
            p99_ms=percentile(ordered, 0.99),
            p999_ms=percentile(ordered, 0.999),
            over_limit_share=sum(result.over_limit for result in results) * per_request if completed else 0.0,
            errors=errors,
            dropped=sum(result.dropped for result in results),
            server_cpu_us_per_request=server_cpu * 1e6 * per_request,
            server_cores=server_cpu / seconds,
            load_cores=sum(sample.load_cpu_s for sample in samples) / seconds,
            redis_cpu_us_per_request=sum(s.redis.cpu_s for s in samples) * 1e6 * per_request,
            redis_cpu_us_per_request_by_node=[
                sum(s.redis_nodes[node].cpu_s for s in samples) * 1e6 * per_request for node in range(nodes)
            ],
            evalsha_per_request=sum(s.redis.evalsha_calls for s in samples) * per_request,
            redis_commands_per_request=sum(s.redis.commands for s in samples) * per_request,
            redis_reads_per_request=sum(s.redis.reads for s in samples) * per_request,
        )


def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of sorted values (NaN when there are none)."""
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, int(share * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


class LoadPool:
    """Long-lived load processes (spawned, so no gRPC state crosses a fork)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connections: list[Connection] = []
        self._processes = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=serve_phases, args=(theirs,), daemon=True)
            process.start()
            self._connections.append(ours)
            self._processes.append(process)
        for connection in self._connections:
            try:
                ready = connection.poll(60) and connection.recv() == "ready"
            except EOFError:
                ready = False
            if not ready:
                self.close()
                raise RuntimeError("a load process did not start")

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes if process.pid is not None]

    def __len__(self) -> int:
        return len(self._connections)

    def send(self, phases: list[Phase]) -> None:
        for connection, phase in zip(self._connections, phases):
            connection.send(phase)

    def receive(self, timeout_s: float) -> list[PhaseResult]:
        results = []
        for connection in self._connections:
            if not connection.poll(timeout_s):
                raise TimeoutError("a load process did not report within its deadline")
            reply = connection.recv()
            if isinstance(reply, Exception):
                raise RuntimeError(f"load process failed: {reply!r}") from reply
            results.append(reply)
        return results

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()


def run_phase(
    pool: LoadPool,
    redis_clients: Sequence[redis.Redis],
    server_pid: int,
    *,
    target: str,
    scenario: str,
    shape: LoadShape,
    salt: str,
    rate: float | None = None,
) -> Sample:
    start_at = time.monotonic() + WORKER_STARTUP_S
    measure_from = start_at + shape.warmup_s
    measure_to = measure_from + shape.duration_s
    pool.send(
        [
            Phase(
                target=target,
                scenario=scenario,
                salt=salt,
                seed=index * 7919 + 1,
                start_at=start_at,
                measure_from=measure_from,
                measure_to=measure_to,
                concurrency=shape.concurrency,
                rate=(rate or 0.0) / len(pool),
            )
            for index in range(len(pool))
        ]
    )
    server_pids = process_tree(server_pid)
    time.sleep(max(0.0, measure_from - time.monotonic()))
    server_before, load_before = cpu_seconds(server_pids), cpu_seconds(pool.pids)
    redis_before = [RedisCounters.read(client) for client in redis_clients]
    time.sleep(max(0.0, measure_to - time.monotonic()))
    server_after, load_after = cpu_seconds(server_pids), cpu_seconds(pool.pids)
    redis_nodes = [RedisCounters.read(client).minus(before) for client, before in zip(redis_clients, redis_before)]
    results = pool.receive(timeout_s=shape.duration_s + 30)
    return Sample(
        shape.duration_s,
        results,
        server_after - server_before,
        load_after - load_before,
        RedisCounters.total(redis_nodes),
        redis_nodes,
    )
