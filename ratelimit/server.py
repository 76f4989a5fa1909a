"""gRPC wiring: the RLS servicer, reflection, health, graceful shutdown.

The servicer only translates protobuf to the service's plain types and back, and maps
the service's exceptions to gRPC status codes; it never lets a traceback reach a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ratelimit.generated.envoy.config.core.v3 import base_pb2
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit.guards import DEFAULT_CAPS, RequestCaps, check_request
from ratelimit.health import DrainingHealthServicer
from ratelimit.metrics import Metrics
from ratelimit.service import (
    BackendUnavailable,
    DescriptorRequest,
    DescriptorStatus,
    InvalidRequest,
    RateLimitDecision,
    RateLimitService,
)
from ratelimit.tls import CertificateState, TlsFiles, server_credentials

if TYPE_CHECKING:
    from ratelimit.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
# The service's enums carry the protocol's numbers; the stubs type them as their own enums.
_ProtoCode: TypeAlias = "rls_pb2.RateLimitResponse.Code"
_ProtoUnit: TypeAlias = "rls_pb2.RateLimitResponse.RateLimit.Unit"
# Requests larger than this are refused with RESOURCE_EXHAUSTED before parsing.
MAX_MESSAGE_BYTES = 1024 * 1024
# After the last call of a drain: time for its answer to leave before the connections close.
ANSWER_FLUSH_S = 0.1


def descriptors_from_proto(request: rls_pb2.RateLimitRequest) -> list[DescriptorRequest]:
    descriptors = []
    for descriptor in request.descriptors:
        override = None
        if descriptor.HasField("limit"):
            override = (descriptor.limit.requests_per_unit, int(descriptor.limit.unit))
        descriptors.append(
            DescriptorRequest(
                entries=tuple((entry.key, entry.value) for entry in descriptor.entries),
                override=override,
                hits_addend=descriptor.hits_addend.value if descriptor.HasField("hits_addend") else None,
            )
        )
    return descriptors


def _status_to_proto(status: DescriptorStatus) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    message = rls_pb2.RateLimitResponse.DescriptorStatus(
        code=cast(_ProtoCode, int(status.code)), limit_remaining=status.limit_remaining
    )
    if status.current_limit is not None:
        message.current_limit.requests_per_unit = status.current_limit.requests_per_unit
        message.current_limit.unit = cast(_ProtoUnit, int(status.current_limit.unit))
        message.current_limit.name = status.current_limit.name
    if status.duration_until_reset_ms is not None:
        message.duration_until_reset.CopyFrom(_duration(status.duration_until_reset_ms))
    return message


def _duration(milliseconds: int) -> Duration:
    # Whole seconds, rounded up: Envoy's X-RateLimit-Reset header shows only the seconds
    # field, and a client that waits what it shows must find room (the limiter's promise).
    return Duration(seconds=-(-max(milliseconds, 0) // 1000))


def decision_to_proto(decision: RateLimitDecision) -> rls_pb2.RateLimitResponse:
    return rls_pb2.RateLimitResponse(
        overall_code=cast(_ProtoCode, int(decision.overall_code)),
        statuses=[_status_to_proto(status) for status in decision.statuses],
        response_headers_to_add=[base_pb2.HeaderValue(key=k, value=v) for k, v in decision.response_headers],
    )


class RateLimitServicer:
    """ShouldRateLimit, taking the request's raw bytes: a message that does not parse is the
    client's error (INVALID_ARGUMENT), not a failure logged with a traceback by gRPC."""

    def __init__(
        self,
        service: RateLimitService,
        metrics: Metrics,
        caps: RequestCaps = DEFAULT_CAPS,
        tracing: Tracing | None = None,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._caps = caps
        self._tracing = tracing  # None: tracing off, and the calls below skip it at one check each
        self._in_flight = 0
        self._refusing = False
        self._drained: asyncio.Future[None] | None = None  # only while a drain waits

    async def refuse_new_calls_and_wait_idle(self, timeout_s: float) -> None:
        """From now on answer UNAVAILABLE at once; return when the calls under way are done."""
        self._refusing = True
        if not self._in_flight:
            return
        self._drained = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drained), timeout_s)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                    self.ShouldRateLimit,
                    request_deserializer=None,  # bytes: parsed below
                    response_serializer=rls_pb2.RateLimitResponse.SerializeToString,
                )
            },
        )

    async def ShouldRateLimit(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        if self._refusing:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("the rate limit service is shutting down")
            return rls_pb2.RateLimitResponse()
        started = time.perf_counter()
        outcome = "error"
        span = None if self._tracing is None else self._tracing.start(context.invocation_metadata())
        self._in_flight += 1
        try:
            try:
                request = rls_pb2.RateLimitRequest.FromString(raw)
            except DecodeError as exc:
                raise InvalidRequest("the request is not a valid envoy.service.ratelimit.v3.RateLimitRequest") from exc
            descriptors = descriptors_from_proto(request)
            check_request(request.domain, descriptors, self._caps)
            if span is not None:
                span.request(request.domain, len(descriptors))
            decision = await self._service.should_rate_limit(request.domain, descriptors, request.hits_addend, span)
            outcome = decision.overall_code.name
            return decision_to_proto(decision)
        except InvalidRequest as exc:
            outcome = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BackendUnavailable as exc:
            outcome = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate limit backend unavailable: {exc}")
        except Exception:
            log.exception("unexpected failure in ShouldRateLimit")
            outcome = "INTERNAL"
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the rate limit service")
        finally:
            self._metrics.rpc_duration.labels(outcome).observe(time.perf_counter() - started)
            if span is not None:
                span.end(outcome)
            self._in_flight -= 1
            if not self._in_flight and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        raise AssertionError("unreachable: context.abort raises")


class RateLimitServer:
    """A grpc.aio server with the RLS service, reflection and health.

    `start()` binds (port 0 picks a free port, see `.port`); `stop(grace)` turns health
    to NOT_SERVING first, so Envoy's health checks steer away, then drains in-flight calls.
    """

    def __init__(
        self,
        service: RateLimitService,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        tls: TlsFiles | None = None,
        caps: RequestCaps = DEFAULT_CAPS,
        tracing: Tracing | None = None,
    ) -> None:
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Off unless asked: a second server on a taken port must fail, not share it.
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ]
        )
        self._servicer = RateLimitServicer(service, metrics, caps, tracing)
        self._server.add_generic_rpc_handlers((self._servicer.handler(),))
        self.health = DrainingHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{host}:{port}"
        self.certificate: CertificateState | None = None if tls is None else CertificateState()
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, server_credentials(tls, self.certificate))
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(f"cannot bind the gRPC port {address} (in use?)") from exc
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {address}")

    async def start(self) -> None:
        await self._server.start()
        await self._set_serving(health_pb2.HealthCheckResponse.SERVING)

    async def _set_serving(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def set_component_health(self, name: str, healthy: bool) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(name, serving)

    async def stop(self, grace_s: float) -> None:
        await self.health.drain()  # NOT_SERVING everywhere first: Envoy's checks steer away
        # Drain here rather than in grpc's stop: when that returns it closes the connections at
        # once, and a client still sending has its socket reset, which can wipe answers it has
        # not read yet (answered and charged, but seen as failed). So: refuse new calls, let
        # those under way finish, give their answers a moment to leave, then stop.
        deadline = time.monotonic() + grace_s
        await self._servicer.refuse_new_calls_and_wait_idle(grace_s)
        await asyncio.sleep(ANSWER_FLUSH_S)
        await self._server.stop(max(0.0, deadline - time.monotonic()))

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
