"""Bounds on what one edge may make the hub do, and warnings that do not flood the log.

Pure: the current time comes in as `now` (seconds, any monotonic clock).

- `TokenBucket`: `rate` per second, at most `burst` saved up. `take(amount, now)` spends and
  answers how long the caller should wait before going on (0 while within the bucket): the
  hub's reader of a session waits that long before it reads the edge's next frame, so a
  flooding edge is slowed by TCP backpressure and loses nothing, and its CPU cost is bounded.
- `EveryPeriod`: `due(key, now)` is the number of events held back since the key's last
  line when a line is due (once per `period` per key), else None (the event is counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable


class TokenBucket:
    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, amount: float, now: float) -> float:
        """Spend `amount` (debt allowed); seconds to wait until the debt is paid back."""
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


class EveryPeriod:
    __slots__ = ("_held", "_last", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._last: dict[Hashable, float] = {}
        self._held: Counter[Hashable] = Counter()

    def due(self, key: Hashable, now: float) -> int | None:
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._held[key] += 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
