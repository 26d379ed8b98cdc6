"""The WebSocket transport of CloudHub: WSS with mutual TLS on trio's SSLStream (spec 4.1).

We drive the two halves of the protocol ourselves, both sans-IO: h11 parses the upgrade request
(so we can answer 400/403/405 as gorilla does and write the 101 byte for byte as CloudCore does),
and wsproto's frame-level `Connection` handles frames after the upgrade, except the server's
outgoing text frames, which are trivial (unmasked) and framed here on the hot path.
A connection needs no task of its own: `receive()` reads the socket and `send()` writes it in
the caller's task, so an idle edge costs one task (its handler) and a few small objects, and a
message costs no task switch between a reader and a queue. trio-websocket, which runs a reader
task and a channel per connection and cannot answer a POST with 405, is not used here.

Rules of a connection:
- identity is the `node_id`/`project_id` request headers (any case); the path means nothing;
- text and binary messages are accepted, fragments are reassembled up to `max_message_size`;
  we send every message as one text frame;
- a TCP close or TLS EOF without a close frame is a normal disconnect: `EdgeDisconnected`;
- `receive()` is cancel-safe (partial messages live on the object), so callers may wrap it in
  moving deadlines; `send()` is not: a send cancelled half-way breaks the connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import ssl
import struct
from collections.abc import Sequence
from functools import partial
from typing import NoReturn

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.base import ConnectionHandler, EdgeDisconnected

logger = logging.getLogger(__name__)

RECEIVE_BYTES = 64 * 1024
MAX_REQUEST_HEAD = 16 * 1024
CLOSE_TIMEOUT = 2.0
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)
_TEXT_HEAD_SHORT = struct.Struct("!BB")
_TEXT_HEAD_MEDIUM = struct.Struct("!BBH")
_TEXT_HEAD_LONG = struct.Struct("!BBQ")
_REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed"}
# What trio raises when the peer vanished or the TLS layer failed under us.
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class HandshakeRejected(Exception):
    """The upgrade request was refused with an HTTP status (also raised on the client side)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class WebSocketConnection:
    """One open WebSocket on a byte stream, server or client side; an `EdgeConnection`."""

    __slots__ = (
        "_closed",
        "_max_message_size",
        "_node_id",
        "_parts",
        "_project_id",
        "_remote",
        "_send_lock",
        "_size",
        "_ws",
        "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: Connection,
        *,
        node_id: str,
        project_id: str,
        remote: str,
        max_message_size: int,
    ) -> None:
        self.stream = stream
        self._ws = ws
        self._node_id = node_id
        self._project_id = project_id
        self._remote = remote
        self._max_message_size = max_message_size
        self._send_lock = trio.StrictFIFOLock()
        # Fragments of the message being received: None while between messages (the common case).
        self._parts: list[str | bytes] | None = None
        self._size = 0
        self._closed = ""

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def project_id(self) -> str:
        return self._project_id

    @property
    def remote(self) -> str:
        return self._remote

    def __repr__(self) -> str:
        return f"<WebSocketConnection node={self._node_id!r} remote={self._remote}>"

    async def receive(self) -> str | bytes:
        """The next whole message; raises EdgeDisconnected once the connection is over."""
        while True:
            if self._closed:
                raise EdgeDisconnected(self._closed)
            message = await self._next_buffered()
            if message is not None:
                return message
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except _BROKEN as exc:
                self._fail(f"connection lost: {_describe(exc)}")
                continue
            if not data:
                self._fail("closed without a close frame")
                continue
            try:
                self._ws.receive_data(data)  # type: ignore[arg-type]  # bytearray works too
            except LocalProtocolError:
                self._fail("data after the close frame")

    async def _next_buffered(self) -> str | bytes | None:
        """Consume wsproto's pending events until one completes a message; None when drained."""
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                message = await self._add_fragment(event.data, event.message_finished)
                if message is not None:
                    return message
            elif isinstance(event, Ping) and self._ws.state is ConnectionState.OPEN:
                await self._send_bytes(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                await self._answer_close(event)
                return None
        return None

    async def _add_fragment(
        self, data: str | bytes | bytearray, finished: bool
    ) -> str | bytes | None:
        if isinstance(data, bytearray):
            data = bytes(data)  # wsproto hands out bytes already; this only satisfies the type
        if finished and self._parts is None:
            if len(data) > self._max_message_size:
                await self._too_big()
                return None
            return data
        parts = self._parts if self._parts is not None else []
        parts.append(data)
        self._parts = parts
        self._size += len(data)
        if self._size > self._max_message_size:
            await self._too_big()
            return None
        if not finished:
            return None
        self._parts, self._size = None, 0
        if isinstance(data, str):
            return "".join(parts)  # type: ignore[arg-type]
        return b"".join(parts)  # type: ignore[arg-type]

    async def _too_big(self) -> None:
        self._parts, self._size = None, 0
        reason = f"message above {self._max_message_size} bytes"
        logger.warning("closing %s of node %r: %s", self._remote, self._node_id, reason)
        await self._send_close(1009, reason)
        self._fail(reason)
        await trio.aclose_forcefully(self.stream)

    async def _answer_close(self, event: CloseConnection) -> None:
        # A protocol error makes wsproto yield a CloseConnection while the state is still OPEN:
        # that is ours to send; a close frame from the peer leaves us REMOTE_CLOSING.
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            await self._send_close(event.code, None)
            self._fail(f"close frame from the peer ({event.code} {event.reason or ''})".strip())
        else:
            await self._send_close(event.code, event.reason)
            self._fail(f"protocol error: {event.reason}")

    async def _send_close(self, code: int, reason: str | None) -> None:
        """Best effort: a peer that does not read must not keep us here."""
        try:
            data = self._ws.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:
            return
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            with contextlib.suppress(EdgeDisconnected):
                await self._send_bytes(data)

    def _fail(self, reason: str) -> None:
        if not self._closed:
            self._closed = reason
        self._parts, self._size = None, 0

    async def send(self, text: str) -> None:
        """Send `text` as one text frame; raises EdgeDisconnected."""
        if self._closed:
            raise EdgeDisconnected(self._closed)
        ws = self._ws
        if ws.state is not ConnectionState.OPEN:
            raise EdgeDisconnected("the connection is closing")
        if ws.client:
            data = ws.send(TextMessage(data=text))  # clients must mask: wsproto does it
        else:
            # The hot path of every downstream message: one unmasked FIN text frame, framed
            # here in under 1 µs where wsproto's general framing takes about 5 µs.
            data = _server_text_frame(text.encode("utf-8"))
        await self._send_bytes(data)

    async def send_bytes_message(self, data: bytes) -> None:
        """Send one binary message (the hub never does; tests and the simulator may)."""
        if self._closed:
            raise EdgeDisconnected(self._closed)
        if self._ws.state is not ConnectionState.OPEN:
            raise EdgeDisconnected("the connection is closing")
        await self._send_bytes(self._ws.send(BytesMessage(data=data)))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes that are already framed, e.g. a message split into fragments by hand."""
        await self._send_bytes(data)

    async def _send_bytes(self, data: bytes | bytearray) -> None:
        lock = self._send_lock
        # The uncontended case skips the lock's extra scheduling checkpoint.
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self.stream.send_all(data)
        except _BROKEN as exc:
            self._fail(f"connection lost: {_describe(exc)}")
            raise EdgeDisconnected(self._closed) from None
        except BaseException:
            # Cancelled half-way: an unknown part of the frame went out, the stream is unusable.
            self._fail("a send was interrupted")
            raise
        finally:
            lock.release()

    async def aclose(self, reason: str = "") -> None:
        """Send a close frame (bounded, not awaiting the answer) and close the stream."""
        if not self._closed and self._ws.state is ConnectionState.OPEN:
            await self._send_close(1000, reason or None)
        self._fail(reason or "closed by us")
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self.stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)

    async def abort(self) -> None:
        """Close the TCP connection under TLS at once: no close frame, no close_notify."""
        self._fail("aborted by us")
        stream = self.stream
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        await trio.aclose_forcefully(transport)
        await trio.aclose_forcefully(stream)


def _server_text_frame(payload: bytes) -> bytes:
    """RFC 6455 5.2: FIN + text opcode, no mask, 7/16/64-bit length, then the payload."""
    size = len(payload)
    if size < 126:
        head = _TEXT_HEAD_SHORT.pack(0x81, size)
    elif size < 0x10000:
        head = _TEXT_HEAD_MEDIUM.pack(0x81, 126, size)
    else:
        head = _TEXT_HEAD_LONG.pack(0x81, 127, size)
    return head + payload


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause else type(exc).__name__


# --- server side ------------------------------------------------------------------------------


async def serve_websocket(
    handler: ConnectionHandler,
    *,
    ssl_context: ssl.SSLContext,
    host: str,
    port: int,
    max_message_size: int,
    handshake_timeout: float = 30.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept WSS connections forever; run `handler` once per upgraded connection.

    `task_status.started(port)` reports the bound port (useful with port 0).
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound_port: int = listeners[0].socket.getsockname()[1]
    serve_one = partial(
        _serve_connection,
        handler=handler,
        ssl_context=ssl_context,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
    )
    logger.info("WebSocket server listening on %s:%d", host or "*", bound_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve_one, listeners)
        task_status.started(bound_port)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


async def _serve_connection(
    tcp: trio.SocketStream,
    *,
    handler: ConnectionHandler,
    ssl_context: ssl.SSLContext,
    max_message_size: int,
    handshake_timeout: float,
) -> None:
    remote = _peer_of(tcp)
    connection: WebSocketConnection | None = None
    with trio.move_on_after(handshake_timeout) as scope:
        connection = await _accept(tcp, ssl_context, remote, max_message_size)
    if scope.cancelled_caught:
        logger.debug("handshake with %s timed out after %s s", remote, handshake_timeout)
    if connection is None:
        await trio.aclose_forcefully(tcp)
        return
    logger.debug("node %r connected from %s", connection.node_id, remote)
    try:
        await handler(connection)
    except EdgeDisconnected:
        pass  # a handler may let the normal end of a connection escape
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


async def _accept(
    tcp: trio.SocketStream, ssl_context: ssl.SSLContext, remote: str, max_message_size: int
) -> WebSocketConnection | None:
    """TLS handshake, then the HTTP upgrade; None (after answering) when refused."""
    stream = trio.SSLStream(tcp, ssl_context, server_side=True)
    try:
        await stream.do_handshake()
    except _BROKEN as exc:
        # No client certificate, one from another CA, a port scan: not worth more than debug.
        logger.debug("TLS handshake with %s failed: %s", remote, _describe(exc))
        return None
    try:
        request, trailing = await _read_request(stream)
        node_id, project_id, accept_key = _check_request(request, remote)
    except HandshakeRejected as exc:
        await _send_rejection(stream, exc.status)
        return None
    except _BROKEN as exc:
        logger.debug("connection from %s lost during the upgrade: %s", remote, _describe(exc))
        return None
    try:
        await stream.send_all(_SWITCHING % accept_key)
    except _BROKEN:
        return None
    ws = Connection(ConnectionType.SERVER, trailing_data=trailing)
    return WebSocketConnection(
        stream,
        ws,
        node_id=node_id,
        project_id=project_id,
        remote=remote,
        max_message_size=max_message_size,
    )


async def _read_request(stream: trio.SSLStream[trio.SocketStream]) -> tuple[h11.Request, bytes]:
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            logger.info("bad upgrade request: %s", exc)
            raise HandshakeRejected(400, "malformed HTTP request") from None
        if isinstance(event, h11.Request):
            break
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise trio.BrokenResourceError("EOF before the upgrade request")
            parser.receive_data(data)  # type: ignore[arg-type]
            continue
        raise trio.BrokenResourceError("no upgrade request")  # ConnectionClosed
    # Bytes the client sent after the request head (frames pipelined behind it) stay ours.
    return event, bytes(parser.trailing_data[0])


def _check_request(request: h11.Request, remote: str) -> tuple[str, str, bytes]:
    """Gorilla's checks in gorilla's order, then ours; returns identity and accept key."""
    headers = _header_map(request.headers)
    target = request.target.decode("latin-1")

    def refuse(status: int, why: str, level: int = logging.INFO) -> HandshakeRejected:
        logger.log(
            level, "refused WebSocket upgrade from %s (%s): %d, %s", remote, target, status, why
        )
        return HandshakeRejected(status, why)

    if not _has_token(headers.get(b"connection", ()), b"upgrade"):
        raise refuse(400, "'upgrade' token not found in 'Connection' header")
    if not _has_token(headers.get(b"upgrade", ()), b"websocket"):
        raise refuse(400, "'websocket' token not found in 'Upgrade' header")
    if request.method != b"GET":
        raise refuse(405, f"request method is {request.method.decode('latin-1')}, not GET")
    if not _has_token(headers.get(b"sec-websocket-version", ()), b"13"):
        raise refuse(400, "unsupported version: 13 not found in 'Sec-Websocket-Version' header")
    if not _same_origin(headers):
        raise refuse(403, "request origin not allowed")
    key = _first(headers, b"sec-websocket-key")
    if not _valid_key(key):
        raise refuse(400, "'Sec-WebSocket-Key' header must be Base64 encoded value of 16 bytes")
    node_id = _first(headers, b"node_id").decode("utf-8", "replace").strip()
    if not node_id:
        raise refuse(400, "no node_id header: cannot tell which edge node this is", logging.WARNING)
    project = _first(headers, b"project_id").decode("utf-8", "replace").strip()
    return node_id, project or DEFAULT_PROJECT_ID, _accept_key(key)


def _header_map(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """h11 gives lower-case names; repeated headers (EdgeCore repeats Connectionuse) are kept."""
    result: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        result.setdefault(name, []).append(value)
    return result


def _first(headers: dict[bytes, list[bytes]], name: bytes) -> bytes:
    values = headers.get(name)
    return values[0].strip() if values else b""


def _has_token(values: Sequence[bytes], token: bytes) -> bool:
    return any(part.strip().lower() == token for value in values for part in value.split(b","))


def _same_origin(headers: dict[bytes, list[bytes]]) -> bool:
    """Gorilla's default CheckOrigin: no Origin, or an Origin whose host is the Host header."""
    origin = _first(headers, b"origin")
    if not origin:
        return True
    _, sep, rest = origin.partition(b"://")
    origin_host = rest.split(b"/", 1)[0] if sep else b""
    return bool(origin_host) and origin_host.lower() == _first(headers, b"host").lower()


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


async def _send_rejection(stream: trio.SSLStream[trio.SocketStream], status: int) -> None:
    """Gorilla's answer: the status text as a plain-text body, then we close."""
    body = f"{_REASONS.get(status, 'Error')}\n".encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Sec-Websocket-Version: 13\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await stream.send_all(head + body)
            await stream.aclose()
        except _BROKEN:
            pass


def _peer_of(tcp: trio.SocketStream) -> str:
    try:
        address = tcp.socket.getpeername()
    except OSError:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- client side (edge simulator and tests) ---------------------------------------------------


async def connect_websocket(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext,
    path: str,
    headers: Sequence[tuple[str, str]],
    max_message_size: int = 1 << 30,
    node_id: str = "",
    project_id: str = DEFAULT_PROJECT_ID,
) -> WebSocketConnection:
    """Dial WSS the way gorilla does for EdgeCore; raises HandshakeRejected, or OSError when
    the TCP connection cannot be made.

    `headers` are sent as given (names keep their case, repeats are kept). Use `trio.fail_after`
    around the call for a handshake timeout.
    """
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=host)
    try:
        trailing = await _client_upgrade(stream, host, port, path, headers)
    except _BROKEN as exc:
        await trio.aclose_forcefully(stream)
        # Typically the hub refusing our certificate, which TLS 1.3 reports only now.
        raise HandshakeRejected(0, f"TLS or connection failure: {_describe(exc)}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    ws = Connection(ConnectionType.CLIENT, trailing_data=trailing)
    return WebSocketConnection(
        stream,
        ws,
        node_id=node_id,
        project_id=project_id,
        remote=f"{host}:{port}",
        max_message_size=max_message_size,
    )


async def _client_upgrade(
    stream: trio.SSLStream[trio.SocketStream],
    host: str,
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]],
) -> bytes:
    key = base64.b64encode(os.urandom(16))
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", f"{host}:{port}"),
            ("User-Agent", "Go-http-client/1.1"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key.decode()),
            ("Sec-WebSocket-Version", "13"),
            ("Upgrade", "websocket"),
            *headers,
        ],
    )
    await stream.send_all(client.send(request) or b"")
    client.send(h11.EndOfMessage())
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise HandshakeRejected(0, "connection closed during the upgrade")
            client.receive_data(data)  # type: ignore[arg-type]
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            _check_switching(event, key)
            return bytes(client.trailing_data[0])
        elif isinstance(event, (h11.Response, h11.InformationalResponse)):
            raise HandshakeRejected(event.status_code, event.reason.decode("latin-1"))
        else:
            raise HandshakeRejected(0, f"unexpected {event!r}")


def _check_switching(event: h11.InformationalResponse, key: bytes) -> None:
    headers = _header_map(event.headers)
    # REF EdgeCore (gorilla 1.4.2) compares these as whole values, so we do too.
    if _first(headers, b"upgrade").lower() != b"websocket":
        raise HandshakeRejected(101, "bad Upgrade header")
    if _first(headers, b"connection").lower() != b"upgrade":
        raise HandshakeRejected(101, "bad Connection header")
    if _first(headers, b"sec-websocket-accept") != _accept_key(key):
        raise HandshakeRejected(101, "bad Sec-WebSocket-Accept")
