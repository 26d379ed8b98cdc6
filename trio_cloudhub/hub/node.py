"""One edge node as the hub holds it: its queue, which outlives sessions, and its session.

The queue is created on the first message for the node and lives until the node is removed
from the desired state, so changes made while the node is away wait in it (one slot per
object) and are delivered on connect.
"""

from __future__ import annotations

import math
import time

import trio

from trio_cloudhub.core.message import Message
from trio_cloudhub.core.node_queue import NodeQueue


class NodeEntry:
    def __init__(self, node_id: str, no_ack_capacity: int = 1024) -> None:
        self.node_id = node_id
        self.queue = NodeQueue(no_ack_capacity=no_ack_capacity)
        self._ack_work = trio.Event()
        self._no_ack_work = trio.Event()
        # The store's change stamp when reconciliation last found nothing missing.
        self.complete_at: tuple[int, ...] | None = None

    def notify_ack_work(self) -> None:
        self._ack_work.set()

    def notify_no_ack_work(self) -> None:
        self._no_ack_work.set()

    async def next_ack_message(self) -> Message:
        """The next ACK-mode message; it is marked in flight until acked/failed/released."""
        while True:
            message = self.queue.pop_ready(trio.current_time())
            if message is not None:
                return message
            if self._ack_work.is_set():
                self._ack_work = trio.Event()
            retry_at = self.queue.next_retry_at()
            with trio.move_on_at(math.inf if retry_at is None else retry_at):
                await self._ack_work.wait()

    async def next_no_ack_message(self) -> Message:
        while True:
            message = self.queue.pop_no_ack()
            if message is not None:
                return message
            if self._no_ack_work.is_set():
                self._no_ack_work = trio.Event()
            await self._no_ack_work.wait()


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
        self.settled = trio.Event()  # set whenever nothing is in flight
        self.settled.set()
        self.end_reason = ""

    def start_flight(self, message: Message) -> None:
        self.in_flight = message
        self.settled = trio.Event()

    def end_flight(self) -> None:
        self.in_flight = None
        self.settled.set()

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
