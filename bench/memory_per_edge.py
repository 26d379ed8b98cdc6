"""Where the hub's memory per idle edge goes: RSS, malloc and Python objects per connected edge.

    python -m bench.memory_per_edge --edges 1000 [--per-edge-certs] [--tracemalloc 1]
                                    [--env MALLOC_ARENA_MAX=2] [--top 25]

The real `serve` CLI runs in a child process that this script starts with a probe: a thread
that, when asked (a file in the hub's folder), writes what the process holds:

- RSS (/proc/self/status) and glibc's malloc figures (`mallinfo2`: bytes in use, bytes free
  but kept, mmapped), before and after `malloc_trim(0)`;
- with `--tracemalloc N`: the Python heap (tracemalloc, minus its own overhead), so C
  allocations (OpenSSL, mostly) = malloc in use - Python heap; and the allocation sites that
  grew most, per edge;
- objects by type (gc), count and `sys.getsizeof` per edge; and the objects of one session
  (its task, coroutine frames, connection, TLS transport, queue...).

The fleet is the benchmark's (`bench.fleet_worker`, as bench.run: per-edge certificates with
`--per-edge-certs`); figures are printed as one JSON document on stdout. tracemalloc slows
the hub and adds its own memory; run once without it for the true RSS per edge.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench import run as bench_run

PROBE_POLL = 0.2


# --- the probe, in the hub process ----------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def malloc_figures(libc: Any) -> dict[str, int]:
    """glibc's heap: in use (small + mmapped), free but kept, mmapped; {} elsewhere."""
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {
        "malloc_in_use_kb": (info.uordblks + info.hblkhd) // 1024,
        "malloc_free_kept_kb": info.fordblks // 1024,
        "malloc_mmapped_kb": info.hblkhd // 1024,
        "malloc_arena_kb": info.arena // 1024,
    }


def own_rss_kb() -> int:
    return bench_run.rss_kb(os.getpid())


def objects_by_type() -> dict[str, list[int]]:
    """type name -> [count, sum of sys.getsizeof] over the objects gc tracks."""
    found: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        slot = found.setdefault(name, [0, 0])
        slot[0] += 1
        with contextlib.suppress(TypeError):
            slot[1] += sys.getsizeof(obj)
    return found


def one_session() -> dict[str, int]:
    """sys.getsizeof of one live session's objects (what a single idle edge holds)."""
    from trio_cloudhub.hub.session import NodeSession

    sessions = [obj for obj in gc.get_objects() if isinstance(obj, NodeSession)]
    if not sessions:
        return {}
    session = sessions[len(sessions) // 2]
    sizes: dict[str, int] = {}

    def size(name: str, obj: object) -> None:
        sizes[name] = sys.getsizeof(obj)
        inner = getattr(obj, "__dict__", None)
        if inner is not None:
            sizes[f"{name}.__dict__"] = sys.getsizeof(inner)

    size("NodeSession", session)
    size("NodeEntry", session.entry)
    size("NodeQueue", session.entry.queue)
    queue = session.entry.queue
    for field in type(queue).__slots__:
        value = getattr(queue, field)
        if isinstance(value, dict | list | set) or hasattr(value, "maxlen"):
            sizes[f"NodeQueue.{field}"] = sys.getsizeof(value)
    size("marked_ahead", session.entry._marked)
    size("cancel_scope", session.cancel_scope)
    size("finished(Event)", session.finished)
    conn = session.conn
    size(type(conn).__name__, conn)
    transport = getattr(conn, "transport", None)
    if transport is not None:
        size(type(transport).__name__, transport)
        for slot in getattr(type(transport), "__slots__", ()):
            value = getattr(transport, slot, None)
            if value is not None:
                sizes[f"{type(transport).__name__}.{slot}"] = sys.getsizeof(value)
    for slot in getattr(type(conn), "__slots__", ()):
        value = getattr(conn, slot, None)
        if value is not None and not isinstance(value, int | str | bool | float):
            sizes[f"{type(conn).__name__}.{slot}"] = sys.getsizeof(value)
    return sizes


def tracemalloc_sites(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int, edges: int
) -> list[dict[str, Any]]:
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    grown = after.filter_traces(filters).compare_to(before.filter_traces(filters), "traceback")
    rows = []
    for stat in grown[:top]:
        frames = [
            f"{f.filename.rsplit('/site-packages/', 1)[-1]}:{f.lineno}" for f in stat.traceback
        ]
        rows.append(
            {
                "bytes_per_edge": round(stat.size_diff / edges, 1),
                "blocks_per_edge": round(stat.count_diff / edges, 2),
                "where": frames[-4:],  # innermost last
            }
        )
    return rows


class Probe:
    """Writes what the process holds into `folder/<name>.json` when `folder/<name>.ask` appears."""

    def __init__(self, folder: Path, top: int) -> None:
        self.folder = folder
        self.top = top
        self.libc = _libc()
        self.snapshots: dict[str, tracemalloc.Snapshot] = {}
        self.types: dict[str, dict[str, list[int]]] = {}

    def serve(self) -> None:
        while True:
            for ask in sorted(self.folder.glob("*.ask")):
                request = json.loads(ask.read_text() or "{}")
                ask.unlink()
                try:
                    answer = self.measure(ask.stem, request)
                except Exception as exc:  # the driver reports it instead of waiting
                    answer = {"probe_error": repr(exc)}
                tmp = self.folder / f".{ask.stem}.tmp"
                tmp.write_text(json.dumps(answer))
                tmp.replace(self.folder / f"{ask.stem}.json")
            time.sleep(PROBE_POLL)

    def measure(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        figures: dict[str, Any] = {"rss_kb": own_rss_kb(), **malloc_figures(self.libc)}
        if tracemalloc.is_tracing():
            traced, _peak = tracemalloc.get_traced_memory()
            figures["python_heap_kb"] = traced // 1024
            figures["tracemalloc_overhead_kb"] = tracemalloc.get_tracemalloc_memory() // 1024
            self.snapshots[name] = tracemalloc.take_snapshot()
        self.types[name] = objects_by_type()
        edges = int(request.get("edges", 0))
        base = request.get("compare_to")
        if base and edges:
            figures["by_type_per_edge"] = self._types_diff(
                self.types[base], self.types[name], edges
            )
            figures["one_session"] = one_session()
            if name in self.snapshots and base in self.snapshots:
                figures["sites_per_edge"] = tracemalloc_sites(
                    self.snapshots[base], self.snapshots[name], self.top, edges
                )
        if request.get("trim") and self.libc is not None:
            self.libc.malloc_trim(0)
            figures["after_trim"] = {"rss_kb": own_rss_kb(), **malloc_figures(self.libc)}
        return figures

    def _types_diff(
        self, before: dict[str, list[int]], after: dict[str, list[int]], edges: int
    ) -> list[dict[str, Any]]:
        rows = []
        for name, (count, size) in after.items():
            old_count, old_size = before.get(name, [0, 0])
            if count - old_count >= edges // 2:
                rows.append(
                    {
                        "type": name,
                        "per_edge": round((count - old_count) / edges, 2),
                        "bytes_per_edge": round((size - old_size) / edges, 1),
                    }
                )
        rows.sort(key=lambda row: -row["bytes_per_edge"])
        return rows[: self.top]


def hub_child(argv: Sequence[str]) -> int:
    """`hub-child FOLDER TOP FRAMES -- serve ...`: the CLI with the probe beside it."""
    folder, top, frames = Path(argv[0]), int(argv[1]), int(argv[2])
    if frames:
        tracemalloc.start(frames)
    probe = Probe(folder, top)
    threading.Thread(target=probe.serve, daemon=True).start()
    from trio_cloudhub.cli import main

    return main(list(argv[4:]))


# --- OpenSSL alone: server-side bytes per TLS connection --------------------------------------


def _client_contexts(ca: Any, count: int, per_edge: bool) -> list[Any]:
    """Client contexts of `count` edges, each with its own certificate or all with one."""
    import ssl
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from trio_cloudhub.http.certs_store import _load_cert_chain
    from trio_cloudhub.pki import certs

    contexts = []
    context = None
    for index in range(count):
        if context is None or per_edge:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:edge-{index}")])
            der = certs.issue_certificate(
                ca,
                subject=name,
                public_key=key.public_key(),
                usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
                sans=[],
                now=datetime.now(UTC),
                validity=timedelta(days=1),
            )
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.load_verify_locations(cadata=ca.cert_der)
            _load_cert_chain(context, certs.cert_pem(der), certs.key_pem(certs._sec1_der(key)))
        contexts.append(context)
    return contexts


def _pump(server: Any, client: Any) -> None:
    """Handshake one SSLObject pair over memory BIOs."""
    import ssl

    s_obj, s_in, s_out = server
    c_obj, c_in, c_out = client
    done = [False, False]
    while not all(done):
        for index, (obj, out, peer_in) in enumerate(((c_obj, c_out, s_in), (s_obj, s_out, c_in))):
            if not done[index]:
                try:
                    obj.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
            if out.pending:
                peer_in.write(out.read())


def tls_only(args: argparse.Namespace) -> dict[str, Any]:
    """Server-side OpenSSL bytes per connection: handshakes over memory BIOs in this process,
    then the client halves are dropped and what the server halves hold is measured."""
    import ssl
    from datetime import UTC, datetime

    from trio_cloudhub.edge.tls import server_context_options
    from trio_cloudhub.http.certs_store import credentials_from
    from trio_cloudhub.pki import certs

    libc = _libc()
    now = datetime.now(UTC)
    ca = certs.generate_ca(now)
    server_context = credentials_from(
        ca, certs.generate_server_cert(ca, now, ["127.0.0.1"], [])
    ).websocket_ssl_context()
    server_context_options(server_context)
    clients_ctx = _client_contexts(ca, args.edges, args.per_edge_certs)
    gc.collect()
    libc.malloc_trim(0)
    steps: dict[str, dict[str, int]] = {"start": malloc_figures(libc)}
    servers, clients = [], []
    for context in clients_ctx:
        s_bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
        c_bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
        server = (server_context.wrap_bio(*s_bios, server_side=True), *s_bios)
        client = (context.wrap_bio(*c_bios, server_side=False), *c_bios)
        _pump(server, client)
        servers.append(server)
        clients.append(client)
    steps["handshaken"] = malloc_figures(libc)
    for (s_obj, s_in, s_out), (c_obj, c_in, c_out) in zip(servers, clients, strict=True):
        # The initial sync: two messages of ~1 KB down, their ACKs up.
        s_obj.write(b"x" * 1500)
        s_obj.write(b"y" * 1200)
        c_in.write(s_out.read())
        c_obj.read(16384)
        c_obj.write(b"ack" * 100)
        s_in.write(c_out.read())
        s_obj.read(16384)
    steps["synced"] = malloc_figures(libc)
    peer = [s_obj.getpeercert(True) for s_obj, _, _ in servers[:1]]
    del clients, clients_ctx
    gc.collect()
    steps["clients dropped"] = malloc_figures(libc)
    libc.malloc_trim(0)
    steps["malloc_trim(0)"] = malloc_figures(libc)
    start = steps["start"]["malloc_in_use_kb"]
    return {
        "edges": args.edges,
        "per_edge_certs": args.per_edge_certs,
        "openssl": ssl.OPENSSL_VERSION,
        "peer_cert_der_bytes": len(peer[0] or b""),
        "server_side_kb_per_connection": round(
            (steps["malloc_trim(0)"]["malloc_in_use_kb"] - start) / args.edges, 2
        ),
        "steps": steps,
    }


# --- the driver -----------------------------------------------------------------------------


class ProbedHub(bench_run.Hub):
    def __init__(self, root: Path, edges: int, top: int, frames: int) -> None:
        super().__init__(root, edges)
        self.probe_dir = root / "probe"
        self.probe_dir.mkdir()
        self.top = top
        self.frames = frames

    def serve_command(self) -> list[str]:
        command = super().serve_command()
        probe = [sys.executable, "-m", "bench.memory_per_edge", "hub-child"]
        probe += [str(self.probe_dir), str(self.top), str(self.frames), "--"]
        return probe + command[3:]  # after "python -m trio_cloudhub"

    async def ask(self, name: str, **request: Any) -> dict[str, Any]:
        answer = self.probe_dir / f"{name}.json"
        (self.probe_dir / f"{name}.ask").write_text(json.dumps(request))
        with trio.fail_after(600):
            while not answer.exists():  # noqa: ASYNC110 (written by the hub's probe thread)
                await trio.sleep(PROBE_POLL)
        figures: dict[str, Any] = json.loads(answer.read_text())
        if "probe_error" in figures:
            raise RuntimeError(f"the hub's probe failed: {figures['probe_error']}")
        return figures


def per_edge(before: dict[str, Any], after: dict[str, Any], edges: int) -> dict[str, float]:
    """(after - before) / edges in KB for every figure both have."""
    keys = [k for k, v in after.items() if isinstance(v, int) and k in before]
    return {
        k.replace("_kb", "_kb_per_edge"): round((after[k] - before[k]) / edges, 2) for k in keys
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    for item in args.env:
        key, _, value = item.partition("=")
        os.environ[key] = value  # the hub process inherits it (glibc reads it at start)
    # The hub runs `python -m bench.memory_per_edge` in its own folder.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(bench_run.REPO), os.environ.get("PYTHONPATH", "")]
    )
    n = args.edges
    with tempfile.TemporaryDirectory(prefix="cloudhub-memory-") as folder:
        hub = ProbedHub(Path(folder), n, args.top, args.tracemalloc)
        hub.write_manifests(n)
        workers: list[bench_run.Worker] = []
        try:
            async with trio.open_nursery() as nursery:
                await hub.start()
                token = await hub.token()
                identity = await bench_run.bootstrap(bench_run.HOST, hub.https_port, token, "mem")
                files = bench_run.write_identity(Path(folder, "identity"), identity)
                workers = await bench_run.start_workers(
                    nursery, hub, files, n, args.fleet_procs, 50, 600.0, args.per_edge_certs
                )
                await bench_run.wait_all(workers, "ready", 120 + n / 20)
                await trio.sleep(bench_run.SETTLE)
                before = await hub.ask("before")
                bench_run.log(f"connecting {n} edges")
                for worker in workers:
                    await worker.send("go")
                events = await bench_run.wait_all(workers, "connected", 120 + n / 10)
                connected = sum(event["connected"] for event in events)
                await bench_run.wait_all(workers, "synced", 60 + n / 20)
                await trio.sleep(bench_run.SETTLE)
                after = await hub.ask("after", edges=connected, compare_to="before", trim=True)
                await bench_run.stop_workers(workers)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await bench_run.shut_down(hub, workers)
    trimmed = after.pop("after_trim", {})
    result: dict[str, Any] = {
        "edges": connected,
        "per_edge_certs": args.per_edge_certs,
        "tracemalloc_frames": args.tracemalloc,
        "env": args.env,
        "load_average": bench_run.load_average(),
        "before": {k: v for k, v in before.items() if isinstance(v, int)},
        "after_sync": {k: v for k, v in after.items() if isinstance(v, int)},
        "per_edge": per_edge(before, after, connected),
        "per_edge_after_malloc_trim": per_edge(before, trimmed, connected),
    }
    if "python_heap_kb" in after and "malloc_in_use_kb" in after:
        python = after["python_heap_kb"] - before["python_heap_kb"]
        malloc = after["malloc_in_use_kb"] - before["malloc_in_use_kb"]
        overhead = after["tracemalloc_overhead_kb"] - before["tracemalloc_overhead_kb"]
        result["split_kb_per_edge"] = {
            "python_heap": round(python / connected, 2),
            "c_heap (malloc in use - python - tracemalloc's own)": round(
                (malloc - python - overhead) / connected, 2
            ),
        }
    for key in ("by_type_per_edge", "one_session", "sites_per_edge"):
        if key in after:
            result[key] = after[key]
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_per_edge", description=__doc__)
    parser.add_argument("--edges", type=int, default=1000)
    parser.add_argument("--fleet-procs", type=int, default=3)
    parser.add_argument("--per-edge-certs", action="store_true")
    parser.add_argument(
        "--tracemalloc", type=int, default=0, help="frames per trace (0: tracemalloc off)"
    )
    parser.add_argument("--top", type=int, default=25, help="rows of the per-site/type tables")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the hub, e.g. MALLOC_ARENA_MAX=2"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hub-child"]:
        return hub_child(argv[1:])
    if argv[:1] == ["tls"]:
        print(json.dumps(tls_only(parse_args(argv[1:])), indent=1))
        return 0
    args = parse_args(argv)
    print(json.dumps(trio.run(measure, args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
