"""An in-memory cloud side for in-process hub tests.

It implements the `CloudStore` interface with dictionaries and no threads, so hub tests can
run on trio's MockClock (autojump) — the SQLite store hands work to threads, which a jumping
clock would overtake.
"""

from __future__ import annotations

import trio

from trio_cloudhub.core.message import (
    OP_DELETE,
    Message,
    object_uid,
    prefix_from_edge,
    response_to,
)


class MemoryStore:
    def __init__(self) -> None:
        self.ack_points: dict[tuple[str, str], str] = {}
        self.reports: list[tuple[str, Message]] = []
        self.queries: list[tuple[str, Message]] = []
        self.objects: dict[str, object] = {}
        self._events: trio.MemorySendChannel[Message] | None = None
        self._initial: list[Message] = []

    def preload(self, *messages: Message) -> None:
        """Messages sent as the initial desired state when `run` starts."""
        self._initial.extend(messages)

    async def publish(self, message: Message) -> None:
        """A change of the desired state, after `run` started."""
        assert self._events is not None, "run() has not started"
        await self._events.send(message)

    async def run(
        self,
        events: trio.MemorySendChannel[Message],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._events = events
        for message in self._initial:
            await events.send(message)
        task_status.started()
        await trio.sleep_forever()

    def acked_version(self, node_id: str, uid: str) -> str | None:
        return self.ack_points.get((node_id, uid))

    def record_ack(self, node_id: str, message: Message) -> None:
        key = (node_id, object_uid(message.content))
        if message.operation == OP_DELETE:
            self.ack_points.pop(key, None)
        else:
            self.ack_points[key] = message.header.resource_version

    async def apply_report(self, node_id: str, message: Message) -> Message | None:
        self.reports.append((node_id, message))
        reply = response_to(message, "OK", int(trio.current_time() * 1000))
        return reply.with_resource(prefix_from_edge(node_id, message.resource))

    async def answer_query(self, node_id: str, message: Message) -> Message | None:
        self.queries.append((node_id, message))
        return None
