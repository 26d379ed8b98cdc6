"""An in-memory cloud side for in-process hub tests.

It implements the `CloudStore` interface with dictionaries and no threads, so hub tests can
run on trio's MockClock (autojump) — the SQLite store hands work to threads, which a jumping
clock would overtake.

The desired state is what was published (or preloaded): per node, the newest ACK-mode message
of each object; a delete removes the object. `set_desired` changes it without delivering, as
if the change notification had been lost, so reconciliation can be tested.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from trio_cloudhub.core.message import (
    OP_DELETE,
    OP_INSERT,
    Message,
    is_delete,
    new_msg_id,
    node_id_of,
    object_uid,
    prefix_from_edge,
    response_to,
    split_cloud_resource,
)
from trio_cloudhub.core.rules import Downstream, classify_downstream
from trio_cloudhub.store.base import ChangeLag, Deliver, Missed, NodeRecord, SessionEvent


class MemoryStore:
    def __init__(self) -> None:
        self.ack_points: dict[tuple[str, str], str] = {}
        self.reports: list[tuple[str, Message]] = []
        self.queries: list[tuple[str, Message]] = []
        self.objects: dict[str, object] = {}
        self.desired: dict[str, dict[str, Message]] = {}  # node -> uid -> newest message
        self.pods: dict[tuple[str, str], str] = {}  # (namespace, name) -> node
        self.joined: set[str] = set()  # nodes the HTTPS service issued a certificate
        self.records: dict[str, NodeRecord] = {}  # sessions, as the hub reported them
        self.changes = 0  # desired state or ack point changes, for change_stamp
        self._last_acked: dict[tuple[str, str], Message] = {}
        self._deliver: Deliver | None = None
        self._initial: list[Message] = []
        self.change_lag = ChangeLag()  # never behind: changes are delivered as published

    def preload(self, *messages: Message) -> None:
        """Messages sent as the initial desired state when `run` starts."""
        self._initial.extend(messages)

    def publish(self, message: Message) -> None:
        """A change of the desired state, after `run` started: remembered and delivered."""
        assert self._deliver is not None, "run() has not started"
        self.set_desired(message)
        self._deliver(message)

    def set_desired(self, message: Message) -> None:
        """Change the desired state without delivering the change (a lost notification)."""
        if classify_downstream(message) is not Downstream.ACK:
            return
        self.changes += 1
        node, uid = node_id_of(message.resource), object_uid(message.content)
        objects = self.desired.setdefault(node, {})
        parts = split_cloud_resource(message.resource)
        pod = (parts.namespace, parts.name) if parts and parts.resource_type == "pod" else None
        if is_delete(message):
            objects.pop(uid, None)
            if pod is not None:
                self.pods.pop(pod, None)
        else:
            objects[uid] = message
            if pod is not None:
                self.pods[pod] = node

    async def run(
        self,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._deliver = deliver
        for message in self._initial:
            self.publish(message)
        task_status.started()
        await trio.sleep_forever()

    def acked_version(self, node_id: str, uid: str) -> str | None:
        return self.ack_points.get((node_id, uid))

    def unwritten_marker(self, node_id: str, uid: str) -> trio.Event | None:
        return None  # nothing is written: nothing to wait for

    def record_sent(self, node_id: str, message: Message) -> None:
        key = (node_id, object_uid(message.content))
        if key[1] and message.operation != OP_DELETE and key not in self.ack_points:
            self.changes += 1
            self.ack_points[key] = "0"
            self._last_acked[key] = message

    def record_ack(self, node_id: str, message: Message) -> None:
        key = (node_id, object_uid(message.content))
        self.changes += 1
        if message.operation == OP_DELETE:
            self.ack_points.pop(key, None)
            self._last_acked.pop(key, None)
        else:
            self.ack_points[key] = message.header.resource_version
            self._last_acked[key] = message

    def missed(self, node_id: str) -> list[Missed]:
        desired = self.desired.get(node_id, {})
        found: list[Missed] = []
        for uid, message in desired.items():
            acked = self.ack_points.get((node_id, uid))
            rv = message.header.resource_version
            if acked is None or int(acked) < int(rv):
                found.append(Missed(uid, rv, False, _fresh(message, message.operation)))
        for (node, uid), message in self._last_acked.items():
            if node == node_id and uid not in desired:
                found.append(Missed(uid, "", True, _fresh(message, OP_DELETE)))
        return found

    def change_stamp(self, node_id: str) -> tuple[int, ...]:
        return self.changes, 0

    def pod_node(self, namespace: str, name: str) -> str | None:
        return self.pods.get((namespace, name))

    def api_server_ca(self) -> str:
        return ""

    def node_known(self, name: str) -> bool:
        return name in self.desired or name in self.joined

    async def node_joined(self, name: str) -> None:
        self.joined.add(name)

    def record_connection(self, node_id: str, event: SessionEvent) -> None:
        self.records[node_id] = (self.records.get(node_id) or NodeRecord(node_id)).after(event)

    def known_nodes(self) -> dict[str, NodeRecord]:
        names = sorted(set(self.records) | set(self.desired) | self.joined)
        return {name: self.records.get(name) or NodeRecord(name) for name in names}

    async def apply_report(self, node_id: str, message: Message) -> Message | None:
        self.reports.append((node_id, message))
        reply = response_to(message, "OK", int(trio.current_time() * 1000))
        return reply.with_resource(prefix_from_edge(node_id, message.resource))

    async def answer_query(self, node_id: str, message: Message) -> Message | None:
        self.queries.append((node_id, message))
        return None


def _fresh(message: Message, operation: str) -> Callable[[], Message]:
    def build() -> Message:
        header = attrs.evolve(message.header, msg_id=new_msg_id())
        route = attrs.evolve(message.route, operation=operation or OP_INSERT)
        return attrs.evolve(message, header=header, route=route)

    return build
