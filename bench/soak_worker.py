"""Edge process of the soak (`bench.soak`): simulated EdgeCores that come back after every drop.

Each edge is a loop: connect (`start_sim_edge` from the edge simulator: EdgeCore's headers,
keepalives, auto-ACK of insert/update/delete like EdgeCore's meta manager), stay until the
connection ends, record what arrived, wait, connect again. While the hub is down, connecting
fails and the edge retries with a short back-off (0.1 s doubling to 2 s, jittered). With
`chaos on`, random connected edges are closed abruptly (no close frame, as EdgeCore's gorilla
`Close()`) and reconnect after a random delay of 0.05-2 s.

Every received resource message becomes an *event* of its edge, in arrival order across
connections: wall time, operation, resource (`<ns>/<type>/<name>` as the edge sees it), uid,
resourceVersion, the bench's sequence number (annotation `soak/seq` of the object) and whether
the edge's ACK for it was sent before the connection ended. `EdgeModel` turns a node's events
into the objects the edge holds, as EdgeCore's local store would (per uid the highest
resourceVersion; a delete removes the uid); `bench.soak` replays the same events with it.

Protocol: JSON lines on stdout, commands on stdin.
  out {"event": "ready"}
  in  go                      start the edges
  in  chaos on | chaos off    start / stop injecting disconnects
  in  status <id>             -> out {"event": "status", "id": ..., "connected": n}
  in  check <id> <file>       compare the edges with the desired state in <file> (JSON
                              {node: {resource: seq}}) -> out {"event": "check", "id": ...}
  in  stop <file>             end all edges, write their events to <file> -> out {"event": "done"}
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import resource
import ssl
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

import attrs
import trio

from trio_cloudhub.core.message import (
    GROUP_RESOURCE,
    OP_DELETE,
    OP_INSERT,
    OP_UPDATE,
    object_metadata,
)
from trio_cloudhub.testing.edge_sim import Received, SimEdge, needs_ack, start_sim_edge

SEQ_ANNOTATION = "soak/seq"
KEEPALIVE = 15.0  # EdgeCore's default
CONNECT_TIMEOUT = 10.0
RETRY_FIRST = 0.1
RETRY_CAP = 2.0
CHAOS_DELAY = (0.05, 2.0)  # reconnect delay after an injected disconnect, seconds
RECONNECT_DELAY = (0.05, 0.5)  # after the hub ended the connection
OPS = {OP_INSERT: "i", OP_UPDATE: "u", OP_DELETE: "d"}
NO_QUERIES: set[str] = set()  # the edges send no queries, so no query answer is ACKed

# An event: [wall time, "i"|"u"|"d", resource, uid, rv, seq or None, acked 0|1]
Event = list[Any]
Desired = Mapping[str, Mapping[str, int]]  # node -> resource -> seq


# --- the edge's view: shared with bench.soak ---------------------------------------------


@attrs.define(slots=True)
class Held:
    resource: str
    rv: int
    seq: int | None


class EdgeModel:
    """What one edge holds after applying its events in order.

    `apply` answers how the event relates to what the edge had:
    - "dup": the same operation and resourceVersion as the previous message for that uid,
      which the edge had received and ACKed (a resend of something already acknowledged);
    - "stale": an insert/update older than the version held (kept: the highest wins);
    - "new": anything else.
    """

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self.last: dict[str, tuple[str, int, bool]] = {}  # uid -> (u|d, rv, acked)

    def apply(self, event: Event) -> str:
        _, op, resource_name, uid, rv, seq, acked = event
        kind = "d" if op == "d" else "u"
        previous = self.last.get(uid)
        self.last[uid] = (kind, rv, bool(acked))
        verdict = "new"
        if previous is not None and previous[2] and previous[:2] == (kind, rv):
            verdict = "dup"
        if kind == "d":
            self.held.pop(uid, None)
            return verdict
        held = self.held.get(uid)
        if held is not None and held.rv > rv:
            return "stale"
        self.held[uid] = Held(resource_name, rv, seq)
        return verdict

    def by_resource(self) -> dict[str, list[int | None]]:
        found: dict[str, list[int | None]] = defaultdict(list)
        for held in self.held.values():
            found[held.resource].append(held.seq)
        return found


def lost_pairs(desired: Mapping[str, int], model: EdgeModel) -> tuple[int, list[str]]:
    """(node, object) pairs off the desired state: a desired object missing or at another
    version, plus every object held that is not desired (or held twice under two uids)."""
    held = model.by_resource()
    lost = 0
    off: list[str] = []
    for resource_name, seq in desired.items():
        seqs = held.pop(resource_name, [])
        count = (0 if seq in seqs else 1) + max(0, len(seqs) - 1)
        if count:
            lost += count
            off.append(f"{resource_name} want seq {seq} have {seqs}")
    for resource_name, seqs in held.items():
        lost += len(seqs)
        off.append(f"{resource_name} not desired, have {seqs}")
    return lost, off


def event_of(item: Received, wall_offset: float) -> Event | None:
    """The event of a received message; None for anything but an object insert/update/delete."""
    message = item.message
    op = OPS.get(message.route.operation)
    if message.route.group != GROUP_RESOURCE or op is None:
        return None
    metadata = object_metadata(message.content)
    uid = metadata.get("uid")
    rv_text = message.header.resource_version or metadata.get("resourceVersion") or ""
    if not isinstance(uid, str) or not str(rv_text).isdigit():
        return None
    annotations = metadata.get("annotations")
    seq_text = annotations.get(SEQ_ANNOTATION) if isinstance(annotations, dict) else None
    seq = int(seq_text) if isinstance(seq_text, str) and seq_text.isdigit() else None
    return [round(item.at + wall_offset, 4), op, message.route.resource, uid, int(rv_text), seq, 0]


# --- the edges ----------------------------------------------------------------------------


class EdgeRunner:
    """The edges of this process, their models and their event logs."""

    def __init__(self, args: argparse.Namespace, context: ssl.SSLContext) -> None:
        self.args = args
        self.context = context
        self.rng = random.Random(args.seed)
        self.names = [f"{args.prefix}{i}" for i in range(args.start, args.start + args.count)]
        self.wall_offset = time.time() - trio.current_time()
        self.limiter = trio.CapacityLimiter(args.concurrency)
        self.live: dict[str, SimEdge] = {}
        self.cursor: dict[str, int] = {}  # received items of the live connection turned to events
        self.conn_first: dict[str, int] = {}  # index of the live connection's first event
        self.ack_ordinals: dict[str, list[int]] = {}  # per event of the live connection
        self.ack_count: dict[str, int] = {}  # messages of the live connection the edge ACKs
        self.events: dict[str, list[Event]] = {name: [] for name in self.names}
        self.models: dict[str, EdgeModel] = {name: EdgeModel() for name in self.names}
        self.injected: dict[str, float] = {}  # node -> reconnect delay after our abort
        self.chaos = False
        self.counts: dict[str, int] = defaultdict(int)

    async def run_edge(self, name: str) -> None:
        failures = 0
        while True:
            connected = False
            try:
                async with trio.open_nursery() as nursery:
                    async with self.limiter:
                        edge = await start_sim_edge(
                            nursery,
                            self.args.host,
                            self.args.port,
                            self.context,
                            name,
                            keepalive_interval=KEEPALIVE,
                            connect_timeout=CONNECT_TIMEOUT,
                        )
                    self._begin(name, edge)
                    connected = True
                    failures = 0
                    self.counts["connects"] += 1
                    await edge.wait_disconnected(math.inf)
            except Exception as exc:  # the hub is down, refusing or restarting: retry
                if connected:  # not expected: the simulator reports the end as close_reason
                    self.counts[f"session_error:{_leaf(exc)}"] += 1
                else:
                    failures += 1
                    self.counts["connect_failures"] += 1
                    delay = min(RETRY_CAP, RETRY_FIRST * 2 ** min(failures - 1, 5))
                    await trio.sleep(delay * self.rng.uniform(0.5, 1.0))
                    continue
            finally:
                self._end(name)
            delay = self.injected.pop(name, None)
            if delay is None:
                self.counts["closed_by_hub"] += 1
                delay = self.rng.uniform(*RECONNECT_DELAY)
            await trio.sleep(delay)

    def _begin(self, name: str, edge: SimEdge) -> None:
        self.live[name] = edge
        self.cursor[name] = 0
        self.conn_first[name] = len(self.events[name])
        self.ack_ordinals[name] = []
        self.ack_count[name] = 0

    def _end(self, name: str) -> None:
        """The connection is over: take what is left and mark which events were ACKed."""
        edge = self.live.get(name)
        if edge is None:
            return
        self.drain(name)
        del self.live[name]
        sent = edge.acks_sent
        first = self.conn_first[name]
        for event, ordinal in zip(self.events[name][first:], self.ack_ordinals[name], strict=True):
            event[6] = 1 if 0 <= ordinal < sent else 0

    def drain(self, name: str) -> None:
        """Turn the live connection's new arrivals into events and apply them to the model."""
        edge = self.live[name]
        received = edge.received
        start = self.cursor[name]
        ordinals = self.ack_ordinals[name]
        # ACK ordinals count the messages the simulator ACKs, in order, in this connection.
        acked_before = self.ack_count[name]
        for item in received[start:]:
            ordinal = -1
            if needs_ack(item.message, NO_QUERIES):
                ordinal = acked_before
                acked_before += 1
            event = event_of(item, self.wall_offset)
            if event is None:
                self.counts["other_messages"] += 1
                continue
            event[6] = 1  # provisional; settled in _end
            self.events[name].append(event)
            ordinals.append(ordinal)
            self.models[name].apply(event)
        self.cursor[name] = len(received)
        self.ack_count[name] = acked_before

    async def inject(self) -> None:
        """While chaos is on: abrupt disconnects of random connected edges (a Poisson process
        of `--disconnect-rate` per second over this process's edges)."""
        while True:
            rate = self.args.disconnect_rate
            await trio.sleep(self.rng.expovariate(rate) if rate > 0 else 3600)
            if not self.chaos or not self.live:
                continue
            name = self.rng.choice(sorted(self.live))
            edge = self.live[name]
            if not edge.connected or name in self.injected:
                continue
            self.injected[name] = self.rng.uniform(*CHAOS_DELAY)
            self.counts["disconnects"] += 1
            with suppress(Exception):
                await edge.close_abruptly()

    def check(self, desired: Desired) -> dict[str, Any]:
        for name in list(self.live):
            self.drain(name)
        lost = 0
        nodes_off = 0
        examples: list[str] = []
        for name in self.names:
            count, off = lost_pairs(desired.get(name, {}), self.models[name])
            if count:
                lost += count
                nodes_off += 1
                examples += [f"{name}: {text}" for text in off[:2]]
        return {
            "lost": lost,
            "nodes_off": nodes_off,
            "examples": examples[:5],
            "connected": sum(1 for edge in self.live.values() if edge.connected),
        }


def _leaf(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return type(exc).__name__


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Commands:
    """Lines from stdin; "stop" when it closes (the bench went away)."""

    def __init__(self) -> None:
        self.stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stdin.receive_some(65536)
            if not data:
                return "stop"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()


async def amain(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    runner = EdgeRunner(args, context)
    desired_cache: dict[str, Desired] = {}
    stop_file = ""
    emit("ready", pid=os.getpid(), edges=len(runner.names))
    with trio.move_on_after(args.timeout) as bound:
        async with trio.open_nursery() as nursery:
            stdin = Commands()
            while True:
                words = (await stdin.next()).split()
                if not words:
                    continue
                if words[0] == "go":
                    for name in runner.names:
                        nursery.start_soon(runner.run_edge, name)
                    nursery.start_soon(runner.inject)
                elif words[0] == "chaos":
                    runner.chaos = words[1:] == ["on"]
                elif words[0] == "status":
                    connected = sum(1 for edge in runner.live.values() if edge.connected)
                    emit("status", id=words[1], connected=connected)
                elif words[0] == "check":
                    path = words[2]
                    if path not in desired_cache:
                        desired_cache[path] = json.loads(await trio.Path(path).read_text())
                    emit("check", id=words[1], **runner.check(desired_cache[path]))
                elif words[0] == "stop":
                    stop_file = words[1] if len(words) > 1 else ""
                    break
            nursery.cancel_scope.cancel()
    for name in list(runner.live):  # cancelled before their `finally` ran (not expected)
        runner._end(name)
    if stop_file:
        await trio.Path(stop_file).write_text(json.dumps(runner.events, separators=(",", ":")))
    emit(
        "done",
        timed_out=bound.cancelled_caught,
        cpu_s=cpu_s(),
        max_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        events=sum(len(events) for events in runner.events.values()),
        **runner.counts,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="hub WebSocket port")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--prefix", default="edge-")
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes in flight")
    parser.add_argument(
        "--disconnect-rate", type=float, default=0.0, help="per second, this process"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="bound on the whole run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(amain, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
