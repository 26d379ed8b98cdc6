"""Store write failures with the real LocalStore and real SQLite (issue 3).

While the database refuses writes (another connection holds the write lock, or the store's
connection is read-only), ack points and manifest changes must wait, with a warning, and
nothing may crash; once writes work again the ack points are persisted (a new store reads
them back) and the change is applied and delivered. A change is never delivered before it is
persisted: after a crash the store would not know what the edge holds.

`localdb.BUSY_TIMEOUT_MS` is lowered to 200 ms here so a locked database fails fast.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest

from tests.store.conftest import (
    Running,
    config_map,
    eventually,
    pod,
    running_store,
    write_manifest,
)
from trio_cloudhub.core.message import Message, object_uid
from trio_cloudhub.store import localdb
from trio_cloudhub.store.local import LocalStore

Dirs = tuple[Path, Path]
NODE = "edge-1"
ACK_RETRIED = "ack points will be retried"
SYNC_RETRIED = "retrying at every poll"


@pytest.fixture(autouse=True)
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localdb, "BUSY_TIMEOUT_MS", 200)


def app(gen: int) -> list[dict[str, Any]]:
    env_from = [{"configMapRef": {"name": "cfg"}}]
    return [config_map("cfg", {"gen": str(gen)}), pod("web", NODE, env_from=env_from)]


def ack_rows(data: Path) -> dict[str, str]:
    """uid -> acknowledged resourceVersion of NODE, as stored (a separate connection)."""
    with closing(sqlite3.connect(data / "store.db", timeout=5)) as db:
        rows = db.execute(
            "SELECT uid, resource_version FROM ack_points WHERE node = ?", (NODE,)
        ).fetchall()
    return dict(rows)


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and text in record.getMessage()
    ]


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    await eventually(lambda: warnings_with(caplog, text))


async def acked_after_reopen(data: Path, manifests: Path, messages: list[Message]) -> None:
    """A new LocalStore on the same data dir reads every message's ack point back."""
    store = LocalStore(data, manifests)
    await store.open()
    try:
        for message in messages:
            uid = object_uid(message.content)
            assert store.acked_version(NODE, uid) == message.header.resource_version, message
    finally:
        await store.aclose()


@asynccontextmanager
async def write_locked(data: Path) -> AsyncIterator[None]:
    """Another process's write transaction on store.db for the duration of the block."""
    with closing(sqlite3.connect(data / "store.db", isolation_level=None, timeout=5)) as db:
        db.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")


@asynccontextmanager
async def read_only(hub: Running) -> AsyncIterator[None]:
    """The store's own connection refuses writes (`PRAGMA query_only`); unlike a chmod this
    also holds when the tests run as root."""

    async def set_query_only(on: bool) -> None:
        store = hub.store
        async with store._db_lock:  # no worker thread is on the connection meanwhile
            conn = store._db._conn
            assert conn is not None
            conn.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")

    await set_query_only(True)
    try:
        yield
    finally:
        await set_query_only(False)


async def check_delivered_after_the_fault(hub: Running, before: list[Message]) -> Message:
    """The gen-2 change arrives as an update of the same object with a higher version."""
    (update,) = await hub.take(1)
    old = next(m for m in before if m.route.resource.endswith("/configmap/cfg"))
    assert update.route.operation == "update"
    assert update.route.resource == old.route.resource
    assert update.content["data"] == {"gen": "2"}
    assert object_uid(update.content) == object_uid(old.content)
    assert int(update.header.resource_version) > int(old.header.resource_version)
    return update


@pytest.mark.parametrize("fault", ["locked", "read-only"])
async def test_failed_writes_lose_no_ack_point_and_no_change(
    dirs: Dirs, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    data, manifests = dirs
    caplog.set_level(logging.WARNING, logger="trio_cloudhub.store")
    write_manifest(manifests, "app.yaml", *app(1))
    async with running_store(data, manifests) as hub:
        initial = hub.initial()
        assert sorted(m.route.resource for m in initial) == [
            f"node/{NODE}/default/configmap/cfg",
            f"node/{NODE}/default/pod/web",
        ]
        fault_context = write_locked(data) if fault == "locked" else read_only(hub)
        async with fault_context:
            for message in initial:
                hub.store.record_ack(NODE, message)
            write_manifest(manifests, "app.yaml", *app(2))
            await logged(caplog, ACK_RETRIED)
            await logged(caplog, SYNC_RETRIED)
            # Served from memory meanwhile; nothing persisted, nothing of the change sent.
            for message in initial:
                uid = object_uid(message.content)
                assert hub.store.acked_version(NODE, uid) == message.header.resource_version
            assert ack_rows(data) == {}
            await hub.quiet()

        update = await check_delivered_after_the_fault(hub, initial)
        want = {object_uid(m.content): m.header.resource_version for m in initial}
        await eventually(lambda: ack_rows(data) == want)
        hub.store.record_ack(NODE, update)
        want[object_uid(update.content)] = update.header.resource_version
        await eventually(lambda: ack_rows(data) == want)
        await hub.quiet()

    pod_message = next(m for m in initial if m.route.resource.endswith("/pod/web"))
    await acked_after_reopen(data, manifests, [pod_message, update])
    # A restarted store finds nothing missed: the hub will re-send nothing.
    async with running_store(data, manifests) as again:
        assert again.store.missed(NODE) == []
        for message in again.initial():
            acked = again.store.acked_version(NODE, object_uid(message.content))
            assert acked == message.header.resource_version, message.route


async def test_ack_points_recorded_while_locked_are_written_by_the_final_flush(
    dirs: Dirs, caplog: pytest.LogCaptureFixture
) -> None:
    """The lock goes away just before shutdown: the final flush still writes them."""
    data, manifests = dirs
    caplog.set_level(logging.WARNING, logger="trio_cloudhub.store")
    write_manifest(manifests, "app.yaml", *app(1))
    async with running_store(data, manifests) as hub:
        initial = hub.initial()
        async with write_locked(data):
            for message in initial:
                hub.store.record_ack(NODE, message)
            await logged(caplog, ACK_RETRIED)
        # Leaving the block now: the retry (1 s later) has not happened yet.
    await acked_after_reopen(data, manifests, initial)
