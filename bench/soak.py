"""Soak: random changes, edge drops and hub restarts; at the end every edge holds exactly its
desired state (issue 3, "Delivery that loses nothing").

    python -m bench.soak [--edges 500] [--changes 20000] [--restarts 4] [--seed 1]
                         [--procs 2] [--disconnect-rate R] [--batch-size 10]
                         [--batch-interval 0.15] [--converge-timeout 180] [--settle 6]
                         [--hub-src snapshot|live] [--dir DIR] [--keep]
    python -m bench.soak --edges 5 --changes 300 --restarts 2     # small: ~20 s

Prints ONE JSON line on stdout (progress on stderr); exit status 1 when something was lost or
the edges did not converge.

What happens:
- The real `python -m trio_cloudhub serve` runs with the embedded store on a manifests folder,
  `manifestsPollInterval: 0.05`, log level INFO into `<run dir>/hub.log` (all lifetimes, with
  `=== soak:` marker lines between them), on two fixed free ports below the ephemeral port
  range (so a restarted hub gets the same ports and no edge's outgoing socket can hold them).
  The hub runs from a copy of `trio_cloudhub/` taken at start (`--hub-src live`: from the
  repository itself), so edits made to the repository during a run do not reach it.
- Desired state, written by the bench: a Node object per edge (files of 50 nodes), 2 pods per
  node at first, `max(2, K/10)` shared ConfigMaps and a node-local ConfigMap `cm-<node>` per
  node. Pods of a node live in one file `pods-<node>.yaml` (removed when the node has none),
  each ConfigMap in its own file. A pod references up to two shared ConfigMaps (`envFrom`) and
  with probability 0.4 its node's local ConfigMap (a volume). Every object carries the
  annotation `soak/seq`: the number of the write that produced that version.
- The hub starts, one edge identity is bootstrapped over HTTPS (token from `trio_cloudhub
  token`), `--procs` `bench.soak_worker` processes connect the K edges and the bench waits
  until every edge holds its initial state (`initial_sync_s`).
- Change phase: every `--batch-interval` seconds a batch of `--batch-size` random changes is
  applied to the model and the touched files are written atomically (dot temp file, then
  rename) or removed: create pod (27%, on a random node, random references), delete pod (20%),
  update pod (18%; 30% of them also change its references), update ConfigMap (27%, shared or
  local; recreates it if it was deleted), delete ConfigMap (3%, pods keep referencing it) and
  update Node (5%). Meanwhile the workers close random edges abruptly (`--disconnect-rate` per
  second over the fleet, default 1 + K/250; reconnect after 0.05-2 s) and the hub is
  restarted R times at spread random moments, half by SIGTERM (graceful drain), half by
  SIGKILL (crash), in random order (both kinds when R >= 2), down for 0.3-2 s, restarted
  with the same data dir and ports (the next restart waits until 90% of the edges are back,
  plus 1 s). Edges retry while it is down (back-off 0.1 s doubling to 2 s). The change
  writer does not pause for restarts.
- Convergence: disconnects stop, and every second the workers compare each edge's state with
  the final desired state, until it matches or `--converge-timeout` (`converge_s`). The
  edges then stay connected `--settle` seconds (6, more than the hub's reconciliation period)
  before they stop; `lost` is computed from everything they received, so a wrong message
  after convergence counts too (`messages_after_convergence`: how many arrived then).

The edge's state: its messages are applied in order as EdgeCore's store would (per uid the
highest resourceVersion; a delete removes the uid). Figures:
- `lost`: (node, object) pairs whose final desired version (by `soak/seq`) is not what the
  edge ended with, plus objects the edge holds that are not desired for it (0 = nothing lost);
- `resent_duplicates`: messages an edge received again with the same operation and
  resourceVersion as the previous message for that uid, which it had received and ACKed (a
  SIGKILL loses up to 0.2 s of ack points, so some are expected); `stale_versions`: an
  insert/update older than the version held;
- delivery latency: for each change of a node's desired state (an object version appearing or
  an object leaving it), from just before its batch was written to the edge first holding that
  version or a newer one (resp. no longer holding the object), so a version replaced by a
  newer one before it was sent is met when the newer one arrives. A change overtaken by the
  opposite one before it was met (an object leaving the node before its version arrived, a
  withdrawal cancelled by a new reference) counts in `latency_superseded`, not as a sample;
  `latency_unmet`: the last change of a pair never met (then `lost` > 0). Includes the time
  the hub was down and the edge's reconnect delays; `delivery_latency_without_restarts_s`:
  the samples whose wait overlaps no restart window (from the stop signal until 90% of the
  edges were back);
- `hub_peak_rss_mb`: max VmHWM over all hub lifetimes (sampled every 0.5 s and before each
  stop); `restarts` by kind and the SIGTERM exit codes; `hub_log_warnings`/`_errors`.

The run directory (`cloudhub-soak-*` in the temp dir, `--dir` elsewhere) holds the config,
data dir, manifests, `hub.log`, `changes.log` (every change: time, seq, what) and the edges'
events; it is kept with `--keep` or when something was lost, else removed.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio
import yaml

from bench.fleet_worker import percentiles
from bench.run import REPO, is_https_ready, listening_ports, log, machine, write_identity
from bench.soak_worker import SEQ_ANNOTATION, EdgeModel, Event, lost_pairs
from trio_cloudhub.testing.edge_sim import bootstrap
from trio_cloudhub.testing.hub_process import free_ports

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05
NODES_PER_FILE = 50
INITIAL_PODS_PER_NODE = 2
MAX_PODS_PER_NODE = 4  # on average: creates turn into deletes above K * this
LOCAL_REF_PROBABILITY = 0.4
SHARED_REF_COUNTS = (0, 1, 1, 2)
WEIGHTS = {
    "create_pod": 27,
    "delete_pod": 20,
    "update_pod": 18,
    "update_configmap": 27,
    "delete_configmap": 3,
    "update_node": 5,
}
DOWN_TIME = (0.3, 2.0)
RECONNECTED = 0.9  # share of the edges back before the next restart may happen ...
MIN_UP = 1.0  # ... and then at least this many seconds
STOP_TIMEOUT = 30.0
HWM_SAMPLE_INTERVAL = 0.5
CHECK_INTERVAL = 1.0
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

CONFIG = """\
apiVersion: cloudcore.config.kubeedge.io/v1alpha1
kind: CloudCore
modules:
  cloudHub:
    advertiseAddress: [{host}]
    nodeLimit: {node_limit}
    tlsCAFile: {pki}/rootCA.crt
    tlsCAKeyFile: {pki}/rootCA.key
    tlsCertFile: {pki}/server.crt
    tlsPrivateKeyFile: {pki}/server.key
    websocket: {{address: {host}, port: {websocket_port}}}
    https: {{address: {host}, port: {https_port}}}
    unixsocket: {{enable: false}}
trioCloudHub:
  manifestsPollInterval: {poll}
  logLevel: INFO
"""


# --- ports and the hub's source ---------------------------------------------------------------


def hub_source(root: Path, mode: str) -> tuple[Path, dict[str, Any]]:
    """The directory the hub runs from (its cwd, so `-m trio_cloudhub` is imported from it)."""

    def git(*args: str) -> list[str]:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        )
        return [line.strip() for line in result.stdout.splitlines()]

    info = {
        "from": mode,
        "head": "".join(git("rev-parse", "--short", "HEAD")),
        # uncommitted changes of the package when the run began (read-only git commands)
        "modified": git("status", "--porcelain", "--", "trio_cloudhub"),
    }
    if mode == "live":
        return REPO, info
    folder = root / "hub-src"
    shutil.copytree(
        REPO / "trio_cloudhub",
        folder / "trio_cloudhub",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return folder, info


# --- the hub process ------------------------------------------------------------------------


def vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class SoakHub:
    """The `serve` subprocess on fixed ports, restarted with the same data dir."""

    def __init__(self, root: Path, source: Path, edges: int, ports: Sequence[int]) -> None:
        self.root = root
        self.source = source
        self.config = root / "cloudcore.yaml"
        self.data_dir = root / "data"
        self.manifests = root / "manifests"
        self.log_path = root / "hub.log"
        self.websocket_port, self.https_port = ports
        self.process: trio.Process | None = None
        self.starts = 0
        self.peak_hwm_kb = 0
        self.lifetimes: list[dict[str, Any]] = []
        self.manifests.mkdir(parents=True)
        self.config.write_text(
            CONFIG.format(
                host=HOST,
                node_limit=max(1000, edges + 10),
                pki=root / "no-pki",
                websocket_port=self.websocket_port,
                https_port=self.https_port,
                poll=POLL_INTERVAL,
            )
        )

    def mark(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S") + f",{int(time.time() * 1000) % 1000:03d}"
        with self.log_path.open("a") as file:
            file.write(f"{stamp} === soak: {text}\n")

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "trio_cloudhub", *args, "--config", str(self.config)]

    async def start(self) -> None:
        for attempt in range(1, 4):
            self.starts += 1
            self.mark(f"hub start #{self.starts}")
            command = [*self.command("serve"), "--data-dir", str(self.data_dir)]
            command += ["--manifests", str(self.manifests)]
            with self.log_path.open("ab") as stderr:
                self.process = await trio.lowlevel.open_process(
                    command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=self.source
                )
            self.lifetimes.append({"pid": self.process.pid, "started": time.time()})
            if await self._ready():
                return
            log(f"hub start #{self.starts} failed (attempt {attempt}); see {self.log_path}")
            await trio.sleep(1.0)
        raise RuntimeError(f"the hub does not start; see {self.log_path}")

    async def _ready(self) -> bool:
        assert self.process is not None
        with trio.move_on_after(60):
            while True:
                if self.process.poll() is not None:
                    self.lifetimes[-1].update(exit=self.process.returncode, ended=time.time())
                    return False
                if self.websocket_port in listening_ports(self.process.pid) and (
                    await is_https_ready(self.https_port)
                ):
                    return True
                await trio.sleep(0.1)
        self.process.kill()
        await self.process.wait()
        return False

    def sample(self) -> None:
        if self.process is not None and self.process.returncode is None:
            hwm = vm_hwm_kb(self.process.pid)
            self.peak_hwm_kb = max(self.peak_hwm_kb, hwm)
            self.lifetimes[-1]["hwm_kb"] = max(self.lifetimes[-1].get("hwm_kb", 0), hwm)

    async def sample_forever(self) -> None:
        while True:
            self.sample()
            await trio.sleep(HWM_SAMPLE_INTERVAL)

    async def stop(self, kind: str) -> int | None:
        """`sigterm` (drain, bounded by STOP_TIMEOUT, then SIGKILL) or `sigkill`."""
        process = self.process
        if process is None:
            return None
        self.sample()
        self.mark(f"{kind.upper()} to hub pid {process.pid}")
        if process.returncode is None:
            if kind == "sigkill":
                process.kill()
            else:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    while process.poll() is None:
                        self.sample()
                        await trio.sleep(0.1)
                if process.returncode is None:
                    self.mark(f"hub pid {process.pid} did not stop within {STOP_TIMEOUT} s")
                    process.kill()
        code = await process.wait()
        self.lifetimes[-1].update(exit=code, ended=time.time(), stopped_by=kind)
        self.mark(f"hub pid {process.pid} exited with {code}")
        self.process = None
        return code

    async def token(self) -> str:
        command = [*self.command("token"), "--data-dir", str(self.data_dir)]
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, cwd=self.source
        )
        return str(result.stdout.decode()).strip()

    def log_problems(self) -> tuple[int, int, list[str]]:
        warnings = errors = 0
        first: list[str] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if " WARNING " in line:
                warnings += 1
            elif " ERROR " in line or "Traceback" in line or " CRITICAL " in line:
                errors += 1
            else:
                continue
            if len(first) < 5:
                first.append(line[:300])
        return warnings, errors, first


# --- the desired state --------------------------------------------------------------------


@attrs.define(slots=True)
class Pod:
    node: str
    shared: tuple[str, ...]
    local: bool
    seq: int

    def refs(self) -> tuple[str, ...]:
        return (*self.shared, f"cm-{self.node}") if self.local else self.shared


Expectation = tuple[float, int | None]  # (time written, seq; None = the object must go)


class World:
    """The bench's model of the desired state, its manifest files and what each change means
    for each node (expectations)."""

    def __init__(self, rng: random.Random, edges: int, manifests: Path, changes_log: TextIO):
        self.rng = rng
        self.manifests = manifests
        self.changes_log = changes_log
        self.nodes = [f"edge-{i}" for i in range(edges)]
        self.shared = [f"shared-{i}" for i in range(max(2, edges // 10))]
        self.seq = 0
        self.node_seq: dict[str, int] = {}
        self.configmaps: dict[str, int] = {}  # existing -> seq
        self.pods: dict[str, Pod] = {}
        self.pod_names: list[str] = []  # for O(1) random choice
        self.pod_index: dict[str, int] = {}
        self.pods_on: dict[str, set[str]] = defaultdict(set)
        self.users: dict[str, Counter[str]] = defaultdict(Counter)  # configmap -> node -> pods
        self.next_pod = 0
        self.dirty: set[str] = set()
        self.touched: set[str] = set()
        self.view: dict[str, dict[str, int]] = {}  # node -> resource -> seq, as written
        self.expectations: dict[tuple[str, str], list[Expectation]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.files_written = 0
        self.files_removed = 0

    def next_seq(self, what: str) -> int:
        self.seq += 1
        self.changes_log.write(f"{time.time():.4f} seq {self.seq} {what}\n")
        return self.seq

    # -- changes --

    def initial(self) -> None:
        for node in self.nodes:
            self.node_seq[node] = self.next_seq(f"create node {node}")
            self.dirty.add(self.node_file(node))
        for name in self.shared:
            self._set_configmap(name, "create")
        for node in self.nodes:
            for _ in range(INITIAL_PODS_PER_NODE):
                self._create_pod(node)
        self.write_batch(None)

    def change(self) -> None:
        kinds, weights = zip(*WEIGHTS.items(), strict=True)
        kind = self.rng.choices(kinds, weights)[0]
        if kind == "create_pod" and len(self.pods) >= MAX_PODS_PER_NODE * len(self.nodes):
            kind = "delete_pod"
        if kind in ("delete_pod", "update_pod") and not self.pods:
            kind = "create_pod"
        if kind == "delete_configmap" and not self.configmaps:
            kind = "update_configmap"
        self.counts[kind] += 1
        if kind == "create_pod":
            self._create_pod(self.rng.choice(self.nodes))
        elif kind == "delete_pod":
            self._delete_pod(self.rng.choice(self.pod_names))
        elif kind == "update_pod":
            self._update_pod(self.rng.choice(self.pod_names))
        elif kind == "update_configmap":
            self._set_configmap(self._some_configmap(), "update")
        elif kind == "delete_configmap":
            self._delete_configmap(self.rng.choice(sorted(self.configmaps)))
        else:
            node = self.rng.choice(self.nodes)
            self.node_seq[node] = self.next_seq(f"update node {node}")
            self.dirty.add(self.node_file(node))
            self.touched.add(node)

    def _some_configmap(self) -> str:
        if self.rng.random() < 0.5:
            return self.rng.choice(self.shared)
        return f"cm-{self.rng.choice(self.nodes)}"

    def _references(self, node: str) -> tuple[tuple[str, ...], bool]:
        count = self.rng.choice(SHARED_REF_COUNTS)
        shared = tuple(sorted(self.rng.sample(self.shared, count)))
        local = self.rng.random() < LOCAL_REF_PROBABILITY
        if local and f"cm-{node}" not in self.configmaps and self.rng.random() < 0.9:
            self._set_configmap(f"cm-{node}", "create")  # mostly created along with its user
        return shared, local

    def _create_pod(self, node: str) -> None:
        name = f"pod-{self.next_pod}"
        self.next_pod += 1
        shared, local = self._references(node)
        pod = Pod(node, shared, local, self.next_seq(f"create pod {name} on {node}"))
        self.pods[name] = pod
        self.pod_index[name] = len(self.pod_names)
        self.pod_names.append(name)
        self.pods_on[node].add(name)
        self._use(pod, +1)
        self.dirty.add(self.pods_file(node))
        self.touched.add(node)

    def _delete_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        self.next_seq(f"delete pod {name} on {pod.node}")
        index = self.pod_index.pop(name)
        last = self.pod_names.pop()
        if last != name:
            self.pod_names[index] = last
            self.pod_index[last] = index
        self.pods_on[pod.node].discard(name)
        self._use(pod, -1)
        self.dirty.add(self.pods_file(pod.node))
        self.touched.add(pod.node)

    def _update_pod(self, name: str) -> None:
        pod = self.pods[name]
        if self.rng.random() < 0.3:
            self._use(pod, -1)
            pod.shared, pod.local = self._references(pod.node)
            self._use(pod, +1)
        pod.seq = self.next_seq(f"update pod {name} on {pod.node} refs {list(pod.refs())}")
        self.dirty.add(self.pods_file(pod.node))
        self.touched.add(pod.node)

    def _use(self, pod: Pod, delta: int) -> None:
        for ref in pod.refs():
            users = self.users[ref]
            users[pod.node] += delta
            if users[pod.node] <= 0:
                del users[pod.node]

    def _set_configmap(self, name: str, what: str) -> None:
        if name not in self.configmaps:
            what = "create"
        self.configmaps[name] = self.next_seq(f"{what} configmap {name}")
        self.dirty.add(self.configmap_file(name))
        self.touched.update(self.users[name])

    def _delete_configmap(self, name: str) -> None:
        del self.configmaps[name]
        self.next_seq(f"delete configmap {name}")
        self.dirty.add(self.configmap_file(name))
        self.touched.update(self.users[name])

    # -- what nodes should hold --

    def desired(self, node: str) -> dict[str, int]:
        found = {f"null/node/{node}": self.node_seq[node]}
        for name in self.pods_on.get(node, ()):
            pod = self.pods[name]
            found[f"default/pod/{name}"] = pod.seq
            for ref in pod.refs():
                seq = self.configmaps.get(ref)
                if seq is not None:
                    found[f"default/configmap/{ref}"] = seq
        return found

    def _expect(self, written: float | None) -> None:
        """Compare the touched nodes' desired state with the last written one."""
        nodes = self.nodes if written is None else self.touched
        for node in nodes:
            new = self.desired(node)
            old = self.view.get(node, {})
            if written is not None:
                for resource_name, seq in new.items():
                    if old.get(resource_name) != seq:
                        self.expectations[(node, resource_name)].append((written, seq))
                for resource_name in old.keys() - new.keys():
                    self.expectations[(node, resource_name)].append((written, None))
            self.view[node] = new
        self.touched = set()

    # -- files --

    def node_file(self, node: str) -> str:
        return f"nodes-{int(node.rsplit('-', 1)[1]) // NODES_PER_FILE:03d}.yaml"

    @staticmethod
    def pods_file(node: str) -> str:
        return f"pods-{node}.yaml"

    @staticmethod
    def configmap_file(name: str) -> str:
        return f"configmap-{name}.yaml"

    def documents(self, file: str) -> list[dict[str, Any]]:
        if file.startswith("nodes-"):
            group = int(file[len("nodes-") : -len(".yaml")])
            names = self.nodes[group * NODES_PER_FILE : (group + 1) * NODES_PER_FILE]
            return [node_doc(name, self.node_seq[name]) for name in names]
        if file.startswith("pods-"):
            node = file[len("pods-") : -len(".yaml")]
            return [pod_doc(name, self.pods[name]) for name in sorted(self.pods_on.get(node, ()))]
        name = file[len("configmap-") : -len(".yaml")]
        seq = self.configmaps.get(name)
        return [] if seq is None else [configmap_doc(name, seq)]

    def write_batch(self, written: float | None) -> None:
        """Record the expectations, then write (or remove) every dirty file atomically."""
        self._expect(written)
        for file in sorted(self.dirty):
            path = self.manifests / file
            docs = self.documents(file)
            if not docs:
                if path.exists():
                    path.unlink()
                    self.files_removed += 1
                continue
            temporary = self.manifests / f".{file}.tmp"
            temporary.write_text(yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False))
            os.replace(temporary, path)
            self.files_written += 1
        self.dirty = set()
        self.changes_log.flush()

    def dump_desired(self, path: Path) -> None:
        path.write_text(json.dumps(self.view, separators=(",", ":")))


def _metadata(name: str, seq: int, namespace: str | None = "default") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["annotations"] = {SEQ_ANNOTATION: str(seq)}
    return metadata


def node_doc(name: str, seq: int) -> dict[str, Any]:
    metadata = _metadata(name, seq, None)
    metadata["labels"] = {"soak": "true"}
    return {"apiVersion": "v1", "kind": "Node", "metadata": metadata}


def configmap_doc(name: str, seq: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, seq),
        "data": {"seq": str(seq)},
    }


def pod_doc(name: str, pod: Pod) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": "busybox"}
    if pod.shared:
        container["envFrom"] = [{"configMapRef": {"name": ref}} for ref in pod.shared]
    spec: dict[str, Any] = {"nodeName": pod.node, "containers": [container]}
    if pod.local:
        spec["volumes"] = [{"name": "local", "configMap": {"name": f"cm-{pod.node}"}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _metadata(name, pod.seq), "spec": spec}


# --- the edge processes -----------------------------------------------------------------------


class WorkerProc:
    """One `bench.soak_worker` process and the JSON lines it printed."""

    def __init__(self, process: trio.Process, index: int) -> None:
        self.process = process
        self.index = index
        self.lines: list[dict[str, Any]] = []
        self.ended = False
        self._changed = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        try:
            async for chunk in self.process.stdout:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    try:
                        self.lines.append(json.loads(line))
                    except ValueError:
                        continue
                    self._changed.set()
                    self._changed = trio.Event()
        finally:
            self.ended = True
            self._changed.set()

    async def wait(self, event: str, id_: str | None = None) -> dict[str, Any]:
        while True:
            for found in reversed(self.lines):
                if found.get("event") == event and (id_ is None or found.get("id") == id_):
                    reply: dict[str, Any] = found
                    return reply
            if self.ended:
                raise RuntimeError(f"edge process {self.process.pid} ended before {event!r}")
            await self._changed.wait()

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")


class Fleet:
    def __init__(self, workers: list[WorkerProc]) -> None:
        self.workers = workers
        self.checks = 0

    async def send(self, command: str) -> None:
        for worker in self.workers:
            await worker.send(command)

    async def check(self, desired_file: Path) -> dict[str, Any]:
        self.checks += 1
        id_ = str(self.checks)
        await self.send(f"check {id_} {desired_file}")
        with trio.fail_after(120):
            replies = [await worker.wait("check", id_) for worker in self.workers]
        return {
            "lost": sum(r["lost"] for r in replies),
            "nodes_off": sum(r["nodes_off"] for r in replies),
            "connected": sum(r["connected"] for r in replies),
            "examples": [e for r in replies for e in r["examples"]][:5],
        }

    async def connected(self) -> int:
        self.checks += 1
        id_ = str(self.checks)
        await self.send(f"status {id_}")
        with trio.fail_after(60):
            return sum([(await worker.wait("status", id_))["connected"] for worker in self.workers])

    async def wait_connected(self, at_least: int, within: float) -> int:
        """Until `at_least` edges are connected (or `within` seconds); how many are."""
        count = 0
        with trio.move_on_after(within):
            while (count := await self.connected()) < at_least:  # noqa: ASYNC110 (polls a process)
                await trio.sleep(0.2)
        return count

    async def converge(self, desired_file: Path, within: float, what: str) -> float | None:
        """Seconds until every edge holds the desired state, or None after `within`."""
        began = time.monotonic()
        last_report = began
        while True:
            result = await self.check(desired_file)
            now = time.monotonic()
            if result["lost"] == 0:
                return now - began
            if now - began > within:
                log(f"{what}: not converged after {within:g} s: {result}")
                return None
            if now - last_report >= 10:
                log(
                    f"{what}: {result['lost']} pairs off on {result['nodes_off']} nodes, "
                    f"{result['connected']} edges connected, e.g. {result['examples'][:2]}"
                )
                last_report = now
            await trio.sleep(CHECK_INTERVAL)


async def start_fleet(
    nursery: trio.Nursery,
    hub: SoakHub,
    identity: dict[str, Path],
    args: argparse.Namespace,
    lifetime: float,
) -> Fleet:
    procs = max(1, min(args.procs, args.edges))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    workers: list[WorkerProc] = []
    first = 0
    for index in range(procs):
        count = args.edges // procs + (1 if index < args.edges % procs else 0)
        command = [sys.executable, "-m", "bench.soak_worker", "--host", HOST]
        command += ["--port", str(hub.websocket_port), "--start", str(first)]
        command += ["--count", str(count), "--ca", str(identity["ca"])]
        command += ["--cert", str(identity["cert"]), "--key", str(identity["key"])]
        command += ["--disconnect-rate", str(args.disconnect_rate * count / args.edges)]
        command += ["--seed", str(args.seed * 1000 + index), "--timeout", str(lifetime)]
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO
        )
        worker = WorkerProc(process, index)
        nursery.start_soon(worker.read)
        workers.append(worker)
        first += count
    with trio.fail_after(60):
        for worker in workers:
            await worker.wait("ready")
    return Fleet(workers)


# --- figures from the edges' events -----------------------------------------------------------


def replay(
    events: dict[str, list[Event]],
    desired: dict[str, dict[str, int]],
    expectations: dict[tuple[str, str], list[Expectation]],
) -> dict[str, Any]:
    """Final state, duplicates and delivery latencies from every edge's events."""
    verdicts: Counter[str] = Counter()
    lost = 0
    examples: list[str] = []
    timelines: dict[tuple[str, str], tuple[list[float], list[int | None]]] = {}
    for node in sorted(desired.keys() | events.keys()):
        model = EdgeModel()
        by_resource: dict[str, dict[str, int]] = defaultdict(dict)  # resource -> uid -> seq
        for event in events.get(node, []):
            verdicts[model.apply(event)] += 1
            at, resource_name, uid = event[0], event[2], event[3]
            holders = by_resource[resource_name]
            held = model.held.get(uid)
            if held is None:
                holders.pop(uid, None)
            else:
                holders[uid] = -1 if held.seq is None else held.seq
            times, states = timelines.setdefault((node, resource_name), ([], []))
            times.append(at)
            states.append(max(holders.values()) if holders else None)
        count, off = lost_pairs(desired.get(node, {}), model)
        lost += count
        examples += [f"{node}: {text}" for text in off[:3]]
    latencies: list[tuple[float, float]] = []  # (written, met)
    superseded = unmet = 0
    for pair, wanted in expectations.items():
        times, states = timelines.get(pair, ([], []))
        for index, (written, seq) in enumerate(wanted):
            later = wanted[index + 1 :]
            met = _met_at(times, states, written, seq)
            if met is None:
                if later:
                    superseded += 1
                else:
                    unmet += 1
                continue
            # Overtaken: a later change of the pair that was the opposite kind (presence vs
            # absence) came before this one was met.
            if any(at <= met and (s is None) != (seq is None) for at, s in later):
                superseded += 1
                continue
            latencies.append((written, max(met, written)))
    return {
        "lost": lost,
        "lost_examples": examples[:10],
        "messages": sum(verdicts.values()),
        "resent_duplicates": verdicts["dup"],
        "stale_versions": verdicts["stale"],
        "latencies": latencies,
        "superseded": superseded,
        "unmet": unmet,
    }


def _met_at(
    times: list[float], states: list[int | None], written: float, seq: int | None
) -> float | None:
    """When the edge first held version `seq` or newer (None: no longer held the object),
    from `written` on."""
    start = bisect.bisect_right(times, written) - 1  # the state at `written`
    if seq is None:
        if start < 0 or states[start] is None:
            return written
        for index in range(start + 1, len(times)):
            if states[index] is None:
                return times[index]
        return None
    # A version cannot arrive before it was written; from the state at `written` on.
    for index in range(max(start, 0), len(times)):
        held = states[index]
        if held is not None and held >= seq:
            return max(times[index], written)
    return None


# --- the run ------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} s"


def restart_plan(args: argparse.Namespace, rng: random.Random, phase: float) -> list[Any]:
    kinds = (["sigterm", "sigkill"] * args.restarts)[: args.restarts]
    rng.shuffle(kinds)
    plan = []
    for index, kind in enumerate(kinds):
        slot = phase / (args.restarts + 1)
        at = slot * (index + 1) + rng.uniform(-0.3, 0.3) * slot
        plan.append((at, kind, rng.uniform(*DOWN_TIME)))
    return plan


async def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="cloudhub-soak-", dir=args.dir))
    log(f"run directory {root}")
    source, source_info = hub_source(root, args.hub_src)
    hub = SoakHub(root, source, args.edges, free_ports(2))
    batches = math.ceil(args.changes / args.batch_size)
    phase_s = batches * args.batch_interval
    lifetime = 900 + phase_s * 3 + args.converge_timeout + args.edges
    changes_log = (root / "changes.log").open("w")
    world = World(rng, args.edges, hub.manifests, changes_log)
    world.initial()
    result: dict[str, Any] = {"scenario": "soak"}
    restarts: Counter[str] = Counter()
    restart_windows: list[tuple[float, float]] = []
    sigterm_codes: list[int | None] = []
    fleet: Fleet | None = None
    done: list[dict[str, Any]] = []
    events: dict[str, list[Event]] = {}
    initial_sync: float | None = None
    converge_s: float | None = None
    final_code: int | None = None
    converged_at = math.inf
    try:
        async with trio.open_nursery() as nursery:
            await hub.start()
            nursery.start_soon(hub.sample_forever)
            log(
                f"hub pid {hub.process.pid if hub.process else '?'}: websocket "
                f"{hub.websocket_port}, https {hub.https_port}"
            )
            identity = await bootstrap(HOST, hub.https_port, await hub.token(), "soak-edge")
            files = write_identity(root / "identity", identity)
            fleet = await start_fleet(nursery, hub, files, args, lifetime)
            await fleet.send("go")
            initial_file = root / "desired-initial.json"
            world.dump_desired(initial_file)
            initial_sync = await fleet.converge(initial_file, 60 + args.edges / 5, "initial sync")
            log(
                f"initial sync: {_seconds(initial_sync)}; change phase: {args.changes} changes "
                f"in {batches} batches, ~{phase_s:.0f} s"
            )

            await fleet.send("chaos on")
            phase_began = time.monotonic()

            async def write_changes() -> None:
                next_at = phase_began
                written = 0
                for batch in range(batches):
                    await trio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at + args.batch_interval, time.monotonic())
                    for _ in range(min(args.batch_size, args.changes - written)):
                        world.change()
                        written += 1
                    world.write_batch(time.time())
                    if batch % max(1, batches // 10) == 0:
                        log(
                            f"batch {batch}/{batches}: {written} changes, seq {world.seq}, "
                            f"{len(world.pods)} pods"
                        )

            async def restart_hub() -> None:
                for at, kind, down in restart_plan(args, rng, phase_s):
                    await trio.sleep(max(0.0, phase_began + at - time.monotonic()))
                    stopped = time.time()
                    code = await hub.stop(kind)
                    restarts[kind] += 1
                    if kind == "sigterm":
                        sigterm_codes.append(code)
                    log(f"hub {kind} (exit {code}), down {down:.2f} s")
                    await trio.sleep(down)
                    await hub.start()
                    # The next restart only once most edges are back (else a short run would
                    # restart a hub no edge has reached yet).
                    back = await fleet.wait_connected(int(RECONNECTED * args.edges), 120)
                    restart_windows.append((stopped, time.time()))
                    log(f"hub up again: {back} edges connected")
                    await trio.sleep(MIN_UP)

            async with trio.open_nursery() as phase:
                phase.start_soon(write_changes)
                phase.start_soon(restart_hub)
            phase_s = time.monotonic() - phase_began
            await fleet.send("chaos off")
            final_file = root / "desired-final.json"
            world.dump_desired(final_file)
            log(f"change phase done in {phase_s:.1f} s; waiting for convergence")
            converge_s = await fleet.converge(final_file, args.converge_timeout, "convergence")
            converged_at = time.time()
            log(f"convergence: {_seconds(converge_s)}; settling {args.settle:g} s")
            # The hub's periodic reconciliation (every 5 s by default) runs meanwhile: nothing
            # may change any more, which the final replay of the events checks.
            await trio.sleep(args.settle)

            for worker in fleet.workers:
                await worker.send(f"stop {root / f'events-{worker.index}.json'}")
            with trio.fail_after(120):
                done = [await worker.wait("done") for worker in fleet.workers]
            for worker in fleet.workers:
                await worker.process.wait()
                events.update(json.loads((root / f"events-{worker.index}.json").read_text()))
            hub.sample()
            final_code = await hub.stop("sigterm")
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if fleet is not None:
                for worker in fleet.workers:
                    if worker.process.returncode is None:
                        worker.process.kill()
                        await worker.process.wait()
            if hub.process is not None:
                await hub.stop("sigkill")
            changes_log.close()

    figures = replay(events, world.view, world.expectations)
    latencies = [met - written for written, met in figures["latencies"]]
    spread = percentiles(latencies, 3)
    # Samples whose wait overlaps no restart window (from the stop signal until 90% of the
    # edges were back): the hub as it runs, with edge drops but no restart in the way.
    steady = [
        met - written
        for written, met in figures["latencies"]
        if not any(written <= back and met >= stop for stop, back in restart_windows)
    ]
    warnings, errors, first_problems = hub.log_problems()
    keep = args.keep or figures["lost"] > 0 or converge_s is None
    result.update(
        {
            "edges": args.edges,
            "changes": args.changes,
            "change_kinds": dict(sorted(world.counts.items())),
            "batches": batches,
            "batch_size": args.batch_size,
            "batch_interval_s": args.batch_interval,
            "restarts": {"sigterm": restarts["sigterm"], "sigkill": restarts["sigkill"]},
            "sigterm_exit_codes": sigterm_codes,
            "final_sigterm_exit_code": final_code,
            "disconnects": sum(d.get("disconnects", 0) for d in done),
            "lost": figures["lost"],
            **({"lost_examples": figures["lost_examples"]} if figures["lost"] else {}),
            "converged": converge_s is not None,
            "converge_s": None if converge_s is None else round(converge_s, 2),
            "resent_duplicates": figures["resent_duplicates"],
            "stale_versions": figures["stale_versions"],
            "messages_received": figures["messages"],
            "messages_after_convergence": sum(
                1
                for node_events in events.values()
                for event in node_events
                if event[0] > converged_at
            ),
            "max_delivery_latency_s": spread.get("max"),
            "delivery_latency_p50_s": spread.get("p50"),
            "delivery_latency_p99_s": spread.get("p99"),
            "latency_samples": len(latencies),
            "delivery_latency_without_restarts_s": {
                **percentiles(steady, 3),
                "samples": len(steady),
            },
            "latency_superseded": figures["superseded"],
            "latency_unmet": figures["unmet"],
            "initial_sync_s": None if initial_sync is None else round(initial_sync, 2),
            "change_phase_s": round(phase_s, 1),
            "hub_peak_rss_mb": round(hub.peak_hwm_kb / 1024, 1),
            "hub_starts": hub.starts,
            "hub_log_warnings": warnings,
            "hub_log_errors": errors,
            **({"hub_log_first_problems": first_problems} if warnings or errors else {}),
            "edge_connects": sum(d.get("connects", 0) for d in done),
            "edge_connect_failures": sum(d.get("connect_failures", 0) for d in done),
            "edges_closed_by_hub": sum(d.get("closed_by_hub", 0) for d in done),
            "edge_session_errors": dict(
                sum(
                    (
                        Counter({k: v for k, v in d.items() if k.startswith("session_error:")})
                        for d in done
                    ),
                    Counter(),
                )
            ),
            "fleet_cpu_s": round(sum(d.get("cpu_s", 0) for d in done), 1),
            "files_written": world.files_written,
            "files_removed": world.files_removed,
            "seed": args.seed,
            "disconnect_rate_per_s": args.disconnect_rate,
            "manifests_poll_interval_s": POLL_INTERVAL,
            "hub_source": source_info,
            "run_dir": str(root) if keep else None,
            "wall_s": round(time.monotonic() - began, 1),
            "machine": machine(),
        }
    )
    print(json.dumps(result), flush=True)
    if keep:
        log(f"run directory kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if figures["lost"] == 0 and converge_s is not None else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--edges", type=int, default=500)
    parser.add_argument("--changes", type=int, default=20000)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument(
        "--disconnect-rate",
        type=float,
        default=None,
        help="abrupt edge disconnects per second over the fleet (default 1 + edges/250)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--procs", type=int, default=2, help="edge worker processes")
    parser.add_argument("--batch-size", type=int, default=10, help="changes per batch")
    parser.add_argument("--batch-interval", type=float, default=0.15, help="seconds")
    parser.add_argument("--converge-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument(
        "--settle", type=float, default=6.0, help="seconds to stay connected after convergence"
    )
    parser.add_argument("--hub-src", choices=("snapshot", "live"), default="snapshot")
    parser.add_argument("--dir", default=None, help="where to create the run directory")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)
    if args.edges < 1 or args.changes < 1 or args.restarts < 0 or args.procs < 1:
        parser.error("--edges, --changes, --procs must be >= 1, --restarts >= 0")
    if args.batch_size < 1 or args.batch_interval <= 0:
        parser.error("--batch-size must be >= 1, --batch-interval > 0")
    if args.disconnect_rate is None:
        args.disconnect_rate = 1 + args.edges / 250
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return trio.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
