"""Floods of idle and slow clients on both ports of a real `serve` (issue 14).

    python -m bench.flood --connections 10000 --seconds 30        # ~2 min, two scenarios

Per scenario a fresh `trio-cloudhub serve` (HubProcess) gets `--edges` connected edges
(keepalive every `--keepalive` s, the hub's keepaliveInterval 3x that), then a flood worker,
a process of its own so that its 10,000 sockets do not slow down this process's probes and
edges, opens `--connections` idle or slow connections spread evenly over seven kinds:

- WebSocket port: `tcp` (no TLS hello), `hello` (a ClientHello, nothing more),
  `ws-unfinished` (TLS with a valid client certificate, an upgrade request never finished);
- HTTPS port: `tcp`, `hello`, `tls-idle` (a TLS handshake, no request), `slow-headers`
  (request headers at one byte per second).

Scenarios: `one` (every flood connection from 127.0.5.1) and `many` (from `--sources`
addresses 127.1.x.y). The probes and the edges come from 127.0.0.1. Unless `--no-reopen`,
a connection the hub closed is opened again `--reopen-after` s later until the flood ends:
the pressure stays, as from an attacker or a fleet retrying.

During the flood: `/readyz` every 0.1 s on a new connection (as a kubelet probe), p50/p99/max
and failures; `--new-edges` new edges bootstrap (token, CSR, /edge.crt) and connect, each
timed; then a manifest change for every edge, and the time until all hold it. Also: the hub's
RSS before / during (max) / after, whether the connected edges kept their sessions, and the
flood connections the hub closed (per kind; how long they were held; closes per second).
One JSON line per scenario on stdout, then a readable summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.run import load_average, machine, rss_kb
from trio_cloudhub.testing.edge_sim import (
    EdgeIdentity,
    SimEdge,
    bootstrap,
    start_sim_edge,
)
from trio_cloudhub.testing.flood import (
    CONFIG_MAP,
    Flood,
    FloodTarget,
    holds_round,
    insecure_context,
    sources,
    write_delivery_manifests,
)
from trio_cloudhub.testing.hub_process import HOST, HubProcess, free_ports

KEY = f"default/configmap/{CONFIG_MAP}"
PROBE_INTERVAL = 0.1
PROBE_TIMEOUT = 10.0
ONE_SOURCE = "127.0.5.1"


def raise_open_files(wanted: int) -> dict[str, Any]:
    """Soft limit up to the hard one; says when the hard limit is below what we want."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return {
        "wanted": wanted,
        "hard": hard,
        "enough": hard == resource.RLIM_INFINITY or hard >= wanted,
    }


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def pick(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 4)

    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1], 4), "n": len(ordered)}


# --- the flood worker (a process of its own) ----------------------------------------------------


def mix(total: int, websocket_port: int, https_port: int) -> list[tuple[str, int, int]]:
    kinds = [
        ("tcp", websocket_port),
        ("hello", websocket_port),
        ("ws-unfinished", websocket_port),
        ("tcp", https_port),
        ("hello", https_port),
        ("tls-idle", https_port),
        ("slow-headers", https_port),
    ]
    base, extra = divmod(total, len(kinds))
    return [(kind, port, base + (index < extra)) for index, (kind, port) in enumerate(kinds)]


def load_identity(folder: Path) -> EdgeIdentity:
    return EdgeIdentity(
        node_name="flooder",
        ca_pem=(folder / "ca.pem").read_bytes(),
        cert_pem=(folder / "cert.pem").read_bytes(),
        key_pem=(folder / "key.pem").read_bytes(),
    )


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    identity = load_identity(Path(args.identity))
    target = FloodTarget(HOST, args.https_port, args.websocket_port, identity.client_ssl_context())
    flood = Flood(target)
    addresses = [ONE_SOURCE] if args.scenario == "one" else sources(args.sources)
    flood.plan(mix(args.connections, args.websocket_port, args.https_port), addresses)
    began = time.monotonic()
    ends = began + args.seconds
    open_samples: list[tuple[float, int]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                flood.run,
                rate=args.rate,
                reopen_until=ends if args.reopen else 0.0,
                reopen_after=args.reopen_after,
            )
        )
        while time.monotonic() < ends:
            open_samples.append((round(time.monotonic() - began, 1), flood.open_now()))
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    return flood_figures(flood, began, ends, open_samples)


def flood_figures(
    flood: Flood, began: float, ends: float, open_samples: list[tuple[float, int]]
) -> dict[str, Any]:
    by_hub = [c for c in flood.connections if c.closed is not None and c.closed < ends]
    per_second = Counter(int((c.closed or began) - began) for c in by_hub)
    held: dict[str, list[float]] = {}
    for c in by_hub:
        port = "websocket" if c.port == flood.target.websocket_port else "https"
        held.setdefault(f"{c.kind}@{port}", []).append((c.closed or 0) - c.opened)
    kinds = {
        name: {key: value for key, value in counts.items()}
        for name, counts in flood.by_kind().items()
    }
    return {
        "started": len(flood.connections),
        "closed_by_hub": len(by_hub),
        "connect_failures": dict(Counter(c.failed[:60] for c in flood.connections if c.failed)),
        "open_max": max((count for _, count in open_samples), default=0),
        "open_samples": open_samples[::4],
        "closed_per_second": [per_second.get(second, 0) for second in range(int(ends - began) + 1)],
        "held_seconds": {name: percentiles(values) for name, values in sorted(held.items())},
        "kinds": kinds,
    }


# --- one scenario -----------------------------------------------------------------------------


async def probe_once(
    get: Callable[[], Awaitable[int]], began: float, latencies: list[float], failures: list[str]
) -> None:
    """One probe: its latency when it answers 200, else why it failed."""
    try:
        status = await get()
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}"[:80])
        return
    if status == 200:
        latencies.append(time.monotonic() - began)
    else:
        failures.append(f"status {status}")


def blocking_get(
    port: int, path: str, context: ssl.SSLContext | None, phases: list[Phases] | None = None
) -> int:
    """A blocking GET, as a kubelet probe (over TLS when `context` is given): the status.
    `phases` gets the seconds of the TCP connect, the TLS handshake and request-to-close."""
    began = time.monotonic()
    with socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT) as tcp:
        connected = time.monotonic()
        sock = context.wrap_socket(tcp) if context is not None else tcp
        secured = time.monotonic()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    if phases is not None:
        phases.append((connected - began, secured - connected, time.monotonic() - secured))
    return int(answer.split()[1])


Phases = tuple[float, float, float]
PHASE_NAMES = ("connect", "tls_handshake", "request_to_close")


def phase_percentiles(phases: Sequence[Phases]) -> dict[str, dict[str, float | None]]:
    return {name: percentiles([p[i] for p in phases]) for i, name in enumerate(PHASE_NAMES)}


async def probe_loop(
    port: str,
    context: ssl.SSLContext | None,
    latencies: list[float],
    failures: list[str],
    phases: list[Phases] | None = None,
) -> None:
    """`/readyz` every PROBE_INTERVAL on a new connection, in a thread: the bench's own loop
    (new edges, the flood's bookkeeping) must not add its delays to the figure."""

    async def readyz() -> int:
        return await trio.to_thread.run_sync(blocking_get, PORTS[port], "/readyz", context, phases)

    while True:
        began = time.monotonic()
        await probe_once(readyz, began, latencies, failures)
        await trio.sleep(max(0.0, PROBE_INTERVAL - (time.monotonic() - began)))


PORTS: dict[str, int] = {}


async def rss_loop(pid: int, samples: list[int]) -> None:
    while True:
        samples.append(rss_kb(pid))
        await trio.sleep(0.5)


async def new_edge(
    nursery: trio.Nursery, hub: HubProcess, token: str, node: str, keepalive: float
) -> tuple[SimEdge, float, float]:
    """Bootstrap and connect one edge: (edge, bootstrap seconds, total seconds)."""
    began = time.monotonic()
    identity = await bootstrap(HOST, hub.https_port, token, node)
    bootstrapped = time.monotonic()
    edge = await start_sim_edge(
        nursery, HOST, hub.websocket_port, identity, node, keepalive_interval=keepalive
    )
    return edge, bootstrapped - began, time.monotonic() - began


async def scenario(args: argparse.Namespace, name: str, root: Path) -> dict[str, Any]:
    websocket_port, https_port, PORTS["probes"] = free_ports(3)  # one call: three distinct
    hub = HubProcess(
        root,
        ports=(websocket_port, https_port),
        cloud_hub={"keepaliveInterval": int(3 * args.keepalive)},
        trio_cloud_hub={"probeBindAddress": f"{HOST}:{PORTS['probes']}"},
    )
    await hub.start()
    PORTS["https"] = hub.https_port
    assert hub.process is not None
    pid = hub.process.pid
    try:
        async with trio.open_nursery() as nursery:
            figures = await run_scenario(args, name, root, hub, pid, nursery)
            nursery.cancel_scope.cancel()
        return figures
    finally:
        await hub.aclose()


async def run_scenario(
    args: argparse.Namespace,
    name: str,
    root: Path,
    hub: HubProcess,
    pid: int,
    nursery: trio.Nursery,
) -> dict[str, Any]:
    token = await hub.token()
    nodes = [f"edge-{index}" for index in range(args.edges)]
    new_nodes = [f"new-{index}" for index in range(args.new_edges)]
    write_delivery_manifests(hub.manifests, nodes + new_nodes, 1)
    edges = []
    for node in nodes:
        edge, _, _ = await new_edge(nursery, hub, token, node, args.keepalive)
        edges.append(edge)
    for edge in edges:
        await edge.wait_holds(KEY, matching=holds_round(1), within=30)
    flooder = await bootstrap(HOST, hub.https_port, token, "flooder")
    identity = root / "flooder"
    identity.mkdir()
    (identity / "ca.pem").write_bytes(flooder.ca_pem)
    (identity / "cert.pem").write_bytes(flooder.cert_pem)
    (identity / "key.pem").write_bytes(flooder.key_pem)
    await trio.sleep(1)
    rss_before = rss_kb(pid)

    latencies: list[float] = []
    probe_failures: list[str] = []
    phases: list[Phases] = []
    plain: list[float] = []
    plain_failures: list[str] = []
    rss: list[int] = []
    result_path = root / "flood.json"
    command = [
        sys.executable, "-m", "bench.flood", "--worker", "--scenario", name,
        "--connections", str(args.connections), "--seconds", str(args.seconds),
        "--sources", str(args.sources), "--rate", str(args.rate),
        "--websocket-port", str(hub.websocket_port), "--https-port", str(hub.https_port),
        "--identity", str(identity), "--reopen-after", str(args.reopen_after),
        *([] if args.reopen else ["--no-reopen"]),
    ]  # fmt: skip
    began = time.monotonic()
    with result_path.open("wb") as out:
        worker_process = await trio.lowlevel.open_process(command, stdout=out)
    probes = trio.CancelScope()

    async def probing() -> None:
        with probes:
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    probe_loop, "https", insecure_context(), latencies, probe_failures, phases
                )
                inner.start_soon(probe_loop, "probes", None, plain, plain_failures)
                inner.start_soon(rss_loop, pid, rss)

    nursery.start_soon(probing)
    await trio.sleep(args.ramp)  # the flood is at full size by now
    joins: list[dict[str, float]] = []
    for node in new_nodes:
        try:
            edge, boot, total = await new_edge(nursery, hub, token, node, args.keepalive)
        except Exception as exc:
            joins.append({"failed": f"{type(exc).__name__}: {exc}"[:120]})  # type: ignore[dict-item]
            continue
        edges.append(edge)
        joins.append({"bootstrap_s": round(boot, 3), "bootstrap_and_connect_s": round(total, 3)})
        await trio.sleep(0.5)
    written = time.monotonic()
    write_delivery_manifests(hub.manifests, nodes + new_nodes, 2)
    delivered: float | None = None
    try:
        async with trio.open_nursery() as waits:
            for edge in edges:
                waits.start_soon(partial(edge.wait_holds, KEY, matching=holds_round(2), within=30))
        delivered = time.monotonic() - written
    except Exception as exc:
        delivery_problem = f"{type(exc).__name__}: {exc}"[:200]
    else:
        delivery_problem = ""
    with trio.fail_after(args.seconds + 120):
        await worker_process.wait()
    flood_ended = time.monotonic()
    probes.cancel()
    await trio.sleep(5)
    rss_after = rss_kb(pid)
    flood_figures_ = json.loads(result_path.read_text())
    during = latencies
    connected = [edge for edge in edges[: len(nodes)] if edge.connected]
    return {
        "scenario": name,
        "connections": args.connections,
        "sources": 1 if name == "one" else args.sources,
        "reopen": args.reopen,
        "reopen_after_s": args.reopen_after,
        "flood_seconds": round(flood_ended - began, 1),
        "readyz_s": percentiles(during),
        "readyz_failures": dict(Counter(probe_failures)),
        "readyz_over_100ms": sum(1 for value in during if value > 0.1),
        "readyz_phases_s": phase_percentiles(phases),
        "plain_readyz_s": percentiles(plain),
        "plain_readyz_failures": dict(Counter(plain_failures)),
        "plain_readyz_over_100ms": sum(1 for value in plain if value > 0.1),
        "new_edges": joins,
        "delivery_s": round(delivered, 3) if delivered is not None else None,
        "delivery_problem": delivery_problem,
        "edges_connected_before": len(nodes),
        "edges_still_connected": len(connected),
        "edges_lost": {e.node_id: e.close_reason for e in edges[: len(nodes)] if not e.connected},
        "keepalives_sent_min": min((e.keepalives_sent for e in edges[: len(nodes)]), default=0),
        "hub_rss_kb": {
            "before": rss_before,
            "during_max": max(rss, default=0),
            "after": rss_after,
        },
        "hub_evictions_logged": hub.log_text().count("closed the oldest"),
        "flood": flood_figures_,
        "load": load_average(),
    }


def summary(figures: dict[str, Any]) -> str:
    ready = figures["readyz_s"]
    plain = figures["plain_readyz_s"]
    flood = figures["flood"]
    joins = [j.get("bootstrap_and_connect_s") for j in figures["new_edges"]]
    rss = figures["hub_rss_kb"]
    return "\n".join(
        [
            f"== {figures['scenario']}: {figures['connections']} flood connections from "
            f"{figures['sources']} source(s), {figures['flood_seconds']} s, load {figures['load']}",
            f"  /readyz: p50 {ready['p50']} s, p99 {ready['p99']} s, max {ready['max']} s over "
            f"{ready['n']} probes; {figures['readyz_over_100ms']} above 100 ms; failures "
            f"{figures['readyz_failures'] or 'none'}",
            "  its phases p50 / p99: "
            + ", ".join(
                f"{name} {phase['p50']} / {phase['p99']} s"
                for name, phase in figures["readyz_phases_s"].items()
            ),
            f"  plain-HTTP /readyz (probeBindAddress): p50 {plain['p50']} s, p99 {plain['p99']} s,"
            f" max {plain['max']} s over {plain['n']} probes; {figures['plain_readyz_over_100ms']}"
            f" above 100 ms; failures {figures['plain_readyz_failures'] or 'none'}",
            f"  new edges bootstrap+connect: {joins} s",
            f"  delivery to {len(figures['new_edges']) + figures['edges_connected_before']} "
            f"edges: {figures['delivery_s']} s {figures['delivery_problem']}",
            f"  connected edges kept: {figures['edges_still_connected']} of "
            f"{figures['edges_connected_before']} (min keepalives sent "
            f"{figures['keepalives_sent_min']})",
            f"  hub RSS: before {rss['before'] / 1024:.0f} MiB, during max "
            f"{rss['during_max'] / 1024:.0f} MiB, after {rss['after'] / 1024:.0f} MiB",
            f"  flood: {flood['started']} connections opened, {flood['closed_by_hub']} closed "
            f"by the hub, at most {flood['open_max']} open at once; connect failures "
            f"{flood['connect_failures'] or 'none'}",
            f"  closed per second: {flood['closed_per_second']}",
            *(
                f"  held {name}: p50 {p['p50']} s, max {p['max']} s (n={p['n']})"
                for name, p in flood["held_seconds"].items()
            ),
        ]
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the flood lasts")
    parser.add_argument("--ramp", type=float, default=8.0, help="seconds before new edges join")
    parser.add_argument("--scenarios", default="one,many")
    parser.add_argument("--sources", type=int, default=100, help="addresses in scenario many")
    parser.add_argument("--rate", type=float, default=0.0, help="flood opens per s (0: max)")
    parser.add_argument("--edges", type=int, default=20)
    parser.add_argument("--new-edges", type=int, default=3)
    parser.add_argument("--keepalive", type=float, default=5.0)
    parser.add_argument("--no-reopen", dest="reopen", action="store_false")
    parser.add_argument("--reopen-after", type=float, default=1.0, help="seconds")
    # The worker's own arguments (bench.flood runs itself as the flood process).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--websocket-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--https-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    return parser


async def main_async(args: argparse.Namespace) -> int:
    limits = raise_open_files(args.edges + args.new_edges + 1000)
    print(f"machine: {machine()}, open files: {limits}", file=sys.stderr)
    for name in args.scenarios.split(","):
        with tempfile.TemporaryDirectory(prefix="flood-") as folder:
            figures = await scenario(args, name, Path(folder))
        print(json.dumps(figures), flush=True)
        print(summary(figures), file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        limits = raise_open_files(args.connections + 1000)
        if not limits["enough"]:
            print(f"open files: hard limit {limits['hard']} < {limits['wanted']}", file=sys.stderr)
        print(json.dumps(trio.run(worker, args)))
        return 0
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
