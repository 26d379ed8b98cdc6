"""The Unix-socket request server used by a cloud-side CSI driver (spec 8).

Protocol, as KubeEdge's `udsserver` and its client `csidriver/uds.go` speak it: one request per
connection, no framing. The client writes the JSON of one beehive message (a volume operation
for `node/<id>/<ns>/volume/<volume id>`) and, without closing its side, reads the answer; the
server hands the message to the hub, which sends it to the node and waits for the node's
`response`, writes that message's JSON and closes. Every failure is answered with an `error`
message (spec 3.1 error form: route source `cloudhub`, the request's group and resource,
operation `error`, content the reason, parent id the request's id when known).

Where we differ from KubeEdge, on purpose:
- KubeEdge does ONE read of up to 10,480 bytes and takes it as the whole request, so a request
  that arrives in two pieces is cut. We read until the bytes hold one complete JSON value (an
  O(n) scan, `_JsonEnd`) or the client closes its side, up to `max_request_bytes` (default
  64 KiB: six times KubeEdge's buffer, so every request KubeEdge can read fits, while 64
  concurrent connections hold at most 4 MiB), within `read_timeout` (10 s) so an idle client
  cannot hold a connection slot. Bytes after the JSON value are ignored.
- Undecodable JSON is answered with an `error` message (KubeEdge dereferences nil and crashes).
- The socket file is created mode 0600 (chmod between bind and listen, so it never accepts
  connections while wider), a stale socket is replaced but any other file is refused, and the
  file is removed when the server stops.
- The answer is written as Go's `json.Marshal` writes it (no trailing newline), in one write:
  the KubeEdge client reads it with a single read of 10,480 bytes too.

`tcp://host:port` is accepted as KubeEdge does (tests use port 0); it has no access control.
This module is an I/O skin: it knows nothing of the hub beyond `HubRequest`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import (
    OP_ERROR,
    SOURCE_CLOUDHUB,
    Message,
    error_to,
    new_message,
    node_id_of,
)

log = logging.getLogger("trio_cloudhub.uds")

# Send `message` to its node and return the node's answer; raise `UdsRequestError` (its text
# is answered) when it cannot be sent. The server bounds the wait (`answer_timeout`).
HubRequest = Callable[[Message], Awaitable[Message]]

ANSWER_TIMEOUT = 60.0  # KubeEdge's CSISyncMsgRespTimeout: one minute for the edge's answer
READ_TIMEOUT = 10.0  # the whole request must arrive within this
WRITE_TIMEOUT = 10.0  # the client must take the answer within this
CLOSE_TIMEOUT = 2.0
MAX_REQUEST_BYTES = 64 * 1024
KUBEEDGE_READ_BYTES = 10_480  # KubeEdge's single read, both sides (for reference)
MAX_CONNECTIONS = 64  # further clients wait in the listen backlog
RECEIVE_BYTES = 16 * 1024
BACKLOG = 128
SOCKET_MODE = 0o600
DIRECTORY_MODE = 0o755  # KubeEdge's mode for the socket's parent directory
# accept() errors that mean "out of resources for now": wait and retry (as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_SLEEP = 0.1
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class UdsRequestError(Exception):
    """Raised by a `HubRequest` that cannot serve a request; the text goes to the client."""


class UdsSocketError(OSError):
    """The server's socket cannot be created (path and reason in the message)."""


class _RequestTooLarge(Exception):
    pass


# --- addresses ----------------------------------------------------------------------------


def unix_socket_path(address: str) -> str:
    """`unix://<path>` -> absolute path: KubeEdge strips the scheme and prepends "/"."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme.lower() != "unix" or not rest.strip("/"):
        raise ValueError(f"not a unix:// socket address: {address!r}")
    return "/" + rest.lstrip("/")


def tcp_host_port(address: str) -> tuple[str, int]:
    """`tcp://host:port` -> (host, port); host may be empty (all interfaces) or `[v6]`."""
    scheme, sep, rest = address.partition("://")
    host, colon, port_text = rest.rpartition(":")
    digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not sep or scheme.lower() != "tcp" or not colon or not digits:
        raise ValueError(f"not a tcp://host:port address: {address!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range in {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


# --- request framing (pure) ---------------------------------------------------------------


class _JsonEnd:
    """Finds where the first JSON value of a byte stream ends, fed piece by piece, O(n).

    Tracks strings, escapes and bracket depth only; the parser judges validity afterwards.
    A stream whose first non-blank byte does not open an object or array is "ended" at once,
    so garbage is answered without waiting for the read deadline.
    """

    _OPEN = frozenset(b"{[")
    _CLOSE = frozenset(b"}]")
    _BLANK = frozenset(b" \t\r\n")

    def __init__(self) -> None:
        self.end: int | None = None  # bytes up to here hold the value
        self._seen = 0
        self._depth = 0
        self._started = False
        self._in_string = False
        self._escape = False

    def feed(self, data: bytes | bytearray) -> bool:
        """Scan the bytes of `data` not seen yet; True once the value's end is known."""
        if self.end is not None:
            return True
        start, self._seen = self._seen, len(data)
        for index in range(start, len(data)):
            byte = data[index]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:  # quote
                    self._in_string = False
            elif not self._started:
                if byte in self._OPEN:
                    self._started = True
                    self._depth = 1
                elif byte not in self._BLANK:
                    self.end = len(data)  # not an object: let the parser say what is wrong
                    return True
            elif byte == 0x22:
                self._in_string = True
            elif byte in self._OPEN:
                self._depth += 1
            elif byte in self._CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    self.end = index + 1
                    return True
        return False


def parse_request(data: bytes, max_size: int = MAX_REQUEST_BYTES) -> Message:
    """The request message in `data` (Go JSON form); `codec.CodecError` when there is none."""
    if not data.strip():
        raise codec.CodecError("empty request")
    return codec.decode(data, max_size)


def encode_reply(message: Message) -> bytes:
    """The answer as Go's `json.Marshal` writes it: no trailing newline."""
    return codec.go_json(codec.message_to_dict(message)).encode()


def error_reply(request: Message | None, reason: str, now_ms: int) -> Message:
    """Spec 8's error answer; without a parsed request only the route source is known."""
    if request is not None:
        return error_to(request, reason, now_ms)
    return new_message(
        source=SOURCE_CLOUDHUB,
        group="",
        operation=OP_ERROR,
        resource="",
        content=reason,
        now_ms=now_ms,
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the server ---------------------------------------------------------------------------


async def serve_uds(
    hub_request: HubRequest,
    address: str,
    *,
    answer_timeout: float = ANSWER_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    write_timeout: float = WRITE_TIMEOUT,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve CSI volume requests on `address` (`unix://<path>` or `tcp://host:port`).

    Never returns; supports `nursery.start`: `task_status.started(bound)` once listening,
    where `bound` is `unix:///<path>` or `tcp://<host>:<port>` with the real port (port 0
    picks a free one). Raises `UdsSocketError` (an `OSError`) when the socket cannot be
    created, e.g. permission denied, or a file that is not a socket lies at the path, and
    `ValueError` for an address of another form. A Unix socket file is removed on exit.
    """
    serve = partial(
        _serve_connection,
        hub_request,
        answer_timeout=answer_timeout,
        read_timeout=read_timeout,
        write_timeout=write_timeout,
        max_request_bytes=max_request_bytes,
    )
    if address.lower().startswith("tcp://"):
        host, port = tcp_host_port(address)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None, backlog=BACKLOG)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UdsSocketError(
                exc.errno or errno.EINVAL, f"cannot listen on {address}: {reason}"
            ) from exc
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        bound = f"tcp://{shown}:{bound_port}"
        log.info("UDS request server listening on %s (tcp: no access control)", bound)
        try:
            task_status.started(bound)
            await _accept_loops(listeners, serve, max_connections)
        finally:
            for listener in listeners:
                listener.socket.close()
        return
    path = unix_socket_path(address)
    listener, identity = await _open_unix_listener(path)
    try:
        log.info("UDS request server listening on unix://%s", path)
        task_status.started(f"unix://{path}")
        await _accept_loops([listener], serve, max_connections)
    finally:
        listener.socket.close()  # synchronous: cancellation cannot skip the cleanup
        _remove_own_socket(path, identity)


async def _open_unix_listener(path: str) -> tuple[trio.SocketListener, tuple[int, int]]:
    """A listening socket at `path`, mode 0600; returns it and the file's (dev, inode)."""
    _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        try:
            os.makedirs(os.path.dirname(path) or "/", mode=DIRECTORY_MODE, exist_ok=True)
            await sock.bind(path)
            bound = True
            # Before listen(): until then no client can connect, whatever the umask gave it.
            os.chmod(path, SOCKET_MODE)
            sock.listen(BACKLOG)
            info = os.stat(path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UdsSocketError(
                exc.errno or errno.EINVAL, f"cannot serve the Unix socket {path}: {reason}"
            ) from exc
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return trio.SocketListener(sock), (info.st_dev, info.st_ino)


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left at `path` (KubeEdge does too); refuse any other file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UdsSocketError(
            exc.errno or errno.EINVAL, f"cannot serve the Unix socket {path}: {exc.strerror}"
        ) from exc
    if not stat.S_ISSOCK(info.st_mode):
        raise UdsSocketError(
            errno.EEXIST,
            f"cannot serve the Unix socket {path}: a file that is not a socket is there "
            "(refusing to replace it)",
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UdsSocketError(
            exc.errno or errno.EINVAL,
            f"cannot remove the stale Unix socket {path}: {exc.strerror}",
        ) from exc
    log.info("removed a stale Unix socket at %s", path)


def _remove_own_socket(path: str, identity: tuple[int, int]) -> None:
    """Unlink `path` if it is still the socket we bound (not a successor's)."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)


async def _accept_loops(
    listeners: list[trio.SocketListener],
    serve: Callable[[trio.SocketStream, str], Awaitable[None]],
    max_connections: int,
) -> None:
    """Accept on every listener; at most `max_connections` connections are open at a time."""
    slots = trio.Semaphore(max_connections)
    numbers = itertools.count(1)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, serve, slots, numbers, nursery)


async def _accept_loop(
    listener: trio.SocketListener,
    serve: Callable[[trio.SocketStream, str], Awaitable[None]],
    slots: trio.Semaphore,
    numbers: itertools.count[int],
    nursery: trio.Nursery,
) -> None:
    while True:
        await slots.acquire()  # a free slot before accepting: the rest wait in the backlog
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error("UDS accept failed (%s); retrying", os.strerror(exc.errno or 0))
            await trio.sleep(ACCEPT_RETRY_SLEEP)
            continue
        except BaseException:
            slots.release()
            raise
        nursery.start_soon(_run_connection, serve, stream, f"uds#{next(numbers)}", slots)


async def _run_connection(
    serve: Callable[[trio.SocketStream, str], Awaitable[None]],
    stream: trio.SocketStream,
    name: str,
    slots: trio.Semaphore,
) -> None:
    try:
        await serve(stream, name)
    except Exception:
        # Our bug on one connection must not end the server (and the hub with it).
        log.exception("UDS %s: connection failed", name)
    finally:
        slots.release()


async def _serve_connection(
    hub_request: HubRequest,
    stream: trio.SocketStream,
    name: str,
    *,
    answer_timeout: float,
    read_timeout: float,
    write_timeout: float,
    max_request_bytes: int,
) -> None:
    """One connection: read the request, answer it (or say why not), close."""
    try:
        reply = await _answer(
            hub_request,
            stream,
            name,
            answer_timeout=answer_timeout,
            read_timeout=read_timeout,
            max_request_bytes=max_request_bytes,
        )
        if reply is not None:
            with trio.move_on_after(write_timeout) as scope:
                await stream.send_all(encode_reply(reply))
            if scope.cancelled_caught:
                log.warning(
                    "UDS %s: client did not take the answer within %g s", name, write_timeout
                )
    except _BROKEN as exc:
        log.debug("UDS %s: connection ended: %r", name, exc)
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await stream.aclose()


async def _answer(
    hub_request: HubRequest,
    stream: trio.SocketStream,
    name: str,
    *,
    answer_timeout: float,
    read_timeout: float,
    max_request_bytes: int,
) -> Message | None:
    """The message to write back (the node's answer or an error), None to just close."""
    try:
        with trio.fail_after(read_timeout):
            data = await _read_request(stream, max_request_bytes)
    except trio.TooSlowError:
        return _refuse(name, None, f"no complete request within {read_timeout:g} s")
    except _RequestTooLarge:
        return _refuse(name, None, f"request larger than {max_request_bytes} bytes")
    if not data.strip():
        log.debug("UDS %s: client closed without sending a request", name)
        return None
    try:
        request = parse_request(data, max_request_bytes)
    except codec.CodecError as exc:
        return _refuse(name, None, f"undecodable request: {exc}")
    if not node_id_of(request.resource):
        return _refuse(name, request, f"resource {request.resource!r} names no node")
    try:
        with trio.fail_after(answer_timeout):
            answer = await hub_request(request)
    except UdsRequestError as exc:
        return _refuse(name, request, str(exc) or type(exc).__name__)
    except trio.TooSlowError:
        node_id = node_id_of(request.resource)
        reason = f"no answer from node {node_id} within {answer_timeout:g} s"
        return _refuse(name, request, reason)
    except Exception:
        log.exception("UDS %s: internal error serving %s", name, _describe(request))
        return error_reply(request, "internal error", _now_ms())
    log.info("UDS %s: %s answered (%s)", name, _describe(request), answer.operation)
    return answer


def _refuse(name: str, request: Message | None, reason: str) -> Message:
    """Log why (once, no content: a CSI request may carry secrets) and build the answer."""
    if request is None:
        log.warning("UDS %s: request refused: %s", name, reason)
    else:
        log.warning("UDS %s: %s refused: %s", name, _describe(request), reason)
    return error_reply(request, reason, _now_ms())


def _describe(request: Message) -> str:
    return f"{request.operation or '(no operation)'} {request.resource or '(no resource)'}"


async def _read_request(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """Bytes up to the end of the first JSON value, or all of them once the client closed."""
    data = bytearray()
    scanner = _JsonEnd()
    while True:
        chunk = await stream.receive_some(RECEIVE_BYTES)
        if not chunk:
            return bytes(data)
        data += chunk
        if scanner.feed(data):
            end = scanner.end if scanner.end is not None else len(data)
            if end > max_bytes:
                raise _RequestTooLarge
            return bytes(data[:end])
        if len(data) > max_bytes:
            raise _RequestTooLarge
