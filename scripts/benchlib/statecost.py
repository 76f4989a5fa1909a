"""What the state tier pays per decision and per counter (`scripts/bench --state`).

Redis alone, no gRPC: one client sends decisions in pipelines of 1, 8 and 64 (64 is the
bench's calls in flight) over 1,000 counters, to a redis-server of its own, for
- the project's script (ratelimit/limiter/lua/evaluate.lua, with the arguments the server sends),
- the same file at an older revision (--state-baseline-rev), in the same rounds,
- the anchor: a fixed-window counter, `INCRBY` + `PEXPIRE` per counter (what the simplest
  limiter pays; it is neither sliding nor all-or-nothing).
Per decision: Redis CPU (INFO cpu: script, commands, networking, all of it) and the script's own
time (INFO commandstats). Per counter: MEMORY USAGE of one hit once, and of one with hits in
every bucket of its window (a per-second rule, whose 41 buckets fill within a second; a
per-minute counter has the same layout and key length, so the same bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
import subprocess
import time
from typing import Callable, Sequence

import redis

from benchlib.procs import PROJECT_ROOT
from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter.keys import counter_key
from ratelimit.limiter.script import SCRIPT_SOURCE, script_arguments
from ratelimit.limiter.types import CounterRequest, Role
from ratelimit.limiter.window import WindowSpec
from tests.support import counters
from tests.support.processes import running_redis

SCRIPT_PATH = "ratelimit/limiter/lua/evaluate.lua"
KEYS = 1000
BATCHES = (1, 8, 64)
DESCRIPTORS = (1, 4)
LIMIT = 1_000_000  # never over: every decision charges its counters, the costlier path
ANCHOR = "INCRBY+PEXPIRE anchor"
Sender = Callable[[redis.client.Pipeline, int], None]  # queues decision n on a pipeline


@dataclasses.dataclass
class Cell:
    cpu_us: list[float] = dataclasses.field(default_factory=list)  # Redis CPU per decision
    script_us: list[float] = dataclasses.field(default_factory=list)  # per call, from commandstats
    commands: float = 0.0  # Redis commands per decision (scripts count theirs inside)


def baseline_source(revision: str) -> str:
    return subprocess.run(
        ["git", "show", f"{revision}:{SCRIPT_PATH}"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout


def sources_of(baseline_rev: str | None) -> dict[str, str]:
    """The scripts compared: this tree's ("project") and, given a revision, that revision's."""
    sources = {"project": SCRIPT_SOURCE}
    if baseline_rev:
        sources[f"at {baseline_rev}"] = baseline_source(baseline_rev)
    return sources


def window_of(unit: Unit) -> WindowSpec:
    return WindowSpec.for_rule(Algorithm.SLIDING_WINDOW, unit.seconds)


def counter_requests(prefix: str, user: int, descriptors: int, unit: Unit = Unit.MINUTE) -> list[CounterRequest]:
    """Counters of one user; each contender has its own prefix (the layouts differ)."""
    window = window_of(unit)
    return [
        CounterRequest(
            key=counter_key(prefix, "bench", (("user", str(user)), ("rule", str(d))), unit, Algorithm.SLIDING_WINDOW),
            limit=LIMIT,
            window=window,
            hits=1,
            role=Role.ENFORCE,
        )
        for d in range(descriptors)
    ]


def seed(client: redis.Redis, keys: Sequence[str], layout: str, unit: Unit = Unit.MINUTE) -> None:
    """Hits in every bucket of the window, up to the current one: counters in steady state, as
    after a minute of traffic (a phase lasts a second; without this they would hold one bucket)."""
    seconds, micros = client.time()
    window = window_of(unit)
    current = (int(seconds) * 1000 + int(micros) // 1000) // window.bucket_ms
    buckets = {current - age: 1 for age in range(window.span)}
    pipe = client.pipeline(transaction=False)
    for key in keys:
        if layout == "hash":  # the layout before the packed one: {bucket index: hits}
            pipe.delete(key)
            pipe.hset(key, mapping={str(bucket): hits for bucket, hits in buckets.items()})
            pipe.pexpire(key, window.span * window.bucket_ms)
        else:
            pipe.set(key, counters.encode(buckets), px=window.span * window.bucket_ms)
    pipe.execute()


def layout_of(source: str) -> str:
    return "hash" if "HGETALL" in source else "packed"


def text_arguments(requests: Sequence[CounterRequest]) -> tuple[list[str], list[int]]:
    """The arguments of scripts before they were packed into one string: five numbers per counter."""
    args: list[int] = []
    for request in requests:
        args += (request.limit, request.window.bucket_ms, request.window.span, request.hits, int(request.role))
    return [request.key for request in requests], args


def arguments_of(source: str) -> Callable[[Sequence[CounterRequest]], tuple[list[str], Sequence[object]]]:
    """How `source` (this tree's script or an earlier revision's) takes its arguments."""
    return text_arguments if "ARGV[base + 1]" in source else script_arguments


def sha_of(source: str) -> str:
    """What Redis calls a loaded script."""
    return hashlib.sha1(source.encode()).hexdigest()


def script_sender(source: str, prefix: str, descriptors: int, unit: Unit = Unit.MINUTE) -> Sender:
    """Decision n as one EVALSHA of `source` (loaded already) on the counters of user n % KEYS."""
    sha, arguments = sha_of(source), arguments_of(source)
    prepared = []
    for user in range(KEYS):
        keys, args = arguments(counter_requests(prefix, user, descriptors, unit))
        prepared.append((keys, args))

    def send(pipe: redis.client.Pipeline, n: int) -> None:
        keys, args = prepared[n % KEYS]
        pipe.evalsha(sha, len(keys), *keys, *args)

    return send


def anchor_sender(prefix: str, descriptors: int, unit: Unit = Unit.MINUTE) -> Sender:
    keys = [[request.key for request in counter_requests(prefix, user, descriptors, unit)] for user in range(KEYS)]

    def send(pipe: redis.client.Pipeline, n: int) -> None:
        for key in keys[n % KEYS]:
            pipe.incrby(key, 1)
            pipe.pexpire(key, 60_000)

    return send


def prefix_of(contender: str) -> str:
    """Same length for every contender, so their keys cost the same bytes."""
    return f"c{hash(contender) % 10**8:08d}:"


def _cpu_s(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _measure(client: redis.Redis, send: Sender, batch: int, seconds: float) -> tuple[float, float, float]:
    """(Redis CPU µs per decision, script µs per call or 0, commands per decision) of one phase."""
    client.config_resetstat()
    before = _cpu_s(client)
    decisions = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pipe = client.pipeline(transaction=False)
        for _ in range(batch):
            send(pipe, decisions)
            decisions += 1
        pipe.execute()
    cpu_us = (_cpu_s(client) - before) / decisions * 1e6
    stats = client.info("commandstats")
    script = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))
    commands = sum(
        int(entry["calls"]) for name, entry in stats.items() if name not in ("cmdstat_info", "cmdstat_config")
    )
    return cpu_us, script, commands / decisions


def _counter_bytes(client: redis.Redis, name: str, source: str | None) -> tuple[int, int]:
    """MEMORY USAGE of a counter hit once, and of one with hits in every bucket of its window."""
    once = counter_requests(prefix_of(name), KEYS + 1, 1)[0]
    full = counter_requests(prefix_of(name), KEYS + 2, 1, unit=Unit.SECOND)[0]
    if source is None:  # the anchor: one key per counter, whatever the window
        client.incrby(once.key, 1)
        client.pexpire(once.key, 60_000)
        size = int(client.memory_usage(once.key) or 0)
        return size, size
    sha, arguments = sha_of(source), arguments_of(source)
    keys, args = arguments([once])
    client.evalsha(sha, 1, *keys, *args)
    keys, args = arguments([full])
    end = time.monotonic() + 1.1  # 44 buckets of 25 ms: every one of the 41 counted holds hits
    while time.monotonic() < end:
        client.evalsha(sha, 1, *keys, *args)
        time.sleep(0.005)
    return int(client.memory_usage(once.key) or 0), int(client.memory_usage(full.key) or 0)


@dataclasses.dataclass
class StateCost:
    cells: dict[tuple[str, int, int], Cell]  # (contender, descriptors, batch)
    bytes_once: dict[str, int]
    bytes_full: dict[str, int]
    contenders: list[str]


def measure(
    baseline_rev: str | None, rounds: int = 3, seconds: float = 1.0, log: Callable[[str], None] = print
) -> StateCost:
    sources = sources_of(baseline_rev)
    contenders = [*sources, ANCHOR]
    cells: dict[tuple[str, int, int], Cell] = {}
    bytes_once: dict[str, int] = {}
    bytes_full: dict[str, int] = {}
    with running_redis() as server:
        client = redis.Redis(port=server.port)
        for source in sources.values():
            client.script_load(source)
        for name in contenders:
            bytes_once[name], bytes_full[name] = _counter_bytes(client, name, sources.get(name))
        senders = {
            (name, d): (
                script_sender(sources[name], prefix_of(name), d)
                if name in sources
                else anchor_sender(prefix_of(name), d)
            )
            for name in contenders
            for d in DESCRIPTORS
        }
        seeded = {
            (name, d): [request.key for user in range(KEYS) for request in counter_requests(prefix_of(name), user, d)]
            for name in sources
            for d in DESCRIPTORS
        }
        for round_number in range(rounds):
            for d in DESCRIPTORS:
                for batch in BATCHES:
                    for name in contenders if round_number % 2 == 0 else contenders[::-1]:
                        cell = cells.setdefault((name, d, batch), Cell())
                        if name in sources:
                            seed(client, seeded[name, d], layout_of(sources[name]))
                        cpu_us, script_us, commands = _measure(client, senders[name, d], batch, seconds)
                        cell.cpu_us.append(cpu_us)
                        cell.script_us.append(script_us)
                        cell.commands = commands
            log(f"state cost: round {round_number + 1} of {rounds} done")
        client.close()
    return StateCost(cells, bytes_once, bytes_full, contenders)


def table(cost: StateCost) -> str:
    median = statistics.median
    lines = [
        "State tier, Redis alone (median of rounds): Redis CPU per decision (all of it) and the script's own time,",
        f"over {KEYS:,} counters, every decision charging; memory per counter by MEMORY USAGE.",
        f"{'contender':<24}{'desc':>5}"
        + "".join(f"{f'cpu@{b}':>10}" for b in BATCHES)
        + f"{'script@64':>11}{'cmds':>6}"
        + f"{'B/1-hit':>9}{'B/full':>8}",
    ]
    for name in cost.contenders:
        for d in DESCRIPTORS:
            cells = [cost.cells[name, d, b] for b in BATCHES]
            script = median(cells[-1].script_us)
            lines.append(
                f"{name:<24}{d:>5}"
                + "".join(f"{median(c.cpu_us):>8.1f}us" for c in cells)
                + (f"{script:>9.1f}us" if script else f"{'-':>11}")
                + f"{cells[-1].commands:>6.1f}"
                + f"{cost.bytes_once[name]:>9}{cost.bytes_full[name]:>8}"
            )
    project = {b: median(cost.cells["project", 1, b].cpu_us) for b in BATCHES}
    four = {b: median(cost.cells["project", 4, b].cpu_us) for b in BATCHES}
    lines.append(
        "project, 4 descriptors against 1: " + ", ".join(f"{four[b] / project[b]:.2f}x at batch {b}" for b in BATCHES)
    )
    for name in cost.contenders[1:]:
        theirs = {b: median(cost.cells[name, 1, b].cpu_us) for b in BATCHES}
        lines.append(
            f"project against {name}, 1 desc: "
            + ", ".join(f"{project[b] / theirs[b]:.2f}x the CPU at batch {b}" for b in BATCHES)
            + f"; {cost.bytes_full['project'] / cost.bytes_full[name]:.2f}x the bytes of a full counter"
        )
    return "\n".join(lines)


def as_json(cost: StateCost) -> dict[str, object]:
    return {
        "cpu_us_per_decision": {
            f"{name}/{d} desc/batch {b}": statistics.median(cost.cells[name, d, b].cpu_us)
            for name in cost.contenders
            for d in DESCRIPTORS
            for b in BATCHES
        },
        "bytes_one_hit": cost.bytes_once,
        "bytes_full_window": cost.bytes_full,
    }


def run(
    baseline_rev: str | None, rounds: int, seconds: float, log: Callable[[str], None]
) -> tuple[str, dict[str, object]]:
    cost = measure(baseline_rev, rounds, seconds, log)
    return table(cost), as_json(cost)
