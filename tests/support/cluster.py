"""The local cluster (scripts/cluster) for tests: free ports, its own state directory.

A test's cluster never touches a developer's: every port variable of compose/.env.example
is set to a free loopback port, and CLUSTER_STATE_DIR to a temporary directory.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping

from tests.support.processes import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = PROJECT_ROOT / "scripts"
CLUSTER_COMMAND = SCRIPTS_DIR / "cluster"


def scripts_module(name: str) -> ModuleType:
    """A module of scripts/ (cluster, cluster_topology, healthcheck), imported as they import each other."""
    if str(SCRIPTS_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPTS_DIR))
    return importlib.import_module(name)


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 5.0) -> tuple[int, Any, str]:
    """(status, headers, body) of a GET, whatever the status."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), response.headers, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


@dataclass
class LocalCluster:
    state_dir: Path
    env: dict[str, str]
    ports: dict[str, int]  # port variable -> host port

    def run(self, *args: str, check: bool = True, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(CLUSTER_COMMAND), *args],
            env=self.env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"scripts/cluster {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{self.logs()}"
            )
        return result

    def address(self, variable: str) -> str:
        return f"127.0.0.1:{self.ports[variable]}"

    def grpc_target(self, replica: str) -> str:
        return self.address(f"RATELIMIT_{replica.rsplit('-', 1)[1]}_GRPC_PORT")

    def metrics_address(self, replica: str) -> str:
        return self.address(f"RATELIMIT_{replica.rsplit('-', 1)[1]}_METRICS_PORT")

    @property
    def envoy_url(self) -> str:
        return f"http://{self.address('ENVOY_PORT')}/"

    def prometheus_query(self, query: str) -> list[dict[str, Any]]:
        url = f"http://{self.address('PROMETHEUS_PORT')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        status, _, body = http_get(url)
        assert status == 200, body
        result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
        return result

    def pid(self, service: str) -> int:
        return int(json.loads((self.state_dir / f"{service}.pid").read_text())["pid"])

    def logs(self, lines: int = 20) -> str:
        parts = []
        for log in sorted(self.state_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def local_cluster(state_dir: Path, **extra_env: str) -> LocalCluster:
    topology = scripts_module("cluster_topology")
    ports = {published.variable: free_port() for published in topology.PUBLISHED_PORTS}
    env = {
        **os.environ,
        **{variable: str(port) for variable, port in ports.items()},
        "CLUSTER_STATE_DIR": str(state_dir),
        **extra_env,
    }
    return LocalCluster(state_dir, env, ports)


@contextlib.contextmanager
def running_cluster(state_dir: Path, **extra_env: str) -> Iterator[LocalCluster]:
    """`scripts/cluster up` on free ports; `down` at the end, whatever happened."""
    cluster = local_cluster(state_dir, **extra_env)
    try:
        cluster.run("up")
        yield cluster
    finally:
        cluster.run("down", check=False)


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll until predicate() is truthy, and return it; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
