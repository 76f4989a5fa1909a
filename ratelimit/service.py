"""Request in, decision out: matching, hits, shadow and quota modes, replaces, headers.

Knows the config and the limiter, nothing of gRPC: the servicer in `server` translates
protobuf messages to these plain types and back.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ratelimit.config.model import Match, RateLimitRule, Unit
from ratelimit.limiter import Backend, BackendError, CounterRequest, CounterResult, Decision, Role, WindowSpec
from ratelimit.limiter.keys import counter_key
from ratelimit.metrics import Metrics, RuleLabels

log = logging.getLogger(__name__)

MAX_UINT32 = 2**32 - 1
KNOWN_UNITS = frozenset(int(unit) for unit in Unit if unit is not Unit.UNKNOWN)
BACKEND_ERROR_LOG_INTERVAL_S = 1.0
# Go's NEAR_LIMIT_RATIO default in envoyproxy/ratelimit.
NEAR_LIMIT_RATIO = 0.8


class Code(enum.IntEnum):
    """RateLimitResponse.Code numbers."""

    UNKNOWN = 0
    OK = 1
    OVER_LIMIT = 2


class FailureMode(enum.StrEnum):
    """What to answer when the backend fails."""

    UNAVAILABLE = "unavailable"  # gRPC UNAVAILABLE: Envoy's failure_mode_deny decides
    ALLOW = "allow"
    DENY = "deny"


class InvalidRequest(Exception):
    """The request itself is wrong; answered with INVALID_ARGUMENT."""


class BackendUnavailable(Exception):
    """The backend failed and the failure mode is UNAVAILABLE."""


class BackendObserver(Protocol):
    """Told of each request's backend call (the tracing span, when tracing is on)."""

    def backend_call(self, seconds: float, error_kind: str | None) -> None: ...


class ConfigLookup(Protocol):
    def has_domain(self, domain: str) -> bool: ...

    def lookup(
        self, domain: str, entries: Sequence[tuple[str, str]], override: tuple[int, Unit] | None = None
    ) -> Match | None: ...


@dataclass(frozen=True, slots=True)
class DescriptorRequest:
    entries: tuple[tuple[str, str], ...]
    override: tuple[int, int] | None = None  # (requests_per_unit, unit number)
    hits_addend: int | None = None  # None: use the request's


@dataclass(frozen=True, slots=True)
class LimitInfo:
    requests_per_unit: int
    unit: Unit
    name: str


@dataclass(frozen=True, slots=True)
class DescriptorStatus:
    code: Code
    current_limit: LimitInfo | None = None
    limit_remaining: int = 0
    duration_until_reset_ms: int | None = None


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    overall_code: Code
    statuses: tuple[DescriptorStatus, ...]
    response_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ServiceOptions:
    key_prefix: str = "ratelimit:"
    failure_mode: FailureMode = FailureMode.UNAVAILABLE
    global_shadow_mode: bool = False
    response_headers: bool = False
    header_limit: str = "RateLimit-Limit"
    header_remaining: str = "RateLimit-Remaining"
    header_reset: str = "RateLimit-Reset"


@dataclass(frozen=True, slots=True)
class _Checked:
    """A descriptor whose limit goes to the backend."""

    position: int
    rule: RateLimitRule
    labels: RuleLabels
    request: CounterRequest


OK_NO_LIMIT = DescriptorStatus(code=Code.OK)
OK_UNLIMITED = DescriptorStatus(code=Code.OK, limit_remaining=MAX_UINT32)


class RateLimitService:
    def __init__(
        self,
        config: Callable[[], ConfigLookup],
        backend: Backend,
        metrics: Metrics,
        options: ServiceOptions = ServiceOptions(),
    ) -> None:
        self._config = config
        self._backend = backend
        self._metrics = metrics
        self._options = options
        self._last_error_log = float("-inf")
        self._suppressed_errors = 0

    async def should_rate_limit(
        self,
        domain: str,
        descriptors: Sequence[DescriptorRequest],
        hits_addend: int = 0,
        observer: BackendObserver | None = None,
    ) -> RateLimitDecision:
        # The request was checked at the edge (ratelimit.guards): bounded and well formed.
        config = self._config()  # one snapshot for the whole request, even across a reload
        if not config.has_domain(domain):
            self._metrics.domain_not_found.inc()
            return RateLimitDecision(Code.OK, tuple(OK_NO_LIMIT for _ in descriptors))
        request_hits = hits_addend or 1
        statuses: list[DescriptorStatus] = [OK_NO_LIMIT] * len(descriptors)
        matches = [self._match(config, domain, d) for d in descriptors]
        replaced = {name for m in matches if m is not None for name in m.rule.replaces}
        checked: list[_Checked] = []
        for position, (descriptor, match) in enumerate(zip(descriptors, matches)):
            if match is None or (match.rule.name and match.rule.name in replaced):
                continue
            if match.rule.unlimited:
                statuses[position] = OK_UNLIMITED
                continue
            hits = request_hits if descriptor.hits_addend is None else descriptor.hits_addend
            checked.append(self._checked(position, domain, descriptor, match, hits))
        if not checked:
            return RateLimitDecision(Code.OK, tuple(statuses))

        decision = await self._evaluate(checked, observer)
        if decision is None:
            return self._failure_answer(checked, statuses)
        for item, result in zip(checked, decision.results):
            statuses[item.position] = self._status(item, result)
            self._count(item, result, decision.admitted)
        overall = Code.OK if decision.admitted else Code.OVER_LIMIT
        if overall is Code.OVER_LIMIT and self._options.global_shadow_mode:
            self._metrics.global_shadow_mode.inc()
            overall = Code.OK
        headers = self._headers(checked, statuses) if self._options.response_headers else ()
        return RateLimitDecision(overall, tuple(statuses), headers)

    @staticmethod
    def _match(config: ConfigLookup, domain: str, descriptor: DescriptorRequest) -> Match | None:
        override = None
        if descriptor.override is not None:
            requests_per_unit, unit = descriptor.override
            override = (requests_per_unit, Unit(unit))
        return config.lookup(domain, descriptor.entries, override)

    def _checked(self, position: int, domain: str, descriptor: DescriptorRequest, match: Match, hits: int) -> _Checked:
        rule = match.rule
        if descriptor.override is not None:
            # Overrides come from request data: label by keys only, so values never
            # reach metric labels (the cardinality would be the caller's to choose).
            parts = tuple(key for key, _ in descriptor.entries)
        else:
            parts = match.stats_key_parts
        request = CounterRequest(
            key=counter_key(self._options.key_prefix, domain, match.counter_entries, rule.unit, rule.algorithm),
            limit=rule.requests_per_unit,
            window=WindowSpec.for_rule(rule.algorithm, rule.unit.seconds),
            # Beyond limit + 1 the answer cannot change; capping keeps the script's
            # arithmetic exact whatever a client sends (hits_addend is a uint64).
            hits=min(hits, rule.requests_per_unit + 1),
            role=_role(rule),
        )
        return _Checked(position, rule, RuleLabels.from_stats_key_parts(domain, parts), request)

    async def _evaluate(self, checked: Sequence[_Checked], observer: BackendObserver | None) -> Decision | None:
        # backend_duration is observed by the Redis backend: only real round trips count.
        # The observer times what this request waited for, cache and breaker included.
        started = time.perf_counter() if observer is not None else 0.0
        try:
            decision = await self._backend.evaluate([item.request for item in checked])
        except BackendError as exc:
            if observer is not None:
                observer.backend_call(time.perf_counter() - started, exc.kind)
            self._metrics.backend_errors.labels(exc.kind).inc()
            self._log_backend_error(exc)
            if self._options.failure_mode is FailureMode.UNAVAILABLE:
                # The kind only: Redis's text (key names, script lines) is for the log.
                raise BackendUnavailable(exc.kind) from exc
            return None
        if observer is not None:
            observer.backend_call(time.perf_counter() - started, None)
        return decision

    def _log_backend_error(self, exc: BackendError) -> None:
        # At most one line a second: an outage under load must not flood the log (the
        # metrics count every failure).
        now = time.monotonic()
        self._suppressed_errors += 1
        if now - self._last_error_log < BACKEND_ERROR_LOG_INTERVAL_S:
            return
        log.warning(
            "backend failed (%s): %s; answering with failure mode %s (%d failures since the last line)",
            exc.kind,
            exc,
            self._options.failure_mode.value,
            self._suppressed_errors,
        )
        self._last_error_log = now
        self._suppressed_errors = 0

    def _failure_answer(self, checked: Sequence[_Checked], statuses: list[DescriptorStatus]) -> RateLimitDecision:
        mode = self._options.failure_mode
        self._metrics.failure_mode_answers.labels(mode.value).inc()
        code = Code.OK if mode is FailureMode.ALLOW else Code.OVER_LIMIT
        for item in checked:
            statuses[item.position] = DescriptorStatus(code=code, current_limit=_limit_info(item.rule))
        return RateLimitDecision(code, tuple(statuses))

    @staticmethod
    def _status(item: _Checked, result: CounterResult) -> DescriptorStatus:
        # A shadow rule never rejects; its descriptor reports OK, as envoyproxy/ratelimit.
        over = result.over_limit and not item.rule.shadow_mode
        return DescriptorStatus(
            code=Code.OVER_LIMIT if over else Code.OK,
            current_limit=_limit_info(item.rule),
            limit_remaining=min(result.remaining(item.rule.requests_per_unit), MAX_UINT32),
            duration_until_reset_ms=result.reset_ms,
        )

    def _count(self, item: _Checked, result: CounterResult, admitted: bool) -> None:
        stats = self._metrics.rules(item.labels)
        # What was charged (or would have been): capped at limit + 1, so the counters stay
        # exact integers whatever hits_addend a client sends.
        hits = item.request.hits
        stats.total_hits.inc(hits)
        if result.over_limit:
            stats.over_limit.inc(hits)
            if item.rule.shadow_mode:
                stats.shadow_mode.inc(hits)
            return
        stats.within_limit.inc(hits)
        if not admitted:
            return
        # As envoyproxy/ratelimit: the admitted hits that land above 80% of the limit.
        near_threshold = math.floor(item.rule.requests_per_unit * NEAR_LIMIT_RATIO)
        after = result.used
        before = after - item.request.hits
        if after > near_threshold:
            stats.near_limit.inc(after - max(near_threshold, before))

    def _headers(
        self, checked: Sequence[_Checked], statuses: Sequence[DescriptorStatus]
    ) -> tuple[tuple[str, str], ...]:
        """RateLimit-* headers of the most constrained descriptor (least remaining)."""
        candidates = [statuses[item.position] for item in checked]
        tightest = min(
            (s for s in candidates if s.current_limit is not None),
            key=lambda s: (s.limit_remaining, -(s.duration_until_reset_ms or 0)),
            default=None,
        )
        if tightest is None or tightest.current_limit is None:
            return ()
        reset_s = math.ceil((tightest.duration_until_reset_ms or 0) / 1000)
        return (
            (self._options.header_limit, str(tightest.current_limit.requests_per_unit)),
            (self._options.header_remaining, str(tightest.limit_remaining)),
            (self._options.header_reset, str(reset_s)),
        )


def _role(rule: RateLimitRule) -> Role:
    if rule.shadow_mode:
        return Role.SHADOW
    return Role.QUOTA if rule.quota_mode else Role.ENFORCE


def _limit_info(rule: RateLimitRule) -> LimitInfo:
    return LimitInfo(requests_per_unit=rule.requests_per_unit, unit=rule.unit, name=rule.name)
