"""`scripts/dashboard`: the Grafana dashboard's panels, drawn from a Prometheus into a PNG.

For readers without a Grafana: every panel of compose/grafana/dashboards/ratelimit.json in
its place on the dashboard's grid, its queries resolved as Grafana resolves them
(benchlib.dashboard) and asked over the chosen time range. Graphs are lines per series
(legendFormat names them; overrides put some on a right axis), with the panel's threshold
lines; bar gauges are horizontal bars of their instant values. A query without data says so
in its panel.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any, Mapping, Sequence

from cluster_topology import PortMap, TopologyError

from benchlib.dashboard import (
    ROOT,
    DashboardError,
    Prometheus,
    QueryResult,
    datasource_scrape_interval_s,
    duration_seconds,
    legend,
    load_dashboard,
    panel_queries,
    panels,
    substitute,
    variable_values,
)

DEFAULT_OUT = ROOT / "bench-results" / "dashboard.png"
# Points per graph, as a Grafana panel about 450 pixels wide asks for.
POINTS = 450
GRID_COLUMNS = 24
ROW_INCHES = 0.42  # one grid unit of height (a panel is usually 8)


def _right_axis_refs(panel: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """refId -> the override's properties (unit, min, max) of targets it puts on the right axis."""
    refs = {}
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        if override["matcher"]["id"] != "byFrameRefID":
            continue
        properties = {p["id"]: p["value"] for p in override["properties"]}
        if properties.get("custom.axisPlacement") == "right":
            refs[override["matcher"]["options"]] = properties
    return refs


def _thresholds(panel: Mapping[str, Any]) -> list[tuple[float, str]]:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") == "off":
        return []
    steps = defaults.get("thresholds", {}).get("steps", [])
    return [(float(step["value"]), step["color"]) for step in steps if step.get("value") is not None]


def _axis_label(unit: str) -> str:
    return {"reqps": "requests/s", "s": "seconds", "percentunit": "share", "bytes": "bytes"}.get(unit, "")


def _draw_graph(
    axes: Any,
    panel: Mapping[str, Any],
    shown: Sequence[tuple[Mapping[str, Any], QueryResult]],
    start: float,
    range_s: float,
) -> None:
    """shown: each target with the answer to its range query."""
    right_refs = _right_axis_refs(panel)
    right = axes.twinx() if right_refs else None
    empty = []
    for target, answer in shown:
        where = right if target["refId"] in right_refs and right is not None else axes
        if not answer.result:
            empty.append(target.get("legendFormat") or target["refId"])
        for item in answer.result:
            points = [(float(t) - start, float(v)) for t, v in item["values"] if not math.isnan(float(v))]
            if points:
                xs, ys = zip(*points)
                where.plot(
                    [x / 60 for x in xs],
                    ys,
                    linewidth=1.1,
                    linestyle="--" if where is right else "-",
                    label=legend(target.get("legendFormat", ""), item["metric"]),
                )
    for value, color in _thresholds(panel):
        axes.axhline(value, color=color if color in ("red", "orange", "green") else "gray", linestyle=":", linewidth=1)
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    axes.set_ylabel(_axis_label(unit), fontsize=7)
    if right is not None:
        properties = next(iter(right_refs.values()))
        right.set_ylabel(_axis_label(str(properties.get("unit", ""))), fontsize=7)
        right.tick_params(labelsize=7)
        if "min" in properties and "max" in properties:  # a 0/1 state: keep both ends in sight
            margin = (properties["max"] - properties["min"]) * 0.05
            right.set_ylim(properties["min"] - margin, properties["max"] + margin)
    axes.set_xlim(0, range_s / 60)
    axes.tick_params(labelsize=7)
    axes.grid(True, alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if right is not None:
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        axes.legend(handles[:12], labels[:12], fontsize=6, loc="upper left", ncol=2 if len(handles) > 4 else 1)
    if empty:
        axes.text(
            0.99,
            0.98,
            "no data: " + ", ".join(empty),
            transform=axes.transAxes,
            ha="right",
            va="top",
            fontsize=6.5,
            color="dimgray",
        )


def _draw_bars(axes: Any, shown: Sequence[tuple[Mapping[str, Any], QueryResult]]) -> None:
    """shown: each target with the answer to its instant query."""
    bars = [
        (legend(target.get("legendFormat", ""), item["metric"]), float(item["value"][1]))
        for target, answer in shown
        for item in answer.result
    ]
    bars.sort(key=lambda bar: bar[1])
    if not bars:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="dimgray")
    else:
        # Names inside the axes, over their bars: rule names are longer than a margin.
        positions = range(len(bars))
        axes.barh(positions, [value for _, value in bars], color="tab:blue", alpha=0.35)
        for position, (name, value) in zip(positions, bars):
            axes.text(0, position, f" {name}: {value:.0f}", va="center", fontsize=7)
        axes.set_yticks([])
    axes.tick_params(labelsize=7)
    axes.grid(True, axis="x", alpha=0.3)


def draw(
    path: Path,
    prometheus: Prometheus,
    dashboard: Mapping[str, Any],
    selection: Mapping[str, Sequence[str]],
    range_s: float,
    end: float,
) -> dict[str, int]:
    """Draw every panel; return each query's (`panel / legend`) number of series."""
    step_s = max(1.0, range_s / POINTS)
    values = variable_values(
        dashboard, selection, range_s=range_s, step_s=step_s, scrape_interval_s=datasource_scrape_interval_s()
    )
    start = end - range_s
    # Every answer first: an unreachable Prometheus or a bad query stops before any drawing.
    answers: dict[str, dict[str, QueryResult]] = {}  # panel title -> refId -> answer
    counts: dict[str, int] = {}
    for query in panel_queries(dashboard):
        expr = substitute(query.expr, values)
        answer = prometheus.query(expr, at=end) if query.instant else prometheus.query_range(expr, start, end, step_s)
        if answer.status != "success":
            raise DashboardError(f"{query.name}: {answer.error}\n  {expr}")
        answers.setdefault(query.panel, {})[query.ref_id] = answer
        counts[query.name] = len(answer.result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    laid_out = list(panels(dashboard))
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in laid_out)
    height_inches = rows * ROW_INCHES + 1.2
    figure = plt.figure(figsize=(18, height_inches))
    grid = figure.add_gridspec(rows, GRID_COLUMNS, hspace=3.2, wspace=2.4)
    for panel in laid_out:
        place = panel["gridPos"]
        axes = figure.add_subplot(grid[place["y"] : place["y"] + place["h"], place["x"] : place["x"] + place["w"]])
        axes.set_title(panel["title"], fontsize=9, loc="left")
        shown = [(target, answers[panel["title"]][target["refId"]]) for target in _shown_targets(panel)]
        if panel["type"] == "bargauge":
            _draw_bars(axes, shown)
        else:
            _draw_graph(axes, panel, shown, start, range_s)
    chosen = ", ".join(f"{name}={'|'.join(v)}" for name, v in selection.items() if v) or "all replicas and domains"
    figure.suptitle(
        f"{dashboard['title']}: {range_s / 60:g} minutes (the x axes) from {prometheus.base_url} ({chosen}), "
        f"until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(end))}",
        fontsize=11,
    )
    figure.subplots_adjust(left=0.04, right=0.96, top=1 - 0.9 / height_inches, bottom=0.3 / height_inches)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return counts


def _shown_targets(panel: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [target for target in panel.get("targets", []) if not target.get("hide")]


def _default_prometheus() -> str:
    try:
        return f"http://{PortMap.from_environment(os.environ).address('prometheus', 9090)}"
    except TopologyError:
        return "http://127.0.0.1:9090"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/dashboard",
        description="Draw the Grafana dashboard's panels (compose/grafana/dashboards/ratelimit.json) "
        "from a running cluster's Prometheus into a PNG.",
    )
    parser.add_argument(
        "--prometheus",
        default=_default_prometheus(),
        help="Prometheus's URL (default the local cluster's, at PROMETHEUS_PORT: %(default)s)",
    )
    parser.add_argument("--range", default="10m", help="time range to draw, ending now (default %(default)s)")
    parser.add_argument("--replica", action="append", default=[], help="replica to show (repeatable; default all)")
    parser.add_argument("--domain", action="append", default=[], help="domain to show (repeatable; default all)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    args = parser.parse_args(argv)
    try:
        range_s = duration_seconds(args.range)
        dashboard = load_dashboard()
        selection = {name: chosen for name, chosen in (("replica", args.replica), ("domain", args.domain)) if chosen}
        counts = draw(args.out, Prometheus(args.prometheus), dashboard, selection, range_s, time.time())
    except DashboardError as exc:
        print(f"scripts/dashboard: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        print(
            f"scripts/dashboard: cannot ask Prometheus at {args.prometheus} ({exc}); start the local cluster "
            "with scripts/cluster up, or name another with --prometheus",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"scripts/dashboard: {exc}", file=sys.stderr)
        return 1
    empty = [name for name, count in counts.items() if not count]
    print(f"{args.out}: {len(counts) - len(empty)} of {len(counts)} queries returned data")
    for name in empty:
        print(f"  no data: {name}")
    return 0
