"""End to end: the real CLI on free ports, real TLS on loopback, a simulated EdgeCore.

The edge bootstraps exactly as spec section 14 describes (CA download checked against the
token, CSR with the token, WSS with the issued certificate and EdgeCore's headers), receives a
pod and its config map from manifests, ACKs, reconnects and is not re-sent what it acked.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.testing.edge_sim import bootstrap, open_sim_edge

NODE = "edge-1"
CONFIG = """\
apiVersion: cloudcore.config.kubeedge.io/v1alpha1
kind: CloudCore
commonConfig: {monitorServer: {bindAddress: "127.0.0.1:0"}}
modules:
  cloudHub:
    advertiseAddress: [127.0.0.1]
    websocket: {address: 127.0.0.1, port: 0}
    https: {address: 127.0.0.1, port: 0}
    unixsocket: {enable: false}
"""
POD = f"""\
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: default}}
spec:
  nodeName: {NODE}
  containers:
  - name: app
    image: busybox
    envFrom: [{{configMapRef: {{name: web-config}}}}]
"""
CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config, namespace: default}
data: {mode: "%s"}
"""


@attrs.frozen
class RunningHub:
    process: trio.Process
    websocket_port: int
    https_port: int
    data_dir: Path
    manifests: Path
    config: Path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trio_cloudhub", *args]


@asynccontextmanager
async def running_hub(tmp_path: Path, extra_config: str = "") -> AsyncIterator[RunningHub]:
    config = tmp_path / "cloudcore.yaml"
    config.write_text(CONFIG + extra_config)
    data_dir, manifests = tmp_path / "data", tmp_path / "manifests"
    manifests.mkdir()
    command = cli("serve", "--config", str(config), "--data-dir", str(data_dir))
    command += ["--manifests", str(manifests)]
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        assert process.stderr is not None
        log = b""
        with trio.fail_after(30):
            while b"serving:" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, f"hub exited early: {log.decode()}"
                log += chunk
        found = re.search(rb"websocket port (\d+), https port (\d+)", log)
        assert found, log
        yield RunningHub(process, int(found[1]), int(found[2]), data_dir, manifests, config)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def run_cli(*args: str) -> str:
    result = await trio.run_process(cli(*args), capture_stdout=True, capture_stderr=True)
    return str(result.stdout.decode())


def node_status_report() -> Message:
    status = {"conditions": [{"type": "Ready", "status": "True", "reason": "EdgeReady"}]}
    return new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=f"default/nodestatus/{NODE}",
        content={"UID": "node-uid", "Status": status, "ExtendResources": None},
        now_ms=0,
    )


def is_object(kind: str, name: str, operation: str | None = None) -> object:
    def match(message: Message) -> bool:
        resource = message.resource.split("/")
        ok = len(resource) == 3 and resource[1] == kind and resource[2] == name
        return ok and (operation is None or message.operation == operation)

    return match


async def test_bootstrap_connect_deliver_ack_reconnect(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with running_hub(tmp_path) as hub:
            token = (
                await run_cli("token", "--config", str(hub.config), "--data-dir", str(hub.data_dir))
            ).strip()
            assert len(token.split(".")) == 4
            identity = await bootstrap("127.0.0.1", hub.https_port, token, NODE)

            (hub.manifests / "config.yaml").write_text(CONFIG_MAP % "one")
            (hub.manifests / "pod.yaml").write_text(POD)
            async with open_sim_edge("127.0.0.1", hub.websocket_port, identity, NODE) as edge:
                pod = await edge.expect(is_object("pod", "web", "insert"), 15)
                config_map = await edge.expect(is_object("configmap", "web-config", "insert"), 15)
                assert pod.content["spec"]["nodeName"] == NODE
                assert config_map.content["data"] == {"mode": "one"}
                assert pod.header.resource_version and config_map.header.resource_version
                # The ACKs are sent by the simulator as EdgeCore would; wait until recorded.
                await trio.sleep(1.0)

            async with open_sim_edge("127.0.0.1", hub.websocket_port, identity, NODE) as again:
                await trio.sleep(3.0)
                resent = [m for m in again.messages() if m.route.group == "resource"]
                assert resent == [], f"re-sent after ACK: {[m.resource for m in resent]}"
                (hub.manifests / "config.yaml").write_text(CONFIG_MAP % "two")
                update = await again.expect(is_object("configmap", "web-config", "update"), 15)
                assert update.content["data"] == {"mode": "two"}
                assert int(update.header.resource_version) > int(config_map.header.resource_version)

                answer = await again.query_application("/core/v1/configmaps/default/web-config")
                assert answer.content["Status"] == "Approved"
                body = json.loads(base64.b64decode(answer.content["RespBody"]))
                assert body["data"] == {"mode": "two"}

                await again.send_message(node_status_report())
                await again.expect(lambda m: m.content == "OK" and "nodestatus" in m.resource, 10)

            table = await run_cli("get", "nodes", "-o", "wide", "--data-dir", str(hub.data_dir))
            row = re.search(rf"^{NODE}\s+Disconnected\s.*\sReady\s", table, re.MULTILINE)
            assert row, table

            hub.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await hub.process.wait() == 0


async def test_token_command_without_a_ca_fails_clearly(tmp_path: Path) -> None:
    result = await trio.run_process(
        cli("token", "--data-dir", str(tmp_path / "empty")),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode != 0
    assert b"trio-cloudhub:" in result.stderr


async def test_bad_config_file_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("modules:\n  cloudHub:\n    keepaliveInterval: soon\n")
    result = await trio.run_process(
        cli("serve", "--config", str(config), "--data-dir", str(tmp_path)),
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"$.modules.cloudHub.keepaliveInterval" in result.stderr
    assert str(config).encode() in result.stderr


@pytest.mark.parametrize("what", ["nodes", "pods"])
async def test_get_without_a_running_hub_says_so(tmp_path: Path, what: str) -> None:
    result = await trio.run_process(
        cli("get", what, "--data-dir", str(tmp_path)),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1 and result.stdout == b""
    assert b"no hub is running with data directory " + str(tmp_path).encode() in result.stderr


async def test_an_unusable_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "kube.yaml"
    config.write_text("kubeAPIConfig: {kubeConfig: /nowhere/kubeconfig}\n")
    result = await trio.run_process(
        cli("serve", "--config", str(config), "--data-dir", str(tmp_path)),
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert b"trio-cloudhub: " in result.stderr
    assert b"kube" in result.stderr.lower()
    assert b"Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def plain_get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: hub\r\n\r\n".encode())
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
        return answer


async def test_serve_answers_probes_on_the_plain_probe_address(tmp_path: Path) -> None:
    """`trioCloudHub.probeBindAddress`: /readyz and /livez over plain HTTP, from `serve`."""
    port = free_port()
    extra = f'trioCloudHub: {{probeBindAddress: "127.0.0.1:{port}"}}\n'
    with trio.fail_after(60):
        async with running_hub(tmp_path, extra) as hub:
            while not (await plain_get(port, "/readyz")).startswith(b"HTTP/1.1 200"):  # noqa: ASYNC110
                await trio.sleep(0.1)
            assert (await plain_get(port, "/livez")).startswith(b"HTTP/1.1 200")
            assert (await plain_get(port, "/ca.crt")).startswith(b"HTTP/1.1 404")
            hub.process.send_signal(signal.SIGTERM)
