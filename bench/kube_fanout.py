"""Kubernetes fan-out (issue 4, item 7): P pods with config maps across N edge nodes, created
through the fake API server; the time until every edge acknowledged everything, and the hub's
memory.

    python -m bench.kube_fanout [--nodes 500] [--pods 5000] [--procs 2] [--qps 5000]
                                [--burst 5000] [--timeout 600] [--dir DIR] [--keep]
    python -m bench.kube_fanout --nodes 5 --pods 50     # small: ~10 s
                                                        # (tests/e2e/test_kube_fanout_small.py)

Prints ONE JSON line on stdout (progress on stderr); exit status 1 when some edge or some
ObjectSync did not get everything within `--timeout` seconds.

What happens:
- The bench process runs the fake API server (`trio_cloudhub.testing.fake_kube`, plain HTTP on
  loopback, the whole event history kept so that no watch ever has to relist) in its own trio
  loop, and puts N Node objects `edge-<i>` labelled `node-role.kubernetes.io/edge` in it.
- The real `python -m trio_cloudhub serve` (`HubProcess` of `trio_cloudhub.testing.hub_process`:
  fixed ports, INFO log in `<run dir>/hub.log`) runs with `kubeAPIConfig` pointing at a
  kubeconfig for the fake; `--qps`/`--burst` are its client rate limit.
- One edge identity is bootstrapped over HTTPS with the join token the hub wrote into the secret
  `kubeedge/tokensecret`; `--procs` `bench.soak_worker` processes (the soak's edges, with no
  disconnects: EdgeCore's headers, keepalives, auto-ACK) connect the N edges over mutual TLS.
  The bench waits until every edge holds its Node (`connect_s`) and the hub wrote every node's
  ClusterObjectSync at the Node's resourceVersion (`nodes_recorded_s`).
- Then t0 (wall clock), and P ConfigMaps `cm-<i>` and P pods `pod-<i>` on `edge-<i mod N>`
  (each mounts its own ConfigMap as a volume) are created with `FakeKube.put`, straight into
  the fake's store (no HTTP for the writer; a ConfigMap, then its pod; a checkpoint every 100
  objects so that the fake keeps serving meanwhile). `create_s`: how long that took.
- The bench polls the edges (every 0.5 s) and the ObjectSyncs in the fake (every 0.25 s, and
  the fake's request counters every 10 ms) until both are complete or `--timeout`, then stops
  the edges and reads their event logs. Each edge gets P/N pods and their P/N ConfigMaps, one
  message each, 2P in all.

Figures:
- `all_acked_s`: from t0 to the last first arrival, over all (edge, object meant for it), of the
  object's version, from the edges' own logs (the simulator ACKs each message as soon as it
  recorded it; `unacked` counts those whose ACK was not sent by the end, must be 0);
  `messages_per_s` = the phase's messages / `all_acked_s`; `resent` counts messages received
  more than once;
- `objectsyncs_written_s`: from t0 to the last ObjectSync write request (create/patch, counted
  by the fake) before a sweep found every (node, object) ObjectSync with
  `status.objectResourceVersion` equal to the object's resourceVersion, i.e. acknowledged and
  recorded in the cluster (the hub writes nothing more after that, so this is when it was done);
- `hub_peak_rss_mb` (VmHWM, whole lifetime), `hub_rss_mb_before`/`_at_end` (VmRSS at t0 and at
  the end), `hub_cpu_s` (utime+stime from t0 until both were complete, `phase_wall_s`) and
  `hub_cpu_cores` = that / `phase_wall_s` (about 1 is all one Python process can use);
  `fake_api_cpu_s` (the bench process: the fake API server plus the bench's polling) and
  `edges_cpu_s` (the worker processes) over the same window, to tell who was busy;
- `api_requests_phase` / `api_requests_total`: requests the hub made, by "verb resource", during
  the phase / the whole run; `hub_log_warnings`/`_errors`; `machine`.

Profiling (bench only): `BENCH_PYSPY=DIR` records the hub with `py-spy record --format raw`
during the phase into `DIR/kube_fanout.txt` (as `bench.run`).

The run directory (`cloudhub-kube-fanout-*` in the temp dir, `--dir` elsewhere) holds the
config, kubeconfig, data dir, `hub.log` and the edges' events; it is kept with `--keep` or when
something was missing, else removed.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
import yaml

from bench.run import Cpu, log, machine, pyspy, rss_kb, write_identity
from bench.soak import Fleet, start_fleet, vm_hwm_kb
from bench.soak_worker import SEQ_ANNOTATION, Event
from trio_cloudhub.pki.kube_secrets import NAMESPACE, TOKEN_SECRET, parse_token_secret
from trio_cloudhub.store.kube.store import EDGE_LABEL
from trio_cloudhub.testing.edge_sim import bootstrap
from trio_cloudhub.testing.fake_kube import FakeKube, open_fake_kube
from trio_cloudhub.testing.hub_process import HOST, HubProcess, hub_config

NAMESPACE_OF_OBJECTS = "default"
PUT_CHUNK = 100  # objects put between checkpoints, so the fake serves meanwhile
EDGE_POLL = 0.5  # seconds between checks of the edges
SYNC_POLL = 0.25  # seconds between sweeps of the ObjectSyncs
WRITE_POLL = 0.01  # seconds between looks at the fake's ObjectSync write counters
SWEEP_CHUNK = 500  # ObjectSyncs looked at between checkpoints
SYNC_RESOURCES = ("objectsyncs", "clusterobjectsyncs")
WRITE_VERBS = ("create", "update", "patch", "delete")
MB = 1024


# --- the objects ----------------------------------------------------------------------------


def _metadata(name: str, seq: int, namespace: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "annotations": {SEQ_ANNOTATION: str(seq)}}
    if namespace:
        metadata["namespace"] = namespace
    return metadata


def node_doc(name: str, seq: int) -> dict[str, Any]:
    metadata = _metadata(name, seq, None)
    metadata["labels"] = {EDGE_LABEL: ""}
    return {"apiVersion": "v1", "kind": "Node", "metadata": metadata}


def config_map_doc(name: str, seq: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, seq, NAMESPACE_OF_OBJECTS),
        "data": {"seq": str(seq), "note": "trio-cloudhub kube fan-out benchmark"},
    }


def pod_doc(name: str, node: str, config_map: str, seq: int) -> dict[str, Any]:
    spec = {
        "nodeName": node,
        "containers": [{"name": "app", "image": "busybox"}],
        "volumes": [{"name": "config", "configMap": {"name": config_map}}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(name, seq, NAMESPACE_OF_OBJECTS),
        "spec": spec,
    }


@attrs.frozen
class SyncKey:
    """Where the ack point of (node, object) lives in the API."""

    kind: str  # ObjectSync | ClusterObjectSync
    namespace: str
    name: str  # <node>.<object uid>


def sync_key(node: str, stored: Mapping[str, Any]) -> SyncKey:
    metadata = stored["metadata"]
    namespace = str(metadata.get("namespace") or "")
    kind = "ObjectSync" if namespace else "ClusterObjectSync"
    return SyncKey(kind, namespace, f"{node}.{metadata['uid']}")


def edge_resource(stored: Mapping[str, Any]) -> str:
    """The object's resource as the edge sees it: `<ns>/<type>/<name>`."""
    metadata = stored["metadata"]
    namespace = metadata.get("namespace") or "null"
    return f"{namespace}/{str(stored['kind']).lower()}/{metadata['name']}"


class Cluster:
    """What the bench put in the fake and what each node and each ObjectSync should end with."""

    def __init__(self, kube: FakeKube, nodes: int) -> None:
        self.kube = kube
        self.nodes = [f"edge-{i}" for i in range(nodes)]
        self.seq = 0
        self.desired: dict[str, dict[str, int]] = {node: {} for node in self.nodes}
        self.acks: dict[SyncKey, str] = {}  # ObjectSync -> the resourceVersion it must reach

    def _put(self, node: str, doc: dict[str, Any]) -> None:
        stored = self.kube.put(doc)
        seq = int(stored["metadata"]["annotations"][SEQ_ANNOTATION])
        self.desired[node][edge_resource(stored)] = seq
        self.acks[sync_key(node, stored)] = str(stored["metadata"]["resourceVersion"])

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def create_nodes(self) -> None:
        for node in self.nodes:
            self._put(node, node_doc(node, self.next_seq()))

    async def create_pods(self, count: int) -> None:
        for index in range(count):
            node = self.nodes[index % len(self.nodes)]
            config_map = f"cm-{index}"
            self._put(node, config_map_doc(config_map, self.next_seq()))
            self._put(node, pod_doc(f"pod-{index}", node, config_map, self.next_seq()))
            if (index + 1) % (PUT_CHUNK // 2) == 0:
                await trio.lowlevel.checkpoint()

    def write_desired(self, path: Path, resources: set[str] | None = None) -> None:
        """The edges' desired state for `soak_worker`'s check ({node: {resource: seq}})."""
        view = {
            node: {r: s for r, s in wanted.items() if resources is None or r in resources}
            for node, wanted in self.desired.items()
        }
        path.write_text(json.dumps(view, separators=(",", ":")))


# --- ObjectSyncs in the fake ------------------------------------------------------------------


class SyncTracker:
    """Which expected ObjectSyncs the hub has not written at their version yet, and when the
    hub last wrote any ObjectSync (from the fake's request counters)."""

    def __init__(self, kube: FakeKube, expected: Mapping[SyncKey, str]) -> None:
        self.kube = kube
        self.remaining = dict(expected)
        self.writes = self.count_writes()
        self.last_write_at = time.time()

    def count_writes(self) -> int:
        return sum(
            count
            for (verb, name), count in self.kube.requests.items()
            if verb in WRITE_VERBS and name.split("/")[0] in SYNC_RESOURCES
        )

    async def watch_writes(self) -> None:
        while True:
            writes = self.count_writes()
            if writes != self.writes:
                self.writes, self.last_write_at = writes, time.time()
            await trio.sleep(WRITE_POLL)

    def _recorded(self, key: SyncKey, rv: str) -> bool:
        sync = self.kube.get(key.kind, key.namespace or None, key.name)
        status = (sync or {}).get("status") or {}
        return status.get("objectResourceVersion") == rv

    async def sweep(self) -> int:
        """Drop the ObjectSyncs now at their version; how many remain."""
        for index, (key, rv) in enumerate(list(self.remaining.items()), start=1):
            if self._recorded(key, rv):
                del self.remaining[key]
            if index % SWEEP_CHUNK == 0:
                await trio.lowlevel.checkpoint()
        return len(self.remaining)

    async def wait_all(self, within: float) -> float | None:
        """Wall time of the last ObjectSync write once all are recorded; None after `within`."""
        with trio.move_on_after(within):
            while await self.sweep():  # noqa: ASYNC110 (polls the fake's objects)
                await trio.sleep(SYNC_POLL)
            return self.last_write_at
        return None


# --- the edges ------------------------------------------------------------------------------


async def edges_complete(fleet: Fleet, desired_file: Path, within: float, what: str) -> bool:
    """Until every edge holds exactly its desired state (the soak worker's check)."""
    last_report = time.monotonic()
    with trio.move_on_after(within):
        while True:
            result = await fleet.check(desired_file)
            if result["lost"] == 0:
                return True
            if time.monotonic() - last_report >= 10:
                log(f"{what}: {result['lost']} pairs missing on {result['nodes_off']} nodes")
                last_report = time.monotonic()
            await trio.sleep(EDGE_POLL)
    log(f"{what}: not complete after {within:g} s")
    return False


async def stop_edges(fleet: Fleet, root: Path) -> dict[str, list[Event]]:
    for worker in fleet.workers:
        await worker.send(f"stop {root / f'events-{worker.index}.json'}")
    events: dict[str, list[Event]] = {}
    with trio.fail_after(120):
        for worker in fleet.workers:
            await worker.wait("done")
            await worker.process.wait()
            events.update(json.loads((root / f"events-{worker.index}.json").read_text()))
    return events


async def kill_edges(fleet: Fleet | None) -> None:
    """After a failure: no worker process outlives the bench."""
    for worker in fleet.workers if fleet is not None else []:
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()


def arrival_figures(
    events: Mapping[str, list[Event]], desired: Mapping[str, Mapping[str, int]], since: float
) -> dict[str, Any]:
    """From the edges' logs: when the last object of the phase first arrived, what is missing."""
    last = since
    missing = unacked = messages = resent = 0
    for node, wanted in desired.items():
        first: dict[str, tuple[float, int]] = {}  # resource -> (arrival, acked)
        for at, _, resource_name, _, _, seq, acked in events.get(node, []):
            if at < since:
                continue
            messages += 1
            if wanted.get(resource_name) != seq:
                continue
            if resource_name in first:
                resent += 1
            else:
                first[resource_name] = (at, acked)
        for resource_name in wanted:
            if resource_name.startswith("null/node/"):
                continue  # delivered before t0
            if resource_name not in first:
                missing += 1
                continue
            at, acked = first[resource_name]
            last = max(last, at)
            unacked += 0 if acked else 1
    return {
        "messages": messages,
        "missing": missing,
        "unacked": unacked,
        "resent": resent,
        "last": last,
    }


# --- the hub --------------------------------------------------------------------------------


def write_hub_config(hub: HubProcess, kubeconfig: Path, args: argparse.Namespace) -> None:
    """`HubProcess`'s config with `kubeAPIConfig` for the fake (it has no key for that)."""
    config = hub_config(
        hub.websocket_port,
        hub.https_port,
        hub.root / "no-pki",
        cloud_hub={"nodeLimit": max(1000, args.nodes + 10)},
        trio_cloud_hub={"logLevel": "INFO"},
    )
    config["kubeAPIConfig"] = {
        "kubeConfig": str(kubeconfig),
        "qps": args.qps,
        "burst": args.burst,
    }
    hub.config.write_text(yaml.safe_dump(config, sort_keys=False))


@attrs.frozen
class _Pid:
    pid: int  # what `bench.run.pyspy` needs of a hub


def log_problems(path: Path) -> dict[str, Any]:
    warnings = errors = 0
    first: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if " WARNING " in line:
            warnings += 1
        elif " ERROR " in line or "Traceback" in line or " CRITICAL " in line:
            errors += 1
        else:
            continue
        if len(first) < 5:
            first.append(line[:300])
    found: dict[str, Any] = {"hub_log_warnings": warnings, "hub_log_errors": errors}
    if first:
        found["hub_log_first_problems"] = first
    return found


def by_verb(requests: Mapping[tuple[str, str], int]) -> dict[str, int]:
    return {f"{verb} {name}": n for (verb, name), n in sorted(requests.items()) if n}


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the run --------------------------------------------------------------------------------


@attrs.define
class Phase:
    """The measured phase: from t0 until edges and ObjectSyncs were complete."""

    t0: float = 0.0
    create_s: float = 0.0
    edges_done: bool = False
    syncs_done_at: float | None = None
    hub_cpu: Cpu = attrs.Factory(lambda: Cpu(0.0, 0.0))
    fake_cpu_s: float = 0.0
    edges_cpu_s: float = 0.0
    wall_s: float = 0.0
    requests: Counter[tuple[str, str]] = attrs.Factory(Counter)
    rss_before_kb: int = 0


async def run_phase(
    kube: FakeKube,
    cluster: Cluster,
    fleet: Fleet,
    hub_pid: int,
    root: Path,
    args: argparse.Namespace,
) -> Phase:
    phase = Phase(rss_before_kb=rss_kb(hub_pid))
    requests_before = Counter(kube.requests)
    hub_before, fake_before = Cpu.of(hub_pid), own_cpu_s()
    edges_before = sum(Cpu.of(w.process.pid).total for w in fleet.workers)
    async with pyspy(_Pid(hub_pid), "kube_fanout"), trio.open_nursery() as nursery:
        tracker = SyncTracker(kube, {})
        nursery.start_soon(tracker.watch_writes)
        phase.t0 = tracker.last_write_at = time.time()
        tracker.remaining = await create_objects(cluster, args.pods)
        phase.create_s = time.time() - phase.t0
        log(f"created {args.pods} config maps and {args.pods} pods in {phase.create_s:.2f} s")
        desired_file = root / "desired-all.json"
        cluster.write_desired(desired_file)
        await wait_complete(phase, fleet, desired_file, tracker, args.timeout - phase.create_s)
        phase.wall_s = time.time() - phase.t0
        phase.hub_cpu = Cpu.of(hub_pid) - hub_before
        nursery.cancel_scope.cancel()
    phase.fake_cpu_s = own_cpu_s() - fake_before
    phase.edges_cpu_s = sum(Cpu.of(w.process.pid).total for w in fleet.workers) - edges_before
    phase.requests = Counter(kube.requests)
    phase.requests.subtract(requests_before)
    return phase


async def create_objects(cluster: Cluster, pods: int) -> dict[SyncKey, str]:
    """The phase's objects; returns the ObjectSyncs they must end with."""
    before = set(cluster.acks)
    await cluster.create_pods(pods)
    return {key: rv for key, rv in cluster.acks.items() if key not in before}


async def wait_complete(
    phase: Phase, fleet: Fleet, desired_file: Path, tracker: SyncTracker, within: float
) -> None:
    """Until the edges hold everything and every ObjectSync is at its version (or `within`)."""

    async def edges() -> None:
        phase.edges_done = await edges_complete(fleet, desired_file, within, "phase")

    async def syncs() -> None:
        phase.syncs_done_at = await tracker.wait_all(within)
        log(f"ObjectSyncs: {len(tracker.remaining)} not at their version")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(edges)
        nursery.start_soon(syncs)


async def connect_edges(
    kube: FakeKube, cluster: Cluster, fleet: Fleet, root: Path, args: argparse.Namespace
) -> tuple[float, float]:
    """Every edge holds its Node, every node's ClusterObjectSync is at the Node's version."""
    began = time.monotonic()
    await fleet.send("go")
    nodes_file = root / "desired-nodes.json"
    cluster.write_desired(nodes_file)
    if not await edges_complete(fleet, nodes_file, 120 + args.nodes / 5, "connect"):
        raise RuntimeError("the edges did not all get their Node")
    connect_s = time.monotonic() - began
    if await SyncTracker(kube, cluster.acks).wait_all(60 + args.nodes / 10) is None:
        raise RuntimeError("the hub did not record every Node's ack point")
    return connect_s, time.monotonic() - began


def figures(
    args: argparse.Namespace,
    phase: Phase,
    arrivals: Mapping[str, Any],
    totals: Mapping[tuple[str, str], int],
    connect: tuple[float, float],
) -> dict[str, Any]:
    all_acked = arrivals["last"] - phase.t0
    complete = phase.edges_done and arrivals["missing"] == 0 and arrivals["unacked"] == 0
    synced = phase.syncs_done_at is not None
    return {
        "scenario": "kube_fanout",
        "nodes": args.nodes,
        "pods": args.pods,
        "config_maps": args.pods,
        "complete": complete and synced,
        "connect_s": round(connect[0], 2),
        "nodes_recorded_s": round(connect[1], 2),
        "create_s": round(phase.create_s, 3),
        "all_acked_s": round(all_acked, 3) if complete else None,
        "objectsyncs_written_s": round(phase.syncs_done_at - phase.t0, 3)
        if phase.syncs_done_at is not None
        else None,
        "messages": arrivals["messages"],
        "messages_per_s": round(arrivals["messages"] / all_acked, 1) if complete else None,
        "missing": arrivals["missing"],
        "unacked": arrivals["unacked"],
        "resent": arrivals["resent"],
        "hub_cpu_s": round(phase.hub_cpu.total, 2),
        "hub_cpu_user_s": round(phase.hub_cpu.user, 2),
        "hub_cpu_sys_s": round(phase.hub_cpu.system, 2),
        "phase_wall_s": round(phase.wall_s, 2),
        "hub_cpu_cores": round(phase.hub_cpu.total / phase.wall_s, 2),
        "fake_api_cpu_s": round(phase.fake_cpu_s, 2),
        "edges_cpu_s": round(phase.edges_cpu_s, 2),
        "hub_rss_mb_before": round(phase.rss_before_kb / MB, 1),
        "api_requests_phase": by_verb(phase.requests),
        "api_requests_total": by_verb(totals),
        "qps": args.qps,
        "burst": args.burst,
        "edge_procs": args.procs,
        "writer": "FakeKube.put (direct, no HTTP)",
    }


async def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="cloudhub-kube-fanout-", dir=args.dir))
    log(f"run directory {root}")
    hub = HubProcess(root)
    fleet: Fleet | None = None
    result: dict[str, Any] = {}
    async with open_fake_kube(history=None) as kube, trio.open_nursery() as nursery:
        try:
            cluster = Cluster(kube, args.nodes)
            cluster.create_nodes()
            write_hub_config(hub, kube.write_kubeconfig(root / "kubeconfig"), args)
            await hub.start(within=120)
            assert hub.process is not None
            pid = hub.process.pid
            log(f"hub pid {pid}: websocket {hub.websocket_port}, https {hub.https_port}")
            token = parse_token_secret(kube.get("Secret", NAMESPACE, TOKEN_SECRET) or {})
            identity = await bootstrap(HOST, hub.https_port, token, "bench-edge")
            files = write_identity(root / "identity", identity)
            edge_args = argparse.Namespace(
                procs=args.procs, edges=args.nodes, disconnect_rate=0.0, seed=0
            )
            # HubProcess has what start_fleet uses of a SoakHub: websocket_port.
            fleet = await start_fleet(nursery, hub, files, edge_args, args.timeout + 900)  # type: ignore[arg-type]
            connect = await connect_edges(kube, cluster, fleet, root, args)
            log(f"{args.nodes} edges hold their Node after {connect[0]:.1f} s")
            phase = await run_phase(kube, cluster, fleet, pid, root, args)
            hwm_kb, rss_end_kb = vm_hwm_kb(pid), rss_kb(pid)
            events = await stop_edges(fleet, root)
            arrivals = arrival_figures(events, cluster.desired, phase.t0)
            result = figures(args, phase, arrivals, kube.requests, connect)
            result["hub_peak_rss_mb"] = round(hwm_kb / MB, 1)
            result["hub_rss_mb_at_end"] = round(rss_end_kb / MB, 1)
            result["hub_sigterm_exit_code"] = await hub.terminate()
        finally:
            with trio.CancelScope(shield=True):
                await kill_edges(fleet)
                await hub.aclose()
            nursery.cancel_scope.cancel()
    ok = bool(result.get("complete"))
    keep = args.keep or not ok
    result.update(log_problems(hub.log_path))
    result.update(
        run_dir=str(root) if keep else None,
        wall_s=round(time.monotonic() - began, 1),
        machine=machine(),
    )
    print(json.dumps(result), flush=True)
    if keep:
        log(f"run directory kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kube_fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=500, help="edge nodes (N)")
    parser.add_argument("--pods", type=int, default=5000, help="pods and config maps (P)")
    parser.add_argument("--procs", type=int, default=2, help="edge worker processes")
    parser.add_argument("--qps", type=int, default=5000, help="the hub's API rate limit")
    parser.add_argument("--burst", type=int, default=5000, help="the hub's API burst")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on the phase, s")
    parser.add_argument("--dir", default=None, help="where to create the run directory")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.pods < 0 or args.procs < 1:
        parser.error("--nodes and --procs must be >= 1, --pods >= 0")
    if args.qps <= 0 or args.burst < 1 or args.timeout <= 0:
        parser.error("--qps and --timeout must be > 0, --burst >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return trio.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
