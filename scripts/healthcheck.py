#!/usr/bin/env python3
"""Exit 0 when a replica's gRPC health service answers SERVING, 1 otherwise.

The image's HEALTHCHECK and the compose stack run it as `ratelimit-healthcheck`; with no
arguments it asks 127.0.0.1 at $RATELIMIT_GRPC_PORT (8081), the port the replica serves.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

RATELIMIT_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"


def is_serving(target: str, service: str = RATELIMIT_SERVICE, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(serving?, what the health service said or why it could not be asked)."""
    with grpc.insecure_channel(target) as channel:
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
    parser.add_argument(
        "--target",
        default=f"127.0.0.1:{os.environ.get('RATELIMIT_GRPC_PORT') or 8081}",
        help="host:port of the replica (default 127.0.0.1:$RATELIMIT_GRPC_PORT)",
    )
    parser.add_argument("--service", default=RATELIMIT_SERVICE, help='health service name ("" for the server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args(argv)
    serving, detail = is_serving(args.target, args.service, args.timeout)
    print(f"{args.target} {args.service or '(server)'}: {detail}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
