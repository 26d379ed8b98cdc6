"""`LocalStore.missed`: ack points compared with the desired state (reconciliation)."""

from __future__ import annotations

from pathlib import Path

from tests.store.conftest import cm_volume, config_map, node, pod, running_store, write_manifest
from trio_cloudhub.core.message import object_uid
from trio_cloudhub.store.local import open_local_store

Dirs = tuple[Path, Path]


def described(store_missed: list) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    built = [missed.build() for missed in store_missed]
    return [(m.route.operation, m.route.resource, m.header.resource_version) for m in built]


async def test_nothing_is_missed_once_everything_is_acknowledged(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "node.yaml", node("edge-1"))
    write_manifest(manifests, "web.yaml", pod("web", "edge-1", volumes=[cm_volume("cfg")]))
    write_manifest(manifests, "cfg.yaml", config_map("cfg"))
    async with running_store(data, manifests) as hub:
        initial = hub.initial()
        assert len(described(hub.store.missed("edge-1"))) == 3  # nothing acknowledged yet
        for message in initial:
            hub.store.record_ack("edge-1", message)
        assert hub.store.missed("edge-1") == []
        assert hub.store.missed("edge-2") == []


async def test_an_older_ack_point_is_missed_as_an_update(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1", volumes=[cm_volume("cfg")]))
    write_manifest(manifests, "cfg.yaml", config_map("cfg", {"v": "1"}))
    async with running_store(data, manifests) as hub:
        for message in hub.initial():
            hub.store.record_ack("edge-1", message)
        write_manifest(manifests, "cfg.yaml", config_map("cfg", {"v": "2"}))
        [update] = await hub.take(1)
        missed = hub.store.missed("edge-1")
        assert [(m.uid, m.delete) for m in missed] == [(object_uid(update.content), False)]
        assert described(missed) == [
            ("update", "node/edge-1/default/configmap/cfg", update.header.resource_version)
        ]


async def test_deletes_while_the_hub_was_down_are_missed(dirs: Dirs) -> None:
    """The store restarted after the pod and its config map went: both are deletes."""
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1", volumes=[cm_volume("cfg")]))
    write_manifest(manifests, "keep.yaml", pod("keep", "edge-1"))
    write_manifest(manifests, "cfg.yaml", config_map("cfg"))
    async with running_store(data, manifests) as hub:
        for message in hub.initial():
            hub.store.record_ack("edge-1", message)
    (manifests / "web.yaml").unlink()
    (manifests / "cfg.yaml").unlink()
    async with running_store(data, manifests) as hub:
        deletes = [m for m in hub.initial() if m.route.operation == "delete"]
        resources = sorted(m.route.resource for m in deletes)
        assert resources == [
            "node/edge-1/default/configmap/cfg",
            "node/edge-1/default/pod/web",
        ]
        # Until the edge acknowledges them, reconciliation finds the same deletes.
        missed = hub.store.missed("edge-1")
        assert all(m.delete for m in missed)
        assert sorted(resource for _, resource, _ in described(missed)) == resources
        for message in deletes:
            hub.store.record_ack("edge-1", message)
        assert hub.store.missed("edge-1") == []


async def test_a_withdrawn_config_map_is_missed_as_a_delete(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1", volumes=[cm_volume("cfg")]))
    write_manifest(manifests, "cfg.yaml", config_map("cfg"))
    async with running_store(data, manifests) as hub:
        for message in hub.initial():
            hub.store.record_ack("edge-1", message)
        write_manifest(manifests, "web.yaml", pod("web", "edge-1"))  # no longer uses cfg
        await hub.take(2)  # the pod's update and the config map's delete
        assert [
            (m.operation, m.resource) for m in (x.build() for x in hub.store.missed("edge-1"))
        ] == [  # deletes first (a v1.10 edge deletes by name)
            ("delete", "node/edge-1/default/configmap/cfg"),
            ("update", "node/edge-1/default/pod/web"),
        ]


async def test_a_node_object_ack_point_never_becomes_a_node_stop(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "node.yaml", node("edge-1"))
    async with running_store(data, manifests) as hub:
        [node_message] = hub.initial()
        hub.store.record_ack("edge-1", node_message)
    (manifests / "node.yaml").unlink()
    async with open_local_store(data, manifests) as store:
        assert store.missed("edge-1") == []


async def test_an_object_sent_but_never_acknowledged_still_gets_its_delete(dirs: Dirs) -> None:
    """KubeEdge's ObjectSync at "0": the edge may hold what it never ACKed."""
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    async with running_store(data, manifests) as hub:
        [insert] = hub.initial()
        hub.store.record_sent("edge-1", insert)
        assert hub.store.acked_version("edge-1", object_uid(insert.content)) == "0"
        [missed] = described(hub.store.missed("edge-1"))
        # "0" acknowledges no version, but the edge may hold one: update, never insert.
        assert missed[0] == "update"
    (manifests / "web.yaml").unlink()
    async with running_store(data, manifests) as hub:
        [delete] = hub.initial()  # the restart remembers it was sent
        assert (delete.route.operation, object_uid(delete.content)) == (
            "delete",
            object_uid(insert.content),
        )
