"""edge.tls.TlsTransport on real sockets: full sockets, split records, closes, resets, and what
OpenSSL's own client makes the TLS layer do (KeyUpdate, renegotiation)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from certs import Pki

from trio_cloudhub.edge.tls import TlsTransport, server_context_options

MiB = 1024 * 1024


SMALL_BUFFER = 64 * 1024  # kernel socket buffers, so that "the socket is full" comes soon


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, client


@asynccontextmanager
async def tls_pair(pki: Pki) -> AsyncIterator[tuple[TlsTransport, TlsTransport]]:
    server_sock, client_sock = tcp_pair()
    context = pki.server_context()
    server_context_options(context)
    server = TlsTransport(server_sock, context, server_side=True)
    client = TlsTransport(
        client_sock, pki.client_context(), server_side=False, server_hostname="127.0.0.1"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    try:
        yield server, client
    finally:
        server.abort()
        client.abort()


async def read_exactly(transport: TlsTransport, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await transport.receive_some()
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


async def test_a_full_socket_keeps_the_rest_in_order_for_flush(pki: Pki) -> None:
    with trio.fail_after(20):
        async with tls_pair(pki) as (server, client):
            blocks = [os.urandom(64 * 1024) for _ in range(64)]  # 4 MiB: more than the buffers
            results = [server.send_nowait(block) for block in blocks]
            assert results[0] is True  # an empty socket takes a whole frame at once
            assert results[-1] is False  # the peer does not read: the rest waits
            assert server.pending_bytes > 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.flush)
                received = await read_exactly(client, sum(len(b) for b in blocks))
            assert received == b"".join(blocks)
            assert server.pending_bytes == 0
            assert server.send_nowait(b"after") is True
            assert await read_exactly(client, 5) == b"after"


async def test_a_cancelled_flush_loses_and_reorders_nothing(pki: Pki) -> None:
    with trio.fail_after(20):
        async with tls_pair(pki) as (server, client):
            first = os.urandom(3 * MiB)
            assert server.send_nowait(first) is False
            with trio.move_on_after(0.05):
                await server.flush()  # nobody reads: it waits, then is cancelled
            assert server.pending_bytes > 0
            assert server.send_nowait(b"second") is False  # queued behind the first
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.flush)
                assert await read_exactly(client, len(first) + 6) == first + b"second"


async def test_records_cut_into_single_bytes_are_reassembled(pki: Pki) -> None:
    """A peer whose TLS records reach us one byte per read."""
    server_sock, client_sock = tcp_pair()
    context = pki.server_context()
    server = TlsTransport(server_sock, context, server_side=True)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")

    async def pump_handshake() -> None:
        while True:
            try:
                peer.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                await send_all(outgoing.read())
            await trio.lowlevel.wait_readable(client_sock)
            incoming.write(client_sock.recv(65536))
        if outgoing.pending:
            await send_all(outgoing.read())

    async def send_all(data: bytes) -> None:
        for index in range(len(data)):  # one byte at a time, each its own segment
            client_sock.send(data[index : index + 1])
            await trio.lowlevel.checkpoint()

    with trio.fail_after(20):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                await pump_handshake()
            message = "é".encode() * 3000 + b"end"
            peer.write(message)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, outgoing.read())
                assert await read_exactly(server, len(message)) == message
        finally:
            server.abort()
            client_sock.close()


async def test_close_notify_then_eof(pki: Pki) -> None:
    with trio.fail_after(10):
        async with tls_pair(pki) as (server, client):
            client.send_nowait(b"last words")
            await client.aclose()  # close_notify, then TCP FIN
            assert await read_exactly(server, 10) == b"last words"
            assert await server.receive_some() == b""


async def test_tcp_closed_without_close_notify_is_an_eof(pki: Pki) -> None:
    """What Go's gorilla Close() does under EdgeCore: a plain TCP close."""
    with trio.fail_after(10):
        async with tls_pair(pki) as (server, client):
            client.send_nowait(b"bye")
            client.abort()
            assert await read_exactly(server, 3) == b"bye"
            assert await server.receive_some() == b""


async def test_a_peer_that_vanishes_breaks_reads_and_writes(pki: Pki) -> None:
    with trio.fail_after(10):
        async with tls_pair(pki) as (server, client):
            raw = client._sock
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.abort()  # SO_LINGER 0: the kernel answers with a reset
            with pytest.raises(trio.BrokenResourceError, match="connection lost"):
                while await server.receive_some():
                    pass
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(100):  # the first write may still be taken by the kernel
                    server.send_nowait(b"x" * 1000)
                    await trio.sleep(0.01)


async def test_closing_wakes_a_waiting_reader_and_flusher(pki: Pki) -> None:
    with trio.fail_after(10):
        async with tls_pair(pki) as (server, _client):
            assert server.send_nowait(os.urandom(4 * MiB)) is False
            errors: list[type[BaseException]] = []

            async def expect_closed(call: object) -> None:
                try:
                    await call()  # type: ignore[operator]
                except trio.ClosedResourceError as exc:
                    errors.append(type(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_closed, server.receive_some)
                nursery.start_soon(expect_closed, server.flush)
                await trio.testing.wait_all_tasks_blocked()
                server.abort()
            assert errors == [trio.ClosedResourceError, trio.ClosedResourceError]
            with pytest.raises(trio.ClosedResourceError):
                await server.receive_some()


async def test_a_reader_of_a_busy_socket_still_lets_others_run(pki: Pki) -> None:
    """Buffered data answers reads without waiting; every few reads it yields anyway."""
    with trio.fail_after(20):
        async with tls_pair(pki) as (server, client):
            for _ in range(200):
                client.send_nowait(b"k" * 200)
            await client.flush()
            await trio.sleep(0.1)
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                await trio.lowlevel.checkpoint()
                before = ticks
                await read_exactly(server, 200 * 200)
                assert ticks > before  # the ticker ran while we read 40 KB of records
                nursery.cancel_scope.cancel()


# --- against OpenSSL's own client ---------------------------------------------------------

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


async def echo_server(
    pki: Pki, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """One TlsTransport connection that echoes lines until EOF."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        task_status.started(listener.getsockname()[1])
        await trio.lowlevel.wait_readable(listener)
        sock, _ = listener.accept()
    sock.setblocking(False)
    context = pki.server_context()
    server_context_options(context)
    transport = TlsTransport(sock, context, server_side=True)
    try:
        await transport.do_handshake()
        while data := await transport.receive_some():
            if not transport.send_nowait(b"echo:" + data):
                await transport.flush()
    except trio.BrokenResourceError:
        pass
    finally:
        transport.abort()


async def s_client(pki: Pki, tmp_path: object, port: int, lines: list[bytes], *extra: str) -> str:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "ca.pem").write_bytes(pki.ca.cert_pem)
    (folder / "edge.pem").write_bytes(pki.client.cert_pem)
    (folder / "edge.key").write_bytes(pki.client.key_pem)
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-msg", "-CAfile"]
    command += [str(folder / "ca.pem"), "-cert", str(folder / "edge.pem")]
    command += ["-key", str(folder / "edge.key"), *extra]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
            )
        )
        assert process.stdin is not None and process.stdout is not None
        output = b""

        async def read_output() -> None:
            nonlocal output
            async for chunk in process.stdout:  # type: ignore[union-attr]
                output += chunk

        nursery.start_soon(read_output)
        for line in lines:
            await trio.sleep(0.5)  # s_client reads its commands line by line
            with contextlib.suppress(trio.BrokenResourceError):  # s_client may have ended
                await process.stdin.send_all(line)
        await trio.sleep(1.0)
        await process.stdin.aclose()
    return output.decode(errors="replace")


@needs_openssl
async def test_a_key_update_from_the_peer_is_answered(
    nursery: trio.Nursery, pki: Pki, tmp_path: object
) -> None:
    """`K`: a TLS 1.3 KeyUpdate asking for ours; OpenSSL answers it inside a read, and the
    transport must send that answer (then the echo, under the new keys)."""
    with trio.fail_after(30):
        port = await nursery.start(echo_server, pki)
        output = await s_client(pki, tmp_path, port, [b"before\n", b"K\n", b"after\n"], "-tls1_3")
    assert "echo:before" in output
    assert "echo:after" in output, output
    # -msg prints every handshake message: the one we received after asking for an update.
    received = [line for line in output.splitlines() if line.startswith("<<<")]
    assert any("KeyUpdate" in line for line in received), output


@needs_openssl
async def test_a_tls_1_2_renegotiation_is_refused(
    nursery: trio.Nursery, pki: Pki, tmp_path: object
) -> None:
    """`R` on TLS 1.2: refused with a no_renegotiation alert, as Go's server refuses it
    (OpenSSL's client then gives up the connection; the echo server just sees it end)."""
    with trio.fail_after(30):
        port = await nursery.start(echo_server, pki)
        output = await s_client(pki, tmp_path, port, [b"before\n", b"R\n", b"after\n"], "-tls1_2")
    assert "echo:before" in output
    received = [line for line in output.splitlines() if line.startswith("<<<")]
    assert any("warning no_renegotiation" in line for line in received), output
    assert not any("HelloRequest" in line or "ServerHello" in line for line in received[-3:])
