"""Issue 12: nothing lost under a real EdgeCore's own storage rules, over a whole life.

The real `serve` runs as a subprocess (killed, stopped and restarted on the same ports), on
the embedded store (manifests) or on the Kubernetes store (the fake API server in this
process, the real client in the hub). The edge is `SimEdgeCore`: it keeps its metaManager
database (`MetaStore`, v1.10 or v1.23 rules) across connections and restarts and reconnects
by itself. Every step ends when the edge's *database* holds exactly the desired state (each
object's marker annotation, nothing extra), never on what the hub believes.

Before the fix, the v1.10 runs stopped at the first restart: the hub sent the changed config
map as `insert`, v1.10's metaManager answered "OK" and kept the old row.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from trio_cloudhub.store.kube.store import EDGE_LABEL
from trio_cloudhub.testing.edge_sim import bootstrap
from trio_cloudhub.testing.edge_storage import V1_10, V1_23, MetaStore
from trio_cloudhub.testing.edgecore import SimEdgeCore
from trio_cloudhub.testing.fake_kube import FakeKube, open_fake_kube
from trio_cloudhub.testing.hub_process import HOST, HubProcess

NODE = "edge-node-1"
MARK = "life/marker"
CONVERGE = 30.0
LINES = [V1_10, V1_23]


def node_object(marker: str) -> dict[str, Any]:
    metadata = {"name": NODE, "labels": {EDGE_LABEL: ""}, "annotations": {MARK: marker}}
    return {"apiVersion": "v1", "kind": "Node", "metadata": metadata}


def config_map(name: str, marker: str) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "default", "annotations": {MARK: marker}}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"v": marker}}


def pod(name: str, config_maps: list[str], marker: str) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "default", "annotations": {MARK: marker}}
    spec = {
        "nodeName": NODE,
        "containers": [{"name": "app", "image": "busybox:1.36"}],
        "volumes": [{"name": cm, "configMap": {"name": cm}} for cm in config_maps],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def resource_of(obj: Mapping[str, Any]) -> str:
    kind, name = obj["kind"], obj["metadata"]["name"]
    return f"null/node/{name}" if kind == "Node" else f"default/{kind.lower()}/{name}"


class Cloud:
    """The desired state, written to one store or the other; `want()` is what the edge must
    hold: resource -> marker of every object placed on the node."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}  # resource -> object

    def put(self, obj: dict[str, Any]) -> None:
        self.objects[resource_of(obj)] = obj
        self._write(obj)

    def delete(self, obj: Mapping[str, Any]) -> None:
        del self.objects[resource_of(obj)]
        self._remove(obj)

    def want(self) -> dict[str, str]:
        used = {
            f"default/configmap/{volume['configMap']['name']}"
            for obj in self.objects.values()
            if obj["kind"] == "Pod"
            for volume in obj["spec"]["volumes"]
        }
        return {
            resource: obj["metadata"]["annotations"][MARK]
            for resource, obj in self.objects.items()
            if obj["kind"] != "ConfigMap" or resource in used
        }

    def _write(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def _remove(self, obj: Mapping[str, Any]) -> None:
        raise NotImplementedError

    async def removal_seen(self, obj: Mapping[str, Any]) -> None:
        """Until the hub has taken in the removal of `obj` (so a re-creation is new)."""


class ManifestCloud(Cloud):
    def __init__(self, hub: HubProcess) -> None:
        super().__init__()
        self.hub = hub

    def _path(self, obj: Mapping[str, Any]) -> Path:
        return self.hub.manifests / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"

    def _write(self, obj: dict[str, Any]) -> None:
        path = self._path(obj)
        temp = path.with_name("." + path.name)
        temp.write_text(yaml.safe_dump(obj))
        os.replace(temp, path)

    def _remove(self, obj: Mapping[str, Any]) -> None:
        self._path(obj).unlink()

    async def removal_seen(self, obj: Mapping[str, Any]) -> None:
        key = (obj["kind"], obj["metadata"]["name"])
        with trio.fail_after(10):
            while True:  # polled: the hub's database, another process
                if key not in self._stored_keys():
                    return
                await trio.sleep(0.05)

    def _stored_keys(self) -> set[tuple[str, str]]:
        uri = f"{(self.hub.data_dir / 'store.db').resolve().as_uri()}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            return {(kind, name) for kind, name in db.execute("SELECT kind, name FROM objects")}


class KubeCloud(Cloud):
    def __init__(self, kube: FakeKube) -> None:
        super().__init__()
        self.kube = kube

    def _write(self, obj: dict[str, Any]) -> None:
        self.kube.put(obj)

    def _remove(self, obj: Mapping[str, Any]) -> None:
        namespace = obj["metadata"].get("namespace")
        self.kube.delete(obj["kind"], namespace, obj["metadata"]["name"])

    async def removal_seen(self, obj: Mapping[str, Any]) -> None:
        await trio.sleep(0.3)  # the hub's watch takes it in at once; a new uid follows anyway


def problems(db: MetaStore, want: Mapping[str, str]) -> list[str]:
    found: list[str] = []
    for resource, marker in sorted(want.items()):
        value = db.get(resource)
        if value is None:
            found.append(f"missing {resource}")
            continue
        held = (value.get("metadata", {}).get("annotations") or {}).get(MARK)
        if held != marker:
            found.append(f"{resource} holds {held}, want {marker}")
    found += [f"extra {key}" for key in sorted(set(db.keys()) - want.keys())]
    return found


async def converge(core: SimEdgeCore, cloud: Cloud, step: str) -> None:
    """Until the edge's database holds exactly the desired state."""
    want = cloud.want()
    await core.wait_until(lambda db: not problems(db, want), CONVERGE, f"converged ({step})")


@asynccontextmanager
async def world(store: str, root: Path) -> AsyncIterator[tuple[HubProcess, Cloud]]:
    """A started hub on `store` and the cloud side to change."""
    if store == "local":
        hub = HubProcess(root / "hub")
        try:
            await hub.start()
            yield hub, ManifestCloud(hub)
        finally:
            await hub.aclose()
        return
    async with open_fake_kube(bookmark_interval=0.2) as kube:
        hub = kube_hub(kube, root / "hub")
        try:
            await hub.start()
            yield hub, KubeCloud(kube)
        finally:
            await hub.aclose()


def kube_hub(kube: FakeKube, root: Path) -> HubProcess:
    root.mkdir(parents=True, exist_ok=True)
    kubeconfig = kube.write_kubeconfig(root / "kubeconfig")
    return HubProcess(
        root,
        trio_cloud_hub={"reconcileIntervalSeconds": 0.5},
        top={"kubeAPIConfig": {"kubeConfig": str(kubeconfig), "qps": 1000, "burst": 1000}},
    )


async def edgecore(hub: HubProcess, line: str, nursery: trio.Nursery) -> SimEdgeCore:
    identity = await bootstrap(HOST, hub.https_port, await hub.token(), NODE)
    core = SimEdgeCore(NODE, identity.client_ssl_context(), port=hub.websocket_port, line=line)
    nursery.start_soon(core.run)
    await core.wait_connected()
    return core


async def while_away(core: SimEdgeCore, change: Callable[[], Any]) -> None:
    """EdgeCore stopped (database kept), `change` made, EdgeCore started again."""
    await core.stop()
    await change()
    core.start()


@pytest.mark.parametrize("store", ["local", "kube"])
@pytest.mark.parametrize("line", LINES)
async def test_a_whole_life_ends_with_the_newest_version_in_the_edges_database(
    tmp_path: Path, line: str, store: str
) -> None:
    with trio.fail_after(240):
        async with world(store, tmp_path) as (hub, cloud), trio.open_nursery() as nursery:
            cloud.put(node_object("n1"))
            cloud.put(config_map("app-config", "v1"))
            cloud.put(pod("web", ["app-config"], "p1"))
            core = await edgecore(hub, line, nursery)
            await converge(core, cloud, "first delivery")

            cloud.put(config_map("app-config", "v2"))
            await converge(core, cloud, "update")

            hub.kill()
            await hub.wait()
            cloud.put(config_map("app-config", "v3"))  # changed while the hub is down
            await hub.start()
            await converge(core, cloud, "after SIGKILL and restart")

            assert await hub.terminate() == 0
            cloud.put(config_map("app-config", "v4"))
            cloud.put(node_object("n2"))
            await hub.start()
            await converge(core, cloud, "after a graceful restart")

            async def hub_crash_and_change() -> None:
                hub.kill()
                await hub.wait()
                cloud.put(config_map("app-config", "v5"))
                cloud.put(pod("web", ["app-config"], "p2"))
                await hub.start()

            await while_away(core, hub_crash_and_change)
            await converge(core, cloud, "edge restarted with its database, hub crashed")

            async def hundred_changes() -> None:
                for index in range(20):  # 20 pods with a config map each: 40
                    cloud.put(config_map(f"cm-{index}", "c1"))
                    cloud.put(pod(f"job-{index}", [f"cm-{index}"], "j1"))
                for round_ in range(2, 4):  # 40 updates
                    for index in range(20):
                        cloud.put(config_map(f"cm-{index}", f"c{round_}"))
                for index in range(10):  # 10 pods deleted (their config maps withdrawn)
                    cloud.delete(cloud.objects[f"default/pod/job-{index}"])
                for marker in range(6, 16):  # 10 updates of one object
                    cloud.put(config_map("app-config", f"v{marker}"))
                await trio.sleep(0.5)

            await while_away(core, hundred_changes)
            await converge(core, cloud, "edge away for 100 changes")

            old_uid = core.storage.uid("default/pod/web")

            async def recreate_pod() -> None:
                web = cloud.objects["default/pod/web"]
                cloud.delete(web)
                await cloud.removal_seen(web)
                cloud.put(pod("web", ["app-config"], "p3"))  # same name, new uid

            await while_away(core, recreate_pod)
            await converge(core, cloud, "pod re-created under its name while away")
            assert core.storage.uid("default/pod/web") not in ("", old_uid)
            if line == V1_10:
                assert core.storage.ignored_inserts == 0, "an insert of a held key was sent"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("line", LINES)
async def test_a_node_moving_between_hubs_holds_the_newest_version(
    tmp_path: Path, line: str
) -> None:
    with trio.fail_after(120):
        async with open_fake_kube(bookmark_interval=0.2) as kube, trio.open_nursery() as nursery:
            cloud = KubeCloud(kube)
            cloud.put(node_object("n1"))
            cloud.put(config_map("app-config", "v1"))
            cloud.put(pod("web", ["app-config"], "p1"))
            first = kube_hub(kube, tmp_path / "a")
            hubs = [first]
            try:
                await first.start()  # before B picks its ports
                second = kube_hub(kube, tmp_path / "b")
                hubs.append(second)
                await second.start()
                core = await edgecore(first, line, nursery)
                await converge(core, cloud, "first delivery from hub A")
                for round_, hub in enumerate((second, first, second), start=2):
                    cloud.put(config_map("app-config", f"v{round_}"))
                    core.port = hub.websocket_port
                    await core.reconnect()
                    await converge(core, cloud, f"move {round_ - 1}")
                    cloud.put(pod("web", ["app-config"], f"p{round_}"))
                    await converge(core, cloud, f"change after move {round_ - 1}")
                if line == V1_10:
                    assert core.storage.ignored_inserts == 0
            finally:
                for hub in hubs:
                    await hub.aclose()
            nursery.cancel_scope.cancel()
