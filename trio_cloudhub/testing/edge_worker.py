"""One simulated EdgeCore in its own process, reporting what it receives as JSON lines.

Made to run inside a network namespace (`ip netns exec <ns> python -m
trio_cloudhub.testing.edge_worker ...`, see `testing/netlab.py`): it bootstraps its certificate
over HTTPS, connects over WSS with the edge simulator's `SimEdge` (EdgeCore's headers,
keepalive, auto-ACK) and, like EdgeCore, connects again whenever its connection ends. EdgeCore
has no read deadline: a connection the hub ended silently is noticed only when TCP says so (a
reset, or the hub's FIN once it gets through). What it receives is applied to one model of
EdgeCore's metaManager database (`edge_storage.MetaStore`) kept across its connections.

Out (stdout), one JSON object per line, each with `t` (wall clock, unix seconds):
  {"event": "ready"}                                   certificate issued
  {"event": "connected", "session": n, "local_port": p}
  {"event": "message", "session": n, "op": ..., "resource": ..., "rv": ..., "uid": ...,
   "msg_id": ..., "bytes": ..., "data_sha256": ...,
   "held": {"rv": ..., "data_sha256": ...} or null}    every message from the hub, on arrival,
                                                       with what the database now holds
                                                       under its resource
  {"event": "disconnected", "session": n, "reason": ...}
  {"event": "connect_failed", "error": ...}
  {"event": "forgot", "session": n, "local_port": p}
In (stdin), one command per line:
  forget   drop the current connection without a word (a reset with SO_LINGER 0, which a
           partition swallows) and connect again: the hub's side stays half open
  stop     (or EOF) exit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import trio

from trio_cloudhub.core.message import Message, object_uid
from trio_cloudhub.edge.tls import TlsTransport
from trio_cloudhub.edge.websocket import WebSocketConnection
from trio_cloudhub.testing.edge_sim import (
    BootstrapError,
    EdgeIdentity,
    SimEdge,
    SimEdgeDisconnected,
    bootstrap,
    start_sim_edge,
)
from trio_cloudhub.testing.edge_storage import EDGECORE_LINES, V1_23, MetaStore

BOOTSTRAP_ATTEMPTS = 5


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def data_digest(content: Any) -> str:
    """sha256 of the object's `data` as canonical JSON ("" without one): the test computes
    the same over its manifest to check the content, not only the version."""
    if not isinstance(content, dict) or "data" not in content:
        return ""
    text = json.dumps(content["data"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def describe(message: Message, session: int, storage: MetaStore) -> dict[str, Any]:
    content = message.content
    stored = storage.get(message.route.resource)
    held = None
    if stored is not None:
        held = {
            "rv": storage.resource_version(message.route.resource),
            "data_sha256": data_digest(stored),
        }
    size = len(json.dumps(content)) if isinstance(content, (dict, list)) else len(str(content))
    return {
        "session": session,
        "op": message.operation,
        "resource": message.resource,
        "rv": message.header.resource_version,
        "uid": object_uid(content),
        "msg_id": message.msg_id,
        "bytes": size,
        "data_sha256": data_digest(content),
        "held": held,
    }


def tcp_socket_of(edge: SimEdge) -> socket.socket | None:
    connection = edge.connection
    if not isinstance(connection, WebSocketConnection):
        return None
    transport = connection.transport
    return transport.socket if isinstance(transport, TlsTransport) else None


def local_port(edge: SimEdge) -> int:
    sock = tcp_socket_of(edge)
    try:
        return int(sock.getsockname()[1]) if sock is not None else 0
    except OSError:
        return 0


class Worker:
    def __init__(self, args: argparse.Namespace, identity: EdgeIdentity) -> None:
        self.args = args
        self.context = identity.client_ssl_context()
        self.current: SimEdge | None = None
        self.session = 0
        self.storage = MetaStore(args.edgecore)  # the edge's database outlives connections

    async def run_forever(self) -> None:
        while True:
            try:
                await self._one_session()
            except Exception as exc:  # refused, reset, timed out: EdgeCore tries again
                emit("connect_failed", error=f"{type(exc).__name__}: {exc}")
            await trio.sleep(self.args.retry)

    async def _one_session(self) -> None:
        args = self.args
        async with trio.open_nursery() as nursery:
            edge = await start_sim_edge(
                nursery,
                args.host,
                args.port,
                self.context,
                args.node,
                keepalive_interval=args.keepalive,
                connect_timeout=args.connect_timeout,
                storage=self.storage,
            )
            self.session += 1
            self.current = edge
            emit("connected", session=self.session, local_port=local_port(edge))
            await self._report(edge, self.session)
            emit("disconnected", session=self.session, reason=edge.close_reason or "")
            self.current = None

    async def _report(self, edge: SimEdge, session: int) -> None:
        reported = 0
        while True:
            with suppress(SimEdgeDisconnected):
                await edge.wait_for_messages(reported + 1, within=float("inf"))
            for item in edge.received[reported:]:
                emit("message", **describe(item.message, session, self.storage))
            reported = len(edge.received)
            if not edge.connected:
                return

    async def forget(self) -> None:
        edge = self.current
        if edge is None:
            return
        sock = tcp_socket_of(edge)
        port = local_port(edge)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        emit("forgot", session=self.session, local_port=port)
        await edge.close_abruptly()


async def read_commands(worker: Worker, cancel: trio.CancelScope) -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while True:
        data = await stdin.receive_some(4096)
        if not data:
            cancel.cancel()
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command = line.decode().strip()
            if command == "forget":
                await worker.forget()
            elif command == "stop":
                cancel.cancel()
                return


async def get_identity(args: argparse.Namespace) -> EdgeIdentity:
    for attempt in range(1, BOOTSTRAP_ATTEMPTS + 1):
        try:
            return await bootstrap(args.host, args.https_port, args.token, args.node)
        except (BootstrapError, OSError) as exc:
            if attempt == BOOTSTRAP_ATTEMPTS:
                raise
            emit("bootstrap_failed", error=str(exc))
            await trio.sleep(0.5)
    raise AssertionError("unreachable")


async def main_async(args: argparse.Namespace) -> None:
    identity = await get_identity(args)
    emit("ready")
    worker = Worker(args, identity)
    with trio.CancelScope() as cancel:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_commands, worker, cancel)
            nursery.start_soon(worker.run_forever)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trio_cloudhub.testing.edge_worker")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True, help="hub WebSocket port")
    parser.add_argument("--https-port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--keepalive", type=float, default=15.0)
    parser.add_argument("--retry", type=float, default=0.2, help="wait before reconnecting")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--edgecore", choices=EDGECORE_LINES, default=V1_23)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        trio.run(main_async, args)
    except BootstrapError as exc:
        emit("fatal", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
