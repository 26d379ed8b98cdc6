"""One edge node as the hub holds it: its queue, which outlives sessions, and its session.

The queue is created on the first message for the node and lives until the node is removed
from the desired state, so changes made while the node is away wait in it (one slot per
object) and are delivered on connect. The session attached to the entry hears of new work
at once (`notify_*`) and sends it from the caller's task; no task waits for work.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio

from trio_cloudhub.core.message import Message
from trio_cloudhub.core.node_queue import NodeQueue


class WorkListener(Protocol):
    """What a session offers its entry: synchronous, quick, never raising."""

    def kick(self) -> None:
        """ACK-mode work may be ready: start the next delivery if none is in flight."""

    def send_no_ack(self) -> None:
        """No-ACK messages are waiting: send them."""


class NodeEntry:
    __slots__ = ("_marked", "complete_at", "listener", "node_id", "queue")

    def __init__(self, node_id: str, no_ack_capacity: int = 1024) -> None:
        self.node_id = node_id
        self.queue = NodeQueue(no_ack_capacity=no_ack_capacity)
        self.listener: WorkListener | None = None  # the running session, if any
        # The store's change stamp when reconciliation last found nothing missing.
        self.complete_at: tuple[int, ...] | None = None
        # Objects whose "0" marker was written before their first send (with another
        # object's): their first send is still an insert. Made on the first mark and dropped
        # when empty: an idle node holds no set (216 bytes).
        self._marked: set[str] | None = None

    def mark_ahead(self, uid: str) -> None:
        if self._marked is None:
            self._marked = set()
        self._marked.add(uid)

    def take_mark(self, uid: str) -> bool:
        """Whether `uid` was marked ahead (and no longer is)."""
        marked = self._marked
        if marked is None or uid not in marked:
            return False
        marked.discard(uid)
        if not marked:
            self._marked = None
        return True

    def notify_ack_work(self) -> None:
        if self.listener is not None:
            self.listener.kick()

    def notify_no_ack_work(self) -> None:
        if self.listener is not None:
            self.listener.send_no_ack()


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class NodeSessionHandle:
    """What the registry needs to end a session from outside: its scope and in-flight send."""

    def __init__(self, entry: NodeEntry, remote: str) -> None:
        self.entry = entry
        self.remote = remote
        # Wall-clock milliseconds, for `get nodes` (0: none yet).
        self.connected_ms = wall_ms()
        self.last_keepalive_ms = 0
        self.last_ack_ms = 0
        self.cancel_scope = trio.CancelScope()
        self.in_flight: Message | None = None
        self._settled: trio.Event | None = None  # made only while someone waits
        self.end_reason = ""

    def start_flight(self, message: Message) -> None:
        self.in_flight = message

    def end_flight(self) -> None:
        self.in_flight = None
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    async def wait_settled(self) -> None:
        """Until nothing is in flight."""
        while self.in_flight is not None:
            if self._settled is None:
                self._settled = trio.Event()
            await self._settled.wait()

    def end(self, reason: str) -> None:
        """Stop the session now and hand its in-flight message back to the queue.

        Done synchronously so a replacing session can never find the key still in flight.
        """
        if not self.end_reason:
            self.end_reason = reason
        self.release_in_flight()
        self.cancel_scope.cancel()

    def release_in_flight(self) -> None:
        if self.in_flight is not None:
            self.entry.queue.release(self.in_flight)
            self.end_flight()
            self.entry.notify_ack_work()
