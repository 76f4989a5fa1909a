"""Independent oracles: what the limiter must answer, computed by brute force from first principles.

`SlidingLog` keeps every admitted hit with its timestamp and answers from the README's words
alone ("The sliding window and its bounds"), not from `ratelimit.limiter.window`:

- A unit of W ms is cut into K = 40 buckets of B = W/40 ms, numbered from the Unix epoch
  (a hit at t ms is in bucket floor(t / B)). At an instant T a sliding counter counts the hits
  of the K + 1 most recent buckets, the current one included: every hit whose bucket is at
  least floor(T / B) - K. A fixed window counts the hits of the epoch-aligned window of W that
  holds T. That is what "exact" means here: the count is the documented bucketed count, to the
  hit; the true sliding count (hits in (T - W, T]) is at most it (`hits_between`).
- A request is rejected when an enforcing counter is over, or when it has quota counters and
  all of them are over; a counter is over when its count plus this request's hits on it (its
  earlier mentions in the request included) exceed the limit. Only an admitted request is
  charged, all counters at once, at the decision's instant.
- `used`: the count before the request, plus this request's hits up to this mention when admitted.
- `reset_ms`, to the millisecond (before the server rounds it to seconds): over the limit, the
  wait until the earliest instant at which the same request's hits fit, if nobody else takes the
  room; when no instant ever fits (more hits than the limit), the wait until the window is clear
  of every hit, including one made now. Not over: the wait until the count first drops (the
  oldest counted hit leaves), or with no hit counted, until a hit made now would stop counting.
  Each is found by bisecting the instants after now on the counting rule itself.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ratelimit.config.model import Algorithm, Unit
from ratelimit.limiter import CounterRequest, CounterResult, Decision, Role, WindowSpec
from ratelimit.limiter.keys import counter_key

BUCKETS_PER_UNIT = 40  # README: "K = 40 buckets of W/40"


@dataclass(frozen=True)
class Ask:
    """One counter's share of a request, as a test writes it (oracle and limiter get the same)."""

    name: str
    limit: int
    unit: Unit
    algorithm: Algorithm = Algorithm.SLIDING_WINDOW
    hits: int = 1
    role: Role = Role.ENFORCE

    @property
    def key(self) -> str:
        return counter_key("rl:", "oracle", (("name", self.name),), self.unit, self.algorithm)

    @property
    def window_ms(self) -> int:
        return self.unit.seconds * 1000

    def counter_request(self) -> CounterRequest:
        return CounterRequest(
            key=self.key,
            limit=self.limit,
            window=WindowSpec.for_rule(self.algorithm, self.unit.seconds),
            hits=self.hits,
            role=self.role,
        )

    def counts_at(self, hit_ms: int, at_ms: int) -> bool:
        """Whether a hit made at `hit_ms` is counted at `at_ms` (the README's rule)."""
        if self.algorithm is Algorithm.FIXED_WINDOW:
            return hit_ms // self.window_ms == at_ms // self.window_ms
        bucket_ms = self.window_ms // BUCKETS_PER_UNIT
        return hit_ms // bucket_ms >= at_ms // bucket_ms - BUCKETS_PER_UNIT


class SlidingLog:
    """Every admitted hit, with its timestamp, per counter key."""

    def __init__(self) -> None:
        self._log: dict[str, list[tuple[int, int]]] = defaultdict(list)  # key -> [(at_ms, hits)] in time order

    def add(self, key: str, at_ms: int, hits: int) -> None:
        log = self._log[key]
        bisect.insort(log, (at_ms, hits))

    def count(self, ask: Ask, at_ms: int) -> int:
        """The documented count of `ask`'s counter at `at_ms`, from the whole log."""
        return sum(hits for hit_ms, hits in self._log[ask.key] if hit_ms <= at_ms and ask.counts_at(hit_ms, at_ms))

    def hits_between(self, key: str, start_ms: int, end_ms: int) -> int:
        """Admitted hits with a timestamp in the closed interval [start_ms, end_ms]."""
        return sum(hits for hit_ms, hits in self._log[key] if start_ms <= hit_ms <= end_ms)

    def most_in_any_window(self, key: str, window_ms: int) -> int:
        """The most admitted hits in any closed interval of length `window_ms`."""
        return max((self.hits_between(key, at, at + window_ms) for at, _ in self._log[key]), default=0)

    def decide(self, asks: Sequence[Ask], now_ms: int) -> Decision:
        """The exact answer at `now_ms`; charges the log when admitted."""
        through: list[int] = []
        planned: dict[str, int] = defaultdict(int)
        for ask in asks:
            planned[ask.key] += ask.hits
            through.append(planned[ask.key])
        counts = [self.count(ask, now_ms) for ask in asks]
        over = [count + need > ask.limit for ask, count, need in zip(asks, counts, through)]
        enforcing_over = any(o for ask, o in zip(asks, over) if ask.role is Role.ENFORCE)
        quota = [o for ask, o in zip(asks, over) if ask.role is Role.QUOTA]
        admitted = not enforcing_over and not (quota and all(quota))
        results = tuple(
            CounterResult(
                over_limit=is_over,
                used=count + (need if admitted else 0),
                reset_ms=self._reset_ms(ask, now_ms, need, is_over),
            )
            for ask, count, need, is_over in zip(asks, counts, through, over)
        )
        if admitted:
            for ask in asks:
                if ask.hits:
                    self.add(ask.key, now_ms, ask.hits)
        return Decision(admitted=admitted, now_ms=now_ms, results=results)

    def _reset_ms(self, ask: Ask, now_ms: int, need: int, over: bool) -> int:
        if over and need <= ask.limit:
            fits_at = _earliest(now_ms, ask, lambda at: self.count(ask, at) + need <= ask.limit)
        elif over:
            # Never fits: a clear window, where a hit made now has left too.
            fits_at = _earliest(now_ms, ask, lambda at: self.count(ask, at) == 0 and not ask.counts_at(now_ms, at))
        elif (counted := self.count(ask, now_ms)) > 0:
            fits_at = _earliest(now_ms, ask, lambda at: self.count(ask, at) < counted)
        else:
            fits_at = _earliest(now_ms, ask, lambda at: not ask.counts_at(now_ms, at))
        return fits_at - now_ms


def _earliest(now_ms: int, ask: Ask, holds: Callable[[int], bool]) -> int:
    """The first instant >= now_ms where `holds` (monotone: once true, true for good) is true."""
    low, high = now_ms, now_ms + 2 * ask.window_ms + 1  # by then every hit up to now has left
    assert holds(high), "the predicate never holds: the oracle is wrong"
    while low < high:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle + 1
    return low
