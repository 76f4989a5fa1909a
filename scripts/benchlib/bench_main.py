"""`scripts/bench`: this project's server against a no-op ceiling, a naive baseline and `limits`.

One run starts its own redis-server, a 3-primary/3-replica Redis Cluster (for the cluster
row) and every server on free loopback ports, drives them from separate load processes at
one concurrency, and prints what each contender reached.
The README's "Benchmark" section says what every column counts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import grpc

from benchlib import instructions, report, statecost
from benchlib.procs import PROJECT_ROOT, require
from benchlib.runner import Bench, Options, attach_ratios
from benchlib.servers import (
    CLUSTER,
    HEADLINE,
    PLAN,
    PRE_TRACING,
    SAME_RATE,
    SAMPLED_OUT,
    TRACING_ON,
    WINDOW_OFF,
    ServerSpec,
    baseline,
    tracing_plan,
    window_plan,
)
from benchlib.workload import SCENARIOS
from tests.support.otlp import running_otlp_receiver
from tests.support.processes import running_redis

# Under a saturating closed loop, a call waits its turn on the server's event loop for tens of
# milliseconds; with the service's 15 ms Redis timeout that turns into UNAVAILABLE answers (and
# an open circuit breaker) instead of a throughput figure.
REDIS_TIMEOUT_MS = 250.0
TRACING_ROWS = (
    (TRACING_ON, "tracing on (every call sampled)"),
    (SAMPLED_OUT, "tracing on, --trace-sampling-ratio 0"),
    (PRE_TRACING, "the server before tracing (baseline)"),
)


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark the rate limit server against a no-op gRPC ceiling, a naive one-EVALSHA-per-descriptor "
        "server and the `limits` library, on a redis-server of its own, and the server on a 3-primary/3-replica "
        "Redis Cluster (loopback only). Writes bench.json and bench.png to --out-dir.",
    )
    parser.add_argument("--quick", action="store_true", help="one short round, fewer rows (about a minute)")
    parser.add_argument("--profile", action="store_true", help="profile the server (py-spy) in an extra 1-desc phase")
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="only the tracing rows (about two minutes): tracing off, on, on but sampled out, and the server of "
        "--pre-tracing-rev, 1 desc, in the same rounds; writes tracing.json",
    )
    parser.add_argument(
        "--pre-tracing-rev",
        help="git revision whose server is --tracing's baseline (default: the parent of the commit that added "
        "ratelimit/tracing.py)",
    )
    parser.add_argument(
        "--state",
        action="store_true",
        help="only the state tier's cost (about a minute and a half): Redis CPU and instructions (callgrind) "
        "per decision and bytes per counter of the project's script, of --baseline-rev's, and of a fixed-window "
        "INCRBY+PEXPIRE anchor; writes state.json",
    )
    parser.add_argument(
        "--window",
        action="store_true",
        help="only the pipeline window's rows (about four minutes): the defaults (5 ms, held while "
        "saturated), the window off, --redis-pipeline-window-us 500/1000/2000/3000/5000 held whenever calls come "
        "close, and 3000 with --redis-pipeline-min-rate 2000, 1 and 4 desc closed loop, and an open-loop "
        "sweep of each at the defaults' rates; writes window.json",
    )
    parser.add_argument(
        "--baseline-rev",
        help="git revision measured beside this tree in the same rounds: its server (1 and 4 desc; with --window, "
        "swept open-loop too) and its script in the state table, for before/after figures",
    )
    parser.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "bench-results", help="default bench-results/")
    parser.add_argument("--load-processes", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight per load process (default 32)")
    parser.add_argument("--rounds", type=int, help="closed-loop rounds per row, interleaved (default 4, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds measured per phase (default 1.25, quick 1)")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds of load before measuring (default 0.3)")
    parser.add_argument(
        "--redis-timeout-ms",
        type=float,
        default=REDIS_TIMEOUT_MS,
        help=f"the project servers' --redis-timeout-ms (default {REDIS_TIMEOUT_MS:g}: saturation shows as latency, "
        "not as UNAVAILABLE; 0 keeps the server's own default)",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 4)
    duration = args.duration if args.duration is not None else (1.0 if args.quick else 1.25)
    if not 1 <= args.load_processes <= 16 or not 1 <= args.concurrency <= 1024:
        parser.error("--load-processes must be 1..16 and --concurrency 1..1024")
    if not 1 <= rounds <= 10 or not 0.5 <= duration <= 30 or not 0 <= args.warmup <= 10:
        parser.error("--rounds must be 1..10, --duration 0.5..30 s and --warmup 0..10 s")
    return Options(
        out_dir=args.out_dir,
        load_processes=args.load_processes,
        concurrency=args.concurrency,
        rounds=rounds,
        warmup_s=args.warmup,
        duration_s=duration,
        sweep_s=1.0 if args.quick else 3.0,
        library_s=1.5 if args.quick else 3.0,
        quick=args.quick,
        profile=args.profile,
        redis_timeout_ms=args.redis_timeout_ms or None,
        tracing=args.tracing,
        pre_tracing_rev=args.pre_tracing_rev,
        state=args.state,
        window=args.window,
        baseline_rev=args.baseline_rev,
    )


def pre_tracing_revision(asked: str | None) -> str | None:
    """The revision to compare tracing off against: what was asked, else the parent of the commit
    that added the tracing module (None outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    try:
        if asked:
            return git("rev-parse", "--verify", f"{asked}^{{commit}}")
        added = git("log", "--max-count=1", "--format=%H", "--diff-filter=A", "--", "ratelimit/tracing.py")
        return git("rev-parse", f"{added}^") if added else None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    if options.tracing:
        return tracing_main(options)
    if options.state:
        return state_main(options)
    if options.window:
        return window_main(options)
    require("matplotlib", "limits", "uvloop")
    with (
        tempfile.TemporaryDirectory(prefix="ratelimit-bench-") as work,
        running_redis() as redis_server,
        running_otlp_receiver() as receiver,
        contextlib.ExitStack() as cluster_stack,
    ):
        bench = Bench(options, redis_server.url, Path(work))
        bench.otlp_endpoint = receiver.endpoint
        try:
            bench.log(
                f"{os.cpu_count()} cores; load: {options.load_processes} processes x {options.concurrency} in flight"
            )
            bench.start_cluster(cluster_stack)
            bench.start_servers(with_baseline(PLAN, options.baseline_rev))
            bench.closed_loop()
            bench.stop_unswept(cluster_stack)
            bench.open_loop()
            if options.profile:
                bench.profiled(HEADLINE)
            bench.library_comparison()
        finally:
            bench.close()
        spans = len(receiver.spans())  # the servers are stopped: their last spans are in
    state_rounds = 1 if options.quick else 3
    state_table, state = statecost.run(options.baseline_rev, rounds=state_rounds, seconds=1.0, log=bench.log)
    attach_ratios(bench)
    found = report.targets(bench.closed, bench.sweep, bench.library, (HEADLINE, WINDOW_OFF), {WINDOW_OFF: HEADLINE})
    cluster = cluster_comparison(bench)
    tracing = report.tracing_lines(bench.closed, HEADLINE, TRACING_ROWS[:1], spans)
    print(summary_text(bench, found, cluster, tracing))
    print(f"\n{state_table}")
    report.write_json(options.out_dir / "bench.json", {**json_document(bench, found, cluster), "state": state})
    report.draw_chart(options.out_dir / "bench.png", bench.closed, bench.sweep)
    print(f"\nwrote {options.out_dir / 'bench.json'} and {options.out_dir / 'bench.png'}")
    return 0


def with_baseline(plan: tuple[ServerSpec, ...], revision: str | None) -> tuple[ServerSpec, ...]:
    """The plan, plus the server of `revision` (--baseline-rev)."""
    return (*plan, baseline(revision)) if revision else plan


def state_main(options: Options) -> int:
    """`--state`: the state tier's cost alone: Redis CPU, bytes, and instructions where callgrind runs."""
    table, document = statecost.run(options.baseline_rev, rounds=3, seconds=1.0, log=print)
    print(f"\n{table}")
    why_not = instructions.available()
    if why_not is None:
        counted, document["instructions_per_decision"] = instructions.table(
            statecost.sources_of(options.baseline_rev), log=print
        )
        print(f"\n{counted}")
    else:
        print(f"\nno instruction counts: {why_not}")
    report.write_json(options.out_dir / "state.json", {"baseline_rev": options.baseline_rev, **document})
    print(f"\nwrote {options.out_dir / 'state.json'}")
    return 0


def window_main(options: Options) -> int:
    """`--window`: the pipeline window's trade-off alone, every row in the same rounds."""
    with tempfile.TemporaryDirectory(prefix="ratelimit-bench-") as work, running_redis() as redis_server:
        bench = Bench(options, redis_server.url, Path(work))
        try:
            bench.log(f"{os.cpu_count()} cores; load: {options.load_processes} processes x {options.concurrency}")
            bench.start_servers(window_plan(options.baseline_rev))
            bench.closed_loop()
            bench.open_loop()
        finally:
            bench.close()
    print("\n".join(["", report.closed_table(bench.closed), "", report.open_table(bench.sweep)]))
    print(*(f"note: {note}" for note in bench.notes), sep="\n")
    document = {
        "options": {key: str(value) for key, value in vars(options).items()},
        "closed_loop": [m.to_json() for m in bench.closed],
        "open_loop": [m.to_json() for m in bench.sweep],
        "notes": bench.notes,
    }
    report.write_json(options.out_dir / "window.json", document)
    print(f"\nwrote {options.out_dir / 'window.json'}")
    return 0


def tracing_main(options: Options) -> int:
    """`--tracing`: the tracing rows alone, each against tracing off in the same rounds."""
    revision = pre_tracing_revision(options.pre_tracing_rev)
    with (
        tempfile.TemporaryDirectory(prefix="ratelimit-bench-") as work,
        running_redis() as redis_server,
        running_otlp_receiver() as receiver,
    ):
        bench = Bench(options, redis_server.url, Path(work))
        bench.otlp_endpoint = receiver.endpoint
        try:
            bench.log(
                f"{os.cpu_count()} cores; load: {options.load_processes} processes x {options.concurrency} in flight; "
                f"baseline revision {revision or '(none: not a git checkout)'}"
            )
            bench.start_servers(tracing_plan(revision))
            bench.closed_loop()
        finally:
            bench.close()
        spans = len(receiver.spans())  # the servers are stopped: their last spans are in
        call_path = bench.call_path_cpu(receiver.endpoint, revision)
    lines = report.tracing_lines(bench.closed, HEADLINE, TRACING_ROWS, spans)
    lines += report.call_path_lines(call_path)
    print("\n".join(["", report.closed_table(bench.closed), "", *lines, *(f"note: {n}" for n in bench.notes)]))
    document = {
        "options": {key: str(value) for key, value in vars(options).items()},
        "pre_tracing_revision": revision,
        "closed_loop": [m.to_json() for m in bench.closed],
        "spans_received": spans,
        "call_path_us_per_call": call_path,
        "summary": lines,
        "notes": bench.notes,
    }
    report.write_json(options.out_dir / "tracing.json", document)
    print(f"\nwrote {options.out_dir / 'tracing.json'}")
    return 0


def cluster_comparison(bench: Bench) -> report.ClusterComparison | None:
    deployment = bench.deployments.get("cluster")
    if deployment is None:
        return None
    return report.cluster_comparison(bench.closed, HEADLINE, CLUSTER, deployment.roles)


def summary_text(
    bench: Bench, found: list[report.Target], cluster: report.ClusterComparison | None, tracing: list[str]
) -> str:
    options = bench.options
    timeout = "their default Redis timeout"
    if options.redis_timeout_ms:
        timeout = f"--redis-timeout-ms {options.redis_timeout_ms:g}"
    same_rate = ""
    if report.find(bench.sweep, "ceiling", SAME_RATE):
        same_rate = (
            f"; ceiling '{SAME_RATE}': the no-op server at {HEADLINE}'s 50% rate, right after {HEADLINE}'s phase at it"
        )
    parts = [
        f"\nClosed loop: {options.load_processes} load processes x {options.concurrency} calls in flight "
        f"= {bench.in_flight}; {options.rounds} round(s) of {options.duration_s:g} s per row (after "
        f"{options.warmup_s:g} s warm-up each), rows interleaved, req/s the median of the rounds; "
        f"{os.cpu_count()} cores shared by the servers, the load processes and Redis. Latencies include failed "
        f"calls; req/s counts answered calls only. Project servers run with {timeout}.",
        report.closed_table(bench.closed),
        *(["", *cluster.lines()] if cluster else []),
        *(["", *tracing] if tracing else []),
        "\nOpen loop, 1 descriptor, offered at 25/50/75/100% of each contender's closed-loop peak "
        f"(latency from the instant each call was due){same_rate}:",
        report.open_table(bench.sweep),
        f"\nOne process, no gRPC: decisions/s on the same Redis ({options.library_s:g} s each):",
        report.library_table(bench.library),
        "\nTargets:",
        *(target.line() for target in found),
    ]
    if bench.profile_summary:
        parts += ["\nServer profile (project, 1 desc):", "\n".join(bench.profile_summary.splitlines()[:20])]
    if bench.notes:
        parts += ["\nNotes:", *(f"- {note}" for note in bench.notes)]
    return "\n".join(parts)


def json_document(bench: Bench, found: list[report.Target], cluster: report.ClusterComparison | None) -> dict[str, Any]:
    deployment = bench.deployments.get("cluster")
    return {
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "redis": bench.redis_version,
        },
        "options": {key: str(value) for key, value in vars(bench.options).items()},
        "serve_flags_used": sorted(bench.flags & {"redis-batching", "over-limit-cache", "workers", "event-loop"}),
        "scenarios": SCENARIOS,
        "closed_loop": [m.to_json() for m in bench.closed],
        "open_loop": [m.to_json() for m in bench.sweep],
        "library": [
            {"contender": r.contender, "concurrency": r.concurrency, "decisions_per_s": r.per_second}
            for r in bench.library
        ],
        "cluster": {
            "row": f"project {CLUSTER}",
            "nodes": [{"port": port, "role": role} for port, role in zip(deployment.ports, deployment.roles)],
            "start_s": bench.cluster_start_s,
            "comparison": cluster.to_json() if cluster else None,
        }
        if deployment
        else None,
        "targets": [{"name": t.name, "passed": t.passed, "detail": t.detail} for t in found],
        "notes": bench.notes,
        "profile": bench.profile_summary,
    }
