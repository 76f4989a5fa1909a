"""Sampling profiles of a running server with py-spy (attaches by pid; needs ptrace rights).

Two recorders run side by side, without pausing the server (--nonblocking): one draws a
flame graph (SVG), the other writes collapsed stacks, summarised here into the functions
with the most samples on top of the stack (self) and anywhere in it (inclusive).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path

TOP = 25


def py_spy() -> str | None:
    beside_python = Path(sys.executable).parent / "py-spy"
    return str(beside_python) if beside_python.exists() else shutil.which("py-spy")


class Profiler:
    """Record `pid` (and its subprocesses) for `duration_s` seconds, in the background."""

    def __init__(self, pid: int, duration_s: float, out_dir: Path) -> None:
        self.svg = out_dir / "profile.svg"
        self.collapsed = out_dir / "profile.collapsed"
        self.text = out_dir / "profile.txt"
        self.error: str | None = None
        self._processes: list[subprocess.Popen[bytes]] = []
        binary = py_spy()
        if binary is None:
            self.error = "py-spy is not installed"
            return
        common = ["record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))), "--rate", "250"]
        common += ["--nonblocking", "--subprocesses"]
        for output, fmt in ((self.svg, "flamegraph"), (self.collapsed, "raw")):
            self._processes.append(
                subprocess.Popen(
                    [binary, *common, "--format", fmt, "--output", str(output)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )

    def finish(self, timeout_s: float = 30.0) -> str | None:
        """Wait for the recorders; write profile.txt; return its top lines (or None)."""
        for process in self._processes:
            try:
                _, stderr = process.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            if process.returncode != 0 and self.error is None:
                self.error = f"py-spy exited with {process.returncode}: {stderr.decode(errors='replace')[-400:]}"
        if self.error is not None or not self.collapsed.exists():
            return None
        summary = summarise(self.collapsed.read_text())
        self.text.write_text(summary)
        return summary


# Where a sample's innermost Python frame lives says who spends the time. py-spy sees no
# frames inside compiled code: a loop callback's own time (Handle._run) is grpc's Cython
# layer, C core and protobuf called from it; a thread's own time (Thread.run) is the
# poller thread grpc.aio runs in C.
COMPONENTS = (
    ("Handle._run (asyncio/events.py", "compiled code run by loop callbacks (grpc.aio Cython, C core, protobuf)"),
    ("Thread.run (threading.py", "grpc poller thread (C core)"),
    ("ratelimit/", "ratelimit (this project)"),
    ("redis/", "redis-py client"),
    ("asyncio/", "asyncio event loop (Python)"),
    ("selectors.py", "asyncio event loop (Python)"),
    ("grpc", "grpc Python layer"),
    ("google/protobuf", "protobuf Python layer"),
    ("prometheus_client", "prometheus_client"),
)


def component(frame: str) -> str:
    for marker, name in COMPONENTS:
        if marker in frame:
            return name
    return "other Python (stdlib, typing, ...)"


def _function(frame: str) -> str:
    """`name (path:line)` -> `name (path)`: one entry per function, not per line."""
    head, _, tail = frame.rpartition(":")
    return f"{head})" if tail.rstrip(")").isdigit() else frame


def summarise(collapsed: str, top: int = TOP) -> str:
    """Components, then top functions by self and by inclusive samples, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    components: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        # The first frame names the process and thread; keep function frames only.
        frames = [_function(frame) for frame in stack.split(";") if "(" in frame]
        if frames:
            own[frames[-1]] += count
            components[component(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"

    def share(counter: collections.Counter[str], limit: int, only: str = "") -> list[str]:
        rows = [(key, count) for key, count in counter.most_common() if only in key][:limit]
        return [f"  {100 * count / total:5.1f}%  {key}" for key, count in rows]

    lines = [f"{total} samples (py-spy, 250 Hz, threads that were running)", "", "by component (own time):"]
    lines += share(components, len(COMPONENTS) + 1)
    lines += ["", "self (on top of the stack):", *share(own, top)]
    lines += ["", "inclusive, this project's functions:", *share(inclusive, top, only="ratelimit/")]
    lines += ["", "inclusive (anywhere in the stack):", *share(inclusive, top)]
    return "\n".join(lines) + "\n"
