"""The compose stack for real: build the image, `docker compose up --wait`, one limit across replicas.

Needs a Docker engine (docker.from_env().ping()) and the compose v2 plugin (`--wait`);
skipped where they are missing. Host ports are free ports picked here, and the project
name is the test's own, so a developer's running stack is left alone.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest

from ratelimit.client import RateLimitClient
from tests.support.cluster import PROJECT_ROOT, http_get, scripts_module, wait_until
from tests.support.processes import free_port

pytestmark = pytest.mark.compose

COMPOSE_FILE = PROJECT_ROOT / "compose" / "docker-compose.yml"
REPLICAS = ("ratelimit-1", "ratelimit-2", "ratelimit-3")
USER_LIMIT = 5
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"


def _docker_client_or_skip() -> Any:
    import docker

    if not os.environ.get("DOCKER_HOST") and not Path(DEFAULT_DOCKER_SOCKET).exists():
        pytest.skip(f"no Docker engine here (no DOCKER_HOST, no {DEFAULT_DOCKER_SOCKET})")
    client = None
    # A failed docker.from_env() leaves its socket to the garbage collector: keep that quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=10)
            client.ping()
        except Exception as exc:  # no daemon, no permission, bad DOCKER_HOST: all mean "no engine here"
            if client is not None:
                client.close()
            reason = f"no Docker engine here (docker.from_env().ping() failed: {exc})"
        else:
            reason = ""
        gc.collect()
    if reason:
        pytest.skip(reason)
    assert client is not None
    cli = shutil.which("docker")
    if cli is None or subprocess.run([cli, "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        client.close()
        pytest.skip("an engine runs, but the docker CLI with its compose v2 plugin (`docker compose`) is missing")
    return client


class Stack:
    def __init__(self, project: str, ports: dict[str, int]) -> None:
        self.project = project
        self.ports = ports
        self.env = {**os.environ, **{variable: str(port) for variable, port in ports.items()}}

    def compose(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def address(self, variable: str) -> str:
        return f"127.0.0.1:{self.ports[variable]}"

    def grpc_target(self, replica: str) -> str:
        return self.address(f"RATELIMIT_{replica.rsplit('-', 1)[1]}_GRPC_PORT")


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    client = _docker_client_or_skip()
    yield client
    client.close()


@pytest.fixture(scope="module")
def stack(docker_client: Any) -> Iterator[Stack]:
    topology = scripts_module("cluster_topology")
    ports = {published.variable: free_port() for published in topology.PUBLISHED_PORTS}
    running = Stack(f"ratelimit-test-{uuid.uuid4().hex[:8]}", ports)
    try:
        up = running.compose("up", "--build", "--detach", "--wait", timeout_s=1200)
        assert up.returncode == 0, up.stdout + up.stderr + running.compose("logs", "--no-color").stdout
        yield running
    finally:
        running.compose("down", "--volumes", "--remove-orphans", "--timeout", "20")


def _containers(docker_client: Any, stack: Stack) -> dict[str, Any]:
    found = docker_client.containers.list(all=True, filters={"label": f"com.docker.compose.project={stack.project}"})
    return {container.labels["com.docker.compose.service"]: container for container in found}


def test_replicas_are_healthy_non_root_and_read_only(docker_client: Any, stack: Stack) -> None:
    containers = _containers(docker_client, stack)
    for replica in REPLICAS:
        attrs = containers[replica].attrs
        assert attrs["State"]["Health"]["Status"] == "healthy"
        assert attrs["Config"]["User"] not in ("", "root", "0", "0:0")
        assert attrs["HostConfig"]["ReadonlyRootfs"] is True


def test_a_limit_holds_across_the_three_containers(stack: Stack) -> None:
    user = f"user-{uuid.uuid4().hex[:10]}"
    clients = [RateLimitClient(stack.grpc_target(replica), timeout_s=2.0) for replica in REPLICAS]
    try:
        codes = [
            clients[index % 3].should_rate_limit("demo", [[("user", user)]]).overall_code
            for index in range(3 * USER_LIMIT)
        ]
    finally:
        for client in clients:
            client.close()
    assert codes == ["OK"] * USER_LIMIT + ["OVER_LIMIT"] * (2 * USER_LIMIT)


def test_envoy_answers_200_then_429_with_ratelimit_headers(stack: Stack) -> None:
    url = f"http://{stack.address('ENVOY_PORT')}/"
    user = f"alice-{uuid.uuid4().hex[:10]}"
    answers = [http_get(url, {"x-user-id": user}) for _ in range(USER_LIMIT + 1)]
    assert [status for status, _, _ in answers] == [200] * USER_LIMIT + [429]
    assert answers[0][1]["X-RateLimit-Remaining"] == str(USER_LIMIT - 1)
    assert answers[-1][1]["X-RateLimit-Remaining"] == "0"


def test_prometheus_scrapes_the_three_replicas(stack: Stack) -> None:
    url = f"http://{stack.address('PROMETHEUS_PORT')}/api/v1/targets?state=active"

    def replicas_up() -> bool:
        status, _, body = http_get(url)
        targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        return {t["labels"].get("replica") for t in targets if t["health"] == "up"} >= set(REPLICAS)

    wait_until(replicas_up, 60, "Prometheus to scrape ratelimit-1..3")


def test_sigterm_drains_and_exits_zero(docker_client: Any, stack: Stack) -> None:
    started = time.monotonic()
    stopped = stack.compose("stop", "--timeout", "20", "ratelimit-3")
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - started < 20, "SIGTERM did not reach the server (exec-form ENTRYPOINT)"
    state = _containers(docker_client, stack)["ratelimit-3"].attrs["State"]
    assert state["ExitCode"] == 0
