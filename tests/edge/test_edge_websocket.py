"""The WSS transport against real TLS on loopback: handshake rules, framing, sizes, closes."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from functools import partial

import attrs
import pytest
import trio
from certs import Pki, client_context, issue_client_cert, make_ca
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Ping, TextMessage

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.edge.websocket import (
    HandshakeRejected,
    WebSocketConnection,
    _server_text_frame,
    connect_websocket,
    serve_websocket,
)

MiB = 1024 * 1024
EDGE_HEADERS = [("Node_id", "edge-1"), ("Project_id", "proj-1"), ("Connectionuse", "msg")]


@attrs.define
class EchoRecorder:
    """Echoes every message back as text; remembers connections and how they ended."""

    connections: list[EdgeConnection] = attrs.field(factory=list)
    received: list[str | bytes] = attrs.field(factory=list)
    endings: list[BaseException] = attrs.field(factory=list)
    ended: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, connection: EdgeConnection) -> None:
        self.connections.append(connection)
        try:
            while True:
                message = await connection.receive()
                self.received.append(message)
                text = message if isinstance(message, str) else message.decode()
                await connection.send(text)
        except EdgeDisconnected as exc:
            self.endings.append(exc)
            self.ended.set()
            raise


async def start_server(
    nursery: trio.Nursery,
    pki: Pki,
    handler: EchoRecorder,
    *,
    max_message_size: int = 64 * MiB,
    handshake_timeout: float = 5.0,
) -> int:
    serve = partial(
        serve_websocket,
        handler,
        ssl_context=pki.server_context(),
        host="127.0.0.1",
        port=0,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
    )
    port: int = await nursery.start(serve)
    return port


async def dial(
    port: int,
    context: ssl.SSLContext,
    *,
    path: str = f"/{DEFAULT_PROJECT_ID}/edge-1/events",
    headers: Sequence[tuple[str, str]] = EDGE_HEADERS,
) -> WebSocketConnection:
    return await connect_websocket(
        "127.0.0.1", port, ssl_context=context, path=path, headers=headers
    )


async def raw_exchange(port: int, pki: Pki, request: bytes) -> bytes:
    """Send bytes over TLS with the edge's certificate and read until the server closes."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, pki.client_context(), server_hostname="127.0.0.1")
    await stream.send_all(request)
    answer = b""
    while b"\r\n\r\n" not in answer or answer.startswith(b"HTTP/1.1 4"):
        try:
            data = await stream.receive_some()
        except trio.BrokenResourceError:
            break
        if not data:
            break
        answer += data
    await trio.aclose_forcefully(stream)
    return answer


def upgrade_request(
    method: str = "GET", extra: str = "Node_id: edge-1\r\n", upgrade: bool = True
) -> bytes:
    lines = f"{method} /{DEFAULT_PROJECT_ID}/edge-1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if upgrade:
        lines += (
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )
    return (lines + extra + "\r\n").encode()


async def test_echo_and_identity(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context())
        await client.send('{"a":1}\n')
        assert await client.receive() == '{"a":1}\n'
        (connection,) = recorder.connections
        assert (connection.node_id, connection.project_id) == ("edge-1", "proj-1")
        assert connection.remote.startswith("127.0.0.1:")
        await client.aclose()
        await recorder.ended.wait()


@pytest.mark.parametrize("client_cert", ["none", "other-ca"])
async def test_tls_without_valid_client_cert_fails(
    nursery: trio.Nursery, pki: Pki, client_cert: str
) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        if client_cert == "none":
            context = client_context(pki.ca, None)
        else:
            context = client_context(pki.ca, issue_client_cert(make_ca("Other"), "edge-1"))
        with pytest.raises(HandshakeRejected, match="TLS"):
            await dial(port, context)
        # The server survived and still serves good clients.
        client = await dial(port, pki.client_context())
        await client.send("x")
        assert await client.receive() == "x"
        assert len(recorder.connections) == 1
        await client.aclose()


@pytest.mark.parametrize("path", ["/", "/x", f"/{DEFAULT_PROJECT_ID}/edge-1/events", "/a/b?c=d"])
async def test_any_path_is_accepted(nursery: trio.Nursery, pki: Pki, path: str) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context(), path=path)
        await client.send("hi")
        assert await client.receive() == "hi"
        await client.aclose()


@pytest.mark.parametrize(
    "headers",
    [
        [("node_id", "n1"), ("project_id", "p1")],
        [("NODE_ID", "n1"), ("PROJECT_ID", "p1")],
        [("Node_id", "n1"), ("Project_id", "p1"), ("Connectionuse", "msg"), ("Connectionuse", "m")],
        [("Node_Id", "n1"), ("Project_Id", "p1"), ("ConnectionUse", "msg")],
    ],
)
async def test_identity_headers_any_case_and_repeated(
    nursery: trio.Nursery, pki: Pki, headers: list[tuple[str, str]]
) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context(), headers=headers)
        await client.send("hi")
        await client.receive()
        (connection,) = recorder.connections
        assert (connection.node_id, connection.project_id) == ("n1", "p1")
        await client.aclose()


async def test_missing_project_id_means_default(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context(), headers=[("Node_id", "n1")])
        await client.send("hi")
        await client.receive()
        assert recorder.connections[0].project_id == DEFAULT_PROJECT_ID
        await client.aclose()


async def test_switching_protocols_response_is_exactly_gorillas(
    nursery: trio.Nursery, pki: Pki
) -> None:
    with trio.fail_after(10):
        port = await start_server(nursery, pki, EchoRecorder())
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, pki.client_context(), server_hostname="127.0.0.1")
        await stream.send_all(upgrade_request(extra="Node_id: edge-1\r\nConnectionuse: msg\r\n"))
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some()
        assert answer == (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            # RFC 6455's own example key and accept value.
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade_request(upgrade=False), 400),
        (upgrade_request(method="POST"), 405),
        (upgrade_request(extra="Node_id: e\r\nOrigin: http://evil.example\r\n"), 403),
        (upgrade_request(extra="Origin: https://127.0.0.1\r\nNode_id: e\r\n"), 0),
        (upgrade_request(extra=""), 400),
        (upgrade_request(extra="Node_id: \r\n"), 400),
        (upgrade_request(extra="Node_id: e\r\n").replace(b"Version: 13", b"Version: 8"), 400),
        (upgrade_request(extra="Node_id: e\r\n").replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"x"), 400),
        (b"\x16garbage\r\n\r\n", 400),
    ],
)
async def test_refused_upgrades(
    nursery: trio.Nursery, pki: Pki, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        answer = await raw_exchange(port, pki, request_bytes)
        if status == 0:  # the same-origin case is accepted
            assert answer.startswith(b"HTTP/1.1 101 ")
            return
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        assert b"Sec-Websocket-Version: 13\r\n" in answer
        assert recorder.connections == []


async def test_five_mebibytes_both_ways(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(20):
        port = await start_server(nursery, pki, EchoRecorder(), max_message_size=8 * MiB)
        client = await dial(port, pki.client_context())
        big = '{"content":"' + "é" * (5 * MiB // 2) + '"}\n'
        async with trio.open_nursery() as inner:
            inner.start_soon(client.send, big)
            assert await client.receive() == big
        await client.aclose()


async def test_fragmented_message_is_reassembled(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context())
        framer = Connection(ConnectionType.CLIENT)  # masks like a real client
        parts = ["a" * 4096, "b" * 4096, "c" * 100]
        frames = [
            framer.send(TextMessage(data=part, message_finished=index == len(parts) - 1))
            for index, part in enumerate(parts)
        ]
        await client.send_raw(frames[0])
        # A ping between fragments is legal; the server answers it and keeps the fragments.
        await client.send_raw(framer.send(Ping(payload=b"p")))
        await client.send_raw(frames[1] + frames[2])
        assert await client.receive() == "".join(parts)
        assert recorder.received == ["".join(parts)]
        await client.aclose()


async def test_binary_frame_is_accepted(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context())
        await client.send_bytes_message(b'{"b":2}\n')
        assert await client.receive() == '{"b":2}\n'  # we answer in text frames
        assert recorder.received == [b'{"b":2}\n']
        await client.aclose()


@pytest.mark.parametrize("how", ["tcp-close", "tls-close-notify"])
async def test_close_without_close_frame_is_a_disconnect(
    nursery: trio.Nursery, pki: Pki, how: str
) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context())
        await client.send("x")
        await client.receive()
        if how == "tcp-close":
            await client.abort()
        else:  # what Go's tls.Conn.Close() does under gorilla
            await client.transport.aclose()
        await recorder.ended.wait()
        assert isinstance(recorder.endings[0], EdgeDisconnected)
        with pytest.raises(EdgeDisconnected):
            await recorder.connections[0].send("late")


async def test_close_frame_from_edge_is_a_disconnect(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context())
        await client.aclose("bye")
        await recorder.ended.wait()
        assert "close frame" in str(recorder.endings[0])


async def test_too_big_message_closes_only_that_connection(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder, max_message_size=64 * 1024)
        good = await dial(port, pki.client_context())
        bad = await dial(port, pki.client_context())
        await good.send("before")
        assert await good.receive() == "before"
        with pytest.raises(EdgeDisconnected, match="1009"):
            await bad.send("x" * (64 * 1024 + 1))
            await bad.receive()
        await recorder.ended.wait()
        await good.send("after")
        assert await good.receive() == "after"
        await good.aclose()


async def test_server_close_reaches_the_client(nursery: trio.Nursery, pki: Pki) -> None:
    async def close_at_once(connection: EdgeConnection) -> None:
        await connection.send("bye")

    with trio.fail_after(10):
        port: int = await nursery.start(
            partial(
                serve_websocket,
                close_at_once,
                ssl_context=pki.server_context(),
                host="127.0.0.1",
                port=0,
                max_message_size=MiB,
            )
        )
        client = await dial(port, pki.client_context())
        assert await client.receive() == "bye"
        with pytest.raises(EdgeDisconnected):
            await client.receive()


async def test_silent_client_is_dropped_after_handshake_timeout(
    nursery: trio.Nursery, pki: Pki
) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder, handshake_timeout=0.3)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        assert await tcp.receive_some() == b""  # closed by the server, nothing sent
        assert recorder.connections == []


async def test_receive_is_cancel_safe(nursery: trio.Nursery, pki: Pki) -> None:
    """A moving deadline around receive() must not lose half-received messages."""
    with trio.fail_after(10):
        got: list[str | bytes] = []
        done = trio.Event()

        async def impatient(connection: EdgeConnection) -> None:
            while len(got) < 2:
                with trio.move_on_after(0.01):
                    got.append(await connection.receive())
            done.set()

        port: int = await nursery.start(
            partial(
                serve_websocket,
                impatient,
                ssl_context=pki.server_context(),
                host="127.0.0.1",
                port=0,
                max_message_size=MiB,
            )
        )
        client = await dial(port, pki.client_context())
        framer = Connection(ConnectionType.CLIENT)
        frames = framer.send(TextMessage(data="one", message_finished=False))
        frames += framer.send(TextMessage(data="two", message_finished=True))
        for index in range(len(frames)):  # byte by byte, with pauses longer than the deadline
            await client.send_raw(frames[index : index + 1])
            await trio.sleep(0.003)
        await client.send("three")
        await done.wait()
        assert got == ["onetwo", "three"]
        await client.aclose()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_fast_text_frame_matches_wsproto(size: int) -> None:
    text = ("é" * size)[: max(0, size - size // 3)] + "x" * (size // 3)
    reference = Connection(ConnectionType.SERVER).send(TextMessage(data=text))
    assert _server_text_frame(text.encode()) == bytes(reference)


async def test_protocol_error_closes_the_connection(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        client = await dial(port, pki.client_context())
        await client.send_raw(_server_text_frame(b"unmasked"))  # clients must mask
        with pytest.raises(EdgeDisconnected, match="1002"):
            await client.receive()
        await recorder.ended.wait()
        assert "protocol error" in str(recorder.endings[0])
