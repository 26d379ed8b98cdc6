"""Idle and slow clients against the hub's ports, for the flood test and `bench/flood.py`.

Kinds of connection (each bound to a chosen 127.x.y.z source address: Linux routes all of
127.0.0.0/8 to loopback, so one process can look like many clients):

- `tcp`: TCP only, never a TLS hello;
- `hello`: a TLS ClientHello and nothing more (the hub answers, then waits for us);
- `tls-idle`: a completed TLS handshake and no request (needs `client_context` on the
  WebSocket port, which requires a client certificate);
- `slow-headers`: TLS, then an HTTP request head at one byte per `trickle` seconds;
- `ws-unfinished`: TLS with a client certificate, then a WebSocket upgrade request that is
  never finished (the start at once, then one byte per `trickle` seconds).

Every connection records when it was opened and when the hub closed it (EOF or reset seen
by us), or why it could not be opened.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
import yaml

KINDS = ("tcp", "hello", "tls-idle", "slow-headers", "ws-unfinished")
RECEIVE_BYTES = 16 * 1024
# Linux: bind() picks no port until connect(), so many sockets can share a source address.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_SLOW_HEAD = b"GET /readyz HTTP/1.1\r\nHost: hub\r\nX-Slow: "
_WS_HEAD = b"GET /flood/node/events HTTP/1.1\r\nHost: hub\r\nConnection: Upgrade\r\nX-Slow: "


@attrs.define(slots=True)
class FloodConnection:
    kind: str
    port: int
    source: str
    opened: float = math.nan  # time.monotonic() once TCP connected (same clock in every process)
    ready: float = math.nan  # once in the state of its kind (TLS done for the TLS kinds)
    closed: float | None = None  # when we saw the hub close it (also during our TLS handshake)
    failed: str = ""  # could not connect: why


@attrs.define
class FloodTarget:
    """Where the flood goes and what it needs to get through TLS."""

    host: str
    https_port: int
    websocket_port: int
    client_context: ssl.SSLContext  # a valid edge identity (for the WebSocket port)
    trickle: float = 1.0


@functools.cache
def insecure_context() -> ssl.SSLContext:
    """Verifies nothing (the flood does not care who answers); made once: making a context
    loads the system's CA store, milliseconds that would stall the flood's event loop."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def client_hello() -> bytes:
    """A fresh TLS ClientHello (new random and key share), as a client's first flight."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = insecure_context().wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def connect_from(source: str, host: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _until_closed(stream: trio.abc.ReceiveStream) -> None:
    """Read and drop until the peer closes (EOF, reset, TLS failure)."""
    try:
        while await stream.receive_some(RECEIVE_BYTES):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _trickle(stream: trio.abc.SendStream, head: bytes, interval: float) -> None:
    """Send `head` at once, then one more byte every `interval` seconds, never finishing."""
    try:
        await stream.send_all(head)
        while True:
            await trio.sleep(interval)
            await stream.send_all(b"a")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await trio.sleep_forever()  # the reader notices the close


async def _hold(stream: trio.abc.Stream, send: bytes, trickle: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_trickle, stream, send, trickle)
        await _until_closed(stream)
        nursery.cancel_scope.cancel()


async def open_and_hold(target: FloodTarget, connection: FloodConnection) -> None:
    """Open one flood connection of its kind and hold it until the hub closes it."""
    kind = connection.kind
    try:
        tcp = await connect_from(connection.source, target.host, connection.port)
    except OSError as exc:
        connection.failed = f"connect: {exc}"
        return
    connection.opened = time.monotonic()
    by_hub = False  # not when we stop the flood (cancelled)
    try:
        if kind == "tcp":
            connection.ready = time.monotonic()
            await _until_closed(tcp)
        elif kind == "hello":
            await tcp.send_all(client_hello())
            connection.ready = time.monotonic()
            await _until_closed(tcp)
        else:
            await _hold_tls(target, connection, tcp)
        by_hub = True
    except (trio.BrokenResourceError, OSError):
        by_hub = True  # reset, or closed in the middle of our TLS handshake
    finally:
        if by_hub:
            connection.closed = time.monotonic()
        await trio.aclose_forcefully(tcp)


async def _hold_tls(
    target: FloodTarget, connection: FloodConnection, tcp: trio.SocketStream
) -> None:
    websocket = connection.port == target.websocket_port
    context = target.client_context if websocket else insecure_context()
    stream = trio.SSLStream(tcp, context, server_hostname=target.host)
    await stream.do_handshake()
    connection.ready = time.monotonic()
    if connection.kind == "tls-idle":
        await _until_closed(stream)
    elif connection.kind == "slow-headers":
        await _hold(stream, _SLOW_HEAD, target.trickle)
    elif connection.kind == "ws-unfinished":
        await _hold(stream, _WS_HEAD, target.trickle)
    else:
        raise ValueError(f"unknown kind {connection.kind!r}")


@attrs.define
class Flood:
    """Connections of the kinds and ports asked for, from `sources` in turn."""

    target: FloodTarget
    slots: list[tuple[str, int, str]] = attrs.field(factory=list)  # kind, port, source
    connections: list[FloodConnection] = attrs.field(factory=list)  # every one opened

    def plan(self, mix: Sequence[tuple[str, int, int]], sources: Sequence[str]) -> None:
        """`mix`: (kind, port, count), interleaved (every kind from the start); sources are
        used round-robin over all connections."""
        left = {(kind, port): count for kind, port, count in mix}
        while left:
            for key in list(left):
                self.slots.append((*key, sources[len(self.slots) % len(sources)]))
                left[key] -= 1
                if not left[key]:
                    del left[key]

    async def run(
        self, *, rate: float = 0.0, reopen_until: float = 0.0, reopen_after: float = 0.0
    ) -> None:
        """Open a connection per slot (`rate` per second, 0: as fast as we can) and hold each
        until the hub closes it; until `reopen_until` (time.monotonic()) a closed one is
        opened again `reopen_after` seconds later. Returns when all are closed, or when
        cancelled."""
        async with trio.open_nursery() as nursery:
            for index, slot in enumerate(self.slots):
                nursery.start_soon(self._slot, *slot, reopen_until, reopen_after)
                if rate and index % 50 == 49:
                    await trio.sleep(50 / rate)
                elif index % 50 == 49:
                    await trio.lowlevel.checkpoint()

    async def _slot(
        self, kind: str, port: int, source: str, reopen_until: float, reopen_after: float
    ) -> None:
        while True:
            connection = FloodConnection(kind, port, source)
            self.connections.append(connection)
            await open_and_hold(self.target, connection)
            if time.monotonic() >= reopen_until:
                return
            # Failed (out of ports or file descriptors): not a busy loop.
            await trio.sleep(max(reopen_after, 0.1 if connection.failed else 0.0))

    def open_now(self) -> int:
        return sum(1 for c in self.connections if c.closed is None and not math.isnan(c.opened))

    def closed_or_failed(self) -> int:
        return sum(1 for c in self.connections if c.closed is not None or c.failed)

    def closed_by_hub(self) -> int:
        return sum(1 for c in self.connections if c.closed is not None)

    def failures(self) -> Counter[str]:
        return Counter(c.failed.split(":")[0] for c in self.connections if c.failed)

    def by_kind(self) -> dict[str, Counter[str]]:
        """Per kind: planned, connected, ready, closed (by the hub), closed before ready."""
        table: dict[str, Counter[str]] = {}
        for c in self.connections:
            port = "websocket" if c.port == self.target.websocket_port else "https"
            row = table.setdefault(f"{c.kind}@{port}", Counter())
            row["planned"] += 1
            row["connected"] += not math.isnan(c.opened)
            row["ready"] += not math.isnan(c.ready)
            row["closed"] += c.closed is not None
            row["closed before ready"] += c.closed is not None and math.isnan(c.ready)
        return table

    def held_seconds(self) -> list[float]:
        """How long each connection the hub closed had been open."""
        return sorted(c.closed - c.opened for c in self.connections if c.closed is not None)


async def until(check: Callable[[], object], within: float, interval: float = 0.02) -> None:
    """Poll `check` until it is truthy; TimeoutError after `within` seconds."""
    with trio.fail_after(within):
        while True:
            if check():
                return
            await trio.sleep(interval)


def sources(count: int, base: str = "127.1") -> list[str]:
    """`count` distinct loopback addresses under `base` (a /16), e.g. 127.1.0.1, 127.1.0.2."""
    return [f"{base}.{index // 250}.{index % 250 + 1}" for index in range(count)]


# --- a delivery to watch during a flood -----------------------------------------------------

CONFIG_MAP = "flood-config"


def write_delivery_manifests(folder: Path, nodes: Sequence[str], round_: int) -> None:
    """A pod per node using one ConfigMap, whose `data.round` is `round_`: changing the round
    is a delivery to every node (`<namespace>/configmap/flood-config` on the edge)."""
    for node in nodes:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"flood-{node}", "namespace": "default"},
            "spec": {
                "nodeName": node,
                "containers": [
                    {"name": "c", "image": "i", "envFrom": [{"configMapRef": {"name": CONFIG_MAP}}]}
                ],
            },
        }
        _write_atomically(folder / f"pod-{node}.yaml", pod)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": "default"},
        "data": {"round": str(round_)},
    }
    _write_atomically(folder / "flood-config.yaml", config_map)


def _write_atomically(path: Path, content: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(yaml.safe_dump(content))
    partial.replace(path)


def holds_round(round_: int) -> Callable[[Any], bool]:
    return lambda content: str(content.get("data", {}).get("round")) == str(round_)
