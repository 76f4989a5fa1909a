"""The compose topology, read from compose/ and mapped onto loopback ports.

Owns the table of published ports (service, port inside the compose network, host-port
variable, default) that compose/docker-compose.yml and compose/.env.example spell out,
and the rewrites that turn compose/prometheus.yml (with its rule files), compose/envoy.yaml
and the replicas' compose environment into their loopback twins for scripts/cluster. Every rewrite goes
through the table, so an address the table does not know is an error, not a silent miss.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from ratelimit.limiter.redis_url import parse_redis_url

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus.yml"
ENVOY_CONFIG = COMPOSE_DIR / "envoy.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
LOOPBACK = "127.0.0.1"

# Start order; `down` goes the other way.
SERVICES = ("redis", "ratelimit-1", "ratelimit-2", "ratelimit-3", "prometheus", "envoy")
REPLICAS = ("ratelimit-1", "ratelimit-2", "ratelimit-3")
# Compose services behind a profile (not started by a plain `up`), which the local cluster
# does not run: Grafana (profile dashboards) needs its image; scripts/dashboard draws its
# panels from the cluster's Prometheus instead.
COMPOSE_ONLY_SERVICES = ("grafana",)
# In envoy.yaml, a socket_address on a bind-all address is one of the proxy's own.
BIND_ALL_ADDRESSES = frozenset({"0.0.0.0", "::"})


class TopologyError(Exception):
    """compose/ and this table disagree, or a port variable is unusable."""


@dataclass(frozen=True)
class PublishedPort:
    """A service's port in the compose network, published on the host as ${variable:-default}."""

    service: str
    container_port: int
    variable: str
    default: int


PUBLISHED_PORTS: tuple[PublishedPort, ...] = (
    PublishedPort("redis", 6379, "REDIS_PORT", 6379),
    PublishedPort("ratelimit-1", 8081, "RATELIMIT_1_GRPC_PORT", 8081),
    PublishedPort("ratelimit-1", 9102, "RATELIMIT_1_METRICS_PORT", 9102),
    PublishedPort("ratelimit-2", 8081, "RATELIMIT_2_GRPC_PORT", 8082),
    PublishedPort("ratelimit-2", 9102, "RATELIMIT_2_METRICS_PORT", 9103),
    PublishedPort("ratelimit-3", 8081, "RATELIMIT_3_GRPC_PORT", 8083),
    PublishedPort("ratelimit-3", 9102, "RATELIMIT_3_METRICS_PORT", 9104),
    PublishedPort("prometheus", 9090, "PROMETHEUS_PORT", 9090),
    PublishedPort("envoy", 10000, "ENVOY_PORT", 10000),
    PublishedPort("envoy", 9901, "ENVOY_ADMIN_PORT", 9901),
    PublishedPort("grafana", 3000, "GRAFANA_PORT", 3000),
)

# Compose's `${NAME}`, `${NAME:-default}` and `$$` (a literal dollar).
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Substitute variables the way compose does (an empty value takes the :- default)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        value = environ.get(match["name"], "")
        return value if value or match["default"] is None else match["default"]

    return _VARIABLE.sub(substitute, text)


class PortMap:
    """Host port of every published (service, container port), from the environment."""

    def __init__(self, host_ports: Mapping[str, int]) -> None:
        self.by_variable = dict(host_ports)
        self._by_address = {(p.service, p.container_port): host_ports[p.variable] for p in PUBLISHED_PORTS}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> PortMap:
        host_ports: dict[str, int] = {}
        for published in PUBLISHED_PORTS:
            raw = environ.get(published.variable) or str(published.default)
            try:
                port = int(raw)
            except ValueError:
                raise TopologyError(f"{published.variable}={raw!r} is not a port number") from None
            if not 0 < port < 65536:
                raise TopologyError(f"{published.variable}={port} is out of range")
            host_ports[published.variable] = port
        taken: dict[int, str] = {}
        for variable, port in host_ports.items():
            if port in taken:
                raise TopologyError(f"{variable} and {taken[port]} are both {port}")
            taken[port] = variable
        return cls(host_ports)

    def host_port(self, service: str, container_port: int) -> int:
        try:
            return self._by_address[(service, container_port)]
        except KeyError:
            raise TopologyError(f"{service}:{container_port} is not a published port of the compose stack") from None

    def address(self, service: str, container_port: int) -> str:
        return f"{LOOPBACK}:{self.host_port(service, container_port)}"

    def ports_of(self, service: str) -> list[tuple[str, int]]:
        """(variable, host port) of each port the service publishes."""
        return [(p.variable, self.by_variable[p.variable]) for p in PUBLISHED_PORTS if p.service == service]


def load_compose(environ: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(interpolate(path.read_text(), environ))
    return compose


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TopologyError(f"{address!r} is not host:port")
    return host, int(port)


def prometheus_rule_files(source: Path = PROMETHEUS_CONFIG) -> list[Path]:
    """The rule files the config loads, found as Prometheus finds them: relative to its folder.

    A pattern must be relative, so that it means the same file in the container (beside the
    mounted config) and on the host (beside compose/prometheus.yml).
    """
    config = yaml.safe_load(source.read_text())
    files: list[Path] = []
    for pattern in config.get("rule_files") or []:
        if Path(pattern).is_absolute():
            raise TopologyError(f"{source.name}: rule_files {pattern!r} must be relative to the config's folder")
        files.extend(sorted(source.parent.glob(pattern)))
    return files


def render_prometheus(
    ports: PortMap,
    scrape_interval: str | None = None,
    source: Path = PROMETHEUS_CONFIG,
    rule_files: Sequence[Path] | None = None,
) -> str:
    """compose/prometheus.yml with every target `service:port` replaced by its loopback address
    and its rule files (by default the config's own, `rule_files` to load others) by their paths.

    A `scrape_interval` applies to rule evaluation too: alerts keep pace with the samples.
    """
    config = yaml.safe_load(source.read_text())
    if scrape_interval:
        config.setdefault("global", {}).update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    files = prometheus_rule_files(source) if rule_files is None else rule_files
    if files:
        config["rule_files"] = [str(path) for path in files]
    for job in config.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            static["targets"] = [ports.address(*split_address(target)) for target in static["targets"]]
    return str(yaml.safe_dump(config, sort_keys=False))


def render_alert_rules(source: Path, alert_for: str) -> str:
    """A rule file with every alert's `for` set to `alert_for`, and nothing else changed.

    For tests that watch an alert fire without waiting its real `for`: the expressions,
    labels and annotations stay the shipped ones.
    """
    rules = yaml.safe_load(source.read_text())
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            if "alert" in rule:
                rule["for"] = alert_for
    return str(yaml.safe_dump(rules, sort_keys=False))


def socket_addresses(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "socket_address" and isinstance(value, dict):
                yield value
            else:
                yield from socket_addresses(value)
    elif isinstance(node, list):
        for item in node:
            yield from socket_addresses(item)


def render_envoy(ports: PortMap, source: Path = ENVOY_CONFIG) -> str:
    """compose/envoy.yaml with every socket_address on loopback.

    Upstream addresses name a compose service (`ratelimit-2:8081`); bind-all addresses
    (`0.0.0.0:10000`, the listener and the admin) are the envoy service's own ports.
    """
    config = yaml.safe_load(source.read_text())
    for socket_address in socket_addresses(config):
        host = socket_address["address"]
        service = "envoy" if host in BIND_ALL_ADDRESSES else host
        socket_address["address"] = LOOPBACK
        socket_address["port_value"] = ports.host_port(service, int(socket_address["port_value"]))
    return str(yaml.safe_dump(config, sort_keys=False))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):  # the `- NAME=value` form
        environment = dict(entry.split("=", 1) for entry in environment)
    return {str(name): "" if value is None else str(value) for name, value in environment.items()}


def _host_path(service: dict[str, Any], container_path: str) -> str:
    """Where a path inside the container comes from, through the service's bind mounts."""
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        target = rest.split(":", 1)[0]
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return str((COMPOSE_DIR / source).resolve()) + container_path[len(target) :]
    raise TopologyError(f"{container_path} is not mounted from the host in compose/docker-compose.yml")


def replica_environment(compose: Mapping[str, Any], service: str, ports: PortMap) -> dict[str, str]:
    """The replica's RATELIMIT_* settings from compose, with its addresses and paths made local."""
    spec = compose["services"][service]
    environment = _environment(spec)
    grpc_port = int(environment.get("RATELIMIT_GRPC_PORT", "8081"))
    metrics_port = int(environment.get("RATELIMIT_METRICS_PORT", "9102"))
    environment.update(
        RATELIMIT_GRPC_HOST=LOOPBACK,
        RATELIMIT_GRPC_PORT=str(ports.host_port(service, grpc_port)),
        RATELIMIT_METRICS_HOST=LOOPBACK,
        RATELIMIT_METRICS_PORT=str(ports.host_port(service, metrics_port)),
    )
    if "RATELIMIT_REDIS_URL" in environment:
        try:
            url = parse_redis_url(environment["RATELIMIT_REDIS_URL"])
        except ValueError as exc:
            raise TopologyError(f"{service}: RATELIMIT_REDIS_URL: {exc}") from None
        if not url.nodes or not all(host for host, _ in url.nodes):
            raise TopologyError(f"{service}: RATELIMIT_REDIS_URL has no host")
        nodes = tuple((LOOPBACK, ports.host_port(host, port or 6379)) for host, port in url.nodes)
        environment["RATELIMIT_REDIS_URL"] = url.with_nodes(nodes)
    if "RATELIMIT_CONFIG" in environment:
        paths = [part for part in environment["RATELIMIT_CONFIG"].split(",") if part]
        environment["RATELIMIT_CONFIG"] = ",".join(_host_path(spec, path) for path in paths)
    return environment


def service_command(compose: Mapping[str, Any], service: str) -> list[str]:
    command = compose["services"][service].get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]
