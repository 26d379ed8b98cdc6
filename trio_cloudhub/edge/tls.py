"""TLS on a non-blocking socket for the WebSocket transport: `ssl.SSLObject` over memory BIOs.

trio's `SSLStream` serves any stream and any use of TLS, and pays for it on every call
(conflict detectors, locks, a retry loop, a checkpoint per socket operation). This is the
TLS the hub needs, on a plain socket that trio's I/O waits (`wait_readable`,
`wait_writable`) watch:

- writing is synchronous: `send_nowait` encrypts (`SSLObject.write`) and hands the record
  to the kernel (one `send`); what the kernel does not take waits, in order, in `_pending`
  for `flush()`, the only writer that waits (one task at a time). A cancelled flush loses
  nothing: the bytes stay queued, so the stream never breaks half-way through a record;
- reading (`receive_some`, one task) decrypts what the SSLObject holds, else receives from
  the socket; cancel-safe (bytes received are in the SSLObject before the next wait);
- every byte the TLS layer produces, also while reading (a TLS 1.3 KeyUpdate answer, an
  alert), goes out behind what was written before;
- plaintext is encrypted and received data fed in slices of at most 16 KiB, so the memory
  BIOs (which keep their largest size) stay small on connections that carried big messages;
- TLS 1.2 renegotiation is refused on the server side (`server_context_options`), as Go's
  server does; a write that would have to wait for the peer fails the connection.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from collections import deque
from functools import partial

import trio

from trio_cloudhub.edge.poller import ReadPoller, ReadyCallback
from trio_cloudhub.netlimits import Turn

RECEIVE_BYTES = 16 * 1024
WRITE_SLICE = 16 * 1024
# Reads answered from buffered data in a row before one real yield to the scheduler, so a
# peer that keeps the socket full cannot keep the reading task from ever yielding.
FAIRNESS_READS = 16
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled


def server_context_options(context: ssl.SSLContext) -> None:
    """What the hub's WebSocket port asks of its context: no session tickets (edges do not
    resume, and a ticket costs an encryption and a record per handshake) and no TLS 1.2
    renegotiation."""
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION


def detach_socket(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under a trio SocketStream (non-blocking; the stream is unusable)."""
    trio_socket = stream.socket
    family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
    sock = socket.socket(family, kind, proto, fileno=trio_socket.detach())
    sock.setblocking(False)
    return sock


class TlsTransport:
    """One TLS connection; see the module docstring for its rules."""

    __slots__ = (
        "_broken",
        "_drained",
        "_flush_lock",
        "_incoming",
        "_outgoing",
        "_parked",
        "_pending",
        "_sock",
        "_ssl",
        "_timed_out",
        "_unyielded",
    )

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._pending: deque[memoryview] | None = None  # bytes the kernel has not taken yet
        self._flush_lock: trio.StrictFIFOLock | None = None  # made on the first flush
        self._broken = ""  # why the connection cannot be used any more
        self._timed_out = False  # the kernel gave up on the peer (ETIMEDOUT)
        self._drained = True  # the last receive emptied the socket: wait before the next
        self._unyielded = 0
        self._parked: tuple[ReadPoller, ReadyCallback] | None = None

    # --- handshake and state ------------------------------------------------------------

    async def do_handshake(self, turn: Turn | None = None) -> None:
        """The TLS handshake; raises trio.BrokenResourceError (cause: the SSLError or
        OSError) when it fails. Bound it with the caller's deadline. `turn`: entered around
        every step on received bytes (the key exchange and signature, the client
        certificate's verification: the CPU work), e.g. `netlimits.HandshakeTurns.turn`."""
        received = False
        while True:
            try:
                if received and turn is not None:
                    async with turn():
                        self._ssl.do_handshake()
                else:
                    self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._send_output()
                if not await self._receive_raw():
                    raise trio.BrokenResourceError("EOF during the TLS handshake") from None
                received = True
                continue
            except ssl.SSLError as exc:
                self._broken = f"TLS handshake failed: {exc}"
                await self._send_alert()
                raise trio.BrokenResourceError(self._broken) from exc
            await self._send_output()
            return

    async def _send_output(self) -> None:
        self._push_output()
        await self.flush()

    async def _send_alert(self) -> None:
        """Best effort: the alert OpenSSL wrote, so the peer learns why (never waits)."""
        try:
            data = self._outgoing.read()
            if data:
                self._sock.send(data)
        except OSError:
            pass

    def getpeercert(self) -> bytes | None:
        """The peer's certificate (DER), or None."""
        return self._ssl.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self._ssl.version()

    @property
    def broken(self) -> str:
        """Why the connection failed or was closed ("" while it works)."""
        return self._broken

    @property
    def timed_out(self) -> bool:
        """The kernel ended the connection: sent bytes unacknowledged too long (ETIMEDOUT,
        e.g. TCP_USER_TIMEOUT)."""
        return self._timed_out

    def _lose(self, exc: OSError) -> trio.BrokenResourceError:
        self._broken = f"connection lost: {type(exc).__name__}: {exc}"
        self._timed_out = exc.errno == errno.ETIMEDOUT
        return trio.BrokenResourceError(self._broken)

    @property
    def pending_bytes(self) -> int:
        """Bytes written but not taken by the kernel yet (waiting for `flush`)."""
        return sum(len(chunk) for chunk in self._pending) if self._pending else 0

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def socket(self) -> socket.socket:
        """The TCP socket below (for its addresses and options; never read or write it)."""
        return self._sock

    # --- reading ------------------------------------------------------------------------

    async def receive_some(self) -> bytes:
        """Some decrypted bytes; b"" once the peer closed (close_notify, or TCP closed
        without it, as Go's gorilla does). Raises trio.BrokenResourceError when the
        connection failed, trio.ClosedResourceError when we closed it."""
        if self._sock.fileno() == -1:
            raise trio.ClosedResourceError(self._broken)
        if self._unyielded >= FAIRNESS_READS:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()
        else:
            await _checkpoint_if_cancelled()
        while True:
            data = self._decrypted()
            if data is not None:
                self._unyielded += 1
                return data
            if self._drained:
                await trio.lowlevel.wait_readable(self._sock)
                self._unyielded = 0
            self._received()

    def receive_nowait(self) -> bytes | None:
        """As `receive_some`, without waiting: None when neither the SSLObject nor the socket
        has anything to decrypt now. Parked (`park`), the socket is received from only after
        the poller saw it readable and until a receive leaves it (probably) empty."""
        if self._sock.fileno() == -1:
            raise trio.ClosedResourceError(self._broken)
        while True:
            data = self._decrypted()
            if data is not None:
                return data
            if self._drained or not self._received():
                # An empty socket is the poller's to watch (level-triggered: bytes arriving
                # now make it call again), so no recv is spent on learning it is empty.
                return None

    def _decrypted(self) -> bytes | None:
        """What the SSLObject decrypts now (b"" at EOF); None when it needs more bytes."""
        incoming = self._incoming
        if not incoming.pending and not incoming.eof and not self._ssl.pending():
            return None  # nothing to decrypt: spare the read its SSLWantReadError
        try:
            data: bytes | None = self._ssl.read(RECEIVE_BYTES)
        except ssl.SSLWantReadError:
            data = None
        except ssl.SSLEOFError:
            return b""  # TCP closed without close_notify
        except ssl.SSLError as exc:
            self._broken = f"TLS error: {exc}"
            raise trio.BrokenResourceError(self._broken) from exc
        if self._outgoing.pending:
            self._push_output()  # e.g. the answer to a KeyUpdate
        return data

    def _received(self) -> bool:
        """Bytes from the socket into the SSLObject (EOF included); False when it has none."""
        try:
            raw = self._sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            self._drained = True
            return False
        except OSError as exc:
            raise self._lose(exc) from exc
        self._drained = len(raw) < RECEIVE_BYTES
        if raw:
            self._incoming.write(raw)
        else:
            self._incoming.write_eof()
        return True

    # --- parking: reads by the hub's poller (edge.poller) ---------------------------------

    def park(self, poller: ReadPoller, callback: ReadyCallback) -> None:
        """Have `poller` call `callback` while the socket is readable (`receive_nowait` then
        reads); `abort()` unparks and calls it once more, so its owner learns of the end."""
        self.unpark()
        on_ready = partial(self._on_ready, callback)
        self._parked = (poller, on_ready)
        poller.register(self._sock.fileno(), on_ready)

    def _on_ready(self, callback: ReadyCallback) -> bool:
        self._drained = False  # the poller saw the socket readable: the next read receives
        return callback()

    def unpark(self) -> None:
        parked = self._parked
        if parked is not None:
            self._parked = None
            parked[0].unregister(self._sock.fileno(), parked[1])

    async def _receive_raw(self) -> bool:
        """Bytes from the socket into the SSLObject (the handshake's reads); False at EOF."""
        sock = self._sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                raw = sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._lose(exc) from exc
            if not raw:
                return False
            self._incoming.write(raw)
            return True

    # --- writing ------------------------------------------------------------------------

    def send_nowait(self, data: bytes | bytearray) -> bool:
        """Encrypt `data` and send what the kernel takes now; True when all of it went
        (False: the rest waits for `flush()`). Raises trio.BrokenResourceError."""
        if self._broken:
            raise trio.BrokenResourceError(self._broken)
        write = self._ssl.write
        try:
            if len(data) <= WRITE_SLICE:
                write(data)
                self._write_raw(self._outgoing.read())
            else:
                with memoryview(data) as view:
                    for start in range(0, len(view), WRITE_SLICE):
                        write(view[start : start + WRITE_SLICE])
                        self._write_raw(self._outgoing.read())
        except ssl.SSLError as exc:  # SSLWantReadError included: a renegotiation
            self._broken = f"TLS error while writing: {exc}"
            raise trio.BrokenResourceError(self._broken) from exc
        return self._pending is None

    def _push_output(self) -> None:
        data = self._outgoing.read()
        if data:
            self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        if self._pending is not None:
            self._pending.append(memoryview(data))
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._lose(exc) from exc
        if sent < len(data):
            self._pending = deque((memoryview(data)[sent:],))

    async def flush(self) -> None:
        """Until every byte written so far is in the kernel (no checkpoint when nothing
        waits). Cancel-safe: what is not sent stays queued, in order."""
        if self._pending is None:
            return
        lock = self._flush_lock
        if lock is None:
            lock = self._flush_lock = trio.StrictFIFOLock()
        async with lock:
            while self._pending is not None:
                if self._broken:
                    raise trio.BrokenResourceError(self._broken)
                await trio.lowlevel.wait_writable(self._sock)
                self._send_pending()

    def _send_pending(self) -> None:
        pending = self._pending
        sock = self._sock
        while pending:
            chunk = pending[0]
            try:
                sent = sock.send(chunk)
            except BlockingIOError:
                return
            except OSError as exc:
                raise self._lose(exc) from exc
            if sent < len(chunk):
                pending[0] = chunk[sent:]
                return
            pending.popleft()
        self._pending = None

    # --- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Flush, send close_notify (not waiting for the peer's), close. Bound it with the
        caller's deadline; the socket is closed however this ends."""
        try:
            if not self._broken:
                try:
                    self._ssl.unwrap()
                except ssl.SSLWantReadError:
                    pass  # close_notify is written; we do not wait for the peer's
                except ssl.SSLError:
                    pass
                self._push_output()
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.abort()

    async def linger(self) -> None:
        """After our last write (e.g. a close frame the peer must read): send close_notify and
        a TCP FIN, then read and drop until the peer closes. Closing with unread bytes would
        make the kernel reset the connection, and a reset can overtake what we sent. Bound it
        with the caller's deadline; `abort()` afterwards."""
        sock = self._sock
        try:
            if not self._broken:
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                self._push_output()
                await self.flush()
            sock.shutdown(socket.SHUT_WR)
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    if not sock.recv(RECEIVE_BYTES):
                        return
                except BlockingIOError:
                    continue
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def abort(self) -> None:
        """Close the socket now (no close_notify); waiting readers and flushers get
        trio.ClosedResourceError. Idempotent."""
        if not self._broken:
            self._broken = "closed by us"
        parked = self._parked
        self.unpark()  # before the close: the descriptor's number may be reused at once
        sock = self._sock
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        if parked is not None:
            parked[1]()  # its owner reads, finds the socket closed and wakes its task
