"""When a script call waits for others, so that calls close together share one write to Redis.

Every write costs Redis (and the server) a wake-up, a read and a reply: on the 2-core machines
this project is measured on, about 40 us of Redis CPU for a call that arrives alone, against
about 2 us each for 64 in one read (README, "The state tier"). Under load calls still arrive one
at a time (grpc.aio wakes one handler per turn), so batches do not form by themselves; a window
forms them, as `REDIS_PIPELINE_WINDOW` and `REDIS_PIPELINE_LIMIT` do in envoyproxy/ratelimit.

Unlike a fixed window, this one holds a call only when the previous call came less than a window
ago: a call after a quiet spell goes out at once, so a light load pays nothing. With a
`min_rate`, only while calls also arrived faster than that over the last rate interval, so a
replica below that load never waits at all. A call held waits at most the window, or less when
`limit` calls are held.

The rate is a count over a tenth of a second, not an average of the last few gaps: the gaps
of calls from many clients are near exponential, so an average of eight strays 35% either way,
and a gate at 2,000 calls/s held one call in six of a steady 1,500/s (simulated); 150 calls
counted stray 8%, and it holds none (at 1,800/s, 7-9%; at 2,200/s, 89-91%, over two seeds).
"""

from __future__ import annotations

import math

# The span over which calls are counted for the rate; a change of load takes effect within two.
RATE_INTERVAL_S = 0.1


class PipelineWindow:
    def __init__(self, window_s: float, limit: int = 0, min_rate: float = 0.0) -> None:
        if not 0.0 <= window_s < math.inf:
            raise ValueError(f"pipeline window must be a finite number of seconds >= 0, not {window_s!r}")
        if limit < 0:
            raise ValueError(f"pipeline limit must be >= 0 (0: no limit), not {limit!r}")
        if not 0.0 <= min_rate < math.inf:
            raise ValueError(f"pipeline minimum rate must be a finite number of calls/s >= 0, not {min_rate!r}")
        self.window_s = window_s
        self.limit = limit
        self.min_rate = min_rate
        self._last_call = -math.inf
        # Starts slow: the first interval begins with the first call, and the calls in it are
        # held only once it has ended fast.
        self._fast = False
        self._interval_start: float | None = None
        self._interval_calls = 0

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def hold(self, now: float) -> bool:
        """Whether a call made at `now` (loop time) should wait for others."""
        close = now - self._last_call < self.window_s
        self._last_call = now
        if not self.min_rate:
            return close
        if self._interval_start is None:
            self._interval_start = now
        elapsed = now - self._interval_start
        if elapsed >= RATE_INTERVAL_S:
            # The interval that ends here decides until the next one ends. One that spans a quiet
            # spell counts its calls over all of it, so it says slow.
            self._fast = self._interval_calls > self.min_rate * elapsed
            self._interval_start = now
            self._interval_calls = 0
        self._interval_calls += 1
        return close and self._fast

    def full(self, held: int) -> bool:
        """Whether `held` calls are enough to go at once."""
        return 0 < self.limit <= held
