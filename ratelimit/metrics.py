"""Prometheus metrics of one replica, and the exporter thread that serves them.

Per-rule counters use the names and labels that envoyproxy/ratelimit's statsd-to-
Prometheus mapping produces (`ratelimit_service_rate_limit_over_limit{domain,key1,key2}`),
so existing dashboards and alerts keep working. prometheus_client would append `_total`
to a counter, so these are exposed untyped under their exact names; they only increase.
Label values come from the rule's stats key, which carries request values only when the
rule asks for it (detailed_metric, value_to_metric); the number of label sets is capped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ratelimit import __version__

RULE_COUNTERS = ("total_hits", "over_limit", "near_limit", "within_limit", "shadow_mode")
RULE_LABELS = ("domain", "key1", "key2")
OVERFLOW_LABEL = "_other_"
# Buckets around Envoy's 20 ms default RLS timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class RuleLabels:
    domain: str
    key1: str
    key2: str

    @classmethod
    def from_stats_key_parts(cls, domain: str, parts: tuple[str, ...]) -> RuleLabels:
        return cls(domain, parts[0] if parts else "", ".".join(parts[1:]))


@dataclass(slots=True)
class RuleCounts:
    total_hits: int = 0
    over_limit: int = 0
    near_limit: int = 0
    within_limit: int = 0
    shadow_mode: int = 0


class RuleStatsCollector(Collector):
    """Per-rule hit counters, updated on the event loop and read by the exporter thread."""

    def __init__(self, max_label_sets: int) -> None:
        self._max_label_sets = max_label_sets
        self._counts: dict[RuleLabels, RuleCounts] = {}
        self._lock = threading.Lock()

    def counts_for(self, labels: RuleLabels) -> RuleCounts:
        counts = self._counts.get(labels)
        if counts is None:
            with self._lock:
                if len(self._counts) >= self._max_label_sets:
                    labels = RuleLabels(labels.domain, OVERFLOW_LABEL, "")
                counts = self._counts.setdefault(labels, RuleCounts())
        return counts

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = [
                (labels, RuleCounts(**{n: getattr(c, n) for n in RULE_COUNTERS})) for labels, c in self._counts.items()
            ]
        for name in RULE_COUNTERS:
            metric = Metric(
                f"ratelimit_service_rate_limit_{name}", f"Hits per rule: {name.replace('_', ' ')}.", "unknown"
            )
            for labels, counts in snapshot:
                metric.add_sample(
                    metric.name,
                    {"domain": labels.domain, "key1": labels.key1, "key2": labels.key2},
                    float(getattr(counts, name)),
                )
            yield metric


class Metrics:
    """Every metric of the service, registered in one injected registry."""

    def __init__(self, registry: CollectorRegistry, *, max_rule_label_sets: int = 10_000) -> None:
        self.registry = registry
        self.rules = RuleStatsCollector(max_rule_label_sets)
        registry.register(self.rules)
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
        )
        self.global_shadow_mode = Counter(
            "ratelimit_global_shadow_mode",
            "Requests over limit answered OK because global shadow mode is on.",
            registry=registry,
        )
        self.domain_not_found = Counter(
            "ratelimit_domain_not_found", "Requests for a domain the config does not know.", registry=registry
        )
        self.build_info = Info("ratelimit_build", "Version of this service.", registry=registry)
        self.build_info.info({"version": __version__})

    def declare_rules(self, labels: Iterable[RuleLabels]) -> None:
        """Create configured rules' series at zero, so dashboards see them before traffic."""
        for rule_labels in labels:
            self.rules.counts_for(rule_labels)


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
