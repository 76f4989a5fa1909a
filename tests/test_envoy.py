"""Envoy's ext rate limit filter, a real Envoy, against the real service: HTTP in, 200 or 429 out."""

from __future__ import annotations

import contextlib
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.envoy import EnvoyProcess, front_proxy_config, running_envoy, running_upstream
from tests.support.processes import free_port
from tests.support.readme import fenced, readme_block
from tests.support.replica import ReplicaProcess, running_replica

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ROOT / "tests" / "data" / "envoy_limits.yaml"
DEMO_LIMITS = ROOT / "compose" / "limits"


def header(name: str, key: str) -> dict[str, Any]:
    return {"request_headers": {"header_name": name, "descriptor_key": key}}


def generic(value: str, key: str | None = None) -> dict[str, Any]:
    return {"generic_key": {"descriptor_value": value, **({"descriptor_key": key} if key else {})}}


def limited(prefix: str, *actions: dict[str, Any]) -> dict[str, Any]:
    return {"prefix": prefix, "rate_limits": [{"actions": list(actions)}]}


BETA_HEADER = {
    "header_value_match": {
        "descriptor_value": "beta",
        "headers": [{"name": "x-beta", "string_match": {"exact": "yes"}}],
    }
}
ROUTES = [
    limited("/user", header("x-user-id", "user")),
    limited("/ip", {"remote_address": {}}),
    limited("/checkout", generic("checkout")),
    limited("/beta", BETA_HEADER),
    limited("/client", header("x-client", "client")),
    limited("/shadow", generic("x", "shadowed")),
    limited("/global", generic("all", "global")),
]
VHOST_LIMITS = [{"actions": [generic("api", "vhost")]}]


@contextlib.contextmanager
def edge(
    tmp_path: Path,
    replicas: list[ReplicaProcess],
    *,
    failure_mode_deny: bool = False,
    rls_ports: list[int] | None = None,
) -> Iterator[EnvoyProcess]:
    with running_upstream() as upstream_port:
        port, admin_port = free_port(), free_port()
        ports = rls_ports if rls_ports is not None else [r.grpc_port for r in replicas]
        config = front_proxy_config(
            port=port, admin_port=admin_port, upstream_port=upstream_port, rls_ports=ports, domain="edge",
            routes=ROUTES, virtual_host_limits=VHOST_LIMITS, failure_mode_deny=failure_mode_deny,
        )  # fmt: skip
        with running_envoy(config, tmp_path, port=port, admin_port=admin_port) as envoy:
            if replicas:
                envoy.wait_for_healthy_hosts("ratelimit", len(replicas))
            yield envoy


def statuses(envoy: EnvoyProcess, path: str, count: int, headers: dict[str, str] | None = None) -> list[int]:
    return [envoy.get(path, headers)[0] for _ in range(count)]


def test_route_and_virtual_host_actions_limit_the_right_requests(tmp_path: Path, redis_url: str) -> None:
    with running_replica(tmp_path, [LIMITS], redis_url=redis_url) as replica, edge(tmp_path, [replica]) as envoy:
        # request_headers: per user, from a header; another user has a budget of their own
        assert statuses(envoy, "/user", 5, {"x-user-id": "alice"}) == [200, 200, 200, 429, 429]
        assert statuses(envoy, "/user", 1, {"x-user-id": "bob"}) == [200]
        assert statuses(envoy, "/user", 3) == [200, 200, 200]  # no header: no descriptor, no limit
        # remote_address: per client address
        assert statuses(envoy, "/ip", 5) == [200, 200, 200, 200, 429]
        # generic_key
        assert statuses(envoy, "/checkout", 3) == [200, 200, 429]
        # header_value_match: only requests whose header matches are limited
        assert statuses(envoy, "/beta", 2, {"x-beta": "yes"}) == [200, 429]
        assert statuses(envoy, "/beta", 2, {"x-beta": "no"}) == [200, 200]
        # virtual host rate_limits apply to its routes
        assert statuses(envoy, "/anything", 7, {"host": "api.test"}) == [200] * 6 + [429]


def test_x_ratelimit_headers_carry_limit_exact_remaining_and_a_reset_that_works(tmp_path: Path, redis_url: str) -> None:
    with running_replica(tmp_path, [LIMITS], redis_url=redis_url) as replica, edge(tmp_path, [replica]) as envoy:
        for attempt in range(3):
            answers = [envoy.get("/client", {"x-client": f"c{attempt}"}) for _ in range(3)]
            if [status for status, _ in answers] == [200, 200, 429]:
                break  # else a one-second window passed mid-way; try a fresh client
        else:
            pytest.fail(f"never saw 200, 200, 429: {[status for status, _ in answers]}")
        limits = [headers["x-ratelimit-limit"] for _, headers in answers]
        assert all(limit.startswith("2, 2;w=1") for limit in limits)
        assert [headers["x-ratelimit-remaining"] for _, headers in answers] == ["1", "0", "0"]
        reset = int(answers[-1][1]["x-ratelimit-reset"])
        assert 1 <= reset <= 2
        time.sleep(reset)
        status, headers = envoy.get("/client", {"x-client": f"c{attempt}"})
        # room for this request; whether the other hit has left too depends on its bucket
        assert status == 200 and headers["x-ratelimit-remaining"] in ("0", "1")


@pytest.mark.parametrize(("failure_mode_deny", "expected"), [(False, 200), (True, 500)])
def test_envoy_failure_mode_when_the_service_is_down(tmp_path: Path, failure_mode_deny: bool, expected: int) -> None:
    with edge(tmp_path, [], failure_mode_deny=failure_mode_deny, rls_ports=[free_port()]) as envoy:
        assert statuses(envoy, "/checkout", 4) == [expected] * 4


@pytest.mark.parametrize(
    ("mode", "failure_mode_deny", "expected"),
    [("unavailable", False, 200), ("unavailable", True, 500), ("allow", True, 200), ("deny", False, 429)],
)
def test_service_failure_modes_with_redis_down_through_envoy(
    tmp_path: Path, mode: str, failure_mode_deny: bool, expected: int
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    with (
        running_replica(tmp_path, [LIMITS], redis_url=dead_redis, extra_args=["--on-backend-error", mode]) as replica,
        edge(tmp_path, [replica], failure_mode_deny=failure_mode_deny) as envoy,
    ):
        assert statuses(envoy, "/checkout", 3) == [expected] * 3
        assert statuses(envoy, "/nolimit", 1) == [200]  # no descriptor: Envoy does not ask


def test_shadow_mode_rules_never_answer_429_but_are_counted(tmp_path: Path, redis_url: str) -> None:
    with running_replica(tmp_path, [LIMITS], redis_url=redis_url) as replica, edge(tmp_path, [replica]) as envoy:
        assert statuses(envoy, "/shadow", 5) == [200] * 5
        body = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()
    labels = 'domain="edge",key1="shadowed",key2=""'
    assert re.search(rf"ratelimit_service_rate_limit_shadow_mode\{{{labels}\}} 4\.0", body)
    assert re.search(rf"ratelimit_service_rate_limit_total_hits\{{{labels}\}} 5\.0", body)


def test_three_replicas_keep_the_global_limit_when_one_is_killed_mid_test(tmp_path: Path, redis_url: str) -> None:
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(running_replica(tmp_path, [LIMITS], redis_url=redis_url)) for _ in range(3)]
        envoy = stack.enter_context(edge(tmp_path, replicas, failure_mode_deny=True))
        before = statuses(envoy, "/global", 4)
        replicas[1].kill()
        after = statuses(envoy, "/global", 26)
        envoy.wait_for_healthy_hosts("ratelimit", 2)
        settled = statuses(envoy, "/global", 5)
    answers = before + after + settled
    print(
        f"\nreplica killed mid-test: {answers.count(200)} x 200, {answers.count(429)} x 429, {answers.count(500)} x 500"
    )
    assert before == [200] * 4
    assert answers.count(200) == 10  # one global limit, never 3x, never more after the kill
    assert set(answers) <= {200, 429, 500}
    # No call is in flight at the kill (they are sequential): only the first call Envoy routes
    # to the dead replica fails, within the first three (round robin), and ejects it (outlier
    # detection at the first refused connection). None if a health check got there first.
    assert answers.count(500) <= 1 and 500 not in after[3:]
    assert settled == [429] * 5


def test_a_replica_stopped_with_sigterm_and_a_shutdown_delay_fails_no_request_through_envoy(
    tmp_path: Path, redis_url: str
) -> None:
    # Envoy's checks here: every 0.5 s, out after one failure; the delay outlasts that.
    delay = ["--shutdown-delay-s", "1.5"]
    with contextlib.ExitStack() as stack:
        replicas = [
            stack.enter_context(running_replica(tmp_path, [LIMITS], redis_url=redis_url, extra_args=delay))
            for _ in range(3)
        ]
        envoy = stack.enter_context(edge(tmp_path, replicas, failure_mode_deny=True))
        answers: list[int] = []
        replicas[1].process.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        while replicas[1].process.poll() is None and time.monotonic() - sigterm_at < 10:
            answers.append(envoy.get("/user", {"x-user-id": f"u{len(answers)}"})[0])
        exit_code = replicas[1].process.wait(timeout=15)
        answers += [envoy.get("/user", {"x-user-id": f"after-{n}"})[0] for n in range(5)]
    print(f"\nSIGTERM with a 1.5 s shutdown delay: {len(answers)} requests, {answers.count(500)} x 500")
    assert exit_code == 0
    assert len(answers) >= 100
    assert answers == [200] * len(answers)  # failure_mode_deny: a failed RLS call would be a 500


def test_the_readme_envoy_example_runs_as_written(tmp_path: Path) -> None:
    (example,) = fenced(readme_block("envoy-example"), "yaml")
    with running_upstream() as upstream_port:
        port, admin_port = free_port(), free_port()
        with running_replica(tmp_path, [DEMO_LIMITS]) as replica:
            config = (
                example.replace("port_value: 10000", f"port_value: {port}")
                .replace("port_value: 9901", f"port_value: {admin_port}")
                .replace("port_value: 8080", f"port_value: {upstream_port}")
                .replace("port_value: 8081", f"port_value: {replica.grpc_port}")
                .replace("address: 0.0.0.0", "address: 127.0.0.1")
            )
            with running_envoy(config, tmp_path, port=port, admin_port=admin_port) as envoy:
                envoy.wait_for_healthy_hosts("ratelimit", 1)
                answers = [envoy.get("/", {"x-user-id": "alice"}) for _ in range(6)]
    assert [status for status, _ in answers] == [200] * 5 + [429]
    assert [headers["x-ratelimit-remaining"] for _, headers in answers] == ["4", "3", "2", "1", "0", "0"]
    assert answers[0][1]["x-ratelimit-limit"].startswith("5, 5;w=60")
