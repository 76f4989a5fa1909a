"""A load-generating process: closed-loop (fixed concurrency) or open-loop (fixed rate).

The orchestrator keeps a few of these alive for the whole run and sends each phase as a
`Phase` through a pipe; they reply with a `PhaseResult`. All processes share one clock
(CLOCK_MONOTONIC), so every worker measures the same window [measure_from, measure_to).
Latency is measured from the instant a call was due (open loop) or sent (closed loop),
so a stalled server is not hidden by a stalled client (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import grpc

from benchlib.workload import RequestSource
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
# Open loop: calls beyond this many in flight are not sent and count as dropped.
MAX_IN_FLIGHT = 2048
# Every phase is bounded in time (measure_to) and, as a backstop, in calls per load process.
MAX_CALLS_PER_PHASE = 1_000_000


@dataclass(frozen=True)
class Phase:
    target: str
    scenario: str
    salt: str
    seed: int
    start_at: float  # time.monotonic() at which load starts (warm-up first)
    measure_from: float
    measure_to: float
    concurrency: int = 32  # closed loop
    rate: float = 0.0  # open loop when > 0: calls per second from this worker
    timeout_s: float = 2.0


@dataclass
class PhaseResult:
    completed: int = 0  # answered OK or OVER_LIMIT within the window
    over_limit: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    offered: int = 0  # open loop: calls due within the window
    dropped: int = 0  # open loop: due calls not sent (too many in flight)
    latencies_ms: bytes = b""  # array('d') of the calls that ended in the window, failed ones included


class _Recorder:
    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.result = PhaseResult()
        self.latencies = array("d")

    def record(self, due: float, response: rls_pb2.RateLimitResponse | None, error: str | None) -> None:
        done = time.monotonic()
        if not self.phase.measure_from <= done < self.phase.measure_to:
            return
        # A failed call counts in the latencies too, at the time it took to fail.
        self.latencies.append((done - due) * 1000.0)
        if error is not None:
            self.result.errors[error] = self.result.errors.get(error, 0) + 1
            return
        self.result.completed += 1
        if response is not None and response.overall_code == OVER_LIMIT:
            self.result.over_limit += 1


async def _call(
    stub: rls_pb2_grpc.RateLimitServiceStub, request: rls_pb2.RateLimitRequest, due: float, recorder: _Recorder
) -> None:
    try:
        response = await stub.ShouldRateLimit(request, timeout=recorder.phase.timeout_s)
    except grpc.aio.AioRpcError as exc:
        recorder.record(due, None, exc.code().name)
    else:
        recorder.record(due, response, None)


async def _closed_loop(stub: rls_pb2_grpc.RateLimitServiceStub, source: RequestSource, recorder: _Recorder) -> None:
    end = recorder.phase.measure_to
    budget = MAX_CALLS_PER_PHASE

    async def caller() -> None:
        nonlocal budget
        while time.monotonic() < end and budget > 0:
            budget -= 1
            await _call(stub, source.next(), time.monotonic(), recorder)

    await asyncio.gather(*(caller() for _ in range(recorder.phase.concurrency)))


async def _open_loop(stub: rls_pb2_grpc.RateLimitServiceStub, source: RequestSource, recorder: _Recorder) -> None:
    phase = recorder.phase
    interval = 1.0 / phase.rate
    in_flight: set[asyncio.Task[None]] = set()
    sent = 0
    while True:
        now = time.monotonic()
        due = phase.start_at + sent * interval
        if due >= phase.measure_to or sent >= MAX_CALLS_PER_PHASE:
            break
        while due <= now and due < phase.measure_to:
            if phase.measure_from <= due:
                recorder.result.offered += 1
            if len(in_flight) >= MAX_IN_FLIGHT:
                if phase.measure_from <= due:
                    recorder.result.dropped += 1
            else:
                task = asyncio.create_task(_call(stub, source.next(), due, recorder))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            sent += 1
            due = phase.start_at + sent * interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    if in_flight:
        await asyncio.wait(in_flight, timeout=phase.timeout_s + 0.5)


async def run_phase(phase: Phase) -> PhaseResult:
    recorder = _Recorder(phase)
    source = RequestSource(phase.scenario, phase.salt, phase.seed)
    async with grpc.aio.insecure_channel(phase.target) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        await asyncio.sleep(max(0.0, phase.start_at - time.monotonic()))
        if phase.rate > 0:
            await _open_loop(stub, source, recorder)
        else:
            await _closed_loop(stub, source, recorder)
    recorder.result.latencies_ms = recorder.latencies.tobytes()
    return recorder.result


def serve_phases(connection: Connection) -> None:
    """Process entry point: say "ready" once imports are done, then run phases until told to stop (None)."""
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        connection.send("ready")
        while True:
            phase = connection.recv()
            if phase is None:
                break
            try:
                connection.send(asyncio.run(run_phase(phase)))
            except Exception as exc:  # reported to the orchestrator, which fails the phase
                connection.send(exc)
