"""The contenders' servers: their command lines, which optional `serve` flags exist, the plan."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import PROJECT_ROOT, python_command

# The optimisation flags each row sets; a build without one of them skips the rows that need it.
OPTIMISATION_FLAGS = ("redis-batching", "over-limit-cache", "workers", "event-loop")
HEADLINE = "batch+cache"  # the defaults: a 5 ms pipeline window held only while the replica is saturated
# HEADLINE's flags with the pipeline window off: what the window gives.
WINDOW_OFF = "window off"
# HEADLINE's flags with a 3 ms window gated by a call rate instead of saturation
# (--redis-pipeline-min-rate 2000, --redis-pipeline-min-busy 0): the gate that came first.
RATE_GATED = "rate-gated 3ms"  # a name that is also a file name (the server log)
WINDOW_US, RATE_GATE = 3000, 2000
# The no-op ceiling once more at HEADLINE's half-peak rate, right after HEADLINE's own phase
# at it: what the machine alone does to the tail at the rate of the p99 target.
SAME_RATE = "same rate"
CLUSTER = "cluster"  # the variant on the 3-primary/3-replica Redis Cluster (HEADLINE's flags)
TRACING_ON = "tracing on"  # HEADLINE's flags with every call traced, spans sent to the run's receiver
SAMPLED_OUT = "sampled out"  # tracing on at --trace-sampling-ratio 0: spans made, none kept
PRE_TRACING = "pre-tracing"  # HEADLINE's flags, the server of the revision before tracing existed
ALL_SCENARIOS = ("1 desc", "4 desc", "hot key", "100k keys")


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration: a contender and the flags of one variant."""

    contender: str  # "ceiling", "naive" or "project"
    variant: str  # short label, e.g. "batching off"
    batching: bool = True
    over_limit_cache: bool = True
    workers: int = 1
    event_loop: str = "asyncio"
    scenarios: tuple[str, ...] = ("1 desc",)
    quick_scenarios: tuple[str, ...] = ("1 desc",)
    sweep: bool = False  # also run the open-loop sweep (1 desc) on this server
    sweep_rates_of: str | None = None  # sweep at the rates of this variant's peak (same contender); None: its own
    needs: tuple[str, ...] = ()  # serve flags this variant depends on
    redis: str = "single"  # "single": the run's redis-server; "cluster": its Redis Cluster
    trace_sampling_ratio: float | None = None  # tracing on at this ratio (to the run's receiver); None: off
    revision: str | None = None  # a git revision whose server runs (from a checkout of it); None: this tree
    # --redis-pipeline-window-us, --redis-pipeline-min-rate, --redis-pipeline-min-busy; None: the server's default
    pipeline_window_us: float | None = None
    pipeline_min_rate: float | None = None
    pipeline_min_busy: float | None = None

    @property
    def name(self) -> str:
        return f"{self.contender} {self.variant}"

    @property
    def ceiling_variant(self) -> str:
        """The ceiling variant with the same process model, for the "x ceiling" ratio."""
        if self.workers > 1:
            return "2 workers"
        return "uvloop" if self.event_loop == "uvloop" else "asyncio"


def windowed(variant: str, window_us: float, min_rate: float = 0.0, min_busy: float = 0.0) -> ServerSpec:
    """HEADLINE's flags with another pipeline window (0: off) or gate, 1 and 4 desc, swept
    open-loop at HEADLINE's offered rates (latency at equal load)."""
    return ServerSpec(
        "project",
        variant,
        pipeline_window_us=window_us,
        pipeline_min_rate=min_rate,
        pipeline_min_busy=min_busy,
        scenarios=("1 desc", "4 desc"),
        quick_scenarios=("1 desc", "4 desc"),
        sweep=True,
        sweep_rates_of=HEADLINE,
        needs=("redis-pipeline-min-busy",),  # before it, the window was off by default
    )


PLAN = (
    ServerSpec("ceiling", "asyncio", scenarios=("1 desc", "4 desc"), sweep=True),
    ServerSpec("naive", "asyncio", scenarios=ALL_SCENARIOS, quick_scenarios=("1 desc", "4 desc"), sweep=True),
    ServerSpec("project", HEADLINE, scenarios=ALL_SCENARIOS, quick_scenarios=ALL_SCENARIOS, sweep=True),
    windowed(WINDOW_OFF, 0),
    ServerSpec("project", "batching off", batching=False, scenarios=("1 desc", "4 desc"), needs=("redis-batching",)),
    ServerSpec(
        "project",
        "cache off",
        over_limit_cache=False,
        scenarios=("hot key",),
        quick_scenarios=("hot key",),
        needs=("over-limit-cache",),
    ),
    ServerSpec("ceiling", "uvloop", event_loop="uvloop"),
    ServerSpec("project", "uvloop", event_loop="uvloop", needs=("event-loop",)),
    ServerSpec("ceiling", "2 workers", workers=2),
    ServerSpec("project", "2 workers", workers=2, needs=("workers",)),
    # HEADLINE's flags; on a cluster the server sends each request as its own EVALSHA (no pipelines).
    ServerSpec("project", CLUSTER, redis="cluster"),
    # Against HEADLINE (tracing off) in the same rounds: what tracing every call costs.
    ServerSpec("project", TRACING_ON, trace_sampling_ratio=1.0, needs=("otlp-endpoint",)),
)


def tracing_plan(pre_tracing_revision: str | None) -> tuple[ServerSpec, ...]:
    """`scripts/bench --tracing`: tracing off, on, on but sampled out, and the server from before
    tracing (what off costs), 1 descriptor, in the same interleaved rounds."""
    plan = [
        ServerSpec("project", HEADLINE),
        ServerSpec("project", TRACING_ON, trace_sampling_ratio=1.0, needs=("otlp-endpoint",)),
        ServerSpec("project", SAMPLED_OUT, trace_sampling_ratio=0.0, needs=("otlp-endpoint",)),
    ]
    if pre_tracing_revision:
        plan.append(ServerSpec("project", PRE_TRACING, revision=pre_tracing_revision))
    return tuple(plan)


WINDOWS_US = (500, 1000, 2000, 3000, 5000)  # scripts/bench --window, each held whenever calls come close


def window_plan(baseline_rev: str | None = None) -> tuple[ServerSpec, ...]:
    """`scripts/bench --window`: HEADLINE (the saturation-gated 5 ms window), the window off, each
    of WINDOWS_US ungated, 3 ms gated by a call rate, and the server of `baseline_rev` with its
    own defaults, 1 and 4 descriptors, each swept open-loop at HEADLINE's rates (latency at
    equal load)."""
    both = ("1 desc", "4 desc")
    plan = [
        ServerSpec("project", HEADLINE, scenarios=both, quick_scenarios=both, sweep=True),
        windowed(WINDOW_OFF, 0),
        *(windowed(f"window {window_us}us", window_us) for window_us in WINDOWS_US),
        windowed(RATE_GATED, WINDOW_US, min_rate=RATE_GATE),
    ]
    if baseline_rev:
        plan.append(baseline(baseline_rev, swept=True))
    return tuple(plan)


def baseline(revision: str, *, swept: bool = False) -> ServerSpec:
    """The server of `revision` with its own defaults (--baseline-rev), 1 and 4 descriptors;
    `swept`: also swept open-loop at HEADLINE's rates."""
    both = ("1 desc", "4 desc")
    return ServerSpec(
        "project",
        f"at {revision}",
        revision=revision,
        scenarios=both,
        quick_scenarios=both,
        sweep=swept,
        sweep_rates_of=HEADLINE if swept else None,
    )


def serve_flags() -> set[str]:
    """The long options `ratelimit serve --help` lists."""
    help_text = subprocess.run(
        python_command("-m", "ratelimit", "serve", "--help"),
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    ).stdout
    return set(re.findall(r"--([a-z][a-z0-9-]+)", help_text))


def missing_flags(spec: ServerSpec, available: set[str]) -> list[str]:
    return [flag for flag in spec.needs if flag not in available]


def command_line(
    spec: ServerSpec,
    port: int,
    redis_url: str,
    config: Path,
    available: set[str],
    redis_timeout_ms: float | None,
    otlp_endpoint: str | None = None,
) -> list[str]:
    if spec.contender != "project":
        return python_command(
            "-m",
            "benchlib.baselines",
            spec.contender,
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--workers",
            str(spec.workers),
            "--event-loop",
            spec.event_loop,
        )
    command = python_command(
        "-m",
        "ratelimit",
        "serve",
        "--config",
        str(config),
        "--redis-url",
        redis_url,
        "--grpc-host",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        "0",
        "--config-poll-s",
        "0",
        "--log-level",
        "WARNING",
    )
    values = {
        "redis-batching": str(spec.batching).lower(),
        "over-limit-cache": str(spec.over_limit_cache).lower(),
        "workers": str(spec.workers),
        "event-loop": spec.event_loop,
    }
    for flag in OPTIMISATION_FLAGS:
        if flag in available:
            command += [f"--{flag}", values[flag]]
    if redis_timeout_ms is not None:
        command += ["--redis-timeout-ms", f"{redis_timeout_ms:g}"]
    for flag, value in (
        ("--redis-pipeline-window-us", spec.pipeline_window_us),
        ("--redis-pipeline-min-rate", spec.pipeline_min_rate),
        ("--redis-pipeline-min-busy", spec.pipeline_min_busy),
    ):
        if value is not None:
            command += [flag, f"{value:g}"]
    if spec.trace_sampling_ratio is not None and otlp_endpoint:
        command += ["--otlp-endpoint", otlp_endpoint, "--trace-sampling-ratio", f"{spec.trace_sampling_ratio:g}"]
    return command
