"""The WebSocket server's `write_timeout` is a progress deadline (issue 14): the kernel ends
a connection whose sent bytes stay unacknowledged that long (TCP_USER_TIMEOUT), while a peer
that keeps reading keeps it open, however long one write takes. Real TLS on loopback."""

from __future__ import annotations

import socket
import sys
from functools import partial

import pytest
import trio
from certs import Pki

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.edge.tls import TlsTransport
from trio_cloudhub.edge.websocket import WebSocketConnection, connect_websocket, serve_websocket

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="TCP_USER_TIMEOUT and SIOCOUTQ are Linux's"
)
MiB = 1024 * 1024
HEADERS = [("Node_id", "edge-1"), ("Project_id", "proj-1"), ("Connectionuse", "msg")]


class BigSender:
    """Sends one message of `size` bytes on each connection and records how that ended."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.connection: WebSocketConnection | None = None
        self.took = 0.0
        self.error: EdgeDisconnected | None = None
        self.in_flight_seen = 0
        self.done = trio.Event()

    async def __call__(self, connection: EdgeConnection) -> None:
        assert isinstance(connection, WebSocketConnection)
        self.connection = connection
        began = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_in_flight, connection)
                await connection.send("x" * self.size)
                nursery.cancel_scope.cancel()
        except* EdgeDisconnected as group:
            error = group.exceptions[0]
            assert isinstance(error, EdgeDisconnected)
            self.error = error
        finally:
            self.took = trio.current_time() - began
            self.done.set()

    async def _watch_in_flight(self, connection: WebSocketConnection) -> None:
        while True:
            self.in_flight_seen = max(self.in_flight_seen, connection.bytes_in_flight())
            await trio.sleep(0.05)


async def start(nursery: trio.Nursery, pki: Pki, handler: BigSender, write_timeout: float) -> int:
    serve = partial(
        serve_websocket,
        handler,
        ssl_context=pki.server_context(),
        host="127.0.0.1",
        port=0,
        max_message_size=64 * MiB,
        write_timeout=write_timeout,
    )
    port: int = await nursery.start(serve)
    return port


async def dial(port: int, pki: Pki) -> WebSocketConnection:
    return await connect_websocket(
        "127.0.0.1",
        port,
        ssl_context=pki.client_context(),
        path=f"/{DEFAULT_PROJECT_ID}/edge-1/events",
        headers=HEADERS,
    )


async def test_a_peer_that_stopped_reading_is_cut_off_after_the_timeout(
    nursery: trio.Nursery, pki: Pki
) -> None:
    with trio.fail_after(20):
        sender = BigSender(32 * MiB)  # far more than the socket buffers hold
        port = await start(nursery, pki, sender, write_timeout=1.0)
        client = await dial(port, pki)  # never reads
        await sender.done.wait()
        assert sender.connection is not None
        assert sender.connection.stall_timeout == 1.0
        assert sender.error is not None, "the write finished though nobody read"
        assert str(sender.error) == "no write progress for 1 s"
        assert sender.in_flight_seen > 0
        assert 1.0 <= sender.took < 10.0, sender.took
        await client.abort()


async def test_a_slow_reader_keeps_its_connection_however_long_the_write(
    nursery: trio.Nursery, pki: Pki
) -> None:
    """3 MiB read 16 KiB every 10 ms: the write takes about 2 s, twice the timeout."""
    with trio.fail_after(30):
        sender = BigSender(3 * MiB)
        port = await start(nursery, pki, sender, write_timeout=1.0)
        client = await dial(port, pki)
        transport = client.transport
        received = 0
        while received < 3 * MiB:
            data = await transport.receive_some()
            assert data, "the server closed the connection"
            received += len(data)
            await trio.sleep(0.01)
        await sender.done.wait()
        assert sender.error is None, sender.error
        assert sender.took > 1.0, f"the write took only {sender.took:.2f} s: no slow link"
        await client.abort()


async def test_the_option_is_set_on_accepted_sockets(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        sender = BigSender(10)
        port = await start(nursery, pki, sender, write_timeout=2.5)
        client = await dial(port, pki)
        await sender.done.wait()
        assert sender.connection is not None
        transport = sender.connection.transport
        assert isinstance(transport, TlsTransport)
        assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
        assert client.stall_timeout == 0.0  # the client side sets nothing
        await client.abort()
