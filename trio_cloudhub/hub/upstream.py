"""What edges send up (reports, queries), handled fairly across nodes.

Each node has its own bounded queue; a few workers take one item per node in turn (round
robin), so one node flooding reports, or one slow store call, holds up that node's queue
and not the others'. A full queue makes only that node's reader wait (backpressure). Work
outlives the session that submitted it: a report read before a disconnect is still stored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import attrs
import trio

from trio_cloudhub.core.message import Message
from trio_cloudhub.core.rules import Upstream

PER_NODE = 64
WORKERS = 4


@attrs.frozen(slots=True)
class UpstreamWork:
    node_id: str
    kind: Upstream
    message: Message


Handler = Callable[[UpstreamWork], Awaitable[None]]


class UpstreamDispatcher:
    def __init__(self, handle: Handler, *, per_node: int = PER_NODE, workers: int = WORKERS):
        self._handle = handle
        self._per_node = per_node
        self._workers = workers
        self._queues: dict[str, deque[UpstreamWork]] = {}
        self._turns: deque[str] = deque()  # nodes with work, in the order they get a turn
        self._work = trio.Event()
        self._space: dict[str, trio.Event] = {}

    async def submit(self, work: UpstreamWork) -> None:
        """Queue `work`; waits while the node's own queue is full."""
        node_id = work.node_id
        while len(self._queues.get(node_id, ())) >= self._per_node:
            await self._space.setdefault(node_id, trio.Event()).wait()
        queue = self._queues.get(node_id)
        if queue is None:
            queue = self._queues[node_id] = deque()
            self._turns.append(node_id)
        queue.append(work)
        self._work.set()  # wakes every idle worker; later waits use a fresh event
        self._work = trio.Event()

    def queued(self, node_id: str) -> int:
        return len(self._queues.get(node_id, ()))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while True:
            work = self._next()
            if work is None:
                await self._work.wait()
                continue
            await self._handle(work)

    def _next(self) -> UpstreamWork | None:
        if not self._turns:
            return None
        node_id = self._turns.popleft()
        queue = self._queues[node_id]
        work = queue.popleft()
        if queue:
            self._turns.append(node_id)
        else:
            del self._queues[node_id]
        space = self._space.pop(node_id, None)
        if space is not None:
            space.set()
        return work
