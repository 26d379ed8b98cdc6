"""The local store end to end: real files, real SQLite, the real (10 ms) poll loop."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from tests.store.conftest import (
    cm_volume,
    config_map,
    eventually,
    node,
    pod,
    running_store,
    secret,
    write_manifest,
    write_text,
)
from trio_cloudhub.core.message import Message, object_uid
from trio_cloudhub.store.base import CloudStore
from trio_cloudhub.store.local import LocalStore, open_local_store

Dirs = tuple[Path, Path]


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait until a warning containing `text` was logged."""
    await eventually(lambda: any(text in record.getMessage() for record in caplog.records))


def ack_rows(data: Path) -> list[tuple[str, str, str]]:
    with closing(sqlite3.connect(data / "store.db")) as db:
        return db.execute("SELECT node, uid, resource_version FROM ack_points").fetchall()


def summary(messages: list[Message]) -> list[tuple[str, str]]:
    return [(m.route.operation, m.route.resource) for m in messages]


def rv_of(message: Message) -> int:
    return int(message.header.resource_version)


async def test_initial_sync_sends_every_object_to_its_node(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "nodes.yaml", node("edge-1"), node("edge-2"))
    write_manifest(
        manifests,
        "app.yml",
        config_map("cfg", {"k": "v"}),
        secret("creds", {"user": "admin"}),
        config_map("unused"),
        pod(
            "web",
            "edge-1",
            volumes=[cm_volume("cfg"), {"name": "s", "secret": {"secretName": "creds"}}],
        ),
        pod("pending"),  # no nodeName: goes nowhere
    )
    async with running_store(data, manifests) as hub:
        initial = hub.initial()
    assert summary(initial) == [
        ("update", "node/edge-1/null/node/edge-1"),
        ("update", "node/edge-2/null/node/edge-2"),
        ("insert", "node/edge-1/default/configmap/cfg"),
        ("insert", "node/edge-1/default/secret/creds"),
        ("insert", "node/edge-1/default/pod/web"),
    ]
    for message in initial:
        assert (message.route.source, message.route.group) == ("edgecontroller", "resource")
        metadata = message.content["metadata"]
        assert message.header.resource_version == metadata["resourceVersion"]
        assert metadata["uid"] and metadata["creationTimestamp"].endswith("Z")
        assert message.content["apiVersion"] == "v1"
    web = initial[-1].content
    assert list(web)[:3] == ["kind", "apiVersion", "metadata"]
    assert web["metadata"]["namespace"] == "default"
    assert initial[3].content["data"] == {"user": "YWRtaW4="}  # stringData folded, base64
    assert len({rv_of(m) for m in initial}) == len(initial)


async def test_references_by_env_env_from_projection_and_pull_secret(dirs: Dirs) -> None:
    data, manifests = dirs
    objects = [config_map(f"cm-{i}") for i in range(3)] + [secret(f"s-{i}") for i in range(3)]
    consumer = pod(
        "consumer",
        "edge-1",
        env=[
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-0", "key": "a"}}},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s-0", "key": "b"}}},
        ],
        env_from=[{"configMapRef": {"name": "cm-1"}}, {"secretRef": {"name": "s-1"}}],
        volumes=[{"name": "p", "projected": {"sources": [{"configMap": {"name": "cm-2"}}]}}],
        image_pull_secrets=["s-2"],
    )
    write_manifest(manifests, "all.yaml", *objects, consumer)
    async with running_store(data, manifests) as hub:
        initial = hub.initial()
    assert {m.route.resource for m in initial} == {
        "node/edge-1/default/configmap/cm-0",
        "node/edge-1/default/configmap/cm-1",
        "node/edge-1/default/configmap/cm-2",
        "node/edge-1/default/secret/s-0",
        "node/edge-1/default/secret/s-1",
        "node/edge-1/default/secret/s-2",
        "node/edge-1/default/pod/consumer",
    }


async def test_edit_sends_update_with_higher_version_and_same_uid(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(
        manifests,
        "app.yaml",
        config_map("cfg", {"k": "1"}),
        pod("web", "edge-1", volumes=[cm_volume("cfg")]),
    )
    async with running_store(data, manifests) as hub:
        before = {m.route.resource: m for m in hub.initial()}["node/edge-1/default/configmap/cfg"]
        write_manifest(
            manifests,
            "app.yaml",
            config_map("cfg", {"k": "2"}),
            pod("web", "edge-1", volumes=[cm_volume("cfg")]),
        )
        [after] = await hub.take(1)
        assert summary([after]) == [("update", "node/edge-1/default/configmap/cfg")]
        assert after.content["data"] == {"k": "2"}
        assert object_uid(after.content) == object_uid(before.content)
        assert rv_of(after) > rv_of(before)
        # Same content written again (new mtime): nothing to send.
        write_manifest(
            manifests,
            "app.yaml",
            config_map("cfg", {"k": "2"}),
            pod("web", "edge-1", volumes=[cm_volume("cfg")]),
        )
        await hub.quiet()


async def test_new_file_inserts_and_removed_file_deletes(dirs: Dirs) -> None:
    data, manifests = dirs
    async with running_store(data, manifests) as hub:
        assert hub.initial() == []
        write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
        [insert] = await hub.take(1)
        assert summary([insert]) == [("insert", "node/edge-1/default/pod/web")]
        (manifests / "web.yaml").unlink()
        [delete] = await hub.take(1)
    assert summary([delete]) == [("delete", "node/edge-1/default/pod/web")]
    assert object_uid(delete.content) == object_uid(insert.content)
    assert rv_of(delete) > rv_of(insert)
    assert delete.content["metadata"]["resourceVersion"] == delete.header.resource_version


async def test_config_map_withdrawn_when_last_pod_using_it_goes(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "cfg.yaml", config_map("cfg"))
    write_manifest(manifests, "a.yaml", pod("a", "edge-1", volumes=[cm_volume("cfg")]))
    write_manifest(manifests, "b.yaml", pod("b", "edge-1", volumes=[cm_volume("cfg")]))
    async with running_store(data, manifests) as hub:
        assert len(hub.initial()) == 3
        (manifests / "a.yaml").unlink()
        assert summary(await hub.take(1)) == [("delete", "node/edge-1/default/pod/a")]
        await hub.quiet()  # b still uses cfg
        (manifests / "b.yaml").unlink()
        assert summary(await hub.take(2)) == [
            ("delete", "node/edge-1/default/pod/b"),
            ("delete", "node/edge-1/default/configmap/cfg"),
        ]
        # Needed again: inserted again, same uid and version (content did not change).
        write_manifest(
            manifests, "c.yaml", pod("c", "edge-1", env_from=[{"configMapRef": {"name": "cfg"}}])
        )
        assert summary(await hub.take(2)) == [
            ("insert", "node/edge-1/default/configmap/cfg"),
            ("insert", "node/edge-1/default/pod/c"),
        ]


async def test_pod_moved_between_nodes(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "cfg.yaml", config_map("cfg"))
    write_manifest(manifests, "web.yaml", pod("web", "edge-1", volumes=[cm_volume("cfg")]))
    async with running_store(data, manifests) as hub:
        initial = hub.initial()
        write_manifest(manifests, "web.yaml", pod("web", "edge-2", volumes=[cm_volume("cfg")]))
        moved = await hub.take(4)
    assert summary(moved) == [
        ("delete", "node/edge-1/default/pod/web"),
        ("delete", "node/edge-1/default/configmap/cfg"),
        ("insert", "node/edge-2/default/configmap/cfg"),
        ("insert", "node/edge-2/default/pod/web"),
    ]
    assert object_uid(moved[3].content) == object_uid(initial[1].content)


async def test_node_removal_sends_node_stop_and_forgets_its_ack_points(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "node.yaml", node("edge-1"))
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    async with running_store(data, manifests) as hub:
        node_msg, pod_msg = hub.initial()
        hub.store.record_ack("edge-1", pod_msg)
        (manifests / "node.yaml").unlink()
        [stop] = await hub.take(1)
        assert summary([stop]) == [("delete", "node/edge-1/namespace/node/edge-1")]
        assert hub.store.acked_version("edge-1", object_uid(pod_msg.content)) is None
        # The node comes back: its whole state is sent again.
        write_manifest(manifests, "node.yaml", node("edge-1"))
        back = await hub.take(2)
    assert summary(back) == [
        ("update", "node/edge-1/null/node/edge-1"),
        ("insert", "node/edge-1/default/pod/web"),
    ]
    assert object_uid(back[0].content) != object_uid(node_msg.content)  # a new Node


async def test_bad_file_is_reported_once_and_withdraws_nothing(
    dirs: Dirs, caplog: pytest.LogCaptureFixture
) -> None:
    data, manifests = dirs
    write_manifest(
        manifests, "app.yaml", config_map("cfg"), pod("web", "edge-1", volumes=[cm_volume("cfg")])
    )
    caplog.set_level(logging.WARNING, logger="trio_cloudhub.store")
    async with running_store(data, manifests) as hub:
        assert len(hub.initial()) == 2
        write_text(manifests, "app.yaml", "kind: Pod\nmetadata: {name: [unclosed\n")
        await logged(caplog, "invalid YAML")
        await hub.quiet(20)  # several more polls: no withdrawal, no second warning
        broken = [r for r in caplog.records if "app.yaml" in r.getMessage()]
        assert len(broken) == 1 and "invalid YAML" in broken[0].getMessage()
        write_manifest(manifests, "app.yaml", {"apiVersion": "v1", "kind": "Pod", "metadata": {}})
        await logged(caplog, "no metadata.name")
        await hub.quiet()
        # Fixed, with a change and an unsupported kind: the change arrives, the kind is skipped.
        write_manifest(
            manifests,
            "app.yaml",
            config_map("cfg", {"fixed": "yes"}),
            pod("web", "edge-1", volumes=[cm_volume("cfg")]),
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
        )
        assert summary(await hub.take(1)) == [("update", "node/edge-1/default/configmap/cfg")]
        await hub.quiet()
    assert any(
        "Deployment" in r.getMessage() and "app.yaml" in r.getMessage() for r in caplog.records
    )


async def test_restart_keeps_uids_versions_and_ack_points(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "node.yaml", node("edge-1"))
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    write_manifest(manifests, "old.yaml", pod("old", "edge-1"))
    async with running_store(data, manifests) as hub:
        first = {m.route.resource: m for m in hub.initial()}
        for message in first.values():
            hub.store.record_ack("edge-1", message)
    (manifests / "old.yaml").unlink()  # removed while the hub is down
    async with running_store(data, manifests) as hub:
        second = hub.initial()
        store = hub.store
        for message in first.values():
            uid = object_uid(message.content)
            assert store.acked_version("edge-1", uid) == message.header.resource_version
    assert summary(second) == [
        ("delete", "node/edge-1/default/pod/old"),
        ("update", "node/edge-1/null/node/edge-1"),
        ("insert", "node/edge-1/default/pod/web"),
    ]
    old = first["node/edge-1/default/pod/old"]
    assert object_uid(second[0].content) == object_uid(old.content)
    assert rv_of(second[0]) > max(rv_of(m) for m in first.values())
    for message in second[1:]:
        before = first[message.route.resource]
        assert object_uid(message.content) == object_uid(before.content)
        assert message.header.resource_version == before.header.resource_version


async def test_broken_file_after_restart_keeps_its_objects(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    async with running_store(data, manifests) as hub:
        [first] = hub.initial()
    write_text(manifests, "web.yaml", "{{{ not yaml")
    async with running_store(data, manifests) as hub:
        [second] = hub.initial()
        await hub.quiet()
    assert summary([second]) == [("insert", "node/edge-1/default/pod/web")]
    assert second.header.resource_version == first.header.resource_version


async def test_delete_lost_before_restart_is_sent_from_the_ack_point(dirs: Dirs) -> None:
    """The object row is gone but the edge acked it: the restart still deletes it there."""
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    async with running_store(data, manifests) as hub:
        [insert] = hub.initial()
        hub.store.record_ack("edge-1", insert)
    with closing(sqlite3.connect(data / "store.db")) as db, db:
        db.execute("DELETE FROM objects")
    (manifests / "web.yaml").unlink()
    async with running_store(data, manifests) as hub:
        [delete] = hub.initial()
    assert summary([delete]) == [("delete", "node/edge-1/default/pod/web")]
    assert object_uid(delete.content) == object_uid(insert.content)
    assert delete.header.resource_version == insert.header.resource_version


async def test_ack_points_are_flushed_in_the_background_and_deleted_on_delete_ack(
    dirs: Dirs,
) -> None:
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    async with running_store(data, manifests) as hub:
        [insert] = hub.initial()
        uid = object_uid(insert.content)
        hub.store.record_ack("edge-1", insert)
        assert hub.store.acked_version("edge-1", uid) == insert.header.resource_version
        rows = await eventually(lambda: ack_rows(data))  # the background batch, every 20 ms
        assert rows == [("edge-1", uid, insert.header.resource_version)]
        (manifests / "web.yaml").unlink()
        [delete] = await hub.take(1)
        hub.store.record_ack("edge-1", delete)
        assert hub.store.acked_version("edge-1", uid) is None
    async with open_local_store(data, manifests) as store:
        assert store.acked_version("edge-1", uid) is None


async def test_conflicting_definitions_first_file_wins(
    dirs: Dirs, caplog: pytest.LogCaptureFixture
) -> None:
    data, manifests = dirs
    write_manifest(manifests, "a.yaml", pod("web", "edge-1"))
    write_manifest(manifests, "b.yaml", pod("web", "edge-2"))
    async with running_store(data, manifests) as hub:
        assert summary(hub.initial()) == [("insert", "node/edge-1/default/pod/web")]
    assert any("defined in a.yaml and b.yaml" in r.getMessage() for r in caplog.records)


def test_local_store_implements_the_cloud_store_interface(tmp_path: Path) -> None:
    store: CloudStore = LocalStore(tmp_path / "data", tmp_path / "manifests")  # checked by mypy
    assert store.acked_version("edge-1", "uid") is None
    assert not (tmp_path / "data").exists()  # the constructor does no I/O


async def test_conflict_loser_takes_over_when_the_winner_drops_the_object(dirs: Dirs) -> None:
    """Only the objects of changed files are reconciled: that must include the other files'
    definitions of the same keys."""
    data, manifests = dirs
    write_manifest(manifests, "a.yaml", pod("web", "edge-1"), config_map("keep"))
    write_manifest(manifests, "b.yaml", pod("web", "edge-2"))
    async with running_store(data, manifests) as hub:
        [first] = hub.initial()
        write_manifest(manifests, "b.yaml", pod("web", "edge-3"))  # still losing: nothing
        await hub.quiet()
        write_manifest(manifests, "a.yaml", config_map("keep"))  # a.yaml no longer has it
        moved = await hub.take(2)
        assert summary(moved) == [
            ("delete", "node/edge-1/default/pod/web"),
            ("insert", "node/edge-3/default/pod/web"),
        ]
        assert object_uid(moved[1].content) == object_uid(first.content)
        assert rv_of(moved[1]) > rv_of(first)
        write_manifest(manifests, "a.yaml", pod("web", "edge-1"))  # and back
        assert summary(await hub.take(2)) == [
            ("delete", "node/edge-3/default/pod/web"),
            ("insert", "node/edge-1/default/pod/web"),
        ]
        (manifests / "a.yaml").unlink()
        assert summary(await hub.take(2)) == [
            ("delete", "node/edge-1/default/pod/web"),
            ("insert", "node/edge-3/default/pod/web"),
        ]
        await hub.quiet()
