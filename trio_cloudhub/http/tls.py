"""TLS for the HTTPS port that *asks* for a client certificate and never rejects one.

Go's `tls.RequestClientCert`, which CloudCore uses on port 10002: the server requests a
certificate, accepts whatever the client presents (or nothing) and lets the handler decide,
so a certificate from a foreign CA gets HTTP 401 instead of a failed handshake (spec 7.4,
conformance item 48). Python's `ssl` cannot do that: `CERT_OPTIONAL` verifies a presented
certificate and fails the handshake. pyOpenSSL can (a verify callback that accepts), so this
port runs pyOpenSSL over memory BIOs on a trio socket stream: every byte the TLS engine wants
to send is flushed to the socket, every byte read from the socket is fed to it.

`OpenSSLStream` is a `trio.abc.Stream` for one task at a time (the HTTP server reads a
request, then writes the answer). The peer's certificate is only *presented* here: the
handler must verify it (`pki.client_cert.verify_rotation_cert`).

`EagerSocketStream` is the socket under it on the port: trio's `SocketStream` yields to the
scheduler after every call that did not have to wait, and a probe's exchange (the
handshake's flights, the session tickets, the answer, close_notify) is about six such calls;
under a flood every yield is a whole scheduler round of the other connections' work.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from trio_cloudhub.netlimits import Turn

RECEIVE_BYTES = 64 * 1024
# Calls answered without waiting in a row before one real yield to the scheduler, so a peer
# that keeps the socket ready cannot keep the task from ever yielding.
FAIRNESS_CALLS = 16


def request_client_cert_context(cert_pem: bytes, key_pem: bytes) -> SSL.Context:
    """TLS 1.2+ with our certificate; a client certificate requested, never verified."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate(x509.load_pem_x509_certificate(cert_pem))
    key = serialization.load_pem_private_key(key_pem, password=None)
    context.use_privatekey(key)  # type: ignore[arg-type]
    context.check_privatekey()
    context.set_verify(SSL.VERIFY_PEER, _accept_any)
    # Without a session id context OpenSSL refuses resumption of client-authenticated sessions.
    context.set_session_id(b"trio-cloudhub-https")
    return context


def _accept_any(connection: Any, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    return True  # the handler checks the certificate (RequestClientCert)


class OpenSSLStream(trio.abc.Stream):
    """Server-side TLS over `transport` (see the module docstring)."""

    def __init__(self, transport: trio.abc.Stream, context: SSL.Context) -> None:
        self.transport = transport
        self._tls = SSL.Connection(context, None)
        self._tls.set_accept_state()
        self._handshake_done = False
        self._eof = False
        # A send was interrupted (cancelled) with a record taken from OpenSSL and not all
        # sent: anything written after it would reach the peer as a corrupt record.
        self._torn = False

    async def do_handshake(self, turn: Turn | None = None) -> None:
        """The TLS handshake; `BrokenResourceError` when it fails or the peer goes away.
        `turn`: entered around every step on received bytes, the costly ones (the key
        exchange and signature, the client certificate; `netlimits.HandshakeTurns`)."""
        if self._handshake_done:
            return
        received = False
        while True:
            try:
                if received and turn is not None:
                    async with turn():
                        self._tls.do_handshake()
                else:
                    self._tls.do_handshake()
            except SSL.WantReadError:
                await self._flush()
                await self._feed()
                received = True
                continue
            except SSL.Error as exc:
                await self._flush_quietly()  # the alert, if any
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            self._handshake_done = True
            await self._flush()
            return

    def peer_certificate_der(self) -> bytes | None:
        """DER of the certificate the client presented, unverified; None without one."""
        cert = self._tls.get_peer_certificate(as_cryptography=True)
        return cert.public_bytes(serialization.Encoding.DER) if cert is not None else None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self.do_handshake()
        size = max_bytes or RECEIVE_BYTES
        while True:
            if self._eof:
                return b""
            try:
                return bytes(self._tls.recv(size))
            except SSL.WantReadError:
                await self._flush()  # e.g. a TLS 1.3 session ticket or key update answer
                await self._feed(allow_eof=True)
            except SSL.ZeroReturnError:  # close_notify
                self._eof = True
            except SSL.Error as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.do_handshake()
        view = memoryview(data)
        try:
            while view:
                sent = self._tls.send(bytes(view[:RECEIVE_BYTES]))
                view = view[sent:]
                await self._flush()
        except SSL.Error as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """close_notify when the handshake was done (best effort), then close the socket."""
        try:
            if self._handshake_done and not self._torn:
                with contextlib.suppress(SSL.Error):
                    self._tls.shutdown()
                await self._flush_quietly()
        finally:
            await self.transport.aclose()

    async def _feed(self, *, allow_eof: bool = False) -> None:
        data = await self.transport.receive_some(RECEIVE_BYTES)
        if not data:
            if allow_eof:  # a client that closes without close_notify (https-compatible)
                self._eof = True
                return
            raise trio.BrokenResourceError("the peer closed the connection during the handshake")
        self._tls.bio_write(data)

    async def _flush(self) -> None:
        while True:
            try:
                chunk = self._tls.bio_read(RECEIVE_BYTES)
            except SSL.WantReadError:
                return
            if not chunk:
                return
            if self._torn:
                raise trio.BrokenResourceError("an earlier send was interrupted")
            self._torn = True
            await self.transport.send_all(chunk)
            self._torn = False

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()


class EagerSocketStream(trio.abc.Stream):
    """A non-blocking stdlib socket as a stream that yields to the scheduler only when it
    must wait for the socket, or after FAIRNESS_CALLS calls in a row that did not wait.
    Every call still raises `Cancelled` when its scope is cancelled. One task at a time.
    (The WebSocket port's `edge.tls.TlsTransport` treats its socket the same way.)"""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._unyielded = 0

    async def _enter(self) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("the socket was closed")
        self._unyielded += 1
        if self._unyielded >= FAIRNESS_CALLS:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._enter()
        while True:
            try:
                return self.socket.recv(max_bytes or RECEIVE_BYTES)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            await trio.lowlevel.wait_readable(self.socket)
            self._unyielded = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._enter()
        with memoryview(data) as whole:
            view = whole
            while view:
                try:
                    view = view[self.socket.send(view) :]
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc
                if view:
                    await trio.lowlevel.wait_writable(self.socket)
                    self._unyielded = 0

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def aclose(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
