"""A real OTLP/gRPC trace receiver on loopback (opentelemetry-proto's TraceService), for the tests
and the benchmark's tracing row: it keeps every span exported to it, flattened for assertions."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    status_code: int  # opentelemetry.proto.trace.v1.Status.StatusCode (0 unset, 2 error)
    status_message: str


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.spans: list[ReceivedSpan] = []
        self.exports = 0

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                            status_code=span.status.code,
                            status_message=span.status.message,
                        )
                    )
        with self.lock:
            self.exports += 1
            self.spans.extend(received)
            self.lock.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, collector: _Collector, port: int) -> None:
        self._collector = collector
        self.port = port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def exports(self) -> int:
        with self._collector.lock:
            return self._collector.exports

    def spans(self, where: Callable[[ReceivedSpan], bool] = lambda span: True) -> list[ReceivedSpan]:
        with self._collector.lock:
            return [span for span in self._collector.spans if where(span)]

    def wait_for(
        self, count: int, where: Callable[[ReceivedSpan], bool] = lambda span: True, timeout_s: float = 10.0
    ) -> list[ReceivedSpan]:
        """The spans matching `where` once there are at least `count` (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        with self._collector.lock:
            while True:
                found = [span for span in self._collector.spans if where(span)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    break
                self._collector.lock.wait(remaining)
        if len(found) < count:
            raise TimeoutError(f"{len(found)} matching spans after {timeout_s} s, not {count}: {self.spans()}")
        return found


@contextlib.contextmanager
def running_otlp_receiver() -> Iterator[OtlpReceiver]:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield OtlpReceiver(collector, port)
    finally:
        server.stop(0).wait()
