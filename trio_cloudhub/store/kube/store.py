"""The cloud side as a Kubernetes cluster: `CloudStore` over informers and ObjectSyncs.

What goes where (as CloudCore's edgecontroller, spec 15): nodes labelled
`node-role.kubernetes.io/edge` are edge nodes and each gets its own Node object; a pod whose
`spec.nodeName` is an edge node goes to it; config maps and secrets go to the edge nodes
whose pods reference them and are withdrawn when none does (`routing.Placer`). Messages
carry the object as the API server gave it (kind and apiVersion filled in: list items lack
them) and its resourceVersion.

How it runs:
- one `Informer` per kind (nodes, pods, config maps, secrets, ObjectSyncs,
  ClusterObjectSyncs), each blocking call in a worker thread; `run` reports started once
  every initial list is in memory (cache sync), so the hub serves edges only then;
- no messages at start-up: a node that connects is reconciled against its ack points
  (`missed`), like KubeEdge's sync controller does, which also covers a node moving from
  another hub and everything that changed while no hub was running;
- afterwards, informer events update the objects at once and are delivered in batches:
  the placement index is advanced by the changed keys and `routing.plan` gives the
  inserts, updates and deletes (a pod's graceful deletion is the `update` carrying
  `deletionTimestamp`, its removal the `delete` with the final object);
- ack points are `AckBook`'s ObjectSyncs, shared with every other hub on the cluster;
- edge reports and queries are answered by `KubeWriteback` (node and pod status written
  back, metaServer and metamanager queries from the caches).
When the API server goes away, informers retry with back-off and the hub keeps serving what
it has; when it comes back they catch up (relisting after a 410).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import attrs
import trio

from trio_cloudhub.core.message import OP_DELETE, Message, object_uid
from trio_cloudhub.store.answers import RequestError, answer_application, is_application
from trio_cloudhub.store.base import (
    ChangeLag,
    Deliver,
    Missed,
    NodeRecord,
    SessionEvent,
    StoreError,
)
from trio_cloudhub.store.handover import hand_over
from trio_cloudhub.store.kube.acks import (
    CLUSTER_OBJECT_SYNCS,
    GROUP,
    OBJECT_SYNCS,
    VERSION,
    AckBook,
)
from trio_cloudhub.store.kube.calls import RawApi
from trio_cloudhub.store.kube.client import RateLimiter
from trio_cloudhub.store.kube.informer import Informer
from trio_cloudhub.store.kube.writeback import KubeWriteback, parse_request
from trio_cloudhub.store.manifests import ObjectKey
from trio_cloudhub.store.reconcile import missed_on_node, now_ms, rv_number
from trio_cloudhub.store.routing import (
    KINDS_BY_TYPE,
    Delivery,
    Placer,
    StoredObject,
    plan,
    pod_node,
    ready_summary,
)

log = logging.getLogger("trio_cloudhub.kube")

EDGE_LABEL = "node-role.kubernetes.io/edge"
MAX_CA_BYTES = 64 * 1024
BATCH_DELAY = 0.005  # after the first event of a batch, for the events that follow it
# Threads for API writes. Few: each runnable thread competes with the event loop for the GIL,
# and 4 already keep hundreds of small requests a second in flight (bench.kube_fanout: 16
# threads took 34-38 s to deliver 10,000 objects, 4 took 13 s).
WRITE_THREADS = 4
INFORMER_KINDS = ("Node", "Pod", "ConfigMap", "Secret", "ObjectSync", "ClusterObjectSync")


class KubeStore:
    """`CloudStore` over a Kubernetes API server (see the module docstring)."""

    def __init__(
        self,
        api_client: Any,
        *,
        rate_limiter: RateLimiter | None = None,
        watch_timeout: int = 300,
        write_threads: int = WRITE_THREADS,
    ) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self.rate_limiter = rate_limiter
        self._ca_file = str(api_client.configuration.ssl_ca_cert or "")
        self._api_server_ca = ""
        # Each watch holds a thread for its whole stream: informers get their own threads.
        self._watch_threads = trio.CapacityLimiter(len(INFORMER_KINDS) + 2)
        self._write_threads = trio.CapacityLimiter(write_threads)
        self.informers = self._informers(watch_timeout)
        self.acks = AckBook(
            RawApi(api_client),
            run=self.run_in_thread,
            limiter=rate_limiter,
            concurrency=write_threads,
        )
        self.objects: dict[ObjectKey, StoredObject] = {}  # what edges may get
        self._edge_nodes: set[str] = set()
        self._records: dict[str, NodeRecord] = {}  # sessions this hub served (memory only)
        self._node_names: set[str] = set()  # every Node in the cluster, edge or not
        self._pod_nodes: dict[ObjectKey, str] = {}  # every pod with a node -> the node
        self._pods_on: dict[str, set[ObjectKey]] = {}  # node -> its pods (edge or not)
        self._placer = Placer()  # describes `objects` minus the pending changes
        self._before: dict[ObjectKey, StoredObject | None] = {}  # pending changes' old values
        self._finals: dict[str, StoredObject] = {}  # uid -> final version of a deleted object
        self._dirty = trio.Event()
        self._started = False
        self._sending = False
        self.batches = 0  # batches delivered (in change stamps)
        self.synced = trio.Event()
        self._deliver: Deliver | None = None
        self.change_lag = ChangeLag()  # an informer event -> its messages in the hub's queues
        self.writeback = KubeWriteback(
            RawApi(api_client), run=self.run_in_thread, cached=self.cached, limiter=rate_limiter
        )

    def _informers(self, watch_timeout: int) -> dict[str, Informer]:
        core, custom = self._core, self._custom
        functions: dict[str, Callable[..., Any]] = {
            "Node": core.list_node,
            "Pod": core.list_pod_for_all_namespaces,
            "ConfigMap": core.list_config_map_for_all_namespaces,
            "Secret": core.list_secret_for_all_namespaces,
            "ObjectSync": partial(custom.list_cluster_custom_object, GROUP, VERSION, OBJECT_SYNCS),
            "ClusterObjectSync": partial(
                custom.list_cluster_custom_object, GROUP, VERSION, CLUSTER_OBJECT_SYNCS
            ),
        }
        return {
            kind: Informer(kind, function, limiter=self._watch_threads, watch_timeout=watch_timeout)
            for kind, function in functions.items()
        }

    async def run_in_thread(self, function: Callable[[], Any]) -> Any:
        """A blocking client call in one of the bounded write threads."""
        return await trio.to_thread.run_sync(
            function, limiter=self._write_threads, abandon_on_cancel=True
        )

    # --- run ----------------------------------------------------------------------------

    async def run(
        self,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Sync every informer, report started, then deliver changes until cancelled."""
        self._deliver = deliver
        self._api_server_ca = await trio.to_thread.run_sync(self._read_api_server_ca)
        handlers = self._handlers()
        async with trio.open_nursery() as nursery:
            for kind, informer in self.informers.items():
                nursery.start_soon(informer.run, handlers[kind])
            for informer in self.informers.values():
                await informer.synced.wait()
            self._placer = Placer.of(self.objects)
            self._before.clear()
            self._finals.clear()
            self.change_lag.clear()  # the initial lists are no change (nothing is sent)
            self._started = True
            self.synced.set()
            log.info(
                "kubernetes caches synced: %d edge nodes, %d objects for them, %d ack points",
                len(self._edge_nodes),
                len(self.objects),
                sum(1 for _ in self.acks.all()),
            )
            nursery.start_soon(self.acks.write_forever)
            task_status.started()
            await self._deliver_forever(deliver)

    def _handlers(self) -> dict[str, Callable[[str, dict[str, Any]], None]]:
        return {
            "Node": self._on_node,
            "Pod": self._on_pod,
            "ConfigMap": partial(self._on_config, "ConfigMap"),
            "Secret": partial(self._on_config, "Secret"),
            "ObjectSync": partial(self.acks.on_event, namespaced=True),
            "ClusterObjectSync": partial(self.acks.on_event, namespaced=False),
        }

    # --- informer events (synchronous, in the trio thread) -------------------------------

    def _on_node(self, event: str, body: dict[str, Any]) -> None:
        stored = _stored("Node", body)
        name = stored.key.name
        was_edge = name in self._edge_nodes
        is_edge = event != "DELETED" and EDGE_LABEL in _labels(body)
        if event == "DELETED":
            self._node_names.discard(name)
        else:
            self._node_names.add(name)
        if is_edge:
            self._edge_nodes.add(name)
        else:
            self._edge_nodes.discard(name)
        self._put(stored.key, stored if is_edge else None, final=stored)
        if was_edge != is_edge:  # its pods enter or leave what edges get
            for pod in list(self._pods_on.get(name, ())):
                self._refresh_pod(pod)

    def _on_pod(self, event: str, body: dict[str, Any]) -> None:
        stored = _stored("Pod", body)
        key = stored.key
        node = "" if event == "DELETED" else pod_node(body)
        self._index_pod(key, node)
        on_edge = bool(node) and node in self._edge_nodes
        self._put(key, stored if on_edge else None, final=stored)

    def _on_config(self, kind: str, event: str, body: dict[str, Any]) -> None:
        stored = _stored(kind, body)
        self._put(stored.key, None if event == "DELETED" else stored, final=stored)

    def _index_pod(self, key: ObjectKey, node: str) -> None:
        before = self._pod_nodes.get(key, "")
        if before == node:
            return
        if before:
            pods = self._pods_on[before]
            pods.discard(key)
            if not pods:
                del self._pods_on[before]
        if node:
            self._pod_nodes[key] = node
            self._pods_on.setdefault(node, set()).add(key)
        else:
            del self._pod_nodes[key]

    def _refresh_pod(self, key: ObjectKey) -> None:
        body = self.informers["Pod"].cache.get((key.namespace, key.name))
        if body is None:
            return
        stored = _stored("Pod", body)
        self._put(key, stored if self._pod_nodes.get(key) in self._edge_nodes else None)

    def _put(
        self, key: ObjectKey, new: StoredObject | None, *, final: StoredObject | None = None
    ) -> None:
        """Change what edges may get; the change is delivered with the next batch."""
        old = self.objects.get(key)
        if old is None and new is None:
            return
        if key not in self._before:
            self._before[key] = old
        if new is None:
            del self.objects[key]
            if old is not None:  # a delete carries the final version when there is one
                self._finals[old.uid] = final if final and final.uid == old.uid else old
        else:
            self.objects[key] = new
        self.change_lag.seen()
        self._dirty.set()

    # --- delivery -----------------------------------------------------------------------

    async def _deliver_forever(self, deliver: Deliver) -> None:
        while True:
            await self._dirty.wait()
            await trio.sleep(BATCH_DELAY)
            self._dirty = trio.Event()
            await self._send(deliver, self._take_batch())

    def _take_batch(self) -> list[Delivery]:
        """The deliveries of the pending changes; advances the placement index with them."""
        before, self._before = self._before, {}
        finals, self._finals = self._finals, {}
        self.change_lag.sending()
        old = _Before(self.objects, before)
        step = self._placer.advance(old, self.objects, before.keys())
        by_uid: dict[str, StoredObject] = {}
        for objects in (old, self.objects):
            for key in step.keys:
                obj = objects.get(key)
                if obj is not None:
                    by_uid[obj.uid] = obj
        by_uid.update(finals)
        changed = {
            obj.uid
            for key, was in before.items()
            if was is not None and (obj := self.objects.get(key)) is not None
            if obj.uid == was.uid and obj.rv != was.rv
        }
        return plan(step.old, step.new, by_uid, changed)

    async def _send(self, deliver: Deliver, deliveries: list[Delivery]) -> None:
        self._sending = True
        try:
            await hand_over(deliveries, deliver, self.acks.forget_node)
            self.change_lag.handed_over()
        finally:
            self._sending = False
            self.batches += 1

    # --- ack points (CloudStore) --------------------------------------------------------

    def acked_version(self, node_id: str, uid: str) -> str | None:
        point = self.acks.get(node_id, uid)
        return point.rv if point is not None else None

    def record_sent(self, node_id: str, message: Message) -> None:
        uid = object_uid(message.content)
        if uid and message.route.operation != OP_DELETE:
            self.acks.mark_sent(node_id, uid, message.route.resource)

    def unwritten_marker(self, node_id: str, uid: str) -> trio.Event | None:
        return self.acks.unwritten_marker(node_id, uid)

    def record_ack(self, node_id: str, message: Message) -> None:
        uid = object_uid(message.content)
        if not uid:
            return
        if message.route.operation == OP_DELETE:
            self.acks.remove(node_id, uid)
        else:
            rv = message.header.resource_version
            self.acks.acknowledge(node_id, uid, rv, message.route.resource)

    def missed(self, node_id: str) -> list[Missed]:
        if self._sending or not self._started:
            return []  # a batch is half delivered: its own messages are on their way
        keys = self._placer.keys_on(node_id)
        return missed_on_node(node_id, keys, self.objects, self.acks.of_node(node_id))

    def change_stamp(self, node_id: str) -> tuple[int, ...]:
        return self.batches, self.acks.changes.get(node_id, 0)

    def pod_node(self, namespace: str, name: str) -> str | None:
        return self._pod_nodes.get(ObjectKey("Pod", namespace, name))

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion the caches have seen (for List answers)."""
        return max(rv_number(informer.resource_version) for informer in self.informers.values())

    def node_known(self, name: str) -> bool:
        """Whether the Node exists, from the informer's cache (CloudCore asks the API server
        each time; the cache spares it a request per anonymous caller)."""
        if not self._started:
            raise StoreError("the Kubernetes caches are not synced yet")
        return name in self._node_names

    async def node_joined(self, name: str) -> None:
        """Nothing to remember: the edge registers its Node itself."""

    def record_connection(self, node_id: str, event: SessionEvent) -> None:
        """Kept in memory: the cluster has no place for it (and with several hubs, each
        remembers the sessions it served)."""
        record = self._records.get(node_id) or NodeRecord(node_id)
        self._records[node_id] = record.after(event)

    def known_nodes(self) -> dict[str, NodeRecord]:
        """The edge nodes in the informer cache, and nodes that had a session here."""
        names = sorted(self._edge_nodes | set(self._records))
        return {name: self._known_node(name) for name in names}

    def _known_node(self, name: str) -> NodeRecord:
        node = self.objects.get(ObjectKey("Node", "", name))
        reported = ready_summary(node.body.get("status")) if node is not None else ""
        return attrs.evolve(
            self._records.get(name) or NodeRecord(name),
            desired=name in self._edge_nodes,
            reported=reported,
        )

    def api_server_ca(self) -> str:
        """The CA the client trusts the API server with (kubeconfig or in-cluster), as read
        when `run` started."""
        return self._api_server_ca

    def _read_api_server_ca(self) -> str:
        path = self._ca_file
        if not path:
            return ""
        try:
            with open(path, encoding="ascii") as file:
                return file.read(MAX_CA_BYTES)
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the API server CA %s: %s", path, exc)
            return ""

    def is_edge_node(self, name: str) -> bool:
        return name in self._edge_nodes

    # --- upstream (CloudStore) ----------------------------------------------------------

    async def apply_report(self, node_id: str, message: Message) -> Message | None:
        return await self._write_back(node_id, message)

    async def answer_query(self, node_id: str, message: Message) -> Message | None:
        if is_application(message):
            try:
                return answer_application(
                    node_id, message, self.objects, self.resource_version, now_ms()
                )
            except RequestError as exc:
                log.warning("node %s: unanswerable metaserver request: %s", node_id, exc)
                return None
        return await self._write_back(node_id, message)

    async def _write_back(self, node_id: str, message: Message) -> Message | None:
        """The first answer is returned; the others (a delete on the edge) go downstream."""
        request = parse_request(node_id, message)
        if request is None:
            log.debug("node %s: nothing to do for %s", node_id, message.route)
            return None
        replies = await self.writeback.handle(request)
        for extra in replies[1:]:
            if self._deliver is not None:
                self._deliver(extra)
        return replies[0] if replies else None

    def cached(self, resource_type: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The newest object the informers hold (by message resource type), or None."""
        kind = KINDS_BY_TYPE.get(resource_type)
        informer = self.informers.get(kind) if kind else None
        if informer is None:
            return None
        return informer.cache.get(("" if kind == "Node" else namespace, name))


class _Before(Mapping[ObjectKey, StoredObject]):
    """The objects as they were before the pending changes, without copying them."""

    def __init__(
        self, now: Mapping[ObjectKey, StoredObject], before: Mapping[ObjectKey, StoredObject | None]
    ) -> None:
        self._now = now
        self._before = before

    def __getitem__(self, key: ObjectKey) -> StoredObject:
        if key in self._before:
            old = self._before[key]
            if old is None:
                raise KeyError(key)
            return old
        return self._now[key]

    def __iter__(self) -> Iterator[ObjectKey]:
        for key in self._now:
            if key not in self._before:
                yield key
        for key, old in self._before.items():
            if old is not None:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _stored(kind: str, body: dict[str, Any]) -> StoredObject:
    """The object as the store keeps it; kind/apiVersion filled in (list items lack them)."""
    body.setdefault("kind", kind)
    body.setdefault("apiVersion", "v1")
    metadata = body.get("metadata") or {}
    namespace = "" if kind == "Node" else str(metadata.get("namespace") or "")
    return StoredObject(
        key=ObjectKey(kind, namespace, str(metadata.get("name") or "")),
        uid=str(metadata.get("uid") or ""),
        rv=rv_number(str(metadata.get("resourceVersion") or "")),
        body=body,
        manifest="",
        source="",
    )


def _labels(body: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = (body.get("metadata") or {}).get("labels")
    return labels if isinstance(labels, dict) else {}
