"""Ack points against the desired state: what a node missed (pure, shared by every store).

An ack point (KubeEdge's ObjectSync) is the resourceVersion a node acknowledged for an object,
or `SENT_RV` ("0") when the object was sent but never acknowledged. Comparing a node's ack
points with what is placed on it gives the messages that take the node to the desired state:
an insert for an object without an ack point, an update for an older one or one only marked
sent ("0": the node may hold it), a delete for an ack point whose object is gone or no longer
meant for the node (rebuilt from the ack point alone when the object itself is gone), deletes
first. A node's own Node object going away is a node stop, never a reconciliation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import trio

from trio_cloudhub.core.message import OP_DELETE, OP_INSERT, OP_UPDATE, split_cloud_resource
from trio_cloudhub.store.base import Missed
from trio_cloudhub.store.manifests import ObjectKey
from trio_cloudhub.store.routing import (
    KINDS_BY_TYPE,
    Delivery,
    StoredObject,
    in_delivery_order,
    to_message,
)

SENT_RV = "0"  # the ack point of an object sent but never acknowledged (ObjectSync's "0")
MAX_RV_DIGITS = 20


@attrs.frozen(slots=True)
class AckPoint:
    rv: str
    resource: str  # the acknowledged message's cloud resource, to rebuild a delete


AckKey = tuple[str, str]  # (node, uid)


def rv_number(text: str) -> int:
    """A resourceVersion as a number (KubeEdge compares them so); 0 when it is none."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= MAX_RV_DIGITS else 0


def missed_deliveries(
    node_id: str,
    keys_on_node: Iterable[ObjectKey],
    objects: Mapping[ObjectKey, StoredObject],
    points: Mapping[str, AckPoint],
    find_uid: Callable[[str], StoredObject | None],
) -> list[Delivery]:
    """The deliveries that take `node_id` from its ack `points` to the desired state.

    `keys_on_node` are the keys placed on the node, `objects` the live ones, `find_uid` looks
    up a live object by uid (for one withdrawn from the node but still existing).
    """
    desired: dict[str, StoredObject] = {}
    for key in keys_on_node:
        obj = objects.get(key)
        if obj is not None:
            desired[obj.uid] = obj
    upserts: list[Delivery] = []
    for uid, obj in desired.items():
        point = points.get(uid)
        if point is None:
            upserts.append(Delivery(node_id, OP_INSERT, obj))
        elif rv_number(point.rv) < obj.rv:  # also "0": the node may hold it (see as_sent_to)
            upserts.append(Delivery(node_id, OP_UPDATE, obj))
    deletes: list[Delivery] = []
    for uid, point in points.items():
        if uid in desired:
            continue
        gone = find_uid(uid) or stub_object(uid, point)
        if gone is not None and gone.key.kind != "Node":
            deletes.append(Delivery(node_id, OP_DELETE, gone))
    # Deletes first: a v1.10 edge deletes by name, so the delete of a pod re-created under
    # the same name must reach it before the new pod does.
    return in_delivery_order(deletes, upserts)


def missed_on_node(
    node_id: str,
    keys_on_node: Iterable[ObjectKey],
    objects: Mapping[ObjectKey, StoredObject],
    points: Mapping[str, AckPoint],
) -> list[Missed]:
    """`CloudStore.missed`: `missed_deliveries` with the objects found by uid when needed."""
    by_uid: dict[str, StoredObject] | None = None

    def find_uid(uid: str) -> StoredObject | None:
        nonlocal by_uid
        if by_uid is None:  # only for a withdrawn object: rare, and costs a pass over all
            by_uid = {obj.uid: obj for obj in objects.values()}
        return by_uid.get(uid)

    deliveries = missed_deliveries(node_id, keys_on_node, objects, points, find_uid)
    return [as_missed(delivery) for delivery in deliveries]


def as_missed(delivery: Delivery) -> Missed:
    """A delivery as `CloudStore.missed` returns it: the message is built only when used."""
    return Missed(
        uid=delivery.obj.uid,
        resource_version=str(delivery.obj.rv),
        delete=delivery.operation == OP_DELETE,
        build=lambda: to_message(delivery, now_ms()),
    )


def stub_object(uid: str, point: AckPoint) -> StoredObject | None:
    """A minimal object for a delete when only the ack point is left of it."""
    parts = split_cloud_resource(point.resource)
    kind = KINDS_BY_TYPE.get(parts.resource_type) if parts else None
    if parts is None or kind is None or not parts.name:
        return None
    namespace = "" if kind == "Node" else parts.namespace
    rv = rv_number(point.rv)
    metadata: dict[str, Any] = {"name": parts.name}
    if namespace:
        metadata["namespace"] = namespace
    metadata.update(uid=uid, resourceVersion=str(rv))
    body = {"kind": kind, "apiVersion": "v1", "metadata": metadata}
    return StoredObject(
        key=ObjectKey(kind, namespace, parts.name),
        uid=uid,
        rv=rv,
        body=body,
        manifest="",
        source="",
    )


def now_ms() -> int:
    return int(time.time() * 1000)


class WriteWaiters:
    """Events for keys whose pending write someone waits for (`unwritten_marker`)."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], trio.Event] = {}

    def marker(
        self, key: tuple[str, str], rv: str | None, unwritten: Callable[[tuple[str, str]], bool]
    ) -> trio.Event | None:
        """`unwritten_marker`: an event when `key`'s point is the "0" marker (`rv`) and its
        write is still due (`unwritten(key)`), else None."""
        if rv != SENT_RV or not unwritten(key):
            return None
        return self.event(key)

    def event(self, key: tuple[str, str]) -> trio.Event:
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = trio.Event()
        return event

    def written(self, keys: Iterable[tuple[str, str]]) -> None:
        """These keys' values are durable now."""
        if not self._events:
            return
        for key in keys:
            event = self._events.pop(key, None)
            if event is not None:
                event.set()
