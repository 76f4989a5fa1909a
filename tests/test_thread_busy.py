"""The loop thread's busy share: running or waiting for a CPU counts, waiting for input does not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ratelimit.limiter.thread_busy import ThreadBusy, busy_ns
from tests.support.cpu import spin

SPAN_S = 0.3


def test_a_thread_that_computes_is_busy_and_one_that_sleeps_is_not() -> None:
    meter = ThreadBusy()
    assert meter.share() == 0.0  # the first reading only begins a span
    spin(SPAN_S)
    assert meter.share() > 0.9
    time.sleep(SPAN_S)
    assert meter.share() < 0.1


def test_without_schedstat_the_share_is_the_threads_cpu_time(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-schedstat")
    assert busy_ns(missing)[0] == "cpu"
    meter = ThreadBusy(missing)
    meter.share()
    spin(SPAN_S)
    assert meter.share() > 0.5  # CPU time alone: lower if the machine lends the core elsewhere
    time.sleep(SPAN_S)
    assert meter.share() < 0.1


def test_waiting_for_a_cpu_counts_as_busy_though_the_thread_gets_a_fraction_of_one() -> None:
    # Three processes spin on the CPU this thread is pinned to: it gets about a quarter of that
    # CPU, and is ready to run the rest of the time. A saturated loop on a shared machine looks
    # like this, and must read as saturated.
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hogs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\nend = time.monotonic() + 3\n"
                "while time.monotonic() < end: pass",
            ]
        )
        for _ in range(3)
    ]
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.3)  # the hogs pinned and spinning
        meter = ThreadBusy()
        started_cpu = time.thread_time()
        meter.share()
        started = time.monotonic()
        spin(SPAN_S * 2)
        busy = meter.share()
        cpu_share = (time.thread_time() - started_cpu) / (time.monotonic() - started)
    finally:
        os.sched_setaffinity(0, before)
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert cpu_share < 0.6  # it did wait for the CPU
    assert busy > 0.9


def test_a_schedstat_that_becomes_unreadable_gives_one_idle_span_not_a_mix_of_two_clocks(tmp_path: Path) -> None:
    # Out of file descriptors, for instance: the next reading comes from the thread's CPU time,
    # which counts from another origin. The span across the change reads 0 (no hold), never a
    # difference of the two clocks (here it would be the CPU time since the process started).
    fake = tmp_path / "schedstat"
    fake.write_text("0 0 1\n")
    meter = ThreadBusy(str(fake))
    assert meter.share() == 0.0
    fake.unlink()
    spin(0.05)
    assert meter.share() == 0.0
    time.sleep(SPAN_S)
    assert meter.share() < 0.1  # CPU time from here on
    spin(SPAN_S)
    assert meter.share() > 0.5
