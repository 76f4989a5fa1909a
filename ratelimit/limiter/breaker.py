"""A circuit breaker in front of a backend: fail fast while the store is down.

After `failure_threshold` consecutive failures the circuit opens: calls fail at once with
BackendError("circuit_open") for `cooldown_s`, instead of each waiting out the Redis
timeout. Then one call is let through as a probe (half-open): success closes the circuit,
failure opens it for another cool-down. So decisions resume within about `cooldown_s` of
the store coming back, with no restart.
"""

from __future__ import annotations

import enum
import time
from typing import Callable, Sequence

from ratelimit.limiter.types import Backend, BackendError, CounterRequest, Decision, WrappingBackend


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker(WrappingBackend):
    def __init__(
        self,
        inner: Backend,
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 0.5,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner)
        self._failure_threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock_s = clock_s
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = CircuitState.CLOSED

    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        self._admit_call()
        try:
            decision = await self._inner.evaluate(requests)
        except BackendError:
            self._record_failure()
            raise
        except BaseException:
            self._probing = False  # cancelled: neither success nor failure of the store
            raise
        self._record_success()
        return decision

    def _admit_call(self) -> None:
        if self.state is CircuitState.CLOSED:
            return
        if self.state is CircuitState.OPEN and self._clock_s() - self._opened_at >= self._cooldown_s:
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return
        raise BackendError(
            "circuit_open", f"redis failed {self._failure_threshold} times in a row; not asking it for a moment"
        )

    def _record_failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self.state is CircuitState.HALF_OPEN or self._failures >= self._failure_threshold:
            self.state = CircuitState.OPEN
            self._opened_at = self._clock_s()

    def _record_success(self) -> None:
        self._probing = False
        self._failures = 0
        self.state = CircuitState.CLOSED
