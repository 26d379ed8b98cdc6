"""What the embedded store remembers of nodes (`get nodes`, `GET /node/{name}`): sessions as
the hub reports them, kept in SQLite across restarts, beside what the store knows itself."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio

from tests.store.conftest import node, pod, running_store, write_manifest
from trio_cloudhub.core.message import new_message
from trio_cloudhub.store.base import NodeRecord, SessionEvent
from trio_cloudhub.store.local import open_local_store
from trio_cloudhub.store.localdb import DB_NAME, SCHEMA_VERSION


def started(
    at_ms: int, remote: str = "10.0.0.7:5000", transport: str = "websocket"
) -> SessionEvent:
    return SessionEvent(at_ms, True, transport, remote, "project")


def ended(at_ms: int, reason: str = "keepalive timeout") -> SessionEvent:
    return SessionEvent(
        at_ms, False, reason=reason, last_keepalive_ms=at_ms - 5, last_ack_ms=at_ms - 9
    )


def test_a_record_folds_in_session_starts_and_ends() -> None:
    record = NodeRecord("e").after(started(1000)).after(ended(2000))
    assert (record.first_connected_ms, record.connected_ms, record.disconnected_ms) == (
        1000,
        1000,
        2000,
    )
    assert not record.session_open and record.reason == "keepalive timeout"
    again = record.after(started(3000, "10.0.0.8:6000", "quic"))
    assert again.session_open and again.first_connected_ms == 1000 and again.reason == ""
    assert (again.transport, again.remote, again.last_ack_ms) == ("quic", "10.0.0.8:6000", 1991)


async def test_sessions_are_written_and_read_back_after_a_restart(tmp_path: Path) -> None:
    data, manifests = tmp_path / "data", tmp_path / "manifests"
    with trio.fail_after(20):
        async with running_store(data, manifests) as running:
            store = running.store
            assert not store.node_known("edge-1")
            store.record_connection("edge-1", started(1000))
            assert store.node_known("edge-1")  # connected once: it has joined
            store.record_connection("edge-1", ended(2000))
            store.record_connection("edge-2", started(1500))  # the hub dies during it
        async with open_local_store(data, manifests) as again:
            known = again.known_nodes()
    assert known["edge-1"] == NodeRecord(
        "edge-1",
        first_connected_ms=1000,
        connected_ms=1000,
        disconnected_ms=2000,
        transport="websocket",
        remote="10.0.0.7:5000",
        project="project",
        reason="keepalive timeout",
        last_keepalive_ms=1995,
        last_ack_ms=1991,
    )
    assert known["edge-2"].session_open  # its end was never recorded


async def test_known_nodes_are_every_node_the_store_has_heard_of(tmp_path: Path) -> None:
    data, manifests = tmp_path / "data", tmp_path / "manifests"
    manifests.mkdir()
    write_manifest(manifests, "nodes.yaml", node("desired"), pod("web", "with-pods"))
    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    report = new_message(
        source="edged",
        group="meta",
        operation="update",
        resource="default/nodestatus/reporting",
        content={"UID": "u", "Status": ready},
        now_ms=0,
    )
    with trio.fail_after(20):
        async with running_store(data, manifests) as running:
            await running.store.node_joined("joined")
            assert await running.store.apply_report("reporting", report) is not None
            known = running.store.known_nodes()
            assert set(known) == {"desired", "with-pods", "joined", "reporting"}
            assert known["desired"].desired and not known["with-pods"].desired
            assert known["joined"].joined_ms > 0
            assert known["reporting"].reported == "Ready"
        async with open_local_store(data, manifests) as again:
            assert again.known_nodes()["reporting"].reported == "Ready"  # from the database


async def test_a_database_of_the_previous_schema_gains_the_records_table(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / DB_NAME) as conn:
        conn.execute(
            "CREATE TABLE joined_nodes (name TEXT PRIMARY KEY, joined_ms INTEGER NOT NULL)"
        )
        conn.execute("INSERT INTO joined_nodes VALUES ('old', 5)")
        conn.execute("PRAGMA user_version = 2")
    with trio.fail_after(20):
        async with open_local_store(data, tmp_path / "manifests") as store:
            assert store.known_nodes()["old"].joined_ms == 5
            store.record_connection("old", started(10))
    with sqlite3.connect(data / DB_NAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert conn.execute("SELECT name, connected_ms FROM node_records").fetchall() == [
            ("old", 10)
        ]
