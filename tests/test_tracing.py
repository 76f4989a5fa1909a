"""OpenTelemetry tracing: a real replica on a real redis-server exports to a real OTLP/gRPC receiver.

One span per ShouldRateLimit with what was asked and answered, continuing the caller's trace
(Envoy's, end to end); off by default, connecting nowhere, and never in a decision's way.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc
import pytest
import yaml

from ratelimit.client import build_request
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit.tracing import FLUSH_ON_STOP_S, SPAN_NAME
from tests.support.envoy import front_proxy_config, running_envoy, running_upstream
from tests.support.otlp import OtlpReceiver, ReceivedSpan, running_otlp_receiver
from tests.support.processes import free_port
from tests.support.replica import PROJECT_ROOT, ReplicaProcess, running_replica

OK, OVER_LIMIT = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.StatusCode
LIMITS = """\
domain: traced
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: route
    rate_limit: {unit: minute, requests_per_unit: 100}
"""
# Spans leave in batches; the SDK's 5 s default delay would only slow the tests down.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture
def limits(tmp_path: Path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    return path


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with running_otlp_receiver() as running:
        yield running


def traced(receiver_endpoint: str, *more: str) -> list[str]:
    return ["--otlp-endpoint", receiver_endpoint, *more]


def ask(
    replica: ReplicaProcess,
    descriptors: Sequence[Sequence[tuple[str, str]]],
    metadata: Sequence[tuple[str, str]] = (),
    domain: str = "traced",
) -> rls_pb2.RateLimitResponse:
    with grpc.insecure_channel(replica.target) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        return stub.ShouldRateLimit(build_request(domain, descriptors), metadata=tuple(metadata), timeout=5)


def traceparent(trace_id: str, parent_id: str, sampled: bool = True) -> tuple[str, str]:
    return ("traceparent", f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}")


def of_trace(trace_id: str) -> Any:
    return lambda span: span.trace_id == trace_id


def test_each_call_gets_one_server_span_with_domain_descriptor_count_code_and_backend_latency(
    tmp_path: Path, redis_url: str, limits: Path, receiver: OtlpReceiver
) -> None:
    with running_replica(tmp_path, [limits], redis_url=redis_url, extra_args=traced(receiver.endpoint),
                         env=FAST_EXPORT) as replica:  # fmt: skip
        assert ask(replica, [[("user", "alice")], [("route", "home")]]).overall_code == OK
        assert ask(replica, [[("user", "alice")]]).overall_code == OVER_LIMIT
        admitted, refused = receiver.wait_for(2)
    assert len(receiver.spans()) == 2  # one per call
    for span in (admitted, refused):
        assert span.name == SPAN_NAME and span.kind == SPAN_KIND_SERVER and span.service == "ratelimit"
        assert span.parent_span_id == ""  # no traceparent: a trace of its own
        assert span.attributes["ratelimit.domain"] == "traced"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert 0 < span.attributes["ratelimit.backend.latency_ms"] < 1000
        assert "ratelimit.backend.error" not in span.attributes and span.status_code != STATUS_ERROR
    assert (admitted.attributes["ratelimit.descriptor_count"], admitted.attributes["ratelimit.overall_code"]) == (
        2,
        "OK",
    )
    assert (refused.attributes["ratelimit.descriptor_count"], refused.attributes["ratelimit.overall_code"]) == (
        1,
        "OVER_LIMIT",
    )
    assert admitted.trace_id != refused.trace_id


def test_a_traceparent_is_continued_and_a_malformed_one_starts_a_trace_without_changing_the_answer(
    tmp_path: Path, redis_url: str, limits: Path, receiver: OtlpReceiver
) -> None:
    trace_id, parent_id, unsampled_trace = secrets.token_hex(16), secrets.token_hex(8), secrets.token_hex(16)
    malformed = [("traceparent", "00-not-a-trace-01"), ("traceparent", f"00-{'0' * 32}-{parent_id}-01")]
    with running_replica(tmp_path, [limits], redis_url=redis_url, extra_args=traced(receiver.endpoint),
                         env=FAST_EXPORT) as replica:  # fmt: skip
        # The caller did not sample its trace: no span, even at ratio 1 (the ones below end later,
        # and spans leave in the order they end).
        ask(replica, [[("route", "r")]], [traceparent(unsampled_trace, parent_id, sampled=False)])
        answer = ask(replica, [[("user", "carol")]], [traceparent(trace_id, parent_id), ("tracestate", "vendor=1")])
        assert answer.overall_code == OK
        # Bad trace context never breaks a decision: the same counter, counted and refused as usual.
        for bad in malformed:
            assert ask(replica, [[("user", "carol")]], [bad]).overall_code == OVER_LIMIT
        [continued] = receiver.wait_for(1, of_trace(trace_id))
        others = receiver.wait_for(len(malformed), lambda span: span.trace_id != trace_id)
    assert not receiver.spans(of_trace(unsampled_trace))
    assert continued.parent_span_id == parent_id
    assert continued.attributes["ratelimit.overall_code"] == "OK"
    for span in others:
        assert span.parent_span_id == "" and span.trace_id != "0" * 32
        assert span.attributes["ratelimit.overall_code"] == "OVER_LIMIT"


def test_a_backend_error_is_on_the_span_with_an_error_status_and_the_failure_mode_still_answers(
    tmp_path: Path, limits: Path, receiver: OtlpReceiver
) -> None:
    no_redis = f"redis://127.0.0.1:{free_port()}/0"
    with running_replica(tmp_path, [limits], redis_url=no_redis, env=FAST_EXPORT,
                         extra_args=traced(receiver.endpoint, "--on-backend-error", "allow")) as replica:  # fmt: skip
        assert ask(replica, [[("user", "dave")]]).overall_code == OK  # allow: answered OK
        [span] = receiver.wait_for(1)
    assert span.attributes["ratelimit.backend.error"] == "connection"
    assert span.attributes["ratelimit.backend.latency_ms"] >= 0
    assert span.attributes["ratelimit.overall_code"] == "OK"
    assert span.status_code == STATUS_ERROR and span.status_message == "backend error: connection"


def test_sampling_ratio_zero_traces_no_call_unless_the_caller_sampled_it(
    tmp_path: Path, redis_url: str, limits: Path, receiver: OtlpReceiver
) -> None:
    sampled_trace, unsampled_trace = secrets.token_hex(16), secrets.token_hex(16)
    with running_replica(tmp_path, [limits], redis_url=redis_url, env=FAST_EXPORT,
                         extra_args=traced(receiver.endpoint, "--trace-sampling-ratio", "0")) as replica:  # fmt: skip
        for user in ("u1", "u2", "u3"):
            assert ask(replica, [[("user", user)]]).overall_code == OK
        ask(replica, [[("route", "r")]], [traceparent(unsampled_trace, secrets.token_hex(8), sampled=False)])
        # The caller's sampled flag (Envoy's decision) is followed, so its trace stays whole.
        # Spans leave in the order they end, so once this one is in, any earlier one would be.
        ask(replica, [[("route", "r")]], [traceparent(sampled_trace, secrets.token_hex(8))])
        receiver.wait_for(1)
    assert [span.trace_id for span in receiver.spans()] == [sampled_trace]


def test_tracing_is_off_by_default_and_connects_to_no_endpoint(tmp_path: Path, redis_url: str, limits: Path) -> None:
    # The standard OpenTelemetry variables alone do not turn it on: --otlp-endpoint does.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        environment = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_EXPORTER": "otlp"}
        with running_replica(tmp_path, [limits], redis_url=redis_url, env=environment) as replica:
            assert ask(replica, [[("user", "erin")]]).overall_code == OK
            assert ask(replica, [[("user", "erin")]]).overall_code == OVER_LIMIT
            assert replica.terminate() == 0
        assert "tracing off" in replica.log()
        with pytest.raises(BlockingIOError):  # nobody knocked
            listener.accept()


def test_an_unreachable_endpoint_never_delays_a_decision_nor_the_stop(
    tmp_path: Path, redis_url: str, limits: Path
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    with running_replica(tmp_path, [limits], redis_url=redis_url, extra_args=traced(unreachable),
                         env=FAST_EXPORT) as replica:  # fmt: skip
        answers = []
        for _ in range(20):
            started = time.monotonic()
            answers.append(ask(replica, [[("user", "frank")]]).overall_code)
            assert time.monotonic() - started < 0.5  # the export retries elsewhere, in the SDK's thread
            time.sleep(0.02)  # across several export attempts
        assert answers == [OK] + [OVER_LIMIT] * 19
        started = time.monotonic()
        assert replica.terminate() == 0
        # The flush gives up after its bound; the drain and the gRPC stop come on top.
        assert time.monotonic() - started < FLUSH_ON_STOP_S + 3


# --- without the tracing extra ---------------------------------------------------------


@pytest.fixture
def without_opentelemetry(tmp_path: Path) -> dict[str, str]:
    """An environment where `import opentelemetry...` fails, as where the extra is not installed."""
    blocker = tmp_path / "no-otel" / "opentelemetry"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named opentelemetry (blocked by the test)')\n")
    return {"PYTHONPATH": os.pathsep.join([str(blocker.parent), str(PROJECT_ROOT)])}


def test_without_the_extra_the_server_starts_and_answers_with_tracing_off(
    tmp_path: Path, redis_url: str, limits: Path, without_opentelemetry: dict[str, str]
) -> None:
    # Off, nothing imports OpenTelemetry: were it imported, this replica could not start.
    with running_replica(tmp_path, [limits], redis_url=redis_url, env=without_opentelemetry) as replica:
        assert ask(replica, [[("user", "gina")]]).overall_code == OK
        assert ask(replica, [[("user", "gina")]]).overall_code == OVER_LIMIT
        assert replica.terminate() == 0
    assert "Traceback" not in replica.log()


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "workers"])
def test_asking_for_tracing_without_the_extra_is_one_clear_line(
    limits: Path, without_opentelemetry: dict[str, str], workers: list[str]
) -> None:
    done = serve(limits, "--otlp-endpoint", "http://127.0.0.1:4317", *workers, env=without_opentelemetry)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("ratelimit: --otlp-endpoint (RATELIMIT_OTLP_ENDPOINT) needs OpenTelemetry")
    assert "pip install 'envoy-ratelimit-sidecar[tracing]'" in line


@pytest.mark.parametrize("endpoint", ["ftp://127.0.0.1:4317", "127.0.0.1", "http://collector:port", "http://h:1/v1"])
def test_a_malformed_endpoint_is_refused_at_start_naming_the_flag(limits: Path, endpoint: str) -> None:
    done = serve(limits, env={"RATELIMIT_OTLP_ENDPOINT": endpoint})
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"ratelimit: --otlp-endpoint (RATELIMIT_OTLP_ENDPOINT) {endpoint!r}: expected http://HOST:PORT "
        "(plaintext), https://HOST:PORT (TLS) or HOST:PORT"
    ]


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "nan", "half"])
def test_a_sampling_ratio_outside_zero_to_one_is_a_usage_error(limits: Path, ratio: str) -> None:
    done = serve(limits, "--trace-sampling-ratio", ratio)
    assert done.returncode == 2
    assert "argument --trace-sampling-ratio:" in done.stderr and "Traceback" not in done.stderr


def serve(limits: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ratelimit", "serve", "--config", str(limits), "--backend", "memory"]
    command += ["--grpc-port", "0", "--metrics-port", "0", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT, env={**os.environ, **(env or {})}
    )


# --- end to end with Envoy ---------------------------------------------------------------

USER_ROUTE = {
    "prefix": "/user",
    "rate_limits": [{"actions": [{"request_headers": {"header_name": "x-user-id", "descriptor_key": "user"}}]}],
}
ENVOY_TRACING = {
    "random_sampling": {"value": 100},
    "provider": {
        "name": "envoy.tracers.opentelemetry",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "1s"},
            "service_name": "envoy",
        },
    },
}
# Envoy sends its spans every 5 s or every 5 spans by default; one request makes a few.
ENVOY_FAST_FLUSH = {"tracing.opentelemetry.flush_interval_ms": 100, "tracing.opentelemetry.min_flush_spans": 1}


def traced_front_proxy(port: int, admin_port: int, upstream_port: int, rls_port: int, otlp_port: int) -> str:
    """The tests' front proxy with Envoy's OpenTelemetry tracer, every request sampled, sending
    to the receiver over an HTTP/2 cluster; its rate limit calls then carry a traceparent."""
    proxy = front_proxy_config(port=port, admin_port=admin_port, upstream_port=upstream_port,
                               rls_ports=[rls_port], domain="traced", routes=[USER_ROUTE])  # fmt: skip
    config = yaml.safe_load(proxy)
    listener = config["static_resources"]["listeners"][0]
    listener["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = ENVOY_TRACING
    clusters = config["static_resources"]["clusters"]
    address = {"socket_address": {"address": "127.0.0.1", "port_value": otlp_port}}
    clusters.append(
        {
            "name": "otlp",
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "typed_extension_protocol_options": clusters[0]["typed_extension_protocol_options"],  # HTTP/2
            "load_assignment": {
                "cluster_name": "otlp",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        }
    )
    config["layered_runtime"] = {"layers": [{"name": "static", "static_layer": ENVOY_FAST_FLUSH}]}
    return str(yaml.safe_dump(config, sort_keys=False))


def envoy_span(receiver: OtlpReceiver, **fields: str) -> ReceivedSpan:
    """The one span from Envoy whose fields have these values (waiting for it)."""
    [span] = receiver.wait_for(
        1, lambda span: span.service == "envoy" and all(getattr(span, k) == v for k, v in fields.items())
    )
    return span


def test_through_envoy_the_replicas_span_joins_envoys_trace(
    tmp_path: Path, redis_url: str, limits: Path, receiver: OtlpReceiver
) -> None:
    with (
        running_replica(tmp_path, [limits], redis_url=redis_url, extra_args=traced(receiver.endpoint),
                        env=FAST_EXPORT) as replica,
        running_upstream() as upstream_port,
    ):  # fmt: skip
        port, admin_port = free_port(), free_port()
        config = traced_front_proxy(port, admin_port, upstream_port, replica.grpc_port, receiver.port)
        with running_envoy(config, tmp_path, port=port, admin_port=admin_port) as envoy:
            envoy.wait_for_healthy_hosts("ratelimit", 1)
            assert envoy.get("/user", {"x-user-id": "hana"})[0] == 200
            assert envoy.get("/user", {"x-user-id": "hana"})[0] == 429
            ours = receiver.wait_for(2, lambda span: span.service == "ratelimit")
            for span in ours:
                # The parent is Envoy's span of the rate limit call, in the trace that Envoy's
                # own root span started for the HTTP request.
                assert envoy_span(receiver, span_id=span.parent_span_id).trace_id == span.trace_id
                envoy_span(receiver, trace_id=span.trace_id, parent_span_id="")
    assert sorted(span.attributes["ratelimit.overall_code"] for span in ours) == ["OK", "OVER_LIMIT"]
    assert ours[0].trace_id != ours[1].trace_id  # a trace per HTTP request
