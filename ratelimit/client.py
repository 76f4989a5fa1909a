"""A small typed client over the generated stubs, returning plain Python results.

`RateLimitClient` (blocking) and `AsyncRateLimitClient` (asyncio) keep one channel open for
all their calls; every call has a deadline; TLS and mTLS through `TlsOptions`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import grpc

from ratelimit.generated.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

Descriptor = Sequence[tuple[str, str]] | Mapping[str, str]


@dataclass(frozen=True)
class Status:
    code: str  # "OK" or "OVER_LIMIT"
    requests_per_unit: int | None
    unit: str | None
    limit_remaining: int
    duration_until_reset_s: float | None


@dataclass(frozen=True)
class Result:
    overall_code: str
    statuses: tuple[Status, ...]
    headers: tuple[tuple[str, str], ...]

    @property
    def over_limit(self) -> bool:
        return self.overall_code == "OVER_LIMIT"


def parse_descriptor(text: str) -> list[tuple[str, str]]:
    """`k=v[,k=v...]` as entries: an argparse `type=` for the commands that take descriptors."""
    entries = []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"descriptor entries are key=value, got {part!r}")
        entries.append((key, value))
    return entries


def build_request(domain: str, descriptors: Sequence[Descriptor], hits_addend: int = 0) -> rls_pb2.RateLimitRequest:
    request = rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits_addend)
    for descriptor in descriptors:
        pairs = descriptor.items() if isinstance(descriptor, Mapping) else descriptor
        message = request.descriptors.add()
        for key, value in pairs:
            message.entries.append(ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value))
    return request


def result_from_response(response: rls_pb2.RateLimitResponse) -> Result:
    code_name = rls_pb2.RateLimitResponse.Code.Name
    unit_name = rls_pb2.RateLimitResponse.RateLimit.Unit.Name
    statuses = []
    for status in response.statuses:
        has_limit = status.HasField("current_limit")
        statuses.append(
            Status(
                code=code_name(status.code),
                requests_per_unit=status.current_limit.requests_per_unit if has_limit else None,
                unit=unit_name(status.current_limit.unit) if has_limit else None,
                limit_remaining=status.limit_remaining,
                duration_until_reset_s=(
                    status.duration_until_reset.ToMilliseconds() / 1000
                    if status.HasField("duration_until_reset")
                    else None
                ),
            )
        )
    headers = tuple((h.key, h.value) for h in response.response_headers_to_add)
    return Result(code_name(response.overall_code), tuple(statuses), headers)


@dataclass(frozen=True)
class TlsOptions:
    """Client TLS: the CA that signs the server, and for mTLS our certificate and key (PEM bytes)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None  # overrides the name checked against the certificate

    @classmethod
    def from_files(
        cls, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
    ) -> TlsOptions:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        return cls(read(ca_file), read(cert_file), read(key_file))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _open_channel(channels: Any, target: str, tls: TlsOptions | None) -> Any:
    """A channel from `grpc` or `grpc.aio` (same function names), plain or TLS."""
    if tls is None:
        return channels.insecure_channel(target)
    return channels.secure_channel(target, tls.credentials(), options=tls.channel_options())


class RateLimitClient:
    """A blocking client; one channel, reused for every call."""

    def __init__(self, target: str, *, timeout_s: float = 1.0, tls: TlsOptions | None = None) -> None:
        self._channel = _open_channel(grpc, target, tls)
        self._stub = rls_pb2_grpc.RateLimitServiceStub(self._channel)
        self._timeout_s = timeout_s

    def should_rate_limit(
        self,
        domain: str,
        descriptors: Sequence[Descriptor],
        *,
        hits_addend: int = 0,
        timeout: float | None = None,
    ) -> Result:
        response = self._stub.ShouldRateLimit(
            build_request(domain, descriptors, hits_addend), timeout=timeout or self._timeout_s
        )
        return result_from_response(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RateLimitClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncRateLimitClient:
    """The asyncio twin of RateLimitClient (grpc.aio); use `async with`."""

    def __init__(self, target: str, *, timeout_s: float = 1.0, tls: TlsOptions | None = None) -> None:
        self._channel = _open_channel(grpc.aio, target, tls)
        self._stub = rls_pb2_grpc.RateLimitServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def should_rate_limit(
        self,
        domain: str,
        descriptors: Sequence[Descriptor],
        *,
        hits_addend: int = 0,
        timeout: float | None = None,
    ) -> Result:
        response = await self._stub.ShouldRateLimit(
            build_request(domain, descriptors, hits_addend), timeout=timeout or self._timeout_s
        )
        return result_from_response(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRateLimitClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
