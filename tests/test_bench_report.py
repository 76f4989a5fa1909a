"""The bench's PASS/MISS line for the p99 target (scripts/benchlib/report.py): the point at half
the peak, and the no-op ceiling measured at that same rate beside it, so a tail the machine
made reads as such."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.cluster import scripts_module


@pytest.fixture(scope="module")
def report() -> Any:
    return scripts_module("benchlib.report")


def row(contender: str, variant: str, *, rate: float | None = None, rps: float = 0.0, p99: float = 0.0) -> Any:
    phases = scripts_module("benchlib.phases")
    return phases.Measurement(
        contender=contender,
        variant=variant,
        scenario="1 desc",
        mode="open" if rate else "closed",
        offered_rate=rate,
        concurrency=0 if rate else 64,
        seconds_measured=3.0,
        rounds=1,
        requests_per_s=rps or (rate or 0.0),
        p50_ms=1.0,
        p99_ms=p99,
        p999_ms=p99,
        over_limit_share=0.0,
        server_cpu_us_per_request=300.0,
    )


def p99_lines(report: Any, sweep: list[Any]) -> list[Any]:
    closed = [row("ceiling", "asyncio", rps=5000.0), row("project", "batch+cache", rps=3000.0)]
    found = report.targets(closed, sweep, [], ["batch+cache"])
    return [target for target in found if "p99" in target.name]


def test_the_p99_target_takes_the_point_nearest_half_the_peak_and_names_the_ceiling_at_that_rate(report: Any) -> None:
    sweep = [
        row("project", "batch+cache", rate=750.0, p99=3.0),
        row("project", "batch+cache", rate=1500.0, p99=7.5),
        row("project", "batch+cache", rate=2250.0, p99=40.0),
        row("ceiling", "same rate", rate=1500.0, p99=6.25),
    ]
    (target,) = p99_lines(report, sweep)
    assert not target.passed  # the machine's tail is shown, never subtracted
    assert target.detail == (
        "p99 7.50 ms at 1,500 req/s offered (open loop); the no-op ceiling at that rate: p99 6.25 ms"
    )


def test_a_ceiling_row_at_another_rate_is_not_named_as_the_reference(report: Any) -> None:
    sweep = [row("project", "batch+cache", rate=1500.0, p99=4.0), row("ceiling", "same rate", rate=1250.0, p99=2.0)]
    (target,) = p99_lines(report, sweep)
    assert target.passed
    assert target.detail == "p99 4.00 ms at 1,500 req/s offered (open loop)"


def test_the_baseline_revision_is_swept_at_the_defaults_rates_only_in_the_window_plan() -> None:
    # --baseline-rev: the full plan gets the revision's closed-loop rows; --window also sweeps it
    # open-loop at the defaults' rates, so its p99 is read at the same offered load.
    servers, bench_main = scripts_module("benchlib.servers"), scripts_module("benchlib.bench_main")
    full = bench_main.with_baseline(servers.PLAN, "abc123")
    window = servers.window_plan("abc123")
    assert full[:-1] == servers.PLAN and window[:-1] == servers.window_plan()
    for spec, swept in ((full[-1], False), (window[-1], True)):
        assert (spec.name, spec.revision, spec.scenarios) == ("project at abc123", "abc123", ("1 desc", "4 desc"))
        assert (spec.sweep, spec.sweep_rates_of) == ((True, servers.HEADLINE) if swept else (False, None))
    assert bench_main.with_baseline(servers.PLAN, None) == servers.PLAN
