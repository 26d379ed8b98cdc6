"""`serve --workers 2`: the real supervisor and worker processes (a subprocess), edges over
mutual TLS on loopback, on the embedded store and on the Kubernetes store (the fake API
server in this process). The kernel picks each connection's worker (SO_REUSEPORT), so a
test that needs a node on the other worker connects again until it lands there, and reads
which worker served each session from the log (`worker=` on every line)."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from trio_cloudhub import cli_get
from trio_cloudhub.store.kube.store import EDGE_LABEL
from trio_cloudhub.testing.edge_sim import SimEdge, bootstrap, https_get, start_sim_edge
from trio_cloudhub.testing.edge_storage import V1_23, MetaStore
from trio_cloudhub.testing.edgecore import SimEdgeCore
from trio_cloudhub.testing.fake_kube import FakeKube, open_fake_kube
from trio_cloudhub.testing.hub_process import HOST, HubProcess

WORKERS = {"workers": 2, "reconcileIntervalSeconds": 0.5}
MARK = "workers/marker"


def config_map(name: str, marker: str) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "default", "annotations": {MARK: marker}}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"v": marker}}


def pod(name: str, node: str, config_map_name: str) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "default"}
    spec = {
        "nodeName": node,
        "containers": [{"name": "app", "image": "busybox:1.36"}],
        "volumes": [{"name": "cfg", "configMap": {"name": config_map_name}}],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def node_object(name: str) -> dict[str, Any]:
    metadata = {"name": name, "labels": {EDGE_LABEL: ""}}
    return {"apiVersion": "v1", "kind": "Node", "metadata": metadata}


def marker_of(storage: MetaStore, resource: str) -> str | None:
    value = storage.get(resource)
    if value is None:
        return None
    return str((value.get("metadata", {}).get("annotations") or {}).get(MARK))


def manifest_path(hub: HubProcess, obj: Mapping[str, Any]) -> Path:
    return hub.manifests / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_manifest(hub: HubProcess, obj: Mapping[str, Any]) -> None:
    path = manifest_path(hub, obj)
    temp = path.with_name("." + path.name)
    temp.write_text(yaml.safe_dump(dict(obj)))
    os.replace(temp, path)


def remove_manifest(hub: HubProcess, obj: Mapping[str, Any]) -> None:
    manifest_path(hub, obj).unlink()


def connected_workers(hub: HubProcess, node: str) -> list[str]:
    """The worker of each session of `node`, oldest first (this lifetime's log)."""
    pattern = re.compile(rf'msg="node {re.escape(node)} connected from .* worker=(\d+)')
    return [match.group(1) for match in pattern.finditer(hub.log_text(all_lifetimes=True))]


def worker_pids(hub: HubProcess) -> dict[str, int]:
    """worker index -> pid of its newest lifetime."""
    found: dict[str, int] = {}
    for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", hub.log_text()):
        found[index] = int(pid)
    return found


def supervisor_metrics_port(hub: HubProcess) -> int:
    match = re.search(r"serving: .*metrics port (\d+)", hub.log_text())
    assert match, hub.log_text()
    return int(match.group(1))


async def nodes(hub: HubProcess, store: str = "local") -> list[dict[str, Any]]:
    printed = await trio.to_thread.run_sync(
        partial(cli_get.get, "nodes", hub.data_dir, store_kind=store, admin_urls=(), output="json")
    )
    items: list[dict[str, Any]] = json.loads(printed)["items"]
    return items


async def http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def wait_for(condition: Any, within: float, what: str) -> None:
    with trio.move_on_after(within):
        while True:  # polled: another process
            if await condition():
                return
            await trio.sleep(0.05)
    raise TimeoutError(f"not {what} within {within} s")


async def readyz(hub: HubProcess) -> int:
    import ssl

    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    status, _ = await https_get(HOST, hub.https_port, "/readyz", insecure)
    return status


@asynccontextmanager
async def started(hub: HubProcess) -> AsyncIterator[HubProcess]:
    try:
        await hub.start()
        yield hub
    finally:
        await hub.aclose()


async def test_edges_spread_over_workers_the_hub_answers_as_one_restarts_and_drains(
    tmp_path: Path,
) -> None:
    count = 16
    names = [f"edge-{index}" for index in range(count)]
    with trio.fail_after(90):
        hub = HubProcess(tmp_path / "hub", trio_cloud_hub=WORKERS)
        write_manifest(hub, config_map("cfg", "v1"))
        for name in names:
            write_manifest(hub, pod(f"app-{name}", name, "cfg"))
        async with started(hub), trio.open_nursery() as nursery:
            identity = await bootstrap(HOST, hub.https_port, await hub.token(), "fleet")
            context = identity.client_ssl_context()
            cores = [SimEdgeCore(name, context, port=hub.websocket_port) for name in names]
            for core in cores:
                nursery.start_soon(core.run)
            for core in cores:
                await core.wait_connected()
                await core.wait_until(lambda db: marker_of(db, "default/configmap/cfg") == "v1")
            spread = {connected_workers(hub, name)[-1] for name in names}
            assert spread == {"0", "1"}, hub.log_text()

            # One change reaches every node, whichever worker serves it.
            write_manifest(hub, config_map("cfg", "v2"))
            for core in cores:
                await core.wait_until(lambda db: marker_of(db, "default/configmap/cfg") == "v2")

            # get nodes: every node once, connected, served by both worker processes.
            items = await nodes(hub)
            listed = [item["name"] for item in items if item["name"] in names]
            assert sorted(listed) == sorted(names)
            assert {item["status"] for item in items if item["name"] in names} == {"Connected"}
            pids = worker_pids(hub)
            assert {item["hub"] for item in items if item["name"] in names} == set(pids.values())
            assert await readyz(hub) == 200

            # Metrics: the supervisor's port answers every worker's series, labelled.
            status, text = await http_get(supervisor_metrics_port(hub), "/metrics")
            assert status == 200
            assert "trio_cloudhub_workers 2" in text
            for index in ("0", "1"):
                assert re.search(rf'\{{worker="{index}"[,}}]', text), text[:2000]

            # SIGKILL worker 1: restarted; its edges reconnect; the hub is whole again.
            os.kill(pids["1"], signal.SIGKILL)
            await hub.wait_for_log("worker 1 (pid", 10)
            await hub.wait_for_log("exited with status -9; restarting it", 10)

            async def restarted() -> bool:
                new = worker_pids(hub)["1"]
                return new != pids["1"] and f"worker 1 ready (pid {new})" in hub.log_text()

            await wait_for(restarted, 20, "worker 1 restarted")
            for core in cores:
                await core.wait_connected(within=20)

            async def whole() -> bool:
                items = await nodes(hub)
                return sum(item["status"] == "Connected" for item in items) == count

            await wait_for(whole, 20, "every node connected again")
            assert await readyz(hub) == 200
            write_manifest(hub, config_map("cfg", "v3"))
            for core in cores:
                await core.wait_until(lambda db: marker_of(db, "default/configmap/cfg") == "v3")

            # SIGTERM: every worker drains, the supervisor exits 0.
            assert await hub.terminate() == 0
            log = hub.log_text()
            assert "worker 0 stopped" in log and "worker 1 stopped" in log, log
            assert "hub shutting down" in log
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def cloud_of(store: str, root: Path) -> AsyncIterator[tuple[HubProcess, Any, Any]]:
    """A hub with two workers on `store`; how to put an object in its desired state, and
    how to remove one."""
    if store == "local":
        hub = HubProcess(root, trio_cloud_hub=WORKERS)
        yield hub, partial(write_manifest, hub), partial(remove_manifest, hub)
        return
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    async with open_fake_kube(bookmark_interval=0.2) as kube:
        kubeconfig = kube.write_kubeconfig(root / "kubeconfig")
        top = {"kubeAPIConfig": {"kubeConfig": str(kubeconfig), "qps": 1000, "burst": 1000}}
        hub = HubProcess(root, trio_cloud_hub=WORKERS, top=top)
        yield hub, partial(_kube_put, kube), partial(_kube_delete, kube)


def _kube_put(kube: FakeKube, obj: Mapping[str, Any]) -> None:
    kube.put(dict(obj))


def _kube_delete(kube: FakeKube, obj: Mapping[str, Any]) -> None:
    kube.delete(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])


@pytest.mark.parametrize("store", ["local", "kube"])
async def test_a_node_moving_between_workers_keeps_one_session_and_loses_nothing(
    tmp_path: Path, store: str
) -> None:
    """Two kinds of move, until each happened at least once to the other worker:

    - the node connects again while its session is still open: the new worker claims the
      node, the first one ends its session ("replaced by a new connection") and writes its
      ack points; a change made meanwhile reaches the edge, `get nodes` shows one session;
    - the node is away while objects the first worker delivered are deleted, and comes back
      on the other worker: only the ack points the first one wrote tell the second that the
      edge holds them (a stale in-memory copy would leave them on the edge forever).
    """
    node = "edge-move"
    with trio.fail_after(150):
        async with cloud_of(store, tmp_path / "hub") as (hub, put, remove), started(hub):
            put(node_object(node))
            put(config_map("cfg", "m0"))
            put(pod("app", node, "cfg"))
            identity = await bootstrap(HOST, hub.https_port, await hub.token(), node)
            context = identity.client_ssl_context()
            storage = MetaStore(V1_23)
            async with trio.open_nursery() as nursery:
                connect = partial(
                    start_sim_edge,
                    nursery,
                    HOST,
                    hub.websocket_port,
                    context,
                    node,
                    storage=storage,
                )
                edge: SimEdge = await connect()
                await wait_for_marker(storage, "m0")
                moves = {"while connected": 0, "while away": 0}
                for attempt in range(1, 41):
                    kind = "while connected" if attempt % 2 else "while away"
                    sessions = len(await wait_sessions(hub, node, 1))
                    before = connected_workers(hub, node)[-1]
                    extra = [
                        config_map(f"extra-{attempt}", "x"),
                        pod(f"x-{attempt}", node, f"extra-{attempt}"),
                    ]
                    for obj in extra:
                        put(obj)
                    await wait_holds(storage, extra)
                    if kind == "while connected":
                        put(config_map("cfg", f"m{attempt}"))  # a change while it moves
                        rival = await connect()  # the old session is still open
                        reason = await edge.wait_disconnected(10)
                        assert reason, "the old connection must end"
                        for obj in extra:
                            remove(obj)
                    else:
                        await edge.close_abruptly()
                        await edge.wait_disconnected(10)
                        await wait_disconnections(hub, node, sessions)
                        for obj in extra:
                            remove(obj)
                        put(config_map("cfg", f"m{attempt}"))
                        await trio.sleep(0.5)  # every worker took the change in
                        rival = await connect()
                    after = (await wait_sessions(hub, node, sessions + 1))[-1]
                    assert rival.connected, rival.close_reason
                    await wait_for_marker(storage, f"m{attempt}")
                    await wait_holds(storage, [], gone=extra)
                    served = [item for item in await nodes(hub, store) if item["name"] == node]
                    assert len(served) == 1 and served[0]["status"] == "Connected", served
                    edge = rival
                    if after != before:
                        moves[kind] += 1
                        if kind == "while connected":
                            assert "replaced by a new connection" in reason, reason
                    if min(moves.values()) >= 1:
                        break
                assert min(moves.values()) >= 1, f"moves {moves} in {attempt} reconnects"
                assert "did not release node" not in hub.log_text()
                nursery.cancel_scope.cancel()
            assert await hub.terminate() == 0


async def wait_for_marker(storage: MetaStore, marker: str) -> None:
    with trio.fail_after(20):
        while True:  # polled: fed by the edge's connection
            if marker_of(storage, "default/configmap/cfg") == marker:
                return
            await trio.sleep(0.02)


def resource_of(obj: Mapping[str, Any]) -> str:
    return f"default/{obj['kind'].lower()}/{obj['metadata']['name']}"


async def wait_holds(
    storage: MetaStore,
    present: list[dict[str, Any]],
    gone: Sequence[dict[str, Any]] = (),
) -> None:
    """Until the edge's database holds `present` and none of `gone`."""
    with trio.move_on_after(20):
        while True:  # polled: fed by the edge's connection
            held = [storage.get(resource_of(obj)) is not None for obj in present]
            left = [storage.get(resource_of(obj)) is not None for obj in gone]
            if all(held) and not any(left):
                return
            await trio.sleep(0.02)
    raise AssertionError(f"edge holds {storage.versions()}")


async def wait_disconnections(hub: HubProcess, node: str, count: int) -> None:
    pattern = f'msg="node {node} disconnected'
    with trio.fail_after(10):
        while True:  # polled: another process's log
            if hub.log_text(all_lifetimes=True).count(pattern) >= count:
                return
            await trio.sleep(0.02)


async def wait_sessions(hub: HubProcess, node: str, count: int) -> list[str]:
    """Until `count` sessions of `node` were logged; their workers."""
    with trio.fail_after(10):
        while True:  # polled: another process's log
            found = connected_workers(hub, node)
            if len(found) >= count:
                return found
            await trio.sleep(0.02)


async def test_the_node_limit_holds_for_the_hub_as_a_whole(tmp_path: Path) -> None:
    """nodeLimit 3 with two workers: three nodes get sessions however the kernel spreads
    them, the others are refused with the limit's reason and retry."""
    names = [f"edge-{index}" for index in range(5)]
    with trio.fail_after(60):
        hub = HubProcess(tmp_path / "hub", cloud_hub={"nodeLimit": 3}, trio_cloud_hub=WORKERS)
        async with started(hub), trio.open_nursery() as nursery:
            identity = await bootstrap(HOST, hub.https_port, await hub.token(), "fleet")
            context = identity.client_ssl_context()
            cores = [SimEdgeCore(name, context, port=hub.websocket_port) for name in names]
            for core in cores:
                nursery.start_soon(core.run)

            async def sessions() -> int:
                return sum(item["status"] == "Connected" for item in await nodes(hub))

            async def three_served_two_refused() -> bool:
                log = hub.log_text()
                refused = {name for name in names if f"refused node {name} from" in log}
                return await sessions() == 3 and len(refused) >= 2

            # The hub's sessions, not the edges' view: a refused edge is "connected" for
            # the moment between the WebSocket upgrade and the refusal's close frame.
            await wait_for(three_served_two_refused, 20, "3 served, 2 refused")
            assert "node limit: 3 nodes connected" in hub.log_text()
            for _ in range(5):  # the refused ones keep retrying meanwhile
                await trio.sleep(0.2)
                assert await sessions() == 3
            nursery.cancel_scope.cancel()


async def test_port_0_is_picked_once_for_every_worker(tmp_path: Path) -> None:
    with trio.fail_after(60):
        hub = HubProcess(tmp_path / "hub", trio_cloud_hub=WORKERS, ports=(0, 0))
        async with started(hub):
            log = hub.log_text()
            serving = re.search(r"serving: websocket port (\d+), https port (\d+)", log)
            assert serving, log
            for what, port in zip(
                ("WebSocket server", "HTTPS certificate service"), serving.groups(), strict=True
            ):
                bound = re.findall(rf"{what} listening on 127\.0\.0\.1:(\d+)", log)
                assert bound == [port, port], (what, bound)
            assert await hub.terminate() == 0
