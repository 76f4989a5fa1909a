"""The local cluster (scripts/cluster): Redis, three replicas, Prometheus and Envoy as processes.

One cluster for the module, on free ports and a temporary state directory. The limits are
compose/limits/demo.yaml: user=<id> 5 a minute, (route=demo, remote_address=<ip>) 60 a
minute, user=bot-* 2 a minute. Every test uses descriptor values of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from ratelimit.client import RateLimitClient
from tests.support.cluster import (
    SCRIPTS_DIR,
    LocalCluster,
    http_get,
    local_cluster,
    running_cluster,
    wait_until,
)
from tests.support.processes import free_port
from tests.support.replica import wait_until_serving

REPLICAS = ("ratelimit-1", "ratelimit-2", "ratelimit-3")
SERVICES = ("redis", *REPLICAS, "prometheus", "envoy")
USER_LIMIT = 5
ADDRESS_LIMIT = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state_dir = tmp_path_factory.mktemp("cluster")
    with running_cluster(state_dir, CLUSTER_SCRAPE_INTERVAL="1s") as running:
        yield running
    # `down` stopped everything it started: no process, no listener left behind.
    for variable, port in running.ports.items():
        assert _nothing_listens(port), f"{variable}={port} still has a listener after down"
    assert not list(state_dir.glob("*.pid"))


@pytest.fixture(scope="module")
def clients(cluster: LocalCluster) -> Iterator[dict[str, RateLimitClient]]:
    opened = {replica: RateLimitClient(cluster.grpc_target(replica), timeout_s=2.0) for replica in REPLICAS}
    yield opened
    for client in opened.values():
        client.close()


def _nothing_listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _process_column(cluster: LocalCluster) -> dict[str, str]:
    """`scripts/cluster status`: service -> "pid N" or "stopped"."""
    rows = [line.split() for line in cluster.run("status", check=False).stdout.splitlines()[1:]]
    return {row[0]: " ".join(row[1:3]) if row[1] == "pid" else row[1] for row in rows if row[1] in ("pid", "stopped")}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _ask_user(client: RateLimitClient, user: str) -> tuple[str, int]:
    result = client.should_rate_limit("demo", [[("user", user)]])
    return result.overall_code, result.statuses[0].limit_remaining


def test_up_reports_every_service_healthy(cluster: LocalCluster) -> None:
    status = cluster.run("status")
    assert all(process.startswith("pid ") for process in _process_column(cluster).values())
    assert set(_process_column(cluster)) == set(SERVICES)
    assert "FAILING" not in status.stdout
    assert "3/3 ratelimit targets up" in status.stdout
    assert "3/3 replicas healthy in Envoy" in status.stdout


def test_up_again_reuses_the_running_cluster(cluster: LocalCluster) -> None:
    pids = {service: cluster.pid(service) for service in REPLICAS}
    again = cluster.run("up", timeout_s=30)
    assert "already running" in again.stdout
    # Without the port variables too: a running cluster keeps the ports it was started on.
    unset = {name: value for name, value in cluster.env.items() if name not in cluster.ports}
    result = subprocess.run(
        [str(SCRIPTS_DIR / "cluster"), "up"], env=unset, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and "already running" in result.stdout, result.stderr
    assert {service: cluster.pid(service) for service in REPLICAS} == pids


def test_up_with_other_ports_refuses_while_running(cluster: LocalCluster) -> None:
    env = {**cluster.env, "ENVOY_PORT": str(free_port())}
    result = subprocess.run(
        [str(SCRIPTS_DIR / "cluster"), "up"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "other ports" in result.stderr


def test_a_limit_holds_across_replicas_round_robin(clients: dict[str, RateLimitClient]) -> None:
    user = _unique("user")
    answers = [_ask_user(clients[REPLICAS[i % 3]], user) for i in range(3 * USER_LIMIT)]
    codes = [code for code, _ in answers]
    assert codes == ["OK"] * USER_LIMIT + ["OVER_LIMIT"] * (2 * USER_LIMIT)
    assert [remaining for _, remaining in answers[:USER_LIMIT]] == list(range(USER_LIMIT - 1, -1, -1))


def test_concurrent_requests_over_replicas_admit_the_limit_once(clients: dict[str, RateLimitClient]) -> None:
    # The nested rule (route=demo -> remote_address): 60 a minute, whichever replica answers.
    address = _unique("198.51.100")
    descriptor = [("route", "demo"), ("remote_address", address)]

    def ask(index: int) -> str:
        return clients[REPLICAS[index % 3]].should_rate_limit("demo", [descriptor]).overall_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(ask, range(2 * ADDRESS_LIMIT)))
    assert codes.count("OK") == ADDRESS_LIMIT


def test_prometheus_scrapes_all_three_replicas(cluster: LocalCluster) -> None:
    up = cluster.prometheus_query('up{job="ratelimit"}')
    by_replica = {series["metric"]["replica"]: series for series in up}
    assert set(by_replica) == set(REPLICAS)
    for replica, series in by_replica.items():
        assert series["metric"]["instance"] == cluster.metrics_address(replica)
        assert series["value"][1] == "1", f"{replica} is down in Prometheus"


def test_a_hit_through_replica_2_shows_in_prometheus_under_its_instance(
    cluster: LocalCluster, clients: dict[str, RateLimitClient]
) -> None:
    # Only this test uses the bot-* rule, so the counter moves on ratelimit-2 alone.
    series = 'ratelimit_service_rate_limit_total_hits{domain="demo",key1="user_bot-*"}'

    def hits_by_instance() -> dict[str, float]:
        return {s["metric"]["instance"]: float(s["value"][1]) for s in cluster.prometheus_query(series)}

    before = wait_until(hits_by_instance, 10, "the bot-* series in Prometheus")
    instance = cluster.metrics_address("ratelimit-2")
    bot = _unique("bot")
    for _ in range(3):
        clients["ratelimit-2"].should_rate_limit("demo", [[("user", bot)]])
    after = wait_until(
        lambda: (now := hits_by_instance()).get(instance, 0) >= before.get(instance, 0) + 3 and now,
        15,
        f"3 more hits under instance {instance}",
    )
    assert after[instance] == before.get(instance, 0) + 3
    for replica in ("ratelimit-1", "ratelimit-3"):
        other = cluster.metrics_address(replica)
        assert after.get(other, 0) == before.get(other, 0)


def test_http_through_envoy_gets_200_then_429_with_ratelimit_headers(cluster: LocalCluster) -> None:
    user = _unique("alice")
    answers = [http_get(cluster.envoy_url, {"x-user-id": user}) for _ in range(USER_LIMIT + 1)]
    assert [status for status, _, _ in answers] == [200] * USER_LIMIT + [429]
    for index, (_, headers, _) in enumerate(answers):
        # DRAFT_VERSION_03: the tightest limit first, then each limit with its window.
        assert headers["X-RateLimit-Limit"].split(",")[0] == str(USER_LIMIT)
        assert f"{USER_LIMIT};w=60" in headers["X-RateLimit-Limit"]
        assert int(headers["X-RateLimit-Remaining"]) == max(USER_LIMIT - 1 - index, 0)
        # whole seconds rounded up: at most one unit plus one bucket (1.5 s), rounded up
        assert 0 < int(headers["X-RateLimit-Reset"]) <= 62
    assert answers[-1][1]["x-envoy-ratelimited"] == "true"
    assert answers[0][2] == "admitted by the rate limit service\n"


def test_healthcheck_script_tells_serving_from_unreachable(cluster: LocalCluster) -> None:
    script = [sys.executable, str(SCRIPTS_DIR / "healthcheck.py")]
    env = {**os.environ, "RATELIMIT_GRPC_PORT": str(cluster.ports["RATELIMIT_3_GRPC_PORT"])}
    # As the image runs it: no arguments, the port from RATELIMIT_GRPC_PORT.
    assert subprocess.run(script, env=env, capture_output=True, timeout=30, check=False).returncode == 0
    unreachable = [*script, "--target", f"127.0.0.1:{free_port()}", "--timeout", "0.5"]
    assert subprocess.run(unreachable, capture_output=True, timeout=30, check=False).returncode == 1


def test_a_killed_replica_leaves_the_others_answering_and_rejoins_with_its_counts(
    cluster: LocalCluster, clients: dict[str, RateLimitClient]
) -> None:
    user = _unique("user")
    assert _ask_user(clients["ratelimit-2"], user) == ("OK", 4)

    os.kill(cluster.pid("ratelimit-2"), signal.SIGKILL)
    wait_until(lambda: _process_column(cluster)["ratelimit-2"] == "stopped", 10, "ratelimit-2 to be gone")
    # Until Envoy's health checks notice, status says so whole, never cut mid-sentence.
    upstreams = next(line for line in cluster.run("status", check=False).stdout.splitlines() if "upstreams" in line)
    assert upstreams.split(None, 2)[2] in (
        "ok: 2/3 replicas healthy in Envoy",
        "FAILING: 3/3 replicas healthy in Envoy: ratelimit-2 is stopped but still healthy in Envoy",
    )
    with pytest.raises(grpc.RpcError) as refused:
        clients["ratelimit-2"].should_rate_limit("demo", [[("user", user)]], timeout=1.0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # The two others carry on with the same counter.
    assert _ask_user(clients["ratelimit-1"], user) == ("OK", 3)
    assert _ask_user(clients["ratelimit-3"], user) == ("OK", 2)

    # Envoy stops sending to the dead replica: every request is answered, none fails open.
    wait_until(
        lambda: "2/3 replicas healthy in Envoy" in cluster.run("status", check=False).stdout,
        10,
        "Envoy to mark ratelimit-2 unhealthy",
    )
    envoy_user = _unique("carol")
    for expected_remaining in (4, 3, 2):
        status, headers, _ = http_get(cluster.envoy_url, {"x-user-id": envoy_user})
        assert status == 200
        assert headers["X-RateLimit-Remaining"] == str(expected_remaining)

    # Restarted, it serves the counts that live in Redis: nothing was lost.
    started = time.monotonic()
    restarted = cluster.run("up", "ratelimit-2", timeout_s=60)
    assert "started: ratelimit-2" in restarted.stdout, restarted.stdout
    assert time.monotonic() - started < 30
    # This process's channels to ratelimit-2 share one connection, which may still be backing
    # off after the refusals above: wait until it is connected again before asking.
    wait_until_serving(cluster.grpc_target("ratelimit-2"), timeout_s=15)
    assert _ask_user(clients["ratelimit-2"], user) == ("OK", 1)
    assert _ask_user(clients["ratelimit-2"], user) == ("OK", 0)
    assert _ask_user(clients["ratelimit-2"], user)[0] == "OVER_LIMIT"
    assert cluster.run("status").returncode == 0


def test_up_naming_a_running_service_restarts_it_and_its_counts_stay(
    cluster: LocalCluster, clients: dict[str, RateLimitClient]
) -> None:
    user = _unique("user")
    assert _ask_user(clients["ratelimit-2"], user) == ("OK", 4)
    pids = {service: cluster.pid(service) for service in SERVICES}
    restarted = cluster.run("up", "ratelimit-2", timeout_s=60)
    assert restarted.stdout.splitlines()[0] == "restarted: ratelimit-2"
    assert "already running" not in restarted.stdout
    assert cluster.pid("ratelimit-2") != pids["ratelimit-2"]
    assert {s: cluster.pid(s) for s in SERVICES if s != "ratelimit-2"} == {
        s: pid for s, pid in pids.items() if s != "ratelimit-2"
    }
    wait_until_serving(cluster.grpc_target("ratelimit-2"), timeout_s=15)
    assert _ask_user(clients["ratelimit-2"], user) == ("OK", 3)
    # Healthy everywhere once Prometheus has scraped the new process (every 5 s).
    wait_until(lambda: cluster.run("status", check=False).returncode == 0, 20, "status ok after the restart")


def test_loadgen_drives_the_cluster_where_its_variables_moved_it(cluster: LocalCluster, tmp_path: Path) -> None:
    summary_path = tmp_path / "loadgen.json"
    done = subprocess.run(
        [
            str(SCRIPTS_DIR / "loadgen"), "--rate", "15", "--duration", "2", "--domain", "demo",
            "--descriptor", f"user={_unique('loadgen')}", "--plot", str(tmp_path / "loadgen.png"),
            "--json", str(summary_path),
        ],
        env=cluster.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    assert [row["target"] for row in summary["replicas"]] == [cluster.grpc_target(r) for r in REPLICAS]
    assert all(row["sent"] == 10 and row["errors"] == 0 for row in summary["replicas"])
    assert summary["admitted"] == USER_LIMIT
    assert "UserWarning" not in done.stderr


def test_a_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    # Envoy exits at once: up fails, and Redis, the replicas and Prometheus are stopped again.
    broken = local_cluster(tmp_path / "state", CLUSTER_ENVOY_BIN="/bin/false")
    result = broken.run("up", check=False, timeout_s=90)
    assert result.returncode == 1
    assert "envoy exited" in result.stderr
    assert not list((tmp_path / "state").glob("*.pid"))
    for variable, port in broken.ports.items():
        assert _nothing_listens(port), f"{variable}={port} still has a listener after a failed up"


def test_up_refuses_busy_ports_and_names_the_variable(tmp_path: Path) -> None:
    blocked = local_cluster(tmp_path / "state")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", blocked.ports["PROMETHEUS_PORT"]))
        listener.listen()
        result = blocked.run("up", check=False, timeout_s=60)
    assert result.returncode == 1
    assert f"PROMETHEUS_PORT={blocked.ports['PROMETHEUS_PORT']}" in result.stderr
    assert not list((tmp_path / "state").glob("*.pid"))
