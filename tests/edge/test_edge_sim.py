"""The edge simulator against our WSS server and a tiny fake certificate service."""

from __future__ import annotations

import datetime
import hashlib
import json
import ssl
from functools import partial

import h11
import pytest
import trio
from certs import KeyPair, Pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from trio_cloudhub.core.codec import decode, encode
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.edge.websocket import serve_websocket
from trio_cloudhub.testing.edge_sim import (
    SHUTDOWN_FRAME,
    BootstrapError,
    bootstrap,
    open_fleet,
    open_sim_edge,
)

TOKEN_TAIL = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjk5OTk5OTk5OTl9.c2ln"


class RecordingHub:
    """Records what edges send; tests push cloud messages through `connections`."""

    def __init__(self) -> None:
        self.connections: dict[str, EdgeConnection] = {}
        self.frames: dict[str, list[Message]] = {}
        self.changed = trio.Event()

    async def __call__(self, connection: EdgeConnection) -> None:
        self.connections[connection.node_id] = connection
        frames = self.frames.setdefault(connection.node_id, [])
        self._wake()
        try:
            while True:
                frames.append(decode(await connection.receive()))
                self._wake()
        except EdgeDisconnected:
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, node: str, count: int) -> list[Message]:
        while len(self.frames.get(node, [])) < count:
            await self.changed.wait()
        return self.frames[node]


async def start_hub(nursery: trio.Nursery, pki: Pki, hub: RecordingHub) -> int:
    serve = partial(
        serve_websocket,
        hub,
        ssl_context=pki.server_context(),
        host="127.0.0.1",
        port=0,
        max_message_size=1 << 24,
    )
    port: int = await nursery.start(serve)
    return port


def cloud_message(operation: str, resource: str, source: str = "edgecontroller") -> Message:
    return new_message(
        source=source,
        group="resource",
        operation=operation,
        resource=resource,
        content={"kind": "Pod"},
        now_ms=1,
        resource_version="7",
    )


async def test_sim_edge_keepalive_ack_and_shutdown(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        hub = RecordingHub()
        port = await start_hub(nursery, pki, hub)
        async with open_sim_edge(
            "127.0.0.1", port, pki.client_context(), "edge-1", "proj", keepalive_interval=0.2
        ) as edge:
            (first,) = await hub.wait("edge-1", 1)
            assert (first.route.source, first.route.operation, first.content) == (
                "websocket",
                "keepalive",
                "ping",
            )
            connection = hub.connections["edge-1"]
            assert connection.project_id == "proj"
            insert = cloud_message("insert", "default/pod/p")
            other_update = cloud_message("update", "default/pod/p", source="router")
            await connection.send(encode(other_update))  # EdgeCore does not ACK this one
            await connection.send(encode(insert))
            await edge.expect(lambda m: m.msg_id == insert.msg_id)
            frames = await hub.wait("edge-1", 3)  # the ACK, and a keepalive after 0.2 s
            acks = [m for m in frames if m.route.operation == "response"]
            assert len(acks) == 1
            assert acks[0].header.parent_msg_id == insert.msg_id
            assert acks[0].content == "OK"
            assert (acks[0].route.source, acks[0].route.resource) == (
                "edgecontroller",
                "default/pod/p",
            )
            assert [m.msg_id for m in edge.messages()] == [other_update.msg_id, insert.msg_id]
            await edge.send_shutdown()
            while not any(m.is_empty() for m in frames):
                await hub.wait("edge-1", len(frames) + 1)
        assert (
            SHUTDOWN_FRAME == '{"header":{"msg_id":"","timestamp":0},"route":{},"content":null}\n'
        )


async def test_sim_edge_query_application_and_abrupt_close(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        hub = RecordingHub()
        port = await start_hub(nursery, pki, hub)
        async with open_sim_edge("127.0.0.1", port, pki.client_context(), "edge-1") as edge:
            await hub.wait("edge-1", 1)

            async def answer() -> None:
                request = (await hub.wait("edge-1", 2))[1]
                assert request.route.source == "metaserver"
                assert request.content["Key"] == "/core/v1/configmaps/default/c"
                reply = new_message(
                    source="dynamiccontroller",
                    group="resource",
                    operation="applicationResponse",
                    resource="ignore/Application/ignore",
                    content={**request.content, "Status": "Approved"},
                    now_ms=1,
                    parent_msg_id=request.msg_id,
                )
                await hub.connections["edge-1"].send(encode(reply))

            nursery.start_soon(answer)
            response = await edge.query_application("/core/v1/configmaps/default/c", "get")
            assert response.content["Status"] == "Approved"
            await edge.close_abruptly()
            assert "aborted" in await edge.wait_disconnected()


async def test_undecodable_frame_makes_the_edge_hang_up(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        hub = RecordingHub()
        port = await start_hub(nursery, pki, hub)
        async with open_sim_edge("127.0.0.1", port, pki.client_context(), "edge-1") as edge:
            await hub.wait("edge-1", 1)
            await hub.connections["edge-1"].send("not json")
            assert "undecodable" in await edge.wait_disconnected()


async def test_fleet_connects_with_bounded_concurrency(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(20):
        hub = RecordingHub()
        port = await start_hub(nursery, pki, hub)
        async with open_fleet(
            "127.0.0.1", port, pki.client_context(), 20, prefix="n-", concurrency=5
        ) as fleet:
            assert len(fleet.edges) == 20 and not fleet.failures
            message = cloud_message("update", "null/node/x")
            for node in [f"n-{index}" for index in range(20)]:
                await hub.wait(node, 1)
                await hub.connections[node].send(encode(message))
            await fleet.wait_all(lambda m: m.msg_id == message.msg_id, 10)
            for node in hub.frames:
                await hub.wait(node, 2)  # keepalive + ACK


# --- bootstrap against a fake certificate service -----------------------------------------------


async def fake_cert_service(
    stream: trio.SocketStream, pki: Pki, server_context: ssl.SSLContext, seen: list[h11.Request]
) -> None:
    tls = trio.SSLStream(stream, server_context, server_side=True)
    connection = h11.Connection(h11.SERVER)
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await tls.receive_some()))
        elif isinstance(event, h11.Request):
            seen.append(event)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    status, answer = answer_request(seen[-1], body, pki)
    response = h11.Response(status_code=status, headers=[("Content-Length", str(len(answer)))])
    await tls.send_all(connection.send(response) + connection.send(h11.Data(data=answer)))
    await tls.send_all(connection.send(h11.EndOfMessage()))
    await tls.aclose()


def answer_request(request: h11.Request, body: bytes, pki: Pki) -> tuple[int, bytes]:
    if request.target == b"/ca.crt":
        return 200, pki.ca.cert.public_bytes(serialization.Encoding.DER)
    headers = dict(request.headers)
    if headers.get(b"authorization") != b"Bearer " + TOKEN_TAIL.encode():
        return 401, b"token validation failure"
    csr = x509.load_der_x509_csr(body)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(pki.ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())
    )
    return 200, cert.public_bytes(serialization.Encoding.DER)


def token_for(ca: KeyPair, tail: str = TOKEN_TAIL) -> str:
    digest = hashlib.sha256(ca.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return f"{digest}.{tail}"


async def start_cert_service(nursery: trio.Nursery, pki: Pki, seen: list[h11.Request]) -> int:
    context = pki.server_context()  # its certificate chain; client certificates not asked
    context.verify_mode = ssl.CERT_NONE
    handler = partial(fake_cert_service, pki=pki, server_context=context, seen=seen)
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.mark.parametrize("legacy", [False, True])
async def test_bootstrap_then_connect(nursery: trio.Nursery, pki: Pki, legacy: bool) -> None:
    with trio.fail_after(10):
        seen: list[h11.Request] = []
        https_port = await start_cert_service(nursery, pki, seen)
        identity = await bootstrap(
            "127.0.0.1", https_port, token_for(pki.ca), "edge-7", legacy_v110=legacy
        )
        cert = x509.load_pem_x509_certificate(identity.cert_pem)
        expected = (
            "CN=kubeedge.io,O=kubeEdge,L=Hangzhou,ST=Zhejiang,C=CN"
            if legacy
            else "CN=system:node:edge-7,O=system:nodes,L=Hangzhou,ST=Zhejiang,C=CN"
        )
        assert cert.subject.rfc4514_string() == expected
        edge_request = dict(seen[1].headers)
        assert (seen[1].method, seen[1].target) == (b"GET", b"/edge.crt")
        assert edge_request[b"nodename"] == b"edge-7"
        hub = RecordingHub()
        port = await start_hub(nursery, pki, hub)
        async with open_sim_edge("127.0.0.1", port, identity, "edge-7"):
            (keepalive,) = await hub.wait("edge-7", 1)
            assert json.loads(encode(keepalive))["content"] == "ping"


@pytest.mark.parametrize(
    ("token", "error"),
    [
        ("a.b.c", "4 dot-separated parts"),
        ("0" * 64 + "." + TOKEN_TAIL, "does not match"),
        (None, "401: token validation failure"),
    ],
)
async def test_bootstrap_errors(
    nursery: trio.Nursery, pki: Pki, token: str | None, error: str
) -> None:
    with trio.fail_after(10):
        https_port = await start_cert_service(nursery, pki, [])
        if token is None:
            token = token_for(pki.ca, "x.y.z")
        with pytest.raises(BootstrapError, match=error):
            await bootstrap("127.0.0.1", https_port, token, "edge-7")
