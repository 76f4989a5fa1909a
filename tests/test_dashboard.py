"""compose/grafana/: a dashboard whose every query is proven against the live cluster.

Grafana cannot run here, so the test does what Grafana would: it resolves the template
variables and built-ins (scripts/benchlib/dashboard.py) and sends every panel's query to the
local cluster's Prometheus after ordinary traffic through Envoy. Every query is valid PromQL,
at least 80% return data, and those that stay empty are the ones the README names. Statically:
the panels the issue asks for, every query on the provisioned data source and filtered by the
variables, Envoy's timeout marked where latency is drawn, and compose's grafana service wired
to the provisioning files.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from itertools import cycle
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.support.cluster import (
    PROJECT_ROOT,
    SCRIPTS_DIR,
    LocalCluster,
    running_cluster,
    scripts_module,
    wait_until,
)
from tests.support.processes import free_port
from tests.support.readme import readme_block

COMPOSE_DIR = PROJECT_ROOT / "compose"
REPLICAS = ["ratelimit-1", "ratelimit-2", "ratelimit-3"]
MIN_DATA_SHARE = 0.8
# Grafana's $__interval for the dashboard's 30 minutes on a panel about 900 pixels wide.
STEP_S = 2.0


@pytest.fixture(scope="module")
def dash() -> Any:
    return scripts_module("benchlib.dashboard")


@pytest.fixture(scope="module")
def dashboard(dash: Any) -> dict[str, Any]:
    loaded: dict[str, Any] = dash.load_dashboard()
    return loaded


def _envoy_rate_limit_timeout_s() -> float:
    envoy = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    (front,) = [listener for listener in envoy["static_resources"]["listeners"] if listener["name"] == "front"]
    manager = front["filter_chains"][0]["filters"][0]["typed_config"]
    (rate_limit,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"]
    return float(rate_limit["typed_config"]["timeout"].rstrip("s"))


def _range_s(dashboard: dict[str, Any], dash: Any) -> float:
    start = dashboard["time"]["from"]
    assert dashboard["time"]["to"] == "now" and start.startswith("now-"), dashboard["time"]
    return float(dash.duration_seconds(start.removeprefix("now-")))


def _documented_empty() -> set[str]:
    """`panel / legend` of each row of the README's table of queries empty in normal operation."""
    rows = [line for line in readme_block("dashboard-empty").splitlines() if line.startswith("|")][2:]
    return {" / ".join(cell.strip().strip("`") for cell in row.strip("|").split("|")[:2]) for row in rows}


# --- the files -------------------------------------------------------------------------------


def test_the_dashboard_has_the_panels_and_variables_the_issue_asks_for(dashboard: dict[str, Any], dash: Any) -> None:
    panels = list(dash.panels(dashboard))
    assert len(panels) >= 8
    titles = [panel["title"] for panel in panels]
    assert len(set(titles)) == len(titles), "panel titles must tell panels apart"
    variables = dash.template_variables(dashboard)
    for name, label in (("replica", "replica"), ("domain", "domain")):
        assert variables[name]["includeAll"] and variables[name]["multi"]
        assert dash.variable_query(variables[name]).endswith(f", {label})")
    exprs = [query.expr for query in dash.panel_queries(dashboard)]

    def some(*patterns: str) -> bool:
        return any(all(re.search(p, expr) for p in patterns) for expr in exprs)

    assert some(r"sum by \(replica, code\)", r"ratelimit_rpc_duration_seconds_count"), "decisions by code and replica"
    assert some(r"ratelimit_service_rate_limit_over_limit.*/.*ratelimit_service_rate_limit_total_hits"), "ratio"
    for counter in ("over_limit", "near_limit", "shadow_mode"):
        assert some(r"topk\(", f"ratelimit_service_rate_limit_{counter}"), f"top rules by {counter}"
    for quantile in ("0.5", "0.99"):
        assert some(rf"histogram_quantile\({quantile},", "ratelimit_rpc_duration_seconds_bucket"), quantile
        assert some(rf"histogram_quantile\({quantile},", "ratelimit_backend_duration_seconds_bucket"), quantile
    for metric in (
        "ratelimit_backend_errors_total",
        "ratelimit_backend_circuit_open",
        "ratelimit_config_load_success_total",
        "ratelimit_config_load_error_total",
        "ratelimit_config_healthy",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "envoy_cluster_ratelimit_ok",
        "envoy_cluster_ratelimit_over_limit",
        "envoy_cluster_ratelimit_error",
    ):
        assert some(metric), metric


def test_every_query_asks_the_provisioned_prometheus_and_follows_the_variables(
    dashboard: dict[str, Any], dash: Any
) -> None:
    (datasource,) = yaml.safe_load(dash.DATASOURCES.read_text())["datasources"]
    for panel in dash.panels(dashboard):
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
    for variable in dash.template_variables(dashboard).values():
        assert variable["datasource"]["uid"] == datasource["uid"]
    for query in dash.panel_queries(dashboard):
        # The replicas' own series follow $replica; Envoy's have no replica label.
        own = len(re.findall(r"\b(?:ratelimit_\w+|process_\w+|up)\{", query.expr))
        assert own == query.expr.count('replica=~"$replica"'), query.name
        per_rule = len(re.findall(r"\bratelimit_service_rate_limit_\w+\{", query.expr))
        assert per_rule == query.expr.count('domain=~"$domain"'), query.name


def test_latency_is_drawn_against_envoys_rate_limit_timeout(dashboard: dict[str, Any], dash: Any) -> None:
    timeout_s = _envoy_rate_limit_timeout_s()
    (panel,) = [p for p in dash.panels(dashboard) if "ratelimit_rpc_duration_seconds_bucket" in str(p["targets"])]
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert timeout_s in [step["value"] for step in steps]
    assert f"{timeout_s:g} s" in panel["title"]


def test_compose_runs_grafana_on_the_dashboards_profile_with_the_provisioning(dash: Any) -> None:
    services = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())["services"]
    grafana = services["grafana"]
    assert grafana["profiles"] == ["dashboards"]
    assert re.fullmatch(r"\$\{GRAFANA_IMAGE:-grafana/grafana:\d+\.\d+\.\d+\}", grafana["image"])
    mounts = {target: source for source, target, *_ in (volume.split(":") for volume in grafana["volumes"])}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (provider,) = yaml.safe_load((dash.GRAFANA_DIR / "provisioning/dashboards/ratelimit.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (COMPOSE_DIR / mounts[dashboards_dir]).resolve() == dash.DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{dash.DASHBOARD.name}"
    # The data source is the stack's Prometheus, at the address and pace it really has.
    (datasource,) = yaml.safe_load(dash.DATASOURCES.read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "--web.listen-address=:9090" in services["prometheus"]["command"]
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_the_readme_names_only_queries_of_the_dashboard(dashboard: dict[str, Any], dash: Any) -> None:
    documented = _documented_empty()
    assert documented
    assert documented <= {query.name for query in dash.panel_queries(dashboard)}


# --- live: the local cluster after ordinary traffic --------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("dashboard"), CLUSTER_SCRAPE_INTERVAL="1s") as running:
        yield running


def _send(url: str, user: str, method: str) -> int:
    request = urllib.request.Request(url, method=method, headers={"x-user-id": user})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def traffic(cluster: LocalCluster) -> Iterator[dict[int, int]]:
    """Ordinary traffic through Envoy for the whole module, about 40 requests a second: a few
    users (each allowed 5 a minute, `vip` unlimited, `bot-*` 2), every fourth a POST (the
    shadow-mode rule), all from one address (60 a minute)."""
    codes: dict[int, int] = {}
    stop = threading.Event()
    users = cycle(["alice", "bob", "carol", "vip", "bot-1", "dave"])

    def send() -> None:
        for count in range(1_000_000):
            if stop.is_set():
                return
            code = _send(cluster.envoy_url, next(users), "POST" if count % 4 == 0 else "GET")
            codes[code] = codes.get(code, 0) + 1
            time.sleep(0.025)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    yield codes
    stop.set()
    sender.join(timeout=10)


@pytest.fixture(scope="module")
def prometheus(cluster: LocalCluster, traffic: dict[int, int], dash: Any) -> Any:
    client = dash.Prometheus(f"http://{cluster.address('PROMETHEUS_PORT')}")

    def seen_everywhere() -> bool:
        # Every replica answered, and Envoy both admitted and rejected, within the window
        # the panels' rates use.
        answered = client.query("count(rate(ratelimit_rpc_duration_seconds_count[10s]) > 0)").result
        rejected = client.query("sum(rate(envoy_cluster_ratelimit_over_limit[10s])) > 0").result
        return bool(answered) and int(answered[0]["value"][1]) >= 3 and bool(rejected)

    wait_until(seen_everywhere, 40, "decisions on every replica and Envoy's view of them in Prometheus")
    assert traffic.get(200) and traffic.get(429), traffic
    return client


def test_the_template_variables_list_the_replicas_and_the_domains(
    prometheus: Any, dashboard: dict[str, Any], dash: Any
) -> None:
    now = time.time()
    variables = dash.template_variables(dashboard)
    assert prometheus.label_values(dash.variable_query(variables["replica"]), now - 600, now) == REPLICAS
    assert prometheus.label_values(dash.variable_query(variables["domain"]), now - 600, now) == ["demo"]


@pytest.mark.parametrize(
    "selection",
    [{}, {"replica": ["ratelimit-2"], "domain": ["demo"]}, {"replica": ["ratelimit-1", "ratelimit-3"]}],
    ids=["all", "one-replica-one-domain", "two-replicas"],
)
def test_every_panel_query_is_valid_promql_and_most_return_data(
    prometheus: Any, dashboard: dict[str, Any], dash: Any, selection: dict[str, list[str]]
) -> None:
    values = dash.variable_values(
        dashboard,
        selection,
        range_s=_range_s(dashboard, dash),
        step_s=STEP_S,
        scrape_interval_s=dash.datasource_scrape_interval_s(),
    )
    queries = dash.panel_queries(dashboard)
    now = time.time()
    answers = {}
    for query in queries:
        expr = dash.substitute(query.expr, values)
        answers[query.name] = prometheus.query(expr, at=now)
        if not query.instant:  # what a time series panel asks: the range over its last minute
            ranged = prometheus.query_range(expr, now - 60, now, STEP_S)
            assert ranged.status == "success", f"{query.name}: {ranged.error}"
    report = "\n".join(f"  {len(a.result):3} series  {name}  {a.error}" for name, a in answers.items())
    invalid = [name for name, answer in answers.items() if answer.status != "success"]
    assert not invalid, f"invalid PromQL:\n{report}"
    empty = {name for name, answer in answers.items() if not answer.result}
    assert (len(queries) - len(empty)) / len(queries) >= MIN_DATA_SHARE, report
    assert empty <= _documented_empty(), f"empty, and not in the README's list:\n{report}"


def test_scripts_dashboard_draws_every_panel_from_the_clusters_prometheus(
    cluster: LocalCluster, prometheus: Any, dashboard: dict[str, Any], dash: Any, tmp_path: Path
) -> None:
    out = tmp_path / "dashboard.png"
    # No --prometheus: the cluster's, found through its port variables.
    result = subprocess.run(
        [str(SCRIPTS_DIR / "dashboard"), "--range", "2m", "--out", str(out)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n")
    total = len(dash.panel_queries(dashboard))
    drawn = re.search(rf"(\d+) of {total} queries returned data", result.stdout)
    assert drawn and int(drawn[1]) / total >= MIN_DATA_SHARE, result.stdout
    for line in result.stdout.splitlines()[1:]:
        assert line.strip().removeprefix("no data: ") in _documented_empty(), line


def test_scripts_dashboard_names_the_prometheus_it_cannot_reach(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [str(SCRIPTS_DIR / "dashboard"), "--prometheus", url, "--out", str(tmp_path / "d.png")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"cannot ask Prometheus at {url}" in result.stderr
    assert not (tmp_path / "d.png").exists()
