"""One fleet process of the benchmark: `open_fleet` from the edge simulator, driven in phases.

Why not the `fleet` CLI of `trio_cloudhub.testing.edge_sim`: it reports once, at its end, with
arrival times only as first/last over *all* messages and latencies against the hub's header
timestamp. The benchmark needs (1) a common start signal for all processes, (2) a signal once
the initial sync is acknowledged, while staying connected, and (3) the arrival wall time of one
given message on every edge. This worker uses the same library (`open_fleet`, `SimEdge`), so
edges behave exactly as the CLI's do (EdgeCore headers, keepalive, auto-ACK).

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
from collections.abc import Sequence
from typing import Any

import trio

from trio_cloudhub.core.message import GROUP_RESOURCE, OP_UPDATE
from trio_cloudhub.testing.edge_sim import SimEdge, open_fleet

POLL = 0.02  # how often the worker checks its edges (arrival times are recorded exactly)


def percentiles(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """Nearest-rank p50/p99 and max ({} for no values)."""
    if not values:
        return {}
    ordered = sorted(values)

    def pick(fraction: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return round(ordered[index], digits)

    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1], digits)}


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="hub WebSocket port")
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


def is_fanout(edge: SimEdge, resource_name: str) -> float | None:
    """Arrival (trio clock) of the fan-out update on `edge`, None if not there yet."""
    for item in edge.received:
        route = item.message.route
        if (
            route.operation == OP_UPDATE
            and route.group == GROUP_RESOURCE
            and route.resource == resource_name
        ):
            return item.at
    return None


def synced(edge: SimEdge, count: int) -> bool:
    resources = sum(1 for item in edge.received if item.message.route.group == GROUP_RESOURCE)
    return resources >= count and edge.acks_sent >= count


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


async def run_phases(
    args: argparse.Namespace, context: ssl.SSLContext, got: dict[str, trio.Event]
) -> dict[str, Any]:
    wall_offset = time.time() - trio.current_time()
    emit("ready", pid=os.getpid())
    await got["go"].wait()
    go_unix = time.time()
    async with open_fleet(
        args.host,
        args.port,
        context,
        args.count,
        prefix=args.prefix,
        start=args.start,
        concurrency=args.concurrency,
        keepalive_interval=args.keepalive,
    ) as fleet:
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

            async def phases() -> None:
                # Polling on purpose: SimEdge wakes waiters on arrival, not after its ACK.
                while not all(synced(e, args.sync_messages) for e in fleet.connected):  # noqa: ASYNC110
                    await trio.sleep(POLL)
                emit(
                    "synced",
                    unix=time.time(),
                    edges=len(fleet.connected),
                    acks=sum(e.acks_sent for e in fleet.edges),
                )
                arrivals: dict[str, float] = {}
                acked = 0
                pending = list(fleet.edges)
                while pending:
                    still: list[SimEdge] = []
                    for edge in pending:
                        at = is_fanout(edge, args.fanout_resource)
                        if at is not None and edge.acks_sent > args.sync_messages:
                            arrivals[edge.node_id] = round(at + wall_offset, 6)
                            acked += 1
                        elif edge.connected:
                            still.append(edge)
                    pending = still
                    if pending:
                        await trio.sleep(POLL)
                emit(
                    "fanout",
                    arrivals=list(arrivals.values()),
                    acked=acked,
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
    context = ssl.create_default_context(cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    got = {"go": trio.Event(), "stop": trio.Event()}
    summary: dict[str, Any] = {}
    timed_out = True
    with trio.move_on_after(args.timeout):
        async with trio.open_nursery() as nursery:
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            nursery.start_soon(read_commands, stdin, got)
            summary = await run_phases(args, context, got)
            nursery.cancel_scope.cancel()
        timed_out = False
    usage = resource.getrusage(resource.RUSAGE_SELF)
    emit(
        "done",
        timed_out=timed_out,
        cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
        max_rss_kb=usage.ru_maxrss,
        **summary,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(amain, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
