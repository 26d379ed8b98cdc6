"""The WebSocket transport of CloudHub: WSS with mutual TLS (spec 4.1) on `edge.tls`.

We drive the two halves of the protocol ourselves, both sans-IO: h11 parses the upgrade request
(so we can answer 400/403/405 as gorilla does and write the 101 byte for byte as CloudCore does),
and wsproto's frame-level `Connection` handles frames after the upgrade, except the hot paths,
framed here by hand: the server's outgoing text frames (trivial, unmasked), the client's
(masked), and incoming frames that are a whole message on their own (FIN, text or binary,
masked as the peer must, no RSV bits). Every other frame (fragments, ping/pong/close, anything
odd) is handed to wsproto, whole and in order, so wsproto's parser only ever sees frame
boundaries it has seen the start of; wsproto's `Connection` is only made when such a frame (or
our close) first needs it. A connection needs no task of its own: `receive()` reads the socket
in the caller's task, and sending is synchronous (`send_nowait`: one TLS write and one `send`
when the kernel takes it); only bytes the kernel did not take wait for `flush()`.

Rules of a connection:
- identity is the `node_id`/`project_id` request headers (any case); the path means nothing;
  an optional `authenticate` callback may refuse (403) a node whose certificate names another;
- text and binary messages are accepted, fragments are reassembled up to `max_message_size`;
  we send every message as one text frame;
- a TCP close or TLS EOF without a close frame is a normal disconnect: `EdgeDisconnected`;
- `receive()` is cancel-safe (partial messages live on the object), so callers may wrap it in
  moving deadlines; so is `flush()` (unsent bytes stay queued in order);
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
from typing import NoReturn, Protocol

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.base import ConnectionHandler, EdgeDisconnected, NeedsTask
from trio_cloudhub.edge.poller import ReadPoller, ReadyCallback
from trio_cloudhub.edge.tls import TlsTransport, detach_socket, server_context_options
from trio_cloudhub.listen import open_tcp_listeners
from trio_cloudhub.netlimits import (
    HandshakeTurns,
    Turn,
    Waiting,
    accept_forever,
    listening_socket,
    peer_host,
)

logger = logging.getLogger(__name__)

RECEIVE_BYTES = 64 * 1024
# Payloads up to this size are (un)masked with one big-int XOR, larger ones with four translates.
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
_HEAD_SHORT = struct.Struct("!BB")
_HEAD_MEDIUM = struct.Struct("!BBH")
_HEAD_LONG = struct.Struct("!BBQ")
_REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed"}
# `authenticate(node_id, peer certificate DER or None)`: None admits, else the refusal reason.
Authenticate = Callable[[str, bytes | None], str | None]
# `on_handshake_failure(reason)`: a connection that never reached the handler, and why
# (tls, bad-request, refused:identity, timeout, evicted, lost, error), for the metrics.
HandshakeFailed = Callable[[str], None]
# What the transport raises when the peer vanished, TLS failed, or we closed it.
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


class ByteTransport(Protocol):
    """What a WebSocket connection needs below it (`TlsTransport`, or `StreamTransport`)."""

    async def receive_some(self) -> bytes | bytearray:
        """Some bytes; b"" at EOF; trio.BrokenResourceError or ClosedResourceError."""
        ...

    def send_nowait(self, data: bytes | bytearray) -> bool:
        """Queue `data`; True when it all left already (else `flush()`)."""
        ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...

    async def linger(self) -> None:
        """Stop sending, read and drop until the peer closes (bounded by the caller)."""
        ...

    def abort(self) -> None: ...


class StreamTransport:
    """Any trio Stream as a `ByteTransport` (tests; the hub uses `TlsTransport`)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._pending = bytearray()
        self._lock = trio.StrictFIFOLock()

    async def receive_some(self) -> bytes | bytearray:
        return await self.stream.receive_some(RECEIVE_BYTES)

    def send_nowait(self, data: bytes | bytearray) -> bool:
        self._pending += data
        return False

    async def flush(self) -> None:
        async with self._lock:
            while self._pending:
                data, self._pending = bytes(self._pending), bytearray()
                await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def linger(self) -> None:
        await self.flush()
        while await self.stream.receive_some(RECEIVE_BYTES):
            pass

    def abort(self) -> None:
        self._pending.clear()


class WebSocketConnection:
    """One open WebSocket on a byte transport, server or client side; an `EdgeConnection`."""

    __slots__ = (
        "_buffer",
        "_client",
        "_closed",
        "_delegated",
        "_fragmented",
        "_mask_bit",
        "_max_message_size",
        "_node_id",
        "_parts",
        "_project_id",
        "_remote",
        "_size",
        "_stall_timeout",
        "_ws",
        "_ws_events",
        "transport",
    )

    def __init__(
        self,
        transport: ByteTransport,
        *,
        client: bool,
        node_id: str,
        project_id: str,
        remote: str,
        max_message_size: int,
        trailing: bytes = b"",
        stall_timeout: float = 0.0,
    ) -> None:
        """Bytes read after the upgrade request or answer go in `trailing`.
        `stall_timeout`: the progress deadline the kernel enforces on the socket (0: none)."""
        self.transport = transport
        self._client = client
        self._ws: Connection | None = None  # wsproto, made when a frame first needs it
        self._node_id = node_id
        self._project_id = project_id
        self._remote = remote
        self._max_message_size = max_message_size
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
        self._mask_bit = 0 if client else 0x80
        # wsproto may have events to hand out (we fed it bytes since it last ran dry).
        self._ws_events = False
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
        """What we sent that the edge has not acknowledged: queued here for `flush`, plus what
        the kernel holds (SIOCOUTQ, Linux); 0 on a transport that is not a socket."""
        transport = self.transport
        if not isinstance(transport, TlsTransport):
            return 0
        pending = transport.pending_bytes
        if _SIOCOUTQ is None:
            return pending
        try:
            answer = fcntl.ioctl(transport.fileno(), _SIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return pending
        return pending + int.from_bytes(answer, sys.byteorder, signed=True)

    def __repr__(self) -> str:
        return f"<WebSocketConnection node={self._node_id!r} remote={self._remote}>"

    def _wsproto(self) -> Connection:
        ws = self._ws
        if ws is None:
            kind = ConnectionType.CLIENT if self._client else ConnectionType.SERVER
            ws = self._ws = Connection(kind)
        return ws

    def _is_open(self) -> bool:
        ws = self._ws
        return ws is None or ws.state is ConnectionState.OPEN

    # --- receiving ----------------------------------------------------------------------

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
                data = await self.transport.receive_some()
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

    def receive_nowait(self) -> str | bytes | None:
        """The next whole message if the fast path has it without waiting; None when no whole
        message is here and the socket has nothing more now. Raises NeedsTask when the next
        step is `receive()`'s (wsproto's frames, a message too big, the connection's end)."""
        if self._ws_events or self._delegated or self._fragmented or self._closed:
            raise NeedsTask
        transport = self.transport
        assert isinstance(transport, TlsTransport)  # `parkable`
        mask_bit, max_size = self._mask_bit, self._max_message_size
        while True:
            buffer = self._buffer
            if buffer:
                end, message = self._take_fast_frame()
                if message is not None:
                    return message
                if end != _NEED_MORE:
                    raise NeedsTask
            try:
                data = transport.receive_nowait()
            except _BROKEN as exc:
                self._fail(self._lost(exc))
                raise NeedsTask from None
            if data is None:
                return None
            if not data:
                self._fail("closed without a close frame")
                raise NeedsTask
            if not buffer:  # as in receive(): a read that starts with a whole message
                end, message = _parse_frame(data, mask_bit, max_size)
                if message is not None:
                    if end < len(data):
                        self._buffer += memoryview(data)[end:]
                    return message
            self._buffer += data

    @property
    def parkable(self) -> bool:
        """Whether `park` works: a TLS socket the hub's poller can watch."""
        return isinstance(self.transport, TlsTransport)

    def park(self, poller: ReadPoller, callback: ReadyCallback) -> None:
        """`poller` calls `callback` while the socket is readable, and once more when the
        connection is aborted (see `TlsTransport.park`)."""
        transport = self.transport
        assert isinstance(transport, TlsTransport)
        transport.park(poller, callback)

    def unpark(self) -> None:
        transport = self.transport
        if isinstance(transport, TlsTransport):
            transport.unpark()

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
                end, message = self._take_fast_frame()
                if message is not None:
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

    def _take_fast_frame(self) -> tuple[int, str | bytes | None]:
        """`_parse_frame` on the buffer; a message found is removed from it."""
        buffer = self._buffer
        end, message = _parse_frame(buffer, self._mask_bit, self._max_message_size)
        if message is not None:
            if end < len(buffer):
                del buffer[:end]
            else:  # a new empty buffer: the old one keeps its largest size
                self._buffer = bytearray()
        return end, message

    def _feed_ws(self, data: bytes | bytearray) -> None:
        try:
            self._wsproto().receive_data(data)  # type: ignore[arg-type]  # bytearray works too
        except LocalProtocolError:
            self._fail("data after the close frame")
        self._ws_events = True

    async def _next_ws_event(self) -> str | bytes | None:
        """Consume wsproto's pending events until one completes a message; None when drained."""
        ws = self._wsproto()
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                message = await self._add_fragment(event.data, event.message_finished)
                if message is not None:
                    return message
            elif isinstance(event, Ping) and ws.state is ConnectionState.OPEN:
                await self._send_bytes(ws.send(event.response()))
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
        self._buffer.clear()
        reason = f"message above {self._max_message_size} bytes"
        logger.warning("closing %s of node %r: %s", self._remote, self._node_id, reason)
        await self._send_close(1009, reason)
        self._fail(reason)
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            with contextlib.suppress(*_BROKEN):
                await self.transport.linger()
        self.transport.abort()

    async def _answer_close(self, event: CloseConnection) -> None:
        # A protocol error makes wsproto yield a CloseConnection while the state is still OPEN:
        # that is ours to send; a close frame from the peer leaves us REMOTE_CLOSING.
        state = self._wsproto().state
        if state is ConnectionState.REMOTE_CLOSING:
            await self._send_close(event.code, None)
            self._fail(f"close frame from the peer ({event.code} {event.reason or ''})".strip())
        elif state is ConnectionState.CLOSED:
            self._fail("the peer answered our close frame")  # we closed first
        else:
            await self._send_close(event.code, event.reason)
            self._fail(f"protocol error: {event.reason}")

    async def _send_close(self, code: int, reason: str | None) -> None:
        """Best effort: a peer that does not read must not keep us here."""
        try:
            data = self._wsproto().send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:
            return
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            with contextlib.suppress(EdgeDisconnected):
                await self._send_bytes(data)

    def _lost(self, exc: BaseException) -> str:
        transport = self.transport
        kernel_gave_up = isinstance(transport, TlsTransport) and transport.timed_out
        if self._stall_timeout and (kernel_gave_up or _timed_out(exc)):
            return f"no write progress for {self._stall_timeout:g} s"
        return f"connection lost: {_describe(exc)}"

    def _fail(self, reason: str) -> None:
        if not self._closed:
            self._closed = reason
        self._parts, self._size = None, 0

    # --- sending ------------------------------------------------------------------------

    def send_nowait(self, text: str) -> bool:
        """Send `text` as one text frame now; True when the kernel took all of it (False:
        the rest waits for `flush()`). Raises EdgeDisconnected."""
        if self._closed:
            raise EdgeDisconnected(self._closed)
        if not self._is_open():
            raise EdgeDisconnected("the connection is closing")
        payload = text.encode("utf-8")
        # The hot path of every message: one FIN text frame, framed here in about a microsecond
        # where wsproto's general framing takes several.
        frame = _client_frame(0x81, payload) if self._client else _server_frame(0x81, payload)
        return self._write(frame)

    async def flush(self) -> None:
        """Until everything sent so far is in the kernel's buffer; raises EdgeDisconnected."""
        try:
            await self.transport.flush()
        except _BROKEN as exc:
            self._fail(self._lost(exc))
            raise EdgeDisconnected(self._closed) from None

    async def send(self, text: str) -> None:
        """Send `text` as one text frame; raises EdgeDisconnected."""
        if not self.send_nowait(text):
            await self.flush()

    async def send_bytes_message(self, data: bytes) -> None:
        """Send one binary message (the hub never does; tests and the simulator may)."""
        if self._closed:
            raise EdgeDisconnected(self._closed)
        if not self._is_open():
            raise EdgeDisconnected("the connection is closing")
        frame = _client_frame(0x82, data) if self._client else _server_frame(0x82, data)
        await self._send_bytes(frame)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes that are already framed, e.g. a message split into fragments by hand."""
        await self._send_bytes(data)

    def _write(self, data: bytes | bytearray) -> bool:
        try:
            return self.transport.send_nowait(data)
        except _BROKEN as exc:
            self._fail(self._lost(exc))
            raise EdgeDisconnected(self._closed) from None

    async def _send_bytes(self, data: bytes | bytearray) -> None:
        if not self._write(data):
            await self.flush()

    # --- closing ------------------------------------------------------------------------

    async def aclose(self, reason: str = "") -> None:
        """Send a close frame (bounded, not awaiting the answer) and close the transport."""
        if not self._closed and self._is_open():
            await self._send_close(1000, reason or None)
            if not self._client:
                await self._await_peer_close()
        self._fail(reason or "closed by us")
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self.transport.aclose()
        if scope.cancelled_caught:
            self.transport.abort()

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
        self.transport.abort()
        await trio.lowlevel.checkpoint()


def _server_frame(opcode_byte: int, payload: bytes) -> bytes:
    """RFC 6455 5.2: FIN + opcode, no mask, 7/16/64-bit length, then the payload."""
    size = len(payload)
    if size < 126:
        head = _HEAD_SHORT.pack(opcode_byte, size)
    elif size < 0x10000:
        head = _HEAD_MEDIUM.pack(opcode_byte, 126, size)
    else:
        head = _HEAD_LONG.pack(opcode_byte, 127, size)
    return head + payload


def _client_frame(opcode_byte: int, payload: bytes) -> bytes:
    """As `_server_frame`, masked with a fresh random key as a client must (RFC 6455 5.3)."""
    size = len(payload)
    if size < 126:
        head = _HEAD_SHORT.pack(opcode_byte, 0x80 | size)
    elif size < 0x10000:
        head = _HEAD_MEDIUM.pack(opcode_byte, 0x80 | 126, size)
    else:
        head = _HEAD_LONG.pack(opcode_byte, 0x80 | 127, size)
    key = os.urandom(4)
    return head + key + _xor_mask(payload, key)


def _server_text_frame(payload: bytes) -> bytes:
    """One unmasked FIN text frame (the hub's every message)."""
    return _server_frame(0x81, payload)


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
    key = bytes(data[start : start + 4])
    start += 4
    if length <= _UNMASK_BY_INT:  # a copy of a small payload is cheaper than a view
        masked = int.from_bytes(data[start : start + length], "little")
        keys = int.from_bytes((key * ((length >> 2) + 1))[:length], "little")
        return (masked ^ keys).to_bytes(length, "little")
    with memoryview(data) as view, view[start : start + length] as payload:
        return _xor_mask(payload, key)


def _xor_mask(payload: bytes | bytearray | memoryview, key: bytes) -> bytes | bytearray:
    """`payload` XOR the repeated 4-byte `key` (masking and unmasking are the same)."""
    length = len(payload)
    if length <= _UNMASK_BY_INT:
        masked = int.from_bytes(payload, "little")
        keys = int.from_bytes((key * ((length >> 2) + 1))[:length], "little")
        return (masked ^ keys).to_bytes(length, "little")
    out = bytearray(payload)
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


def bound_stalls(sock: socket.socket, timeout: float) -> float:
    """Have the kernel end the connection once sent data stays unacknowledged for `timeout`
    seconds (also a zero window: since Linux 5.11 the user timeout bounds zero-window probing);
    returns `timeout`, or 0 where TCP_USER_TIMEOUT does not exist or cannot be set."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if timeout <= 0 or option is None:
        return 0.0
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, round(timeout * 1000)))
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
    reuse_port: bool = False,
    waiting: Waiting | None = None,
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
    `handshake_timeout` bounds TLS hello, TLS handshake and upgrade request together while
    few connections are in their handshake; a crowd shortens it and the oldest are closed
    past a total and a per-source cap (`netlimits.Waiting`; `waiting` replaces the default
    caps, for tests): reasons `timeout`, `evicted`.
    `ssl_context` gets `edge.tls.server_context_options` (no tickets, no renegotiation).
    `reuse_port`: SO_REUSEPORT, several processes on one port (`serve --workers N`).
    `task_status.started(port)` reports the bound port (useful with port 0).
    """
    server_context_options(ssl_context)
    listeners = await open_tcp_listeners(port, host or None, reuse_port=reuse_port)
    bound_port: int = listeners[0].socket.getsockname()[1]
    turns = HandshakeTurns()
    serve_one = partial(
        _serve_connection,
        handler=handler,
        waiting=waiting if waiting is not None else Waiting("WebSocket"),
        turns=turns,
        ssl_context=ssl_context,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
        write_timeout=write_timeout,
        authenticate=authenticate,
        on_failure=on_handshake_failure or _ignore_failure,
    )
    logger.info("WebSocket server listening on %s:%d", host or "*", bound_port)
    # Each connection's task gets the plain socket: no trio stream is kept alive beside it
    # for the connection's life.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(turns.run)
        for listener in listeners:
            nursery.start_soon(
                accept_forever, listening_socket(listener), nursery, serve_one, turns
            )
        task_status.started(bound_port)
    raise AssertionError("the accept loops returned")  # pragma: no cover


async def _serve_connection(
    sock: socket.socket,
    *,
    handler: ConnectionHandler,
    ssl_context: ssl.SSLContext,
    max_message_size: int,
    handshake_timeout: float,
    waiting: Waiting,
    turns: HandshakeTurns | None = None,
    write_timeout: float = 0.0,
    authenticate: Authenticate | None = None,
    on_failure: HandshakeFailed = _ignore_failure,
) -> None:
    remote = _peer_of(sock)
    stall_timeout = bound_stalls(sock, write_timeout)
    transport = TlsTransport(sock, ssl_context, server_side=True)
    connection: WebSocketConnection | None = None
    host = _host_of(sock)
    turn = partial(turns.turn, host) if turns is not None else None
    with waiting.wait(host, handshake_timeout) as handshake:
        try:
            connection = await _accept(
                transport, remote, max_message_size, authenticate, on_failure, stall_timeout, turn
            )
        except Exception:
            # A bug on one connection must not end the listener (and the hub with it).
            logger.exception("handshake with %s failed", remote)
            on_failure("error")
    ended_early, evicted = handshake.cancelled_caught, handshake.evicted
    del handshake, sock  # nothing of the handshake stays with an idle connection
    if ended_early:
        logger.debug("handshake with %s: %s", remote, "evicted" if evicted else "timed out")
        on_failure("evicted" if evicted else "timeout")
    if connection is None:
        transport.abort()
        return
    if turns is not None:
        turns.vouch(host)  # an authenticated edge: its source's handshakes go first
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
    transport: TlsTransport,
    remote: str,
    max_message_size: int,
    authenticate: Authenticate | None = None,
    on_failure: HandshakeFailed = _ignore_failure,
    stall_timeout: float = 0.0,
    turn: Turn | None = None,
) -> WebSocketConnection | None:
    """TLS handshake, then the HTTP upgrade; None (after answering) when refused."""
    try:
        await transport.do_handshake(turn)
    except _BROKEN as exc:
        # No client certificate, one from another CA, a port scan: not worth more than debug.
        logger.debug("TLS handshake with %s failed: %s", remote, _describe(exc))
        on_failure("tls")
        return None
    try:
        request, trailing = await _read_request(transport)
        node_id, project_id, accept_key = _check_request(request, remote)
        if authenticate is not None:
            _authenticate(authenticate, transport, node_id, remote)
    except HandshakeRejected as exc:
        on_failure("refused:identity" if isinstance(exc, _IdentityRefused) else "bad-request")
        await _send_rejection(transport, exc.status)
        return None
    except _BROKEN as exc:
        logger.debug("connection from %s lost during the upgrade: %s", remote, _describe(exc))
        on_failure("lost")
        return None
    try:
        if not transport.send_nowait(_SWITCHING % accept_key):
            await transport.flush()
    except _BROKEN:
        on_failure("lost")
        return None
    return WebSocketConnection(
        transport,
        client=False,
        node_id=node_id,
        project_id=project_id,
        remote=remote,
        max_message_size=max_message_size,
        trailing=trailing,
        stall_timeout=stall_timeout,
    )


async def _read_request(transport: TlsTransport) -> tuple[h11.Request, bytes]:
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
            data = await transport.receive_some()
            if not data:
                raise trio.BrokenResourceError("EOF before the upgrade request")
            parser.receive_data(data)
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
    authenticate: Authenticate, transport: TlsTransport, node_id: str, remote: str
) -> None:
    """Raise HandshakeRejected(403) when `authenticate` refuses this node's certificate."""
    reason = authenticate(node_id, transport.getpeercert())
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


async def _send_rejection(transport: TlsTransport, status: int) -> None:
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
            transport.send_nowait(head + body)
            await transport.aclose()
        except _BROKEN:
            pass
    transport.abort()


def _host_of(sock: socket.socket) -> str:
    try:
        return peer_host(sock.getpeername())
    except OSError:
        return ""


def _peer_of(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
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
    sock = detach_socket(tcp)
    transport = TlsTransport(sock, ssl_context, server_side=False, server_hostname=host)
    try:
        await transport.do_handshake()
        trailing = await _client_upgrade(transport, host, port, path, headers)
    except _BROKEN as exc:
        transport.abort()
        # Typically the hub refusing our certificate, which TLS 1.3 reports only now.
        raise HandshakeRejected(0, f"TLS or connection failure: {_describe(exc)}") from None
    except BaseException:
        transport.abort()
        raise
    return WebSocketConnection(
        transport,
        client=True,
        node_id=node_id,
        project_id=project_id,
        remote=f"{host}:{port}",
        max_message_size=max_message_size,
        trailing=trailing,
    )


async def _client_upgrade(
    transport: TlsTransport,
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
    if not transport.send_nowait(client.send(request) or b""):
        await transport.flush()
    client.send(h11.EndOfMessage())
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await transport.receive_some()
            if not data:
                raise HandshakeRejected(0, "connection closed during the upgrade")
            client.receive_data(data)
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
