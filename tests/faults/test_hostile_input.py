"""Hostile input through the real gRPC server: whatever a client sends, it gets a valid
answer or a clear status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) with a message, before
its deadline; the replica logs no traceback; Redis keys keep a fixed length, counts stay
exact and non-negative, and metric label sets stay bounded."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ratelimit.config.model import Unit
from ratelimit.generated.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from tests.faults import probes
from tests.faults.report import FaultTable, outcome_row
from tests.support.counters import slot_count
from tests.support.processes import RedisServer, running_redis
from tests.support.replica import ReplicaProcess, running_replica

CONFIG = """\
domain: fuzz
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
  - key: detail
    detailed_metric: true
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
  - key: path
    value: "/api/*"
    rate_limit: {unit: hour, requests_per_unit: 100000}
  - key: dup
    rate_limit: {unit: hour, requests_per_unit: 5}
  - key: tenant
    descriptors:
      - key: plan
        rate_limit: {unit: hour, requests_per_unit: 1000}
"""
TRACKED = ("user", "tracked")  # the well-known counter whose hits the fuzz ledger tracks
TRACKED_LIMIT = 1_000_000_000
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DESCRIPTORS = 64
UINT32, UINT64 = 2**32 - 1, 2**64 - 1
VALID_UNITS = range(1, 8)
# The defaults of --max-entry-bytes, --max-descriptor-entries and --max-override-unit (day).
MAX_ENTRY_BYTES = 4096
MAX_DESCRIPTOR_ENTRIES = 32
OVERRIDE_UNITS = (Unit.SECOND, Unit.MINUTE, Unit.HOUR, Unit.DAY)
# "ratelimit:" + "{" 16 hex "}" + ":" + 40 hex (BLAKE2b-160), whatever the request held.
KEY_PATTERN = re.compile(rb"^ratelimit:\{[0-9a-f]{16}\}:[0-9a-f]{40}$")
CLEAR_ERRORS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
CALL_DEADLINE_S = 10.0
FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": list(HealthCheck),
}


@dataclass
class Ledger:
    """What the fuzz sent and got, and the hits the tracked counter must hold."""

    tracked_hits: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    worst_latency_s: float = 0.0


@dataclass
class Fuzzed:
    replica: ReplicaProcess
    store: redis.Redis
    stub: rls_pb2_grpc.RateLimitServiceStub
    ledger: Ledger


@pytest.fixture(scope="module")
def fuzz_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, fuzz_redis: RedisServer) -> Iterator[Fuzzed]:
    """One replica, one channel and one ledger for the whole module."""
    directory = tmp_path_factory.mktemp("hostile")
    limits = directory / "limits.yaml"
    limits.write_text(CONFIG)
    with (
        running_replica(
            directory, [limits], redis_url=fuzz_redis.url, extra_args=["--redis-timeout-ms", "2000"]
        ) as replica,
        grpc.insecure_channel(replica.target) as channel,
        redis.Redis.from_url(fuzz_redis.url) as store,
    ):
        yield Fuzzed(replica, store, rls_pb2_grpc.RateLimitServiceStub(channel), Ledger())


# --- what a hostile client may send --------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, about in proportion to its weight: hostile ingredients are
    rare enough that most requests are valid and reach Redis. Hypothesis favours the first
    choice (it shrinks towards it), so the common case goes first."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


short_text = st.text(max_size=24)
named_keys = st.sampled_from(["user", "detail", "path", "tenant", "plan", "dup", "nowhere"])
keys = weighted((150, named_keys), (50, st.text(min_size=1, max_size=24)), (1, st.just("")))
values = weighted((4, st.sampled_from(["tracked", "", "/api/x", "*", "/api/*"])), (6, short_text))
# 1,000 to 100,000 characters (up to 400 KB of UTF-8), around and far beyond the caps.
long_values = st.builds(lambda seed, length: (seed * length)[:length], st.text(min_size=1, max_size=4),
                        st.integers(1_000, 100_000))  # fmt: skip
descriptor_hits = weighted(
    (6, st.none()), (2, st.sampled_from([0, 1, 2, UINT32, UINT64])), (2, st.integers(0, UINT64)), (2, st.integers(0, 9))
)
request_hits = weighted((6, st.sampled_from([0, 1])), (2, st.sampled_from([2, UINT32])), (2, st.integers(0, UINT32)))
overrides = weighted(
    (8, st.none()),
    (
        2,
        st.tuples(
            st.one_of(st.sampled_from([0, 1, 5, TRACKED_LIMIT, UINT32]), st.integers(0, UINT32)),
            weighted((38, st.sampled_from(VALID_UNITS)), (1, st.just(0)), (1, st.integers(-3, 12))),
        ),
    ),
)
entry_lists = weighted(
    (25, st.just([TRACKED])), (75, st.lists(st.tuples(keys, values), min_size=1, max_size=4)), (1, st.just([]))
)


@st.composite
def descriptors(draw: st.DrawFn, entries: st.SearchStrategy[list[tuple[str, str]]] = entry_lists
                ) -> ratelimit_pb2.RateLimitDescriptor:  # fmt: skip
    descriptor = ratelimit_pb2.RateLimitDescriptor()
    for key, value in draw(entries):
        descriptor.entries.add(key=key, value=value)
    override = draw(overrides)
    if override is not None:
        descriptor.limit.requests_per_unit, descriptor.limit.unit = override
    hits = draw(descriptor_hits)
    if hits is not None:
        descriptor.hits_addend.value = hits
    return descriptor


domains = weighted((24, st.just("fuzz")), (4, st.text(min_size=1, max_size=24)), (1, st.just("")))
# 0..100 descriptors: mostly a few, often up to and beyond the 64 accepted.
descriptor_counts = weighted(
    (16, st.integers(1, 6)), (6, st.integers(7, MAX_DESCRIPTORS)), (2, st.integers(65, 100)), (1, st.just(0))
)


@st.composite
def requests(draw: st.DrawFn) -> rls_pb2.RateLimitRequest:
    request = rls_pb2.RateLimitRequest(domain=draw(domains), hits_addend=draw(request_hits))
    for _ in range(draw(descriptor_counts)):
        request.descriptors.append(draw(descriptors()))
    return request


@st.composite
def big_requests(draw: st.DrawFn) -> rls_pb2.RateLimitRequest:
    """Long keys and values, often beyond the 1 MiB a message may have."""
    long_entries = st.lists(
        st.tuples(weighted((4, named_keys), (1, long_values)), weighted((1, short_text), (3, long_values))),
        min_size=1,
        max_size=2,
    )
    request = rls_pb2.RateLimitRequest(domain=draw(weighted((4, st.just("fuzz")), (1, long_values))))
    for _ in range(draw(st.integers(1, 16))):
        request.descriptors.append(draw(descriptors(weighted((1, st.just([TRACKED])), (4, long_entries)))))
    return request


def sized_request(size: int) -> rls_pb2.RateLimitRequest:
    """A valid request of exactly `size` bytes."""
    request = rls_pb2.RateLimitRequest(domain="fuzz")
    entry = request.descriptors.add().entries.add(key="user", value="")
    entry.value = "x" * (size - request.ByteSize())
    while request.ByteSize() > size:  # the length prefix grew with the value
        entry.value = entry.value[:-1]
    assert request.ByteSize() == size
    return request


# --- what the answer must be ---------------------------------------------------------


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def expected_error(request: rls_pb2.RateLimitRequest) -> str | None:
    """The status the README's table promises for this request, None for an answer."""
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        return "RESOURCE_EXHAUSTED"
    if not request.domain or not request.descriptors or len(request.descriptors) > MAX_DESCRIPTORS:
        return "INVALID_ARGUMENT"
    if utf8_bytes(request.domain) > MAX_ENTRY_BYTES:
        return "INVALID_ARGUMENT"
    for descriptor in request.descriptors:
        if not descriptor.entries or any(not entry.key for entry in descriptor.entries):
            return "INVALID_ARGUMENT"
        if len(descriptor.entries) > MAX_DESCRIPTOR_ENTRIES:
            return "INVALID_ARGUMENT"
        if any(max(utf8_bytes(e.key), utf8_bytes(e.value)) > MAX_ENTRY_BYTES for e in descriptor.entries):
            return "INVALID_ARGUMENT"
        if descriptor.HasField("limit") and descriptor.limit.unit not in OVERRIDE_UNITS:
            return "INVALID_ARGUMENT"
    return None


def tracked_charge(request: rls_pb2.RateLimitRequest) -> int:
    """Hits an admitted request adds to the tracked counter (hour unit; an override with
    another unit is another counter)."""
    charge = 0
    for descriptor in request.descriptors:
        if [(entry.key, entry.value) for entry in descriptor.entries] != [TRACKED]:
            continue
        limit = TRACKED_LIMIT
        if descriptor.HasField("limit"):
            if descriptor.limit.unit != Unit.HOUR:
                continue
            limit = descriptor.limit.requests_per_unit
        hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else (request.hits_addend or 1)
        charge += min(hits, limit + 1)
    return charge


def call_and_check(fuzzed: Fuzzed, request: rls_pb2.RateLimitRequest) -> None:
    expected = expected_error(request)
    started = time.monotonic()
    try:
        response = fuzzed.stub.ShouldRateLimit(request, timeout=CALL_DEADLINE_S)
    except grpc.RpcError as exc:
        fuzzed.ledger.worst_latency_s = max(fuzzed.ledger.worst_latency_s, time.monotonic() - started)
        code = exc.code().name
        fuzzed.ledger.outcomes[code] += 1
        assert code == expected, f"{code}: {exc.details()!r}, expected {expected}"
        assert exc.details(), f"{code} without a message"
        return
    fuzzed.ledger.worst_latency_s = max(fuzzed.ledger.worst_latency_s, time.monotonic() - started)
    overall = rls_pb2.RateLimitResponse.Code.Name(response.overall_code)
    fuzzed.ledger.outcomes[overall] += 1
    assert expected is None, f"answered {overall}, expected {expected}"
    assert overall in ("OK", "OVER_LIMIT")
    assert len(response.statuses) == len(request.descriptors)
    for status in response.statuses:
        assert status.code in (rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT)
    if request.domain == "fuzz" and overall == "OK":
        fuzzed.ledger.tracked_hits += tracked_charge(request)


def check_store(fuzzed: Fuzzed) -> dict[str, Any]:
    """Keys of fixed length with a TTL, bucket counts that are non-negative integers, and
    the tracked counter holding exactly the hits of the admitted requests."""
    store = fuzzed.store
    keys = list(store.scan_iter(count=1000))
    assert keys
    assert [key for key in keys if not KEY_PATTERN.match(key)] == []
    for key in keys:
        assert store.pttl(key) != -1, f"{key!r} has no TTL"  # -2: expired meanwhile (second units)
        assert 1 <= slot_count(store, key) <= 41, key  # decodes as the README's layout, at most K + 1 buckets
    tracked = probes.counted_hits(store, probes.sliding_key("fuzz", [TRACKED], Unit.HOUR))
    assert tracked == fuzzed.ledger.tracked_hits
    assert "Traceback" not in fuzzed.replica.log()
    return {"keys": len(keys), "max_key_bytes": max(len(key) for key in keys), "tracked_hits": tracked}


def _tracked(hits: int | None) -> ratelimit_pb2.RateLimitDescriptor:
    descriptor = ratelimit_pb2.RateLimitDescriptor()
    descriptor.entries.add(key=TRACKED[0], value=TRACKED[1])
    if hits is not None:
        descriptor.hits_addend.value = hits
    return descriptor


# --- the promises --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value_kind",
    [
        pytest.param("short", id="short-unicode-values"),
        pytest.param("long", id="values-up-to-100k"),
    ],
)
def test_any_request_gets_an_answer_or_a_clear_error_and_counts_stay_exact(
    fuzzed: Fuzzed, fault_table: FaultTable, value_kind: str
) -> None:
    strategy, examples = (requests(), 1200) if value_kind == "short" else (big_requests(), 150)
    before = Counter(fuzzed.ledger.outcomes)

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(request=strategy)
    @example(request=rls_pb2.RateLimitRequest(domain="fuzz", descriptors=[_tracked(UINT64)]))
    @example(request=rls_pb2.RateLimitRequest(domain="fuzz", hits_addend=UINT32, descriptors=[_tracked(None)]))
    @example(request=rls_pb2.RateLimitRequest(domain="fuzz", descriptors=[_tracked(None)] * 64))
    @example(request=rls_pb2.RateLimitRequest(domain="fuzz", descriptors=[_tracked(None)] * 65))
    @example(request=sized_request(MAX_MESSAGE_BYTES))
    @example(request=sized_request(MAX_MESSAGE_BYTES + 1))
    def one_request(request: rls_pb2.RateLimitRequest) -> None:
        call_and_check(fuzzed, request)

    one_request()
    store_figures = check_store(fuzzed)
    sent = Counter(fuzzed.ledger.outcomes)
    sent.subtract(before)
    fault_table.add(
        outcome_row(
            f"hostile ShouldRateLimit fuzz ({value_kind} values)",
            "valid answer or INVALID_ARGUMENT/RESOURCE_EXHAUSTED with a message; exact counts; fixed key size",
            sent,
            answered_over_limit=sent["OVER_LIMIT"],
            worst_latency_ms=fuzzed.ledger.worst_latency_s * 1000,
            **store_figures,
        )
    )


def test_a_request_naming_one_counter_twice_never_admits_more_than_the_limit(fuzzed: Fuzzed) -> None:
    """Two descriptors of one request on one counter (limit 5) with 3 hits each: 6 hits do
    not fit, so the request is rejected and charges nothing."""
    value = f"twice-{time.monotonic_ns()}"
    twice = ratelimit_pb2.RateLimitDescriptor(entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="dup", value=value)])
    response = fuzzed.stub.ShouldRateLimit(
        rls_pb2.RateLimitRequest(domain="fuzz", hits_addend=3, descriptors=[twice, twice]), timeout=CALL_DEADLINE_S
    )
    counted = probes.counted_hits(fuzzed.store, probes.sliding_key("fuzz", [("dup", value)], Unit.HOUR))
    assert counted == 0, f"a rejected request charged {counted} hits"
    assert response.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT


@pytest.fixture
def bare_replica(tmp_path: Path, fuzz_redis: RedisServer) -> Iterator[ReplicaProcess]:
    limits = tmp_path / "limits.yaml"
    limits.write_text(CONFIG)
    with running_replica(tmp_path, [limits], redis_url=fuzz_redis.url) as replica:
        yield replica


def test_bytes_that_are_no_request_get_a_clear_error_and_no_traceback(
    bare_replica: ReplicaProcess, fault_table: FaultTable
) -> None:
    outcomes: Counter[str] = Counter()
    with grpc.insecure_channel(bare_replica.target) as channel:
        raw_call = channel.unary_unary("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")

        @settings(max_examples=200, **FUZZ_SETTINGS)
        @given(payload=st.binary(max_size=300))
        @example(payload=b"\xff\xff\xff")  # a truncated varint: no protobuf message
        @example(payload=b"\x0a\x05ab")  # a length beyond the end
        def one_payload(payload: bytes) -> None:
            try:
                raw_call(payload, timeout=CALL_DEADLINE_S)
            except grpc.RpcError as exc:
                outcomes[exc.code().name] += 1
                assert exc.code().name in CLEAR_ERRORS, f"{exc.code().name}: {exc.details()!r}"
                assert exc.details()
                return
            outcomes["OK"] += 1

        try:
            one_payload()
        finally:
            fault_table.add(
                outcome_row(
                    "undecodable bytes as ShouldRateLimit",
                    "INVALID_ARGUMENT with a message, no traceback in the log",
                    outcomes,
                    tracebacks_in_log=bare_replica.log().count("Traceback"),
                )
            )
    assert "Traceback" not in bare_replica.log()


# --- metric label sets ---------------------------------------------------------------

MAX_LABEL_SETS = 10_000  # per replica (README, Metrics)
HITS_SERIES = "ratelimit_service_rate_limit_total_hits"


def label_sets(body: str) -> dict[tuple[str, str, str], float]:
    sets = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == HITS_SERIES:
                sets[(sample.labels["domain"], sample.labels["key1"], sample.labels["key2"])] = sample.value
    return sets


def test_metric_label_sets_stay_bounded_whatever_the_request_values(
    tmp_path: Path, fuzz_redis: RedisServer, fault_table: FaultTable
) -> None:
    """Random values on rules without detailed_metric add no label set; a detailed_metric
    rule adds one per value, up to the cap, and the hits beyond it count under _other_."""
    limits = tmp_path / "limits.yaml"
    limits.write_text(CONFIG)
    fixed_keys = ("user", "path", "tenant", "nowhere")
    outcomes: Counter[str] = Counter()

    def ask(stub: rls_pb2_grpc.RateLimitServiceStub, request: rls_pb2.RateLimitRequest) -> None:
        response = stub.ShouldRateLimit(request, timeout=CALL_DEADLINE_S)
        outcomes[rls_pb2.RateLimitResponse.Code.Name(response.overall_code)] += 1

    with (
        running_replica(tmp_path, [limits], redis_url=fuzz_redis.url) as replica,
        grpc.insecure_channel(replica.target) as channel,
    ):
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        declared = label_sets(probes.scrape(replica.metrics_port))
        random_values = st.lists(st.tuples(st.sampled_from(fixed_keys), values, st.booleans()), min_size=1,
                                 max_size=MAX_DESCRIPTORS)  # fmt: skip

        @settings(max_examples=300, **FUZZ_SETTINGS)
        @given(batch=random_values)
        def random_value_request(batch: list[tuple[str, str, bool]]) -> None:
            request = rls_pb2.RateLimitRequest(domain="fuzz")
            for key, value, with_override in batch:
                descriptor = request.descriptors.add()
                if key == "tenant":
                    descriptor.entries.add(key="tenant", value=value)
                    descriptor.entries.add(key="plan", value=value)
                else:
                    descriptor.entries.add(key=key, value=value)
                if with_override:
                    descriptor.limit.requests_per_unit, descriptor.limit.unit = 1_000_000, Unit.HOUR
            ask(stub, request)

        random_value_request()
        after_random = label_sets(probes.scrape(replica.metrics_port))
        # An override labels by keys only: one label set per key tuple, here the fixed keys.
        override_sets = {("fuzz", key, "plan" if key == "tenant" else "") for key in fixed_keys}

        # A detailed_metric rule: one label set per value, until the replica's cap.
        detail_hits = 0
        values_sent = MAX_LABEL_SETS + 100
        for first in range(0, values_sent, MAX_DESCRIPTORS):
            request = rls_pb2.RateLimitRequest(domain="fuzz")
            for number in range(first, min(first + MAX_DESCRIPTORS, values_sent)):
                request.descriptors.add().entries.add(key="detail", value=f"v{number}")
                detail_hits += 1
            ask(stub, request)
        after_detail = label_sets(probes.scrape(replica.metrics_port))
        log = replica.log()

    detail_sets = {labels for labels in after_detail if labels[1].startswith("detail_")}
    overflow = ("fuzz", "_other_", "")
    fault_table.add(
        outcome_row(
            "random request values vs Prometheus label sets",
            "no label set per value unless detailed_metric; then capped, overflow under _other_",
            outcomes,
            label_sets_declared=len(declared),
            label_sets_after_random_values=len(after_random),
            label_sets_after_detailed=len(after_detail),
            detailed_values_sent=values_sent,
            hits_under_other=after_detail.get(overflow, 0),
        )
    )

    assert set(after_random) <= set(declared) | override_sets
    assert len(after_detail) <= MAX_LABEL_SETS + 1
    assert overflow in after_detail
    assert set(after_random) <= set(after_detail)
    assert sum(after_detail[labels] for labels in detail_sets) + after_detail[overflow] == detail_hits
    assert "Traceback" not in log
