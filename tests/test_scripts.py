"""The benchmark and load-generator scripts: they run, and the load generator's numbers add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
