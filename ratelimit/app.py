"""The composition root: settings in, a running replica out (like runner.go).

Wires config, backend, service, gRPC server and metrics exporter, and owns the process
lifecycle: SIGTERM turns health NOT_SERVING, drains in-flight calls, then returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from prometheus_client import CollectorRegistry

from ratelimit.limiter import Backend
from ratelimit.limiter.cache import OverLimitCache
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.metrics import Metrics, MetricsExporter
from ratelimit.reload import ConfigHolder
from ratelimit.server import RateLimitServer
from ratelimit.service import RateLimitService, ServiceOptions
from ratelimit.settings import Settings

log = logging.getLogger(__name__)


def make_backend(settings: Settings) -> Backend:
    backend: Backend
    if settings.backend == "memory":
        backend = MemoryBackend()
    else:
        backend = RedisBackend(
            settings.redis_url,
            timeout_s=settings.redis_timeout_ms / 1000,
            max_connections=settings.redis_pool_size,
            batching=settings.redis_batching,
        )
    return OverLimitCache(backend) if settings.over_limit_cache else backend


def service_options(settings: Settings) -> ServiceOptions:
    return ServiceOptions(
        key_prefix=settings.key_prefix,
        failure_mode=settings.on_backend_error,
        global_shadow_mode=settings.shadow_mode,
        max_descriptors=settings.max_descriptors,
        response_headers=settings.response_headers,
        header_limit=settings.header_limit,
        header_remaining=settings.header_remaining,
        header_reset=settings.header_reset,
    )


class Replica:
    """One running replica; `start()` then `stop()`, or `run()` until a signal."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.config = ConfigHolder(settings.config, merge_domains=settings.merge_domains, metrics=self.metrics)
        self.config.load()  # a bad config at start is fatal: raise ConfigError to the CLI
        self.backend = make_backend(settings)
        self.service = RateLimitService(self.config.current, self.backend, self.metrics, service_options(settings))
        self.server = RateLimitServer(
            self.service, self.metrics, settings.grpc_host, settings.grpc_port, reuse_port=settings.reuse_port
        )
        self.exporter: MetricsExporter | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.settings.metrics_port:
            self.exporter = MetricsExporter(
                self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port
            )
        if self.settings.config_poll_s > 0 and self.settings.config:
            self._watcher = asyncio.create_task(self.config.watch(self.settings.config_poll_s))
        log.info(
            "serving RateLimitService on %s:%d (backend %s%s), metrics on %s",
            self.settings.grpc_host,
            self.server.port,
            self.settings.backend,
            f" {self.settings.redacted_redis_url()}" if self.settings.backend == "redis" else "",
            f"{self.settings.metrics_host}:{self.exporter.port}" if self.exporter else "off",
        )

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.server.stop(self.settings.shutdown_grace_s)
        await self.backend.close()
        if self.exporter is not None:
            self.exporter.stop()
        log.info("stopped")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return."""
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await self.start()
        await stop_requested.wait()
        log.info("signal received: draining in-flight calls (up to %.1f s)", self.settings.shutdown_grace_s)
        await self.stop()
