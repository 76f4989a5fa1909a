"""The composition root: settings in, a running replica out (like runner.go).

Wires config, backend, service, gRPC server and metrics exporter, and owns the process
lifecycle: SIGTERM turns health NOT_SERVING, drains in-flight calls, then returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from prometheus_client import CollectorRegistry, ProcessCollector

from ratelimit.limiter import Backend, BackendError
from ratelimit.limiter.breaker import CircuitBreaker, CircuitState
from ratelimit.limiter.cache import OverLimitCache
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.pipeline_window import PipelineWindow
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.metrics import Metrics, MetricsExporter
from ratelimit.reload import ConfigHolder
from ratelimit.server import RateLimitServer
from ratelimit.service import RateLimitService, ServiceOptions
from ratelimit.settings import Settings
from ratelimit.tls import TlsFiles
from ratelimit.tracing import open_tracing

log = logging.getLogger(__name__)

# Extra health service names: they report state without steering Envoy, whose health
# check asks for the RateLimitService, which stays SERVING while the failure mode answers.
BACKEND_HEALTH_SERVICE = "ratelimit.Backend"
CONFIG_HEALTH_SERVICE = "ratelimit.Config"
TLS_HEALTH_SERVICE = "ratelimit.Tls"
STATE_REPORT_INTERVAL_S = 0.25


def tls_files(settings: Settings) -> TlsFiles | None:
    if not settings.tls_cert_file and not settings.tls_key_file:
        if settings.tls_client_ca_file:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    return TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file or None)


def redis_tls_options(settings: Settings) -> dict[str, str]:
    options = {}
    if settings.redis_ca_file:
        options["ssl_ca_certs"] = settings.redis_ca_file
    if settings.redis_cert_file:
        options["ssl_certfile"] = settings.redis_cert_file
    if settings.redis_key_file:
        options["ssl_keyfile"] = settings.redis_key_file
    return options


def make_store(settings: Settings, metrics: Metrics) -> tuple[Backend, CircuitBreaker | None]:
    """The counter store, behind a circuit breaker when it can fail (Redis)."""
    if settings.backend == "memory":
        return MemoryBackend(), None
    redis = RedisBackend(
        settings.redis_url,
        timeout_s=settings.redis_timeout_ms / 1000,
        max_connections=settings.redis_pool_size,
        batching=settings.redis_batching,
        connection_options=redis_tls_options(settings),
        on_round_trip=metrics.backend_duration.observe,
        pipeline_window=PipelineWindow(
            settings.redis_pipeline_window_us / 1e6,
            settings.redis_pipeline_limit,
            settings.redis_pipeline_min_rate,
            settings.redis_pipeline_min_busy,
        ),
    )
    breaker = CircuitBreaker(
        redis, failure_threshold=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_ms / 1000
    )
    return breaker, breaker


def open_metrics_exporter(registry: CollectorRegistry, settings: Settings) -> MetricsExporter:
    """The exporter on --metrics-host:--metrics-port; a port that cannot be bound is an OSError
    that names it and the flag, as the gRPC port's does."""
    try:
        return MetricsExporter(registry, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(
            f"cannot bind the metrics port {settings.metrics_host}:{settings.metrics_port} ({reason}): "
            "choose another with --metrics-port (RATELIMIT_METRICS_PORT), or 0 to turn the exporter off"
        ) from None


def service_options(settings: Settings) -> ServiceOptions:
    return ServiceOptions(
        key_prefix=settings.key_prefix,
        failure_mode=settings.on_backend_error,
        global_shadow_mode=settings.shadow_mode,
        response_headers=settings.response_headers,
        header_limit=settings.header_limit,
        header_remaining=settings.header_remaining,
        header_reset=settings.header_reset,
    )


class Replica:
    """One running replica; `start()` then `stop()`, or `run()` until a signal."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.metrics = Metrics(registry)
        self.config = ConfigHolder(settings.config, merge_domains=settings.merge_domains, metrics=self.metrics)
        self.config.load()  # a bad config at start is fatal: raise ConfigError to the CLI
        store, self.breaker = make_store(settings, self.metrics)
        self.backend: Backend = (
            OverLimitCache(store, max_entries=settings.over_limit_cache_entries) if settings.over_limit_cache else store
        )
        self.service = RateLimitService(self.config.current, self.backend, self.metrics, service_options(settings))
        # None unless --otlp-endpoint is set; a missing tracing extra is a ValueError for the CLI.
        self.tracing = open_tracing(settings.otlp_endpoint, settings.trace_sampling_ratio)
        try:
            self.server = RateLimitServer(
                self.service,
                self.metrics,
                settings.grpc_host,
                settings.grpc_port,
                reuse_port=settings.reuse_port,
                tls=tls_files(settings),
                caps=settings.request_caps(),
                tracing=self.tracing,
            )
        except OSError as exc:  # the bind: name the flag that moves it, as the metrics port does
            raise OSError(f"{exc}: choose another with --grpc-port (RATELIMIT_GRPC_PORT)") from None
        self.exporter: MetricsExporter | None = None
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.settings.metrics_port:
            try:
                # Before anything runs: a port in use then stops the start with nothing to undo.
                self.exporter = open_metrics_exporter(self.metrics.registry, self.settings)
            except OSError:
                await self.server.stop(0)  # never started; leaves no grpc object for a closed loop
                raise
        try:
            await self.backend.prepare()
        except BackendError as exc:  # not fatal: requests follow the failure mode until it is up
            log.warning("backend not ready at start: %s", exc)
        await self.server.start()
        if self.settings.config_poll_s > 0 and self.settings.config:
            self._background.append(asyncio.create_task(self.config.watch(self.settings.config_poll_s)))
        self._background.append(asyncio.create_task(self._report_state()))
        log.info(
            "serving RateLimitService on %s:%d (backend %s%s), metrics on %s, tracing %s; limits: %s",
            self.settings.grpc_host,
            self.server.port,
            self.settings.backend,
            f" {self.settings.redacted_redis_url()}" if self.settings.backend == "redis" else "",
            f"{self.settings.metrics_host}:{self.exporter.port}" if self.exporter else "off",
            f"to {self.tracing.describe()}" if self.tracing else "off",
            self.config.current().summary(),
        )

    async def _report_state(self) -> None:
        """Mirror the backend's and the config's state into health and metrics."""
        while True:
            backend_ok = self.breaker is None or self.breaker.state is CircuitState.CLOSED
            self.metrics.circuit_open.set(0 if backend_ok else 1)
            await self.server.set_component_health(BACKEND_HEALTH_SERVICE, backend_ok)
            await self.server.set_component_health(CONFIG_HEALTH_SERVICE, self.config.last_error is None)
            if self.server.certificate is not None:
                tls_ok = self.server.certificate.last_error is None
                self.metrics.tls_certificate_healthy.set(1 if tls_ok else 0)
                await self.server.set_component_health(TLS_HEALTH_SERVICE, tls_ok)
            await asyncio.sleep(STATE_REPORT_INTERVAL_S)

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(self.settings.shutdown_grace_s)
        await self.backend.close()
        if self.exporter is not None:
            self.exporter.stop()
        if self.tracing is not None:
            self.tracing.shutdown()  # the spans of the drained calls, within a bound
        log.info("stopped")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return.

        SIGTERM (what orchestrators send) first waits `shutdown_delay_s` with health
        NOT_SERVING while still answering; SIGINT (Ctrl-C), or a second signal, skips that.
        """
        signals: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        await self.start()
        _freeze_startup_heap()
        first = await signals.get()
        delay_s = self.settings.shutdown_delay_s if first == signal.SIGTERM else 0.0
        if delay_s > 0:
            # Load balancers learn from health checks, seconds later: until then calls still
            # come here, and answering them beats refusing them.
            log.info("SIGTERM: health NOT_SERVING, still answering for %.1f s", delay_s)
            await self.server.health.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signals.get(), delay_s)
        log.info("draining in-flight calls (up to %.1f s)", self.settings.shutdown_grace_s)
        await self.stop()


def _freeze_startup_heap() -> None:
    """Keep what start-up built (gRPC, protobuf descriptors, the config) out of every later
    garbage collection: it lives as long as the process, and scanning it made each full
    collection stall all calls for 25-30 ms (the p99 of a half-loaded server)."""
    gc.collect()
    gc.freeze()
