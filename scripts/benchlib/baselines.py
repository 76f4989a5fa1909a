"""The two reference servers of the benchmark, run as `python -m benchlib.baselines`.

- ceiling: the project's server stack (grpc.aio, the options of ratelimit/server.py,
  health service) with a servicer that answers OK at once: no gRPC server in Python
  can answer faster, so it bounds what any limiter behind it can reach.
- naive: the same stack with the textbook approach: one redis-py EVALSHA per descriptor
  per request (a two-counter sliding-window estimate), awaited one after the other.

`--workers N` starts N processes sharing the port (SO_REUSEPORT), like the project's flag.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from benchlib.workload import NAIVE_LIMITS
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit.server import MAX_MESSAGE_BYTES

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
UNIT_BY_SECONDS = {1: rls_pb2.RateLimitResponse.RateLimit.SECOND, 60: rls_pb2.RateLimitResponse.RateLimit.MINUTE}

# KEYS[1] a hash {window index -> hits}; ARGV limit, window_ms. Returns {admitted, remaining}.
# The classic sliding-window counter: previous window weighted by its overlap, plus current.
NAIVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local current = math.floor(now / window)
local counts = redis.call('HMGET', KEYS[1], current, current - 1)
local this_window = tonumber(counts[1]) or 0
local previous = tonumber(counts[2]) or 0
local estimate = math.floor(previous * (window - (now - current * window)) / window) + this_window
if estimate + 1 > limit then
  return {0, 0}
end
redis.call('HINCRBY', KEYS[1], current, 1)
redis.call('HDEL', KEYS[1], current - 2)
redis.call('PEXPIRE', KEYS[1], 2 * window)
return {1, limit - estimate - 1}
"""


class CeilingServicer(rls_pb2_grpc.RateLimitServiceServicer):
    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: Any) -> rls_pb2.RateLimitResponse:  # noqa: N802
        return rls_pb2.RateLimitResponse(overall_code=OK)


class NaiveServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, redis_url: str) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(redis_url, max_connections=64)
        self._sha: str | None = None

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: Any) -> rls_pb2.RateLimitResponse:  # noqa: N802
        if self._sha is None:
            self._sha = await self._redis.script_load(NAIVE_SCRIPT)
        response = rls_pb2.RateLimitResponse(overall_code=OK)
        for descriptor in request.descriptors:
            entries = [(entry.key, entry.value) for entry in descriptor.entries]
            limit, unit_seconds = NAIVE_LIMITS.get(entries[0][0], (0, 0))
            status = response.statuses.add(code=OK)
            if not limit:
                continue
            key = "naive:" + request.domain + ":" + "|".join(f"{k}={v}" for k, v in entries)
            admitted, remaining = await self._redis.evalsha(self._sha, 1, key, limit, unit_seconds * 1000)
            status.current_limit.requests_per_unit = limit
            status.current_limit.unit = UNIT_BY_SECONDS[unit_seconds]
            status.limit_remaining = remaining
            if not admitted:
                status.code = OVER_LIMIT
                response.overall_code = OVER_LIMIT
        return response


async def serve(kind: str, host: str, port: int, redis_url: str, reuse_port: bool) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", int(reuse_port))]
    )
    servicer = CeilingServicer() if kind == "ceiling" else NaiveServicer(redis_url)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def run_one(args: argparse.Namespace, reuse_port: bool) -> None:
    if args.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.kind, args.host, args.port, args.redis_url, reuse_port))
    else:
        asyncio.run(serve(args.kind, args.host, args.port, args.redis_url, reuse_port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchlib.baselines", description=__doc__)
    parser.add_argument("kind", choices=("ceiling", "naive"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers <= 1 or args.worker:
        run_one(args, reuse_port=args.worker)
        return 0
    # A parent that only supervises: each worker is a fresh interpreter binding the port.
    command = [sys.executable, "-m", "benchlib.baselines", *(argv or sys.argv[1:]), "--worker"]
    workers = [subprocess.Popen(command) for _ in range(args.workers)]

    def stop_workers(*_: object) -> None:
        for worker in workers:
            worker.terminate()

    signal.signal(signal.SIGTERM, stop_workers)
    for worker in workers:
        worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
