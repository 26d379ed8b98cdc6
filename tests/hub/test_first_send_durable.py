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

import trio

from trio_cloudhub.core.message import object_uid
from trio_cloudhub.store.kube.acks import sync_name
from trio_cloudhub.testing.edge_sim import Received, SimEdge
from trio_cloudhub.testing.harness import CloudHub, edge_node, open_cloudhub, open_cloudhub_kube
from trio_cloudhub.testing.netfaults import config_map, pod

NODE = "edge-1"


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


class Arrivals:
    """What reached the edge: resources that came while the store held no ack point for
    them, and each resource's first operation."""

    def __init__(self, edge: SimEdge, has_point: Callable[[str], bool]) -> None:
        self.early: list[str] = []
        self.first_operation: dict[str, str] = {}
        self._has_point = has_point
        edge.observer = self._observe

    def _observe(self, _edge: SimEdge, received: Received) -> None:
        message = received.message
        uid = object_uid(message.content)
        operation = message.route.operation
        if not uid or operation not in ("insert", "update"):
            return
        self.first_operation.setdefault(message.route.resource, operation)
        if not self._has_point(uid):
            self.early.append(message.route.resource)

    def check(self) -> None:
        assert self.early == []
        # Markers written ahead of their first send (in one batch) do not turn it into an
        # update: an object the node never got goes as insert.
        objects = {r: op for r, op in self.first_operation.items() if "/node/" not in r}
        assert len(objects) == 10, objects
        assert set(objects.values()) == {"insert"}, objects


async def deliver_new_objects(hub: CloudHub, edge: SimEdge) -> None:
    for index in range(5):
        config = f"cfg-{index}"
        await hub.apply(config_map(config, 1), pod(f"app-{index}", NODE, config_maps=[config]))
    for index in range(5):
        await edge.wait_holds(f"default/pod/app-{index}")
        await edge.wait_holds(f"default/configmap/cfg-{index}")


async def test_embedded_store_first_sends_wait_for_their_marker(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cloudhub(tmp_path) as hub:
            edge = await hub.edge(NODE, edgecore="v1.10")
            arrivals = Arrivals(edge, sqlite_has_point(hub))
            await deliver_new_objects(hub, edge)
            arrivals.check()


async def test_kubernetes_store_first_sends_wait_for_their_marker(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cloudhub_kube(tmp_path) as hub:
            await hub.apply(edge_node(NODE))
            edge = await hub.edge(NODE, edgecore="v1.10")
            await edge.wait_holds(f"null/node/{NODE}")
            arrivals = Arrivals(edge, api_has_point(hub))
            await deliver_new_objects(hub, edge)
            arrivals.check()
