"""Real network faults between the real hub and simulated edges in network namespaces.

A `Rig` is: a `NetLab` (bridge + one namespace per edge, `testing/netlab.py`), the real
`python -m trio_cloudhub serve` as a subprocess (`HubProcess`) bound to the lab's bridge
address only, and per edge an `edge_worker` process inside its namespace (bootstrap, WSS,
keepalive, auto-ACK, reconnect; every message it receives reported as a JSON line). Edge 0
(`edge-a`) gets the fault; edge 1 (`edge-b`) is healthy and gets a probe change every
`PROBE_EVERY` seconds, whose delivery latency says whether the fault delayed it.

The scenarios (`SCENARIOS`) are used by the tests (tests/netns, CI sizes) and by
`bench/netfaults.py` (full sizes); each returns its figures and raises AssertionError when an
invariant breaks: every edge ends holding the newest version of every object meant for it
(in the worker's model of EdgeCore's metaManager database: the resourceVersion the store's
database has, the content checked by digest), the healthy edge stays connected and keeps
getting its deliveries at normal latency, the hub's memory stays bounded and it logs no error.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, closing, suppress
from pathlib import Path
from typing import Any

import attrs
import trio
import yaml

from trio_cloudhub.testing.hub_process import HubProcess, free_ports
from trio_cloudhub.testing.netlab import Fault, NetLab

DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
PROBE_EVERY = 0.5
EDGE_KEEPALIVE = 1.0
START_TIMEOUT = 30.0
CONVERGE = 60.0
Figures = dict[str, Any]


# --- manifests ------------------------------------------------------------------------------


def config_map(name: str, gen: int, size: int = 0) -> dict[str, Any]:
    """`size` > 0 adds that many bytes of text (a different text per generation)."""
    data = {"gen": str(gen)}
    if size:
        data["text"] = hashlib.sha256(f"{name}/{gen}".encode()).hexdigest() * (size // 64 + 1)
        data["text"] = data["text"][:size]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": data,
    }


def secret(name: str, payload: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "type": "Opaque",
        "data": {"blob": base64.b64encode(payload).decode("ascii")},
    }


def pod(
    name: str, node: str, *, config_maps: Iterable[str] = (), secrets: Iterable[str] = ()
) -> dict[str, Any]:
    volumes = [{"name": f"cm-{cm}", "configMap": {"name": cm}} for cm in config_maps]
    volumes += [{"name": f"s-{s}", "secret": {"secretName": s}} for s in secrets]
    container = {"name": "app", "image": "busybox:1.36"}
    spec: dict[str, Any] = {"nodeName": node, "containers": [container], "volumes": volumes}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def data_digest(doc: Mapping[str, Any]) -> str:
    """What `edge_worker.data_digest` computes over the delivered object."""
    if "data" not in doc:
        return ""
    text = json.dumps(doc["data"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def resource_of(doc: Mapping[str, Any]) -> str:
    meta = doc["metadata"]
    return f"{meta.get('namespace', 'default')}/{doc['kind'].lower()}/{meta['name']}"


def write_manifests(folder: Path, name: str, docs: Iterable[Mapping[str, Any]]) -> None:
    """Replace the file atomically, as an editor does: the store never reads half of it."""
    temp = folder / f".{name}.tmp"
    temp.write_text(yaml.dump_all(list(docs), Dumper=DUMPER, sort_keys=False), encoding="utf-8")
    os.replace(temp, folder / name)


def stored_versions(hub: HubProcess) -> dict[str, int]:
    """Edge resource -> resourceVersion of every object in the store's database (read-only)."""
    path = hub.data_dir / "store.db"
    if not path.exists():
        return {}
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
        rows = db.execute("SELECT kind, namespace, name, resource_version FROM objects")
        return {f"{ns}/{kind.lower()}/{name}": int(rv) for kind, ns, name, rv in rows}


# --- the hub's side -------------------------------------------------------------------------

_LOG_TIME = re.compile(r"^time=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z")


def log_line_time(line: str) -> float:
    """The wall-clock time (unix seconds) of one hub log line."""
    match = _LOG_TIME.match(line)
    if match is None:
        raise ValueError(f"no time in log line {line!r}")
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    return seconds + int(match.group(2)) / 1000


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` in KiB (0 once it is gone)."""
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


@attrs.define
class MemoryWatch:
    """Samples the hub's RSS every `every` seconds."""

    pid: int
    every: float = 0.2
    baseline_kb: int = 0
    max_kb: int = 0
    samples: int = 0

    async def run(self) -> None:
        self.baseline_kb = self.max_kb = rss_kb(self.pid)
        while True:
            self.max_kb = max(self.max_kb, rss_kb(self.pid))
            self.samples += 1
            await trio.sleep(self.every)

    def figures(self) -> Figures:
        return {
            "hub_rss_mb_before": round(self.baseline_kb / 1024, 1),
            "hub_rss_mb_max": round(self.max_kb / 1024, 1),
            "hub_rss_mb_growth": round((self.max_kb - self.baseline_kb) / 1024, 1),
        }


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


# --- an edge in its namespace ---------------------------------------------------------------


@attrs.define
class Held:
    rv: int
    digest: str
    at: float  # wall clock of arrival


class EdgeProcess:
    """One `edge_worker` process inside edge `index`'s namespace, and what it reported."""

    def __init__(self, rig: Rig, index: int, node: str) -> None:
        self.rig = rig
        self.index = index
        self.node = node
        self.events: list[dict[str, Any]] = []
        self.process: trio.Process | None = None
        self.stderr_path = rig.root / f"{node}.stderr"
        self.events_path = rig.root / f"{node}.events.jsonl"
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery, token: str) -> None:
        rig = self.rig
        hub = rig.hub
        command = [
            *rig.lab.edges[self.index].exec_prefix(),
            sys.executable,
            "-m",
            "trio_cloudhub.testing.edge_worker",
            "--host",
            rig.lab.hub_address,
            "--port",
            str(hub.websocket_port),
            "--https-port",
            str(hub.https_port),
            "--token",
            token,
            "--node",
            self.node,
            "--keepalive",
            str(rig.edge_keepalive),
        ]
        with self.stderr_path.open("ab") as stderr:
            self.process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        nursery.start_soon(self._read)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        while True:
            data = await self.process.stdout.receive_some(1 << 16)
            if not data:
                self.events.append({"event": "exited", "t": time.time()})
                self._wake()
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    self.events.append(json.loads(line))
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], within: float, start: int = 0
    ) -> dict[str, Any]:
        """The first event from index `start` on matching `predicate`."""
        checked = start
        with trio.move_on_after(within):
            while True:
                for event in self.events[checked:]:
                    if predicate(event):
                        return event
                    if event["event"] in ("exited", "fatal"):
                        raise AssertionError(f"{self.node} worker ended: {event}\n{self.stderr()}")
                checked = len(self.events)
                await self._changed.wait()
        raise TimeoutError(f"{self.node}: no matching event within {within} s; last {self.tail()}")

    async def until(self, check: Callable[[], bool], within: float) -> None:
        with trio.fail_after(within):
            while not check():
                await self._changed.wait()

    async def command(self, text: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")

    async def stop(self) -> None:
        """End the worker; what it reported stays in `<root>/<node>.events.jsonl`."""
        process = self.process
        if process is None:
            return
        with self.events_path.open("w") as file:
            file.writelines(json.dumps(event) + "\n" for event in self.events)
        with trio.CancelScope(shield=True):
            if process.returncode is None and process.stdin is not None:
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await process.stdin.aclose()
            with trio.move_on_after(3):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()

    def stderr(self) -> str:
        with suppress(OSError):
            return self.stderr_path.read_text()[-3000:]
        return ""

    def tail(self, count: int = 5) -> list[dict[str, Any]]:
        return self.events[-count:]

    def count(self, event: str) -> int:
        return sum(1 for e in self.events if e["event"] == event)

    @property
    def connected(self) -> bool:
        for event in reversed(self.events):
            if event["event"] == "connected":
                return True
            if event["event"] in ("disconnected", "exited"):
                return False
        return False

    def messages(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "message" and e["t"] >= since]

    def holds(self) -> dict[str, Held]:
        """What the edge's database (the worker's model of EdgeCore's metaManager) holds now,
        per resource, with the time it came to hold that version."""
        held: dict[str, Held] = {}
        for event in self.messages():
            resource, now = event["resource"], event.get("held")
            if now is None:
                held.pop(resource, None)
                continue
            rv, digest = int(now["rv"] or 0), now["data_sha256"]
            old = held.get(resource)
            if old is None or (old.rv, old.digest) != (rv, digest):
                held[resource] = Held(rv, digest, event["t"])
        return held


# --- the rig --------------------------------------------------------------------------------


@attrs.define
class Rig:
    root: Path
    lab: NetLab
    hub: HubProcess
    memory: MemoryWatch
    nursery: trio.Nursery
    edge_keepalive: float = EDGE_KEEPALIVE
    edges: list[EdgeProcess] = attrs.field(factory=list)
    # manifest file -> (node, resource -> data digest) of what it places on that node
    placed: dict[str, tuple[str, dict[str, str]]] = attrs.field(factory=dict)
    # packets the last fault replaced had dropped, per direction
    dropped: dict[str, int] = attrs.field(factory=dict)

    @property
    def faulty(self) -> EdgeProcess:
        return self.edges[0]

    @property
    def healthy(self) -> EdgeProcess:
        return self.edges[1]

    def publish(self, node: str, name: str, docs: list[dict[str, Any]]) -> float:
        """Write manifest file `name`, whose objects all go to `node`; returns the wall time."""
        self.placed[name] = (node, {resource_of(doc): data_digest(doc) for doc in docs})
        began = time.time()
        write_manifests(self.hub.manifests, name, docs)
        return began

    def want(self, node: str) -> dict[str, str]:
        """Resource -> data digest of everything the manifests place on `node`."""
        found: dict[str, str] = {}
        for owner, resources in self.placed.values():
            if owner == node:
                found.update(resources)
        return found

    def mismatches(self, edge: EdgeProcess) -> list[str]:
        versions = stored_versions(self.hub)
        held = edge.holds()
        problems = []
        for resource, digest in sorted(self.want(edge.node).items()):
            have = held.get(resource)
            if have is None:
                problems.append(f"missing {resource}")
            elif have.digest != digest:
                problems.append(f"{resource}: other content (rv {have.rv})")
            elif have.rv != versions.get(resource):
                problems.append(f"{resource} at rv {have.rv}, store has {versions.get(resource)}")
        return problems

    async def converge(self, edge: EdgeProcess, within: float = CONVERGE) -> float:
        """Until `edge` holds the newest version of everything meant for it; returns the
        wall time the last message it needed arrived."""
        problems: list[str] = []
        with trio.move_on_after(within):
            while True:
                problems = self.mismatches(edge)
                if not problems:
                    held = edge.holds()
                    return max(held[r].at for r in self.want(edge.node))
                with trio.move_on_after(0.2):
                    await edge._changed.wait()
        raise AssertionError(
            f"{edge.node} did not converge within {within} s: {', '.join(problems[:8])}; "
            f"last events {edge.tail()}"
        )

    async def set_fault(self, fault: Fault, index: int = 0) -> float:
        """Replace edge `index`'s fault; what the one before dropped goes to `dropped`."""
        self.dropped = await trio.to_thread.run_sync(self.lab.dropped, index)
        await trio.to_thread.run_sync(self.lab.set_fault, index, fault)
        return time.time()

    async def heal(self, index: int = 0) -> float:
        return await self.set_fault(Fault(), index)

    def log_lines(self, text: str, since: float = 0.0) -> list[str]:
        return [
            line
            for line in self.hub.log_text().splitlines()
            if text in line and line.startswith("time=") and log_line_time(line) >= since - 0.002
        ]

    async def wait_log(self, text: str, since: float, within: float) -> str:
        with trio.move_on_after(within):
            while True:
                found = self.log_lines(text, since)
                if found:
                    return found[0]
                await trio.sleep(0.05)
        raise AssertionError(f"no hub log line with {text!r} within {within} s")

    async def hub_counter(self, name: str) -> float:
        """The value of one unlabelled metric of the hub (Prometheus text)."""
        line = await self.wait_log("serving: websocket port", 0.0, 5.0)
        match = re.search(r"metrics port (\d+)", line)
        assert match, f"no metrics port in {line!r}"
        url = f"http://127.0.0.1:{match.group(1)}/metrics"
        text = await trio.to_thread.run_sync(_http_get, url)
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def errors_logged(self) -> list[str]:
        return [
            line
            for line in self.hub.log_text().splitlines()
            if " level=ERROR " in line or "level=CRITICAL" in line or "Traceback" in line
        ]


@asynccontextmanager
async def open_rig(
    root: Path,
    *,
    keepalive_interval: float = 3,
    write_timeout: float = 3,
    ack_timeout: float = 2.0,
    edge_keepalive: float = EDGE_KEEPALIVE,
    initial: Callable[[Rig], None] | None = None,
) -> AsyncIterator[Rig]:
    """Lab, hub and two edges (`edge-a` faulty, `edge-b` healthy), connected and synced."""
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    lab = await trio.to_thread.run_sync(NetLab.create, 2)
    hub: HubProcess | None = None
    rig: Rig | None = None
    try:
        address = lab.hub_address
        websocket_port, https_port = free_ports(2)
        hub = HubProcess(
            root / "hub",
            cloud_hub={
                "advertiseAddress": [address],
                "websocket": {"address": address, "port": websocket_port},
                "https": {"address": address, "port": https_port},
                "keepaliveInterval": int(keepalive_interval),
                "writeTimeout": int(write_timeout),
            },
            trio_cloud_hub={"ackTimeoutSeconds": ack_timeout, "reconcileIntervalSeconds": 2.0},
            ports=(websocket_port, https_port),
        )
        async with trio.open_nursery() as nursery:
            rig = Rig(root, lab, hub, MemoryWatch(0), nursery, edge_keepalive=edge_keepalive)
            rig.publish("edge-a", "edge-a.yaml", base_docs("edge-a", 1))
            rig.publish("edge-b", "edge-b.yaml", base_docs("edge-b", 1))
            if initial is not None:
                initial(rig)
            await hub.start()
            assert hub.process is not None
            token = await hub.token()
            rig.edges = [EdgeProcess(rig, 0, "edge-a"), EdgeProcess(rig, 1, "edge-b")]
            for edge in rig.edges:
                await edge.start(nursery, token)
            for edge in rig.edges:
                await edge.wait_for(lambda e: e["event"] == "connected", START_TIMEOUT)
            for edge in rig.edges:
                await rig.converge(edge, START_TIMEOUT)
            rig.memory = MemoryWatch(hub.process.pid)
            nursery.start_soon(rig.memory.run)
            yield rig
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if rig is not None:
                for edge in rig.edges:
                    await edge.stop()
            if hub is not None:
                await hub.aclose()
            await trio.to_thread.run_sync(lab.close)


def base_docs(node: str, gen: int, count: int = 3, size: int = 0) -> list[dict[str, Any]]:
    """A pod on `node` using `count` config maps `<node>-cm-<i>` (of `size` bytes of text),
    all at generation `gen`."""
    names = [f"{node}-cm-{i}" for i in range(count)]
    maps = [config_map(n, gen, size) for n in names]
    return [*maps, pod(f"{node}-pod", node, config_maps=names)]


# --- the healthy edge's probe ---------------------------------------------------------------


@attrs.define
class Probe:
    """Changes `edge-b`'s first config map every PROBE_EVERY s and times each delivery."""

    rig: Rig
    gen: int = 100
    latencies: list[float] = attrs.field(factory=list)
    lost: int = 0

    async def run(self) -> None:
        edge = self.rig.healthy
        while True:
            self.gen += 1
            docs = base_docs("edge-b", 1)
            docs[0] = config_map("edge-b-cm-0", self.gen)
            digest = data_digest(docs[0])
            began = self.rig.publish("edge-b", "edge-b.yaml", docs)
            try:
                event = await edge.wait_for(
                    lambda e, d=digest: e["event"] == "message" and e["data_sha256"] == d,  # type: ignore[misc]
                    within=10.0,
                )
            except TimeoutError:
                self.lost += 1
                continue
            self.latencies.append(event["t"] - began)
            await trio.sleep(PROBE_EVERY)

    def figures(self) -> Figures:
        values = sorted(self.latencies)
        if not values:
            return {"healthy_deliveries": 0, "healthy_lost": self.lost}
        p50 = values[len(values) // 2]
        return {
            "healthy_deliveries": len(values),
            "healthy_lost": self.lost,
            "healthy_latency_ms_p50": round(p50 * 1000, 1),
            "healthy_latency_ms_max": round(values[-1] * 1000, 1),
        }


@asynccontextmanager
async def probing(rig: Rig) -> AsyncIterator[Probe]:
    probe = Probe(rig)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        yield probe
        nursery.cancel_scope.cancel()


MEMORY_BOUND_MB = 32.0  # hub RSS growth allowed during a scenario with small objects


def check_common(
    rig: Rig,
    probe: Probe,
    figures: Figures,
    *,
    healthy_bound: float,
    memory_bound_mb: float = MEMORY_BOUND_MB,
) -> None:
    """The invariants every scenario shares, and their figures."""
    figures.update(rig.memory.figures())
    figures.update(probe.figures())
    if rig.dropped:
        figures["dropped_packets"] = dict(rig.dropped)
    healthy = rig.healthy
    figures["healthy_sessions"] = healthy.count("connected")
    figures["healthy_delayed"] = bool(
        probe.lost or not probe.latencies or max(probe.latencies) > healthy_bound
    )
    assert healthy.count("connected") == 1, f"the healthy edge reconnected: {healthy.tail()}"
    assert probe.latencies, "the healthy edge got no probe delivery during the fault"
    assert not figures["healthy_delayed"], f"the healthy edge was delayed: {probe.figures()}"
    errors = rig.errors_logged()
    assert not errors, "\n".join(errors[:10])
    growth = figures["hub_rss_mb_growth"]
    assert growth <= memory_bound_mb, f"hub RSS grew by {growth} MB (bound {memory_bound_mb})"


# --- scenarios ------------------------------------------------------------------------------


def a_docs(gen: int) -> list[dict[str, Any]]:
    return base_docs("edge-a", gen)


async def silent_partition(root: Path, *, keepalive: float = 3.0) -> Figures:
    """Drop everything both ways (no FIN, no RST reaches anyone): the hub must end the session
    within keepaliveInterval + 1 s, keep the node's queue, and deliver after the heal."""
    async with open_rig(root, keepalive_interval=keepalive) as rig, probing(rig) as probe:
        edge = rig.faulty
        began = await rig.set_fault(Fault.partition())
        # Changed during the partition, before the hub notices: sent into the void.
        docs = a_docs(1)
        docs[0] = config_map("edge-a-cm-0", 2)
        rig.publish("edge-a", "edge-a.yaml", docs)
        line = await rig.wait_log("node edge-a disconnected", began, keepalive + 5)
        detected = log_line_time(line)
        # Changed while the node is away: waits in its queue.
        docs[0] = config_map("edge-a-cm-0", 3)
        docs[1] = config_map("edge-a-cm-1", 2)
        rig.publish("edge-a", "edge-a.yaml", docs)
        await trio.sleep(1.0)
        healed = await rig.heal()
        arrived = await rig.converge(edge)
        figures: Figures = {
            "scenario": "silent_partition",
            "keepalive_interval_s": keepalive,
            "detect_s": round(detected - began, 3),
            "hub_reason": line.split("disconnected: ", 1)[-1].split('"')[0],
            "deliver_after_heal_s": round(arrived - healed, 3),
            "faulty_sessions": edge.count("connected"),
        }
        check_common(rig, probe, figures, healthy_bound=keepalive / 2)
        assert rig.dropped["to_edge"] and rig.dropped["to_hub"], figures
        assert "keepalive timeout" in line, line
        assert detected - began <= keepalive + 1, figures
        return figures


async def one_way(root: Path, *, direction: str, keepalive: float = 3.0) -> Figures:
    """`to_hub`: edge→hub packets dropped, hub→edge passing; `to_edge`: the reverse."""
    fault = Fault(to_hub_loss=100) if direction == "to_hub" else Fault(to_edge_loss=100)
    async with open_rig(root, keepalive_interval=keepalive) as rig, probing(rig) as probe:
        edge = rig.faulty
        began = await rig.set_fault(fault)
        docs = a_docs(1)
        docs[0] = config_map("edge-a-cm-0", 2)
        rig.publish("edge-a", "edge-a.yaml", docs)
        await trio.sleep(keepalive + 1.5)
        docs[1] = config_map("edge-a-cm-1", 2)
        rig.publish("edge-a", "edge-a.yaml", docs)
        await trio.sleep(1.0)
        ended = rig.log_lines("node edge-a disconnected", began)
        healed = await rig.heal()
        arrived = await rig.converge(edge)
        figures: Figures = {
            "scenario": f"one_way_{direction}",
            "keepalive_interval_s": keepalive,
            "fault_s": round(healed - began, 3),
            "hub_ended_session": bool(ended),
            "detect_s": round(log_line_time(ended[0]) - began, 3) if ended else None,
            "hub_reason": ended[0].split("disconnected: ", 1)[-1].split('"')[0] if ended else "",
            "deliver_after_heal_s": round(arrived - healed, 3),
            "faulty_sessions": edge.count("connected"),
        }
        check_common(rig, probe, figures, healthy_bound=keepalive / 2)
        blocked, open_ = ("to_hub", "to_edge") if direction == "to_hub" else ("to_edge", "to_hub")
        assert rig.dropped[blocked] and not rig.dropped[open_], figures
        if direction == "to_hub":  # no keepalive reaches the hub
            assert ended and log_line_time(ended[0]) - began <= keepalive + 1, figures
        return figures


async def packet_loss(
    root: Path,
    *,
    percent: int,
    keepalive: float = 4.0,
    generations: int = 6,
    objects: int = 8,
    size: int = 16 * 1024,
    hold: float = 8.0,
) -> Figures:
    """`percent` % of the packets lost each way while `generations` changes of `objects`
    config maps are delivered; the loss stays on for at least `hold` s (two keepalive
    intervals: sessions must live through it or come back), then the network heals."""
    async with open_rig(root, keepalive_interval=keepalive) as rig, probing(rig) as probe:
        edge = rig.faulty
        rig.publish("edge-a", "edge-a.yaml", base_docs("edge-a", 1, objects, size))
        await rig.converge(edge)
        sessions = edge.count("connected")
        began = await rig.set_fault(Fault.loss(percent))
        for gen in range(2, generations + 2):
            rig.publish("edge-a", "edge-a.yaml", base_docs("edge-a", gen, objects, size))
            await trio.sleep(0.5)
        converged_under_loss: float | None = None
        with trio.move_on_after(20.0):
            converged_under_loss = await rig.converge(edge, within=20.0)
        await trio.sleep(max(0.0, began + hold - time.time()))
        healed = await rig.heal()
        arrived = await rig.converge(edge)
        figures: Figures = {
            "scenario": f"loss_{percent}",
            "keepalive_interval_s": keepalive,
            "changes": generations * objects,
            "converged_under_loss_s": (
                round(converged_under_loss - began, 3) if converged_under_loss else None
            ),
            # None: all was delivered before the heal
            "deliver_after_heal_s": round(arrived - healed, 3) if arrived > healed else None,
            "faulty_reconnects": edge.count("connected") - sessions,
            "hub_sessions_ended": len(rig.log_lines("node edge-a disconnected", began)),
        }
        check_common(rig, probe, figures, healthy_bound=keepalive / 2)
        assert rig.dropped["to_edge"] and rig.dropped["to_hub"], f"no packet lost: {figures}"
        return figures


async def slow_link(
    root: Path,
    *,
    rate: str = "64kbit",
    secret_bytes: int = 1024 * 1024,
    secrets: int = 1,
    write_timeout: float = 3.0,
    ack_timeout: float = 2.0,
    within: float = 600.0,
) -> Figures:
    """A `rate` link (tbf, both ways) and `secrets` secrets whose base64 text is
    `secret_bytes` long each (one manifest file each: the embedded store reads files of up to
    4 MiB): they must arrive whole and once, the session must survive while bytes move."""
    async with open_rig(root, write_timeout=write_timeout, ack_timeout=ack_timeout) as rig:
        edge = rig.faulty
        await trio.to_thread.run_sync(rig.lab.shape, 0, rate)
        sessions = edge.count("connected")
        retransmitted = await rig.hub_counter("trio_cloudhub_retransmissions_total")
        names = [f"edge-a-secret-{i}" for i in range(secrets)]
        async with probing(rig) as probe:
            began = time.time()
            for name in names:
                payload = os.urandom(secret_bytes * 3 // 4)
                rig.publish("edge-a", f"{name}.yaml", [secret(name, payload)])
            docs = a_docs(1)
            config_maps = [f"edge-a-cm-{i}" for i in range(3)]
            docs[-1] = pod("edge-a-pod", "edge-a", config_maps=config_maps, secrets=names)
            rig.publish("edge-a", "edge-a.yaml", docs)
            arrived = await rig.converge(edge, within=within)
        resources = {f"default/secret/{name}" for name in names}
        copies = sum(1 for e in edge.messages() if e["resource"] in resources)
        seconds = arrived - began
        sent = secret_bytes * secrets
        figures: Figures = {
            "scenario": "slow_link",
            "rate": rate,
            "secrets": secrets,
            "secret_base64_bytes": secret_bytes,
            "write_timeout_s": write_timeout,
            "ack_timeout_s": ack_timeout,
            "deliver_s": round(seconds, 3),
            "goodput_kbit_s": round(sent * 8 / 1000 / seconds, 1) if seconds else None,
            "secret_copies_received": copies,
            "hub_retransmissions": (
                await rig.hub_counter("trio_cloudhub_retransmissions_total") - retransmitted
            ),
            "faulty_reconnects": edge.count("connected") - sessions,
            "hub_sessions_ended": len(rig.log_lines("node edge-a disconnected", began)),
        }
        # What the hub holds of the secrets: manifests, store objects, queued message and its
        # frame; each a few times their size at most.
        bound = MEMORY_BOUND_MB + 8 * sent / 1024 / 1024
        check_common(rig, probe, figures, healthy_bound=1.0, memory_bound_mb=bound)
        assert figures["faulty_reconnects"] == 0, (figures, rig.log_lines("disconnected"))
        assert copies == secrets, f"copies sent behind themselves: {figures}"
        return figures


async def half_open(root: Path, *, keepalive: float = 20.0) -> Figures:
    """A partition during which the edge gives up its connection (its reset is lost) and
    changes are sent into the old one; then the network heals but the old connection stays
    dead (a NAT that forgot it: its packets are dropped for good). The edge reconnects while
    the hub still holds the old session, half open: the hub must replace it at once (not wait
    for the keepalive timeout) and the new session must get everything."""
    async with open_rig(root, keepalive_interval=keepalive) as rig, probing(rig) as probe:
        edge = rig.faulty
        began = await rig.set_fault(Fault.partition())
        docs = a_docs(1)
        docs[0] = config_map("edge-a-cm-0", 2)
        rig.publish("edge-a", "edge-a.yaml", docs)
        await trio.sleep(1.0)  # the hub sent it into the dead connection: in flight
        mark = len(edge.events)
        await edge.command("forget")
        forgot = await edge.wait_for(lambda e: e["event"] == "forgot", 5, start=mark)
        docs[1] = config_map("edge-a-cm-1", 2)
        rig.publish("edge-a", "edge-a.yaml", docs)
        await trio.sleep(1.0)
        healed = await rig.set_fault(Fault(100, 100, edge_port=forgot["local_port"]))
        partition_dropped = dict(rig.dropped)
        await edge.wait_for(lambda e: e["event"] == "connected", keepalive, start=mark)
        arrived = await rig.converge(edge)
        ended = rig.log_lines("node edge-a disconnected", began)
        figures: Figures = {
            "scenario": "half_open",
            "keepalive_interval_s": keepalive,
            "hub_reason": ended[0].split("disconnected: ", 1)[-1].split('"')[0] if ended else "",
            "replaced_after_heal_s": round(log_line_time(ended[0]) - healed, 3) if ended else None,
            "deliver_after_heal_s": round(arrived - healed, 3),
            "faulty_sessions": edge.count("connected"),
        }
        check_common(rig, probe, figures, healthy_bound=2.0)
        assert partition_dropped["to_edge"] and partition_dropped["to_hub"], figures
        assert ended and "replaced by a new connection" in ended[0], (figures, ended)
        assert arrived - healed < keepalive - 2, figures
        return figures


Scenario = Callable[..., Awaitable[Figures]]
SCENARIOS: dict[str, Scenario] = {
    "silent_partition": silent_partition,
    "one_way_to_hub": lambda root, **kw: one_way(root, direction="to_hub", **kw),
    "one_way_to_edge": lambda root, **kw: one_way(root, direction="to_edge", **kw),
    "loss_5": lambda root, **kw: packet_loss(root, percent=5, **kw),
    "loss_30": lambda root, **kw: packet_loss(root, percent=30, **kw),
    "slow_link": slow_link,
    "half_open": half_open,
}
