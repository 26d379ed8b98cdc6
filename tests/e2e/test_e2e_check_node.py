"""`GET /node/{name}` on the real `serve`, both stores (keadm join's "does it exist?").

Embedded store: a node exists once it joined (was issued a certificate, remembered in the
database across restarts), or has a Node manifest, pods bound to it, or ack points.
Kubernetes store: the Node object exists (any Node, edge-labelled or not), from the
informer's cache; 500 while the caches are not synced.
"""

from __future__ import annotations

import ssl
from functools import partial
from pathlib import Path

import trio
import yaml

from tests.e2e.test_e2e_kube import CONFIG, edge_node, hub_on
from trio_cloudhub.config import parse_config
from trio_cloudhub.hub.server import serve
from trio_cloudhub.testing.edge_sim import bootstrap, https_get
from trio_cloudhub.testing.fake_kube import open_fake_kube
from trio_cloudhub.testing.hub_process import HOST, free_ports, hub_process


async def check_node(port: int, name: str) -> tuple[int, bytes]:
    """As keadm join asks: TLS without verification, no client certificate, no token."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return await https_get(HOST, port, f"/node/{name}", context)


async def until_status(port: int, name: str, status: int, *, within: float) -> None:
    with trio.fail_after(within):
        while True:  # polled: the hub takes the change in on its own time
            if (await check_node(port, name))[0] == status:
                return
            await trio.sleep(0.05)


def pod_manifest(name: str, node: str) -> str:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
    }
    return yaml.safe_dump(pod)


async def test_embedded_store_knows_joined_nodes_and_nodes_with_work(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with hub_process(tmp_path) as hub:
            assert await check_node(hub.https_port, "edge-new") == (404, b"Node not found")
            await bootstrap(HOST, hub.https_port, await hub.token(), "edge-new")
            assert await check_node(hub.https_port, "edge-new") == (200, b"Node founded")

            (hub.manifests / "pod.yaml").write_text(pod_manifest("web", "edge-busy"))
            await until_status(hub.https_port, "edge-busy", 200, within=10)
            assert await check_node(hub.https_port, "nobody") == (404, b"Node not found")

            assert await hub.terminate() == 0
            await hub.start()  # joined nodes are remembered in the database
            assert await check_node(hub.https_port, "edge-new") == (200, b"Node founded")


async def test_kubernetes_store_answers_from_the_node_objects(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_fake_kube(bookmark_interval=0.2) as kube:
            kube.put(edge_node("e1"))
            kube.put({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "cloud-1"}})
            async with hub_on(kube, tmp_path) as info:
                assert await check_node(info.https_port, "e1") == (200, b"Node founded")
                assert await check_node(info.https_port, "cloud-1") == (200, b"Node founded")
                assert await check_node(info.https_port, "e2") == (404, b"Node not found")
                kube.put(edge_node("e2"))
                await until_status(info.https_port, "e2", 200, within=10)
                kube.delete("Node", None, "e1")
                await until_status(info.https_port, "e1", 404, within=10)


async def test_kubernetes_store_answers_500_until_its_caches_are_synced(tmp_path: Path) -> None:
    https_port, websocket_port = free_ports(2)
    with trio.fail_after(60):
        async with open_fake_kube(bookmark_interval=0.2) as kube:
            kube.put(edge_node("e1"))
            kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
            text = CONFIG.format(kubeconfig=kubeconfig, data_dir=tmp_path / "data")
            text = text.replace("port: 0}", "port: PORT}", 2)
            text = text.replace("PORT", str(websocket_port), 1).replace("PORT", str(https_port))
            kube.fail_next(503, times=1000, verb="list", resource="pods")
            async with trio.open_nursery() as nursery:
                config = parse_config(text, "t.yaml")
                nursery.start_soon(partial(serve, config, task_status=trio.TASK_STATUS_IGNORED))
                with trio.fail_after(20):
                    while True:
                        try:
                            answer = await check_node(https_port, "e1")
                            break
                        except OSError:  # not listening yet
                            await trio.sleep(0.05)
                assert answer == (500, b"Failed to query node information")
                kube.clear_faults()
                await until_status(https_port, "e1", 200, within=20)
                nursery.cancel_scope.cancel()
