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

A rate suits one machine and one load; `min_busy` needs neither. It holds calls only while the
event loop's thread is saturated: it ran or waited for a CPU at least that share of two tenths
of a second in a row (`thread_busy`), and it lets go once a tenth of a second falls below
`BUSY_RELEASE` times that share. Two in a row, so that one stall of the machine does not make a
half-loaded replica wait; a lower share to let go, because holding itself takes about a quarter
off the loop's work per call (README, "The pipeline window"), which would otherwise end the
holding that caused it at once. Saturated, a replica's calls queue anyway: there a window adds
little latency and gives back the CPU that saturated it.
"""

from __future__ import annotations

import math
from typing import Callable

from ratelimit.limiter.thread_busy import ThreadBusy

# The span over which calls are counted for the rate; a change of load takes effect within two.
RATE_INTERVAL_S = 0.1
# Holding lets go when the loop's busy share of an interval falls below this times `min_busy`.
BUSY_RELEASE = 0.7


class PipelineWindow:
    def __init__(
        self,
        window_s: float,
        limit: int = 0,
        min_rate: float = 0.0,
        min_busy: float = 0.0,
        busy_share: Callable[[], float] | None = None,
    ) -> None:
        if not 0.0 <= window_s < math.inf:
            raise ValueError(f"pipeline window must be a finite number of seconds >= 0, not {window_s!r}")
        if limit < 0:
            raise ValueError(f"pipeline limit must be >= 0 (0: no limit), not {limit!r}")
        if not 0.0 <= min_rate < math.inf:
            raise ValueError(f"pipeline minimum rate must be a finite number of calls/s >= 0, not {min_rate!r}")
        if not 0.0 <= min_busy <= 1.0:
            raise ValueError(f"pipeline minimum busy share must be from 0 to 1, not {min_busy!r}")
        self.window_s = window_s
        self.limit = limit
        self.min_rate = min_rate
        self.min_busy = min_busy
        # The loop thread's busy share since the previous reading; read once per interval, from
        # the loop's thread (hold is only called there).
        self._busy_share = busy_share or ThreadBusy().share
        self._last_call = -math.inf
        # Starts slow: the first interval begins with the first call, and the calls in it are
        # held only once it has ended fast (and, with min_busy, the one after it busy too).
        self._fast = False
        self._interval_start: float | None = None
        self._interval_calls = 0
        self._was_busy = False  # the previous interval's busy share reached min_busy
        self._saturated = False

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def hold(self, now: float) -> bool:
        """Whether a call made at `now` (loop time) should wait for others."""
        close = now - self._last_call < self.window_s
        self._last_call = now
        if not (self.min_rate or self.min_busy):
            return close
        if self._interval_start is None:
            self._interval_start = now
            if self.min_busy:
                self._busy_share()  # begins the first span
        elapsed = now - self._interval_start
        if elapsed >= RATE_INTERVAL_S:
            # The interval that ends here decides until the next one ends. One that spans a quiet
            # spell counts its calls, and its busy share, over all of it, so it says slow.
            rate_fast = not self.min_rate or self._interval_calls > self.min_rate * elapsed
            self._fast = self._saturation_goes_on() and rate_fast
            self._interval_start = now
            self._interval_calls = 0
        self._interval_calls += 1
        return close and self._fast

    def _saturation_goes_on(self) -> bool:
        """Whether the loop is saturated, from the interval that ends now (True without min_busy)."""
        if not self.min_busy:
            return True
        busy = self._busy_share()
        if self._saturated:
            self._saturated = busy >= self.min_busy * BUSY_RELEASE
        else:
            self._saturated = self._was_busy and busy >= self.min_busy
        self._was_busy = busy >= self.min_busy
        return self._saturated

    def full(self, held: int) -> bool:
        """Whether `held` calls are enough to go at once."""
        return 0 < self.limit <= held
