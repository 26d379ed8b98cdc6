"""One fleet process of the benchmark: `open_fleet` from the edge simulator, driven in phases.

Why not the `fleet` CLI of `trio_cloudhub.testing.edge_sim`: it reports once, at its end, with
arrival times only as first/last over *all* messages and latencies against the hub's header
timestamp. The benchmark needs (1) a common start signal for all processes, (2) a signal once
the initial sync is acknowledged, while staying connected, and (3) the arrival and ACK wall
times of one given message on every edge, round after round. This worker uses the same library
(`open_fleet`, `SimEdge`), so edges behave exactly as the CLI's do (EdgeCore headers,
keepalive, auto-ACK); times are taken by the simulator's `observer` hook, so no task waits per
edge and the fleet spends its CPU on the protocol.

`--mint-with CA_KEY`: every edge presents its own certificate, issued here for it by the hub's
CA (`--ca` and this key) exactly as the hub's `/edge.crt` signs an EdgeCore request (CN
`system:node:<node>`, O `system:nodes`, a P-256 key, clientAuth), one SSL context per edge,
all made before `ready`; without it all edges share `--cert`/`--key`.

`--transport quic`: the same edges over QUIC (`open_quic_fleet` of
`trio_cloudhub.testing.quic_sim`: one trio-asyncio loop for all of this process's edges,
`--port` is then the hub's UDP QUIC port; shared identity only).

Protocol: JSON lines on stdout, commands on stdin.
  out {"event": "ready"}                      certificates loaded, waiting for "go"
  in  go
  out {"event": "connected", ...}             all of this process's edges connected (or failed)
  out {"event": "synced", ...}                every edge received and ACKed `--sync-messages`
  out {"event": "fanout", "round": g, ...}    every connected edge received and ACKed the
                                              update of the fan-out object with data
                                              `generation: "g"` (arrival and ACK times)
  out {"event": "counts", ...}                on `counts`: keepalives sent so far, connected
  in  stop  (or EOF on stdin, or `--timeout`) -> out {"event": "done", ...}, exit 0
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trio_cloudhub.core.message import GROUP_RESOURCE, OP_UPDATE, Message
from trio_cloudhub.pki.certs import load_ca_pem
from trio_cloudhub.pki.csr import EdgeCsr, sign_csr
from trio_cloudhub.testing.edge_sim import (
    EdgeIdentity,
    Fleet,
    IdentitySource,
    Received,
    SimEdge,
    open_fleet,
)

ACK_POLL = 0.005  # only while the last initial-sync ACK sends finish


def percentiles(values: Sequence[float], digits: int = 3, *, low: bool = False) -> dict[str, float]:
    """Nearest-rank p50/p99 and max, with `low` also min ({} for no values)."""
    if not values:
        return {}
    ordered = sorted(values)

    def pick(fraction: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return round(ordered[index], digits)

    found = {"min": round(ordered[0], digits)} if low else {}
    return {**found, "p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1], digits)}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


def emit(event: str, **fields: Any) -> None:
    """One event line; every event carries this process's CPU seconds so far."""
    print(json.dumps({"event": event, "cpu_s": cpu_s(), **fields}), flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="hub WebSocket (or QUIC) port")
    parser.add_argument("--transport", choices=("websocket", "quic"), default="websocket")
    parser.add_argument("--ca", required=True, help="CA certificate (PEM)")
    parser.add_argument("--cert", required=True, help="edge client certificate (PEM)")
    parser.add_argument("--key", required=True, help="edge client key (PEM)")
    parser.add_argument("--mint-with", help="CA key (PEM): a certificate of its own per edge")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--prefix", default="edge-")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--keepalive", type=float, default=15.0)
    parser.add_argument("--sync-messages", type=int, default=2)
    parser.add_argument("--fanout-resource", default="default/configmap/fanout")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the whole run")
    return parser.parse_args(argv)


def fanout_generation(message: Message, resource_name: str) -> int | None:
    """The generation carried by an update of the fan-out object, else None."""
    route = message.route
    if (
        route.operation != OP_UPDATE
        or route.group != GROUP_RESOURCE
        or route.resource != resource_name
    ):
        return None
    content = message.content
    data = content.get("data") if isinstance(content, dict) else None
    generation = data.get("generation") if isinstance(data, dict) else None
    return int(generation) if isinstance(generation, str) and generation.isdigit() else None


class Recorder:
    """Arrival and ACK times of the fan-out rounds, from the simulator's observer hook."""

    def __init__(self, args: argparse.Namespace, wall_offset: float) -> None:
        self.resource = args.fanout_resource
        self.sync_messages = args.sync_messages
        self.wall_offset = wall_offset
        self.rounds: dict[int, list[tuple[float, float]]] = {}  # generation -> (arrival, ack)
        self.synced = 0
        self.changed = trio.Event()

    def observe(self, edge: SimEdge, item: Received) -> None:
        if len(edge.received) == self.sync_messages:
            self.synced += 1
            self._wake()
        generation = fanout_generation(item.message, self.resource)
        if generation is not None:
            acked = trio.current_time()
            self.rounds.setdefault(generation, []).append(
                (item.at + self.wall_offset, acked + self.wall_offset)
            )
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, done: Any) -> None:
        while not done():
            await self.changed.wait()


def contexts_of(args: argparse.Namespace) -> IdentitySource | dict[str, ssl.SSLContext]:
    """One shared context, or (--mint-with) one per edge with its own certificate, all made
    now, before the clock runs."""
    if not args.mint_with:
        context = ssl.create_default_context(cafile=args.ca)
        context.load_cert_chain(args.cert, args.key)
        return context
    ca_pem = Path(args.ca).read_bytes()
    ca = load_ca_pem(ca_pem, Path(args.mint_with).read_bytes())
    now = datetime.now(UTC)
    contexts: dict[str, ssl.SSLContext] = {}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as folder:
        pem = Path(folder, "edge.pem")
        for index in range(args.start, args.start + args.count):
            node = f"{args.prefix}{index}"
            key = ec.generate_private_key(ec.SECP256R1())
            request = EdgeCsr(f"system:node:{node}", ("system:nodes",), key.public_key(), ())
            cert = x509.load_der_x509_certificate(sign_csr(request, ca, now, 365))
            pem.write_bytes(
                cert.public_bytes(serialization.Encoding.PEM)
                + key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            context = ssl.create_default_context(cadata=ca_pem.decode())
            context.load_cert_chain(pem)
            contexts[node] = context
    return contexts


def fleet_of(args: argparse.Namespace) -> AbstractAsyncContextManager[Fleet]:
    """The edges of this process over the chosen transport (certificate files loaded now)."""
    if args.transport == "quic":
        from trio_cloudhub.testing.quic_sim import open_quic_fleet

        identity = EdgeIdentity(
            node_name=f"{args.prefix}{args.start}",
            ca_pem=Path(args.ca).read_bytes(),
            cert_pem=Path(args.cert).read_bytes(),
            key_pem=Path(args.key).read_bytes(),
        )
        return open_quic_fleet(
            args.host,
            args.port,
            identity,
            args.count,
            prefix=args.prefix,
            start=args.start,
            concurrency=args.concurrency,
            keepalive_interval=args.keepalive,
        )
    contexts = contexts_of(args)
    if isinstance(contexts, dict):
        per_edge = contexts

        async def identity(node: str) -> IdentitySource:
            return per_edge[node]

        source: Any = identity
    else:
        source = contexts
    return open_fleet(
        args.host,
        args.port,
        source,
        args.count,
        prefix=args.prefix,
        start=args.start,
        concurrency=args.concurrency,
        keepalive_interval=args.keepalive,
    )


async def read_commands(stdin: trio.lowlevel.FdStream, got: trio.MemorySendChannel[str]) -> None:
    buffer = b""
    while True:
        data = await stdin.receive_some(4096)
        if not data:
            await got.send("stop")  # parent went away
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            await got.send(line.decode().strip())


async def report_rounds(fleet: Fleet, recorder: Recorder) -> None:
    """The synced event, then one fanout event per generation all connected edges ACKed."""
    await recorder.wait(lambda: recorder.synced >= len(fleet.connected))
    while any(e.connected and e.acks_sent < recorder.sync_messages for e in fleet.edges):  # noqa: ASYNC110
        await trio.sleep(ACK_POLL)
    # The connect left a backlog for the collector: collected now, not as a pause of 20-30 ms
    # in the first fan-out, which showed as this process's edges receiving late. Frozen, the
    # edges' long-lived objects are not scanned again by the full collections that follow.
    gc.collect()
    gc.freeze()
    emit(
        "synced",
        unix=time.time(),
        edges=len(fleet.connected),
        acks=sum(e.acks_sent for e in fleet.edges),
    )
    reported: set[int] = set()
    while True:
        await recorder.changed.wait()
        for generation, times in sorted(recorder.rounds.items()):
            if generation in reported or len(times) < len(fleet.connected):
                continue
            reported.add(generation)
            emit(
                "fanout",
                round=generation,
                arrivals=[round(at, 6) for at, _ in times],
                acks=[round(ack, 6) for _, ack in times],
                connected=len(fleet.connected),
            )


async def run_phases(
    args: argparse.Namespace,
    fleet_cm: AbstractAsyncContextManager[Fleet],
    commands: trio.MemoryReceiveChannel[str],
) -> dict[str, Any]:
    wall_offset = time.time() - trio.current_time()
    emit("ready", pid=os.getpid())
    while (command := await commands.receive()) != "go":
        if command == "stop":
            return {}
    go_unix = time.time()
    recorder = Recorder(args, wall_offset)
    async with fleet_cm as fleet:
        for edge in fleet.edges:
            edge.observer = recorder.observe
            recorder.synced += len(edge.received) >= args.sync_messages
        emit(
            "connected",
            connected=len(fleet.edges),
            failed=len(fleet.failures),
            failures=dict(list(fleet.failures.items())[:3]),
            go_unix=go_unix,
            done_unix=time.time(),
            connect_s=round(fleet.connect_seconds, 3),
            connect_times_ms=[round(t * 1000, 2) for t in fleet.connect_times],
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_rounds, fleet, recorder)
            async for command in commands:
                if command == "stop":
                    break
                if command == "counts":
                    emit(
                        "counts",
                        keepalives=sum(e.keepalives_sent for e in fleet.edges),
                        connected=len(fleet.connected),
                    )
            nursery.cancel_scope.cancel()
        return {
            "connected": len(fleet.edges),
            "still_connected": len(fleet.connected),
            "received": sum(len(e.received) for e in fleet.edges),
            "acks": sum(e.acks_sent for e in fleet.edges),
            "keepalives": sum(e.keepalives_sent for e in fleet.edges),
            "closed": dict(
                list({e.node_id: e.close_reason for e in fleet.edges if not e.connected}.items())[
                    :3
                ]
            ),
        }


async def amain(args: argparse.Namespace) -> None:
    fleet_cm = fleet_of(args)
    send, receive = trio.open_memory_channel[str](100)
    summary: dict[str, Any] = {}
    timed_out = True
    with trio.move_on_after(args.timeout):
        async with trio.open_nursery() as nursery:
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            nursery.start_soon(read_commands, stdin, send)
            summary = await run_phases(args, fleet_cm, receive)
            nursery.cancel_scope.cancel()
        timed_out = False
    emit(
        "done",
        timed_out=timed_out,
        max_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        **summary,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a socket per edge
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(amain, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
