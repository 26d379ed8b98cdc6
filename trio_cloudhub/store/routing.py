"""Which object goes to which node, and the messages a change of that produces.

Pure functions (no I/O, no clock). A *placement* is the set of (node, uid) pairs the cloud
wants to exist on the edges:
- a Node `<n>` is placed on node `<n>`;
- a Pod on the node in its `spec.nodeName` (none when empty);
- a ConfigMap or Secret on every node running a pod of the same namespace that references it
  (volumes, projected sources, env valueFrom, envFrom, and imagePullSecrets for secrets).
Comparing the placement before and after a change gives the deliveries: a pair that appears
is an `insert` (CloudCore sends Nodes only as `update`), a pair whose object got a new
resourceVersion is an `update`, a pair that disappears is a `delete` (for a Node: the
node-stop message that makes the hub close the session).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from trio_cloudhub.core.message import (
    GROUP_RESOURCE,
    OP_DELETE,
    OP_INSERT,
    OP_UPDATE,
    SOURCE_EDGECONTROLLER,
    Message,
    cloud_resource,
    new_message,
)
from trio_cloudhub.store.manifests import ObjectKey

# kind -> resource type in message resources
RESOURCE_TYPES: Mapping[str, str] = {
    "Node": "node",
    "Pod": "pod",
    "ConfigMap": "configmap",
    "Secret": "secret",
}
KINDS_BY_TYPE: Mapping[str, str] = {value: key for key, value in RESOURCE_TYPES.items()}
# Deliveries go out deletes first (pods before what they use), then upserts (what pods use
# before the pods), so an edge never sees a pod whose config map is still on its way.
_DELETE_ORDER = {"Pod": 0, "ConfigMap": 1, "Secret": 2, "Node": 3}
_UPSERT_ORDER = {"Node": 0, "ConfigMap": 1, "Secret": 2, "Pod": 3}

Placement = set[tuple[str, str]]  # (node, uid)


@attrs.frozen(slots=True, eq=False)
class StoredObject:
    """An object as the store keeps it: the full body carries uid and resourceVersion."""

    key: ObjectKey
    uid: str
    rv: int
    body: dict[str, Any]
    manifest: str  # canonical JSON of the user's document, to detect real changes
    source: str  # manifest file name


@attrs.frozen(slots=True)
class Delivery:
    node: str
    operation: str  # insert, update or delete
    obj: StoredObject


# --- references -----------------------------------------------------------------------------


def pod_node(pod: Mapping[str, Any]) -> str:
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, dict) else None
    return node if isinstance(node, str) else ""


def pod_references(pod: Mapping[str, Any]) -> set[ObjectKey]:
    """ConfigMaps and Secrets the pod needs, in the pod's namespace."""
    namespace = _metadata(pod).get("namespace") or ""
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return set()
    refs: set[tuple[str, Any]] = set()
    refs.update(_volume_refs(spec.get("volumes")))
    for field in ("containers", "initContainers", "ephemeralContainers"):
        for container in _dicts(spec.get(field)):
            refs.update(_env_refs(container))
    refs.update(("Secret", ref.get("name")) for ref in _dicts(spec.get("imagePullSecrets")))
    return {ObjectKey(kind, namespace, name) for kind, name in refs if _is_name(name)}


def _volume_refs(volumes: Any) -> Iterator[tuple[str, Any]]:
    for volume in _dicts(volumes):
        yield "ConfigMap", _field(volume, "configMap", "name")
        yield "Secret", _field(volume, "secret", "secretName")
        projected = volume.get("projected")
        sources = projected.get("sources") if isinstance(projected, dict) else None
        for source in _dicts(sources):
            yield "ConfigMap", _field(source, "configMap", "name")
            yield "Secret", _field(source, "secret", "name")


def _env_refs(container: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for env in _dicts(container.get("env")):
        value_from = env.get("valueFrom")
        if isinstance(value_from, dict):
            yield "ConfigMap", _field(value_from, "configMapKeyRef", "name")
            yield "Secret", _field(value_from, "secretKeyRef", "name")
    for env_from in _dicts(container.get("envFrom")):
        yield "ConfigMap", _field(env_from, "configMapRef", "name")
        yield "Secret", _field(env_from, "secretRef", "name")


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))


def _field(value: dict[str, Any], outer: str, inner: str) -> Any:
    nested = value.get(outer)
    return nested.get(inner) if isinstance(nested, dict) else None


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = body.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


# --- placement and deliveries ---------------------------------------------------------------


def place(objects: Mapping[ObjectKey, StoredObject]) -> Placement:
    placement: Placement = set()
    for key, obj in objects.items():
        if key.kind == "Node":
            placement.add((key.name, obj.uid))
        elif key.kind == "Pod" and (node := pod_node(obj.body)):
            placement.add((node, obj.uid))
            for ref in pod_references(obj.body):
                used = objects.get(ref)
                if used is not None:
                    placement.add((node, used.uid))
    return placement


def plan(
    old: Placement,
    new: Placement,
    objects: Mapping[str, StoredObject],
    changed: Iterable[str] = (),
    *,
    full: bool = False,
) -> list[Delivery]:
    """Deliveries that take the edges from `old` to `new`.

    `objects` maps every uid in either placement to the object to send (for a removed object:
    its final version). `changed` are the uids whose content changed. `full` sends every pair
    of `new` (initial sync). A node whose Node object (re)appears gets its whole state again,
    since the hub forgot it with the node-stop.
    """
    changed = set(changed)
    deletes = [Delivery(node, OP_DELETE, objects[uid]) for node, uid in old - new]
    reborn = {node for node, uid in new - old if objects[uid].key.kind == "Node"}
    upserts: list[Delivery] = []
    for node, uid in new:
        obj = objects[uid]
        if full or (node, uid) not in old or node in reborn:
            upserts.append(Delivery(node, OP_INSERT, obj))
        elif uid in changed:
            upserts.append(Delivery(node, OP_UPDATE, obj))
    deletes.sort(key=lambda d: (_DELETE_ORDER[d.obj.key.kind], d.node, d.obj.key))
    upserts.sort(key=lambda d: (_UPSERT_ORDER[d.obj.key.kind], d.node, d.obj.key))
    return deletes + upserts


def node_stop_resource(node: str) -> str:
    """The resource of a node deletion: literal namespace `namespace` (spec 3.3)."""
    return f"node/{node}/namespace/node/{node}"


def is_node_stop(delivery: Delivery) -> bool:
    return delivery.obj.key.kind == "Node" and delivery.operation == OP_DELETE


def to_message(delivery: Delivery, now_ms: int) -> Message:
    obj = delivery.obj
    operation = delivery.operation
    if obj.key.kind == "Node":
        if operation == OP_DELETE:
            resource = node_stop_resource(delivery.node)
        else:
            operation = OP_UPDATE  # CloudCore sends nodes only as update
            resource = cloud_resource(delivery.node, "", "node", obj.key.name)
    else:
        resource_type = RESOURCE_TYPES[obj.key.kind]
        resource = cloud_resource(delivery.node, obj.key.namespace, resource_type, obj.key.name)
    return new_message(
        source=SOURCE_EDGECONTROLLER,
        group=GROUP_RESOURCE,
        operation=operation,
        resource=resource,
        content=obj.body,
        now_ms=now_ms,
        resource_version=str(obj.rv),
    )
