"""ShouldRateLimit semantics, on the in-memory twin and on a real redis-server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

import pytest
from prometheus_client import CollectorRegistry

from ratelimit.config import load_config
from ratelimit.config.model import Unit
from ratelimit.limiter import Backend, BackendError, CounterRequest, Decision
from ratelimit.limiter.memory import MemoryBackend
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.metrics import MAX_LABEL_CHARS, Metrics
from ratelimit.service import (
    BackendUnavailable,
    Code,
    DescriptorRequest,
    FailureMode,
    RateLimitService,
    ServiceOptions,
)

CONFIG = load_config([Path(__file__).parent / "data" / "service.yaml"])
T = TypeVar("T")


class Harness:
    def __init__(self, backend: Backend, options: ServiceOptions = ServiceOptions()) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.service = RateLimitService(lambda: CONFIG, backend, self.metrics, options)

    async def ask(self, *descriptors: Any, domain: str = "svc", hits: int = 0) -> Any:
        requests = [d if isinstance(d, DescriptorRequest) else DescriptorRequest(entries=tuple(d)) for d in descriptors]
        return await self.service.should_rate_limit(domain, requests, hits)

    def rule_metric(self, name: str, key1: str, key2: str = "") -> float | None:
        return self.registry.get_sample_value(
            f"ratelimit_service_rate_limit_{name}", {"domain": "svc", "key1": key1, "key2": key2}
        )


@pytest.fixture(params=["memory", "redis"])
def backend_factory(request: pytest.FixtureRequest) -> Callable[[], Backend]:
    if request.param == "memory":
        return MemoryBackend
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBackend(url, timeout_s=1.0)


def run(
    factory: Callable[[], Backend],
    scenario: Callable[[Harness], Coroutine[Any, Any, T]],
    options: ServiceOptions = ServiceOptions(),
) -> T:
    async def main() -> T:
        backend = factory()
        try:
            return await scenario(Harness(backend, options))
        finally:
            await backend.close()

    return asyncio.run(main())


def test_three_per_minute_answers_ok_ok_ok_over_limit(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        answers = [await h.ask([("user", "alice")]) for _ in range(4)]
        assert [a.overall_code for a in answers] == [Code.OK, Code.OK, Code.OK, Code.OVER_LIMIT]
        assert [a.statuses[0].limit_remaining for a in answers] == [2, 1, 0, 0]
        last = answers[-1].statuses[0]
        assert last.current_limit is not None and last.current_limit.requests_per_unit == 3
        assert last.current_limit.unit is Unit.MINUTE
        assert last.duration_until_reset_ms is not None and 0 < last.duration_until_reset_ms <= 61_500
        # another user has a counter of their own
        assert (await h.ask([("user", "bob")])).overall_code is Code.OK
        assert h.rule_metric("total_hits", "user") == 5
        assert h.rule_metric("over_limit", "user") == 1
        assert h.rule_metric("within_limit", "user") == 4

    run(backend_factory, scenario)


def test_any_enforcing_descriptor_over_makes_the_request_over_and_charges_nothing(
    backend_factory: Callable[[], Backend],
) -> None:
    async def scenario(h: Harness) -> None:
        first = await h.ask([("roomy", "x")], [("tight", "x")])
        assert first.overall_code is Code.OK
        second = await h.ask([("roomy", "x")], [("tight", "x")])
        assert second.overall_code is Code.OVER_LIMIT
        assert [s.code for s in second.statuses] == [Code.OK, Code.OVER_LIMIT]
        assert second.statuses[0].limit_remaining == 99  # the rejected request took nothing

    run(backend_factory, scenario)


def test_request_hits_addend_zero_means_one_and_larger_values_count(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        assert (await h.ask([("user", "h")], hits=0)).statuses[0].limit_remaining == 2
        assert (await h.ask([("user", "h")], hits=2)).statuses[0].limit_remaining == 0
        huge = await h.ask([("user", "h2")], hits=2**32 - 1)
        assert huge.overall_code is Code.OVER_LIMIT and huge.statuses[0].limit_remaining == 3

    run(backend_factory, scenario)


def test_per_descriptor_hits_addend_wins_and_zero_checks_only(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        check_only = DescriptorRequest(entries=(("user", "d"),), hits_addend=0)
        for _ in range(3):
            answer = await h.ask(check_only, hits=5)
            assert answer.overall_code is Code.OK and answer.statuses[0].limit_remaining == 3
        two = DescriptorRequest(entries=(("user", "d"),), hits_addend=2)
        assert (await h.ask(two, hits=1)).statuses[0].limit_remaining == 1
        biggest = DescriptorRequest(entries=(("user", "d"),), hits_addend=2**64 - 1)
        answer = await h.ask(biggest)
        assert answer.overall_code is Code.OVER_LIMIT and answer.statuses[0].limit_remaining == 1

    run(backend_factory, scenario)


def test_limit_override_in_the_request_replaces_the_configured_limit(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        override = DescriptorRequest(entries=(("user", "o"),), override=(1, int(Unit.HOUR)))
        first, second = await h.ask(override), await h.ask(override)
        assert first.statuses[0].current_limit.requests_per_unit == 1
        assert first.statuses[0].current_limit.unit is Unit.HOUR
        assert [first.overall_code, second.overall_code] == [Code.OK, Code.OVER_LIMIT]
        week = DescriptorRequest(entries=(("anything", "o"),), override=(5, 7))
        assert (await h.ask(week)).statuses[0].current_limit.unit is Unit.WEEK

    run(backend_factory, scenario)


def test_unlimited_rule_is_ok_with_max_remaining(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        for _ in range(5):
            answer = await h.ask([("free", "x")])
            assert answer.overall_code is Code.OK and answer.statuses[0].limit_remaining == 2**32 - 1

    run(backend_factory, scenario)


def test_replaces_drops_the_named_limit(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        answer = await h.ask([("path", "/special")], [("method", "GET")])
        assert answer.statuses[1].current_limit is None  # "general" replaced by "specific"
        assert answer.statuses[0].current_limit.name == "specific"
        assert (await h.ask([("path", "/special")], [("method", "GET")])).overall_code is Code.OVER_LIMIT
        assert (await h.ask([("method", "GET")])).statuses[0].current_limit.name == "general"

    run(backend_factory, scenario)


def test_shadow_rule_never_rejects_but_is_counted(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        for _ in range(3):
            answer = await h.ask([("shadow", "x")])
            assert answer.overall_code is Code.OK and answer.statuses[0].code is Code.OK
        assert h.rule_metric("shadow_mode", "shadow") == 2
        assert h.rule_metric("over_limit", "shadow") == 2

    run(backend_factory, scenario)


def test_global_shadow_mode_answers_ok_and_keeps_statuses(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        await h.ask([("tight", "g")])
        answer = await h.ask([("tight", "g")])
        assert answer.overall_code is Code.OK
        assert answer.statuses[0].code is Code.OVER_LIMIT
        assert h.registry.get_sample_value("ratelimit_global_shadow_mode_total") == 1

    run(backend_factory, scenario, ServiceOptions(global_shadow_mode=True))


def test_quota_mode_rejects_only_when_every_quota_descriptor_is_over(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        await h.ask([("quota", "q1")])
        soft = await h.ask([("quota", "q1")], [("quota", "q2")])
        assert [s.code for s in soft.statuses] == [Code.OVER_LIMIT, Code.OK]
        assert soft.overall_code is Code.OK  # one quota still has room
        both = await h.ask([("quota", "q1")], [("quota", "q2")])
        assert [s.code for s in both.statuses] == [Code.OVER_LIMIT, Code.OVER_LIMIT]
        assert both.overall_code is Code.OVER_LIMIT
        alone = await h.ask([("quota", "q3")], [("roomy", "q")])
        assert alone.overall_code is Code.OK and alone.statuses[1].limit_remaining == 99

    run(backend_factory, scenario)


def test_fixed_window_rule_uses_epoch_aligned_windows(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        hour_ms = 3_600_000
        before_ms = time.time_ns() // 1_000_000
        answer = await h.ask([("fixed", "f")])
        after_ms = time.time_ns() // 1_000_000
        window_end_ms = (before_ms // hour_ms + 1) * hour_ms
        reset = answer.statuses[0].duration_until_reset_ms
        # Exactly until the end of the epoch-aligned hour (the store's clock is this machine's).
        assert reset is not None and window_end_ms - after_ms <= reset <= window_end_ms - before_ms
        assert answer.statuses[0].limit_remaining == 1

    run(backend_factory, scenario)


def test_nested_descriptor_applies_at_the_last_entry(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        gold = await h.ask([("tenant", "acme"), ("plan", "gold")])
        assert gold.statuses[0].current_limit.requests_per_unit == 2
        assert (await h.ask([("tenant", "acme")])).statuses[0].current_limit is None
        assert (await h.ask([("tenant", "acme"), ("plan", "free")])).statuses[0].current_limit is None
        assert h.rule_metric("total_hits", "tenant", "plan_gold") == 1

    run(backend_factory, scenario)


def test_unknown_domain_is_ok_without_limits(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        answer = await h.ask([("user", "x")], domain="nobody")
        assert answer.overall_code is Code.OK
        assert answer.statuses[0].current_limit is None
        assert h.registry.get_sample_value("ratelimit_domain_not_found_total") == 1

    run(backend_factory, scenario)


class FailingBackend(Backend):
    async def evaluate(self, requests: list[CounterRequest]) -> Decision:  # type: ignore[override]
        raise BackendError("timeout", "redis did not answer within 15 ms")

    async def ping(self) -> None:
        raise BackendError("timeout", "down")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(FailureMode.ALLOW, Code.OK), (FailureMode.DENY, Code.OVER_LIMIT), (FailureMode.UNAVAILABLE, None)],
)
def test_backend_failure_follows_the_failure_mode(mode: FailureMode, expected: Code | None) -> None:
    async def scenario(h: Harness) -> Any:
        return await h.ask([("user", "x")])

    if expected is None:
        with pytest.raises(BackendUnavailable, match=r"^timeout$"):  # the kind, never the text
            run(FailingBackend, scenario, ServiceOptions(failure_mode=mode))
        return
    answer = run(FailingBackend, scenario, ServiceOptions(failure_mode=mode))
    assert answer.overall_code is expected


def test_failure_mode_is_not_consulted_without_limits() -> None:
    async def scenario(h: Harness) -> Any:
        return await h.ask([("unknown-key", "x")])

    answer = run(FailingBackend, scenario, ServiceOptions(failure_mode=FailureMode.DENY))
    assert answer.overall_code is Code.OK


def test_response_headers_come_from_the_most_constrained_descriptor(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        answer = await h.ask([("roomy", "r")], [("user", "r")])
        headers = dict(answer.response_headers)
        assert headers["X-Limit"] == "3"
        assert headers["X-Remaining"] == "2"
        assert 60 <= int(headers["X-Reset"]) <= 62

    options = ServiceOptions(
        response_headers=True, header_limit="X-Limit", header_remaining="X-Remaining", header_reset="X-Reset"
    )
    run(backend_factory, scenario, options)


def test_response_headers_are_off_by_default(backend_factory: Callable[[], Backend]) -> None:
    async def scenario(h: Harness) -> None:
        assert (await h.ask([("user", "r")])).response_headers == ()

    run(backend_factory, scenario)


def test_metrics_count_what_was_charged_never_more_than_the_limit_plus_one(
    backend_factory: Callable[[], Backend],
) -> None:
    """Attack 7: hits_addend 2^64 - 1 made total_hits 1.8e19, where later increments of 1
    vanished in float precision. A request counts at most limit + 1 hits (3/minute here)."""

    async def scenario(h: Harness) -> None:
        biggest = DescriptorRequest(entries=(("user", "m"),), hits_addend=2**64 - 1)
        for _ in range(1000):
            await h.ask(biggest)
        await h.ask([("user", "m2")])
        assert h.rule_metric("total_hits", "user") == 1000 * 4 + 1
        assert h.rule_metric("over_limit", "user") == 1000 * 4
        assert h.rule_metric("within_limit", "user") == 1

    run(backend_factory, scenario)


def test_metric_labels_stay_short_whatever_an_override_key_holds() -> None:
    """Attack 6: labels from a 200 KB override key; each label stays bounded and distinct."""

    async def scenario(h: Harness) -> None:
        for marker in "ab":
            key = marker + "k" * 200_000
            await h.ask(DescriptorRequest(entries=((key, "v"), ("second" * 1000, "w")), override=(10, int(Unit.HOUR))))
        families = list(h.registry.collect())
        labels = {
            sample.labels["key1"]: sample.labels["key2"]
            for family in families
            for sample in family.samples
            if sample.name == "ratelimit_service_rate_limit_total_hits"
        }
        assert len(labels) == 2
        assert all(len(key1) <= MAX_LABEL_CHARS and len(key2) <= MAX_LABEL_CHARS for key1, key2 in labels.items())
        assert all(key1.startswith(("ak", "bk")) for key1 in labels)

    run(MemoryBackend, scenario)
