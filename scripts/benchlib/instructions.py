"""Instructions Redis executes per decision, counted by callgrind (`scripts/bench --state`).

Redis CPU time per decision moves by a third from run to run on a shared machine; the count of
instructions Redis executes for the same calls does not (0.2% between runs, whatever else the
machine is doing), so a change to the script shows at its true size. The count is no measure
of time (cache misses and the cost of waking an idle Redis are not in it): it ranks scripts
doing the same calls, the CPU figures say what they cost.

One redis-server runs under `valgrind --tool=callgrind` with counting off; the counters are
seeded as in statecost (hits in every bucket of the window), counting goes on for DECISIONS
decisions in pipelines of BATCH, then off, and the total is read from callgrind's output.
The counters are per-day rules: a bucket lasts 36 minutes, so under valgrind's slowness every
decision takes the steady path (same bucket, SETRANGE) as the per-minute counters of the CPU
table do at full speed; a phase that crosses a bucket boundary is run again.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import redis

from benchlib import statecost
from ratelimit.config.model import Unit
from tests.support.processes import running_redis

DECISIONS = 6400
BATCH = 64
UNIT = Unit.DAY


def available() -> str | None:
    """None when callgrind can run here, else why not."""
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed (Debian package valgrind)" if missing else None


def _total(output: Path) -> int:
    """The instructions callgrind counted, from its output file(s)."""
    total = 0
    for part in output.parent.glob(output.name + "*"):
        for line in part.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def _bucket(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return (int(seconds) * 1000 + int(micros) // 1000) // statecost.window_of(UNIT).bucket_ms


def count(source: str | None, descriptors: int, decisions: int = DECISIONS, batch: int = BATCH) -> float:
    """Instructions per decision of `source` (the anchor when None) for `descriptors` counters."""
    with tempfile.TemporaryDirectory(prefix="ratelimit-callgrind-") as work:
        output = Path(work) / "callgrind.out"
        wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={output}")
        with running_redis(wrapper=wrapper, start_timeout_s=60.0) as server:
            client = redis.Redis(port=server.port)
            prefix = statecost.prefix_of("anchor" if source is None else "script")
            keys = [
                request.key
                for user in range(statecost.KEYS)
                for request in statecost.counter_requests(prefix, user, descriptors, UNIT)
            ]
            if source is None:
                send = statecost.anchor_sender(prefix, descriptors, UNIT)
            else:
                client.script_load(source)
                send = statecost.script_sender(source, prefix, descriptors, UNIT)
            for _attempt in range(3):
                if source is not None:
                    statecost.seed(client, keys, statecost.layout_of(source), UNIT)
                first = _bucket(client)
                _control(server.process.pid, "--instr", "on")
                for start in range(0, decisions, batch):
                    pipe = client.pipeline(transaction=False)
                    for n in range(start, start + batch):
                        send(pipe, n)
                    pipe.execute()
                _control(server.process.pid, "--instr", "off")
                if _bucket(client) == first:
                    break
                _control(server.process.pid, "--zero")  # a new bucket began: count again
            else:
                raise RuntimeError("every phase crossed a bucket boundary")
            client.close()
        return _total(output) / decisions


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def table(sources: dict[str, str], log: Callable[[str], None]) -> tuple[str, dict[str, float]]:
    """Instructions per decision of each script and of the anchor, 1 and 4 descriptors."""
    counts: dict[str, float] = {}
    for name, source in [*sources.items(), (statecost.ANCHOR, None)]:
        for d in statecost.DESCRIPTORS:
            counts[f"{name}/{d} desc"] = count(source, d)
        log(f"instructions: {name} done")
    lines = [
        f"Redis instructions per decision (callgrind, {DECISIONS:,} decisions in pipelines of {BATCH}; "
        "deterministic, unlike the CPU table):",
        *(f"{key:<32}{value:>12,.0f}" for key, value in counts.items()),
    ]
    project = {d: counts[f"project/{d} desc"] for d in statecost.DESCRIPTORS}
    lines.append(f"project, 4 descriptors against 1: {project[4] / project[1]:.2f}x")
    for name in [*list(sources)[1:], statecost.ANCHOR]:
        lines.append(
            f"project against {name}: "
            + ", ".join(f"{project[d] / counts[f'{name}/{d} desc']:.2f}x at {d} desc" for d in statecost.DESCRIPTORS)
        )
    return "\n".join(lines), counts
