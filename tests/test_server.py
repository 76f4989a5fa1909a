"""The service as a real process: gRPC answers, status codes, health, reflection, metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimit.client import RateLimitClient, build_request
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from tests.faults import probes
from tests.support.replica import PROJECT_ROOT, running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_says(target: str, service: str, status: int) -> Callable[[], bool]:
    """A condition to wait on: the health service reports `status` for `service`."""
    return lambda: probes.health(target, service) == status


def test_check_command_prints_ok_ok_ok_over_limit(tmp_path: Path, redis_url: str) -> None:
    with running_replica(tmp_path, [SERVICE_YAML], redis_url=redis_url) as replica:
        outputs = []
        for _ in range(4):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ratelimit",
                    "check",
                    "--target",
                    replica.target,
                    "--domain",
                    "svc",
                    "--descriptor",
                    "user=alice",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=PROJECT_ROOT,
            )
            assert done.stderr == ""
            outputs.append((done.returncode, done.stdout))
    # The exit status says the answer: 0 OK, 1 OVER_LIMIT (2 is for errors).
    assert [(code, out.splitlines()[-1]) for code, out in outputs] == [(0, "overall: OK")] * 3 + [
        (1, "overall: OVER_LIMIT")
    ]
    assert "user=alice  OVER_LIMIT  3/MINUTE  0" in outputs[-1][1]


def test_grpc_status_codes_for_bad_requests(tmp_path: Path, redis_url: str) -> None:
    with (
        running_replica(tmp_path, [SERVICE_YAML], redis_url=redis_url) as replica,
        grpc.insecure_channel(replica.target) as channel,
    ):
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        with pytest.raises(grpc.RpcError) as empty_domain:
            stub.ShouldRateLimit(build_request("", [[("user", "x")]]), timeout=5)
        assert empty_domain.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "domain must not be empty" in empty_domain.value.details()
        with pytest.raises(grpc.RpcError) as no_descriptors:
            stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="svc"), timeout=5)
        assert no_descriptors.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        huge = build_request("svc", [[("user", "x" * (2 * 1024 * 1024))]])
        with pytest.raises(grpc.RpcError) as oversized:
            stub.ShouldRateLimit(huge, timeout=5)
        assert oversized.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # and the replica still answers normally afterwards
        ok = stub.ShouldRateLimit(build_request("svc", [[("user", "y")]]), timeout=5)
        assert ok.overall_code == rls_pb2.RateLimitResponse.OK
    assert "Traceback" not in replica.log()


def test_redis_down_answers_unavailable_by_default_and_allow_or_deny_when_asked(tmp_path: Path) -> None:
    from tests.support.processes import free_port

    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    request = build_request("svc", [[("user", "x")]])
    with (
        running_replica(tmp_path, [SERVICE_YAML], redis_url=dead_redis) as replica,
        grpc.insecure_channel(replica.target) as channel,
    ):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 1.0
    for mode, code in (("allow", rls_pb2.RateLimitResponse.OK), ("deny", rls_pb2.RateLimitResponse.OVER_LIMIT)):
        with (
            running_replica(
                tmp_path, [SERVICE_YAML], redis_url=dead_redis, extra_args=["--on-backend-error", mode]
            ) as replica,
            grpc.insecure_channel(replica.target) as channel,
        ):
            reply = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, timeout=5)
            assert reply.overall_code == code
        assert "Traceback" not in replica.log()


def test_health_reports_serving_overall_and_per_service(tmp_path: Path) -> None:
    with running_replica(tmp_path, [SERVICE_YAML]) as replica, grpc.insecure_channel(replica.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ratelimit.v3.RateLimitService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_exporter_serves_rule_counters(tmp_path: Path) -> None:
    with running_replica(tmp_path, [SERVICE_YAML]) as replica:
        with RateLimitClient(replica.target) as client:
            for _ in range(4):
                client.should_rate_limit("svc", [[("user", "m")]])
        body = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()
    assert 'ratelimit_service_rate_limit_total_hits{domain="svc",key1="user",key2=""} 4.0' in body
    assert 'ratelimit_service_rate_limit_over_limit{domain="svc",key1="user",key2=""} 1.0' in body
    assert 'ratelimit_service_rate_limit_within_limit{domain="svc",key1="user",key2=""} 3.0' in body
    assert 'ratelimit_service_rate_limit_total_hits{domain="svc",key1="roomy",key2=""} 0.0' in body
    assert "ratelimit_rpc_duration_seconds_bucket" in body
    assert 'ratelimit_build_info{version="' in body
    assert "ratelimit_config_load_success_total 1.0" in body


def held_script_call(admin: Any) -> tuple[bool, int]:
    """Whether Redis (under CLIENT PAUSE WRITE) holds a connection on a script call, and the
    bytes of the calls queued behind it in that connection's query buffer."""
    for client in admin.client_list():
        if "b" in client["flags"] and client["cmd"] == "evalsha":
            return True, int(client["qbuf"])
    return False, 0


def test_sigterm_drains_in_flight_calls_then_exits_zero(tmp_path: Path, redis_url: str) -> None:
    """Calls held in flight by a paused Redis still complete after SIGTERM."""
    import redis

    callers = 8
    # Unbatched: each call is written to Redis at once, so Redis can show all of them held.
    with running_replica(
        tmp_path,
        [SERVICE_YAML],
        redis_url=redis_url,
        extra_args=["--redis-timeout-ms", "5000", "--redis-batching", "false"],
    ) as replica:
        results: list[str] = []
        failures: list[str] = []

        def caller(name: str) -> None:
            with RateLimitClient(replica.target, timeout_s=10) as client:
                try:
                    results.append(client.should_rate_limit("svc", [[("roomy", name)]]).overall_code)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        caller("warm-up")  # the script is loaded and a connection is open
        admin = redis.Redis.from_url(redis_url, decode_responses=True)
        admin.execute_command("CLIENT", "PAUSE", "2000", "WRITE")  # scripts wait; CLIENT LIST answers
        threads = [threading.Thread(target=caller, args=(f"c{i}",)) for i in range(callers)]
        # One call held, then one queued behind it: its size in the query buffer (every call
        # here is as long: a key is a fixed-size digest). Then all of them.
        threads[0].start()
        assert probes.wait_until(lambda: held_script_call(admin)[0], 1.0) is not None, admin.client_list()
        threads[1].start()
        assert probes.wait_until(lambda: held_script_call(admin)[1] > 0, 1.0) is not None, admin.client_list()
        call_bytes = held_script_call(admin)[1]
        for thread in threads[2:]:
            thread.start()
        # Every call is now waiting on Redis inside the server.
        all_held = probes.wait_until(lambda: held_script_call(admin)[1] == (callers - 1) * call_bytes, 1.0)
        assert all_held is not None, admin.client_list()
        started = time.monotonic()
        exit_code = replica.terminate()
        for thread in threads:
            thread.join(timeout=30)
        admin.close()
    assert exit_code == 0
    assert failures == []
    assert results == ["OK"] * (callers + 1)
    assert time.monotonic() - started >= 0.2  # it waited for the calls, not cut them
    assert "draining in-flight calls" in replica.log()
    assert "Traceback" not in replica.log()


def test_sigterm_with_a_shutdown_delay_answers_calls_while_health_says_not_serving(
    tmp_path: Path, redis_url: str
) -> None:
    delay_s = 1.5
    with (
        running_replica(
            tmp_path, [SERVICE_YAML], redis_url=redis_url, extra_args=["--shutdown-delay-s", str(delay_s)]
        ) as replica,
        RateLimitClient(replica.target, timeout_s=2) as client,
    ):
        assert probes.health(replica.target, "") == health_pb2.HealthCheckResponse.SERVING
        sigterm_at = time.monotonic()
        replica.process.send_signal(signal.SIGTERM)
        assert probes.wait_until(health_says(replica.target, "", NOT_SERVING), 1.0) is not None
        answered = []
        while time.monotonic() - sigterm_at < delay_s - 0.3:  # load balancers still send calls
            answered.append(client.should_rate_limit("svc", [[("roomy", "late")]]).overall_code)
            time.sleep(0.05)
        exit_code = replica.process.wait(timeout=15)
        exited_after_s = time.monotonic() - sigterm_at
    assert exit_code == 0
    assert len(answered) >= 10 and set(answered) == {"OK"}
    assert delay_s <= exited_after_s < delay_s + 3


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]], ids=["sigint", "2xsigterm"])
def test_sigint_or_a_second_sigterm_skips_the_shutdown_delay(
    tmp_path: Path, redis_url: str, signals: list[signal.Signals]
) -> None:
    with running_replica(
        tmp_path, [SERVICE_YAML], redis_url=redis_url, extra_args=["--shutdown-delay-s", "60"]
    ) as replica:
        started = time.monotonic()
        for number, signum in enumerate(signals):
            if number:  # the first signal was handled (health says so) before the next is sent
                assert probes.wait_until(health_says(replica.target, "", NOT_SERVING), 2.0) is not None
            replica.process.send_signal(signum)
        exit_code = replica.process.wait(timeout=15)
    assert exit_code == 0
    assert time.monotonic() - started < 5


def test_bad_config_at_start_exits_with_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ratelimit",
            "serve",
            "--config",
            str(bad),
            "--backend",
            "memory",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 2
    assert "bad.yaml" in done.stderr and "fortnight" in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_config_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: d\ndescriptors:\n  - key: k\n    ratelimit: {unit: second}\n")
    ok = subprocess.run(
        [sys.executable, "-m", "ratelimit", "validate-config", str(SERVICE_YAML)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT_ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run(
        [sys.executable, "-m", "ratelimit", "validate-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT_ROOT,
    )
    assert failed.returncode == 1
    assert f"{bad}: line 4: config error, unknown key 'ratelimit'" in failed.stderr


def _proc_cpu_ticks(pid: int) -> int:
    """utime + stime, in clock ticks (exact, where seconds are floats summed in another order)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _ticks(seconds: float) -> int:
    return round(seconds * os.sysconf("SC_CLK_TCK"))


def _proc_rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sample(body: str, name: str) -> float:
    import re

    found = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert found is not None, f"{name} not exported"
    return float(found.group(1))


def test_a_replica_exports_its_process_cpu_and_memory(tmp_path: Path, redis_url: str) -> None:
    with running_replica(tmp_path, [SERVICE_YAML], redis_url=redis_url) as replica:
        pid = replica.process.pid
        cpu_before, rss = _proc_cpu_ticks(pid), _proc_rss_bytes(pid)
        body = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()
        cpu_after = _proc_cpu_ticks(pid)
        assert cpu_before <= _ticks(_sample(body, "process_cpu_seconds_total")) <= cpu_after
        assert 0.9 * rss <= _sample(body, "process_resident_memory_bytes") <= 1.1 * rss


def test_workers_share_the_port_and_metrics_report_their_sum(tmp_path: Path, redis_url: str) -> None:
    import re

    with running_replica(tmp_path, [SERVICE_YAML], redis_url=redis_url, extra_args=["--workers", "2"]) as replica:
        children = subprocess.run(
            ["pgrep", "-P", str(replica.process.pid)], capture_output=True, text=True, timeout=10
        ).stdout.split()
        assert len(children) == 2
        calls = 0
        for channel_number in range(8):  # new connections: the kernel spreads them over workers
            with RateLimitClient(replica.target) as client:
                for _ in range(5):
                    assert client.should_rate_limit("svc", [[("roomy", f"w{channel_number}")]]).overall_code == "OK"
                    calls += 1
        pattern = r'ratelimit_service_rate_limit_total_hits\{domain="svc",key1="roomy",key2=""\} (\S+)'

        def scrape() -> str:
            url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
            return str(urllib.request.urlopen(url, timeout=5).read().decode())

        def summed() -> bool:  # the workers publish their counts for the sum a moment later
            total = re.search(pattern, scrape())
            return total is not None and float(total.group(1)) == calls

        assert probes.wait_until(summed, 2.0) is not None, scrape()
        body = scrape()
        served = re.findall(r'ratelimit_rpc_duration_seconds_count\{code="OK"\} (\S+)', body)
        assert sum(float(v) for v in served) == calls
        # CPU and memory are the node's: parent and workers, as /proc tells them.
        node = [replica.process.pid, *map(int, children)]
        cpu_before = sum(_proc_cpu_ticks(pid) for pid in node)
        rss = [_proc_rss_bytes(pid) for pid in node]
        body = scrape()
        cpu_after = sum(_proc_cpu_ticks(pid) for pid in node)
        assert cpu_before <= _ticks(_sample(body, "process_cpu_seconds_total")) <= cpu_after
        assert 0.9 * sum(rss) <= _sample(body, "process_resident_memory_bytes") <= 1.1 * sum(rss)
        assert sum(rss[1:]) > rss[0]  # the workers, not the parent alone, hold the memory
        exit_code = replica.terminate()
    assert exit_code == 0
    assert "Traceback" not in replica.log()


def test_health_reports_backend_and_config_state_without_failing_the_rls_service(tmp_path: Path) -> None:
    from tests.support.processes import free_port

    limits = tmp_path / "limits.yaml"
    limits.write_text(SERVICE_YAML.read_text())
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    args = ["--on-backend-error", "allow", "--config-poll-s", "0.2", "--redis-timeout-ms", "50"]
    with (
        running_replica(tmp_path, [limits], redis_url=dead_redis, extra_args=args) as replica,
        grpc.insecure_channel(replica.target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        with RateLimitClient(replica.target) as client:
            for _ in range(6):  # enough consecutive failures to open the breaker
                assert client.should_rate_limit("svc", [[("user", "h")]]).overall_code == "OK"
        assert probes.wait_until(health_says(replica.target, "ratelimit.Backend", NOT_SERVING), 2.0) is not None
        assert status("envoy.service.ratelimit.v3.RateLimitService") == health_pb2.HealthCheckResponse.SERVING
        assert status("ratelimit.Config") == health_pb2.HealthCheckResponse.SERVING
        limits.write_text("domain: svc\ndescriptors: [{key: k, ratelimit: {}}]\n")
        # The files are polled every 0.2 s.
        assert probes.wait_until(health_says(replica.target, "ratelimit.Config", NOT_SERVING), 3.0) is not None
        body = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()
    assert "ratelimit_backend_circuit_open 1.0" in body
    assert 'ratelimit_backend_errors_total{kind="circuit_open"}' in body
    assert "ratelimit_config_healthy 0.0" in body


def test_a_taken_grpc_port_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    with running_replica(tmp_path, [SERVICE_YAML]) as replica:
        done = subprocess.run(
            [sys.executable, "-m", "ratelimit", "serve", "--config", str(SERVICE_YAML), "--backend", "memory",
             "--grpc-host", "127.0.0.1", "--grpc-port", str(replica.grpc_port), "--metrics-port", "0"],
            capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT,
        )  # fmt: skip
    assert done.returncode == 1
    assert (
        f"ratelimit: cannot bind the gRPC port 127.0.0.1:{replica.grpc_port} (in use?): "
        "choose another with --grpc-port (RATELIMIT_GRPC_PORT)"
    ) in done.stderr.splitlines()
    assert "Traceback" not in done.stderr
