"""End to end on Kubernetes: `serve` with a kubeconfig for the fake API server (real client,
real TLS on loopback, simulated EdgeCore), one hub and two hubs sharing the cluster."""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tests.config.test_kube_conf import documents
from trio_cloudhub.config import parse_config
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.hub.server import ServeInfo, serve
from trio_cloudhub.pki import certs
from trio_cloudhub.store.kube.store import EDGE_LABEL
from trio_cloudhub.testing.edge_sim import EdgeIdentity, bootstrap, https_get, open_sim_edge
from trio_cloudhub.testing.fake_kube import FakeKube, open_fake_kube
from trio_cloudhub.testing.hub_process import free_ports

CONFIG = """\
apiVersion: cloudcore.config.kubeedge.io/v1alpha1
kind: CloudCore
commonConfig: {{monitorServer: {{bindAddress: "127.0.0.1:0"}}}}
kubeAPIConfig: {{kubeConfig: "{kubeconfig}", qps: 1000, burst: 1000}}
modules:
  cloudHub:
    advertiseAddress: [127.0.0.1]
    websocket: {{address: 127.0.0.1, port: 0}}
    https: {{address: 127.0.0.1, port: 0}}
    unixsocket: {{enable: false}}
trioCloudHub: {{dataDir: "{data_dir}", reconcileIntervalSeconds: 0.5}}
"""


def edge_node(name: str) -> dict[str, Any]:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {EDGE_LABEL: ""}},
    }


def pod(name: str, node: str, config_map: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "busybox"}],
            "volumes": [{"name": "v", "configMap": {"name": config_map}}],
        },
    }


def config_map(name: str, value: str) -> dict[str, Any]:
    return {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"v": value},
    }


def is_object(kind: str, name: str, operation: str | None = None) -> Any:
    def match(message: Message) -> bool:
        resource = message.resource.split("/")
        ok = len(resource) == 3 and resource[1] == kind and resource[2] == name
        return ok and (operation is None or message.operation == operation)

    return match


@asynccontextmanager
async def hub_on(kube: FakeKube, folder: Path) -> AsyncIterator[ServeInfo]:
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (test set-up)
    kubeconfig = kube.write_kubeconfig(folder / "kubeconfig")
    text = CONFIG.format(kubeconfig=kubeconfig, data_dir=folder / "data")
    (folder / "cloudcore.yaml").write_text(text)
    config = parse_config(text, "test.yaml")
    async with trio.open_nursery() as nursery:
        info: ServeInfo = await nursery.start(serve, config)
        yield info
        nursery.cancel_scope.cancel()


async def join(info: ServeInfo, node: str) -> EdgeIdentity:
    return await bootstrap("127.0.0.1", info.https_port, info.tokens.token, node)


async def test_one_hub_delivers_a_clusters_pods_and_writes_ack_points(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_fake_kube(bookmark_interval=0.2) as kube, hub_on(kube, tmp_path) as hub:
            assert kube.get("Secret", "kubeedge", "casecret") is not None
            assert kube.get("Secret", "kubeedge", "tokensecret") is not None
            command = ["token", "--config", str(tmp_path / "cloudcore.yaml")]
            printed = await trio.run_process(
                [sys.executable, "-m", "trio_cloudhub", *command], capture_stdout=True
            )
            assert printed.stdout.decode().strip() == hub.tokens.token
            kube.put(edge_node("e1"))
            kube.put(config_map("cm", "one"))
            kube.put(pod("web", "e1", "cm"))
            identity = await join(hub, "e1")
            async with open_sim_edge("127.0.0.1", hub.websocket_port, identity, "e1") as edge:
                node = await edge.expect(is_object("node", "e1", "update"), 10)
                assert node.content["kind"] == "Node"
                await edge.expect(is_object("pod", "web", "insert"), 10)
                first = await edge.expect(is_object("configmap", "cm", "insert"), 10)
                kube.put(config_map("cm", "two"))
                update = await edge.expect(is_object("configmap", "cm", "update"), 10)
                assert update.content["data"] == {"v": "two"}
                assert int(update.header.resource_version) > int(first.header.resource_version)
                uid = update.content["metadata"]["uid"]
                with trio.fail_after(10):
                    while True:
                        sync = kube.get("ObjectSync", "default", f"e1.{uid}")
                        status = (sync or {}).get("status", {})
                        if status.get("objectResourceVersion") == update.header.resource_version:
                            break
                        await trio.sleep(0.05)
            assert_granted_by_rbac(kube)


def assert_granted_by_rbac(kube: FakeKube) -> None:
    """Every request the hub made is allowed by conf/kube/rbac.yaml (ignoring names)."""
    granted: dict[str, set[str]] = {}
    for doc in documents("rbac.yaml"):
        for rule in doc.get("rules", []):
            for resource in rule["resources"]:
                granted.setdefault(resource, set()).update(rule["verbs"])
    missing = {
        (verb, resource)
        for verb, resource in kube.requests
        if verb not in granted.get(resource, set())
    }
    assert not missing, f"requests rbac.yaml does not grant: {sorted(missing)}"


async def test_a_node_moving_to_another_hub_gets_what_it_missed_and_nothing_it_acked(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with (
            open_fake_kube(bookmark_interval=0.2) as kube,
            hub_on(kube, tmp_path / "a") as hub_a,
            hub_on(kube, tmp_path / "b") as hub_b,
        ):
            # Both hubs share one CA through casecret, so one identity works on both.
            assert hub_a.credentials.ca_der == hub_b.credentials.ca_der
            kube.put(edge_node("e1"))
            kube.put(config_map("cm", "one"))
            kube.put(pod("web", "e1", "cm"))
            identity = await join(hub_a, "e1")
            async with open_sim_edge("127.0.0.1", hub_a.websocket_port, identity, "e1") as edge:
                await edge.expect(is_object("configmap", "cm", "insert"), 10)
                await edge.expect(is_object("pod", "web", "insert"), 10)
                await trio.sleep(0.5)  # ACKs written as ObjectSyncs
            # Hub A holds no session for e1 once it saw the disconnect: no queue either.
            with trio.fail_after(5):
                while "e1" in hub_a.hub.nodes:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            kube.put(config_map("cm", "two"))  # while e1 is connected nowhere
            await trio.sleep(0.3)
            assert "e1" not in hub_a.hub.nodes and "e1" not in hub_b.hub.nodes
            async with open_sim_edge("127.0.0.1", hub_b.websocket_port, identity, "e1") as edge:
                update = await edge.expect(is_object("configmap", "cm"), 10)
                assert update.content["data"] == {"v": "two"}
                await trio.sleep(1.5)  # several reconciliation rounds
                resources = [m.resource for m in edge.messages() if m.route.group == "resource"]
                assert resources == ["default/configmap/cm"], resources


async def test_the_hub_keeps_serving_while_the_api_server_is_away_and_catches_up(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with open_fake_kube(bookmark_interval=0.2) as kube, hub_on(kube, tmp_path) as hub:
            for node in ("e1", "e2"):
                kube.put(edge_node(node))
                kube.put(pod(f"web-{node}", node, "cm"))
            kube.put(config_map("cm", "one"))
            identity = await join(hub, "e1")
            async with open_sim_edge("127.0.0.1", hub.websocket_port, identity, "e1") as edge:
                await edge.expect(is_object("configmap", "cm", "insert"), 10)
                await kube.stop()
                kube.put(config_map("cm", "two"))  # reaches the hub only once it is back
                # Meanwhile another edge joins and gets its state from the hub's caches.
                other = await join(hub, "e2")
                async with open_sim_edge("127.0.0.1", hub.websocket_port, other, "e2") as e2:
                    await e2.expect(is_object("pod", "web-e2", "insert"), 10)
                    cm = await e2.expect(is_object("configmap", "cm", "insert"), 10)
                    assert cm.content["data"] == {"v": "one"}
                    assert edge.close_reason is None
                    await kube.start()
                    update = await edge.expect(is_object("configmap", "cm", "update"), 20)
                    assert update.content["data"] == {"v": "two"}
                    await e2.expect(is_object("configmap", "cm", "update"), 20)
                    cm_uid = cm.content["metadata"]["uid"]
                    # The ack points written while the API server was away are written now.
                    with trio.fail_after(20):
                        while kube.get("ObjectSync", "default", f"e2.{cm_uid}") is None:  # noqa: ASYNC110
                            await trio.sleep(0.1)


async def test_readyz_waits_for_the_cache_sync(tmp_path: Path) -> None:
    https_port, websocket_port = free_ports(2)
    with trio.fail_after(60):
        async with open_fake_kube(bookmark_interval=0.2) as kube:
            kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
            text = CONFIG.format(kubeconfig=kubeconfig, data_dir=tmp_path / "data")
            text = text.replace("port: 0}", "port: PORT}", 2)
            text = text.replace("PORT", str(websocket_port), 1).replace("PORT", str(https_port))
            kube.fail_next(503, times=1000, verb="list", resource="configmaps")
            async with trio.open_nursery() as nursery:
                config = parse_config(text, "t.yaml")
                nursery.start_soon(partial(serve, config, task_status=trio.TASK_STATUS_IGNORED))
                status = await poll_readyz(https_port, lambda status: status != 0)
                assert status == 503
                await trio.sleep(0.5)
                assert await poll_readyz(https_port, lambda status: True) == 503
                kube.clear_faults()
                assert await poll_readyz(https_port, lambda status: status == 200) == 200
                nursery.cancel_scope.cancel()


async def poll_readyz(port: int, done: Callable[[int], bool]) -> int:
    """/readyz's status (0: no answer yet) once `done` accepts it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    while True:
        try:
            status, _ = await https_get("127.0.0.1", port, "/readyz", context)
        except OSError:
            status = 0
        if done(status):
            return status
        await trio.sleep(0.05)


def api_server_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A CA and a 127.0.0.1 server certificate for the fake API server; the CA's file."""
    now = datetime.now(UTC)
    ca = certs.generate_ca(now)
    server = certs.generate_server_cert(ca, now, ["127.0.0.1"], [])
    (folder / "apiserver.crt").write_bytes(certs.cert_pem(server.cert_der))
    (folder / "apiserver.key").write_bytes(certs.key_pem(server.key_der))
    (folder / "apiserver-ca.crt").write_bytes(certs.cert_pem(ca.cert_der))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "apiserver.crt", folder / "apiserver.key")
    return context, folder / "apiserver-ca.crt"


async def test_over_https_the_edge_gets_the_api_servers_ca(tmp_path: Path) -> None:
    context, ca_file = api_server_tls(tmp_path)
    with trio.fail_after(60):
        async with open_fake_kube(ssl_context=context, bookmark_interval=0.2) as kube:
            kube.write_kubeconfig(tmp_path / "kubeconfig", ca_file=ca_file)
            text = CONFIG.format(kubeconfig=tmp_path / "kubeconfig", data_dir=tmp_path / "data")
            async with trio.open_nursery() as nursery:
                hub: ServeInfo = await nursery.start(serve, parse_config(text, "t.yaml"))
                kube.put(edge_node("e1"))
                identity = await join(hub, "e1")
                async with open_sim_edge("127.0.0.1", hub.websocket_port, identity, "e1") as edge:
                    await edge.expect(is_object("node", "e1"), 10)
                    query = new_message(
                        source="metaManager",
                        group="meta",
                        operation="query",
                        resource="k8s/ca.crt",
                        content=None,
                        now_ms=0,
                    )
                    await edge.send_message(query)
                    answer = await edge.expect(lambda m: m.resource == "k8s/ca.crt", 10)
                    assert answer.content == ca_file.read_text()
                    assert answer.header.parent_msg_id == query.header.msg_id
                nursery.cancel_scope.cancel()
