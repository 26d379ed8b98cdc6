"""What the real `serve` logs: key=value lines, quiet at -v=2, every message at -v=4, and never
a token, a key or an object's content (secrets travel through the hub)."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from trio_cloudhub.testing.edge_sim import bootstrap, open_sim_edge

CONFIG = """\
modules:
  cloudHub:
    advertiseAddress: [127.0.0.1]
    websocket: {address: 127.0.0.1, port: 0}
    https: {address: 127.0.0.1, port: 0}
    unixsocket: {enable: false}
commonConfig: {monitorServer: {bindAddress: "127.0.0.1:0"}}
"""
SECRET_VALUE = "s3cr3t-password-never-logged"
MANIFESTS = f"""\
apiVersion: v1
kind: Secret
metadata: {{name: db, namespace: default}}
data: {{password: {base64.b64encode(SECRET_VALUE.encode()).decode()}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: app, namespace: default}}
spec:
  nodeName: edge-1
  containers: [{{name: app, image: busybox, envFrom: [{{secretRef: {{name: db}}}}]}}]
"""


async def run_hub_and_edge(tmp_path: Path, verbosity: str) -> tuple[str, list[str], str]:
    """The hub's log, the msg_ids the edge received, and the join token used."""
    (tmp_path / "cloudcore.yaml").write_text(CONFIG)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "app.yaml").write_text(MANIFESTS)
    command = [sys.executable, "-m", "trio_cloudhub", "serve", f"-v={verbosity}"]
    command += ["--config", str(tmp_path / "cloudcore.yaml"), "--data-dir", str(tmp_path / "d")]
    command += ["--manifests", str(manifests)]
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stderr is not None
    chunks: list[bytes] = []
    changed = trio.Event()

    async def read_all() -> None:
        nonlocal changed
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some():
            chunks.append(chunk)
            changed.set()
            changed = trio.Event()

    async def wait_for(marker: bytes) -> None:
        while marker not in b"".join(chunks):
            await changed.wait()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            with trio.fail_after(60):
                await wait_for(b"serving:")
                found = re.search(rb"websocket port (\d+), https port (\d+)", b"".join(chunks))
                assert found
                token_command = ["token", "--data-dir", str(tmp_path / "d")]
                token_run = await trio.run_process(
                    [sys.executable, "-m", "trio_cloudhub", *token_command], capture_stdout=True
                )
                token = token_run.stdout.decode().strip()
                identity = await bootstrap("127.0.0.1", int(found[2]), token, "edge-1")
                async with open_sim_edge(
                    "127.0.0.1", int(found[1]), identity, "edge-1", keepalive_interval=0.1
                ) as edge:
                    await edge.expect(lambda m: m.resource == "default/secret/db", 10)
                    await edge.expect(lambda m: m.resource == "default/pod/app", 10)
                    await trio.sleep(0.3)  # the ACKs, and the reader catches up
                    steady_from = len(b"".join(chunks))
                    await trio.sleep(1.5)  # steady state: keepalives only
                    steady = b"".join(chunks)[steady_from:].decode()
                    received = [m.header.msg_id for m in edge.messages()]
                process.send_signal(signal.SIGTERM)
                await wait_for(b"msg=stopped")
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    log = b"".join(chunks)
    return log.decode(), received, token + "\n" + steady


def assert_no_secrets(log: str, token: str) -> None:
    assert SECRET_VALUE not in log
    assert base64.b64encode(SECRET_VALUE.encode()).decode() not in log
    for part in token.split(".")[1:]:  # the JWT (the first part is the public CA hash)
        assert part not in log
    assert "PRIVATE KEY" not in log
    assert "Bearer" not in log


async def test_every_message_at_v4_and_no_secrets(tmp_path: Path) -> None:
    log, received, extra = await run_hub_and_edge(tmp_path, "4")
    token = extra.split("\n", 1)[0]
    lines = log.splitlines()
    assert all(line.startswith("time=") for line in lines), [
        line for line in lines if not line.startswith("time=")
    ][:3]
    for msg_id in received:
        assert f"msg_id={msg_id}" in log
    assert re.search(r'level=DEBUG .*msg="received keepalive node".* node=edge-1', log)
    assert_no_secrets(log, token)


async def test_v2_is_quiet_in_steady_state(tmp_path: Path) -> None:
    log, _, extra = await run_hub_and_edge(tmp_path, "2")
    token, steady = extra.split("\n", 1)
    assert steady.strip() == "", steady
    assert "level=DEBUG" not in log
    assert re.search(r'msg="node edge-1 connected from [^"]+" node=edge-1 transport=websocket', log)
    assert_no_secrets(log, token)
