"""One task reads every idle connection: the hub's read poller (Linux, epoll).

A session's task waiting for its edge's next frame costs, for every keepalive and ACK, a
wake-up of that task, a re-arm of its registration in trio's epoll (one syscall) and a
scheduler pass of its own. A connection parked here is instead watched by our own
level-triggered epoll, registered once; one task waits for that epoll's descriptor (in
trio's) and calls each ready connection's callback synchronously, a batch per wake-up: the
frames the hub handles without waiting (EdgeCore's keepalives and ACKs) are handled there,
without a task switch. A callback that meets anything else wakes its session's task. While
no ACK is awaited (`hurry`), rounds are at least LINGER apart: idle edges' keepalives are
read in batches.

Rules:
- a callback is synchronous and returns whether it wants to be called again in the next
  round although its socket may be empty (it stopped with bytes buffered above the socket);
  a callback that raises is logged and unregistered (the owner must not let that happen);
- `unregister(fd, callback)` removes only that callback's registration: descriptor numbers
  are reused, so a closed socket's number may already belong to another connection. Close a
  socket only after unregistering it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
from collections.abc import Callable

import trio

log = logging.getLogger("trio_cloudhub.poller")

ReadyCallback = Callable[[], bool]
MAX_EVENTS = 1024
# While no ACK is awaited, the poller waits this long after a round before the next, so that
# the keepalives of thousands of idle edges are read a batch per wake-up instead of one each
# (a wake-up costs about as much as reading one keepalive). Anything but a keepalive or an
# ACK is read at most this late while the hub is idle.
LINGER = 0.1
# A delivery makes the poller read without lingering for this long (ACKs are awaited).
BUSY_HOLD = 1.0  # ready descriptors taken per round; the rest wait for the next round


class ReadPoller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, ReadyCallback] = {}
        self._again: dict[int, ReadyCallback] = {}  # called next round, readable or not
        self.rounds = 0  # wake-ups that handled something (for tests and profiles)
        self.linger = LINGER
        self._busy_until = -math.inf
        self._lingering: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._callbacks)

    def register(self, fd: int, callback: ReadyCallback) -> None:
        """Call `callback` whenever `fd` is readable, until unregistered."""
        self._callbacks[fd] = callback
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)  # a closed socket's number, reused

    def unregister(self, fd: int, callback: ReadyCallback) -> None:
        if self._callbacks.get(fd) is not callback:
            return
        del self._callbacks[fd]
        self._again.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):  # closed already, or the epoll is
            self._epoll.unregister(fd)

    def hurry(self, now: float) -> None:
        """An ACK is awaited: read without lingering for the next BUSY_HOLD seconds."""
        self._busy_until = now + BUSY_HOLD
        if self._lingering is not None:
            self._lingering.cancel()

    async def _linger_a_while(self) -> None:
        with trio.CancelScope(deadline=trio.current_time() + self.linger) as self._lingering:
            await trio.sleep_forever()
        self._lingering = None

    async def run(self) -> None:
        epoll = self._epoll
        try:
            while True:
                events = epoll.poll(0, MAX_EVENTS)
                if not events and not self._again:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                    continue
                self._round(events)
                if self.linger > 0 and trio.current_time() >= self._busy_until:
                    await self._linger_a_while()
                else:
                    await trio.lowlevel.checkpoint()
        finally:
            epoll.close()

    def _round(self, events: list[tuple[int, int]]) -> None:
        again, self._again = self._again, {}
        self.rounds += 1
        for fd, _ in events:
            again.pop(fd, None)
            self._call(fd, self._callbacks.get(fd))
        for fd, callback in again.items():
            if self._callbacks.get(fd) is callback:
                self._call(fd, callback)

    def _call(self, fd: int, callback: ReadyCallback | None) -> None:
        if callback is None:
            return
        try:
            more = callback()
        except Exception:
            log.exception("read callback %r failed; it is unregistered", callback)
            self.unregister(fd, callback)
            return
        if more and self._callbacks.get(fd) is callback:
            self._again[fd] = callback


def make_poller() -> ReadPoller | None:
    """A poller where epoll exists (Linux), else None: every session reads in its own task."""
    return ReadPoller() if hasattr(select, "epoll") else None
