"""The WebSocket transport of CloudHub: WSS with mutual TLS on trio's SSLStream (spec 4.1).

We drive the two halves of the protocol ourselves, both sans-IO: h11 parses the upgrade request
(so we can answer 400/403/405 as gorilla does and write the 101 byte for byte as CloudCore does),
and wsproto's frame-level `Connection` handles frames after the upgrade, except the hot paths,
framed here by hand: the server's outgoing text frames (trivial, unmasked), and incoming frames
that are a whole message on their own (FIN, text or binary, masked as the peer must, no RSV
bits). Every other frame (fragments, ping/pong/close, anything odd) is handed to wsproto, whole
and in order, so wsproto's parser only ever sees frame boundaries it has seen the start of.
A connection needs no task of its own: `receive()` reads the socket and `send()` writes it in
the caller's task, so an idle edge costs one task (its handler) and a few small objects, and a
message costs no task switch between a reader and a queue. trio-websocket, which runs a reader
task and a channel per connection and cannot answer a POST with 405, is not used here.

Rules of a connection:
- identity is the `node_id`/`project_id` request headers (any case); the path means nothing;
  an optional `authenticate` callback may refuse (403) a node whose certificate names another;
- text and binary messages are accepted, fragments are reassembled up to `max_message_size`;
  we send every message as one text frame;
- a TCP close or TLS EOF without a close frame is a normal disconnect: `EdgeDisconnected`;
- `receive()` is cancel-safe (partial messages live on the object), so callers may wrap it in
  moving deadlines; `send()` is not: a send cancelled half-way breaks the connection;
- the server's `write_timeout` is a progress deadline, not a bound on one write: the kernel
  ends a connection whose sent bytes the peer has not acknowledged for that long (a vanished
  peer, or a receive window that stays closed because it stopped reading; TCP_USER_TIMEOUT),
  while bytes still moving keep it open however slow the link (`stall_timeout`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
import ssl
import struct
import sys
import termios
from collections.abc import Callable, Sequence
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
# Payloads up to this size are unmasked with one big-int XOR, larger ones with four translates.
_UNMASK_BY_INT = 512
_XOR_TABLES = [bytes(byte ^ key for byte in range(256)) for key in range(256)]
# _parse_frame's answers when it returns no message (a positive value is the frame's length).
_NEED_MORE = 0
_SLOW = -1  # the next frame is wsproto's (or will be refused by it)
_TOO_BIG = -2  # a fast frame above max_message_size, refused before its payload is read
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
# `authenticate(node_id, peer certificate DER or None)`: None admits, else the refusal reason.
Authenticate = Callable[[str, bytes | None], str | None]
# `on_handshake_failure(reason)`: a connection that never reached the handler, and why
# (tls, bad-request, refused:identity, timeout, lost, error), for the metrics.
HandshakeFailed = Callable[[str], None]
# What trio raises when the peer vanished or the TLS layer failed under us.
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)
# ioctl: bytes in a TCP socket's send queue (Linux's SIOCOUTQ is TIOCOUTQ).
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


class HandshakeRejected(Exception):
    """The upgrade request was refused with an HTTP status (also raised on the client side)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class _IdentityRefused(HandshakeRejected):
    """`authenticate` refused the node's certificate (403)."""


class WebSocketConnection:
    """One open WebSocket on a byte stream, server or client side; an `EdgeConnection`."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_delegated",
        "_fragmented",
        "_mask_bit",
        "_max_message_size",
        "_node_id",
        "_parts",
        "_project_id",
        "_read_some",
        "_remote",
        "_send_lock",
        "_size",
        "_stall_timeout",
        "_ws",
        "_ws_events",
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
        trailing: bytes = b"",
        stall_timeout: float = 0.0,
    ) -> None:
        """`ws` must not hold received bytes: bytes read after the upgrade go in `trailing`.
        `stall_timeout`: the progress deadline the kernel enforces on the socket (0: none)."""
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
        # Received bytes not parsed yet; they start at a frame boundary unless `_delegated`.
        self._buffer = bytearray(trailing)
        # Bytes of the frame being handed to wsproto that are still to come.
        self._delegated = 0
        # wsproto is inside a fragmented message: every frame is its until the message ends.
        self._fragmented = False
        # The MASK bit every frame from the peer must carry: clients mask, servers do not.
        self._mask_bit = 0 if ws.client else 0x80
        # wsproto may have events to hand out (we fed it bytes since it last ran dry).
        self._ws_events = True
        self._read_some = _TlsReader.of(stream) or partial(stream.receive_some, RECEIVE_BYTES)
        self._stall_timeout = stall_timeout

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def project_id(self) -> str:
        return self._project_id

    @property
    def remote(self) -> str:
        return self._remote

    @property
    def stall_timeout(self) -> float:
        """Seconds without progress (sent bytes acknowledged) after which the kernel ends the
        connection; 0 when nothing below us does."""
        return self._stall_timeout

    def bytes_in_flight(self) -> int:
        """What the kernel holds of what we sent: not sent yet or not acknowledged (SIOCOUTQ,
        Linux; 0 elsewhere or on a stream that is not a socket)."""
        stream = self.stream
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if not isinstance(transport, trio.SocketStream) or _SIOCOUTQ is None:
            return 0
        try:
            answer = fcntl.ioctl(transport.socket.fileno(), _SIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(answer, sys.byteorder, signed=True)

    def __repr__(self) -> str:
        return f"<WebSocketConnection node={self._node_id!r} remote={self._remote}>"

    async def receive(self) -> str | bytes:
        """The next whole message; raises EdgeDisconnected once the connection is over."""
        while True:
            if self._buffer or self._ws_events:
                message = await self._next_buffered()
                if message is not None:
                    return message
            if self._closed:
                raise EdgeDisconnected(self._closed)
            try:
                data = await self._read_some()
            except _BROKEN as exc:
                self._fail(self._lost(exc))
                continue
            if not data:
                self._fail("closed without a close frame")
                continue
            if not self._buffer and not self._delegated and not self._fragmented:
                # The hot path: a read that starts with a whole message (a keepalive, an ACK)
                # is parsed as it is, without a copy into the buffer.
                end, message = _parse_frame(data, self._mask_bit, self._max_message_size)
                if message is not None:
                    if end < len(data):
                        self._buffer += memoryview(data)[end:]
                    return message
            # No await between the read and here: a cancelled receive() loses no bytes.
            self._buffer += data

    async def _next_buffered(self) -> str | bytes | None:
        """The next message from the bytes already received; None when more are needed."""
        while not self._closed:
            if self._ws_events:
                message = await self._next_ws_event()
                if message is not None or self._closed:
                    return message
            buffer = self._buffer
            if not buffer:
                return None
            if self._delegated:
                count = min(self._delegated, len(buffer))
                self._delegated -= count
                self._feed_ws(buffer[:count])
                del buffer[:count]
                continue
            if not self._fragmented:
                end, message = _parse_frame(buffer, self._mask_bit, self._max_message_size)
                if message is not None:
                    del buffer[:end]
                    return message
                if end == _NEED_MORE:
                    return None
                if end == _TOO_BIG:
                    await self._too_big()
                    return None
            # Not a frame for the fast path: the whole frame goes to wsproto, from its header on.
            length = _frame_length(buffer)
            if length is None:
                return None
            first = buffer[0]
            if (first & 0x0F) < 0x3:  # a data frame: continuation, text or binary
                self._fragmented = not first & 0x80  # until a frame with FIN ends the message
            self._delegated = length
        return None

    def _feed_ws(self, data: bytes | bytearray) -> None:
        try:
            self._ws.receive_data(data)  # type: ignore[arg-type]  # bytearray works too
        except LocalProtocolError:
            self._fail("data after the close frame")
        self._ws_events = True

    async def _next_ws_event(self) -> str | bytes | None:
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
        self._ws_events = False
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
        elif self._ws.state is ConnectionState.CLOSED:
            self._fail("the peer answered our close frame")  # we closed first
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

    def _lost(self, exc: BaseException) -> str:
        if self._stall_timeout and _timed_out(exc):
            return f"no write progress for {self._stall_timeout:g} s"
        return f"connection lost: {_describe(exc)}"

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
            self._fail(self._lost(exc))
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
            if not self._ws.client:
                await self._await_peer_close()
        self._fail(reason or "closed by us")
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self.stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)

    async def _await_peer_close(self) -> None:
        """Read and drop frames until the peer answers our close frame (bounded).

        Closing TCP with the peer's data unread makes the kernel reset the connection, and a
        reset can reach the peer before it read our close frame and its reason.
        """
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            with contextlib.suppress(EdgeDisconnected, trio.BusyResourceError):
                while True:
                    await self.receive()

    async def abort(self) -> None:
        """Close the TCP connection under TLS at once: no close frame, no close_notify."""
        self._fail("aborted by us")
        stream = self.stream
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        await trio.aclose_forcefully(transport)
        await trio.aclose_forcefully(stream)


class _TlsReader:
    """`SSLStream.receive_some` for the common case, for less than half its overhead.

    An idle edge costs one read per keepalive, and SSLStream's general machinery (conflict
    detectors, handshake check, the retry loop with its locks, made for renegotiation and
    concurrent readers) costs about 35 µs per read on top of the socket's; this costs about 15
    (decrypting a keepalive's record itself takes about 1 µs). On a TLS 1.3 connection after the
    handshake, with one reading task (ours), a read is just: decrypt what the SSLObject holds,
    else receive from the socket into its incoming BIO and decrypt again. Whenever the TLS
    layer has something to send first (a KeyUpdate answer, a pending alert), the read goes
    through `SSLStream.receive_some`, which sends it in order under the stream's send lock. TLS
    1.2 (renegotiation) or another trio whose SSLStream lacks these attributes: not used.
    """

    __slots__ = ("_incoming", "_outgoing", "_read", "_stream", "_transport")

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        self._stream = stream
        self._transport = stream.transport_stream
        self._read = stream._ssl_object.read
        self._incoming = stream._incoming
        self._outgoing = stream._outgoing

    @classmethod
    def of(cls, stream: trio.abc.Stream) -> _TlsReader | None:
        if not isinstance(stream, trio.SSLStream):
            return None
        try:
            if stream._ssl_object.version() != "TLSv1.3" or stream._delayed_outgoing:
                return None
            return cls(stream)
        except AttributeError:  # pragma: no cover - a trio that changed SSLStream's insides
            return None

    async def __call__(self) -> bytes | bytearray:
        # A checkpoint as every receive_some has: cancellable before we take anything,
        # shielded once we hold bytes, so a cancelled read loses none.
        await trio.lowlevel.checkpoint_if_cancelled()
        read = self._read
        try:
            data = read(RECEIVE_BYTES)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError from exc
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            if self._outgoing.pending:
                return await self._stream.receive_some(RECEIVE_BYTES)
            raw = await self._transport.receive_some(RECEIVE_BYTES)
            if raw:
                self._incoming.write(raw)
            else:
                self._incoming.write_eof()
            try:
                return read(RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                if not raw:
                    raise trio.BrokenResourceError("EOF inside a TLS record") from None
                # A partial record, or a TLS message without application data.
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError from exc


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


def _parse_frame(
    data: bytes | bytearray, mask_bit: int, max_size: int
) -> tuple[int, str | bytes | None]:
    """The message in a whole frame at the start of `data`, if it is one for the fast path.

    Returns (frame length, message) for a frame with FIN, opcode text or binary, no RSV bits,
    the peer's MASK bit, a minimal length and (text) valid UTF-8 (RFC 6455 5.2); otherwise
    (_NEED_MORE, None), (_TOO_BIG, None) as soon as the header says so, or (_SLOW, None) for a
    frame wsproto must see: another kind, or one it refuses with the close code it chooses.
    """
    size = len(data)
    if size < 2:
        return _NEED_MORE, None
    first = data[0]
    second = data[1]
    if (first != 0x81 and first != 0x82) or (second & 0x80) != mask_bit:
        return _SLOW, None
    length = second & 0x7F
    start = 2
    if length == 126:
        if size < 4:
            return _NEED_MORE, None
        length = data[2] << 8 | data[3]
        if length < 126:
            return _SLOW, None
        start = 4
    elif length == 127:
        if size < 10:
            return _NEED_MORE, None
        length = int.from_bytes(data[2:10])
        if length < 0x10000 or length >> 63:
            return _SLOW, None
        start = 10
    if length > max_size:
        return _TOO_BIG, None
    end = start + 4 + length if mask_bit else start + length
    if size < end:
        return _NEED_MORE, None
    payload = _unmask(data, start, length) if mask_bit else data[start:end]
    if first == 0x82:
        return end, bytes(payload)
    try:
        return end, payload.decode("utf-8")
    except UnicodeDecodeError:
        return _SLOW, None  # wsproto closes with 1007 and its own reason, as it always has


def _unmask(data: bytes | bytearray, start: int, length: int) -> bytes | bytearray:
    """The payload of the frame whose masking key is at data[start:start + 4], unmasked."""
    key = data[start : start + 4]
    start += 4
    if length <= _UNMASK_BY_INT:
        with memoryview(data) as view, view[start : start + length] as payload:
            masked = int.from_bytes(payload, "little")
        keys = int.from_bytes((key * ((length >> 2) + 1))[:length], "little")
        return (masked ^ keys).to_bytes(length, "little")
    out = data[start : start + length]
    out = out if isinstance(out, bytearray) else bytearray(out)
    for index in range(4):
        out[index::4] = out[index::4].translate(_XOR_TABLES[key[index]])
    return out


def _frame_length(data: bytes | bytearray) -> int | None:
    """Header plus payload length of the frame at the start of `data`; None for a partial
    header. Nothing is checked: wsproto refuses what is wrong."""
    size = len(data)
    if size < 2:
        return None
    second = data[1]
    length = second & 0x7F
    head = 2
    if length == 126:
        if size < 4:
            return None
        length = data[2] << 8 | data[3]
        head = 4
    elif length == 127:
        if size < 10:
            return None
        length = int.from_bytes(data[2:10])
        head = 10
    if second & 0x80:
        head += 4
    return head + length


def _ignore_failure(reason: str) -> None:
    pass


def _timed_out(exc: BaseException) -> bool:
    """Whether the kernel gave up on the connection (ETIMEDOUT somewhere in the chain)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno == errno.ETIMEDOUT:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def bound_stalls(tcp: trio.SocketStream, timeout: float) -> float:
    """Have the kernel end the connection once sent data stays unacknowledged for `timeout`
    seconds (also a zero window: since Linux 5.11 the user timeout bounds zero-window probing);
    returns `timeout`, or 0 where TCP_USER_TIMEOUT does not exist or cannot be set."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if timeout <= 0 or option is None:
        return 0.0
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, option, max(1, round(timeout * 1000)))
    except OSError:
        return 0.0
    return timeout


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
    write_timeout: float = 0.0,
    authenticate: Authenticate | None = None,
    on_handshake_failure: HandshakeFailed | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept WSS connections forever; run `handler` once per upgraded connection.

    `authenticate`, when given, is called once per connection after the upgrade request passed
    its checks and before the 101 is written, with the `node_id` header and the client
    certificate (`getpeercert(binary_form=True)`: DER bytes, or None). A non-None answer is
    the reason to refuse: the edge gets HTTP 403, a WARNING is logged and `handler` never runs.
    It must be quick and must not raise (e.g. `pki.identity.connection_identity_problem`).
    `on_handshake_failure(reason)` hears of every connection that never reached `handler`.
    `write_timeout` > 0: the progress deadline of every connection (`bound_stalls`).
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
        write_timeout=write_timeout,
        authenticate=authenticate,
        on_failure=on_handshake_failure or _ignore_failure,
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
    write_timeout: float = 0.0,
    authenticate: Authenticate | None = None,
    on_failure: HandshakeFailed = _ignore_failure,
) -> None:
    remote = _peer_of(tcp)
    stall_timeout = bound_stalls(tcp, write_timeout)
    connection: WebSocketConnection | None = None
    with trio.move_on_after(handshake_timeout) as scope:
        try:
            connection = await _accept(
                tcp, ssl_context, remote, max_message_size, authenticate, on_failure, stall_timeout
            )
        except Exception:
            # A bug on one connection must not end the listener (and the hub with it).
            logger.exception("handshake with %s failed", remote)
            on_failure("error")
    if scope.cancelled_caught:
        logger.debug("handshake with %s timed out after %s s", remote, handshake_timeout)
        on_failure("timeout")
    if connection is None:
        await trio.aclose_forcefully(tcp)
        return
    logger.debug("node %r connected from %s", connection.node_id, remote)
    try:
        await handler(connection)
    except EdgeDisconnected:
        pass  # a handler may let the normal end of a connection escape
    except Exception:
        logger.exception("connection of node %r from %s failed", connection.node_id, remote)
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


async def _accept(
    tcp: trio.SocketStream,
    ssl_context: ssl.SSLContext,
    remote: str,
    max_message_size: int,
    authenticate: Authenticate | None = None,
    on_failure: HandshakeFailed = _ignore_failure,
    stall_timeout: float = 0.0,
) -> WebSocketConnection | None:
    """TLS handshake, then the HTTP upgrade; None (after answering) when refused."""
    stream = trio.SSLStream(tcp, ssl_context, server_side=True)
    try:
        await stream.do_handshake()
    except _BROKEN as exc:
        # No client certificate, one from another CA, a port scan: not worth more than debug.
        logger.debug("TLS handshake with %s failed: %s", remote, _describe(exc))
        on_failure("tls")
        return None
    try:
        request, trailing = await _read_request(stream)
        node_id, project_id, accept_key = _check_request(request, remote)
        if authenticate is not None:
            _authenticate(authenticate, stream, node_id, remote)
    except HandshakeRejected as exc:
        on_failure("refused:identity" if isinstance(exc, _IdentityRefused) else "bad-request")
        await _send_rejection(stream, exc.status)
        return None
    except _BROKEN as exc:
        logger.debug("connection from %s lost during the upgrade: %s", remote, _describe(exc))
        on_failure("lost")
        return None
    try:
        await stream.send_all(_SWITCHING % accept_key)
    except _BROKEN:
        on_failure("lost")
        return None
    return WebSocketConnection(
        stream,
        Connection(ConnectionType.SERVER),
        node_id=node_id,
        project_id=project_id,
        remote=remote,
        max_message_size=max_message_size,
        trailing=trailing,
        stall_timeout=stall_timeout,
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


def _authenticate(
    authenticate: Authenticate, stream: trio.SSLStream[trio.SocketStream], node_id: str, remote: str
) -> None:
    """Raise HandshakeRejected(403) when `authenticate` refuses this node's certificate."""
    peer_cert: bytes | None = stream.getpeercert(binary_form=True)
    reason = authenticate(node_id, peer_cert)
    if reason is not None:
        logger.warning("refused node %s from %s: %s", node_id, remote, reason)
        raise _IdentityRefused(403, reason)


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
    return WebSocketConnection(
        stream,
        Connection(ConnectionType.CLIENT),
        node_id=node_id,
        project_id=project_id,
        remote=f"{host}:{port}",
        max_message_size=max_message_size,
        trailing=trailing,
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
