"""`trio-cloudhub get nodes|pods` against running hubs: the real `serve` (a subprocess, or
in-process for the Kubernetes store), edges over WebSocket and QUIC with mutual TLS, the
command line as a subprocess reading the hub's admin endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from trio_cloudhub import cli_get
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.testing.edge_sim import bootstrap, open_sim_edge
from trio_cloudhub.testing.harness import edge_node, open_cloudhub, open_cloudhub_kube
from trio_cloudhub.testing.hub_process import HOST, HubProcess, hub_process
from trio_cloudhub.testing.quic_sim import open_sim_quic_edge

QUIC = {"quic": {"enable": True, "address": HOST, "port": 0}}
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  nodeName: edge-1
  containers: [{name: app, image: busybox}]
"""
NODE_3 = "apiVersion: v1\nkind: Node\nmetadata: {name: edge-3}\n"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trio_cloudhub", *args]


async def get(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = await trio.run_process(
        cli("get", *args), capture_stdout=True, capture_stderr=True, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


async def get_json(*args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((await get(*args, "-o", "json")).stdout)
    return doc


async def shown(
    what: str, data_dir: Path, output: str | None = None, *, urls: tuple[str, ...] = ()
) -> str:
    """What `get` prints, computed in this process (the command's code without its start-up:
    each `python -m trio_cloudhub` costs a second of imports)."""
    return await trio.to_thread.run_sync(
        partial(cli_get.get, what, data_dir, store_kind="local", admin_urls=urls, output=output)
    )


async def shown_json(what: str, data_dir: Path, *, urls: tuple[str, ...] = ()) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(await shown(what, data_dir, "json", urls=urls))
    return doc


def rows(table: str) -> dict[str, list[str]]:
    """A kubectl-style table by its first column; the header under "HEADER"."""
    lines = table.splitlines()
    found = {"HEADER": lines[0].split()}
    for line in lines[1:]:
        cells = line.split()
        found[cells[0]] = cells
    return found


def column(table: str, name: str, row: str) -> str:
    parsed = rows(table)
    return parsed[row][parsed["HEADER"].index(name)]


def status_report(node: str) -> Message:
    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    return new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=f"default/nodestatus/{node}",
        content={"UID": "u", "Status": ready, "ExtendResources": None},
        now_ms=0,
    )


def pod_report(name: str) -> Message:
    running = {"phase": "Running", "containerStatuses": [{"name": "app", "ready": True}]}
    return new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=f"default/podstatus/{name}",
        content={"UID": "p", "Name": name, "Status": running},
        now_ms=0,
    )


def quic_port(hub: HubProcess) -> int:
    match = re.search(r"quic port (\d+) \(udp\)", hub.log_text())
    assert match, hub.log_text()
    return int(match.group(1))


async def test_get_nodes_shows_sessions_transports_queues_and_keepalives(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with hub_process(tmp_path, cloud_hub=QUIC) as hub:
            (hub.manifests / "pod.yaml").write_text(POD)
            (hub.manifests / "node3.yaml").write_text(NODE_3)
            data = ["--data-dir", str(hub.data_dir)]
            token = await hub.token()
            one = await bootstrap(HOST, hub.https_port, token, "edge-1")
            two = await bootstrap(HOST, hub.https_port, token, "edge-2")
            port = hub.websocket_port
            async with (
                open_sim_edge(HOST, port, one, "edge-1", keepalive_interval=0.5) as edge,
                open_sim_quic_edge(HOST, quic_port(hub), two, "edge-2") as over_quic,
            ):
                await edge.wait_holds("default/pod/web")
                await edge.send_message(status_report("edge-1"))
                await edge.send_message(pod_report("web"))
                await edge.expect(lambda m: m.content == "OK" and "podstatus" in m.resource)
                async with open_sim_edge(HOST, port, two, "edge-4"):
                    pass  # the hub holds the session from the handshake on
                await trio.sleep(1.2)  # edge-1 keeps alive; edge-4's end is recorded

                table = (await get("nodes", *data)).stdout.decode()
                assert rows(table)["HEADER"] == [
                    "NAME",
                    "STATUS",
                    "SINCE",
                    "TRANSPORT",
                    "REMOTE",
                    "WAITING",
                    "LAST-ACK",
                    "LAST-KEEPALIVE",
                ]
                assert set(rows(table)) == {"HEADER", "edge-1", "edge-2", "edge-3", "edge-4"}
                assert column(table, "STATUS", "edge-1") == "Connected"
                assert column(table, "TRANSPORT", "edge-1") == "websocket"
                assert re.fullmatch(r"\d+s", column(table, "SINCE", "edge-1")), table
                assert column(table, "TRANSPORT", "edge-2") == "quic"
                assert column(table, "STATUS", "edge-3") == "NeverConnected"
                assert column(table, "SINCE", "edge-3") == "<none>"
                assert column(table, "WAITING", "edge-3") == "1"  # its Node, waiting for it
                assert column(table, "STATUS", "edge-4") == "Disconnected"
                assert re.fullmatch(r"[01]s", column(table, "LAST-KEEPALIVE", "edge-1")), table
                assert re.fullmatch(r"\d+s", column(table, "LAST-ACK", "edge-1")), table
                assert column(table, "REMOTE", "edge-1").startswith("127.0.0.1:")

                wide = await shown("nodes", hub.data_dir, "wide")
                assert column(wide, "READY", "edge-1") == "Ready"
                assert column(wide, "BEHIND", "edge-1") == "0"
                assert column(wide, "BEHIND", "edge-3") == "1"

                doc = await shown_json("nodes", hub.data_dir)
                assert doc["kind"] == "NodeList" and len(doc["hubs"]) == 1
                assert hub.process is not None and doc["hubs"][0]["pid"] == hub.process.pid
                items = {item["name"]: item for item in doc["items"]}
                assert items["edge-2"]["transport"] == "quic"
                assert items["edge-2"]["remote"].startswith("127.0.0.1:")
                assert items["edge-1"]["lastAck"] and items["edge-1"]["ready"] == "Ready"
                assert items["edge-3"]["desired"] and items["edge-3"]["since"] is None
                assert items["edge-4"]["lastDisconnect"]["reason"]
                listed = yaml.safe_load(await shown("nodes", hub.data_dir, "yaml"))
                assert [item["name"] for item in listed["items"]] == sorted(items)

                pods = await shown("pods", hub.data_dir)
                assert rows(pods)["HEADER"] == ["NAMESPACE", "NAME", "NODE", "STATUS", "REPORTED"]
                assert rows(pods)["default"][1:5] == ["web", "edge-1", "Running", "(1/1"]
                assert over_quic.connected


async def test_records_outlive_the_hub_and_a_stopped_hub_is_named(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with hub_process(tmp_path) as hub:
            data = ["--data-dir", str(hub.data_dir)]
            identity = await bootstrap(HOST, hub.https_port, await hub.token(), "edge-1")
            async with open_sim_edge(HOST, hub.websocket_port, identity, "edge-1") as edge:
                await edge.send_message(pod_report("web"))
                await edge.expect(lambda m: m.content == "OK" and "podstatus" in m.resource)
                first = {
                    item["name"]: item
                    for item in (await shown_json("nodes", hub.data_dir))["items"]
                }
            assert await hub.terminate() == 0
            assert list((hub.data_dir / "run").glob("admin-*.json")) == []

            stopped = await get("nodes", *data, check=False)
            assert stopped.returncode == 1 and stopped.stdout == b""
            assert b"no hub is running with data directory" in stopped.stderr
            pods = await get("pods", *data)  # the embedded store's reports are in its database
            assert b"showing the pod reports stored in the database" in pods.stderr
            assert column(pods.stdout.decode(), "NAME", "default") == "web"

            dead = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
            await dead.wait()
            left_over = hub.data_dir / "run" / f"admin-{dead.pid}-9.json"  # as after SIGKILL
            left_over.write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": dead.pid}))
            await hub.start()
            assert not left_over.exists()  # a starting hub removes what dead hubs left
            after = {
                item["name"]: item for item in (await shown_json("nodes", hub.data_dir))["items"]
            }
            assert after["edge-1"]["status"] == "Disconnected"
            assert after["edge-1"]["firstConnected"] == first["edge-1"]["firstConnected"]
            assert after["edge-1"]["since"] == after["edge-1"]["lastDisconnect"]["at"]
            assert after["edge-1"]["joined"] == first["edge-1"]["joined"]


async def test_a_wrong_data_dir_and_a_dead_hubs_announcement_are_clear(tmp_path: Path) -> None:
    with trio.fail_after(30):
        with pytest.raises(cli_get.HubNotReachable, match="nowhere does not exist: pass the hub"):
            await shown("nodes", tmp_path / "nowhere")
        with pytest.raises(cli_get.HubNotReachable, match="is it the right --data-dir"):
            await shown("nodes", tmp_path)
        dead = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
        await dead.wait()
        run = tmp_path / "run"
        run.mkdir()
        (run / f"admin-{dead.pid}-9.json").write_text(
            json.dumps({"url": "http://127.0.0.1:9", "pid": dead.pid})
        )
        stale = await get("nodes", "--data-dir", str(tmp_path), check=False)
        assert stale.returncode == 1 and stale.stdout == b""
        assert f"stopped without cleaning up: pid {dead.pid}".encode() in stale.stderr


async def test_several_hubs_are_merged_by_discovery_and_by_admin_urls(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with (
            open_cloudhub(tmp_path / "a") as a,
            open_cloudhub(tmp_path / "b") as b,
        ):
            first = await a.edge("edge-1")
            await a.edge("edge-2")
            await first.close_abruptly()
            await first.wait_disconnected()
            await b.edge("edge-1", transport="quic")  # the node moved to the other hub
            # Both processes' files in one data directory, as `serve --workers N` would.
            for path in (a.data_dir / "run").glob("admin-*.json"):
                (b.data_dir / "run" / path.name).write_text(path.read_text())
            # A live process whose endpoint does not answer (say, a worker that is ending).
            silent = b.data_dir / "run" / f"admin-{os.getpid()}-1.json"
            silent.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": os.getpid()}))
            result = await get("nodes", "-o", "json", "--data-dir", str(b.data_dir))
            assert b"warning: left out: cannot reach http://127.0.0.1:1" in result.stderr
            doc = json.loads(result.stdout)
            assert len(doc["hubs"]) == 2
            items = {item["name"]: item for item in doc["items"]}
            assert items["edge-1"]["status"] == "Connected"
            assert items["edge-1"]["transport"] == "quic"
            assert items["edge-2"]["status"] == "Connected"
            urls = (a.metrics_url, b.metrics_url)
            assert (await shown_json("nodes", tmp_path, urls=urls))["items"] == doc["items"]


async def test_get_nodes_and_pods_on_the_kubernetes_store(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cloudhub_kube(tmp_path) as hub:
            not_ready = {"conditions": [{"type": "Ready", "status": "False"}]}
            hub.kube.put(edge_node("far") | {"status": not_ready})
            hub.kube.put({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "cloud-vm"}})
            edge = await hub.edge("edge-1")
            await hub.apply(
                {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "metadata": {"name": "web", "namespace": "default"},
                    "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "i"}]},
                    "status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )
            await edge.wait_holds("default/pod/web")
            data = ["--data-dir", str(hub.data_dir)]
            wide = (await get("nodes", "-o", "wide", *data)).stdout.decode()  # the command
            assert set(rows(wide)) == {"HEADER", "edge-1", "far"}  # edge nodes only
            assert column(wide, "STATUS", "edge-1") == "Connected"
            assert column(wide, "STATUS", "far") == "NeverConnected"
            assert column(wide, "READY", "far") == "NotReady"
            pods = await shown("pods", hub.data_dir)
            assert rows(pods)["default"][1:4] == ["web", "edge-1", "Running"]
