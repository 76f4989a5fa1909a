"""OpenTelemetry tracing, opt-in: one span per ShouldRateLimit, exported over OTLP/gRPC.

Off unless `--otlp-endpoint` is set; then `open_tracing` imports OpenTelemetry (the `tracing`
extra) and the server asks it for a `CallSpan` per call (None for a call the sampler leaves out).
Off, `open_tracing` returns None and nothing here imports OpenTelemetry, so the call path pays
one `is None` check.

The span continues the caller's trace from its W3C `traceparent` gRPC metadata, which Envoy
sends when its own tracing is on. Sampling is parent-based, the OpenTelemetry default: a caller's
sampled flag is followed (Envoy decides for the traces it starts, so they stay whole), and
`--trace-sampling-ratio` decides for calls that arrive without a trace. Spans leave in batches
from the SDK's own thread; an endpoint that is down costs the export, never a decision.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlsplit

import grpc

from ratelimit import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

SPAN_NAME = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
# How long a stopping replica waits for its last spans to leave (an unreachable endpoint would
# hold the exporter in its retry back-off for its whole timeout, 10 s by default).
FLUSH_ON_STOP_S = 2.0
# The W3C trace context headers; gRPC metadata keys arrive in lower case.
_TRACE_HEADERS = ("traceparent", "tracestate")
# Outcomes that are decisions (the call returned OK); any other is a gRPC status name.
_DECISIONS = ("OK", "OVER_LIMIT")
# Server-side errors, as OpenTelemetry's gRPC conventions count them; INVALID_ARGUMENT is the caller's.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})
# W3C trace context: lower-case hex, trace and parent ids not all zero, flags 00.
_UNSAMPLED_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-00")
_RPC_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "envoy.service.ratelimit.v3.RateLimitService",
    "rpc.method": "ShouldRateLimit",
}
_INSTALL_HINT = "pip install 'envoy-ratelimit-sidecar[tracing]'"


def exporter_target(endpoint: str) -> tuple[str, bool]:
    """(`scheme://host:port`, insecure) of `--otlp-endpoint`; ValueError naming the flag when malformed.

    `http://` is plaintext, `https://` TLS (the system's CA bundle, or OTEL_EXPORTER_OTLP_CERTIFICATE);
    a bare `host:port` is plaintext, as a collector's OTLP/gRPC port 4317 usually is.
    """
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None or url.path not in ("", "/"):
        raise ValueError(
            f"--otlp-endpoint (RATELIMIT_OTLP_ENDPOINT) {endpoint!r}: expected http://HOST:PORT (plaintext), "
            "https://HOST:PORT (TLS) or HOST:PORT"
        )
    return f"{url.scheme}://{url.netloc}", url.scheme == "http"


def check_tracing(endpoint: str) -> None:
    """Raise ValueError, with what to do, when tracing is asked for and cannot run."""
    if not endpoint:
        return
    exporter_target(endpoint)
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"--otlp-endpoint (RATELIMIT_OTLP_ENDPOINT) needs OpenTelemetry, which is not installed ({exc}): "
            f"{_INSTALL_HINT}, or leave the endpoint empty to run without tracing"
        ) from None


def open_tracing(endpoint: str, sampling_ratio: float) -> Tracing | None:
    """The replica's tracing, or None when `endpoint` is empty (tracing off: nothing imported)."""
    if not endpoint:
        return None
    check_tracing(endpoint)
    return Tracing(endpoint, sampling_ratio)


class Tracing:
    """A tracer provider of the replica's own (the process-global one is left alone) with one
    batching OTLP/gRPC exporter. The standard OTEL_BSP_* variables tune the batching, and
    OTEL_EXPORTER_OTLP_{HEADERS,TIMEOUT,CERTIFICATE,COMPRESSION} the exporter."""

    def __init__(self, endpoint: str, sampling_ratio: float) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        target, insecure = exporter_target(endpoint)
        self.endpoint = target
        self.sampling_ratio = sampling_ratio
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the name given here.
        attributes = {"service.version": __version__}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "ratelimit"
        self._exporter = OTLPSpanExporter(endpoint=target, insecure=insecure)
        self._provider: TracerProvider = TracerProvider(
            resource=Resource.create(attributes),
            sampler=ParentBased(TraceIdRatioBased(sampling_ratio)),
            shutdown_on_exit=False,  # stop() flushes, within a bound; an atexit flush could hang
        )
        self._provider.add_span_processor(BatchSpanProcessor(self._exporter))
        self._tracer = self._provider.get_tracer("ratelimit", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = SpanKind.SERVER

    def start(self, metadata: Sequence[tuple[str, Any]] | None) -> CallSpan | None:
        """The span of one call, a child of the caller's trace when its metadata carries one; None
        when the sampler leaves the call out, which then costs nothing more."""
        carrier = {key: value for key, value in metadata or () if key in _TRACE_HEADERS}
        if _not_sampled_by_caller(carrier.get("traceparent")):
            return None  # what parent-based sampling would decide, without the SDK's parse and span
        # A malformed traceparent extracts as no parent: the call starts a trace of its own.
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=self._server_kind, attributes=_RPC_ATTRIBUTES)
        return CallSpan(span) if span.is_recording() else None

    def shutdown(self, timeout_s: float = FLUSH_ON_STOP_S) -> None:
        """Export the spans still queued, waiting at most `timeout_s`, then close the exporter."""
        flusher = threading.Thread(target=self._provider.shutdown, name="trace-flush", daemon=True)
        flusher.start()
        flusher.join(timeout_s)
        if flusher.is_alive():
            log.warning("tracing: the last spans did not reach %s within %.1f s; dropped", self.endpoint, timeout_s)
            self._exporter.shutdown()  # ends the exporter's retry back-off, so the thread finishes

    def describe(self) -> str:
        return f"OTLP {self.endpoint} (sampling {self.sampling_ratio:g})"


def _not_sampled_by_caller(traceparent: Any) -> bool:
    """True for a valid version-00 traceparent whose flags are 00 (not sampled): Envoy's mark on
    every call it does not trace, so most calls where it samples a few. Anything else, malformed
    included, is left to the SDK."""
    return isinstance(traceparent, str) and _UNSAMPLED_TRACEPARENT.fullmatch(traceparent) is not None


class CallSpan:
    """What one sampled ShouldRateLimit call tells its span; made only while tracing is on."""

    __slots__ = ("_backend_error", "_span", "attributes")

    def __init__(self, span: Span) -> None:
        self._span = span
        # Applied at the end in one go: each set_attribute of the SDK takes a lock and cleans its value.
        self.attributes: dict[str, str | int | float] = {}
        self._backend_error: str | None = None

    def request(self, domain: str, descriptor_count: int) -> None:
        """What was asked (after the edge's checks, so the domain is bounded)."""
        self.attributes["ratelimit.domain"] = domain
        self.attributes["ratelimit.descriptor_count"] = descriptor_count

    def backend_call(self, seconds: float, error_kind: str | None) -> None:
        """The counter store's share of the call, and its failure kind (`timeout`, `circuit_open`, ...)."""
        self.attributes["ratelimit.backend.latency_ms"] = seconds * 1000
        if error_kind is not None:
            self._backend_error = error_kind
            self.attributes["ratelimit.backend.error"] = error_kind

    def end(self, outcome: str) -> None:
        """`outcome`: the decision's code (OK, OVER_LIMIT) or the gRPC status the call ended with."""
        if outcome in _DECISIONS:
            code = grpc.StatusCode.OK
            self.attributes["ratelimit.overall_code"] = outcome
        else:
            # The servicer names every status it sets; a call that ends otherwise was cancelled.
            code = getattr(grpc.StatusCode, outcome, grpc.StatusCode.CANCELLED)
        self.attributes["rpc.grpc.status_code"] = code.value[0]
        span = self._span
        span.set_attributes(self.attributes)
        if self._backend_error is not None:
            _set_error(span, f"backend error: {self._backend_error}")
        elif code in _SERVER_ERRORS:
            _set_error(span, code.name)
        span.end()


def _set_error(span: Span, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode  # only on errors: off the common path

    span.set_status(Status(StatusCode.ERROR, description))
