"""README promises that had no test of their own: the near-limit metric, the failure-mode
answers metric, and Redis TLS with client certificates. Expected figures are worked out by
hand from the README's words (and envoyproxy/ratelimit's), not taken from the code.

(The default bind addresses are checked in tests/faults/test_hostile_clients.py, attack 11.)
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.request
from pathlib import Path
from typing import Sequence

import grpc
import pytest
from prometheus_client import CollectorRegistry

from ratelimit import service as service_module
from ratelimit.client import RateLimitClient
from ratelimit.config import load_config
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit.limiter import Backend, BackendError, CounterRequest, Decision
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.metrics import Metrics
from ratelimit.service import BackendUnavailable, Code, DescriptorRequest, FailureMode, RateLimitService, ServiceOptions
from tests.support.certs import make_ca
from tests.support.processes import free_port, running_redis
from tests.support.replica import running_replica

LIMITS = """\
domain: promises
descriptors:
  - key: ten
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: three
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: hourly
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: minutely
    rate_limit: {unit: minute, requests_per_unit: 10}
"""
SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"


class Harness:
    def __init__(self, tmp_path: Path, backend: Backend, options: ServiceOptions = ServiceOptions()) -> None:
        (tmp_path / "limits.yaml").write_text(LIMITS)
        config = load_config([tmp_path / "limits.yaml"])
        self.registry = CollectorRegistry()
        self.service = RateLimitService(lambda: config, backend, Metrics(self.registry), options)

    def ask(self, key: str, hits: int = 1) -> Code:
        request = [DescriptorRequest(entries=((key, "v"),))]
        return asyncio.run(self.service.should_rate_limit("promises", request, hits)).overall_code

    def rule(self, name: str, key: str) -> float | None:
        labels = {"domain": "promises", "key1": key, "key2": ""}
        return self.registry.get_sample_value(f"ratelimit_service_rate_limit_{name}", labels)


@pytest.mark.parametrize(
    ("key", "hits", "near", "within", "over"),
    [
        # Limit 10: 80% is 8, so of ten single hits the 9th and 10th are near; the 11th is over.
        ("ten", [1] * 11, 2, 10, 1),
        # 3 + 3 + 3: only the 9th hit lies above 8; then one more (the 10th) is near too.
        ("ten", [3, 3, 3, 1], 2, 10, 0),
        # 7 + 3: hits 9 and 10 of the second request are near, the 8th is not.
        ("ten", [7, 3], 2, 10, 0),
        # Limit 3: 80% is 2.4, floored to 2, so the 3rd hit is near.
        ("three", [1, 1, 1], 1, 3, 0),
    ],
)
def test_near_limit_counts_the_admitted_hits_above_80_percent_of_the_limit(
    tmp_path: Path, key: str, hits: list[int], near: int, within: int, over: int
) -> None:
    harness = Harness(tmp_path, MemoryBackend())
    for addend in hits:
        harness.ask(key, addend)
    assert harness.rule("near_limit", key) == near
    assert harness.rule("within_limit", key) == within
    assert harness.rule("over_limit", key) == over


class FailingBackend(Backend):
    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        raise BackendError("connection", "Redis went away")

    async def ping(self) -> None:
        raise BackendError("connection", "Redis went away")


@pytest.mark.parametrize(("mode", "answer"), [(FailureMode.ALLOW, Code.OK), (FailureMode.DENY, Code.OVER_LIMIT)])
def test_backend_failure_answers_are_counted_by_mode(tmp_path: Path, mode: FailureMode, answer: Code) -> None:
    harness = Harness(tmp_path, FailingBackend(), ServiceOptions(failure_mode=mode))
    assert [harness.ask("ten") for _ in range(3)] == [answer] * 3
    # A request no limit applies to never asks the backend: no failure answer.
    unknown = asyncio.run(harness.service.should_rate_limit("elsewhere", [DescriptorRequest((("k", "v"),))]))
    assert unknown.overall_code is Code.OK
    counted = harness.registry.get_sample_value("ratelimit_backend_failure_answers_total", {"mode": mode.value})
    assert counted == 3
    errors = harness.registry.get_sample_value("ratelimit_backend_errors_total", {"kind": "connection"})
    assert errors == 3


def test_unavailable_is_not_a_failure_mode_answer(tmp_path: Path) -> None:
    """UNAVAILABLE leaves the answer to Envoy (failure_mode_deny): the service answers nothing."""
    harness = Harness(tmp_path, FailingBackend(), ServiceOptions(failure_mode=FailureMode.UNAVAILABLE))
    with pytest.raises(BackendUnavailable):
        harness.ask("ten")
    for mode in FailureMode:
        assert not harness.registry.get_sample_value("ratelimit_backend_failure_answers_total", {"mode": mode.value})


def test_redis_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """--redis-cert-file and --redis-key-file: a Redis that requires client certificates
    (tls-auth-clients yes) decides with one, and refuses the replica without it."""
    pki = make_ca(tmp_path / "pki")
    server_cert, server_key = pki.issue(tmp_path / "pki", "redis", server=True)
    client_cert, client_key = pki.issue(tmp_path / "pki", "limiter", server=False)
    tls_port = free_port()
    redis_args = [
        "--port", "0", "--tls-port", str(tls_port),
        "--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key),
        "--tls-ca-cert-file", str(pki.ca_cert), "--tls-auth-clients", "yes",
    ]  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0"
    ca = ["--redis-ca-file", str(pki.ca_cert)]
    with running_redis(tls_port, redis_args):
        with_certificate = [*ca, "--redis-cert-file", str(client_cert), "--redis-key-file", str(client_key)]
        with running_replica(tmp_path, [SERVICE_YAML], redis_url=url, extra_args=with_certificate) as replica:
            with RateLimitClient(replica.target) as client:
                codes = [client.should_rate_limit("svc", [[("user", "mtls")]]).overall_code for _ in range(4)]
            assert codes == ["OK", "OK", "OK", "OVER_LIMIT"]

        with running_replica(tmp_path, [SERVICE_YAML], redis_url=url, extra_args=ca) as replica:
            with RateLimitClient(replica.target) as client, pytest.raises(grpc.RpcError) as refused:
                client.should_rate_limit("svc", [[("user", "mtls")]])
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            body = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read()
            assert b'ratelimit_backend_errors_total{kind="connection"}' in body


class SteppedClock:
    """Stands in for the service's `time` module: monotonic() returns what the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


def test_an_outage_is_logged_about_once_a_second_with_the_failures_in_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """README: "The log gets about one line a second, not one per call"; each line says how
    many failures it stands for."""
    clock = SteppedClock()
    monkeypatch.setattr(service_module, "time", clock)
    harness = Harness(tmp_path, FailingBackend(), ServiceOptions(failure_mode=FailureMode.ALLOW))
    with caplog.at_level(logging.WARNING, logger="ratelimit.service"):
        for at in (0.0, 0.5, 0.99, 1.0, 1.5, 2.2, 3.5):
            clock.now = 1000.0 + at
            harness.ask("ten")
    lines = [record.getMessage() for record in caplog.records]
    counts = [int(found.group(1)) for line in lines if (found := re.search(r"\((\d+) failures since the last", line))]
    # Lines at 0 s, 1.0 s (a second after the first), 2.2 s and 3.5 s.
    assert counts == [1, 3, 2, 1]
    assert len(counts) == len(lines)
    assert all("backend failed (connection): Redis went away" in line for line in lines)


def test_codes_are_the_protocol_numbers() -> None:
    for code in Code:
        assert int(code) == rls_pb2.RateLimitResponse.Code.Value(code.name)


def test_a_descriptor_no_rule_matches_reports_ok_with_no_limit_and_nothing_remaining(tmp_path: Path) -> None:
    """As envoyproxy/ratelimit: no current_limit, limit_remaining 0, no reset."""
    harness = Harness(tmp_path, MemoryBackend())
    request = [DescriptorRequest(entries=(("nobody", "v"),)), DescriptorRequest(entries=(("ten", "v"),))]
    answer = asyncio.run(harness.service.should_rate_limit("promises", request, 1))
    unmatched = answer.statuses[0]
    assert (unmatched.code, unmatched.current_limit, unmatched.limit_remaining) == (Code.OK, None, 0)
    assert unmatched.duration_until_reset_ms is None
    assert answer.statuses[1].limit_remaining == 9


def test_rate_limit_reset_header_is_the_longest_wait_of_the_most_constrained_rounded_up(tmp_path: Path) -> None:
    """Two descriptors with as much room left (9 of 10): the header shows the longer wait, in
    whole seconds rounded up. The waits follow the README: a hit made at t stops counting at
    (floor(t / (W/40)) + 41) * W/40."""
    now_ms = 1_700_000_000_499
    harness = Harness(tmp_path, MemoryBackend(lambda: now_ms), ServiceOptions(response_headers=True))
    request = [DescriptorRequest(entries=(("minutely", "v"),)), DescriptorRequest(entries=(("hourly", "v"),))]
    answer = asyncio.run(harness.service.should_rate_limit("promises", request, 1))
    hour_bucket_ms = 3_600_000 // 40
    hourly_wait_ms = (now_ms // hour_bucket_ms + 41) * hour_bucket_ms - now_ms
    assert answer.statuses[1].duration_until_reset_ms == hourly_wait_ms
    headers = dict(answer.response_headers)
    assert headers == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "9",
        "RateLimit-Reset": str(-(-hourly_wait_ms // 1000)),
    }


class Observer:
    """What a tracing span is told of the backend call (see ratelimit.tracing)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str | None]] = []

    def backend_call(self, seconds: float, error_kind: str | None) -> None:
        self.calls.append((seconds, error_kind))


@pytest.mark.parametrize(("backend", "kind"), [(MemoryBackend, None), (FailingBackend, "connection")])
def test_the_observer_is_told_the_backend_call_time_and_error(
    tmp_path: Path, backend: type[Backend], kind: str | None
) -> None:
    harness = Harness(tmp_path, backend(), ServiceOptions(failure_mode=FailureMode.ALLOW))
    observer = Observer()
    request = [DescriptorRequest(entries=(("ten", "v"),))]
    asyncio.run(harness.service.should_rate_limit("promises", request, 1, observer=observer))
    [(seconds, error_kind)] = observer.calls
    assert 0 <= seconds < 1 and error_kind == kind
