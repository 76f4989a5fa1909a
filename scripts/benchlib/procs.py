"""Processes the benchmark starts and watches: servers, their CPU time, Redis counters."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import redis

from tests.support.replica import wait_until_serving

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCRIPTS_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = SCRIPTS_DIR.parent


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (workers of a multi-process server)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, ()))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the given processes (utime + stime of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def start_server(command: Sequence[str], log_path: Path, source: Path = PROJECT_ROOT) -> subprocess.Popen[bytes]:
    """Start a server process (not waiting for it: see `wait_ready`); `source` is the tree whose
    `ratelimit` package it runs (`-m` puts the working directory first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS_DIR), str(source)])}
    with log_path.open("ab") as log_file:
        return subprocess.Popen(list(command), stdout=log_file, stderr=subprocess.STDOUT, cwd=source, env=env)


def wait_ready(process: subprocess.Popen[bytes], target: str, workers: int = 1) -> None:
    wait_until_serving(target, timeout_s=30.0, process=process)
    if workers > 1:
        # Health answers from whichever worker got the connection; give the others time to bind.
        deadline = time.monotonic() + 10
        while len(process_tree(process.pid)) < workers + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in reversed(process_tree(process.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait(timeout=5)


@dataclass(frozen=True)
class RedisCounters:
    """A snapshot of the Redis counters a phase is charged with (of one node, or summed over nodes)."""

    evalsha_calls: int
    commands: int  # total_commands_processed
    reads: int  # total_reads_processed: socket reads, one per client round trip or pipeline
    cpu_s: float  # used_cpu_user + used_cpu_sys of the redis-server process(es)

    @classmethod
    def read(cls, client: redis.Redis) -> RedisCounters:
        stats = client.info("stats")
        commandstats = client.info("commandstats")
        cpu = client.info("cpu")
        return cls(
            evalsha_calls=int(commandstats.get("cmdstat_evalsha", {}).get("calls", 0)),
            commands=int(stats["total_commands_processed"]),
            reads=int(stats["total_reads_processed"]),
            cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        )

    def minus(self, earlier: RedisCounters) -> RedisCounters:
        # The three INFO calls of a snapshot are commands and reads too: leave them out.
        return RedisCounters(
            evalsha_calls=self.evalsha_calls - earlier.evalsha_calls,
            commands=self.commands - earlier.commands - 3,
            reads=self.reads - earlier.reads - 3,
            cpu_s=self.cpu_s - earlier.cpu_s,
        )

    @classmethod
    def total(cls, parts: Sequence[RedisCounters]) -> RedisCounters:
        """The counters of several nodes (a Redis Cluster's) added up."""
        return cls(
            evalsha_calls=sum(part.evalsha_calls for part in parts),
            commands=sum(part.commands for part in parts),
            reads=sum(part.reads for part in parts),
            cpu_s=sum(part.cpu_s for part in parts),
        )


def require(*modules: str) -> None:
    """Fail at once, not after minutes of measuring, when an optional dependency is missing."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"{Path(sys.argv[0]).name}: missing Python packages {', '.join(missing)}; "
            f"install them with: {sys.executable} -m pip install -e '{PROJECT_ROOT}[bench]'"
        )


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]
