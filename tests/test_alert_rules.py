"""compose/rules/: the alerts an operator gets, proven by promtool and by the live cluster.

promtool (Debian's prometheus package) checks the rule files, and runs their unit tests
(compose/rules/tests/), in which every alert fires in its scenario and stays quiet in its near
misses. compose's Prometheus and the local cluster's load the same files. Live: a local cluster
whose alerts wait 1 s instead of their `for` (CLUSTER_ALERT_FOR; expressions, labels and
annotations are the shipped ones) evaluates every rule against the real metrics without error,
fires nothing while all is well, fires RateLimitReplicaDown for a stopped replica and for it
alone, and clears it when the replica is back; with Redis stopped under traffic, it fires the
breaker, Redis-error and error-answer alerts on every replica and nothing else, and clears the
breaker's when Redis is back.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import yaml

from ratelimit.client import RateLimitClient
from tests.support.cluster import PROJECT_ROOT, LocalCluster, http_get, running_cluster, scripts_module, wait_until

COMPOSE_DIR = PROJECT_ROOT / "compose"
RULES_DIR = COMPOSE_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
SEVERITIES = {"critical", "warning", "info"}
LIVE_ALERT_FOR = "1s"
REPLICAS = ("ratelimit-1", "ratelimit-2", "ratelimit-3")


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/bootstrap installs it)")
    return promtool


def _promtool_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, check=False)


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for path in RULE_FILES for rule in _rules(path) if "alert" in rule}


@pytest.fixture(scope="module")
def topology() -> Any:
    return scripts_module("cluster_topology")


# --- the files, with promtool -----------------------------------------------------------


def test_promtool_accepts_the_rule_files() -> None:
    assert RULE_FILES, "no rule files in compose/rules/"
    result = _promtool_run("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_issue_asks_for_these_alerts_and_each_has_a_for_a_severity_and_says_what_to_do() -> None:
    alerts = _alerts()
    assert {
        "RateLimitReplicaDown",
        "RateLimitBackendErrors",
        "RateLimitUnavailableAnswers",
        "RateLimitCircuitOpen",
        "RateLimitConfigLoadFailing",
        "RateLimitConfigStale",
        "RateLimitDecisionLatencyHigh",
        "RateLimitOverLimitSurge",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule.get("for"), f"{name} has no for"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name} has no summary"
        # What to check and what to do: more than a restatement of the summary.
        assert len(annotations.get("description", "").split()) >= 25, f"{name}'s description says too little"


def test_the_latency_alert_fires_below_envoys_rate_limit_timeout() -> None:
    envoy = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    (front,) = [listener for listener in envoy["static_resources"]["listeners"] if listener["name"] == "front"]
    manager = front["filter_chains"][0]["filters"][0]["typed_config"]
    (rate_limit,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"]
    timeout_s = float(rate_limit["typed_config"]["timeout"].rstrip("s"))
    expression = _alerts()["RateLimitDecisionLatencyHigh"]["expr"]
    threshold_s = float(expression.rsplit(">", 1)[1])
    assert 0.5 * timeout_s <= threshold_s < timeout_s, (threshold_s, timeout_s)


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        suite = yaml.safe_load(path.read_text())
        assert {str((path.parent / f).resolve()) for f in suite["rule_files"]} <= {str(f) for f in RULE_FILES}
        for case in suite["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert firing == alerts, f"never seen firing: {alerts - firing}; not an alert: {firing - alerts}"
    assert quiet == alerts, f"never seen quiet: {alerts - quiet}; not an alert: {quiet - alerts}"


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool tests in compose/rules/tests/"
    result = _promtool_run("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# --- compose and the local runner load them ---------------------------------------------


def test_compose_mounts_the_rules_where_its_prometheus_config_looks(topology: Any) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    service = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())["services"]["prometheus"]
    mounts = {target: source for source, target, *_ in (volume.split(":") for volume in service["volumes"])}
    config_dir = Path(next(target for target, source in mounts.items() if source == "./prometheus.yml")).parent
    for pattern in config["rule_files"]:
        folder = Path(pattern).parent
        # The pattern means compose/rules/ on the host and the mount of it in the container.
        assert mounts[str(config_dir / folder)] == f"./{folder}"
    assert topology.prometheus_rule_files() == RULE_FILES


def test_the_local_runner_loads_the_same_rule_files_and_evaluates_at_the_scrape_interval(topology: Any) -> None:
    ports = topology.PortMap({p.variable: 20000 + i for i, p in enumerate(topology.PUBLISHED_PORTS)})
    rendered = yaml.safe_load(topology.render_prometheus(ports, "1s"))
    assert rendered["rule_files"] == [str(path) for path in RULE_FILES]
    assert rendered["global"]["evaluation_interval"] == "1s"


def test_a_short_for_changes_nothing_but_the_for(topology: Any) -> None:
    for path in RULE_FILES:
        shipped = yaml.safe_load(path.read_text())
        rendered = yaml.safe_load(topology.render_alert_rules(path, "1s"))
        for group, rendered_group in zip(shipped["groups"], rendered["groups"], strict=True):
            for rule, rendered_rule in zip(group["rules"], rendered_group["rules"], strict=True):
                if "alert" in rule:
                    assert rendered_rule.pop("for") == "1s"
                    rule.pop("for")
                assert rendered_rule == rule
            assert {k: v for k, v in rendered_group.items() if k != "rules"} == {
                k: v for k, v in group.items() if k != "rules"
            }


def test_an_absolute_rule_file_pattern_is_refused(topology: Any, tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"rule_files": ["/etc/prometheus/rules/*.yml"], "scrape_configs": []}))
    with pytest.raises(topology.TopologyError, match="must be relative"):
        topology.prometheus_rule_files(config)


# --- live: the local cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    _promtool()  # the cluster's Prometheus comes from the same package
    state_dir = tmp_path_factory.mktemp("alerts")
    with running_cluster(state_dir, CLUSTER_SCRAPE_INTERVAL="1s", CLUSTER_ALERT_FOR=LIVE_ALERT_FOR) as running:
        yield running


def _api(cluster: LocalCluster, path: str) -> Any:
    status, _, body = http_get(f"http://{cluster.address('PROMETHEUS_PORT')}{path}")
    assert status == 200, body
    return yaml.safe_load(body)["data"]  # JSON is YAML


def _loaded_rules(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    return {rule["name"]: rule for group in _api(cluster, "/api/v1/rules")["groups"] for rule in group["rules"]}


def _active_alerts(cluster: LocalCluster) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = _api(cluster, "/api/v1/alerts")["alerts"]
    return alerts


def _timestamp(stamp: str) -> float:
    """Prometheus's RFC 3339 UTC time (nanoseconds, `Z`) in seconds since the epoch."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp() + float(f"0.{fraction or 0}")


def _all_evaluated_since(cluster: LocalCluster, since: float) -> bool:
    rules = _loaded_rules(cluster).values()
    return bool(rules) and all(_timestamp(rule["lastEvaluation"]) > since for rule in rules)


def test_the_cluster_loads_the_shipped_rules_with_only_the_for_shortened(cluster: LocalCluster, topology: Any) -> None:
    rendered_dir = cluster.state_dir / "rules"
    assert sorted(path.name for path in rendered_dir.glob("*.yml")) == [path.name for path in RULE_FILES]
    for path in RULE_FILES:
        assert yaml.safe_load((rendered_dir / path.name).read_text()) == yaml.safe_load(
            topology.render_alert_rules(path, LIVE_ALERT_FOR)
        )
    loaded = _loaded_rules(cluster)
    shipped = {rule.get("alert") or rule["record"]: rule for path in RULE_FILES for rule in _rules(path)}
    assert set(loaded) == set(shipped)
    for name in _alerts():
        assert loaded[name]["duration"] == 1, name
        assert loaded[name]["labels"] == shipped[name]["labels"]


def test_every_rule_evaluates_against_the_real_metrics_and_nothing_fires_while_all_is_well(
    cluster: LocalCluster,
) -> None:
    started = time.time()
    # Two evaluations (1 s apart) after now: a 1 s `for` has had its chance to fire.
    wait_until(lambda: _all_evaluated_since(cluster, started + 1.5), 20, "two rule evaluations")
    broken = {name: rule.get("lastError") for name, rule in _loaded_rules(cluster).items() if rule["health"] != "ok"}
    assert not broken
    assert _active_alerts(cluster) == []


def test_a_stopped_replica_fires_replica_down_for_it_alone_until_it_is_back(cluster: LocalCluster) -> None:
    cluster.run("down", "ratelimit-2")
    stopped = time.monotonic()

    def replica_down() -> list[dict[str, Any]]:
        return [a for a in _active_alerts(cluster) if a["labels"]["alertname"] == "RateLimitReplicaDown"]

    firing = wait_until(
        lambda: [a for a in replica_down() if a["state"] == "firing"], 30, "RateLimitReplicaDown firing"
    )
    took_s = time.monotonic() - stopped
    (alert,) = firing
    assert alert["labels"]["replica"] == "ratelimit-2"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "Rate limit replica ratelimit-2 is down"
    assert cluster.address("RATELIMIT_2_METRICS_PORT") in alert["annotations"]["description"]
    assert [a["labels"]["replica"] for a in replica_down()] == ["ratelimit-2"], "other replicas are up"
    assert took_s < 30

    cluster.run("up", "ratelimit-2")
    wait_until(lambda: not replica_down(), 20, "RateLimitReplicaDown to clear")
    assert _active_alerts(cluster) == []


def _firing(cluster: LocalCluster) -> set[tuple[str, str]]:
    return {
        (alert["labels"]["alertname"], alert["labels"].get("replica", ""))
        for alert in _active_alerts(cluster)
        if alert["state"] == "firing"
    }


@contextlib.contextmanager
def _decisions_asked(cluster: LocalCluster) -> Iterator[None]:
    """Calls to every replica, about 50 a second in all, until the block ends: the breaker
    opens, and closes again, only on calls that reach Redis."""
    stop = threading.Event()
    clients = [RateLimitClient(cluster.grpc_target(replica), timeout_s=1.0) for replica in REPLICAS]

    def ask() -> None:
        # A new user each call: a full counter would be answered from the replica's over-limit
        # cache, without Redis.
        calls = 0
        while not stop.is_set():
            for client in clients:
                calls += 1
                with contextlib.suppress(grpc.RpcError):
                    client.should_rate_limit("demo", [[("user", f"alert-test-{calls}")]])
            time.sleep(0.06)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    try:
        yield
    finally:
        stop.set()
        asker.join(timeout=10)
        for client in clients:
            client.close()


def test_redis_stopped_under_traffic_fires_the_backend_alerts_on_every_replica_and_no_other(
    cluster: LocalCluster,
) -> None:
    backend_alerts = {"RateLimitCircuitOpen", "RateLimitBackendErrors", "RateLimitUnavailableAnswers"}
    expected = {(name, replica) for name in backend_alerts for replica in REPLICAS}
    with _decisions_asked(cluster):
        cluster.run("down", "redis")
        try:
            seen: list[set[tuple[str, str]]] = [set()]

            def all_firing() -> bool:
                seen[0] = _firing(cluster)
                return seen[0] >= expected

            try:
                wait_until(all_firing, 30, f"{sorted(backend_alerts)} firing on every replica")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; firing at the end: {sorted(seen[0])}") from None
            # The replicas are up and nothing went through Envoy.
            assert _firing(cluster) == expected
        finally:
            cluster.run("up", "redis")
        # The breaker closes at the first probe that succeeds; the error rates take their
        # one-minute window to fall.
        wait_until(
            lambda: not any(name == "RateLimitCircuitOpen" for name, _ in _firing(cluster)),
            20,
            "RateLimitCircuitOpen to clear once Redis is back",
        )
