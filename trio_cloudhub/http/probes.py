"""Plain-HTTP `/readyz` and `/livez` in a thread of their own (`trioCloudHub.probeBindAddress`).

Why a thread: under a flood of idle or slow clients the trio loop's turns grow long (every
TLS handshake is CPU work that never yields), and a probe on the HTTPS port needs several
turns. This listener never waits for the loop: the loop sets a heartbeat (with the readiness
it saw) every HEARTBEAT seconds, the thread answers from it. A loop that has not beaten for
STALE seconds is reported as not ready and not live, so a hung hub still fails its probes.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

import trio

logger = logging.getLogger("trio_cloudhub.http.probes")

HEARTBEAT = 0.25
STALE = 5.0
MAX_REQUEST_BYTES = 4096  # a probe's request head is a few hundred bytes
REQUEST_TIMEOUT = 2.0
MAX_CONNECTIONS = 64  # past it the oldest is closed: the port cannot be flooded into memory


class ProbeState:
    """What the loop last said (written by the loop, read by the thread: plain attributes)."""

    def __init__(self) -> None:
        self.ready = False
        self.beat = time.monotonic()

    def update(self, ready: bool) -> None:
        self.ready = ready
        self.beat = time.monotonic()

    def answer(self, path: str) -> tuple[int, bytes]:
        stalled = time.monotonic() - self.beat > STALE
        if path == "/livez":
            return (503, b"event loop stalled") if stalled else (200, b"ok")
        if path == "/readyz":
            return (200, b"ok") if self.ready and not stalled else (503, b"not ready")
        return 404, b"404 page not found"


def parse_bind_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def open_probe_socket(address: str, *, reuse_port: bool = False) -> socket.socket:
    host, port = parse_bind_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _response(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable", 400: "Bad Request"}
    return (
        f"HTTP/1.1 {status} {reason.get(status, '')}\r\nContent-Type: text/plain; charset=utf-8"
        f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1") + body


class _Client:
    __slots__ = ("data", "deadline", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""
        self.deadline = time.monotonic() + REQUEST_TIMEOUT


class ProbeThread(threading.Thread):
    """Serves the probe socket until `stop()`; any error on one connection closes only it."""

    def __init__(self, sock: socket.socket, state: ProbeState) -> None:
        super().__init__(name="probes", daemon=True)
        self.sock = sock
        self.state = state
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._clients: dict[socket.socket, _Client] = {}  # insertion order: oldest first

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.sock, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping:
                    for key, _ in selector.select(timeout=0.5):
                        if key.fileobj is self.sock:
                            self._accept(selector)
                        elif key.fileobj is not self._wake_r:
                            self._read(selector, key.fileobj)  # type: ignore[arg-type]
                    self._expire(selector)
        except Exception:
            logger.exception("the probe listener failed; probes on it stop answering")
        finally:
            for client in list(self._clients):
                client.close()
            self._clients.clear()
            for sock in (self.sock, self._wake_r, self._wake_w):
                sock.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        for _ in range(64):
            try:
                connection, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("probe listener: accept failed: %s", exc)
                return
            connection.setblocking(False)
            if len(self._clients) >= MAX_CONNECTIONS:
                self._close(selector, next(iter(self._clients)))
            self._clients[connection] = _Client(connection)
            selector.register(connection, selectors.EVENT_READ)

    def _read(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        client = self._clients.get(sock)
        if client is None:
            return
        try:
            chunk = sock.recv(MAX_REQUEST_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(selector, sock)
            return
        client.data += chunk
        if b"\r\n\r\n" in client.data or b"\n\n" in client.data:
            self._answer(selector, client)
        elif len(client.data) > MAX_REQUEST_BYTES:
            self._send_and_close(selector, sock, _response(400, b"request head too large"))

    def _answer(self, selector: selectors.BaseSelector, client: _Client) -> None:
        method, _, rest = client.data.partition(b" ")
        target = rest.partition(b" ")[0].decode("latin-1").partition("?")[0]
        if method not in (b"GET", b"HEAD"):
            status, body = 405, b"method not allowed"
        else:
            status, body = self.state.answer(target)
        response = _response(status, body)
        if method == b"HEAD":
            response = response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        self._send_and_close(selector, client.sock, response)

    def _send_and_close(
        self, selector: selectors.BaseSelector, sock: socket.socket, data: bytes
    ) -> None:
        with contextlib.suppress(OSError):
            sock.send(data)  # a few hundred bytes: the socket buffer takes them at once
        self._close(selector, sock)

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for sock, client in list(self._clients.items()):
            if client.deadline < now:
                self._close(selector, sock)

    def _close(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        self._clients.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(sock)
        sock.close()


async def serve_probes(
    address: str,
    ready_check: Callable[[], bool] | None,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the probe thread and beat its heartbeat until cancelled; reports the bound port."""
    sock = open_probe_socket(address, reuse_port=reuse_port)
    port = int(sock.getsockname()[1])
    state = ProbeState()
    state.update(ready_check is None or ready_check())
    thread = ProbeThread(sock, state)
    thread.start()
    logger.info("plain-HTTP probes (/readyz, /livez) listening on %s", address)
    task_status.started(port)
    try:
        while True:
            state.update(ready_check is None or ready_check())
            await trio.sleep(HEARTBEAT)
    finally:
        thread.stop()
        with trio.move_on_after(2.0, shield=True):
            await trio.to_thread.run_sync(thread.join)
