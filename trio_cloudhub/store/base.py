"""The one interface the hub needs from the cloud side (design section 2).

A store watches the desired state and emits downstream messages already addressed to a node
(resource `node/<id>/<ns>/<type>/<name>`, source `edgecontroller`, group `resource`, the
object's resourceVersion in the header and the full object with kind/apiVersion as content).
It keeps the ack points (ObjectSync semantics, spec 6.3), stores what edges report and answers
edge queries. Reads the hub makes on its hot path are synchronous and served from memory;
writes are queued and persisted in the background.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from trio_cloudhub.core.message import Message

Deliver = Callable[[Message], None]
"""Where a store hands each downstream message: the hub's router, which never blocks."""


@attrs.frozen(slots=True)
class Missed:
    """A change a node has not acknowledged, built into a message only when needed."""

    uid: str
    resource_version: str
    delete: bool
    build: Callable[[], Message]


@attrs.frozen(slots=True)
class SessionEvent:
    """A session of a node started (`started`) or ended, as the hub reports it to its store."""

    at_ms: int  # wall clock, milliseconds since the epoch
    started: bool
    transport: str = ""
    remote: str = ""
    project: str = ""
    reason: str = ""  # why it ended
    last_keepalive_ms: int = 0  # as of its end
    last_ack_ms: int = 0


@attrs.frozen(slots=True)
class NodeRecord:
    """What a store remembers of a node across sessions (`trio-cloudhub get nodes`).

    Times are wall-clock milliseconds, 0 for never. The connection fields are the hub's
    `SessionEvent`s folded in (`after`); `desired`, `joined_ms` and `reported` are what the
    store itself knows of the node.
    """

    name: str
    first_connected_ms: int = 0
    connected_ms: int = 0  # start of the latest session
    disconnected_ms: int = 0  # end of the latest session that ended
    transport: str = ""
    remote: str = ""
    project: str = ""
    reason: str = ""  # why the latest session ended
    last_keepalive_ms: int = 0  # as of the end of the latest session
    last_ack_ms: int = 0
    joined_ms: int = 0  # issued a certificate (embedded store)
    desired: bool = False  # the desired state has this node (a Node object, the edge label)
    reported: str = ""  # Ready / NotReady / Unknown from its last status report; "" none
    # The latest session's end was not recorded: it lasts, or the hub stopped during it.
    session_open: bool = False

    def after(self, event: SessionEvent) -> NodeRecord:
        if event.started:
            return attrs.evolve(
                self,
                first_connected_ms=self.first_connected_ms or event.at_ms,
                connected_ms=event.at_ms,
                transport=event.transport,
                remote=event.remote,
                project=event.project,
                reason="",
                session_open=True,
            )
        return attrs.evolve(
            self,
            disconnected_ms=max(event.at_ms, self.connected_ms),
            reason=event.reason,
            last_keepalive_ms=max(event.last_keepalive_ms, self.last_keepalive_ms),
            last_ack_ms=max(event.last_ack_ms, self.last_ack_ms),
            session_open=False,
        )


class StoreError(Exception):
    """The cloud side failed (database, API server); the hub logs it and keeps serving."""


class ChangeLag:
    """How far a store is behind the changes it has seen (the store lag metrics).

    A store calls `seen()` when it notices a change (a manifest scan that found changed
    files, an informer event), `sending()` when it starts handing the changes seen so far to
    the hub, and `handed_over()` once their messages are in the hub's node queues. `behind()`
    is the age of the oldest change seen and not handed over: it keeps growing across failed
    attempts (a database write that keeps failing), which is what an alert wants to see.
    Changes seen while a batch is being handed over wait for the next one.
    """

    __slots__ = ("_batch", "_clock", "_since", "last_seconds")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: float | None = None  # oldest change not yet in a batch
        self._batch: float | None = None  # oldest change of the batch being handed over
        self.last_seconds = 0.0  # seen -> handed over, for the last batch handed over

    def seen(self) -> None:
        if self._since is None:
            self._since = self._clock()

    def sending(self) -> None:
        if self._batch is None:  # else an unfinished batch is sent again: keep its age
            self._batch = self._since
        self._since = None

    def handed_over(self) -> None:
        if self._batch is not None:
            self.last_seconds = self._clock() - self._batch
            self._batch = None

    def clear(self) -> None:
        """Forget what was seen (e.g. the initial list, which is no change to hand over)."""
        self._since = self._batch = None

    def behind(self) -> float:
        oldest = self._batch if self._batch is not None else self._since
        return 0.0 if oldest is None else self._clock() - oldest


class CloudStore(Protocol):
    change_lag: ChangeLag  # for the store lag metrics

    async def run(
        self,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver the whole desired state, call `task_status.started()`, then every change.

        `deliver` is called synchronously (no shared FIFO in front of the node queues); the
        store yields to the scheduler between batches.

        Never returns; persists queued writes until cancelled (final flush shielded).
        """
        ...

    def acked_version(self, node_id: str, uid: str) -> str | None:
        """The resourceVersion `node_id` acknowledged for object `uid`, or None."""
        ...

    def record_sent(self, node_id: str, message: Message) -> None:
        """`message` (cloud resource form) is about to be sent: without an ack point for its
        object, create one at resourceVersion "0" (KubeEdge's ObjectSync before the first
        send), so a delete still reaches an edge whose ACK was lost, even after a restart."""
        ...

    def unwritten_marker(self, node_id: str, uid: str) -> trio.Event | None:
        """After `record_sent` created the "0" marker of `uid`: an event set once it is
        durable, or None when no marker waits to be written.

        The first send of an object waits for it: an edge that stored the object and whose
        ACK a crash lost is then still known to hold it, so the object goes as `update`
        after the restart (EdgeCore v1.10 acknowledges and ignores an insert of a held key).
        """
        ...

    def record_ack(self, node_id: str, message: Message) -> None:
        """An ACK arrived for `message` (cloud resource form): update or drop its ack point."""
        ...

    async def apply_report(self, node_id: str, message: Message) -> Message | None:
        """Store a node/pod status report (edge resource form); return a reply or None."""
        ...

    async def answer_query(self, node_id: str, message: Message) -> Message | None:
        """Answer an edge query (metaServer Application or metamanager `query`).

        The reply is in cloud resource form (`node/<id>/...`) so the hub routes it like any
        downstream message; None when the message is not a query this store answers.
        """
        ...

    def missed(self, node_id: str) -> list[Missed]:
        """What takes `node_id` from its ack points to the desired state (reconciliation).

        An insert/update for each object meant for the node whose ack point is missing or
        older, a delete for each ack point whose object is gone or no longer meant for it
        (never a node stop). Empty while a change is being delivered: its own messages are
        on their way. Like KubeEdge's sync controller comparing ObjectSyncs with objects.
        """
        ...

    def change_stamp(self, node_id: str) -> tuple[int, ...]:
        """Changes whenever the desired state or `node_id`'s ack points change, so a node
        found complete need not be compared again until it does (cheap, from memory)."""
        ...

    def pod_node(self, namespace: str, name: str) -> str | None:
        """The node pod `namespace/name` is bound to (spec.nodeName); None if unknown."""
        ...

    def record_connection(self, node_id: str, event: SessionEvent) -> None:
        """A session of `node_id` started or ended (synchronous, never blocks: a store
        that persists it does so in the background)."""
        ...

    def known_nodes(self) -> dict[str, NodeRecord]:
        """Every node the store knows (desired, joined, connected at least once, with
        objects or ack points), with what it remembers of each; from memory."""
        ...

    def node_known(self, name: str) -> bool:
        """Whether a node named `name` exists (`GET /node/{name}`); `StoreError` when the
        store cannot tell (not started)."""
        ...

    async def node_joined(self, name: str) -> None:
        """The HTTPS service issued a certificate for node `name`."""
        ...

    def api_server_ca(self) -> str:
        """PEM of the Kubernetes API server's CA, for the edge's `k8s/ca.crt` query; "" when
        there is none (KubeEdge answers "" when it cannot read it)."""
        ...
