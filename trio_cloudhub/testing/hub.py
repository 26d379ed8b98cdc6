"""`open_test_hub()`: a hub running in-process with memory connections, for tests.

Runs the same `Hub` the server runs (dispatch loops, sessions) against any `CloudStore`,
by default the in-memory one, so timed paths can be tested on trio's MockClock.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message, new_message, object_uid
from trio_cloudhub.edge.base import EdgeConnection
from trio_cloudhub.edge.memory import HubDisconnected, MemoryEdgeEnd, memory_connection_pair
from trio_cloudhub.hub.hub import Hub, HubSettings
from trio_cloudhub.store.base import CloudStore
from trio_cloudhub.testing.edge_storage import MetaStore
from trio_cloudhub.testing.memory_store import MemoryStore


@attrs.define
class TestHub:
    __test__ = False  # not a pytest test class

    hub: Hub
    store: Any
    nursery: trio.Nursery

    async def connect(self, node_id: str, *, keepalive: bool = True) -> MemoryEdgeEnd:
        """A new edge connection for `node_id`; sends the first keepalive like EdgeCore."""
        conn, edge = memory_connection_pair(node_id)
        self.nursery.start_soon(self._serve, conn)
        if keepalive:
            await edge.send(codec.encode(keepalive_message()))
        await trio.testing.wait_all_tasks_blocked()
        return edge

    async def _serve(self, conn: EdgeConnection) -> None:
        """As the transport does: run the hub's handler, then close the connection."""
        try:
            await self.hub.handle_connection(conn)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def publish(self, message: Message) -> None:
        """A change of the desired state, as the store delivers it; waits until handled."""
        if isinstance(self.store, MemoryStore):
            self.store.publish(message)
        else:
            self.hub.route_downstream(message)
        await trio.testing.wait_all_tasks_blocked()


def keepalive_message() -> Message:
    return new_message(
        source="websocket",
        group="resource",
        operation="keepalive",
        resource="node",
        content="ping",
        now_ms=0,
    )


def ack_for(message: Message) -> Message:
    """The ACK EdgeCore's metamanager sends for a cloud insert/update/delete."""
    return new_message(
        source=message.route.source,
        group=message.route.group,
        operation="response",
        resource=message.resource,
        content="OK",
        now_ms=0,
        parent_msg_id=message.msg_id,
    )


def object_message(
    node_id: str,
    kind: str,
    name: str,
    *,
    rv: int,
    uid: str | None = None,
    operation: str = "insert",
    namespace: str = "default",
    data: dict[str, Any] | None = None,
) -> Message:
    """A downstream message as the store emits it, for an object of `kind`."""
    resource_type = kind.lower()
    metadata: dict[str, Any] = {
        "name": name,
        "uid": uid or f"uid-{resource_type}-{namespace}-{name}",
        "resourceVersion": str(rv),
    }
    if kind != "Node":
        metadata["namespace"] = namespace
    content = {"apiVersion": "v1", "kind": kind, "metadata": metadata, **(data or {})}
    ns = "null" if kind == "Node" else namespace
    return new_message(
        source="edgecontroller",
        group="resource",
        operation=operation,
        resource=f"node/{node_id}/{ns}/{resource_type}/{name}",
        content=json.loads(json.dumps(content)),
        now_ms=0,
        resource_version=str(rv),
    )


@asynccontextmanager
async def open_test_hub(
    store: CloudStore | None = None, settings: HubSettings | None = None
) -> AsyncIterator[TestHub]:
    store = store if store is not None else MemoryStore()
    hub = Hub(settings or HubSettings(), store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.dispatch_upstream)
        nursery.start_soon(hub.run_timers)
        await nursery.start(store.run, hub.route_downstream)
        nursery.start_soon(hub.reconcile_forever)
        yield TestHub(hub=hub, store=store, nursery=nursery)
        nursery.cancel_scope.cancel()


@attrs.define
class EdgeState:
    """What an edge received, and what it holds.

    `storage` is the edge's database under one EdgeCore line's rules (`edge_storage`): what a
    real edge would hold, and what it answers. `objects` maps uid -> newest resourceVersion
    received (a delete removes the uid), whatever the storage rules made of it. `duplicates`
    counts ACK-mode messages for a (uid, resourceVersion) the edge had already ACKed.
    """

    storage: MetaStore = attrs.field(factory=MetaStore)
    objects: dict[str, int] = attrs.field(factory=dict)
    received: list[Message] = attrs.field(factory=list)
    acked: set[tuple[str, str, str]] = attrs.field(factory=set)  # (uid, rv, operation)
    duplicates: int = 0

    def apply(self, message: Message) -> None:
        self.received.append(message)
        uid = object_uid(message.content)
        if not uid:
            return
        seen = (uid, message.header.resource_version, message.operation)
        if seen in self.acked:
            self.duplicates += 1
        if message.operation == "delete":
            self.objects.pop(uid, None)
        else:
            rv = int(message.header.resource_version or 0)
            self.objects[uid] = max(rv, self.objects.get(uid, 0))

    def uids(self) -> set[str]:
        return set(self.objects)


async def run_auto_ack_edge(
    edge: MemoryEdgeEnd,
    state: EdgeState,
    *,
    keepalive_interval: float = 15.0,
    ack: Callable[[Message], bool] = lambda message: True,
) -> None:
    """Keep alive, receive, apply to `state` and answer as its storage model does (unless
    `ack` says not to) until the hub hangs up."""

    async def keep_alive() -> None:
        while True:
            await edge.send(codec.encode(keepalive_message()))
            await trio.sleep(keepalive_interval)

    async def receive_and_ack() -> None:
        while True:
            message = codec.decode(await edge.receive())
            state.apply(message)
            reply = state.storage.handle(message)
            if reply is not None and reply.operation == "response" and ack(message):
                await edge.send(codec.encode(reply))
                state.acked.add(
                    (
                        object_uid(message.content),
                        message.header.resource_version,
                        message.operation,
                    )
                )

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive)
            nursery.start_soon(receive_and_ack)
    except* HubDisconnected:
        pass
