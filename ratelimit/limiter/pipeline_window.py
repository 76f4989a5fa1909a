"""When a script call waits for others, so that calls close together share one write to Redis.

Every write costs Redis (and the server) a wake-up, a read and a reply: on the 2-core machines
this project is measured on, about 40 us of Redis CPU for a call that arrives alone, against
about 2 us each for 64 in one read (README, "The state tier"). Under load calls still arrive one
at a time (grpc.aio wakes one handler per turn), so batches do not form by themselves; a window
forms them, as `REDIS_PIPELINE_WINDOW` and `REDIS_PIPELINE_LIMIT` do in envoyproxy/ratelimit.

Unlike a fixed window, this one holds a call only when the previous call came less than a window
ago: a call after a quiet spell goes out at once, so a light load pays nothing. With a
`min_rate`, only while calls also arrive faster than that (a moving average of the gaps between
them), so a replica below that load never waits at all. A call held waits at most the window,
or less when `limit` calls are held.
"""

from __future__ import annotations

import math

# Weight of the newest gap in the moving average: about the last eight gaps count.
GAP_AVERAGE_WEIGHT = 1 / 8


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
        # Starts slow: a burst after start-up or a quiet spell is held only once it is fast.
        self._average_gap_s = window_s

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def hold(self, now: float) -> bool:
        """Whether a call made at `now` (loop time) should wait for others."""
        gap = now - self._last_call
        self._last_call = now
        busy = gap < self.window_s
        if not self.min_rate:
            return busy
        # Gaps count up to a window each: one quiet spell slows the average, never for long.
        self._average_gap_s += (min(gap, self.window_s) - self._average_gap_s) * GAP_AVERAGE_WEIGHT
        return busy and self._average_gap_s * self.min_rate < 1.0

    def full(self, held: int) -> bool:
        """Whether `held` calls are enough to go at once."""
        return 0 < self.limit <= held
