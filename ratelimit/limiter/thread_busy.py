"""How busy a thread was: the share of wall time it ran or waited for a CPU, between readings.

A replica is saturated when its event loop's thread never waits for input: it is either running
or ready to run and waiting for a core (load, Redis and gRPC's poller thread share the cores).
Linux counts both in `/proc/thread-self/schedstat` (nanoseconds on a CPU, nanoseconds waiting on
a run queue). Where that file cannot be read, the thread's CPU time alone (`time.thread_time`),
which reads low when the thread waits for a core. Reading the file costs about 6 us (open, read,
close: no descriptor is held), so read it a few times a second, not per call.

Read only from the thread measured: the file names the thread that opens it.
"""

from __future__ import annotations

import os
import time

SCHEDSTAT = "/proc/thread-self/schedstat"


def busy_ns(schedstat_path: str = SCHEDSTAT) -> tuple[str, int]:
    """This thread's nanoseconds running or waiting to run, and which clock gave them."""
    try:
        fd = os.open(schedstat_path, os.O_RDONLY)
        try:
            on_cpu, waiting = os.read(fd, 128).split()[:2]
        finally:
            os.close(fd)
        return "schedstat", int(on_cpu) + int(waiting)
    except (OSError, ValueError):
        return "cpu", time.thread_time_ns()


class ThreadBusy:
    def __init__(self, schedstat_path: str = SCHEDSTAT) -> None:
        self._path = schedstat_path
        self._last: tuple[int, str, int] | None = None  # wall ns, clock, busy ns at the last reading

    def share(self) -> float:
        """The share (0..1) of the wall time since the previous reading that this thread ran or
        waited to run (0.0 at the first reading, or when the clock changed); starts the next span."""
        wall_ns = time.monotonic_ns()
        clock, busy = busy_ns(self._path)
        last, self._last = self._last, (wall_ns, clock, busy)
        if last is None or last[1] != clock or wall_ns <= last[0]:
            return 0.0
        return min(max((busy - last[2]) / (wall_ns - last[0]), 0.0), 1.0)
