"""The embedded cloud side: a folder of manifests as desired state, SQLite as memory.

Usage (the store must be open before the hub reads ack points)::

    async with open_local_store(data_dir, manifests_dir, poll_interval=1.0) as store:
        await nursery.start(store.run, hub.route_downstream)

`LocalStore(...)` with `await store.open()` / `await store.aclose()` is the same without the
context manager; `run` opens the store itself when needed (and then closes it on exit).

How it works:
- objects, the resourceVersion counter, ack points and edge reports live in
  `<data_dir>/store.db` (see `localdb`); reads the hub makes on its hot path
  (`acked_version`, queries) are served from memory;
- `run` loads the database, reads every manifest file, reconciles (objects whose files went
  away while the hub was down are deleted; unchanged objects keep uid and resourceVersion),
  sends the whole desired state plus those deletes, reports started, then rescans the folder
  whenever it may have changed and sends what changed (see `routing` for who gets what);
- "may have changed": on Linux an inotify watch on the folder (`watch`) wakes the store at
  once; it rescans as soon as the writes it was told of are complete (`_settle`: every file
  created or modified since was closed or renamed into place, then 2 ms without news, so a
  burst of writes is one sync), and after `WATCH_DEBOUNCE` (20 ms) at most: a file still open
  for writing, or one deleted or moved away (an editor's save may rename the old file first),
  waits that long. Nothing else wakes it: a folder nobody changes costs nothing. Only where inotify
  cannot see every change (`watch.blind_spot`, checked at every scan: a network file system,
  a symlink in the folder's path, a manifest that is a symlink to a file elsewhere) a slow
  fallback poll runs too, every `max(WATCHED_POLL_MIN, poll_interval * WATCHED_POLL_FACTOR)`
  seconds (5 s at the default 0.25 s); the reason is logged once. A lost or coalesced event
  (queue overflow) still wakes the store and a scan finds everything; the folder itself
  removed or replaced ends the watch, and the store polls until it can watch it again.
  Without inotify (other systems, `watch=False`, no inotify instance left, the folder gone
  until it is back) the folder is polled every `poll_interval` seconds, as is a failed sync;
- a rescan stats the folder (in a worker thread) and reads only the files whose stamp
  changed; only the objects of those files are reconciled, and the placement (`Placer`) is
  advanced by what changed: one edited ConfigMap used by N pods costs N messages, not a
  new placement of every object;
- a file that cannot be used is reported once per change and keeps its last good objects,
  also across restarts (the database remembers which file each object came from);
- ack points are written in batches in the background (every 20 ms or 500 pending) and
  flushed once more, shielded and bounded, when `run` is cancelled.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from trio_cloudhub.core.message import (
    OP_DELETE,
    Message,
    object_uid,
)
from trio_cloudhub.store.answers import (
    RequestError,
    answer_application,
    answer_metamanager_query,
    is_application,
    is_metamanager_query,
    is_report,
    report_reply,
    report_rows,
)
from trio_cloudhub.store.base import (
    ChangeLag,
    Deliver,
    Missed,
    NodeRecord,
    SessionEvent,
    StoreError,
)
from trio_cloudhub.store.handover import hand_over
from trio_cloudhub.store.localdb import (
    DB_NAME,
    KIND_NODE_STATUS,
    Database,
    Report,
    ReportRow,
    node_summary,
    read_reports,
)
from trio_cloudhub.store.manifests import (
    FileResult,
    FileStamp,
    Manifest,
    ManifestError,
    ObjectKey,
    changes_manifests,
    manifest_from_text,
    merge_files,
    read_manifest_file,
    stamp_folder,
)
from trio_cloudhub.store.reconcile import (
    SENT_RV,
    AckKey,
    AckPoint,
    WriteWaiters,
    missed_on_node,
    now_ms,
    stub_object,
)
from trio_cloudhub.store.routing import (
    Delivery,
    Placement,
    Placer,
    StoredObject,
    plan,
    pod_node,
)
from trio_cloudhub.store.watch import FolderWatch, blind_spot, filesystem_type, folder_watch

__all__ = ["LocalStore", "Report", "StoreError", "open_local_store", "read_reports"]

log = logging.getLogger("trio_cloudhub.store")

ACK_FLUSH_INTERVAL = 0.02  # the ACKs a crash (SIGKILL) can lose: at most this window
ACK_FLUSH_BATCH = 500
ACK_RETRY_DELAY = 1.0
FINAL_FLUSH_TIMEOUT = 5.0
MAX_REPORTS_PER_NODE = 10_000
SHARED_RETRY = 1.0  # after a failed reload of what another process wrote
WATCH_DEBOUNCE = 0.02  # at most, after the first change notification, before the scan
WATCH_SETTLE = 0.002  # once the writes notified are complete: a burst of them is one scan
WATCHED_POLL_FACTOR = 20  # fallback poll with inotify: poll_interval times this ...
WATCHED_POLL_MIN = 5.0  # ... but at least this (seconds)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
Files = dict[str, tuple[Manifest, ...]]


@attrs.frozen(slots=True)
class _Change:
    """The store after a reconciliation, before it is committed."""

    objects: dict[ObjectKey, StoredObject]
    upserts: list[StoredObject]
    changed: set[str]  # uids whose content changed
    removed: dict[str, StoredObject]  # uid -> final version of a removed object
    dirty: set[ObjectKey]  # keys whose object changed in any way (upserted or removed)
    rv: int


@attrs.frozen(slots=True)
class _Scan:
    files: Files
    stamps: dict[str, FileStamp]
    touched: set[str]  # files whose manifests were replaced (read again) or removed


class LocalStore:
    """`CloudStore` over SQLite and a folder of manifests (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        manifests_dir: Path,
        *,
        poll_interval: float = 1.0,
        watch: bool = True,
        shared: str = "",
    ) -> None:
        self.data_dir = Path(data_dir)
        # One of several processes on this data directory (`serve --workers N`): "leader"
        # follows the manifests folder and writes objects, a "follower" reloads what the
        # leader wrote when told (`shared_changed`, the supervisor passes the leader's notice).
        self.shared = shared
        self.on_shared_write: Callable[[], None] = lambda: None
        self._shared_wakeup = trio.Event()
        self.manifests_dir = Path(manifests_dir)
        self.poll_interval = poll_interval
        self.watch = watch  # use inotify when available (see the module docstring)
        self._db = Database(self.data_dir / DB_NAME)
        self._db_lock = trio.Lock()  # one worker thread on the connection at a time
        self._open = False
        self._objects: dict[ObjectKey, StoredObject] = {}
        self._rv = 0
        self._acks: dict[str, dict[str, AckPoint]] = {}  # node -> uid -> ack point
        self._joined: dict[str, int] = {}  # nodes issued a certificate -> when (ms)
        self._records: dict[str, NodeRecord] = {}  # sessions as the hub reported them
        self._pending_records: dict[str, NodeRecord] = {}
        self._node_reports: dict[str, str] = {}  # node -> Ready summary of its last report
        self._ack_changes: dict[str, int] = {}  # node -> ack point changes (change_stamp)
        self._pending_acks: dict[AckKey, AckPoint | None] = {}
        self._writing_acks: Mapping[AckKey, AckPoint | None] = {}  # the batch being written
        self._marker_waiters = WriteWaiters()
        self._flush_lock = trio.Lock()
        self._ack_wakeup = trio.Event()
        self._ack_batch_full = trio.Event()
        self._files: Files = {}  # last good manifests of every file
        self._stamps: dict[str, FileStamp] = {}  # files as last read
        self._reported_conflicts: set[str] = set()
        self._folder_failing = False
        self._write_failing = False
        self._placer = Placer()  # describes self._objects
        self._retry_soon = False  # the last sync left something for the next poll
        self._sending = False  # a sync is handing its messages to the hub
        self._sends_done = 0  # syncs that finished handing over (in change_stamp)
        self.change_lag = ChangeLag()  # a changed file found by a scan -> in the hub's queues
        self._fs_type = ""  # of the manifests folder, read when it is (re)watched
        # Why inotify may miss a change ("": it sees them all, so no fallback poll).
        self.fallback_poll_reason = ""

    # --- lifetime ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directories, open the database and load it into memory. Idempotent."""
        if self._open:
            return
        await trio.to_thread.run_sync(self._make_dirs)
        loaded = await self._db_call(self._db.open)
        self._objects, self._rv = loaded.objects, loaded.rv
        self._joined = dict(loaded.joined_ms)
        self._records = dict(loaded.records)
        self._node_reports = dict(loaded.node_reports)
        self._acks = {}
        for (node, uid), point in loaded.acks.items():
            self._acks.setdefault(node, {})[uid] = point
        self._files = self._files_from_db()
        self._placer = Placer.of(self._objects)
        self._open = True

    async def aclose(self) -> None:
        """Write pending ack points and close the database."""
        if not self._open:
            return
        self._open = False
        with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
            await self._flush_acks()
        with trio.CancelScope(shield=True):
            await self._db_call(self._db.close)

    def _make_dirs(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.manifests_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store directories: {exc}") from exc

    async def _db_call(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._db_lock:
            return await trio.to_thread.run_sync(fn, *args)

    # --- run --------------------------------------------------------------------------------

    async def run(
        self,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Initial sync, `started()`, then follow the folder forever (see the module docstring)."""
        opened_here = not self._open
        await self.open()
        try:
            # Watching before the first scan: a change during the initial sync is not missed.
            with folder_watch(
                self.manifests_dir, enabled=self._watches_folder, relevant=changes_manifests
            ) as watch:
                self._fs_type = await trio.to_thread.run_sync(filesystem_type, self.manifests_dir)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._flush_acks_forever)
                    if self.shared:
                        nursery.start_soon(self._follow_forever, deliver)
                    if self.shared == "follower":
                        task_status.started()  # the leader synced the folder before
                        await trio.sleep_forever()
                    await self._sync(deliver, initial=True)
                    task_status.started()
                    while True:
                        await self._wait_for_change(watch)
                        await self._sync(deliver, initial=False)
        finally:
            if opened_here:
                await self.aclose()
            else:
                with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                    await self._flush_acks()

    @property
    def _watches_folder(self) -> bool:
        return self.watch and self.shared != "follower"

    @property
    def watched_poll_interval(self) -> float:
        """Seconds between fallback polls while inotify watches the folder."""
        return max(WATCHED_POLL_MIN, self.poll_interval * WATCHED_POLL_FACTOR)

    async def _wait_for_change(self, watch: FolderWatch | None) -> None:
        """Until the folder may have changed: a (debounced) notification, or a poll."""
        if watch is not None and not watch.watching and watch.rearm():
            self._fs_type = await trio.to_thread.run_sync(filesystem_type, self.manifests_dir)
            watch.drain()
            return  # watched again: scan for what happened meanwhile
        if watch is None or not watch.watching or self._retry_soon:
            await trio.sleep(self.poll_interval)
        elif self.fallback_poll_reason:
            with trio.move_on_after(self.watched_poll_interval):
                await watch.wait()
                await _settle(watch)
        else:
            await watch.wait()
            await _settle(watch)
        if watch is not None:
            watch.drain()  # the scan that follows sees everything notified so far

    async def _sync(self, deliver: Deliver, *, initial: bool) -> None:
        """Read changed files, reconcile, persist, send; a failure leaves all for next time."""
        self._retry_soon = False
        scan = await self._scan()
        if scan is None and not initial:
            return
        if scan is not None and not scan.touched and not initial:
            self._stamps = scan.stamps  # nothing usable changed (broken or unstable files)
            return
        if scan is None:
            scan = _Scan(self._files, self._stamps, set())
        if not initial:
            self.change_lag.seen()
        files, stamps = scan.files, scan.stamps
        desired = self._merge(files)
        if initial:  # everything: also drops objects whose stored manifest did not load
            candidates: Collection[ObjectKey] = desired.keys() | self._objects.keys()
        else:
            candidates = self._candidates(files, scan.touched)
        change = self._reconcile(desired, candidates)
        if change.upserts or change.removed:
            try:
                await self._db_call(
                    self._db.write_objects,
                    change.upserts,
                    [obj.key for obj in change.removed.values()],
                    change.rv,
                )
            except StoreError as exc:
                if initial:  # nothing was sent yet: the hub must not start without it
                    raise
                # Once per failure streak, not at every poll.
                log.log(
                    logging.DEBUG if self._write_failing else logging.WARNING,
                    "%s; retrying at every poll",
                    exc,
                )
                self._write_failing = True
                self._retry_soon = True
                return
            if self._write_failing:
                log.info("store database: writing objects works again")
                self._write_failing = False
            self.on_shared_write()
        deliveries = self._plan(change, initial=initial)
        self._objects, self._rv = change.objects, change.rv
        self._files, self._stamps = files, stamps
        self.change_lag.sending()
        await self._send(deliver, deliveries)
        self.change_lag.handed_over()

    # --- several processes on one data directory -------------------------------------------

    def shared_changed(self) -> None:
        """Another process wrote objects or joined nodes: reload them soon."""
        self._shared_wakeup.set()

    async def _follow_forever(self, deliver: Deliver) -> None:
        """Reload when told (nothing to do costs nothing); after a failure, every
        SHARED_RETRY seconds until a reload works."""
        failed = False
        while True:
            with trio.move_on_after(SHARED_RETRY if failed else math.inf):
                await self._shared_wakeup.wait()
            self._shared_wakeup = trio.Event()
            try:
                await self._reload_shared(deliver)
            except StoreError as exc:
                log.warning("%s; retrying in %g s", exc, SHARED_RETRY)
                failed = True
            else:
                failed = False

    async def _reload_shared(self, deliver: Deliver) -> None:
        joined = await self._db_call(self._db.read_joined)
        self._joined.update(joined)
        if self.shared != "follower":
            return
        counter, newer, keys = await self._db_call(self._db.read_objects_after, self._rv)
        change = self._change_from(counter, newer, keys)
        if change is None:
            return
        self.change_lag.seen()
        deliveries = self._plan(change, initial=False)
        self._objects, self._rv = change.objects, change.rv
        self.change_lag.sending()
        await self._send(deliver, deliveries)
        self.change_lag.handed_over()

    def _change_from(
        self, counter: int, newer: dict[ObjectKey, StoredObject], keys: set[ObjectKey]
    ) -> _Change | None:
        """The leader's committed change, seen from here; None when nothing changed."""
        gone = sorted((key for key in self._objects if key not in keys), key=_order)
        if not newer and not gone:
            self._rv = max(self._rv, counter)
            return None
        objects = {key: obj for key, obj in self._objects.items() if key in keys}
        changed = {
            obj.uid
            for key, obj in newer.items()
            if key in self._objects and self._objects[key].manifest != obj.manifest
        }
        removed = {self._objects[key].uid: _final(self._objects[key], counter) for key in gone}
        objects.update(newer)
        rv = max([counter, self._rv, *(obj.rv for obj in newer.values())])
        return _Change(
            objects=objects,
            upserts=list(newer.values()),
            changed=changed,
            removed=removed,
            dirty=set(newer) | set(gone),
            rv=rv,
        )

    async def reload_node(self, node_id: str) -> None:
        """This process serves `node_id` now: its ack points as the last process wrote them."""
        await self._flush_acks()
        points = await self._db_call(self._db.read_node_acks, node_id)
        if points:
            self._acks[node_id] = points
        else:
            self._acks.pop(node_id, None)
        self._ack_changes[node_id] = self._ack_changes.get(node_id, 0) + 1

    async def flush(self) -> None:
        """Write every pending ack point and node record now (before another process serves
        one of this process's nodes)."""
        await self._flush_acks()

    # --- the folder -------------------------------------------------------------------------

    async def _scan(self) -> _Scan | None:
        """Files and stamps after reading what changed; None when nothing did."""
        try:
            stamps, blind = await trio.to_thread.run_sync(
                _list_folder, self.manifests_dir, self._fs_type
            )
        except OSError as exc:
            if not self._folder_failing:  # report once, keep everything as it is
                log.warning("cannot list manifests folder %s: %s", self.manifests_dir, exc)
            self._folder_failing = True
            self._retry_soon = True
            return None
        self._folder_failing = False
        self._note_blind_spot(blind)
        changed = {name: st for name, st in stamps.items() if self._stamps.get(name) != st}
        removed = (set(self._stamps) | set(self._files)) - set(stamps)
        if not changed and not removed:
            return None
        results = await trio.to_thread.run_sync(_read_files, self.manifests_dir, changed)
        files = {name: m for name, m in self._files.items() if name not in removed}
        new_stamps = {name: st for name, st in self._stamps.items() if name not in removed}
        touched = set(removed)
        for result in results:
            if self._take_result(result, files, new_stamps):
                touched.add(result.name)
        return _Scan(files, new_stamps, touched)

    def _note_blind_spot(self, reason: str) -> None:
        if reason == self.fallback_poll_reason:
            return
        self.fallback_poll_reason = reason
        if reason:
            log.info(
                "manifests folder: %s, which inotify cannot see: also polling every %g s",
                reason,
                self.watched_poll_interval,
            )
        else:
            log.info("manifests folder: inotify sees every change again: no polling")

    def _take_result(self, result: FileResult, files: Files, stamps: dict[str, FileStamp]) -> bool:
        """Take one file read; True when its manifests replace the previous ones."""
        name = result.name
        if result.unstable:  # being written: keep the old state, read again next poll
            stamps.pop(name, None)
            self._retry_soon = True
            return False
        stamps[name] = result.stamp
        if result.error:
            log.warning(
                "manifest %s skipped: %s (its last good objects are kept)", name, result.error
            )
            return False
        for warning in result.warnings:
            log.warning("manifest %s: %s", name, warning)
        files[name] = result.manifests
        return True

    def _merge(self, files: Files) -> dict[ObjectKey, tuple[str, Manifest]]:
        desired, conflicts = merge_files(files)
        for conflict in set(conflicts) - self._reported_conflicts:
            log.warning("manifests: %s", conflict)
        self._reported_conflicts = set(conflicts)
        return desired

    def _files_from_db(self) -> Files:
        """Manifests by file as last stored: what a broken file keeps after a restart."""
        files: dict[str, list[Manifest]] = {}
        for obj in self._objects.values():
            try:
                files.setdefault(obj.source, []).append(manifest_from_text(obj.key, obj.manifest))
            except ManifestError as exc:
                log.warning("store database: %s", exc)
        return {name: tuple(manifests) for name, manifests in files.items()}

    # --- reconciliation and routing ---------------------------------------------------------

    def _candidates(self, files: Files, touched: Iterable[str]) -> set[ObjectKey]:
        """Keys whose object may differ once `touched` files were read again or removed.

        The objects always are the merge of `self._files`, so only keys those files define
        (before or now) can change, including a key another file defines too (conflicts).
        """
        keys: set[ObjectKey] = set()
        for name in touched:
            keys.update(manifest.key for manifest in self._files.get(name, ()))
            keys.update(manifest.key for manifest in files.get(name, ()))
        return keys

    def _reconcile(
        self, desired: Mapping[ObjectKey, tuple[str, Manifest]], candidates: Collection[ObjectKey]
    ) -> _Change:
        """New versions (and resourceVersions, in key order) of the `candidates` keys."""
        rv = self._rv
        objects = dict(self._objects)
        upserts: list[StoredObject] = []
        changed: set[str] = set()
        dirty: set[ObjectKey] = set()
        for key in sorted((key for key in candidates if key in desired), key=_order):
            source, manifest = desired[key]
            old = self._objects.get(key)
            if old is not None and old.manifest == manifest.text:
                obj = old if old.source == source else attrs.evolve(old, source=source)
            else:
                rv += 1
                obj = _materialise(manifest, source, rv, old)
                if old is not None:
                    changed.add(obj.uid)
            if obj is not old:
                upserts.append(obj)
                dirty.add(key)
                objects[key] = obj
        removed: dict[str, StoredObject] = {}
        gone = (key for key in candidates if key not in desired and key in self._objects)
        for key in sorted(gone, key=_order):
            rv += 1
            removed[self._objects[key].uid] = _final(self._objects[key], rv)
            del objects[key]
            dirty.add(key)
        return _Change(
            objects=objects,
            upserts=upserts,
            changed=changed,
            removed=removed,
            dirty=dirty,
            rv=rv,
        )

    def _plan(self, change: _Change, *, initial: bool) -> list[Delivery]:
        """The deliveries of a committed change; advances the placement index with it."""
        step = self._placer.advance(self._objects, change.objects, change.dirty, full=initial)
        by_uid: dict[str, StoredObject] = {}
        for objects in (self._objects, change.objects):
            for key in step.keys:
                obj = objects.get(key)
                if obj is not None:
                    by_uid[obj.uid] = obj
        by_uid.update(change.removed)
        old = step.old | self._acked_but_gone(change, by_uid) if initial else step.old
        return plan(old, step.new, by_uid, change.changed, full=initial)

    def _acked_but_gone(self, change: _Change, by_uid: dict[str, StoredObject]) -> Placement:
        """Ack points of objects that no longer exist: deletes an earlier run may have lost."""
        live = {obj.uid for obj in change.objects.values()}
        extra: Placement = set()
        for node, uid, point in self._ack_points():
            if uid in live:
                continue
            if uid not in by_uid:
                stub = stub_object(uid, point)
                if stub is None:
                    continue
                by_uid[uid] = stub
            extra.add((node, uid))
        return extra

    async def _send(self, deliver: Deliver, deliveries: Iterable[Delivery]) -> None:
        self._sending = True
        try:
            await hand_over(deliveries, deliver, self._forget_node)
        finally:
            self._sending = False
            self._sends_done += 1
        await trio.lowlevel.checkpoint()

    # --- ack points -------------------------------------------------------------------------

    def acked_version(self, node_id: str, uid: str) -> str | None:
        point = self._acks.get(node_id, {}).get(uid)
        return point.rv if point is not None else None

    def _ack_points(self) -> Iterator[tuple[str, str, AckPoint]]:
        for node, points in self._acks.items():
            for uid, point in points.items():
                yield node, uid, point

    def record_sent(self, node_id: str, message: Message) -> None:
        uid = object_uid(message.content)
        if not uid or message.route.operation == OP_DELETE:
            return
        points = self._acks.setdefault(node_id, {})
        if uid not in points:
            point = AckPoint(rv=SENT_RV, resource=message.route.resource)
            points[uid] = point
            self._queue_ack((node_id, uid), point)

    def unwritten_marker(self, node_id: str, uid: str) -> trio.Event | None:
        point = self._acks.get(node_id, {}).get(uid)
        return self._marker_waiters.marker(
            (node_id, uid), None if point is None else point.rv, self._ack_unwritten
        )

    def _ack_unwritten(self, key: AckKey) -> bool:
        return key in self._pending_acks or key in self._writing_acks

    def record_ack(self, node_id: str, message: Message) -> None:
        uid = object_uid(message.content)
        if not uid:
            return
        points = self._acks.setdefault(node_id, {})
        if message.route.operation == OP_DELETE:
            if points.pop(uid, None) is not None:
                self._queue_ack((node_id, uid), None)
            if not points:
                del self._acks[node_id]
            return
        rv = message.header.resource_version
        point = AckPoint(rv=rv, resource=message.route.resource)
        if rv and points.get(uid) != point:
            points[uid] = point
            self._queue_ack((node_id, uid), point)

    def _forget_node(self, node: str) -> None:
        """A removed node loses its ack points (as KubeEdge garbage-collects ObjectSyncs)."""
        for uid in self._acks.pop(node, {}):
            self._queue_ack((node, uid), None)

    # --- reconciliation ---------------------------------------------------------------------

    def missed(self, node_id: str) -> list[Missed]:
        """What takes `node_id` from its ack points to the desired state (see CloudStore)."""
        if self._sending or not self._open:
            return []  # a change is half delivered: its own messages are on their way
        keys = self._placer.keys_on(node_id)
        return missed_on_node(node_id, keys, self._objects, self._acks.get(node_id, {}))

    def change_stamp(self, node_id: str) -> tuple[int, ...]:
        return self._rv, self._sends_done, self._ack_changes.get(node_id, 0)

    def _queue_ack(self, key: AckKey, point: AckPoint | None) -> None:
        node = key[0]
        self._ack_changes[node] = self._ack_changes.get(node, 0) + 1
        self._pending_acks[key] = point
        self._ack_wakeup.set()
        if len(self._pending_acks) >= ACK_FLUSH_BATCH:
            self._ack_batch_full.set()

    async def _flush_acks_forever(self) -> None:
        while True:
            await self._ack_wakeup.wait()
            with trio.move_on_after(ACK_FLUSH_INTERVAL):
                await self._ack_batch_full.wait()
            if not await self._flush_acks():
                await trio.sleep(ACK_RETRY_DELAY)

    async def _flush_acks(self) -> bool:
        """Write the pending ack points in one transaction, then the pending node records
        in another; False (logged, kept for the next flush) when either failed. One flush at
        a time (`reload_node` and `flush` flush beside the background flusher): batches are
        written in order and `_writing_acks` is the one being written."""
        async with self._flush_lock:
            return await self._flush_acks_now()

    async def _flush_acks_now(self) -> bool:
        batch, self._pending_acks = self._pending_acks, {}
        records, self._pending_records = self._pending_records, {}
        # Set the events being replaced: a flush of `reload_node`/`flush` may run while the
        # background flusher waits on them, which then finds its batch gone and waits anew.
        self._ack_wakeup.set()
        self._ack_batch_full.set()
        self._ack_wakeup, self._ack_batch_full = trio.Event(), trio.Event()
        self._writing_acks = batch
        try:
            acks_written = await self._write_pending(
                "ack points", self._db.write_acks, batch, self._pending_acks
            )
        finally:
            self._writing_acks = {}
        if acks_written:
            self._marker_waiters.written(batch)
        records_written = await self._write_pending(
            "node records", self._db.write_node_records, records, self._pending_records
        )
        return acks_written and records_written

    async def _write_pending(
        self,
        what: str,
        write: Callable[[Mapping[K, V]], None],
        batch: dict[K, V],
        pending: dict[K, V],
    ) -> bool:
        """`write(batch)` in a worker thread; on failure the batch goes back into `pending`
        (entries queued meanwhile are newer and win)."""
        if not batch:
            return True
        try:
            await self._db_call(write, batch)
        except BaseException as exc:
            for key, value in batch.items():
                pending.setdefault(key, value)
            self._ack_wakeup.set()
            if isinstance(exc, StoreError):
                log.warning("%s; %d %s will be retried", exc, len(batch), what)
                return False
            raise
        return True

    # --- upstream ---------------------------------------------------------------------------

    def pod_node(self, namespace: str, name: str) -> str | None:
        obj = self._objects.get(ObjectKey("Pod", namespace, name))
        return (pod_node(obj.body) or None) if obj is not None else None

    def api_server_ca(self) -> str:
        return ""  # no API server behind the embedded store

    def node_known(self, name: str) -> bool:
        """A node exists when it joined (was issued a certificate), has a Node manifest,
        pods bound to it, or ack points (it was sent something)."""
        if not self._open:
            raise StoreError("the store is not open")
        return (
            name in self._joined
            or name in self._records
            or ObjectKey("Node", "", name) in self._objects
            or self._placer.has_pods(name)
            or name in self._acks
        )

    async def node_joined(self, name: str) -> None:
        if name not in self._joined:
            joined = now_ms()
            await self._db_call(self._db.write_joined, name, joined)
            self._joined[name] = joined
            self.on_shared_write()

    # --- node records (get nodes) -----------------------------------------------------------

    def record_connection(self, node_id: str, event: SessionEvent) -> None:
        """Remember a session start or end; written with the next batch of ack points."""
        record = self._records.get(node_id) or NodeRecord(node_id)
        self._records[node_id] = self._pending_records[node_id] = record.after(event)
        self._ack_wakeup.set()

    def known_nodes(self) -> dict[str, NodeRecord]:
        """Nodes that joined, connected, reported, have a Node manifest, pods or ack points."""
        names = set(self._joined) | set(self._records) | set(self._acks) | set(self._node_reports)
        names.update(key.name for key in self._objects if key.kind == "Node")
        names.update(self._placer.nodes_with_pods())
        return {name: self._known_node(name) for name in sorted(names)}

    def _known_node(self, name: str) -> NodeRecord:
        return attrs.evolve(
            self._records.get(name) or NodeRecord(name),
            joined_ms=self._joined.get(name, 0),
            desired=ObjectKey("Node", "", name) in self._objects,
            reported=self._node_reports.get(name, ""),
        )

    async def apply_report(self, node_id: str, message: Message) -> Message | None:
        if not is_report(message):
            log.debug("node %s: nothing to do for %s", node_id, message.route)
            return None
        now = now_ms()
        try:
            rows = report_rows(node_id, message, now)
        except RequestError as exc:
            log.warning("node %s: ignoring report %s: %s", node_id, message.route.resource, exc)
            return None
        if rows:
            try:
                await self._db_call(self._db.write_reports, rows, MAX_REPORTS_PER_NODE)
            except StoreError as exc:
                log.warning(
                    "node %s: report %s not stored: %s", node_id, message.route.resource, exc
                )
                return None
            self._note_node_reports(rows)
        return report_reply(node_id, message, now)

    async def answer_query(self, node_id: str, message: Message) -> Message | None:
        now = now_ms()
        if is_application(message):
            try:
                return answer_application(node_id, message, self._objects, self._rv, now)
            except RequestError as exc:
                log.warning("node %s: unanswerable metaserver request: %s", node_id, exc)
                return None
        if is_metamanager_query(message):
            return answer_metamanager_query(node_id, message, self._objects, now)
        return None

    def _note_node_reports(self, rows: Iterable[ReportRow]) -> None:
        for row in rows:
            if row.kind == KIND_NODE_STATUS:
                self._node_reports[row.node] = node_summary(json.loads(row.body))


@asynccontextmanager
async def open_local_store(
    data_dir: Path, manifests_dir: Path, *, poll_interval: float = 1.0, watch: bool = True
) -> AsyncIterator[LocalStore]:
    """An open LocalStore, closed (pending ack points written) on exit."""
    store = LocalStore(data_dir, manifests_dir, poll_interval=poll_interval, watch=watch)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


# --- helpers --------------------------------------------------------------------------------


async def _settle(watch: FolderWatch) -> None:
    """Until the writes notified are complete, then quiet for WATCH_SETTLE; WATCH_DEBOUNCE at
    most. A file closed or renamed into place is read at once, one still open waited for."""
    watch.begin_settling()
    with trio.move_on_after(WATCH_DEBOUNCE):
        while True:
            watch.drain()
            with trio.move_on_after(WATCH_SETTLE if watch.settled else math.inf) as quiet:
                await watch.wait()
            if quiet.cancelled_caught:
                return


def _order(key: ObjectKey) -> tuple[str, str, str]:
    """ObjectKey's own order, as a cheaper sort key."""
    return key.kind, key.namespace, key.name


def _list_folder(folder: Path, fs_type: str) -> tuple[dict[str, FileStamp], str]:
    """The folder's stamps, and why inotify may miss a change there (`watch.blind_spot`)."""
    stamps = stamp_folder(folder)
    return stamps, blind_spot(folder, stamps, fs_type)


def _read_files(folder: Path, stamps: Mapping[str, FileStamp]) -> list[FileResult]:
    return [read_manifest_file(folder, name, stamps[name]) for name in sorted(stamps)]


def _materialise(
    manifest: Manifest, source: str, rv: int, old: StoredObject | None
) -> StoredObject:
    """The full object: uid kept from `old` (new uuid4 otherwise), new resourceVersion."""
    uid = old.uid if old is not None else str(uuid.uuid4())
    created = _creation_timestamp(old)
    metadata = dict(manifest.doc["metadata"])
    filled = {"name": metadata.pop("name")}
    if "namespace" in metadata:
        filled["namespace"] = metadata.pop("namespace")
    filled.update(uid=uid, resourceVersion=str(rv), creationTimestamp=created)
    body = dict(manifest.doc)
    body["metadata"] = filled | metadata
    return StoredObject(
        key=manifest.key, uid=uid, rv=rv, body=body, manifest=manifest.text, source=source
    )


def _creation_timestamp(old: StoredObject | None) -> str:
    if old is not None:
        created = old.body.get("metadata", {}).get("creationTimestamp")
        if isinstance(created, str):
            return created
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _final(obj: StoredObject, rv: int) -> StoredObject:
    """The last version of a removed object, as a delete carries it."""
    metadata = dict(obj.body.get("metadata", {}))
    metadata["resourceVersion"] = str(rv)
    return attrs.evolve(obj, rv=rv, body=obj.body | {"metadata": metadata})
