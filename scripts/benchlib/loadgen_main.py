"""`scripts/loadgen`: drive running replicas at a fixed rate and show the shared limit hold.

The targets (by default the local cluster's replicas, where its port variables put them) are
asked for their health first; if one does not serve, nothing is sent. Requests then go
round-robin over the targets at `--rate` per second for `--duration` seconds
(open loop: a slow replica does not slow the sender; at most `--max-in-flight` calls
wait at once, beyond that a due call is skipped and counted). At the end it prints each
replica's admitted and denied counts and latencies, the most requests admitted in any
window of the limit's unit, and draws admitted requests over time against the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
from cluster_topology import REPLICAS, PortMap, TopologyError
from healthcheck import is_serving

from benchlib.phases import percentile
from benchlib.procs import PROJECT_ROOT, require
from ratelimit.client import build_request, parse_descriptor, result_from_response
from ratelimit.config.model import Unit
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2_grpc

# Without --target: the local cluster's replicas, where its port variables put them.
DEFAULT_TARGETS_TEXT = "the local cluster's replicas (127.0.0.1:8081, 8082, 8083, or RATELIMIT_{1,2,3}_GRPC_PORT)"
PREFLIGHT_TIMEOUT_S = 2.0
# compose/limits: (route=demo, remote_address=<client>) is allowed 60 requests a minute.
DEFAULT_DOMAIN = "demo"
DEFAULT_DESCRIPTOR = "route=demo,remote_address=loadgen"
MAX_DURATION_S = 3600.0
MAX_RATE = 20_000.0


@dataclass
class Call:
    replica: int
    sent_s: float  # since the run's start
    done_s: float
    outcome: str  # "OK", "OVER_LIMIT" or a gRPC status name


@dataclass
class Limit:
    requests_per_unit: int
    unit: str

    @property
    def window_s(self) -> float:
        return float(Unit[self.unit].seconds)


@dataclass
class Run:
    targets: list[str]
    calls: list[Call] = field(default_factory=list)
    sent: int = 0  # calls started
    skipped: int = 0  # due calls not started: too many in flight
    limit: Limit | None = None
    elapsed_s: float = 0.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/loadgen",
        description="Send rate limit requests round-robin to running replicas at a fixed rate; print per-replica "
        "admitted/denied counts and latencies; plot admitted requests over time against the limit.",
    )
    parser.add_argument(
        "--target",
        action="append",
        help=f"host:port of a replica (repeatable or comma-separated; default {DEFAULT_TARGETS_TEXT})",
    )
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second over all targets (default 20)")
    parser.add_argument(
        "--duration",
        type=float,
        default=75.0,
        help="seconds to send for (default 75: past the demo rule's one-minute window, so hits are seen leaving it)",
    )
    parser.add_argument("--domain", default=DEFAULT_DOMAIN, help=f"rate limit domain (default {DEFAULT_DOMAIN})")
    parser.add_argument(
        "--descriptor",
        action="append",
        type=parse_descriptor,
        help=f"k=v[,k=v...]: one descriptor (repeatable; default {DEFAULT_DESCRIPTOR})",
    )
    parser.add_argument("--hits", type=int, default=0, help="hits_addend of every request (0 means 1)")
    parser.add_argument("--timeout", type=float, default=1.0, help="deadline of each call in seconds (default 1)")
    parser.add_argument("--max-in-flight", type=int, default=512, help="calls waiting at once at most (default 512)")
    parser.add_argument(
        "--plot",
        type=Path,
        default=PROJECT_ROOT / "bench-results" / "loadgen.png",
        help="PNG to write (default bench-results/loadgen.png)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto", help="progress bar")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= MAX_RATE:
        parser.error(f"--rate must be in (0, {MAX_RATE:g}]")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if not 1 <= args.max_in_flight <= 100_000 or args.timeout <= 0:
        parser.error("--max-in-flight must be 1..100000 and --timeout positive")
    if args.target:
        args.target = [t.strip() for item in args.target for t in item.split(",") if t.strip()]
    else:
        try:
            ports = PortMap.from_environment(os.environ)
        except TopologyError as exc:
            parser.error(str(exc))
        args.target = [ports.address(replica, 8081) for replica in REPLICAS]
    args.descriptor = args.descriptor or [parse_descriptor(DEFAULT_DESCRIPTOR)]
    return args


def unreachable_targets(targets: Sequence[str]) -> list[str]:
    """The targets whose health service does not answer SERVING, each with the status it got
    (UNAVAILABLE: nothing listens; DEADLINE_EXCEEDED: something hangs; NOT_SERVING)."""
    answers = {target: is_serving(target, service="", timeout_s=PREFLIGHT_TIMEOUT_S) for target in targets}
    return [f"{target}: {detail.split(':')[0]}" for target, (serving, detail) in answers.items() if not serving]


class Progress:
    """One redrawn terminal line: elapsed time, bar, and the counts so far."""

    WIDTH = 30

    def __init__(self, run: Run, duration_s: float, enabled: bool) -> None:
        self.run, self.duration_s, self.enabled = run, duration_s, enabled

    def draw(self, elapsed_s: float, final: bool = False) -> None:
        if not self.enabled:
            return
        done = min(1.0, elapsed_s / self.duration_s)
        filled = int(done * self.WIDTH)
        counts = {"OK": 0, "OVER_LIMIT": 0}
        errors = 0
        for call in self.run.calls:
            if call.outcome in counts:
                counts[call.outcome] += 1
            else:
                errors += 1
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = (
            f"\r[{bar}] {elapsed_s:5.1f}/{self.duration_s:g} s  sent {self.run.sent:>6}  "
            f"admitted {counts['OK']:>6}  denied {counts['OVER_LIMIT']:>6}  errors {errors:>4}"
        )
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()


async def drive(args: argparse.Namespace) -> Run:
    run = Run(targets=args.target)
    request = build_request(args.domain, args.descriptor, args.hits)
    channels = [grpc.aio.insecure_channel(target) for target in args.target]
    stubs = [rls_pb2_grpc.RateLimitServiceStub(channel) for channel in channels]
    enabled = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    progress = Progress(run, args.duration, enabled)
    in_flight: set[asyncio.Task[None]] = set()
    started = time.monotonic()

    async def one(replica: int, due_s: float) -> None:
        try:
            response = await stubs[replica].ShouldRateLimit(request, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name
        else:
            result = result_from_response(response)
            outcome = result.overall_code
            if run.limit is None:
                limited = [s for s in result.statuses if s.requests_per_unit is not None and s.unit]
                if limited:
                    run.limit = Limit(limited[0].requests_per_unit or 0, limited[0].unit or "UNKNOWN")
        run.calls.append(Call(replica, due_s, time.monotonic() - started, outcome))

    try:
        sent, next_draw = 0, 0.0
        interval = 1.0 / args.rate
        while True:
            elapsed = time.monotonic() - started
            due = sent * interval
            if due >= args.duration:
                break
            while due <= elapsed and due < args.duration:
                if len(in_flight) >= args.max_in_flight:
                    run.skipped += 1
                else:
                    run.sent += 1
                    task = asyncio.create_task(one(sent % len(stubs), due))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                sent += 1
                due = sent * interval
            if elapsed >= next_draw:
                progress.draw(elapsed)
                next_draw = elapsed + 0.2
            await asyncio.sleep(max(0.0, min(due - (time.monotonic() - started), 0.2)))
        if in_flight:
            await asyncio.wait(in_flight, timeout=args.timeout + 1.0)
        run.elapsed_s = time.monotonic() - started
        progress.draw(min(run.elapsed_s, args.duration), final=True)
    finally:
        for channel in channels:
            await channel.close()
    return run


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """The most of `times` inside any half-open interval of length `window_s`."""
    ordered, first, best = sorted(times), 0, 0
    for last, time_s in enumerate(ordered):
        while time_s - ordered[first] >= window_s:
            first += 1
        best = max(best, last - first + 1)
    return best


def summary(run: Run, args: argparse.Namespace) -> dict[str, object]:
    replicas = []
    for index, target in enumerate(run.targets):
        calls = [call for call in run.calls if call.replica == index]
        latencies = sorted(1000 * (call.done_s - call.sent_s) for call in calls)
        replicas.append(
            {
                "target": target,
                "sent": len(calls),
                "admitted": sum(call.outcome == "OK" for call in calls),
                "denied": sum(call.outcome == "OVER_LIMIT" for call in calls),
                "errors": sum(call.outcome not in ("OK", "OVER_LIMIT") for call in calls),
                "p50_ms": percentile(latencies, 0.5),
                "p90_ms": percentile(latencies, 0.9),
                "p99_ms": percentile(latencies, 0.99),
                "max_ms": latencies[-1] if latencies else float("nan"),
            }
        )
    admitted_times = [call.done_s for call in run.calls if call.outcome == "OK"]
    window_s = run.limit.window_s if run.limit else None
    error_codes: dict[str, int] = {}
    for call in run.calls:
        if call.outcome not in ("OK", "OVER_LIMIT"):
            error_codes[call.outcome] = error_codes.get(call.outcome, 0) + 1
    return {
        "domain": args.domain,
        "descriptors": [",".join(f"{k}={v}" for k, v in d) for d in args.descriptor],
        "rate": args.rate,
        "duration_s": args.duration,
        "sent": run.sent,
        "skipped": run.skipped,
        "unanswered": run.sent - len(run.calls),
        "admitted": len(admitted_times),
        "denied": sum(call.outcome == "OVER_LIMIT" for call in run.calls),
        "errors": sum(error_codes.values()),
        "error_codes": error_codes,
        "limit": None if run.limit is None else {**vars(run.limit), "window_s": window_s},
        "max_admitted_in_window": max_in_window(admitted_times, window_s) if window_s else None,
        "replicas": replicas,
    }


def print_summary(numbers: dict[str, object]) -> None:
    limit = numbers["limit"]
    limit_text = f"{limit['requests_per_unit']}/{limit['unit']}" if isinstance(limit, dict) else "none reported"
    print(
        f"domain {numbers['domain']}, descriptors {'; '.join(numbers['descriptors'])}: "  # type: ignore[arg-type]
        f"{numbers['sent']} sent at {numbers['rate']:g}/s for {numbers['duration_s']:g} s "
        f"({numbers['skipped']} skipped: too many in flight; {numbers['unanswered']} unanswered); limit {limit_text}"
    )
    print(
        f"{'replica':<22} {'sent':>7} {'admitted':>9} {'denied':>7} {'errors':>7} "
        f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    )
    for row in numbers["replicas"]:  # type: ignore[attr-defined]
        print(
            f"{row['target']:<22} {row['sent']:>7} {row['admitted']:>9} {row['denied']:>7} {row['errors']:>7} "
            f"{row['p50_ms']:>7.2f} {row['p90_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['max_ms']:>7.2f}"
        )
    print(f"{'total':<22} {numbers['sent']:>7} {numbers['admitted']:>9} {numbers['denied']:>7} {numbers['errors']:>7}")
    if numbers["error_codes"]:
        print(f"errors: {numbers['error_codes']}")
    if isinstance(limit, dict):
        print(
            f"most admitted in any {limit['window_s']:g} s window (client clock): "
            f"{numbers['max_admitted_in_window']} (limit {limit['requests_per_unit']})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    require("matplotlib")
    # Ask first: a run against nothing would take its whole duration to report only failures.
    down = unreachable_targets(args.target)
    if down:
        print(f"loadgen: {len(down)} of {len(args.target)} targets do not serve, nothing sent:", file=sys.stderr)
        for line in down:
            print(f"  {line}", file=sys.stderr)
        print(
            "start the local cluster with scripts/cluster up (its port variables move the targets), "
            "or name running replicas with --target",
            file=sys.stderr,
        )
        return 1
    try:
        run = asyncio.run(drive(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    numbers = summary(run, args)
    print_summary(numbers)
    from benchlib.loadgen_plot import draw

    args.plot.parent.mkdir(parents=True, exist_ok=True)
    draw(args.plot, run, numbers)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    failed = numbers["errors"] or numbers["unanswered"] or numbers["skipped"]
    return 0 if numbers["sent"] and not failed else 1
