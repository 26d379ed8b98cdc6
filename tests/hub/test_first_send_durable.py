"""The first send of an object leaves only once its "0" marker is durable (issue 12).

If the hub crashed after the edge stored an object but before the edge's ACK was recorded,
the restarted hub must still know the edge may hold it: it then sends an `update`, which
EdgeCore v1.10 stores, not an `insert`, which it acknowledges and ignores for a held key.
So whenever an object message reaches the edge, the store already holds an ack point for it:
a row in SQLite (embedded store) or an ObjectSync in the API (Kubernetes store).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_cloudhub.core.message import object_uid
from trio_cloudhub.store.kube.acks import sync_name
from trio_cloudhub.testing.edge_sim import Received, SimEdge
from trio_cloudhub.testing.harness import CloudHub, edge_node, open_cloudhub, open_cloudhub_kube

NODE = "edge-1"


def config_map(name: str, gen: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"gen": gen},
    }


def pod(name: str, config: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": "c", "image": "registry.example/app:1"}],
            "volumes": [{"name": "cfg", "configMap": {"name": config}}],
        },
    }


def sqlite_has_point(hub: CloudHub) -> Callable[[str], bool]:
    def has(uid: str) -> bool:
        with closing(sqlite3.connect(hub.data_dir / "store.db", timeout=5)) as db:
            row = db.execute(
                "SELECT 1 FROM ack_points WHERE node = ? AND uid = ?", (NODE, uid)
            ).fetchone()
        return row is not None

    return has


def api_has_point(hub: CloudHub) -> Callable[[str], bool]:
    def has(uid: str) -> bool:
        name = sync_name(NODE, uid)
        return any(sync["metadata"]["name"] == name for sync in hub.kube.objects("ObjectSync"))

    return has


def record_marker_at_arrival(edge: SimEdge, has_point: Callable[[str], bool]) -> list[str]:
    """Resources that reached the edge while the store held no ack point for them."""
    early: list[str] = []

    def observe(_edge: SimEdge, received: Received) -> None:
        message = received.message
        uid = object_uid(message.content)
        if uid and message.route.operation in ("insert", "update") and not has_point(uid):
            early.append(message.route.resource)

    edge.observer = observe
    return early


async def deliver_new_objects(hub: CloudHub, edge: SimEdge) -> None:
    for index in range(5):
        await hub.apply(config_map(f"cfg-{index}", "1"), pod(f"app-{index}", f"cfg-{index}"))
    for index in range(5):
        await edge.wait_holds(f"default/pod/app-{index}")
        await edge.wait_holds(f"default/configmap/cfg-{index}")


async def test_embedded_store_first_sends_wait_for_their_marker(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cloudhub(tmp_path) as hub:
            edge = await hub.edge(NODE, edgecore="v1.10")
            early = record_marker_at_arrival(edge, sqlite_has_point(hub))
            await deliver_new_objects(hub, edge)
            assert early == []


async def test_kubernetes_store_first_sends_wait_for_their_marker(tmp_path: Path) -> None:
    pytest.importorskip("kubernetes")
    with trio.fail_after(60):
        async with open_cloudhub_kube(tmp_path) as hub:
            await hub.apply(edge_node(NODE))
            edge = await hub.edge(NODE, edgecore="v1.10")
            await edge.wait_holds(f"null/node/{NODE}")
            early = record_marker_at_arrival(edge, api_has_point(hub))
            await deliver_new_objects(hub, edge)
            assert early == []
