"""End to end over QUIC: the real `serve` with the embedded store, IETF QUIC (aioquic) with
mutual TLS on loopback, a simulated edge: bootstrap, connect, receive, ACK, reconnect, move
between transports, and bad input that costs only the offending stream or connection."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from trio_cloudhub.config import parse_config
from trio_cloudhub.core.codec import decode, encode
from trio_cloudhub.core.message import Message, new_message, response_to
from trio_cloudhub.core.quic_codec import PACKER_HEADER_SIZE, USE_MESSAGE, pack
from trio_cloudhub.edge.quic import QuicHeaderRefused, open_quic_client
from trio_cloudhub.hub.server import ServeInfo, serve
from trio_cloudhub.testing.edge_sim import EdgeIdentity, bootstrap, keepalive_message, open_sim_edge
from trio_cloudhub.testing.quic_sim import open_sim_quic_edge

CONFIG = """\
commonConfig: {{monitorServer: {{bindAddress: "127.0.0.1:0"}}}}
modules:
  cloudHub:
    advertiseAddress: [127.0.0.1]
    websocket: {{address: 127.0.0.1, port: 0}}
    https: {{address: 127.0.0.1, port: 0}}
    quic: {{enable: true, address: 127.0.0.1, port: 0, maxIncomingStreams: 8}}
    unixsocket: {{enable: false}}
trioCloudHub: {{dataDir: "{data}", manifestsDir: "{manifests}", manifestsPollInterval: 0.05}}
"""
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  nodeName: edge-1
  containers: [{name: app, image: busybox, envFrom: [{configMapRef: {name: web-config}}]}]
"""
CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config, namespace: default}
data: {mode: "%s"}
"""


def is_object(kind: str, name: str, operation: str | None = None) -> object:
    def match(message: Message) -> bool:
        parts = message.resource.split("/")
        ok = len(parts) == 3 and parts[1] == kind and parts[2] == name
        return ok and (operation is None or message.operation == operation)

    return match


@asynccontextmanager
async def quic_hub(tmp_path: Path, unix_socket: Path | None = None) -> AsyncIterator[ServeInfo]:
    manifests = tmp_path / "manifests"
    manifests.mkdir(parents=True)
    (manifests / "config.yaml").write_text(CONFIG_MAP % "one")
    (manifests / "pod.yaml").write_text(POD)
    text = CONFIG.format(data=tmp_path / "data", manifests=manifests)
    if unix_socket is not None:
        address = f"{{enable: true, address: 'unix://{unix_socket}'}}"
        text = text.replace("unixsocket: {enable: false}", f"unixsocket: {address}")
    async with trio.open_nursery() as nursery:
        info: ServeInfo = await nursery.start(serve, parse_config(text, "quic.yaml"))
        yield info
        nursery.cancel_scope.cancel()


async def join(hub: ServeInfo, node: str = "edge-1") -> EdgeIdentity:
    return await bootstrap("127.0.0.1", hub.https_port, hub.tokens.token, node)


async def test_bootstrap_connect_receive_ack_reconnect_over_quic(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with quic_hub(tmp_path) as hub:
            assert hub.quic_port
            identity = await join(hub)
            async with open_sim_quic_edge("127.0.0.1", hub.quic_port, identity, "edge-1") as edge:
                pod = await edge.expect(is_object("pod", "web", "insert"), 10)
                config_map = await edge.expect(is_object("configmap", "web-config"), 10)
                assert pod.content["spec"]["nodeName"] == "edge-1"
                assert config_map.content["data"] == {"mode": "one"}
                assert pod.header.resource_version == ""  # not carried over QUIC (spec 4.2)
                await trio.sleep(0.5)  # ACKs recorded
            async with open_sim_quic_edge("127.0.0.1", hub.quic_port, identity, "edge-1") as again:
                await trio.sleep(1.0)
                resent = [m for m in again.messages() if m.route.group == "resource"]
                assert resent == []
                (Path(hub.manifests_dir) / "config.yaml").write_text(CONFIG_MAP % "two")
                update = await again.expect(is_object("configmap", "web-config", "update"), 10)
                assert update.content["data"] == {"mode": "two"}
                answer = await again.query_application("/core/v1/configmaps/default/web-config")
                assert answer.content["Status"] == "Approved"


async def test_a_node_moves_between_websocket_and_quic(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with quic_hub(tmp_path) as hub:
            identity = await join(hub)
            async with open_sim_edge("127.0.0.1", hub.websocket_port, identity, "edge-1") as ws:
                await ws.expect(is_object("pod", "web"), 10)
                await trio.sleep(0.5)
                # The same node over QUIC replaces the WebSocket session.
                async with open_sim_quic_edge(
                    "127.0.0.1", hub.quic_port, identity, "edge-1"
                ) as quic:
                    with trio.fail_after(5):
                        while ws.connected:  # noqa: ASYNC110
                            await trio.sleep(0.05)
                    assert ws.close_reason is not None
                    (Path(hub.manifests_dir) / "config.yaml").write_text(CONFIG_MAP % "three")
                    await quic.expect(is_object("configmap", "web-config", "update"), 10)
                    assert len(hub.hub.sessions) == 1


async def test_a_client_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with quic_hub(tmp_path) as hub, quic_hub(tmp_path / "other") as other:
            stranger = await join(other)  # issued by the other hub's CA
            trusting = EdgeIdentity(
                node_name="edge-1",
                ca_pem=(await join(hub)).ca_pem,
                cert_pem=stranger.cert_pem,
                key_pem=stranger.key_pem,
            )
            with pytest.raises(BaseException) as refused:
                async with open_quic_client(
                    "127.0.0.1",
                    hub.quic_port,
                    ca_pem=trusting.ca_pem,
                    cert_pem=trusting.cert_pem,
                    key_pem=trusting.key_pem,
                    node_id="edge-1",
                    project_id="p",
                    connect_timeout=3,
                ):
                    pass
            assert any(isinstance(leaf, QuicHeaderRefused) for leaf in leaves(refused.value))
            assert any("not signed by the hub CA" in str(leaf) for leaf in leaves(refused.value))
            assert "edge-1" not in hub.hub.sessions


async def test_bad_streams_cost_only_themselves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(60), caplog.at_level(logging.WARNING, "trio_cloudhub.edge.quic"):
        async with quic_hub(tmp_path) as hub:
            identity = await join(hub)
            async with open_quic_client(
                "127.0.0.1",
                hub.quic_port,
                ca_pem=identity.ca_pem,
                cert_pem=identity.cert_pem,
                key_pem=identity.key_pem,
                node_id="edge-1",
                project_id="p",
            ) as client:
                await client.send_raw(None, b"xyz" + b"rest")  # unknown use type
                over = b"\x01\x01\x01\x00\x01\x00" + (64 * 1024 * 1024).to_bytes(4, "big")
                await client.send_raw(None, USE_MESSAGE + over)  # length above the bound
                garbage = b"\xff" * 20
                framed = pack_raw(garbage)
                await client.send_raw(None, USE_MESSAGE + framed)  # protobuf garbage
                await client.send_raw(None, USE_MESSAGE + b"\x01\x01")  # truncated header
                await client.send_raw(None, b"")  # a stream opened and left silent
                await trio.sleep(0.5)
                # The connection and its session still work.
                await client.send(codec_text(keepalive_message()))
                await trio.sleep(0.3)
                assert not client.closed
                assert "edge-1" in hub.hub.sessions
        resets = [r.getMessage() for r in caplog.records if "reset" in r.getMessage()]
        assert len(resets) == 3, resets
        assert "unknown stream use type b'xyz'" in resets[0]
        assert "exceeds the bound" in resets[1]
        assert "not a protobuf" in resets[2]
        assert all(r.startswith("127.0.0.1:") for r in resets)


def pack_raw(payload: bytes) -> bytes:
    header = pack(keepalive_message())[: PACKER_HEADER_SIZE - 4]
    return header + len(payload).to_bytes(4, "big") + payload


def codec_text(message: Message) -> str:
    return encode(message)


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


async def test_a_csi_volume_request_over_the_unix_socket_reaches_a_quic_edge(
    tmp_path: Path,
) -> None:
    socket_path = tmp_path / "csi" / "kubeedge.sock"
    with trio.fail_after(60):
        async with quic_hub(tmp_path, unix_socket=socket_path) as hub:
            assert socket_path.is_socket()
            assert socket_path.stat().st_mode & 0o777 == 0o600
            identity = await join(hub)
            async with open_sim_quic_edge("127.0.0.1", hub.quic_port, identity, "edge-1") as edge:
                await edge.expect(is_object("pod", "web"), 10)
                request = new_message(
                    source="cloudhub",
                    group="resource",
                    operation="createvolume",
                    resource="node/edge-1/default/volume/vol-1",
                    content='{"name":"vol-1"}',
                    now_ms=0,
                )
                async with trio.open_nursery() as nursery:
                    answers: list[Message] = []
                    nursery.start_soon(ask_over_unix_socket, socket_path, request, answers)
                    asked = await edge.expect(lambda m: m.operation == "createvolume", 10)
                    await edge.send_message(
                        response_to(asked, {"volume": {"volume_id": "vol-1"}}, 0)
                    )
                [answer] = answers
                assert answer.route.operation == "response"
                assert answer.header.parent_msg_id == request.header.msg_id
                assert answer.content == {"volume": {"volume_id": "vol-1"}}
        assert not socket_path.exists()  # removed on exit


async def ask_over_unix_socket(path: Path, request: Message, answers: list[Message]) -> None:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(encode(request).encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    answers.append(decode(data))
