"""Ack points as KubeEdge keeps them: ObjectSync and ClusterObjectSync custom resources.

One resource per (node, object), named `<node>.<object uid>` (spec 6.3): an ObjectSync in the
object's namespace, a ClusterObjectSync for cluster-scoped objects (the Node). `spec` names
the object (`objectAPIVersion`, `objectKind`, `objectName`), `status.objectResourceVersion`
is the version the node acknowledged, "0" when it was sent and not acknowledged yet.

`AckBook` keeps them in memory, fed by informers on both kinds, so every hub sharing the
cluster sees the others' writes. Its own changes apply in memory at once and are written in
the background: coalesced by key (the newest wins), at most `concurrency` calls at a time,
throttled by the API rate limiter, failed writes retried with back-off (a permanent refusal
is logged and dropped). An informer event older than the book's own last write of that key
is ignored, so the echo of an earlier write never moves a point backwards.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from typing import Any

import attrs
import trio

from trio_cloudhub.core.message import cloud_resource, split_cloud_resource
from trio_cloudhub.store.kube.calls import KubeCallError, RawApi
from trio_cloudhub.store.kube.client import RateLimiter
from trio_cloudhub.store.reconcile import SENT_RV, AckKey, AckPoint, WriteWaiters, rv_number
from trio_cloudhub.store.routing import KINDS_BY_TYPE, RESOURCE_TYPES

log = logging.getLogger("trio_cloudhub.kube")

GROUP = "reliablesyncs.kubeedge.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
OBJECT_SYNCS = "objectsyncs"
CLUSTER_OBJECT_SYNCS = "clusterobjectsyncs"
UID_LENGTH = 36  # Kubernetes uids are RFC 4122 text
RETRY_BASE = 0.5
RETRY_CAP = 30.0
MERGE_PATCH = "application/merge-patch+json"
WRITE_BATCH_DELAY = 0.02  # lets an ACK that follows its send closely coalesce with it


@attrs.frozen(slots=True)
class SyncName:
    """Where a (node, object) ack point lives in the API."""

    namespace: str  # "" for a ClusterObjectSync
    name: str  # <node>.<uid>


@attrs.frozen(slots=True)
class Pending:
    point: AckPoint | None  # None: delete the resource
    namespace: str
    kind: str
    object_name: str


def sync_name(node: str, uid: str) -> str:
    return f"{node}.{uid}"


def split_sync_name(name: str) -> AckKey | None:
    """(node, uid) of `<node>.<uid>` (node names may hold dots; uids do not)."""
    node, dot, uid = name.rpartition(".")
    if not dot or not node or len(uid) != UID_LENGTH:
        return None
    return node, uid


def point_of(sync: Mapping[str, Any], namespaced: bool) -> tuple[AckKey, AckPoint] | None:
    """The ack point an (Cluster)ObjectSync describes; None when it is not one of ours."""
    metadata = sync.get("metadata") or {}
    key = split_sync_name(str(metadata.get("name") or ""))
    spec, status = sync.get("spec") or {}, sync.get("status") or {}
    kind, name = spec.get("objectKind"), spec.get("objectName")
    resource_type = RESOURCE_TYPES.get(kind) if isinstance(kind, str) else None
    if key is None or resource_type is None or not isinstance(name, str):
        return None
    namespace = str(metadata.get("namespace") or "") if namespaced else ""
    rv = status.get("objectResourceVersion") if isinstance(status, dict) else None
    resource = cloud_resource(key[0], namespace, resource_type, name)
    return key, AckPoint(rv=rv if isinstance(rv, str) and rv else SENT_RV, resource=resource)


def sync_body(node: str, uid: str, pending: Pending) -> dict[str, Any]:
    kind = "ObjectSync" if pending.namespace else "ClusterObjectSync"
    metadata: dict[str, Any] = {"name": sync_name(node, uid)}
    if pending.namespace:
        metadata["namespace"] = pending.namespace
    assert pending.point is not None
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": metadata,
        "spec": {
            "objectAPIVersion": "v1",
            "objectKind": pending.kind,
            "objectName": pending.object_name,
        },
        "status": {"objectResourceVersion": pending.point.rv},
    }


Runner = Callable[[Callable[[], Any]], Awaitable[Any]]  # runs a blocking call in a thread


class AckBook:
    """Ack points of every node, in memory and (in the background) in the API."""

    def __init__(
        self,
        api: RawApi,
        *,
        run: Runner,
        limiter: RateLimiter | None = None,
        concurrency: int = 4,
    ) -> None:
        self._api = api
        self._run = run
        self._limiter = limiter
        self._concurrency = concurrency
        self.points: dict[str, dict[str, AckPoint]] = {}  # node -> uid -> point
        self.changes: dict[str, int] = {}  # node -> changes seen (change stamps)
        self._pending: dict[AckKey, Pending] = {}
        self._writing: set[AckKey] = set()
        self._marker_waiters = WriteWaiters()
        self._written_rv: dict[AckKey, int] = {}  # the API resourceVersion of our last write
        self._exists: set[AckKey] = set()  # resources the API holds, as far as we know
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.failures = 0  # writes that failed (retried or dropped)

    # --- reads --------------------------------------------------------------------------

    def get(self, node: str, uid: str) -> AckPoint | None:
        return self.points.get(node, {}).get(uid)

    def of_node(self, node: str) -> Mapping[str, AckPoint]:
        return self.points.get(node, {})

    def all(self) -> Iterator[tuple[str, str, AckPoint]]:
        for node, points in self.points.items():
            for uid, point in points.items():
                yield node, uid, point

    # --- informer events ----------------------------------------------------------------

    def on_event(self, event: str, sync: dict[str, Any], *, namespaced: bool) -> None:
        found = point_of(sync, namespaced)
        if found is None:
            return
        key, point = found
        if event == "DELETED":
            self._exists.discard(key)
        else:
            self._exists.add(key)
        if key in self._pending or key in self._writing:
            return  # our own newer value is on its way
        api_rv = rv_number(str((sync.get("metadata") or {}).get("resourceVersion") or ""))
        if api_rv and api_rv < self._written_rv.get(key, 0):
            return  # the echo of an earlier write of ours
        self._set(key, None if event == "DELETED" else point)

    # --- our changes --------------------------------------------------------------------

    def mark_sent(self, node: str, uid: str, resource: str) -> None:
        """An ack point at "0" unless the object has one (KubeEdge: before the first send)."""
        if self.get(node, uid) is None:
            self._change(node, uid, AckPoint(SENT_RV, resource))

    def unwritten_marker(self, node: str, uid: str) -> trio.Event | None:
        """An event set once the "0" marker of (node, uid) is written; None if none waits."""
        point = self.get(node, uid)
        return self._marker_waiters.marker(
            (node, uid), None if point is None else point.rv, self._unwritten
        )

    def _unwritten(self, key: AckKey) -> bool:
        return key in self._pending or key in self._writing

    def acknowledge(self, node: str, uid: str, rv: str, resource: str) -> None:
        point = AckPoint(rv, resource)
        if rv and self.get(node, uid) != point:
            self._change(node, uid, point)

    def remove(self, node: str, uid: str) -> None:
        point = self.get(node, uid)
        if point is not None:
            self._change(node, uid, None, resource=point.resource)

    def forget_node(self, node: str) -> None:
        """A node left the desired state: its ack points go (KubeEdge's garbage collection)."""
        for uid in list(self.of_node(node)):
            self.remove(node, uid)

    def _change(self, node: str, uid: str, point: AckPoint | None, *, resource: str = "") -> None:
        parts = split_cloud_resource(point.resource if point else resource)
        kind = KINDS_BY_TYPE.get(parts.resource_type) if parts else None
        if parts is None or kind is None:
            return
        namespace = "" if kind == "Node" else parts.namespace
        self._set((node, uid), point)
        self._pending[(node, uid)] = Pending(point, namespace, kind, parts.name)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    def _set(self, key: AckKey, point: AckPoint | None) -> None:
        node, uid = key
        points = self.points.setdefault(node, {})
        if point is None:
            points.pop(uid, None)
        else:
            points[uid] = point
        if not points:
            del self.points[node]
        self.changes[node] = self.changes.get(node, 0) + 1

    # --- the writer ---------------------------------------------------------------------

    async def write_forever(self) -> None:
        """Write pending changes, batch after batch, until cancelled."""
        retry = RETRY_BASE
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                await trio.sleep(WRITE_BATCH_DELAY)
            batch = self._take_batch()
            self._writing = set(batch)
            failed = await self._write_batch(batch)
            self._writing = set()
            for key, pending in failed.items():
                self._pending.setdefault(key, pending)  # a newer change wins
            if failed:
                await trio.sleep(retry)
                retry = min(retry * 2, RETRY_CAP)
            else:
                retry = RETRY_BASE

    def _take_batch(self) -> dict[AckKey, Pending]:
        """The pending markers alone when there are any (first sends wait for them), else
        everything pending."""
        markers = {key: pending for key, pending in self._pending.items() if _is_marker(pending)}
        if markers and len(markers) < len(self._pending):
            for key in markers:
                del self._pending[key]
            return markers
        batch, self._pending = self._pending, {}
        return batch

    async def wait_written(self) -> None:
        """Until nothing is pending (tests, shutdown)."""
        await self._idle.wait()

    async def _write_batch(self, batch: Mapping[AckKey, Pending]) -> dict[AckKey, Pending]:
        """`concurrency` workers take the batch's keys in turn; returns those that failed."""
        failed: dict[AckKey, Pending] = {}
        items = iter(list(batch.items()))

        async def worker() -> None:
            for key, pending in items:
                if await self._write_one(key, pending):
                    self._marker_waiters.written((key,))  # its first send may go now
                else:
                    failed[key] = pending

        async with trio.open_nursery() as nursery:
            for _ in range(min(self._concurrency, len(batch))):
                nursery.start_soon(worker)
        return failed

    async def _write_one(self, key: AckKey, pending: Pending) -> bool:
        """True when written (or permanently refused: logged and dropped)."""
        try:
            answer = await self._api_write(key, pending)
        except KubeCallError as exc:
            self.failures += 1
            if exc.status is None or exc.status >= 500 or exc.status in (409, 429):
                log.debug("ack point %s.%s: %s; retrying", *key, exc)
                return False
            log.warning("ack point %s.%s not written, dropped: %s", *key, exc)
            return True
        if isinstance(answer, dict):
            rv = rv_number(str((answer.get("metadata") or {}).get("resourceVersion") or ""))
            self._written_rv[key] = max(rv, self._written_rv.get(key, 0))
        return True

    async def _api_write(self, key: AckKey, pending: Pending) -> Any:
        """One worker-thread job per key: create when needed, then the status write."""
        calls = 1 if pending.point is None or key in self._exists else 2
        if self._limiter is not None:
            for _ in range(calls):
                await self._limiter.acquire()
        write = partial(_write_blocking, self._api, key, pending, key in self._exists)
        try:
            answer, exists = await self._run(write)
        except KubeCallError as exc:
            if exc.status == 404 and pending.point is not None:
                self._exists.discard(key)  # deleted meanwhile: create it next time
            raise
        if exists:
            self._exists.add(key)
        else:
            self._exists.discard(key)
        return answer


def _is_marker(pending: Pending) -> bool:
    return pending.point is not None and pending.point.rv == SENT_RV


# --- blocking calls, in worker threads ---------------------------------------------------


def sync_path(namespace: str, name: str = "") -> str:
    """The API path of an ObjectSync (namespace given) or a ClusterObjectSync."""
    base = f"/apis/{GROUP}/{VERSION}"
    path = (
        f"{base}/namespaces/{namespace}/{OBJECT_SYNCS}"
        if namespace
        else f"{base}/{CLUSTER_OBJECT_SYNCS}"
    )
    return f"{path}/{name}" if name else path


def _write_blocking(api: RawApi, key: AckKey, pending: Pending, exists: bool) -> tuple[Any, bool]:
    """Write one ack point; returns the API's answer and whether the resource exists now."""
    node, uid = key
    name = sync_name(node, uid)
    if pending.point is None:
        try:
            return api.request(
                "DELETE", sync_path(pending.namespace, name), query="gracePeriodSeconds=0"
            ), False
        except KubeCallError as exc:
            if exc.status == 404:
                return None, False
            raise
    if not exists:
        try:
            api.request("POST", sync_path(pending.namespace), sync_body(node, uid, pending))
        except KubeCallError as exc:
            if exc.status != 409:  # AlreadyExists: another hub created it, fine
                raise
    status = {"status": {"objectResourceVersion": pending.point.rv}}
    path = sync_path(pending.namespace, name) + "/status"
    return api.request("PATCH", path, status, content_type=MERGE_PATCH), True
