"""Drive a service during a Redis failover and measure the outage and the lost hits."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from ratelimit.client import RateLimitClient


@dataclass
class FailoverRun:
    admitted: int = 0
    failed: int = 0
    first_failure_at: float | None = None
    recovered_at: float | None = None
    fault_at: float | None = None
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def outage_s(self) -> float:
        """From the fault to the first admitted request after it."""
        assert self.fault_at is not None and self.recovered_at is not None, "never recovered"
        return self.recovered_at - self.fault_at


def drive_through_fault(
    targets: list[str],
    descriptor: list[tuple[str, str]],
    domain: str,
    fault: Callable[[], None],
    *,
    before_s: float = 1.0,
    max_after_s: float = 30.0,
    settle_s: float = 1.0,
    rate_per_s: float = 200.0,
) -> FailoverRun:
    """Send requests round-robin (bounded in rate and time); run `fault` after `before_s`."""
    run = FailoverRun()
    lock = threading.Lock()
    stop = threading.Event()

    def loop(worker: int) -> None:
        clients = [RateLimitClient(target, timeout_s=1.0) for target in targets]
        interval = len(targets) * 2 / rate_per_s
        sent = 0
        try:
            while not stop.is_set() and sent < 100_000:
                client = clients[(worker + sent) % len(clients)]
                sent += 1
                try:
                    ok = client.should_rate_limit(domain, [descriptor]).overall_code == "OK"
                except grpc.RpcError as exc:
                    with lock:
                        run.failed += 1
                        name = exc.code().name
                        run.errors[name] = run.errors.get(name, 0) + 1
                        if run.fault_at is not None and run.first_failure_at is None:
                            run.first_failure_at = time.monotonic()
                    time.sleep(0.01)
                    continue
                with lock:
                    run.admitted += ok
                    if ok and run.fault_at is not None and run.recovered_at is None and run.first_failure_at:
                        run.recovered_at = time.monotonic()
                time.sleep(interval)
        finally:
            for client in clients:
                client.close()

    threads = [threading.Thread(target=loop, args=(worker,)) for worker in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(before_s)
    run.fault_at = time.monotonic()
    fault()
    deadline = time.monotonic() + max_after_s
    while time.monotonic() < deadline:
        if run.recovered_at is not None or (run.first_failure_at is None and time.monotonic() - run.fault_at > 5):
            break
        time.sleep(0.05)
    time.sleep(settle_s)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    if run.first_failure_at is None:  # the fault never showed: no outage at all
        run.recovered_at = run.fault_at
    return run
