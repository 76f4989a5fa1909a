"""The load generator's picture: admitted requests over time, per replica, against the limit.

Top: admitted (stacked by replica) and denied requests in each second. Bottom: requests
admitted in the trailing window of the limit's unit, all replicas together, against the
limit: the shared sliding window holds when that line never crosses the limit.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Any

from benchlib.loadgen_main import Run


def trailing_counts(
    times: list[float], window_s: float, end_s: float, points: int = 2000
) -> tuple[list[float], list[int]]:
    """How many of `times` fall in (t - window_s, t], for t on a grid from 0 to `end_s`."""
    ordered = sorted(times)
    grid = [end_s * step / points for step in range(points + 1)]
    counts = [bisect.bisect_right(ordered, t) - bisect.bisect_right(ordered, t - window_s) for t in grid]
    return grid, counts


def draw(path: Path, run: Run, numbers: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = max(1, math.ceil(max((call.done_s for call in run.calls), default=1.0)))
    figure, (per_second, window) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    bottom = [0] * seconds
    for index, target in enumerate(run.targets):
        counts = [0] * seconds
        for call in run.calls:
            if call.replica == index and call.outcome == "OK":
                counts[min(seconds - 1, int(call.done_s))] += 1
        per_second.bar(range(seconds), counts, bottom=bottom, width=0.9, align="edge", label=f"admitted by {target}")
        bottom = [b + c for b, c in zip(bottom, counts)]
    denied = [0] * seconds
    for call in run.calls:
        if call.outcome == "OVER_LIMIT":
            denied[min(seconds - 1, int(call.done_s))] += 1
    per_second.step(range(seconds), denied, where="post", color="gray", linestyle="--", label="denied")
    per_second.set_ylabel("requests in each second")
    per_second.legend(loc="upper right", fontsize=8)
    per_second.grid(True, alpha=0.3)

    admitted = [call.done_s for call in run.calls if call.outcome == "OK"]
    limit = run.limit
    if limit is not None:
        xs, ys = trailing_counts(admitted, limit.window_s, float(seconds))
        window.step(xs, ys, where="post", color="tab:blue", label=f"admitted in the last {limit.window_s:g} s")
        window.axhline(
            limit.requests_per_unit, color="tab:red", linestyle=":", label=f"limit {limit.requests_per_unit}"
        )
        window.set_ylabel(f"admitted in trailing {limit.window_s:g} s")
        title = f"limit {limit.requests_per_unit}/{limit.unit}"
    else:
        window.text(0.5, 0.5, "no limit reported by the service", ha="center", transform=window.transAxes)
        title = "no limit reported"
    window.set_xlabel("seconds since start")
    if limit is not None:  # nothing labelled to list otherwise (matplotlib would warn)
        window.legend(loc="lower right", fontsize=8)
    window.grid(True, alpha=0.3)
    figure.suptitle(
        f"{numbers['sent']} requests to {len(run.targets)} replicas at {numbers['rate']:g}/s: "
        f"{numbers['admitted']} admitted, {numbers['denied']} denied; {title}\n"
        f"domain {numbers['domain']}, {'; '.join(numbers['descriptors'])}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
