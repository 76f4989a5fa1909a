"""Prometheus metrics of one replica, and the exporter thread that serves them.

Per-rule metrics use the names and labels that envoyproxy/ratelimit's statsd-to-
Prometheus mapping produces (`ratelimit_service_rate_limit_over_limit{domain,key1,key2}`),
so existing dashboards and alerts keep working. prometheus_client would append `_total`
to a counter's name, so they are gauges that only ever increase (summed over worker
processes in multiprocess mode). Label values come from the rule's stats key, which
carries request values only when the rule asks for it (detailed_metric, value_to_metric);
the number of label sets is capped.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ratelimit import __version__

RULE_LABELS = ("domain", "key1", "key2")
OVERFLOW_LABEL = "_other_"
# Longest label value exported: longer ones (request data in detailed_metric rules and
# overrides) keep their start and a digest of the whole, so they stay distinct and bounded.
MAX_LABEL_CHARS = 128
_LABEL_DIGEST_CHARS = 16
# Buckets around Envoy's 20 ms default RLS timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class RuleLabels:
    domain: str
    key1: str
    key2: str

    @classmethod
    def from_stats_key_parts(cls, domain: str, parts: tuple[str, ...]) -> RuleLabels:
        return cls(bounded_label(domain), bounded_label(parts[0] if parts else ""), bounded_label(".".join(parts[1:])))


def bounded_label(value: str) -> str:
    """`value`, or when longer than MAX_LABEL_CHARS its start, "~" and a digest of all of it."""
    if len(value) <= MAX_LABEL_CHARS:
        return value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=_LABEL_DIGEST_CHARS // 2).hexdigest()
    return f"{value[: MAX_LABEL_CHARS - _LABEL_DIGEST_CHARS - 1]}~{digest}"


@dataclass(frozen=True, slots=True)
class RuleStats:
    """The five hit counters of one rule (label set)."""

    total_hits: Any
    over_limit: Any
    near_limit: Any
    within_limit: Any
    shadow_mode: Any


class RuleStatsFamily:
    """Per-rule gauges and the cap on how many label sets they may hold."""

    def __init__(self, registry: CollectorRegistry, max_label_sets: int) -> None:
        def family(name: str, meaning: str) -> Gauge:
            return Gauge(
                f"ratelimit_service_rate_limit_{name}",
                f"Hits per rule {meaning} (only increases).",
                RULE_LABELS,
                registry=registry,
                multiprocess_mode="sum",
            )

        self._families = (
            family("total_hits", "in all"),
            family("over_limit", "over the limit"),
            family("near_limit", "admitted above the near-limit ratio"),
            family("within_limit", "within the limit"),
            family("shadow_mode", "over the limit but let through by shadow mode"),
        )
        self._max_label_sets = max_label_sets
        self._children: dict[RuleLabels, RuleStats] = {}
        self._lock = threading.Lock()

    def __call__(self, labels: RuleLabels) -> RuleStats:
        stats = self._children.get(labels)
        if stats is not None:
            return stats
        with self._lock:
            if len(self._children) >= self._max_label_sets and labels not in self._children:
                labels = RuleLabels(labels.domain, OVERFLOW_LABEL, "")
                if labels in self._children:
                    return self._children[labels]
            values = (labels.domain, labels.key1, labels.key2)
            stats = RuleStats(*(family.labels(*values) for family in self._families))
            self._children[labels] = stats
            return stats


class Metrics:
    """Every metric of the service, registered in one injected registry."""

    def __init__(self, registry: CollectorRegistry, *, max_rule_label_sets: int = 10_000) -> None:
        self.registry = registry
        self.rules = RuleStatsFamily(registry, max_rule_label_sets)
        self.rpc_duration = Histogram(
            "ratelimit_rpc_duration_seconds",
            "ShouldRateLimit latency as seen by the server.",
            ["code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backend_duration = Histogram(
            "ratelimit_backend_duration_seconds",
            "Latency of one backend call (one Redis round trip).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backend_errors = Counter(
            "ratelimit_backend_errors", "Backend failures by kind.", ["kind"], registry=registry
        )
        self.circuit_open = Gauge(
            "ratelimit_backend_circuit_open",
            "1 while the circuit breaker fails Redis calls fast, 0 when closed.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.failure_mode_answers = Counter(
            "ratelimit_backend_failure_answers",
            "Requests answered by the failure mode while the backend failed.",
            ["mode"],
            registry=registry,
        )
        self.config_load_success = Counter(
            "ratelimit_config_load_success", "Limits config loads that succeeded.", registry=registry
        )
        self.config_load_error = Counter(
            "ratelimit_config_load_error", "Limits config loads that failed (old config kept).", registry=registry
        )
        self.config_healthy = Gauge(
            "ratelimit_config_healthy",
            "1 when the last config load succeeded, 0 when it failed and an older config is in force.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.tls_certificate_healthy = Gauge(
            "ratelimit_tls_certificate_healthy",
            "1 when the TLS files on disk are the certificate in force, 0 when a change was refused (invalid PEM, "
            "a key that does not match) and the previous certificate is kept.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.global_shadow_mode = Counter(
            "ratelimit_global_shadow_mode",
            "Requests over limit answered OK because global shadow mode is on.",
            registry=registry,
        )
        self.domain_not_found = Counter(
            "ratelimit_domain_not_found", "Requests for a domain the config does not know.", registry=registry
        )
        self.build_info = Gauge(
            "ratelimit_build_info", "Version of this service.", ["version"], registry=registry, multiprocess_mode="max"
        )
        self.build_info.labels(__version__).set(1)

    def declare_rules(self, labels: Iterable[RuleLabels]) -> None:
        """Create configured rules' series at zero, so dashboards see them before traffic."""
        for rule_labels in labels:
            self.rules(rule_labels)


# What a node of several workers exports as the sum over its processes: (name, help, family).
_SUMMED_PROCESS_METRICS = (
    ("process_cpu_seconds", "Total user and system CPU time spent in seconds.", CounterMetricFamily),
    ("process_resident_memory_bytes", "Resident memory size in bytes.", GaugeMetricFamily),
    ("process_virtual_memory_bytes", "Virtual memory size in bytes.", GaugeMetricFamily),
)


class ProcessTreeCollector(Collector):
    """process_cpu_seconds_total and process_*_memory_bytes summed over this process and its
    workers (`worker_pids()`, read at every scrape), so a `--workers` node reports what it costs
    as one replica does; a worker that has exited counts no more."""

    def __init__(self, worker_pids: Callable[[], Iterable[int]]) -> None:
        self._worker_pids = worker_pids

    def collect(self) -> Iterable[Any]:
        totals = {name: 0.0 for name, _, _ in _SUMMED_PROCESS_METRICS}
        for pid in ["self", *self._worker_pids()]:
            # ProcessCollector reads /proc/PID; it yields nothing for a PID that is gone.
            for family in ProcessCollector(pid=functools.partial(str, pid), registry=None).collect():
                if family.name in totals:
                    totals[family.name] += family.samples[0].value
        for name, meaning, family_type in _SUMMED_PROCESS_METRICS:
            yield family_type(name, meaning, value=totals[name])


class MetricsExporter:
    """prometheus_client's HTTP server in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
