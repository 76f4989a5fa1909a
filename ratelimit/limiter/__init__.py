"""Counting hits against limits: the window arithmetic, the backend contract, two stores."""

from __future__ import annotations

from ratelimit.limiter.types import Backend, BackendError, CounterRequest, CounterResult, Decision, Role
from ratelimit.limiter.window import WindowSpec

__all__ = ["Backend", "BackendError", "CounterRequest", "CounterResult", "Decision", "Role", "WindowSpec"]
