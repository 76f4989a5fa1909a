#!/usr/bin/env python3
"""Exit 0 when a replica's gRPC health service answers SERVING, 1 otherwise.

The image's HEALTHCHECK and the compose stack run it as `ratelimit-healthcheck`. With no
arguments it reads the replica's own settings from the environment, so it asks the server
where and how that server listens:

- host $RATELIMIT_GRPC_HOST (a wildcard such as 0.0.0.0 means loopback), port
  $RATELIMIT_GRPC_PORT (8081);
- TLS when $RATELIMIT_TLS_CERT_FILE is set: the server is verified against
  $RATELIMIT_HEALTHCHECK_CA_FILE, else $RATELIMIT_TLS_CLIENT_CA_FILE, else the server's own
  certificate chain; $RATELIMIT_HEALTHCHECK_SERVER_NAME overrides the name checked;
- mTLS when $RATELIMIT_TLS_CLIENT_CA_FILE is set too: the client presents
  $RATELIMIT_HEALTHCHECK_CERT_FILE / $RATELIMIT_HEALTHCHECK_KEY_FILE.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

RATELIMIT_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
# A server bound to every interface is reached on the loopback of its own family.
WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


@dataclass(frozen=True)
class Probe:
    target: str
    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""


def probe_from_env(env: Mapping[str, str]) -> Probe:
    """Where and how to reach the replica whose RATELIMIT_* settings are `env`."""
    host = env.get("RATELIMIT_GRPC_HOST", "127.0.0.1").strip()
    host = WILDCARD_HOSTS.get(host, host).strip("[]")
    port = env.get("RATELIMIT_GRPC_PORT") or "8081"
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server_cert = env.get("RATELIMIT_TLS_CERT_FILE", "")
    if not server_cert:
        return Probe(target)
    client_ca = env.get("RATELIMIT_TLS_CLIENT_CA_FILE", "")
    root_file = env.get("RATELIMIT_HEALTHCHECK_CA_FILE") or client_ca or server_cert
    client_cert = client_key = None
    if client_ca:
        cert_file = env.get("RATELIMIT_HEALTHCHECK_CERT_FILE", "")
        key_file = env.get("RATELIMIT_HEALTHCHECK_KEY_FILE", "")
        if not (cert_file and key_file):
            raise ValueError(
                "the server requires client certificates (RATELIMIT_TLS_CLIENT_CA_FILE): set "
                "RATELIMIT_HEALTHCHECK_CERT_FILE and RATELIMIT_HEALTHCHECK_KEY_FILE"
            )
        client_cert, client_key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(root_file).read_bytes(), private_key=client_key, certificate_chain=client_cert
    )
    return Probe(target, credentials, env.get("RATELIMIT_HEALTHCHECK_SERVER_NAME", ""))


def is_serving(probe: Probe | str, service: str = RATELIMIT_SERVICE, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(serving?, what the health service said or why it could not be asked); a str is a plaintext host:port."""
    if isinstance(probe, str):
        probe = Probe(probe)
    options = [("grpc.ssl_target_name_override", probe.server_name)] if probe.server_name else []
    if probe.credentials is None:
        channel = grpc.insecure_channel(probe.target, options=options)
    else:
        channel = grpc.secure_channel(probe.target, probe.credentials, options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", help="host:port of the replica (default: from its RATELIMIT_* settings)")
    parser.add_argument("--service", default=RATELIMIT_SERVICE, help='health service name ("" for the server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        probe = probe_from_env(os.environ)
    except (OSError, ValueError) as exc:
        print(f"ratelimit-healthcheck: {exc}", file=sys.stderr)
        return 1
    if args.target:
        probe = Probe(args.target, probe.credentials, probe.server_name)
    serving, detail = is_serving(probe, args.service, args.timeout)
    print(f"{probe.target} {args.service or '(server)'}: {detail}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
