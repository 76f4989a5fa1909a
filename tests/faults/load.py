"""A bounded open-loop load generator: a steady rate of ShouldRateLimit calls over a few
gRPC channels, each call with a deadline, every outcome and latency recorded.

Open loop: calls are started on a fixed schedule whatever the answers, so a slow or hung
server shows as latency and deadline failures instead of silently slowing the load down.
Every run is bounded in count and in time; `stop()` ends it early.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import grpc

from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

RequestFactory = Callable[[int], rls_pb2.RateLimitRequest]
CODE_NAME = rls_pb2.RateLimitResponse.Code.Name


@dataclass(frozen=True, slots=True)
class Sample:
    """One call: when it was started and finished (time.monotonic), and what came back."""

    index: int
    target: int  # position of the target in the list the load was given
    sent_s: float
    done_s: float
    code: str  # "OK" for an answer (whatever its overall code), else the gRPC status name
    overall: str = ""  # the answer's overall code: "OK" or "OVER_LIMIT"
    requests_per_unit: int | None = None  # the first status's current limit
    limit_remaining: int | None = None
    decided: bool = False  # the first status has a reset time: a decision made with the store
    details: str = ""

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s

    @property
    def answered(self) -> bool:
        return self.code == "OK"


def sample_from_response(
    index: int, target: int, sent_s: float, done_s: float, response: rls_pb2.RateLimitResponse
) -> Sample:
    first = response.statuses[0] if response.statuses else None
    return Sample(
        index=index,
        target=target,
        sent_s=sent_s,
        done_s=done_s,
        code="OK",
        overall=CODE_NAME(response.overall_code),
        requests_per_unit=(
            first.current_limit.requests_per_unit if first is not None and first.HasField("current_limit") else None
        ),
        limit_remaining=first.limit_remaining if first is not None else None,
        decided=first is not None and first.HasField("duration_until_reset"),
    )


class Load:
    """`rate_per_s` calls a second, round-robin over `channels_per_target` channels per target,
    until `max_requests` were started, `max_duration_s` passed, or `stop()` was called."""

    def __init__(
        self,
        targets: Sequence[str],
        request_for: RequestFactory,
        *,
        rate_per_s: float,
        max_requests: int,
        max_duration_s: float,
        channels_per_target: int = 2,
        deadline_s: float = 2.0,
        credentials: grpc.ChannelCredentials | None = None,
        wait_for_channels: bool = True,
    ) -> None:
        self.targets = list(targets)
        self._credentials = credentials
        self._wait_for_channels = wait_for_channels
        self._request_for = request_for
        self._rate_per_s = rate_per_s
        self._max_requests = max_requests
        self._max_duration_s = max_duration_s
        self._channels_per_target = channels_per_target
        self.deadline_s = deadline_s
        self._samples: list[Sample] = []
        self.started = 0  # calls sent so far: tests wait on this, not on the clock
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name="fault-load", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        self.join()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=15):
            raise TimeoutError(f"load: channels to {self.targets} not ready after 15 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> list[Sample]:
        # Every call has a deadline, so the thread ends at most that long after the last start.
        self._thread.join(timeout=self._max_duration_s + self.deadline_s + 15)
        if self._thread.is_alive():
            raise TimeoutError("load: calls still running long after their deadline")
        if self._error is not None:
            raise self._error
        return self.samples

    @property
    def samples(self) -> list[Sample]:
        return list(self._samples)

    def wait_for(self, predicate: Callable[[Sample], bool], timeout_s: float) -> Sample | None:
        """The first finished call (in finishing order) that satisfies `predicate`, waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            snapshot = self.samples
            for sample in snapshot[seen:]:
                if predicate(sample):
                    return sample
            seen = len(snapshot)
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return None
            time.sleep(0.005)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported to the test by start() / join()
            self._error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        per_target = range(self._channels_per_target)
        channels = [self._channel(target) for target in self.targets for _ in per_target]
        try:
            if self._wait_for_channels:
                await asyncio.wait_for(asyncio.gather(*(channel.channel_ready() for channel in channels)), 15)
            stubs = [rls_pb2_grpc.RateLimitServiceStub(channel) for channel in channels]
            loop = asyncio.get_running_loop()
            calls: set[asyncio.Task[None]] = set()
            start = loop.time()
            self._ready.set()
            for index in range(self._max_requests):
                due = start + index / self._rate_per_s
                if self._stop.is_set() or due - start > self._max_duration_s:
                    break
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                channel_number = index % len(stubs)
                call = asyncio.create_task(
                    self._call(index, channel_number // self._channels_per_target, stubs[channel_number])
                )
                calls.add(call)
                call.add_done_callback(calls.discard)
            if calls:
                await asyncio.gather(*calls)
        finally:
            for channel in channels:
                await channel.close()

    def _channel(self, target: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, self._credentials)

    async def _call(self, index: int, target: int, stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
        request = self._request_for(index)
        sent_s = time.monotonic()
        self.started += 1
        try:
            response = await stub.ShouldRateLimit(request, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self._samples.append(
                Sample(index, target, sent_s, time.monotonic(), exc.code().name, details=exc.details() or "")
            )
            return
        self._samples.append(sample_from_response(index, target, sent_s, time.monotonic(), response))


def percentile(values: Iterable[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def failures_by_code(samples: Iterable[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(sample.code for sample in samples if not sample.answered).items()))


def between(samples: Iterable[Sample], start_s: float, end_s: float) -> list[Sample]:
    """The calls started in [start_s, end_s)."""
    return [sample for sample in samples if start_s <= sample.sent_s < end_s]
