"""The QUIC transport of CloudHub: IETF QUIC (aioquic) carrying KubeEdge's QUIC framing.

KubeEdge's EdgeCore speaks Google QUIC (Q044, quic-go v0.10), which no Python stack
implements; this server speaks standard QUIC v1 with TLS 1.3 and the same framing (spec 4.2),
for edges built on a standard QUIC stack. It is the only module that touches asyncio: aioquic's
asyncio server runs inside trio through trio-asyncio, and its callbacks hand work to trio.

Rules of a connection:
- TLS 1.3 with the hub's server certificate; a client certificate is required and must be
  issued by the hub's CA for client auth (aioquic's server does not check it: we do, at
  handshake completion); ALPN `kubeedge`;
- the first stream the client opens is the control stream: its first message is the header
  (`node_id`, `project_id`), answered `ack` (`nack` when unusable, then the connection closes);
  later control messages are answered `ack`; the handler runs only once the header is in,
  which must come within `header_timeout`;
- any other stream starts with a 3-byte use type: `msg` streams carry packed messages, any
  other use type gets the stream reset (logged), the connection stays;
- a stream whose framing is broken (a length above the bound, protobuf garbage) is reset and
  logged; the connection and its other streams go on;
- the hub sends on one stream it opens itself (`msg`), so its messages stay in order; a send
  waits while more than SEND_BUFFER bytes are unacknowledged (backpressure);
- at most `max_incoming_streams` client streams are open at once (the QUIC stream limit);
- aioquic hands over whatever arrives (its flow-control credit is automatic), so an edge that
  gets RECEIVE_BUFFER messages ahead of the hub's reader is disconnected, where TCP would
  simply slow a WebSocket edge down; KubeEdge edges rate-limit themselves (30 qps, burst 60);
- messages cross to the hub as the Go JSON form the WebSocket path uses, so a QUIC session is
  the same hub session (queues, ACKs, keepalive, node limit, replacement on reconnect).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, NoReturn

import attrs
import trio
import trio_asyncio
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message
from trio_cloudhub.core.quic_codec import (
    MAX_PAYLOAD,
    USE_MESSAGE,
    USE_TYPE_SIZE,
    FrameError,
    PacketReader,
    header_message,
    header_reply,
    pack,
    parse_header,
)
from trio_cloudhub.edge.base import ConnectionHandler, EdgeDisconnected
from trio_cloudhub.pki.client_cert import ClientCertError, verify_client_cert

logger = logging.getLogger(__name__)

ALPN = "kubeedge"
HEADER_TIMEOUT = 10.0
RECEIVE_SOCKET_BUFFER = 4 * 1024 * 1024
SEND_BUFFER = 1024 * 1024  # unacknowledged bytes before a send waits
SEND_POLL = 0.005
RECEIVE_BUFFER = 256  # messages waiting for the session before the connection is dropped
CLOSE_TIMEOUT = 2.0
ERROR_PROTOCOL = 0x100  # application error codes on the wire (CONNECTION_CLOSE / RESET)
ERROR_IDENTITY = 0x101
ERROR_USE_TYPE = 0x102

Authenticate = Callable[[str, bytes | None], str | None]
ClientConfiguration = QuicConfiguration  # what quic_client_configuration gives connect_quic
# `on_handshake_failure(reason)`: a connection that never reached the handler, and why
# (tls, bad-request, refused:identity, timeout, lost), for the metrics.
HandshakeFailed = Callable[[str], None]


@attrs.frozen
class QuicServerSettings:
    certificate_pem: bytes
    private_key_pem: bytes = attrs.field(repr=False)
    ca_der: bytes
    max_incoming_streams: int = 10_000
    max_payload: int = MAX_PAYLOAD
    idle_timeout: float = 60.0
    header_timeout: float = HEADER_TIMEOUT


@attrs.define
class _Shared:
    """What every connection's protocol needs from the server task."""

    settings: QuicServerSettings
    handler: ConnectionHandler
    nursery: trio.Nursery
    authenticate: Authenticate | None
    on_handshake_failure: HandshakeFailed | None = None

    def handshake_failed(self, reason: str) -> None:
        if self.on_handshake_failure is not None:
            self.on_handshake_failure(reason)


async def serve_quic(
    handler: ConnectionHandler,
    settings: QuicServerSettings,
    *,
    host: str,
    port: int,
    authenticate: Authenticate | None = None,
    on_handshake_failure: HandshakeFailed | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve QUIC on UDP `host:port` forever; `task_status.started(port)` once bound.

    `on_handshake_failure(reason)` hears of connections refused before reaching `handler`
    (a TLS failure inside aioquic, before `HandshakeCompleted`, is not seen here).
    """
    # Key files are written and loaded once: in a thread, not in the event loop.
    configuration = await trio.to_thread.run_sync(_server_configuration, settings)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        shared = _Shared(settings, handler, nursery, authenticate, on_handshake_failure)
        server = await trio_asyncio.aio_as_trio(serve)(
            host or "::",
            port,
            configuration=configuration,
            create_protocol=partial(_HubProtocol, shared=shared),
        )
        try:
            _grow_receive_buffer(server._transport.get_extra_info("socket"))
            bound = int(server._transport.get_extra_info("sockname")[1])
            logger.info("QUIC server listening on udp %s:%d", host or "*", bound)
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            server.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _grow_receive_buffer(sock: Any) -> None:
    """Many handshakes and ACKs arrive in bursts while the hub is busy in Python: the
    default buffer (~200 KiB) overflowed at 1,000 edges (bench.run: thousands of datagrams
    dropped, then QUIC retransmission back-off). The kernel caps it at net.core.rmem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_SOCKET_BUFFER)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except (OSError, AttributeError) as exc:
        logger.warning("QUIC socket receive buffer left at its default: %s", exc)
        return
    if granted < RECEIVE_SOCKET_BUFFER:
        logger.warning(
            "QUIC socket receive buffer is %d bytes (asked %d; raise net.core.rmem_max)",
            granted,
            RECEIVE_SOCKET_BUFFER,
        )


def _server_configuration(settings: QuicServerSettings) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=False, alpn_protocols=[ALPN], idle_timeout=settings.idle_timeout
    )
    with _pem_files(settings.certificate_pem, settings.private_key_pem) as (cert, key):
        configuration.load_cert_chain(cert, key)
    return configuration


@contextmanager
def _pem_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """aioquic loads a key pair only from files: a private temp dir, removed once loaded."""
    with tempfile.TemporaryDirectory(prefix="trio-cloudhub-quic-") as folder:
        cert, key = os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key")
        with open(cert, "wb") as file:
            file.write(cert_pem)
        descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(key_pem)
        yield cert, key


class _StreamError(Exception):
    def __init__(self, why: str, code: int = ERROR_PROTOCOL) -> None:
        super().__init__(why)
        self.code = code


class _Streams:
    """The receive side of a connection's streams: use types, then packed messages.

    The control stream (the client's first) has no use type; any other stream starts with
    one, except those we opened ourselves (`expect_messages`).
    """

    def __init__(self, max_payload: int) -> None:
        self._max_payload = max_payload
        self._readers: dict[int, PacketReader] = {}
        self._use: dict[int, bytes] = {}  # use-type bytes so far of a new stream
        self.control: int | None = None

    def expect_messages(self, stream_id: int, *, control: bool = False) -> None:
        self._readers[stream_id] = PacketReader(max_payload=self._max_payload)
        if control:
            self.control = stream_id

    def feed(self, stream_id: int, data: bytes) -> list[Message]:
        """The whole messages `data` completes; _StreamError when the stream is unusable."""
        if self.control is None and stream_id % 4 == 0:  # the client's first stream
            self.expect_messages(stream_id, control=True)
        reader = self._readers.get(stream_id)
        if reader is None:
            data = self._take_use_type(stream_id, data)
            reader = self._readers.get(stream_id)
            if reader is None or not data:
                return []
        try:
            return reader.feed(data)
        except FrameError as exc:
            self.drop(stream_id)
            raise _StreamError(str(exc)) from None

    def buffered(self, stream_id: int) -> int:
        reader = self._readers.get(stream_id)
        return reader.buffered if reader is not None else len(self._use.get(stream_id, b""))

    def drop(self, stream_id: int) -> None:
        self._readers.pop(stream_id, None)
        self._use.pop(stream_id, None)

    def _take_use_type(self, stream_id: int, data: bytes) -> bytes:
        have = self._use.pop(stream_id, b"") + data
        if len(have) < USE_TYPE_SIZE:
            self._use[stream_id] = have
            return b""
        use, rest = have[:USE_TYPE_SIZE], have[USE_TYPE_SIZE:]
        if use != USE_MESSAGE:
            raise _StreamError(f"unknown stream use type {use!r}", ERROR_USE_TYPE)
        self.expect_messages(stream_id)
        return rest


class _HubProtocol(QuicConnectionProtocol):
    """One QUIC connection, on the asyncio side: events in, frames out."""

    def __init__(self, *args: Any, shared: _Shared, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared = shared
        settings = shared.settings
        # Cap the number of streams the client may open (advertised in the transport
        # parameters) and ask for the client certificate: aioquic keeps that switch private
        # on the TLS context it creates when the first packet arrives.
        quic = self._quic
        quic._local_max_streams_bidi.value = settings.max_incoming_streams
        initialize = quic._initialize

        def initialize_requesting_a_certificate(peer_cid: bytes) -> None:
            initialize(peer_cid)
            quic.tls._request_client_certificate = True

        quic._initialize = initialize_requesting_a_certificate  # type: ignore[method-assign]
        self.connection = QuicEdgeConnection(self, settings.max_payload)
        self._streams = _Streams(settings.max_payload)
        self._peer_der: bytes | None = None
        self._remote = ""
        self._handshake_reported = False

    # --- events -------------------------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self._on_handshake()
        elif isinstance(event, StreamDataReceived):
            self._on_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, StreamReset):
            self._streams.drop(event.stream_id)
        elif isinstance(event, ConnectionTerminated):
            self.connection.terminated(event.reason_phrase or f"error {event.error_code}")

    def _on_handshake(self) -> None:
        tls = self._quic.tls
        cert = getattr(tls, "_peer_certificate", None)
        if cert is None:
            self._handshake_failed("tls")
            self._refuse(ERROR_IDENTITY, "client certificate required")
            return
        from cryptography.hazmat.primitives.serialization import Encoding

        self._peer_der = cert.public_bytes(Encoding.DER)
        try:
            verify_client_cert(self._peer_der, self._shared.settings.ca_der, datetime.now(UTC))
        except ClientCertError as exc:
            self._handshake_failed("tls")
            self._refuse(ERROR_IDENTITY, str(exc))
            return
        self._shared.nursery.start_soon(self._run_session)

    def _handshake_failed(self, reason: str) -> None:
        self._handshake_reported = True
        self._shared.handshake_failed(reason)

    def _on_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if self.connection.closed:
            return
        try:
            messages = self._streams.feed(stream_id, data)
        except _StreamError as exc:
            self._broken_stream(stream_id, str(exc), exc.code)
            return
        for message in messages:
            if stream_id == self._streams.control:
                self._on_control(message)
            else:
                self.connection.received(message)
        if end and self._streams.buffered(stream_id):
            logger.warning("%s: stream %d ended inside a packet", self.remote, stream_id)

    def _on_control(self, message: Message) -> None:
        connection = self.connection
        if connection.node_id:
            self._write(self._streams.control, header_reply(message, ok=True, now_ms=_now_ms()))
            return
        try:
            node_id, project_id = parse_header(message)
        except FrameError as exc:
            self._write(self._streams.control, header_reply(message, ok=False, now_ms=_now_ms()))
            self._handshake_failed("bad-request")
            self._refuse(ERROR_PROTOCOL, f"bad header: {exc}")
            return
        authenticate = self._shared.authenticate
        problem = authenticate(node_id, self._peer_der) if authenticate else None
        if problem is not None:
            self._write(self._streams.control, header_reply(message, ok=False, now_ms=_now_ms()))
            self._handshake_failed("refused:identity")
            self._refuse(ERROR_IDENTITY, problem)
            return
        self._write(self._streams.control, header_reply(message, ok=True, now_ms=_now_ms()))
        connection.identified(node_id, project_id)

    # --- the session (trio) ---------------------------------------------------------------

    async def _run_session(self) -> None:
        connection = self.connection
        with trio.move_on_after(self._shared.settings.header_timeout):
            await connection.wait_identified()
        if not connection.node_id:
            if not connection.closed:
                self._handshake_failed("timeout")
                self._refuse(ERROR_PROTOCOL, "no header message on the control stream")
            elif not self._handshake_reported:
                self._handshake_failed("lost")
            return
        try:
            await self._shared.handler(connection)
        except Exception:
            logger.exception("%s: QUIC connection handler failed", connection.remote)
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()

    # --- writing --------------------------------------------------------------------------

    def _write(self, stream_id: int | None, message: Message) -> None:
        if stream_id is None or self.connection.closed:
            return
        try:
            data = pack(message, max_payload=self._shared.settings.max_payload)
        except FrameError as exc:
            logger.warning("%s: message not sent: %s", self.remote, exc)
            return
        self._quic.send_stream_data(stream_id, data)
        self.transmit()

    def open_send_stream(self) -> int:
        stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, USE_MESSAGE)
        self._streams.expect_messages(stream_id)  # the edge may answer on it too
        return stream_id

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes written on `stream_id` and not yet acknowledged by the peer."""
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _broken_stream(self, stream_id: int, why: str, code: int = ERROR_PROTOCOL) -> None:
        logger.warning("%s: stream %d reset: %s", self.remote, stream_id, why)
        self._streams.drop(stream_id)
        if stream_id == self._streams.control:
            if not self.connection.node_id:
                self._handshake_failed("bad-request")
            self._refuse(code, f"control stream: {why}")
            return
        try:
            self._quic.stop_stream(stream_id, code)
            self._quic.reset_stream(stream_id, code)
        except ValueError:
            pass  # a receive-only or already-closed stream
        self.transmit()

    def _refuse(self, code: int, why: str) -> None:
        logger.warning("%s: QUIC connection closed: %s", self.remote, why)
        self.connection.terminated(why)
        self._quic.close(error_code=code, reason_phrase=why[:200])
        self.transmit()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self._remote:
            self._remote = f"{addr[0]}:{addr[1]}"
        super().datagram_received(data, addr)

    @property
    def remote(self) -> str:
        return self._remote or "?"


class _Inbox:
    """Received messages, as JSON text, until the connection ends (both sides use one)."""

    def __init__(self, capacity: float) -> None:
        self._send, self._receive = trio.open_memory_channel[str](capacity)
        self.closed = False
        self.close_reason = ""

    def put(self, message: Message) -> bool:
        """False when the inbox is full (the reader fell `capacity` messages behind)."""
        try:
            self._send.send_nowait(codec.encode(message))
        except trio.WouldBlock:
            return False
        except trio.ClosedResourceError:
            pass
        return True

    def close(self, reason: str) -> bool:
        """End it (the first reason wins); True the first time."""
        if self.closed:
            return False
        self.closed, self.close_reason = True, reason
        self._send.close()
        return True

    def check_open(self) -> None:
        if self.closed:
            raise EdgeDisconnected(self.close_reason or "closed")

    async def receive(self) -> str:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise EdgeDisconnected(self.close_reason or "closed") from None


class QuicEdgeConnection:
    """The hub's view of one QUIC connection (`edge.base.EdgeConnection`)."""

    def __init__(self, protocol: _HubProtocol, max_payload: int) -> None:
        self._protocol = protocol
        self._max_payload = max_payload
        self._inbox = _Inbox(RECEIVE_BUFFER)
        self._identified = trio.Event()
        self._node_id = ""
        self._project_id = ""
        self._send_stream: int | None = None

    @property
    def closed(self) -> bool:
        return self._inbox.closed

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def project_id(self) -> str:
        return self._project_id

    @property
    def remote(self) -> str:
        return self._protocol.remote

    @property
    def stall_timeout(self) -> float:
        return 0.0  # send() never blocks: aioquic buffers what it cannot send yet

    def bytes_in_flight(self) -> int:
        return 0

    # called by the protocol

    def identified(self, node_id: str, project_id: str) -> None:
        self._node_id, self._project_id = node_id, project_id
        self._identified.set()

    async def wait_identified(self) -> None:
        await self._identified.wait()

    def received(self, message: Message) -> None:
        if not self._inbox.put(message):
            self._protocol._refuse(ERROR_PROTOCOL, "edge sends faster than the hub reads")

    def terminated(self, reason: str) -> None:
        if self._inbox.close(reason):
            self._identified.set()

    # EdgeConnection

    async def receive(self) -> str | bytes:
        return await self._inbox.receive()

    def send_nowait(self, text: str) -> bool:
        """Frame and hand the message to aioquic (which sends it now); False while more than
        SEND_BUFFER bytes wait for the edge's acknowledgement (`flush` waits for that)."""
        self._inbox.check_open()
        try:
            message = codec.decode(text, self._max_payload)
            data = pack(message, max_payload=self._max_payload)
        except (codec.CodecError, FrameError) as exc:
            raise EdgeDisconnected(f"cannot frame a message: {exc}") from None
        protocol = self._protocol
        if self._send_stream is None:
            self._send_stream = protocol.open_send_stream()
        protocol._quic.send_stream_data(self._send_stream, data)
        protocol.transmit()
        return protocol.unacknowledged(self._send_stream) <= SEND_BUFFER

    async def flush(self) -> None:
        protocol, stream = self._protocol, self._send_stream
        # aioquic signals no acknowledgement event: poll while too much is in flight.
        while stream is not None and protocol.unacknowledged(stream) > SEND_BUFFER:
            self._inbox.check_open()
            await trio.sleep(SEND_POLL)
        self._inbox.check_open()

    async def send(self, text: str) -> None:
        self.send_nowait(text)
        await self.flush()
        await trio.lowlevel.checkpoint()

    async def aclose(self, reason: str = "") -> None:
        if self.closed:
            return
        self.terminated(reason or "closed by the hub")
        protocol = self._protocol
        protocol._quic.close(error_code=0, reason_phrase=(reason or "")[:200])
        protocol.transmit()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await trio.lowlevel.checkpoint()


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


# --- the client side (edge simulators, benchmarks, tests) -----------------------------------


class QuicHeaderRefused(EdgeDisconnected):
    """The hub answered the header with `nack` or closed the connection."""


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = QuicClientConnection(self)

    def quic_event_received(self, event: QuicEvent) -> None:
        client = self.client
        if isinstance(event, StreamDataReceived):
            try:
                messages = client.streams.feed(event.stream_id, event.data)
            except _StreamError as exc:
                logger.warning("QUIC client: stream %d unusable: %s", event.stream_id, exc)
                return
            for message in messages:
                if event.stream_id == client.streams.control:
                    client.control_reply(message)
                else:
                    client.received(message)
        elif isinstance(event, ConnectionTerminated):
            client.terminated(event.reason_phrase or f"error {event.error_code}")


class QuicClientConnection:
    """An edge's QUIC connection to the hub: JSON text in and out, like a WebSocket."""

    def __init__(self, protocol: _ClientProtocol, max_payload: int = MAX_PAYLOAD) -> None:
        self._protocol = protocol
        self._max_payload = max_payload
        self.streams = _Streams(max_payload)
        self._inbox = _Inbox(math.inf)  # the test or simulator reads it
        self._answered = trio.Event()
        self.header_answer = ""
        self._data_stream: int | None = None

    @property
    def closed(self) -> bool:
        return self._inbox.closed

    @property
    def close_reason(self) -> str:
        return self._inbox.close_reason

    async def handshake(self, node_id: str, project_id: str) -> None:
        """Send the header on a new control stream; QuicHeaderRefused unless `ack`."""
        quic = self._protocol._quic
        control = quic.get_next_available_stream_id()
        self.streams.expect_messages(control, control=True)
        header = header_message(node_id, project_id, _now_ms())
        quic.send_stream_data(control, pack(header, max_payload=self._max_payload))
        self._protocol.transmit()
        await self._answered.wait()
        if self.header_answer != "ack":
            raise QuicHeaderRefused(self.close_reason or f"header answered {self.header_answer!r}")

    def control_reply(self, message: Message) -> None:
        if not self._answered.is_set():
            content = message.content
            self.header_answer = content if isinstance(content, str) else repr(content)
            self._answered.set()

    def received(self, message: Message) -> None:
        self._inbox.put(message)

    def terminated(self, reason: str) -> None:
        if self._inbox.close(reason):
            self._answered.set()

    async def receive(self) -> str:
        return await self._inbox.receive()

    async def send(self, text: str) -> None:
        """One message on the edge's data stream (opened with use type `msg` on first use)."""
        self._inbox.check_open()
        quic = self._protocol._quic
        if self._data_stream is None:
            self._data_stream = quic.get_next_available_stream_id()
            quic.send_stream_data(self._data_stream, USE_MESSAGE)
        data = pack(codec.decode(text, self._max_payload), max_payload=self._max_payload)
        quic.send_stream_data(self._data_stream, data)
        self._protocol.transmit()
        await trio.lowlevel.checkpoint()

    async def send_raw(self, stream_id: int | None, data: bytes) -> int:
        """Bytes as they are on a stream (a new one when None): for bad-input tests."""
        quic = self._protocol._quic
        if stream_id is None:
            stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(stream_id, data)
        self._protocol.transmit()
        await trio.lowlevel.checkpoint()
        return stream_id

    async def abort(self) -> None:
        """Close at once (an edge that goes away)."""
        if not self.closed:
            self.terminated("closed by the edge")
            self._protocol._quic.close(error_code=0, reason_phrase="edge closed")
            self._protocol.transmit()
        await trio.lowlevel.checkpoint()

    aclose = abort


def quic_runtime() -> Any:
    """The asyncio loop QUIC clients run in (`async with quic_runtime():`), one per process
    or per group of connections: `connect_quic` needs it."""
    return trio_asyncio.open_loop()


def quic_client_configuration(
    host: str, *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes
) -> QuicConfiguration:
    """One client configuration, reusable for many connections: the hub's CA, the edge's
    certificate and key, ALPN `kubeedge`."""
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], cadata=ca_pem, server_name=host
    )
    with _pem_files(cert_pem, key_pem) as (cert, key):
        configuration.load_cert_chain(cert, key)
    return configuration


@asynccontextmanager
async def connect_quic(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    *,
    node_id: str,
    project_id: str,
    connect_timeout: float = 10.0,
    send_header: bool = True,
) -> AsyncIterator[QuicClientConnection]:
    """A connection inside a running `quic_runtime()`, identified (header answered `ack`)
    unless `send_header=False`; closed when the block ends.

    The header is written at once and leaves with the first 1-RTT packet: its answer is the
    wait for the handshake too (a TLS failure ends it as `QuicHeaderRefused`). aioquic's own
    wait (`wait_connected`) is not used: cancelled by a timeout, it leaves a future that gets
    `ConnectionError` later, which nobody retrieves, and trio-asyncio raises such errors into
    the loop's nursery, ending every other connection of the loop too."""
    from aioquic.asyncio.client import connect

    with trio.fail_after(connect_timeout):
        manager = connect(
            host,
            port,
            configuration=configuration,
            create_protocol=_ClientProtocol,
            wait_connected=not send_header,
        )
        protocol = await trio_asyncio.aio_as_trio(manager.__aenter__)()
    client: QuicClientConnection = protocol.client
    try:
        if send_header:
            with trio.fail_after(connect_timeout):
                await client.handshake(node_id, project_id)
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await client.abort()
            await trio_asyncio.aio_as_trio(manager.__aexit__)(None, None, None)


@asynccontextmanager
async def open_quic_client(
    host: str,
    port: int,
    *,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    node_id: str,
    project_id: str,
    connect_timeout: float = 10.0,
    send_header: bool = True,
) -> AsyncIterator[QuicClientConnection]:
    """`connect_quic` in a runtime of its own (one edge; fleets share one runtime)."""
    configuration = await trio.to_thread.run_sync(
        partial(quic_client_configuration, host, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem)
    )
    async with (
        quic_runtime(),
        connect_quic(
            host,
            port,
            configuration,
            node_id=node_id,
            project_id=project_id,
            connect_timeout=connect_timeout,
            send_header=send_header,
        ) as client,
    ):
        yield client
