"""The SQLite file of the local store (`<data_dir>/store.db`): blocking calls only.

Every method here blocks; the local store runs them in a worker thread, one at a time, on one
connection (WAL mode, so the CLI can read while the hub writes). sqlite3 errors are
translated into `StoreError` at this skin. Tables:
- `meta`: the global resourceVersion counter;
- `objects`: one row per object (kind, namespace, name, uid, resourceVersion, full JSON body,
  the user's manifest as canonical JSON, the file it came from);
- `ack_points`: ObjectSync semantics, (node, uid) -> acknowledged resourceVersion;
- `reports`: the latest node and pod status each edge reported;
- `joined_nodes`: nodes issued a certificate by the HTTPS service (`GET /node/{name}`);
- `node_records`: each node's sessions as the hub reported them (first and latest
  connection, its end, transport, remote), for `get nodes`.
"""

from __future__ import annotations

import datetime
import json
import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from trio_cloudhub.store.base import NodeRecord, StoreError
from trio_cloudhub.store.manifests import ObjectKey
from trio_cloudhub.store.reconcile import AckKey, AckPoint
from trio_cloudhub.store.routing import StoredObject, ready_summary

log = logging.getLogger("trio_cloudhub.store")

DB_NAME = "store.db"
SCHEMA_VERSION = 3  # 2: joined_nodes, 3: node_records
BUSY_TIMEOUT_MS = 5000  # how long a write waits for another connection's lock (tests lower it)
KIND_NODE_STATUS = "nodestatus"
KIND_POD_STATUS = "podstatus"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    uid TEXT NOT NULL UNIQUE, resource_version INTEGER NOT NULL,
    body TEXT NOT NULL, manifest TEXT NOT NULL, source TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS ack_points (
    node TEXT NOT NULL, uid TEXT NOT NULL, resource_version TEXT NOT NULL,
    resource TEXT NOT NULL, PRIMARY KEY (node, uid));
CREATE TABLE IF NOT EXISTS reports (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, node TEXT NOT NULL,
    body TEXT NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY (kind, namespace, name));
CREATE INDEX IF NOT EXISTS reports_by_node ON reports (node, updated_ms);
CREATE TABLE IF NOT EXISTS joined_nodes (name TEXT PRIMARY KEY, joined_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS node_records (
    name TEXT PRIMARY KEY, first_connected_ms INTEGER NOT NULL, connected_ms INTEGER NOT NULL,
    disconnected_ms INTEGER NOT NULL, transport TEXT NOT NULL, remote TEXT NOT NULL,
    project TEXT NOT NULL, reason TEXT NOT NULL, last_keepalive_ms INTEGER NOT NULL,
    last_ack_ms INTEGER NOT NULL, session_open INTEGER NOT NULL);
"""


@attrs.frozen(slots=True)
class Loaded:
    objects: dict[ObjectKey, StoredObject]
    acks: dict[AckKey, AckPoint]
    rv: int
    joined: set[str] = attrs.field(factory=set)
    joined_ms: dict[str, int] = attrs.field(factory=dict)
    records: dict[str, NodeRecord] = attrs.field(factory=dict)  # sessions, as last written
    node_reports: dict[str, str] = attrs.field(factory=dict)  # node -> its Ready summary


@attrs.frozen(slots=True)
class ReportRow:
    kind: str  # nodestatus or podstatus
    namespace: str
    name: str
    node: str
    body: str  # JSON text, size-bounded by the caller
    updated_ms: int


@attrs.frozen(slots=True)
class Report:
    """What an edge last reported, for `trio-cloudhub get nodes|pods`."""

    kind: str  # nodestatus or podstatus
    node: str  # the reporting edge node
    namespace: str
    name: str
    updated: datetime.datetime  # UTC
    summary: str  # e.g. "Ready", "NotReady", "Running", "Pending"
    body: Any


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"store database: {action} failed: {exc}") from exc


class Database:
    """One connection to `store.db`; not thread-safe, the caller serialises the calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def open(self) -> Loaded:
        with _translated("open"):
            # check_same_thread off: trio's worker threads take turns, never at once.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
                conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit survives power loss too (an object row lost with its ack
                # point could leave an edge holding an orphan under a forgotten uid).
                conn.execute("PRAGMA synchronous = FULL")
                self._migrate(conn)
                loaded = self._load(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            return loaded

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with _translated("close"):
                conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema {version}, newer than {SCHEMA_VERSION}")
        with _transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _load(self, conn: sqlite3.Connection) -> Loaded:
        row = conn.execute("SELECT value FROM meta WHERE key = 'resource_version'").fetchone()
        rv = int(row[0]) if row else 0
        objects: dict[ObjectKey, StoredObject] = {}
        query = "SELECT kind, namespace, name, uid, resource_version, body, manifest, source"
        for record in conn.execute(query + " FROM objects"):
            obj = _object_from_row(record)
            if obj is not None:
                objects[obj.key] = obj
                rv = max(rv, obj.rv)
        acks = {
            (node, uid): AckPoint(str(ack_rv), resource)
            for node, uid, ack_rv, resource in conn.execute(
                "SELECT node, uid, resource_version, resource FROM ack_points"
            )
        }
        joined_ms = dict(conn.execute("SELECT name, joined_ms FROM joined_nodes"))
        records = {
            row[0]: _record(row)
            for row in conn.execute(f"SELECT {_RECORD_COLUMNS} FROM node_records")
        }
        return Loaded(
            objects=objects,
            acks=acks,
            rv=rv,
            joined=set(joined_ms),
            joined_ms=joined_ms,
            records=records,
            node_reports=_node_report_summaries(conn),
        )

    def read_joined(self) -> dict[str, int]:
        conn = self._connection()
        with _translated("reading joined nodes"):
            return dict(conn.execute("SELECT name, joined_ms FROM joined_nodes"))

    def read_node_acks(self, node: str) -> dict[str, AckPoint]:
        """The ack points of `node` as written (by any process of the data directory)."""
        conn = self._connection()
        query = "SELECT uid, resource_version, resource FROM ack_points WHERE node = ?"
        with _translated("reading ack points"):
            return {uid: AckPoint(str(rv), res) for uid, rv, res in conn.execute(query, (node,))}

    def read_objects_after(
        self, rv: int
    ) -> tuple[int, dict[ObjectKey, StoredObject], set[ObjectKey]]:
        """What another process committed: the counter, objects newer than `rv`, every key."""
        conn = self._connection()
        with _translated("reading objects"), _snapshot(conn):
            row = conn.execute("SELECT value FROM meta WHERE key = 'resource_version'").fetchone()
            counter = int(row[0]) if row else 0
            query = "SELECT kind, namespace, name, uid, resource_version, body, manifest, source"
            newer: dict[ObjectKey, StoredObject] = {}
            for record in conn.execute(query + " FROM objects WHERE resource_version > ?", (rv,)):
                obj = _object_from_row(record)
                if obj is not None:
                    newer[obj.key] = obj
            keys = {
                ObjectKey(kind, namespace, name)
                for kind, namespace, name in conn.execute(
                    "SELECT kind, namespace, name FROM objects"
                )
            }
        return counter, newer, keys

    def write_objects(
        self, upserts: Sequence[StoredObject], deletes: Sequence[ObjectKey], rv: int
    ) -> None:
        """One transaction: the changed objects and the resourceVersion counter."""
        conn = self._connection()
        with _translated("writing objects"), _transaction(conn):
            conn.executemany(
                "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
                [(key.kind, key.namespace, key.name) for key in deletes],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [_object_row(obj) for obj in upserts],
            )
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('resource_version', ?)", (str(rv),))

    def write_acks(self, batch: Mapping[AckKey, AckPoint | None]) -> None:
        """One transaction: None removes the ack point."""
        conn = self._connection()
        removed = [key for key, point in batch.items() if point is None]
        kept = [(*key, p.rv, p.resource) for key, p in batch.items() if p is not None]
        with _translated("writing ack points"), _transaction(conn):
            conn.executemany("DELETE FROM ack_points WHERE node = ? AND uid = ?", removed)
            conn.executemany("INSERT OR REPLACE INTO ack_points VALUES (?, ?, ?, ?)", kept)

    def write_joined(self, name: str, joined_ms: int) -> None:
        """Remember that node `name` was issued a certificate (the first time is kept)."""
        conn = self._connection()
        with _translated("writing a joined node"), _transaction(conn):
            conn.execute("INSERT OR IGNORE INTO joined_nodes VALUES (?, ?)", (name, joined_ms))

    def write_node_records(self, records: Mapping[str, NodeRecord]) -> None:
        """One transaction: the nodes' session records (the connection fields only)."""
        conn = self._connection()
        marks = ", ".join("?" * len(_RECORD_FIELDS))
        rows = [
            tuple(getattr(record, field) for field in _RECORD_FIELDS) for record in records.values()
        ]
        with _translated("writing node records"), _transaction(conn):
            conn.executemany(
                f"INSERT OR REPLACE INTO node_records ({_RECORD_COLUMNS}) VALUES ({marks})", rows
            )

    def write_reports(self, rows: Sequence[ReportRow], max_per_node: int) -> None:
        """Store reports; a node keeps at most `max_per_node` rows (oldest dropped)."""
        conn = self._connection()
        with _translated("writing reports"), _transaction(conn):
            conn.executemany(
                "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?, ?, ?)",
                [(r.kind, r.namespace, r.name, r.node, r.body, r.updated_ms) for r in rows],
            )
            for node in {row.node for row in rows}:
                conn.execute(
                    "DELETE FROM reports WHERE rowid IN (SELECT rowid FROM reports"
                    " WHERE node = ? ORDER BY updated_ms DESC LIMIT -1 OFFSET ?)",
                    (node, max_per_node),
                )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store database is not open")
        return self._conn


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: one consistent view, no write lock."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # some errors already rolled back
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_RECORD_FIELDS = (
    "name",
    "first_connected_ms",
    "connected_ms",
    "disconnected_ms",
    "transport",
    "remote",
    "project",
    "reason",
    "last_keepalive_ms",
    "last_ack_ms",
    "session_open",
)
_RECORD_COLUMNS = ", ".join(_RECORD_FIELDS)


def _record(row: tuple[Any, ...]) -> NodeRecord:
    fields = dict(zip(_RECORD_FIELDS, row, strict=True))
    return NodeRecord(**fields | {"session_open": bool(fields["session_open"])})


def _node_report_summaries(conn: sqlite3.Connection) -> dict[str, str]:
    """node -> Ready / NotReady / Unknown from its latest node status report."""
    query = "SELECT node, body FROM reports WHERE kind = ? ORDER BY updated_ms"
    summaries: dict[str, str] = {}
    for node, body in conn.execute(query, (KIND_NODE_STATUS,)):
        try:
            summaries[node] = node_summary(json.loads(body))
        except ValueError:
            summaries[node] = "Unknown"
    return summaries


def _object_row(obj: StoredObject) -> tuple[str, str, str, str, int, str, str, str]:
    key = obj.key
    body = json.dumps(obj.body, separators=(",", ":"), ensure_ascii=False)
    return (key.kind, key.namespace, key.name, obj.uid, obj.rv, body, obj.manifest, obj.source)


def _object_from_row(record: tuple[Any, ...]) -> StoredObject | None:
    kind, namespace, name, uid, rv, body, manifest, source = record
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        log.warning(
            "store database: skipping %s %s/%s: body is not a JSON object", kind, namespace, name
        )
        return None
    key = ObjectKey(kind, namespace, name)
    return StoredObject(
        key=key, uid=uid, rv=int(rv), body=decoded, manifest=manifest, source=source
    )


# --- read-only access for the CLI -----------------------------------------------------------

_REPORT_KINDS = {
    "nodes": KIND_NODE_STATUS,
    "node": KIND_NODE_STATUS,
    KIND_NODE_STATUS: KIND_NODE_STATUS,
    "pods": KIND_POD_STATUS,
    "pod": KIND_POD_STATUS,
    KIND_POD_STATUS: KIND_POD_STATUS,
}


def read_reports(data_dir: Path, kind: str) -> list[Report]:
    """What edges reported: `kind` is nodes/nodestatus or pods/podstatus. Read-only.

    A data directory without a database yields an empty list; other failures StoreError.
    """
    table_kind = _REPORT_KINDS.get(kind)
    if table_kind is None:
        raise StoreError(f"unknown report kind {kind!r} (use nodes or pods)")
    path = Path(data_dir) / DB_NAME
    if not path.is_file():
        return []
    with _translated("reading reports"):
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT kind, node, namespace, name, updated_ms, body FROM reports"
                " WHERE kind = ? ORDER BY namespace, name",
                (table_kind,),
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()
    return [_report(*row) for row in rows]


def _report(kind: str, node: str, namespace: str, name: str, updated_ms: int, body: str) -> Report:
    try:
        decoded: Any = json.loads(body)
    except ValueError:
        decoded = None
    updated = datetime.datetime.fromtimestamp(updated_ms / 1000, tz=datetime.UTC)
    summary = node_summary(decoded) if kind == KIND_NODE_STATUS else pod_summary(decoded)
    return Report(
        kind=kind,
        node=node,
        namespace=namespace,
        name=name,
        updated=updated,
        summary=summary,
        body=decoded,
    )


def node_summary(report: Any) -> str:
    """Ready / NotReady / Unknown from the Ready condition of a node status report."""
    return ready_summary(report.get("Status") if isinstance(report, dict) else None)


def pod_summary(report: Any) -> str:
    """The pod phase, with ready containers when the report lists them."""
    status = report.get("Status") if isinstance(report, dict) else None
    if not isinstance(status, dict):
        return "Unknown"
    phase = status.get("phase")
    summary = phase if isinstance(phase, str) and phase else "Unknown"
    containers = status.get("containerStatuses")
    if isinstance(containers, list) and containers:
        ready = sum(1 for c in containers if isinstance(c, dict) and c.get("ready") is True)
        summary += f" ({ready}/{len(containers)} ready)"
    return summary
