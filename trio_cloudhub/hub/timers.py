"""The hub's deadlines in one task: keepalive checks, ACK timeouts, back-off retries.

`at(deadline, callback)` adds a one-shot callback, called with the current time from the
`run()` task once `deadline` passed; callbacks are synchronous and quick. There is no
cancellation: a callback checks whether it still matters (the session may have ended, the
message been acknowledged) and returns at once if not. A session pays a heap push per timer
instead of a cancel scope per wait, and with no deadline pending the task sleeps without a
deadline, so a hub with nothing connected and nothing changing uses no CPU.

The task wakes only on multiples of `resolution` seconds (a callback runs at most that late):
thousands of sessions' keepalive checks and ACK timeouts, each at its own time, then cost a
few wake-ups per second, not one each.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable

import trio

log = logging.getLogger("trio_cloudhub.hub")

TimerCallback = Callable[[float], None]


RESOLUTION = 0.25


class Timers:
    def __init__(self, resolution: float = RESOLUTION) -> None:
        self.resolution = resolution
        self._heap: list[tuple[float, int, TimerCallback]] = []
        self._order = itertools.count()  # equal deadlines fire in the order they were added
        self._next = math.inf  # the deadline `run()` sleeps until
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        """Callbacks not called yet (including those that will find nothing to do)."""
        return len(self._heap)

    def at(self, deadline: float, callback: TimerCallback) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), callback))
        if deadline < self._next:
            self._next = deadline
            self._wakeup.set()

    def _wake_time(self, deadline: float) -> float:
        step = self.resolution
        if step <= 0 or math.isinf(deadline):
            return deadline
        return math.ceil(deadline / step) * step

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                callback = heapq.heappop(heap)[2]
                try:
                    callback(now)
                except Exception:  # one broken callback must not stop every other deadline
                    log.exception("timer callback %r failed", callback)
            self._next = heap[0][0] if heap else math.inf
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            with trio.move_on_at(self._wake_time(self._next)):
                await self._wakeup.wait()
