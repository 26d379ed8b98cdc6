"""The hub benchmark: the real `serve` CLI, N simulated edges over mutual TLS on loopback.

    python -m bench.run --edges 1000 [--fleet-procs 3] [--idle-seconds 30]
                        [--scenario all|connect|idle|fanout] [--transport websocket|quic|both]
    python -m bench.run --edges 1000,5000,15000 --per-edge-certs --fanout-rounds 5 \
                        --output bench/results/issue13-after.json      # the issue 13 figures

Each scenario prints one JSON line on stdout (per fleet size); progress goes to stderr. See
bench/README.md.

Environment (optional, for profiling the hub):
  BENCH_PYSPY=DIR     record each phase of the hub with `py-spy record --format raw` into DIR
                      (samples per second: BENCH_PYSPY_RATE, default 200)
  BENCH_CPROFILE=FILE run the hub under cProfile (slower!) and write its stats to FILE
  BENCH_POLL_INTERVAL the hub's manifestsPollInterval (default 0.05 s) to isolate its cost
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.fleet_worker import percentiles
from trio_cloudhub.store.localdb import DB_NAME
from trio_cloudhub.testing.edge_sim import BootstrapError, EdgeIdentity, bootstrap, https_get

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# manifestsPollInterval of the bench (the hub's default is 0.25); BENCH_POLL_INTERVAL overrides
POLL_INTERVAL = float(os.environ.get("BENCH_POLL_INTERVAL", "0.05"))
KEEPALIVE = 15.0  # what EdgeCore sends by default
SETTLE = 1.0  # seconds given to the hub to finish background work before a measurement
CONFIG_MAP_NAME = "fanout"  # also in POD and CONFIG_MAP below
FANOUT_RESOURCE = f"default/configmap/{CONFIG_MAP_NAME}"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

CONFIG = """\
apiVersion: cloudcore.config.kubeedge.io/v1alpha1
kind: CloudCore
commonConfig:
  monitorServer: {{bindAddress: "{host}:0"}}
modules:
  cloudHub:
    advertiseAddress: [{host}]
    nodeLimit: {node_limit}
    tlsCAFile: {pki}/rootCA.crt
    tlsCAKeyFile: {pki}/rootCA.key
    tlsCertFile: {pki}/server.crt
    tlsPrivateKeyFile: {pki}/server.key
    websocket: {{address: {host}, port: 0}}
    https: {{address: {host}, port: 0}}
    unixsocket: {{enable: false}}{quic}
trioCloudHub:
  manifestsPollInterval: {poll}
  logLevel: WARNING
  workers: {workers}
"""
POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: pod-{i}, namespace: default}}
spec:
  nodeName: edge-{i}
  containers:
  - name: app
    image: busybox
    envFrom: [{{configMapRef: {{name: fanout}}}}]
"""
# Only in the hub of a QUIC run: a WebSocket run measures the hub without the asyncio loop.
QUIC_CONFIG = "\n    quic: {{enable: true, address: {host}, port: 0}}"
TRANSPORTS = ("websocket", "quic")
CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {{name: fanout, namespace: default}}
data: {{generation: "{generation}", note: "trio-cloudhub fan-out benchmark"}}
"""


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "python": platform.python_version(), "cpu": model}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (others' work on the machine shows here)."""
    return [round(value, 2) for value in os.getloadavg()]


# --- the hub process ----------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@attrs.frozen
class Cpu:
    """CPU time of a whole process (all its threads), in seconds."""

    user: float
    system: float

    @classmethod
    def of(cls, pid: int) -> Cpu:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of /proc/<pid>/stat, in clock ticks.
        return cls(int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.system + other.system)

    def figures(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_s": round(self.total, 3),
            f"{prefix}_user_s": round(self.user, 3),
            f"{prefix}_sys_s": round(self.system, 3),
        }


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux: /proc/<pid>/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def own_ports(pid: int, tables: Sequence[str], state: str) -> set[int]:
    """Local ports of `pid`'s sockets in /proc/<pid>/net/<table> with `state` (read from /proc:
    works with port 0 and any log level)."""
    inodes = socket_inodes(pid)
    ports: set[int] = set()
    for table in tables:
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_ports(pid: int) -> set[int]:
    """TCP ports `pid` listens on."""
    return own_ports(pid, ("tcp", "tcp6"), "0A")  # 0A = LISTEN


def udp_ports(pid: int) -> set[int]:
    """UDP ports `pid` has bound (the QUIC server's socket; 07 = unconnected)."""
    return own_ports(pid, ("udp", "udp6"), "07")


def udp_drops(pid: int) -> int:
    """Datagrams the kernel dropped so far on `pid`'s UDP sockets (the last column of
    /proc/net/udp: mostly a full receive buffer, SO_RCVBUF)."""
    inodes = socket_inodes(pid)
    drops = 0
    for table in ("udp", "udp6"):
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    drops += int(fields[-1])
    return drops


async def is_https_ready(port: int) -> bool:
    """True when `port` answers GET /readyz with 200 (the WebSocket port fails the TLS
    handshake without a client certificate, so this also tells the two ports apart)."""
    import ssl

    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    with trio.move_on_after(3):
        try:
            status, _ = await https_get(HOST, port, "/readyz", insecure)
        except (BootstrapError, OSError, trio.BrokenResourceError):
            return False
        return status == 200
    return False


async def is_plain_http(port: int) -> bool:
    """True when `port` answers plain HTTP (the metrics server; the WebSocket and HTTPS ports
    want a TLS handshake)."""
    with trio.move_on_after(3):
        try:
            stream = await trio.open_tcp_stream(HOST, port)
        except OSError:
            return False
        async with stream:
            try:
                await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
                return (await stream.receive_some(5)).startswith(b"HTTP/")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return False
    return False


class Hub:
    def __init__(
        self, root: Path, edges: int, transport: str = "websocket", workers: int = 1
    ) -> None:
        self.root = root
        self.workers = workers
        self.transport = transport
        self.config = root / "cloudcore.yaml"
        self.data_dir = root / "data"
        self.manifests = root / "manifests"
        self.log_path = root / "hub.log"
        self.process: trio.Process | None = None
        self.websocket_port = 0
        self.https_port = 0
        self.quic_port = 0
        self.metrics_port = 0
        self.manifests.mkdir(parents=True)
        quic = QUIC_CONFIG.format(host=HOST) if transport == "quic" else ""
        self.config.write_text(
            CONFIG.format(
                host=HOST,
                node_limit=max(1000, edges + 10),
                pki=root / "no-pki",
                poll=POLL_INTERVAL,
                quic=quic,
                workers=workers,
            )
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """The hub's processes: `serve`, and its workers with `--workers N`."""
        return [self.pid, *children(self.pid)]

    def cpu(self) -> Cpu:
        """CPU time summed over every process of the hub (living ones: a worker that was
        restarted takes its old time with it, which the bench never does)."""
        total = Cpu(0.0, 0.0)
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total = total + Cpu.of(pid)
        return total

    def cpu_by_process(self) -> dict[int, float]:
        """pid -> CPU seconds, the `serve` process first, then its workers."""
        found: dict[int, float] = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                found[pid] = Cpu.of(pid).total
        return found

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.pids())

    @property
    def edge_port(self) -> int:
        """The port the fleet connects to: WebSocket (TCP) or QUIC (UDP)."""
        return self.quic_port if self.transport == "quic" else self.websocket_port

    def write_manifests(self, edges: int) -> None:
        pods = "---\n".join(POD.format(i=i) for i in range(edges))
        (self.manifests / "pods.yaml").write_text(pods)
        self.write_config_map(1)

    def write_config_map(self, generation: int) -> None:
        """Atomically (a dot file is ignored by the store, then renamed over)."""
        temporary = self.manifests / ".configmap.yaml.tmp"
        temporary.write_text(CONFIG_MAP.format(generation=generation))
        os.replace(temporary, self.manifests / "configmap.yaml")

    def serve_command(self) -> list[str]:
        command = [sys.executable, "-m", "trio_cloudhub", "serve", "--config", str(self.config)]
        command += ["--data-dir", str(self.data_dir), "--manifests", str(self.manifests)]
        profile = os.environ.get("BENCH_CPROFILE")
        if profile:
            command[1:1] = ["-m", "cProfile", "-o", os.path.abspath(profile)]
        return command

    async def start(self) -> None:
        command = self.serve_command()
        with self.log_path.open("wb") as stderr:
            self.process = await trio.lowlevel.open_process(
                command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=self.root
            )
        with trio.fail_after(60):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"hub exited early:\n{self.log_path.read_text()}")
                ports: set[int] = set()
                for pid in self.pids():
                    with contextlib.suppress(OSError):  # a process that just exited
                        ports |= listening_ports(pid)
                if len(ports) >= 2 and not self.https_port:
                    for port in sorted(ports):
                        if await is_https_ready(port):
                            self.https_port = port
                            break
                if self.https_port and not self.websocket_port:
                    # The metrics port (plain HTTP) is the third one, when it is up.
                    for port in sorted(ports - {self.https_port}):
                        if await is_plain_http(port):
                            self.metrics_port = port
                        else:
                            self.websocket_port = port
                            break
                if self.https_port and self.transport == "quic" and not self.quic_port:
                    self.quic_port = min(udp_ports(self.pid), default=0)
                if self.websocket_port and (self.quic_port or self.transport != "quic"):
                    return
                await trio.sleep(0.1)

    async def token(self) -> str:
        command = [sys.executable, "-m", "trio_cloudhub", "token", "--config", str(self.config)]
        command += ["--data-dir", str(self.data_dir)]
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
        return str(result.stdout.decode()).strip()

    @property
    def ca_key(self) -> Path:
        """The CA key the hub generated (the config points its tls*File keys nowhere)."""
        return self.data_dir / "pki" / "ca.key"

    def recorded_acks(self) -> int:
        """Ack points the hub stored for the config map's current version (hub-side proof)."""
        db = sqlite3.connect(f"file:{self.data_dir / DB_NAME}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute(
                "SELECT uid, resource_version FROM objects WHERE kind = 'ConfigMap' AND name = ?",
                (CONFIG_MAP_NAME,),
            ).fetchone()
            if row is None:
                return 0
            (count,) = db.execute(
                "SELECT count(*) FROM ack_points WHERE uid = ? AND resource_version = ?",
                (row[0], str(row[1])),
            ).fetchone()
            return int(count)
        finally:
            db.close()

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                return await self.process.wait()
            self.process.kill()
        return await self.process.wait()


def profile_path(folder: str, phase: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return os.path.abspath(os.path.join(folder, f"{phase}.txt"))


@asynccontextmanager
async def pyspy(hub: Hub, phase: str) -> AsyncIterator[None]:
    """With BENCH_PYSPY=DIR: a raw (collapsed stacks) profile of the hub during the block."""
    folder = os.environ.get("BENCH_PYSPY")
    if not folder:
        yield
        return
    if hub.transport != "websocket":
        phase = f"{hub.transport}-{phase}"  # DIR/quic-connect.txt, ...
    output = profile_path(folder, phase)
    command = ["py-spy", "record", "--pid", str(hub.pid), "--format", "raw", "--nonblocking"]
    rate = os.environ.get("BENCH_PYSPY_RATE", "200")
    command += ["--rate", rate, "--output", str(output)]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    await trio.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGINT)
            with trio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        log(f"py-spy profile of {phase}: {output}")


# --- the fleet processes ------------------------------------------------------------------


class Worker:
    """One `bench.fleet_worker` process and the events it printed."""

    def __init__(self, process: trio.Process, first: int, count: int) -> None:
        self.process = process
        self.first = first
        self.count = count
        self.events: dict[str, dict[str, Any]] = {}
        self.ended = False
        self._changed = trio.Event()

    async def read_events(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        try:
            async for chunk in self.process.stdout:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    name = event["event"]
                    if "round" in event:
                        name = f"{name}:{event['round']}"
                    self.events[name] = event
                    self._changed.set()
                    self._changed = trio.Event()
        finally:
            self.ended = True
            self._changed.set()

    async def wait(self, name: str) -> dict[str, Any]:
        while name not in self.events:
            if self.ended:
                raise RuntimeError(f"fleet process {self.process.pid} ended before {name!r}")
            await self._changed.wait()
        return self.events[name]

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.process.stdin.send_all(command.encode() + b"\n")


async def counts(workers: Sequence[Worker]) -> list[dict[str, Any]]:
    """Each worker's keepalives sent so far (fresh answers to a `counts` command)."""
    for worker in workers:
        worker.events.pop("counts", None)
        await worker.send("counts")
    return await wait_all(workers, "counts", 30)


async def wait_all(workers: Sequence[Worker], name: str, within: float) -> list[dict[str, Any]]:
    with trio.fail_after(within):
        return [await worker.wait(name) for worker in workers]


def write_identity(folder: Path, identity: EdgeIdentity) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.crt", "cert": folder / "edge.crt", "key": folder / "edge.key"}
    files["ca"].write_bytes(identity.ca_pem)
    files["cert"].write_bytes(identity.cert_pem)
    files["key"].write_bytes(identity.key_pem)
    files["key"].chmod(0o600)
    return files


async def start_workers(
    nursery: trio.Nursery,
    hub: Hub,
    identity: dict[str, Path],
    edges: int,
    procs: int,
    concurrency: int,
    lifetime: float,
    per_edge_certs: bool = False,
    keepalive: float = KEEPALIVE,
) -> list[Worker]:
    procs = max(1, min(procs, edges))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    workers: list[Worker] = []
    first = 0
    for index in range(procs):
        count = edges // procs + (1 if index < edges % procs else 0)
        command = [sys.executable, "-m", "bench.fleet_worker", "--host", HOST]
        command += ["--port", str(hub.edge_port), "--transport", hub.transport]
        command += ["--start", str(first), "--count", str(count)]
        command += ["--ca", str(identity["ca"]), "--cert", str(identity["cert"])]
        command += ["--key", str(identity["key"]), "--concurrency", str(concurrency)]
        command += ["--keepalive", str(keepalive), "--fanout-resource", FANOUT_RESOURCE]
        command += ["--timeout", str(lifetime)]
        if per_edge_certs:
            command += ["--mint-with", str(hub.ca_key)]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO
        )
        worker = Worker(process, first, count)
        nursery.start_soon(worker.read_events)
        workers.append(worker)
        first += count
    return workers


async def stop_workers(workers: Sequence[Worker]) -> list[dict[str, Any]]:
    for worker in workers:
        await worker.send("stop")
    done: list[dict[str, Any]] = []
    for worker in workers:
        with trio.move_on_after(15):
            await worker.process.wait()
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()
        if "done" in worker.events:
            done.append(worker.events["done"])
    return done


# --- scenarios ----------------------------------------------------------------------------


RESULTS: list[dict[str, Any]] = []  # every line emitted, for --output


HUB_WORKERS = [1]  # `serve --workers N` of the current run


def emit(figures: dict[str, Any]) -> None:
    line = {**figures, "hub_workers": HUB_WORKERS[0], "load_average": load_average()}
    line["machine"] = machine()
    RESULTS.append(line)
    print(json.dumps(line), flush=True)


CONNECT_NOTES = {
    "websocket": "mutual TLS with one shared edge identity bootstrapped via HTTPS, or "
    "(certificates: one per edge) a certificate per edge issued by the hub's CA; "
    "hub CPU includes the initial sync (pod + config map) that starts at once",
    "quic": "QUIC v1 (aioquic, TLS 1.3, mutual) with one shared edge identity bootstrapped via "
    "HTTPS, then the header on the control stream answered `ack`; each fleet process runs all "
    "its edges in one trio-asyncio loop; hub CPU includes the initial sync (pod + config map)",
}


def fleet_cpu(workers: Sequence[Worker]) -> float:
    """CPU seconds of all fleet processes so far (read from /proc like the hub's)."""
    return sum(Cpu.of(worker.process.pid).total for worker in workers)


class Bench:
    """One hub, its fleet processes, and the figures of each scenario run on them."""

    def __init__(self, args: argparse.Namespace, hub: Hub, workers: list[Worker]) -> None:
        self.args = args
        self.n: int = args.edges
        self.hub = hub
        self.transport = hub.transport
        self.workers = workers
        self.connected = 0
        self.rss_before = 0
        self.baseline: dict[str, Any] = {}

    def cpu(self) -> Cpu:
        return self.hub.cpu()

    def udp_drops(self) -> int:
        return udp_drops(self.hub.pid) if self.transport == "quic" else 0

    def drops_since(self, before: int) -> dict[str, int]:
        """QUIC only: datagrams the hub's socket dropped (full receive buffer) in a phase."""
        if self.transport != "quic":
            return {}
        return {"hub_udp_drops": self.udp_drops() - before}

    async def measure_baseline(self, with_cpu: bool) -> None:
        """Hub RSS before any edge, and its idle CPU with no edge and nothing changing."""
        await trio.sleep(SETTLE)
        self.rss_before = self.hub.rss_kb()
        if not with_cpu:
            return
        window = self.args.idle_no_edges_seconds
        log(f"hub idle with no edge for {window} s")
        before = self.cpu()
        began = time.monotonic()
        await trio.sleep(window)
        used = self.cpu() - before
        window = time.monotonic() - began
        self.baseline = {
            "hub_cpu_s_per_idle_minute_no_edges": round(used.total * 60 / window, 4),
            "no_edges_window_s": round(window, 1),
        }

    async def connect(self, report: bool) -> None:
        log(f"connecting {self.n} edges from {len(self.workers)} processes")
        async with pyspy(self.hub, "connect"):
            fleet_before = fleet_cpu(self.workers)
            drops_before = self.udp_drops()
            before = self.cpu()
            by_process = self.hub.cpu_by_process()
            go = time.time()
            for worker in self.workers:
                await worker.send("go")
            events = await wait_all(self.workers, "connected", 120 + self.n / 10)
            used = self.cpu() - before
            after = self.hub.cpu_by_process()
            split = [round(after[pid] - by_process.get(pid, 0.0), 2) for pid in after]
            fleet_used = fleet_cpu(self.workers) - fleet_before
        self.connected = ok = sum(event["connected"] for event in events)
        seconds = max(event["done_unix"] for event in events) - go
        if report:
            times = [t for event in events for t in event["connect_times_ms"]]
            emit(
                {
                    "scenario": "connect",
                    "transport": self.transport,
                    "edges": self.n,
                    "connected": ok,
                    "failed": sum(event["failed"] for event in events),
                    "failures": {k: v for e in events for k, v in e["failures"].items()},
                    "fleet_procs": len(self.workers),
                    "handshakes_in_flight": len(self.workers) * self.args.concurrency,
                    "connect_all_s": round(seconds, 3),
                    "handshakes_per_s": round(ok / seconds, 1),
                    "edge_connect_ms": percentiles(times),
                    **used.figures("hub_cpu"),
                    "hub_cpu_ms_per_edge": round(used.total * 1000 / max(ok, 1), 2),
                    # `serve`, then each worker of `--workers N`: how the work was spread.
                    "hub_cpu_s_by_process": split,
                    "fleet_cpu_s": round(fleet_used, 2),
                    **self.drops_since(drops_before),
                    "certificates": "one per edge" if self.args.per_edge_certs else "shared",
                    "note": CONNECT_NOTES[self.transport],
                    **self.pinned(),
                }
            )
        if ok == 0:
            raise RuntimeError(f"no edge connected: {events}")

    async def wait_synced(self) -> list[dict[str, Any]]:
        log("waiting for the initial sync (pod + config map) to be ACKed")
        events = await wait_all(self.workers, "synced", 60 + self.n / 20)
        await trio.sleep(SETTLE)  # ACKs handled and flushed
        return events

    async def idle(self, synced: Sequence[dict[str, Any]]) -> None:
        rss_after = self.hub.rss_kb()
        seconds = self.args.idle_seconds
        log(f"idle for {seconds} s")
        sent_before = sum(event["keepalives"] for event in await counts(self.workers))
        async with pyspy(self.hub, "idle"):
            drops_before = self.udp_drops()
            before = self.cpu()
            began = time.monotonic()
            await trio.sleep(seconds)
            used = self.cpu() - before
            window = time.monotonic() - began
        keepalives = sum(event["keepalives"] for event in await counts(self.workers))
        keepalives -= sent_before
        emit(
            {
                "scenario": "idle",
                "transport": self.transport,
                "edges": self.n,
                "connected": sum(event["edges"] for event in synced),
                "initial_sync_acks": sum(event["acks"] for event in synced),
                "hub_rss_kb_before_connect": self.rss_before,
                "hub_rss_kb_after_sync": rss_after,
                "hub_kb_per_edge": round((rss_after - self.rss_before) / max(self.connected, 1), 2),
                "idle_s": round(window, 2),
                **used.figures("hub_cpu"),
                "hub_cpu_s_per_idle_minute": round(used.total * 60 / window, 3),
                "keepalives": keepalives,
                "hub_cpu_us_per_keepalive": round(used.total * 1e6 / max(keepalives, 1), 1),
                **self.baseline,
                "edge_keepalive_s": self.args.keepalive,
                **self.drops_since(drops_before),
                "manifests_poll_interval_s": POLL_INTERVAL,
                "note": "the manifests folder is watched with inotify (polled every "
                f"{POLL_INTERVAL} s only without it); *_no_edges is the hub idle before any "
                "edge connected; keepalives: sent by the fleet during the window, the hub's "
                "whole CPU divided by them",
                **self.pinned(),
            }
        )

    async def fanout(self, synced: Sequence[dict[str, Any]]) -> None:
        rounds = self.args.fanout_rounds
        log(f"fan-out: {rounds} round(s) of rewriting the config map")
        results = []
        async with pyspy(self.hub, "fanout"):
            for generation in range(2, rounds + 2):
                results.append(await self.fanout_round(generation))
                await trio.sleep(SETTLE)  # the ACK writes, between rounds
        arrivals_s = [at for r in results for at in r["latencies_s"]]
        messages = sum(r["received"] for r in results)
        cpu = sum(r["cpu"].total for r in results)
        acked = [r["all_acked_s"] for r in results]
        emit(
            {
                "scenario": "fanout",
                "transport": self.transport,
                "edges": self.n,
                "rounds": rounds,
                "received": messages,
                "acked_by_edges": sum(r["acked"] for r in results),
                "acks_recorded_by_hub": [r["recorded"] for r in results],
                "all_acked_s": round(statistics.median(acked), 4),
                "all_acked_s_max": round(max(acked), 4),
                "all_acked_s_rounds": [round(value, 4) for value in acked],
                "all_received_s_rounds": [round(r["all_received_s"], 4) for r in results],
                "messages_per_s": round(messages / sum(acked), 1),
                "latency_ms": percentiles([at * 1000 for at in arrivals_s], 1, low=True),
                # Within a round delivery is spread evenly over the fan-out, so its p99 stays
                # below 2x its p50; the pooled figure above also spans the rounds' differences.
                "latency_ms_rounds": [
                    percentiles([at * 1000 for at in r["latencies_s"]], 1, low=True)
                    for r in results
                ],
                "hub_cpu_s": round(cpu, 3),
                "hub_cpu_s_per_1000_messages": round(cpu / max(messages, 1) * 1000, 3),
                "hub_cpu_s_per_1000_messages_rounds": [
                    round(r["cpu"].total / max(r["received"], 1) * 1000, 3) for r in results
                ],
                "fleet_cpu_s": round(sum(r["fleet_cpu"] for r in results), 2),
                **self.drops_since(results[0]["drops_before"]),
                "manifests_poll_interval_s": POLL_INTERVAL,
                "note": "per round: t0 just before the ConfigMap file is rewritten (new "
                "generation); all_acked_s = last edge's ACK sent - t0, latency = arrival - t0 "
                "(includes the store noticing the rename: inotify, 2 ms settle); hub CPU from "
                "t0 until 0.25 s after the last ACK, per 1,000 messages delivered and ACKed",
                **self.pinned(),
            }
        )

    async def fanout_round(self, generation: int) -> dict[str, Any]:
        fleet_before = fleet_cpu(self.workers)
        drops_before = self.udp_drops()
        before = self.cpu()
        t0 = time.time()
        self.hub.write_config_map(generation)
        events = await wait_all(self.workers, f"fanout:{generation}", 60 + self.n / 20)
        await trio.sleep(0.25)  # the hub handles the last ACKs
        used = self.cpu() - before
        fleet_used = fleet_cpu(self.workers) - fleet_before
        arrivals = [at for event in events for at in event["arrivals"]]
        acks = [at for event in events for at in event["acks"]]
        if not arrivals:
            raise RuntimeError(f"no edge received the fan-out: {events}")
        recorded = 0
        with trio.move_on_after(5):
            while recorded < len(arrivals):
                recorded = await trio.to_thread.run_sync(self.hub.recorded_acks)
                await trio.sleep(0.2)
        log(
            f"round {generation - 1}: {len(arrivals)} received, all ACKed after "
            f"{max(acks) - t0:.3f} s, hub CPU {used.total:.2f} s"
        )
        return {
            "received": len(arrivals),
            "acked": len(acks),
            "recorded": recorded,
            "all_received_s": max(arrivals) - t0,
            "all_acked_s": max(acks) - t0,
            "latencies_s": [at - t0 for at in arrivals],
            "cpu": used,
            "fleet_cpu": fleet_used,
            "drops_before": drops_before,
        }

    def pinned(self) -> dict[str, Any]:
        return {"pinned": "hub on CPU 0, fleet on the others"} if self.args.pin else {}


def pin(hub: Hub, workers: Sequence[Worker]) -> None:
    """--pin: the hub alone on CPU 0, the fleet processes on the other CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("--pin needs at least 2 CPUs")
    os.sched_setaffinity(hub.pid, {cpus[0]})
    for task in Path(f"/proc/{hub.pid}/task").iterdir():  # threads started before
        os.sched_setaffinity(int(task.name), {cpus[0]})
    for worker in workers:
        os.sched_setaffinity(worker.process.pid, set(cpus[1:]))


async def run(args: argparse.Namespace) -> int:
    """Every scenario at each fleet size over each transport asked for, each with a hub of
    its own; with --output, everything emitted goes to that file too, with the command."""
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    began = time.time()
    for size in args.sizes:
        for transport in transports:
            await run_transport(argparse.Namespace(**{**vars(args), "edges": size}), transport)
    if args.output:
        write_output(args, began)
    return 0


def write_output(args: argparse.Namespace, began: float) -> None:
    """The run as one JSON document: command, machine, every line, and per size the figures
    issue 13 asks for (a summary of the lines)."""
    summary: dict[str, dict[str, Any]] = {}
    for line in RESULTS:
        figures = summary.setdefault(f"{line['transport']}:{line['edges']}", {})
        if line["scenario"] == "connect":
            figures["connect_all_s"] = line["connect_all_s"]
            figures["connected"] = line["connected"]
        elif line["scenario"] == "idle":
            figures["hub_kb_per_idle_edge"] = line["hub_kb_per_edge"]
            figures["hub_cpu_s_per_idle_minute"] = line["hub_cpu_s_per_idle_minute"]
            figures["hub_cpu_us_per_keepalive"] = line["hub_cpu_us_per_keepalive"]
            figures["hub_cpu_s_per_idle_minute_no_edges"] = line.get(
                "hub_cpu_s_per_idle_minute_no_edges"
            )
        elif line["scenario"] == "fanout":
            figures["fanout_all_acked_median_s"] = line["all_acked_s"]
            figures["fanout_all_acked_max_s"] = line["all_acked_s_max"]
            figures["latency_p50_ms"] = line["latency_ms"]["p50"]
            figures["latency_p99_ms"] = line["latency_ms"]["p99"]
            figures["hub_cpu_s_per_1000_messages"] = line["hub_cpu_s_per_1000_messages"]
    document = {
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began)),
        "wall_s": round(time.time() - began, 1),
        "machine": machine(),
        "summary": summary,
        "results": RESULTS,
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    log(f"results written to {path}")


async def run_transport(args: argparse.Namespace, transport: str) -> None:
    scenarios = {"connect", "idle", "fanout"} if args.scenario == "all" else {args.scenario}
    n = args.edges
    # A bound on the fleet processes' lives: they stop by themselves after this.
    fleet_lifetime = 240.0 + args.idle_seconds + n / 10 + args.fanout_rounds * (5 + n / 200)
    with tempfile.TemporaryDirectory(prefix=f"cloudhub-bench-{transport}-") as folder:
        hub = Hub(Path(folder), n, transport, args.workers)
        HUB_WORKERS[0] = args.workers
        hub.write_manifests(n)
        workers: list[Worker] = []
        try:
            async with trio.open_nursery() as nursery:
                await hub.start()
                quic = f", quic {hub.quic_port} (udp)" if hub.quic_port else ""
                log(
                    f"hub pids {hub.pids()}: websocket {hub.websocket_port}, https {hub.https_port}"
                    f"{quic}; the fleet connects over {transport}"
                )
                token = await hub.token()
                identity = await bootstrap(HOST, hub.https_port, token, "bench-edge")
                files = write_identity(Path(folder, "identity"), identity)
                workers = await start_workers(
                    nursery,
                    hub,
                    files,
                    n,
                    args.fleet_procs,
                    args.concurrency,
                    fleet_lifetime,
                    per_edge_certs=args.per_edge_certs,
                    keepalive=args.keepalive,
                )
                if args.per_edge_certs:
                    log(f"fleet: minting {n} edge certificates with the hub's CA")
                await wait_all(workers, "ready", 120 + n / 20)
                if args.pin:
                    pin(hub, workers)
                bench = Bench(args, hub, workers)
                await bench.measure_baseline(with_cpu="idle" in scenarios)
                await bench.connect(report="connect" in scenarios)
                if scenarios & {"idle", "fanout"}:
                    synced = await bench.wait_synced()
                    if "idle" in scenarios:
                        await bench.idle(synced)
                    if "fanout" in scenarios:
                        await bench.fanout(synced)
                done = await stop_workers(workers)
                log(
                    "fleet at the end: "
                    + json.dumps(
                        {
                            "still_connected": sum(d.get("still_connected", 0) for d in done),
                            "keepalives": sum(d.get("keepalives", 0) for d in done),
                            "timed_out": any(d["timed_out"] for d in done),
                            "fleet_cpu_s": round(sum(d["cpu_s"] for d in done), 2),
                            "closed": {k: v for d in done for k, v in d.get("closed", {}).items()},
                        }
                    )
                )
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await shut_down(hub, workers)


async def shut_down(hub: Hub, workers: Sequence[Worker]) -> None:
    for worker in workers:
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()
    code = await hub.stop()
    log(f"hub stopped (SIGTERM) with exit code {code}")
    problems = [
        line
        for line in hub.log_path.read_text(errors="replace").splitlines()
        if "WARNING" in line or "ERROR" in line or "Traceback" in line
    ]
    if problems:
        log(f"hub log has {len(problems)} warnings/errors, first ones:")
        for line in problems[:5]:
            log("  " + line)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--edges",
        default="1000",
        help="fleet size, or sizes separated by commas (each with a hub and fleet of its own)",
    )
    parser.add_argument("--fleet-procs", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--scenario", choices=("all", "connect", "idle", "fanout"), default="all")
    parser.add_argument(
        "--transport",
        choices=(*TRANSPORTS, "both"),
        default="websocket",
        help="how the edges connect; both: the scenarios over WebSocket, then over QUIC, "
        "each with a fresh hub",
    )
    parser.add_argument(
        "--concurrency", type=int, default=50, help="handshakes in flight per fleet process"
    )
    parser.add_argument(
        "--pin", action="store_true", help="hub alone on CPU 0, fleet processes on the others"
    )
    parser.add_argument(
        "--per-edge-certs",
        action="store_true",
        help="every edge with a certificate of its own (issued by the hub's CA, as /edge.crt "
        "would), instead of one shared edge identity",
    )
    parser.add_argument(
        "--fanout-rounds", type=int, default=1, help="config map changes, one after the other"
    )
    parser.add_argument(
        "--idle-no-edges-seconds",
        type=float,
        default=5.0,
        help="the hub's CPU with nothing connected and nothing changing, over this window",
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=KEEPALIVE,
        help="seconds between an edge's keepalives (EdgeCore: 15; shorter to profile idle)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the hub's `serve --workers N` (CPU and memory are summed over its processes)",
    )
    parser.add_argument("--output", help="also write the whole run as one JSON document here")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size) for size in str(args.edges).split(",")]
    except ValueError:
        parser.error("--edges: a number or numbers separated by commas")
    if min(args.sizes) < 1 or args.fleet_procs < 1 or args.idle_seconds <= 0:
        parser.error("--edges and --fleet-procs must be >= 1, --idle-seconds > 0")
    if args.fanout_rounds < 1 or args.idle_no_edges_seconds <= 0:
        parser.error("--fanout-rounds must be >= 1, --idle-no-edges-seconds > 0")
    args.edges = args.sizes[0]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return trio.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
