"""A replica goes away under load: SIGTERM drains it (health NOT_SERVING first, in-flight
calls answered, exit 0); SIGKILL loses no admitted hit, and the other replica answers on."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimit.client import build_request
from ratelimit.config.model import Unit
from tests.faults import probes
from tests.faults.load import Load, Sample, between
from tests.faults.report import FaultTable, fault_row
from tests.support.processes import running_redis
from tests.support.replica import running_replica

# Per hour and far above what a test sends: nothing expires or is rejected meanwhile, so
# every admitted hit must still be in Redis at the end.
LIMITS = "domain: faults\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 1000000}\n"
# Redis stays up here: a generous timeout keeps a busy machine from failing calls.
ROOMY_TIMEOUT = ["--redis-timeout-ms", "1000"]


def admitted(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.answered and s.decided and s.overall == "OK"]


class HealthWatch:
    """A grpc.health.v1 Watch stream, recording (time, status) until NOT_SERVING arrives."""

    def __init__(self, target: str, service: str = "") -> None:
        self.updates: list[tuple[float, int]] = []
        self._channel = grpc.insecure_channel(target)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=30
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for update in self._call:
                self.updates.append((time.monotonic(), int(update.status)))
                if update.status == probes.NOT_SERVING:
                    # An open stream is an in-flight call too: end it, or the drain waits for it.
                    self._call.cancel()
                    return

    def not_serving_at(self) -> float | None:
        return next((at for at, status in self.updates if status == probes.NOT_SERVING), None)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)
        self._channel.close()


def test_sigterm_under_load_turns_health_not_serving_drains_in_flight_calls_and_exits_zero(
    tmp_path: Path, fault_table: FaultTable
) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS)
    entries = [("user", "drain")]
    request = build_request("faults", [entries])
    pause_s = 1.5
    checks: list[tuple[float, str]] = []
    with (
        running_redis() as server,
        redis.Redis.from_url(server.url) as admin,
        running_replica(tmp_path, [limits], redis_url=server.url, extra_args=["--redis-timeout-ms", "5000"]) as replica,
    ):
        watch = HealthWatch(replica.target)
        load = Load(
            [replica.target], lambda _index: request, rate_per_s=200, max_requests=800, max_duration_s=4.0, deadline_s=8
        )
        with load:
            assert load.wait_for(lambda sample: sample.decided, timeout_s=5.0), "no decision before the fault"
            # Hold the calls in Redis for a while: they are in flight when SIGTERM arrives.
            admin.execute_command("CLIENT", "PAUSE", str(int(pause_s * 1000)), "ALL")
            paused_at = time.monotonic()
            held_from = load.started
            # 60 calls out at 200/s: the last 20 are left out of `in_flight` below (they may
            # not have reached the replica), the 40 before them are held in Redis.
            assert probes.wait_until(lambda: load.started >= held_from + 60, 2.0) is not None
            sigterm_at = time.monotonic()
            replica.process.send_signal(signal.SIGTERM)
            while replica.process.poll() is None and time.monotonic() - sigterm_at < 15:
                try:
                    status = probes.health(replica.target, "", timeout_s=0.5)
                    checks.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(status)))
                except grpc.RpcError as exc:
                    checks.append((time.monotonic(), exc.code().name))
                time.sleep(0.05)
            exit_code = replica.terminate(timeout_s=15)
            exited_at = time.monotonic()
            load.stop()
        samples = load.samples
        watch.close()
        counted = probes.counted_hits(admin, probes.sliding_key("faults", entries, Unit.HOUR))
    log = replica.log()

    # Calls sent well before SIGTERM had reached the replica: in flight, waiting on Redis.
    in_flight = between(samples, paused_at, sigterm_at - 0.1)
    after_sigterm = between(samples, sigterm_at, exited_at)
    not_serving_at = watch.not_serving_at()
    drained_at = max((s.done_s for s in in_flight), default=sigterm_at)
    fault_table.add(
        fault_row(
            "replica SIGTERM under load (calls held in Redis)",
            "health NOT_SERVING at once; in-flight calls answered; exit 0; no hit lost or added",
            samples,
            during_fault=in_flight,
            in_flight_at_sigterm=len(in_flight),
            not_serving_after_s=None if not_serving_at is None else not_serving_at - sigterm_at,
            drained_after_s=drained_at - sigterm_at,
            exited_after_s=exited_at - sigterm_at,
            exit_code=exit_code,
            refused_after_sigterm=sum(1 for s in after_sigterm if not s.answered),
            health_checks_during_drain=" ".join(sorted({status for _, status in checks})),
            counted_minus_admitted=counted - len(admitted(samples)),
        )
    )

    assert exit_code == 0
    assert len(in_flight) >= 20
    assert [s for s in in_flight if not (s.decided and s.overall == "OK")] == []
    # Health said NOT_SERVING before the drain was over (Watch streams get the update; new
    # Check calls are refused once the server stops taking calls).
    assert not_serving_at is not None and not_serving_at < drained_at
    # Health Check calls, polled during the drain, said NOT_SERVING first (then, once the server
    # closed, they were refused) and never SERVING again.
    first_not_serving = next((index for index, (_, status) in enumerate(checks) if status != "SERVING"), None)
    assert first_not_serving is not None, f"no NOT_SERVING among {len(checks)} health checks"
    assert checks[first_not_serving][1] == "NOT_SERVING", checks
    assert [status for _, status in checks[first_not_serving:]].count("SERVING") == 0
    # It waited for the calls, not for the whole grace period (10 s).
    assert drained_at - sigterm_at >= 0.5
    assert exited_at - sigterm_at < 6.0
    # Calls after SIGTERM are refused (UNAVAILABLE), not cut off mid-way or left hanging. One
    # that reaches gRPC in the instant the server closes is cancelled by gRPC's core before the
    # service sees it (CANCELLED); only calls sent after SIGTERM may end so, and the count
    # below shows that none of them was charged.
    assert {s.code for s in samples if not s.answered and s.sent_s < sigterm_at} <= {"UNAVAILABLE"}
    assert {s.code for s in samples if not s.answered} <= {"UNAVAILABLE", "CANCELLED"}
    # Every answered call was charged once; refused ones were not charged.
    assert counted == len(admitted(samples))
    assert "draining in-flight calls" in log and "Traceback" not in log


def test_sigkill_under_load_loses_no_admitted_hit_and_the_other_replica_answers_on(
    tmp_path: Path, fault_table: FaultTable
) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS)
    entries = [("user", "survivor")]
    request = build_request("faults", [entries])
    with (
        running_redis() as server,
        redis.Redis.from_url(server.url) as admin,
        running_replica(tmp_path, [limits], redis_url=server.url, extra_args=ROOMY_TIMEOUT) as doomed,
        running_replica(tmp_path, [limits], redis_url=server.url, extra_args=ROOMY_TIMEOUT) as survivor,
    ):
        load = Load(
            [doomed.target, survivor.target],
            lambda _index: request,
            rate_per_s=300,
            max_requests=1200,
            max_duration_s=4.0,
            deadline_s=2.5,
        )
        with load:

            def survivor_admitted() -> int:
                return sum(s.target == 1 for s in admitted(load.samples))

            assert probes.wait_until(lambda: survivor_admitted() >= 200, 5.0) is not None
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            killed_at = time.monotonic()

            def answered_on_after_the_kill() -> bool:
                after = between(load.samples, killed_at, float("inf"))
                return sum(s.target == 0 for s in after) >= 60 and sum(s.target == 1 for s in after) >= 150

            assert probes.wait_until(answered_on_after_the_kill, 5.0) is not None
            load.stop()
        samples = load.samples
        counted = probes.counted_hits(admin, probes.sliding_key("faults", entries, Unit.HOUR))
        survivor_log = survivor.log()

    to_doomed = [s for s in samples if s.target == 0]
    to_survivor = [s for s in samples if s.target == 1]
    # Calls that failed on the killed replica may or may not have been charged before it died.
    lost_in_flight = [s for s in to_doomed if not s.answered and s.sent_s < killed_at]
    fault_table.add(
        fault_row(
            "replica SIGKILL under load (2 replicas)",
            "no admitted hit lost; the other replica answers every call",
            samples,
            during_fault=between(samples, killed_at, float("inf")),
            admitted=len(admitted(samples)),
            counted_in_redis=counted,
            failed_on_killed_in_flight=len(lost_in_flight),
            survivor_failures=sum(1 for s in to_survivor if not s.answered),
        )
    )

    assert len(to_survivor) >= 300 and len(between(to_doomed, killed_at, float("inf"))) >= 50
    assert [s for s in to_survivor if not (s.decided and s.overall == "OK")] == []
    # The killed replica's calls fail fast as UNAVAILABLE, none hangs to its deadline.
    assert {s.code for s in to_doomed if not s.answered} <= {"UNAVAILABLE"}
    assert len(admitted(samples)) <= counted <= len(admitted(samples)) + len(lost_in_flight)
    assert "Traceback" not in survivor_log


def test_an_open_health_watch_does_not_hold_the_drain(tmp_path: Path, fault_table: FaultTable) -> None:
    """A client watching health (grpc.health.v1 Watch, as gRPC clients with health checking
    do) gets NOT_SERVING, and its stream, which never ends by itself, is no in-flight call
    to wait for: the replica exits as soon as its real calls are done."""
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS)
    grace_s = 6.0
    with (
        running_redis() as server,
        running_replica(
            tmp_path, [limits], redis_url=server.url, extra_args=["--shutdown-grace-s", str(grace_s)]
        ) as replica,
        grpc.insecure_channel(replica.target) as channel,
    ):
        updates: list[int] = []
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):
                updates.extend(int(update.status) for update in stream)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        probes.wait_until(lambda: probes.SERVING in updates, 5.0)
        sigterm_at = time.monotonic()
        exit_code = replica.terminate(timeout_s=grace_s + 10)
        exited_after = time.monotonic() - sigterm_at
        stream.cancel()
        reader.join(timeout=5)
    fault_table.add(
        fault_row(
            "replica SIGTERM with a health Watch stream open",
            "the watcher sees NOT_SERVING; the stream does not hold the exit until the grace ends",
            [],
            exited_after_s=exited_after,
            grace_s=grace_s,
            watch_updates=" ".join(health_pb2.HealthCheckResponse.ServingStatus.Name(u) for u in updates),
        )
    )
    assert exit_code == 0
    assert probes.NOT_SERVING in updates
    assert exited_after < grace_s / 2, f"exit took {exited_after:.1f} s of the {grace_s:g} s grace"
