"""The limiter's contract: what a backend is asked, what it answers, how it fails.

A backend evaluates all counters of one request atomically: either every enforcing
counter has room and all of them are charged, or none is charged (all-or-nothing).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Sequence

from ratelimit.limiter.window import WindowSpec


class Role(enum.IntEnum):
    """How an over-limit counter affects admission (the number is what the script sees).

    - ENFORCE: rejects the request.
    - SHADOW: never rejects (shadow_mode rules); charged like the others when admitted.
    - QUOTA: a soft limit (quota_mode rules): rejects only when the request has quota
      counters and every one of them is over, as envoyproxy/ratelimit.
    """

    SHADOW = 0
    ENFORCE = 1
    QUOTA = 2


def admits(roles: Sequence[Role], over_limit: Sequence[bool]) -> bool:
    """The admission rule; `lua/evaluate.lua` implements the same."""
    quota = [over for role, over in zip(roles, over_limit) if role is Role.QUOTA]
    if quota and all(quota):
        return False
    return not any(over for role, over in zip(roles, over_limit) if role is Role.ENFORCE)


@dataclass(frozen=True, slots=True)
class CounterRequest:
    """One descriptor's share of a request; `hits` may be 0 (check only)."""

    key: str
    limit: int
    window: WindowSpec
    hits: int
    role: Role = Role.ENFORCE


@dataclass(frozen=True, slots=True)
class CounterResult:
    """The state of one counter after the decision.

    `used` counts the hits in the current window, including this request's hits when
    the request was admitted. `reset_ms` is the promise of the status: for an over-limit
    counter, the wait after which the same request fits again if nobody else consumes
    room; otherwise the wait until the oldest counted hit leaves the window.
    """

    over_limit: bool
    used: int
    reset_ms: int

    def remaining(self, limit: int) -> int:
        return max(0, limit - self.used)


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    now_ms: int  # the store's clock at the decision (Redis TIME for the Redis backend)
    results: tuple[CounterResult, ...]


class BackendError(Exception):
    """A store failure, translated once at the backend's edge.

    `kind` is a short, bounded label ("timeout", "connection", "script", "other") used
    by the failure mode and by metrics.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Backend(abc.ABC):
    """A counter store with sliding- and fixed-window semantics."""

    @abc.abstractmethod
    async def evaluate(self, requests: Sequence[CounterRequest]) -> Decision:
        """Decide and charge all counters of one request atomically."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise BackendError when the store cannot answer."""

    async def prepare(self) -> None:  # noqa: B027 - optional hook
        """Connect and load what the first request needs (failures are the caller's to log)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class WrappingBackend(Backend):
    """A backend in front of another (cache, circuit breaker): the rest is delegated."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner

    async def ping(self) -> None:
        await self._inner.ping()

    async def prepare(self) -> None:
        await self._inner.prepare()

    async def close(self) -> None:
        await self._inner.close()
