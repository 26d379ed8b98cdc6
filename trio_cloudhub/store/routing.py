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
`Placer` keeps the placement current change by change, so that a change costs what it
touches (the store's hot path); `place()` is the same computed from scratch.
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


def ready_summary(status: Any) -> str:
    """Ready / NotReady / Unknown from the Ready condition of a node's status."""
    conditions = status.get("conditions") if isinstance(status, dict) else None
    for condition in conditions if isinstance(conditions, list) else []:
        if isinstance(condition, dict) and condition.get("type") == "Ready":
            state = condition.get("status")
            return {"True": "Ready", "False": "NotReady"}.get(str(state), "Unknown")
    return "Unknown"


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
    """The placement of `objects` (what `Placer` keeps current change by change)."""
    return Placer.of(objects).pairs(objects, objects)


@attrs.frozen(slots=True)
class PodPlace:
    """Where a pod runs and what it needs there."""

    node: str
    refs: frozenset[ObjectKey]


def pod_place(pod: Mapping[str, Any]) -> PodPlace | None:
    """None for a pod without a node: it places nothing."""
    node = pod_node(pod)
    return PodPlace(node, frozenset(pod_references(pod))) if node else None


@attrs.frozen(slots=True)
class Step:
    """The placement around one change: `old` and `new` hold every pair that differs, every
    pair of a changed object and, for a node whose Node object (re)appeared, all its pairs;
    `keys` are the objects those pairs belong to."""

    old: Placement
    new: Placement
    keys: set[ObjectKey]


class Placer:
    """`place()` kept current one changed object at a time.

    It holds, for each pod with a node, that node and the ConfigMaps/Secrets the pod
    references, and for each referenced key the nodes whose pods use it (with a count), so a
    change costs in proportion to what it touches: one ConfigMap used on 1,000 nodes is 1,000
    pairs, not a new placement of every pod. Only pods are indexed (a pod's place depends on
    its body alone); whether a referenced object exists is looked up in the objects given.
    """

    def __init__(self) -> None:
        self._pods: dict[ObjectKey, PodPlace] = {}
        self._users: dict[ObjectKey, dict[str, int]] = {}  # ref -> node -> pods there using it
        self._pods_on: dict[str, set[ObjectKey]] = {}  # node -> its pods

    @classmethod
    def of(cls, objects: Mapping[ObjectKey, StoredObject]) -> Placer:
        placer = cls()
        for key, obj in objects.items():
            if key.kind == "Pod":
                placer._set(key, pod_place(obj.body))
        return placer

    def pairs(
        self, keys: Iterable[ObjectKey], objects: Mapping[ObjectKey, StoredObject]
    ) -> Placement:
        """The pairs of the objects `keys` (those in `objects`), as indexed now."""
        placement: Placement = set()
        for key in keys:
            obj = objects.get(key)
            if obj is None:
                continue
            if key.kind == "Node":
                placement.add((key.name, obj.uid))
            elif key.kind == "Pod":
                where = self._pods.get(key)
                if where is not None:
                    placement.add((where.node, obj.uid))
            else:
                uid = obj.uid
                placement.update((node, uid) for node in self._users.get(key, ()))
        return placement

    def has_pods(self, node: str) -> bool:
        return node in self._pods_on

    def nodes_with_pods(self) -> Iterator[str]:
        return iter(self._pods_on)

    def keys_on(self, node: str) -> set[ObjectKey]:
        """The keys placed on `node` if they exist: its Node, its pods, what they use."""
        keys = {ObjectKey("Node", "", node)}
        for pod in self._pods_on.get(node, ()):
            keys.add(pod)
            keys.update(self._pods[pod].refs)
        return keys

    def advance(
        self,
        old: Mapping[ObjectKey, StoredObject],
        new: Mapping[ObjectKey, StoredObject],
        dirty: Iterable[ObjectKey],
        *,
        full: bool = False,
    ) -> Step:
        """Move the index from `old` to `new`, which differ only in the `dirty` keys.

        The step's placements are all `plan()` needs to take the edges from `old` to `new`
        (`full`: the whole placements, for the initial sync). The index must describe `old`.
        """
        dirty = set(dirty)
        keys = set(old) | set(new) if full else set(dirty)
        moved: dict[ObjectKey, PodPlace | None] = {}
        for key in dirty:
            if key.kind != "Pod":
                continue
            obj = new.get(key)
            before, after = self._pods.get(key), pod_place(obj.body) if obj else None
            if before != after:
                moved[key] = after
                keys.update(before.refs if before else ())
                keys.update(after.refs if after else ())
        old_pairs = self.pairs(keys, old)
        for key, after in moved.items():
            self._set(key, after)
        new_pairs = self.pairs(keys, new)
        # A node whose Node object (re)appears gets its whole state again (see plan()):
        # the pairs of everything on it, which are the same before and after.
        reborn = {
            key.name
            for key in dirty
            if key.kind == "Node" and key in new and (key.name, new[key].uid) not in old_pairs
        }
        extra: set[ObjectKey] = set()
        for node in reborn:
            for pod in self._pods_on.get(node, ()):
                extra.add(pod)
                extra.update(self._pods[pod].refs)
        extra -= keys
        if extra:
            same = self.pairs(extra, new)
            old_pairs |= same
            new_pairs |= same
            keys |= extra
        return Step(old=old_pairs, new=new_pairs, keys=keys)

    def _set(self, key: ObjectKey, where: PodPlace | None) -> None:
        before = self._pods.pop(key, None)
        if before is not None:
            self._pods_on[before.node].discard(key)
            if not self._pods_on[before.node]:
                del self._pods_on[before.node]
            for ref in before.refs:
                users = self._users[ref]
                users[before.node] -= 1
                if not users[before.node]:
                    del users[before.node]
                    if not users:
                        del self._users[ref]
        if where is not None:
            self._pods[key] = where
            self._pods_on.setdefault(where.node, set()).add(key)
            for ref in where.refs:
                users = self._users.setdefault(ref, {})
                users[where.node] = users.get(where.node, 0) + 1


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
    return in_delivery_order(deletes, upserts)


def in_delivery_order(deletes: list[Delivery], upserts: list[Delivery]) -> list[Delivery]:
    """Deletes (pods first), then upserts (what pods use first), each by node and name."""
    # (kind order, node, namespace, name): the order of ObjectKey, with cheaper comparisons
    deletes.sort(key=lambda d: (_DELETE_ORDER[d.obj.key.kind], d.node, *_name(d.obj.key)))
    upserts.sort(key=lambda d: (_UPSERT_ORDER[d.obj.key.kind], d.node, *_name(d.obj.key)))
    return deletes + upserts


def _name(key: ObjectKey) -> tuple[str, str]:
    return key.namespace, key.name


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
