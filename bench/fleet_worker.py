"""One fleet process of the benchmark: `open_fleet` from the edge simulator, driven in phases.

Why not the `fleet` CLI of `trio_cloudhub.testing.edge_sim`: it reports once, at its end, with
arrival times only as first/last over *all* messages and latencies against the hub's header
timestamp. The benchmark needs (1) a common start signal for all processes, (2) a signal once
the initial sync is acknowledged, while staying connected, and (3) the arrival wall time of one
given message on every edge. This worker uses the same library (`open_fleet`, `SimEdge`), so
edges behave exactly as the CLI's do (EdgeCore headers, keepalive, auto-ACK).

`--transport quic`: the same edges over QUIC (`open_quic_fleet` of
`trio_cloudhub.testing.quic_sim`: one trio-asyncio loop for all of this process's edges,
`--port` is then the hub's UDP QUIC port).

Protocol: JSON lines on stdout, commands on stdin.
  out {"event": "ready"}                      certificate loaded, waiting for "go"
  in  go
  out {"event": "connected", ...}             all of this process's edges connected (or failed)
  out {"event": "synced", ...}                every edge received and ACKed `--sync-messages`
  out {"event": "fanout", "arrivals": [...]}  every edge received and ACKed the fan-out update
  in  stop  (or EOF on stdin, or `--timeout`) -> out {"event": "done", ...}, exit 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from pathlib import Path
from typing import Any

import trio

from trio_cloudhub.core.message import GROUP_RESOURCE, OP_UPDATE, Message
from trio_cloudhub.testing.edge_sim import (
    EdgeIdentity,
    Fleet,
    Predicate,
    SimEdge,
    SimEdgeDisconnected,
    open_fleet,
)

ACK_POLL = 0.005  # only while the last ACK sends finish (SimEdge wakes waiters on arrival)


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
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--prefix", default="edge-")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--keepalive", type=float, default=15.0)
    parser.add_argument("--sync-messages", type=int, default=2)
    parser.add_argument("--fanout-resource", default="default/configmap/fanout")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the whole run")
    return parser.parse_args(argv)


def is_resource(message: Message) -> bool:
    return message.route.group == GROUP_RESOURCE


def is_update_of(resource_name: str) -> Predicate:
    def match(message: Message) -> bool:
        route = message.route
        return (
            route.operation == OP_UPDATE
            and is_resource(message)
            and (route.resource == resource_name)
        )

    return match


def arrival(edge: SimEdge, predicate: Predicate) -> float | None:
    """When (trio clock) the first message matching `predicate` arrived on `edge`."""
    return next((item.at for item in edge.received if predicate(item.message)), None)


async def on_every_edge(
    edges: Sequence[SimEdge], wait: Callable[[SimEdge], Awaitable[object]]
) -> None:
    """Run `wait` for every edge at once until all returned or their edge disconnected: one
    task per edge, woken on arrival, so no polling loop competes with the hub for the CPU."""

    async def one(edge: SimEdge) -> None:
        with suppress(SimEdgeDisconnected):
            await wait(edge)

    async with trio.open_nursery() as nursery:
        for edge in edges:
            nursery.start_soon(one, edge)


async def acks_at_least(edges: Sequence[SimEdge], count: int) -> None:
    """The simulator ACKs right after recording a message; let those sends finish."""
    while any(e.connected and e.acks_sent < count for e in edges):  # noqa: ASYNC110
        await trio.sleep(ACK_POLL)


async def read_commands(stdin: trio.lowlevel.FdStream, got: dict[str, trio.Event]) -> None:
    buffer = b""
    while True:
        data = await stdin.receive_some(4096)
        if not data:
            got["stop"].set()  # parent went away
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command = line.decode().strip()
            if command in got:
                got[command].set()


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
    context = ssl.create_default_context(cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    return open_fleet(
        args.host,
        args.port,
        context,
        args.count,
        prefix=args.prefix,
        start=args.start,
        concurrency=args.concurrency,
        keepalive_interval=args.keepalive,
    )


async def run_phases(
    args: argparse.Namespace,
    fleet_cm: AbstractAsyncContextManager[Fleet],
    got: dict[str, trio.Event],
) -> dict[str, Any]:
    wall_offset = time.time() - trio.current_time()
    emit("ready", pid=os.getpid())
    await got["go"].wait()
    go_unix = time.time()
    async with fleet_cm as fleet:
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
            fanout_on = is_update_of(args.fanout_resource)

            async def phases() -> None:
                await on_every_edge(
                    fleet.edges, lambda e: e.wait_for_messages(args.sync_messages, math.inf)
                )
                await acks_at_least(fleet.edges, args.sync_messages)
                emit(
                    "synced",
                    unix=time.time(),
                    edges=len(fleet.connected),
                    acks=sum(e.acks_sent for e in fleet.edges),
                )
                await on_every_edge(fleet.edges, lambda e: e.expect(fanout_on, math.inf))
                await acks_at_least(fleet.edges, args.sync_messages + 1)
                arrivals = [at for e in fleet.edges if (at := arrival(e, fanout_on)) is not None]
                emit(
                    "fanout",
                    arrivals=[round(at + wall_offset, 6) for at in arrivals],
                    acked=sum(1 for e in fleet.edges if e.acks_sent > args.sync_messages),
                    connected=len(fleet.connected),
                )
                await trio.sleep_forever()

            async def stopper() -> None:
                await got["stop"].wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(phases)
            nursery.start_soon(stopper)
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
    got = {"go": trio.Event(), "stop": trio.Event()}
    summary: dict[str, Any] = {}
    timed_out = True
    with trio.move_on_after(args.timeout):
        async with trio.open_nursery() as nursery:
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            nursery.start_soon(read_commands, stdin, got)
            summary = await run_phases(args, fleet_cm, got)
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
    trio.run(amain, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
