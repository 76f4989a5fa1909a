"""The benchmark and load-generator scripts: they run, and the load generator's numbers add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.processes import free_port
from tests.support.replica import PROJECT_ROOT, running_replica

LIMIT = 15
RATE = 20
DURATION_S = 2


def test_loadgen_counts_add_up_and_stay_within_the_limit(tmp_path: Path, redis_url: str) -> None:
    config = tmp_path / "limits.yaml"
    config.write_text(
        f"domain: loadtest\ndescriptors:\n  - key: user\n    rate_limit: {{unit: minute, requests_per_unit: {LIMIT}}}\n"
    )
    plot, summary_path = tmp_path / "loadgen.png", tmp_path / "loadgen.json"
    with running_replica(tmp_path, [config], redis_url=redis_url) as replica:
        done = subprocess.run(
            [
                sys.executable,
                str(PROJECT_ROOT / "scripts" / "loadgen"),
                "--target",
                replica.target,
                "--rate",
                str(RATE),
                "--duration",
                str(DURATION_S),
                "--domain",
                "loadtest",
                "--descriptor",
                "user=alice",
                "--plot",
                str(plot),
                "--json",
                str(summary_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=PROJECT_ROOT,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["limit"] == {"requests_per_unit": LIMIT, "unit": "MINUTE", "window_s": 60.0}
    assert summary["sent"] == RATE * DURATION_S
    assert summary["errors"] == summary["skipped"] == summary["unanswered"] == 0
    assert summary["admitted"] + summary["denied"] == summary["sent"]
    # The whole run fits in one window: exactly the limit is admitted, never more.
    assert 0 < summary["admitted"] <= LIMIT
    assert summary["max_admitted_in_window"] == summary["admitted"]
    (row,) = summary["replicas"]
    assert (row["sent"], row["admitted"], row["denied"]) == (summary["sent"], summary["admitted"], summary["denied"])
    assert f"most admitted in any 60 s window (client clock): {summary['admitted']} (limit {LIMIT})" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_help_names_its_options() -> None:
    done = subprocess.run(
        [str(PROJECT_ROOT / "scripts" / "bench"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--profile", "--out-dir", "--concurrency"):
        assert option in done.stdout


def test_bench_window_compares_the_windows_at_the_defaults_rates(tmp_path: Path) -> None:
    # The smallest run that still shows the promise: every window's row and the baseline
    # revision's, fewer Redis reads per request with a window than without, and every sweep at
    # the defaults' offered rates.
    done = subprocess.run(
        [str(PROJECT_ROOT / "scripts" / "bench"), "--window", "--quick", "--rounds", "1", "--duration", "0.5",
         "--warmup", "0.1", "--load-processes", "1", "--concurrency", "8", "--baseline-rev", "HEAD",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "window.json").read_text())
    closed = {(row["variant"], row["scenario"]): row for row in document["closed_loop"]}
    windows = ["window 500us", "window 1000us", "window 2000us", "window 3000us", "window 5000us", "rate-gated 3ms"]
    variants = ["batch+cache", "window off", *windows, "at HEAD"]
    assert sorted(closed) == sorted((variant, scenario) for variant in variants for scenario in ("1 desc", "4 desc"))
    assert all(row["errors"] == {} and row["requests_per_s"] > 0 for row in closed.values())
    unwindowed_reads = closed["window off", "1 desc"]["redis_reads_per_request"]
    assert closed["window 3000us", "1 desc"]["redis_reads_per_request"] < unwindowed_reads / 2
    rates = {}
    for row in document["open_loop"]:
        rates.setdefault(row["variant"], []).append(row["offered_rate"])
    assert sorted(rates) == sorted(variants)
    assert all(offered == rates["batch+cache"] for offered in rates.values())
    assert len(rates["batch+cache"]) == 4


def test_loadgen_with_nothing_running_fails_at_once_naming_the_targets(tmp_path: Path) -> None:
    # The default targets, moved by the local cluster's variables to ports where nothing listens.
    ports = {f"RATELIMIT_{n}_GRPC_PORT": str(free_port()) for n in (1, 2, 3)}
    plot = tmp_path / "loadgen.png"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "loadgen"), "--duration", "60", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
        env={**os.environ, **ports},
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 20  # not the 60 s run
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "loadgen: 3 of 3 targets do not serve, nothing sent:",
        *(f"  127.0.0.1:{port}: UNAVAILABLE" for port in ports.values()),
        "start the local cluster with scripts/cluster up (its port variables move the targets), "
        "or name running replicas with --target",
    ]
    assert not plot.exists()
