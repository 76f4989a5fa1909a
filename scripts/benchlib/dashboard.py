"""The Grafana dashboard's queries (compose/grafana/), as Grafana would send them to Prometheus.

Grafana cannot run here, so this module does its part: it reads the dashboard's panels and
template variables, substitutes the variables the way Grafana does ($replica, $domain, and
the built-in $__rate_interval, $__range, $__interval), and asks a Prometheus's HTTP API.
tests/test_dashboard.py proves every query with it; scripts/dashboard draws them.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = ROOT / "compose" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "ratelimit.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
ALL = "$__all"

# Grafana's variable syntaxes: ${name}, ${name:format}, [[name]] and $name.
_VARIABLE = re.compile(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\[\[(?P<bracketed>\w+)\]\]|\$(?P<bare>\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<match>.+),\s*(?P<label>\w+)\)$", re.DOTALL)
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


class DashboardError(Exception):
    """The dashboard names something Grafana could not resolve (an unknown variable)."""


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    legend: str
    expr: str  # as written in the dashboard, variables unsubstituted
    instant: bool

    @property
    def name(self) -> str:
        return f"{self.panel} / {self.legend}"


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves are not panels."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(
            panel=panel["title"],
            ref_id=target["refId"],
            legend=target.get("legendFormat", ""),
            expr=target["expr"],
            instant=bool(target.get("instant")) and not target.get("range", False),
        )
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if not target.get("hide")
    ]


def template_variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard.get("templating", {}).get("list", [])}


def duration_seconds(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise DashboardError(f"{text!r} is not a duration like 5s or 30m")
    return int(match[1]) * _SECONDS[match[2]]


def datasource_scrape_interval_s(path: Path = DATASOURCES) -> float:
    """The provisioned data source's scrape interval (jsonData.timeInterval), which
    Grafana's $__rate_interval is computed from."""
    (datasource,) = yaml.safe_load(path.read_text())["datasources"]
    return duration_seconds(datasource["jsonData"]["timeInterval"])


def builtin_variables(range_s: float, step_s: float, scrape_interval_s: float) -> dict[str, str]:
    """Grafana's built-ins for a panel showing `range_s` at one point per `step_s`:
    $__rate_interval is max($__interval + scrape interval, 4 x scrape interval)."""
    rate_interval_s = max(step_s + scrape_interval_s, 4 * scrape_interval_s)
    return {
        "__interval": f"{round(step_s * 1000)}ms",
        "__rate_interval": f"{round(rate_interval_s * 1000)}ms",
        "__range": f"{round(range_s)}s",
        "__range_s": str(round(range_s)),
    }


def selection_value(variable: Mapping[str, Any], selected: Sequence[str]) -> str:
    """What Grafana puts in a Prometheus query for the selected values: the variable's
    allValue for All, else one value, or several as a regex alternation."""
    if list(selected) == [ALL]:
        if not variable.get("includeAll"):
            raise DashboardError(f"${variable['name']} has no All option")
        return str(variable.get("allValue") or ".*")
    if len(selected) == 1:
        return _regex_escape(selected[0])
    return "(" + "|".join(_regex_escape(value) for value in selected) + ")"


def _regex_escape(value: str) -> str:
    """Grafana's escaping of a value for a Prometheus regex matcher. In the query text a
    backslash becomes four and every other metacharacter gets two before it: one for the
    regex, doubled for the PromQL string it sits in."""
    return _REGEX_SPECIAL.sub(r"\\\\\g<0>", value.replace("\\", "\\" * 4))


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with every variable replaced; an unknown one is an error, as a typo in a
    dashboard is a panel that never shows anything."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["bracketed"] or match["bare"]
        if name not in values:
            raise DashboardError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def variable_values(
    dashboard: Mapping[str, Any],
    selection: Mapping[str, Sequence[str]],
    *,
    range_s: float,
    step_s: float,
    scrape_interval_s: float,
) -> dict[str, str]:
    """Every variable's value for a selection (template variable -> selected values;
    those not named are All)."""
    values = builtin_variables(range_s, step_s, scrape_interval_s)
    for name, variable in template_variables(dashboard).items():
        values[name] = selection_value(variable, selection.get(name, [ALL]))
    return values


@dataclass(frozen=True)
class QueryResult:
    status: str  # "success" or "error"
    result: list[dict[str, Any]]
    error: str = ""


class Prometheus:
    """The few endpoints of Prometheus's HTTP API that Grafana's panels and variables use."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: Sequence[tuple[str, str]]) -> dict[str, Any]:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error in JSON
            body = exc.read()
        answer: dict[str, Any] = json.loads(body)
        return answer

    def _result(self, answer: Mapping[str, Any]) -> QueryResult:
        if answer.get("status") != "success":
            return QueryResult("error", [], f"{answer.get('errorType')}: {answer.get('error')}")
        return QueryResult("success", list(answer["data"]["result"]))

    def query(self, expr: str, at: float | None = None) -> QueryResult:
        params = [("query", expr)] + ([("time", f"{at:.3f}")] if at is not None else [])
        return self._result(self._get("/api/v1/query", params))

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> QueryResult:
        params = [("query", expr), ("start", f"{start:.3f}"), ("end", f"{end:.3f}"), ("step", f"{step_s:g}")]
        return self._result(self._get("/api/v1/query_range", params))

    def label_values(self, query: str, start: float, end: float) -> list[str]:
        """A query variable's `label_values(match, label)`, as Grafana asks it."""
        parsed = _LABEL_VALUES.match(query.strip())
        if not parsed:
            raise DashboardError(f"{query!r} is not label_values(match, label)")
        params = [("match[]", parsed["match"]), ("start", f"{start:.3f}"), ("end", f"{end:.3f}")]
        answer = self._get(f"/api/v1/label/{parsed['label']}/values", params)
        if answer.get("status") != "success":
            raise DashboardError(f"{query}: {answer.get('error')}")
        return sorted(answer["data"])


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    """A series' name by the target's legendFormat ({{label}} replaced, absent labels empty)."""
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)
    return " ".join(text.split())
