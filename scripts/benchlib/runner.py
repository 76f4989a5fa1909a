"""Runs the whole benchmark: starts every server at once, then measures in interleaved rounds.

All servers stay up for the run and the closed-loop rows are measured round-robin, each
row once per round, so a slow spell of a shared machine spreads over every contender
instead of landing on one of them; each row pools its rounds. The servers use the run's
redis-server, except the cluster row's, which uses a 3-primary/3-replica Redis Cluster
started for the run (tests/support/redis_topologies.py); its Redis counters are summed
over the six nodes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from benchlib import libcompare
from benchlib.phases import LoadPool, LoadShape, Measurement, Sample, run_phase
from benchlib.procs import PROJECT_ROOT, SCRIPTS_DIR, start_server, stop_process, wait_ready
from benchlib.profiling import Profiler
from benchlib.servers import HEADLINE, SAME_RATE, ServerSpec, command_line, missing_flags, serve_flags
from benchlib.workload import write_config
from tests.support.processes import free_port
from tests.support.redis_topologies import running_redis_cluster

SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# The call path's bursts (about 0.1 s each), per round of --rounds, each mode in turn.
CALL_PATH_BURSTS = 10
CALL_PATH_BURST_CALLS = 1_000


@dataclass(frozen=True)
class Options:
    out_dir: Path
    load_processes: int
    concurrency: int
    rounds: int
    warmup_s: float
    duration_s: float
    sweep_s: float
    library_s: float
    quick: bool
    profile: bool
    redis_timeout_ms: float | None
    tracing: bool = False  # only the tracing rows (scripts/bench --tracing)
    pre_tracing_rev: str | None = None
    state: bool = False  # only the state tier's cost (scripts/bench --state)
    window: bool = False  # only the pipeline window's rows (scripts/bench --window)
    baseline_rev: str | None = None  # a revision whose server and script are rows of their own


@dataclass
class RedisDeployment:
    """A Redis the servers talk to: the URL they get, and a client per node for its counters."""

    url: str
    clients: list[redis.Redis]
    ports: list[int]
    roles: list[str]  # by node: "primary" or "replica"

    def close(self) -> None:
        for client in self.clients:
            client.close()


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen[bytes]
    target: str
    log_path: Path
    redis: RedisDeployment


class Bench:
    def __init__(self, options: Options, redis_url: str, work_dir: Path) -> None:
        self.options = options
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        self.redis_version = str(self.redis.info("server")["redis_version"])
        port = int(self.redis.connection_pool.connection_kwargs.get("port", 6379))
        self.deployments = {"single": RedisDeployment(redis_url, [self.redis], [port], ["primary"])}
        self.cluster_start_s: float | None = None
        self.work_dir = work_dir
        self.config = write_config(work_dir)
        self.flags = serve_flags()
        self.closed: list[Measurement] = []
        self.sweep: list[Measurement] = []
        self.library: list[libcompare.LibraryResult] = []
        self.notes: list[str] = []
        self.profile_summary: str | None = None
        self.started = time.monotonic()
        self.phases_run = 0
        self.pool = LoadPool(options.load_processes)
        self.servers: list[RunningServer] = []
        self.otlp_endpoint: str | None = None  # the run's OTLP receiver, for the tracing rows
        self._checkouts: dict[str, Path] = {}

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    @property
    def in_flight(self) -> int:
        return self.options.load_processes * self.options.concurrency

    def start_cluster(self, stack: contextlib.ExitStack) -> None:
        """A 3-primary/3-replica Redis Cluster on loopback for the cluster row; `stack` stops it."""
        started = time.monotonic()
        try:
            topology = stack.enter_context(running_redis_cluster(primaries=3, replicas_per_primary=1))
            primaries = {node.port for node in topology.primaries()}
        except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError, redis.RedisError) as exc:
            self.note(f"skipped the cluster row: the Redis Cluster did not start: {exc}")
            return
        self.cluster_start_s = time.monotonic() - started
        ports = [node.port for node in topology.nodes]
        self.deployments["cluster"] = RedisDeployment(
            topology.url,
            [redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) for port in ports],
            ports,
            ["primary" if port in primaries else "replica" for port in ports],
        )
        self.log(
            f"Redis Cluster up in {self.cluster_start_s:.1f} s: {len(primaries)} primaries, "
            f"{len(ports) - len(primaries)} replicas"
        )

    def start_servers(self, specs: tuple[ServerSpec, ...]) -> None:
        """Start every server at once (they start faster together), then wait for each."""
        starting = []
        for spec in specs:
            missing = missing_flags(spec, self.flags)
            if missing:
                self.note(f"skipped {spec.name}: `ratelimit serve` has no --{', --'.join(missing)}")
                continue
            deployment = self.deployments.get(spec.redis)
            if deployment is None:
                continue  # start_cluster said why
            if spec.trace_sampling_ratio is not None and self.otlp_endpoint is None:
                continue  # no receiver in this run
            port = free_port()
            command = command_line(
                spec, port, deployment.url, self.config, self.flags, self.options.redis_timeout_ms, self.otlp_endpoint
            )
            log_path = self.work_dir / f"{spec.name.replace(' ', '-')}.log"
            source = self.checkout(spec.revision) if spec.revision else PROJECT_ROOT
            process = start_server(command, log_path, source)
            starting.append(RunningServer(spec, process, f"127.0.0.1:{port}", log_path, deployment))
        for server in starting:
            try:
                wait_ready(server.process, server.target, server.spec.workers)
            except (RuntimeError, TimeoutError) as exc:
                log_tail = server.log_path.read_text(errors="replace")[-600:]
                self.note(f"{server.spec.name} did not start: {exc}\n{log_tail}")
                stop_process(server.process)
                continue
            self.servers.append(server)
        self.log(f"{len(self.servers)} servers up")

    def stop_unswept(self, cluster: contextlib.ExitStack) -> None:
        """Before the open-loop sweep (their closed-loop rows are taken): stop the servers it does
        not measure, and the Redis Cluster, whose six nodes' timers each wake ten times a second.
        On two cores an idle neighbour's wake-up lands in the latencies the sweep reads."""
        for server in self.servers:
            if not server.spec.sweep:
                stop_process(server.process)
        cluster.close()
        if "cluster" in self.deployments:
            self.deployments["cluster"].close()

    def checkout(self, revision: str) -> Path:
        """The tree of `revision` (git archive into the work dir), to run its server."""
        if revision not in self._checkouts:
            tree = self.work_dir / f"rev-{revision[:12]}"
            tree.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(PROJECT_ROOT), "archive", revision], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            self._checkouts[revision] = tree
        return self._checkouts[revision]

    def call_path_cpu(self, otlp_endpoint: str, pre_tracing_revision: str | None) -> dict[str, list[float]]:
        """CPU per call of the servicer's own path (benchlib.callpath) by mode: one process per
        mode, asked for bursts in turn; "pre-tracing" is the older revision's, tracing off."""
        runs = [("off", "off", PROJECT_ROOT), ("on", "on", PROJECT_ROOT), ("unsampled", "unsampled", PROJECT_ROOT)]
        if pre_tracing_revision:
            runs.append(("pre-tracing", "off", self.checkout(pre_tracing_revision)))
        processes = {}
        for label, mode, source in runs:
            processes[label] = subprocess.Popen(
                [sys.executable, "-m", "benchlib.callpath", mode, otlp_endpoint],
                cwd=source,  # `-m` puts it first on the path: its `ratelimit` is measured
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS_DIR), str(source)])},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        found: dict[str, list[float]] = {label: [] for label in processes}
        try:
            for label, process in processes.items():
                if _exchange(process, None) != "ready":
                    raise RuntimeError(f"the call path of {label} did not start")
            order = list(processes.items())
            for _ in range(CALL_PATH_BURSTS * self.options.rounds):
                for label, process in order:
                    reply = _exchange(process, f"run {CALL_PATH_BURST_CALLS}")
                    found[label].append(float(json.loads(reply)["us_per_call"]))
                order = order[1:] + order[:1]  # each mode follows each other mode as often
        finally:
            for process in processes.values():
                with contextlib.suppress(OSError):
                    process.communicate(timeout=30)  # closes its stdin: the replica stops
        for label, values in found.items():
            self.log(f"call path, {label}: {sorted(values)[len(values) // 2]:.1f} us per call (median)")
        return found

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.log(text)

    def sample(self, server: RunningServer, scenario: str, shape: LoadShape, rate: float | None = None) -> Sample:
        self.phases_run += 1
        return run_phase(
            self.pool,
            server.redis.clients,
            server.process.pid,
            target=server.target,
            scenario=scenario,
            shape=shape,
            salt=f"{os.getpid()}-{self.phases_run}",
            rate=rate,
        )

    def closed_loop(self) -> None:
        shape = LoadShape(self.options.concurrency, self.options.warmup_s, self.options.duration_s)
        rows = [
            (server, scenario)
            for server in self.servers
            for scenario in (server.spec.quick_scenarios if self.options.quick else server.spec.scenarios)
        ]
        samples: dict[int, list[Sample]] = {index: [] for index in range(len(rows))}
        for round_number in range(1, self.options.rounds + 1):
            for index, (server, scenario) in enumerate(rows):
                sample = self.sample(server, scenario, shape)
                samples[index].append(sample)
                done = sum(result.completed for result in sample.results) / sample.duration_s
                self.log(f"round {round_number}: {server.spec.name} / {scenario}: {done:,.0f} req/s")
        for index, (server, scenario) in enumerate(rows):
            labels = (server.spec.contender, server.spec.variant, scenario)
            self.closed.append(Measurement.pooled(labels, samples[index], self.in_flight))

    def open_loop(self) -> None:
        """Per contender, 1 descriptor at fractions of its own closed-loop peak (or of the variant's
        its spec names, so that two variants are compared at the same offered rates). Interleaved:
        each fraction on every server in turn, so a slow spell of the machine hits no one row."""
        shape = LoadShape(self.options.concurrency, 0.5, self.options.sweep_s)
        swept: list[tuple[RunningServer, float]] = []
        for server in self.servers:
            spec = server.spec
            labels = (spec.contender, spec.sweep_rates_of or spec.variant, "1 desc")
            peak = next((m for m in self.closed if (m.contender, m.variant, m.scenario) == labels), None)
            if spec.sweep and peak is not None and peak.requests_per_s > 0:
                swept.append((server, peak.requests_per_s))
        ceiling = next((s for s, _ in swept if (s.spec.contender, s.spec.variant) == ("ceiling", "asyncio")), None)
        by_server: dict[int, list[Measurement]] = {index: [] for index in range(len(swept))}
        references: list[Measurement] = []
        for fraction in SWEEP_FRACTIONS:
            for index, (server, peak_rate) in enumerate(swept):
                spec, rate = server.spec, peak_rate * fraction
                by_server[index].append(self._swept_phase(server, (spec.contender, spec.variant), shape, rate))
                if ceiling and fraction == 0.5 and (spec.contender, spec.variant) == ("project", HEADLINE):
                    references.append(self._swept_phase(ceiling, ("ceiling", SAME_RATE), shape, rate))
        self.sweep += [measured for index in range(len(swept)) for measured in by_server[index]] + references

    def _swept_phase(
        self, server: RunningServer, labels: tuple[str, str], shape: LoadShape, rate: float
    ) -> Measurement:
        measured = Measurement.pooled((*labels, "1 desc"), [self.sample(server, "1 desc", shape, rate)], 0, rate)
        self.log(
            f"open loop {' '.join(labels)}: {rate:,.0f}/s offered, {measured.requests_per_s:,.0f}/s done, "
            f"p99 {measured.p99_ms:.2f} ms"
        )
        return measured

    def profiled(self, variant: str) -> None:
        """An extra 1-desc phase under py-spy; its numbers stay out of the table (py-spy slows the server)."""
        server = next((s for s in self.servers if (s.spec.contender, s.spec.variant) == ("project", variant)), None)
        if server is None:
            return
        shape = LoadShape(self.options.concurrency, 0.5, max(self.options.duration_s, 3.0))
        profiler = Profiler(server.process.pid, shape.warmup_s + shape.duration_s, self.options.out_dir)
        if profiler.error:
            self.note(f"profile: {profiler.error}")
            return
        sample = self.sample(server, "1 desc", shape)
        self.profile_summary = profiler.finish()
        if profiler.error:
            self.note(f"profile: {profiler.error}")
            return
        done = sum(result.completed for result in sample.results) / sample.duration_s
        self.note(
            f"profiled phase (project {variant}, 1 desc, py-spy attached; not in the table): {done:,.0f} req/s; "
            f"flame graph {profiler.svg}, top functions {profiler.text}"
        )

    def library_comparison(self) -> None:
        concurrency = self.in_flight
        runs = [("limits", 1), ("project", 1), ("limits", concurrency), ("project", concurrency)]
        runs.append(("project-unbatched", concurrency))
        context = multiprocessing.get_context("spawn")
        for contender, callers in runs:
            # A fresh process per measurement: nothing warmed up or left over from the last one.
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as executor:
                future = executor.submit(
                    libcompare.measure, contender, self.redis_url, callers, 0.5, self.options.library_s
                )
                result = future.result(timeout=self.options.library_s + 60)
            self.log(f"{result.contender}, {callers} concurrent: {result.per_second:,.0f} decisions/s")
            self.library.append(result)

    def close(self) -> None:
        for server in self.servers:
            stop_process(server.process)
        self.pool.close()
        for deployment in self.deployments.values():
            deployment.close()


def _exchange(process: subprocess.Popen[str], line: str | None) -> str:
    """Send `line` (if any) to a call path process and read its answer."""
    assert process.stdin is not None and process.stdout is not None  # opened as pipes
    if line is not None:
        process.stdin.write(line + "\n")
        process.stdin.flush()
    return process.stdout.readline().strip()


def attach_ratios(bench: Bench) -> None:
    ceiling_variant = {(s.spec.contender, s.spec.variant): s.spec.ceiling_variant for s in bench.servers}

    def find(contender: str, variant: str, scenario: str) -> Measurement | None:
        return next(
            (m for m in bench.closed if (m.contender, m.variant, m.scenario) == (contender, variant, scenario)), None
        )

    for m in bench.closed:
        variant = ceiling_variant.get((m.contender, m.variant), "asyncio")
        ceiling = find("ceiling", variant, m.scenario) or find("ceiling", variant, "1 desc")
        naive = find("naive", "asyncio", m.scenario)
        if ceiling and ceiling.requests_per_s and m.contender != "ceiling":
            m.versus_ceiling = m.requests_per_s / ceiling.requests_per_s
        if naive and naive.requests_per_s and m.contender == "project":
            m.versus_naive = m.requests_per_s / naive.requests_per_s
