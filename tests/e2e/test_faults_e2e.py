"""Fault injection on the real hub (issue 3, "Delivery that loses nothing").

The real `python -m trio_cloudhub serve` runs as a subprocess on two fixed free ports
(`trio_cloudhub.testing.hub_process`), so it can be SIGKILLed, SIGTERMed and restarted with
the same data directory while simulated EdgeCores (`edge_sim`, real mutual TLS on loopback)
reconnect on their own. Every test ends by comparing what each edge holds (its messages
applied in order, as EdgeCore's meta manager would) with the desired state: the objects the
test's manifests place on that node, with the content of the newest manifest, at the
resourceVersion the store's database holds for them. What an edge holds is its database under
its EdgeCore line's storage rules (`edge_storage.MetaStore`; the edges alternate v1.10 and
v1.23), not the last message it received. "Accepted" changes are manifest changes
the store had read before the fault; none may be lost.
"""

from __future__ import annotations

import math
import signal
import sqlite3
import ssl
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.core.codec import encode
from trio_cloudhub.core.message import (
    GROUP_RESOURCE,
    OP_DELETE,
    OP_INSERT,
    OP_UPDATE,
    Message,
    object_uid,
)
from trio_cloudhub.edge.base import EdgeDisconnected
from trio_cloudhub.edge.websocket import connect_websocket
from trio_cloudhub.testing.edge_sim import (
    SimEdge,
    bootstrap,
    edge_headers,
    keepalive_message,
    needs_ack,
    start_sim_edge,
)
from trio_cloudhub.testing.edge_storage import V1_10, V1_23, MetaStore
from trio_cloudhub.testing.hub_process import HOST, HubProcess, hub_process
from trio_cloudhub.testing.netfaults import stored_versions, write_manifests

GEN = "faults/gen"  # annotation: which version of the test's manifests an object comes from
RETRY_FIRST = 0.05  # an edge's reconnect back-off: doubling up to RETRY_CAP
RETRY_CAP = 0.5
CONNECT_TIMEOUT = 5.0
CONVERGE = 20.0
Want = dict[str, dict[str, int]]  # node -> edge resource (<ns>/<type>/<name>) -> generation
# libyaml's dumper when there is one: the pure-Python one takes seconds over a 3 MiB scalar.
DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# --- manifests ------------------------------------------------------------------------------


def pod(
    name: str, node: str, gen: int, *, env_from: Sequence[str] = (), volume: str = ""
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": "busybox:1.36"}
    if env_from:
        container["envFrom"] = [{"configMapRef": {"name": cm}} for cm in env_from]
    spec: dict[str, Any] = {"nodeName": node, "containers": [container]}
    if volume:
        spec["volumes"] = [{"name": "shared", "configMap": {"name": volume}}]
    metadata = {"name": name, "namespace": "default", "annotations": {GEN: str(gen)}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def config_map(name: str, gen: int, data: Mapping[str, str] | None = None) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "default", "annotations": {GEN: str(gen)}}
    body = dict(data) if data is not None else {"gen": str(gen)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": body}


def pod_resource(name: str) -> str:
    return f"default/pod/{name}"


def cm_resource(name: str) -> str:
    return f"default/configmap/{name}"


# --- the store's view -----------------------------------------------------------------------


def stored_ack_points(hub: HubProcess) -> int:
    """Acknowledged versions in the database (not the "0" markers written before a send)."""
    path = hub.data_dir / "store.db"
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
        query = "SELECT count(*) FROM ack_points WHERE resource_version != '0'"
        return int(db.execute(query).fetchone()[0])


async def until(check: Callable[[], object], within: float, interval: float = 0.02) -> None:
    """Poll `check` (state outside trio's reach, or cheap to recompute) until it is truthy."""
    with trio.fail_after(within):
        while True:
            if check():
                return
            await trio.sleep(interval)


# --- edges ----------------------------------------------------------------------------------


def is_object_message(message: Message) -> bool:
    route = message.route
    return (
        route.group == GROUP_RESOURCE
        and route.operation in (OP_INSERT, OP_UPDATE, OP_DELETE)
        and bool(object_uid(message.content))
    )


def seen_key(message: Message) -> tuple[str, str, str]:
    return (message.resource, message.operation, message.header.resource_version)


class Edge:
    """A simulated EdgeCore that connects again whenever its connection ends (back-off from
    RETRY_FIRST doubling to RETRY_CAP while the hub is down). `sessions` holds one SimEdge per
    connection, in order; `messages()` is what arrived over all of them."""

    def __init__(
        self, hub: HubProcess, context: ssl.SSLContext, node: str, line: str = V1_23
    ) -> None:
        self.hub = hub
        self.context = context
        self.node = node
        self.storage = MetaStore(line)  # the edge's database: kept across its connections
        self.sessions: list[SimEdge] = []
        self.auto_ack = True  # for the next connection
        self.connect_failures = 0
        self.last_error = ""
        self._paused = False
        self._resumed = trio.Event()

    @property
    def connected(self) -> bool:
        return bool(self.sessions) and self.sessions[-1].connected

    async def run(self) -> None:
        delay = RETRY_FIRST
        while True:
            if self._paused:
                await self._resumed.wait()
                continue
            try:
                async with trio.open_nursery() as nursery:
                    sim = await start_sim_edge(
                        nursery,
                        HOST,
                        self.hub.websocket_port,
                        self.context,
                        self.node,
                        auto_ack=self.auto_ack,
                        connect_timeout=CONNECT_TIMEOUT,
                        storage=self.storage,
                    )
                    self.sessions.append(sim)
                    if self._paused:
                        await sim.close_abruptly()
                    await sim.wait_disconnected(math.inf)
            except Exception as exc:  # the hub is down or going down: retry
                self.connect_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                await trio.sleep(delay)
                delay = min(2 * delay, RETRY_CAP)
            else:
                delay = RETRY_FIRST
                await trio.sleep(RETRY_FIRST)

    async def disconnect(self) -> None:
        """Close the connection abruptly (as EdgeCore's gorilla Close) and stay away."""
        self._paused = True
        self._resumed = trio.Event()
        if self.sessions and self.sessions[-1].connected:
            await self.sessions[-1].close_abruptly()

    def resume(self) -> None:
        self._paused = False
        self._resumed.set()

    async def reconnect(self, *, auto_ack: bool) -> None:
        """End the connection and wait until the next one is up, ACKing or not."""
        self.auto_ack = auto_ack
        count = len(self.sessions)
        if self.sessions and self.sessions[-1].connected:
            await self.sessions[-1].close_abruptly()
        await self.wait_connected(count)

    async def wait_connected(self, after: int = 0, within: float = 15.0) -> None:
        """Until a session with index >= `after` is connected."""
        await until(lambda: len(self.sessions) > after and self.sessions[-1].connected, within)

    def messages(self, first_session: int = 0) -> list[Message]:
        """Object messages received (over the sessions from `first_session` on), in order."""
        return [
            item.message
            for session in self.sessions[first_session:]
            for item in session.received
            if is_object_message(item.message)
        ]

    def acked(self) -> set[tuple[str, str, str]]:
        """What this edge ACKed: every ACK-mode message of its auto-ACK sessions (each ACK
        was sent right after the message arrived, while the connection was up)."""
        return {
            seen_key(item.message)
            for session in self.sessions
            if session.auto_ack
            for item in session.received
            if is_object_message(item.message) and needs_ack(item.message, set())
        }

    def holds(self) -> dict[str, Any]:
        """What EdgeCore's database holds (its line's storage rules): resource -> content."""
        return dict(self.storage.objects())

    def duplicates(self) -> int:
        """Messages received again with the same operation and resourceVersion."""
        counts = Counter(seen_key(message) for message in self.messages())
        return sum(count - 1 for count in counts.values())


def mismatches(edge: Edge, want: Mapping[str, int], versions: Mapping[str, int]) -> list[str]:
    held = edge.holds()
    problems: list[str] = []
    for resource, gen in sorted(want.items()):
        content = held.get(resource)
        if content is None:
            problems.append(f"missing {resource}")
            continue
        metadata = content.get("metadata", {})
        rv = int(metadata.get("resourceVersion") or 0)
        held_gen = metadata.get("annotations", {}).get(GEN)
        if held_gen != str(gen):
            problems.append(f"{resource} has gen {held_gen}, want {gen}")
        elif rv != versions.get(resource):
            problems.append(f"{resource} at rv {rv}, store has {versions.get(resource)}")
    problems += [f"extra {resource}" for resource in sorted(held.keys() - want.keys())]
    return problems


async def converge(
    hub: HubProcess, edges: Sequence[Edge], want: Want, within: float = CONVERGE
) -> None:
    """Until every edge holds exactly `want[node]` at the stored versions."""
    problems: dict[str, list[str]] = {}
    with trio.move_on_after(within):
        while True:
            versions = stored_versions(hub)
            problems = {}
            for edge in edges:
                found = mismatches(edge, want.get(edge.node, {}), versions)
                if found:
                    problems[edge.node] = found
            if not problems:
                return
            await trio.sleep(0.1)
    details = "; ".join(
        f"{node} ({len(found)}): {', '.join(found[:5])}" for node, found in problems.items()
    )
    raise AssertionError(f"edges did not converge within {within} s: {details}")


def no_errors_logged(hub: HubProcess) -> None:
    bad = [
        line
        for line in hub.log_text().splitlines()
        if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
    ]
    assert not bad, "\n".join(bad[:10])


async def node_context(hub: HubProcess, node: str, token: str = "") -> ssl.SSLContext:
    """EdgeCore's bootstrap for `node` (its own certificate, CN system:node:<node>)."""
    identity = await bootstrap(HOST, hub.https_port, token or await hub.token(), node)
    return identity.client_ssl_context()


async def start_edges(
    nursery: trio.Nursery, hub: HubProcess, nodes: Sequence[str], *, auto_ack: bool = True
) -> list[Edge]:
    token = await hub.token()
    # Both EdgeCore lines' storage rules, alternately.
    lines = [V1_10 if index % 2 == 0 else V1_23 for index in range(len(nodes))]
    edges = [
        Edge(hub, await node_context(hub, node, token), node, line)
        for node, line in zip(nodes, lines, strict=True)
    ]
    for edge in edges:
        edge.auto_ack = auto_ack
        nursery.start_soon(edge.run)
    for edge in edges:
        await edge.wait_connected()
    return edges


# --- 1. SIGKILL during a fan-out ------------------------------------------------------------

FANOUT_NODES = [f"edge-{i}" for i in range(5)]
FANOUT_PODS = 200
LOCAL_CMS = 4  # config maps per node; pods spread over them


def fan_out(gen: int) -> tuple[list[dict[str, Any]], Want]:
    """Generation 1: 200 pods over 5 nodes, each using one of its node's 4 config maps and a
    shared one. Generation 2 updates everything, deletes 4 pods per node and moves the pods
    off config map 3 (which stays in the file, so it is withdrawn from the nodes)."""
    docs: list[dict[str, Any]] = [config_map("cm-shared", gen)]
    docs += [config_map(f"cm-{n}-{k}", gen) for n in FANOUT_NODES for k in range(LOCAL_CMS)]
    want: Want = {node: {} for node in FANOUT_NODES}
    for i in range(FANOUT_PODS):
        node = FANOUT_NODES[i % len(FANOUT_NODES)]
        index = i // len(FANOUT_NODES)  # the pod's index on its node
        local = index % LOCAL_CMS
        if gen > 1 and index % 10 == 9:
            continue
        if gen > 1 and local == LOCAL_CMS - 1:
            local = 0
        name = f"pod-{i:03d}"
        docs.append(pod(name, node, gen, env_from=[f"cm-{node}-{local}"], volume="cm-shared"))
        want[node][pod_resource(name)] = gen
        want[node][cm_resource(f"cm-{node}-{local}")] = gen
        want[node][cm_resource("cm-shared")] = gen
    return docs, want


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
async def test_stop_during_fan_out_then_restart_loses_nothing(tmp_path: Path, stop: str) -> None:
    """SIGKILL (a crash) or SIGTERM (drain) while about 225 changes are being delivered."""
    with trio.fail_after(90):
        async with hub_process(tmp_path) as hub, trio.open_nursery() as nursery:
            edges = await start_edges(nursery, hub, FANOUT_NODES)
            docs, want = fan_out(1)
            write_manifests(hub.manifests, "fleet.yaml", docs)
            await converge(hub, edges, want)

            # Generation 2 fans out about 45 changes per node, one ACK at a time per node.
            marks = {edge.node: len(edge.messages()) for edge in edges}
            docs, want = fan_out(2)
            total = sum(len(objects) for objects in want.values())  # a lower bound
            write_manifests(hub.manifests, "fleet.yaml", docs)

            def arrived() -> int:
                return sum(len(edge.messages()) - marks[edge.node] for edge in edges)

            await until(lambda: arrived() >= 40, 15, interval=0.002)
            if stop == "sigkill":
                hub.kill()
                at_stop = arrived()
                assert await hub.wait() == -signal.SIGKILL
            else:
                hub.send_signal(signal.SIGTERM)
                at_stop = arrived()
                with trio.fail_after(20):
                    assert await hub.wait() == 0, hub.log_text()[-3000:]
            print(f"{stop} after {at_stop} of at least {total} generation-2 deliveries")
            assert at_stop < total, "the fan-out was over before the hub was stopped"
            assert arrived() < total, "the drain delivered the whole fan-out"

            await trio.sleep(0.5)  # down: the edges retry meanwhile
            await hub.start()
            await converge(hub, edges, want)
            duplicates = {edge.node: edge.duplicates() for edge in edges}
            if stop == "sigkill":  # the ACKs of the last flush window may be lost: allowed
                print(f"duplicates after SIGKILL: {duplicates}")
            else:  # a drain records every ACK it waited for: nothing acknowledged comes back
                assert sum(duplicates.values()) == 0, duplicates
            no_errors_logged(hub)
            nursery.cancel_scope.cancel()


# --- 2. SIGTERM: graceful drain, then restart -----------------------------------------------

DRAIN_NODES = ["edge-a", "edge-b", "edge-c", "edge-d"]


def drain_state(changed: Iterable[str]) -> tuple[list[dict[str, Any]], Want]:
    """Two pods per node using the node's config map and a shared one; for each node in
    `changed`, generation 2 of its config map and a third pod."""
    changed = set(changed)
    docs: list[dict[str, Any]] = [config_map("cm-shared", 1)]
    want: Want = {node: {cm_resource("cm-shared"): 1} for node in DRAIN_NODES}
    for node in DRAIN_NODES:
        gen = 2 if node in changed else 1
        docs.append(config_map(f"cm-{node}", gen))
        want[node][cm_resource(f"cm-{node}")] = gen
        for index in range(3 if node in changed and node != "edge-a" else 2):
            name = f"pod-{node}-{index}"
            docs.append(pod(name, node, 1, env_from=[f"cm-{node}"], volume="cm-shared"))
            want[node][pod_resource(name)] = 1
    return docs, want


async def test_sigterm_drains_then_restart_resends_nothing_acked_and_forgets_nothing(
    tmp_path: Path,
) -> None:
    settings = {"drainTimeoutSeconds": 1.0, "reconcileIntervalSeconds": 1.0}
    with trio.fail_after(90):
        async with (
            hub_process(tmp_path, trio_cloud_hub=settings) as hub,
            trio.open_nursery() as nursery,
        ):
            edges = await start_edges(nursery, hub, DRAIN_NODES)
            a, _, c, d = edges
            docs, want = drain_state(())
            write_manifests(hub.manifests, "app.yaml", docs)
            await converge(hub, edges, want)

            # d is away during the change; c is connected but does not ACK.
            await d.disconnect()
            await c.reconnect(auto_ack=False)
            c_session = len(c.sessions) - 1
            a_mark = len(a.messages())
            docs, want = drain_state(["edge-a", "edge-c", "edge-d"])
            write_manifests(hub.manifests, "app.yaml", docs)
            await until(
                lambda: len(a.messages()) > a_mark and c.messages(c_session), 15, interval=0.002
            )
            # SIGTERM at once: a's ACK is on its way, c's message is in flight, unacknowledged.
            assert await hub.terminate(within=20) == 0, hub.log_text()[-3000:]
            assert [m.resource for m in a.messages()[a_mark:]] == [cm_resource("cm-edge-a")]
            unacked = c.messages(c_session)
            acked = {edge.node: edge.acked() for edge in edges}
            restart = {edge.node: len(edge.sessions) for edge in edges}

            c.auto_ack = True
            d.resume()
            await hub.start()
            await converge(hub, edges, want)
            for edge in edges:
                await edge.wait_connected(restart[edge.node])
            await trio.sleep(2.5)  # two reconciliation passes (reconcileInterval 1 s)
            await converge(hub, edges, want, within=1.0)

            after = {edge.node: edge.messages(restart[edge.node]) for edge in edges}
            for edge in edges:
                resent = [m for m in after[edge.node] if seen_key(m) in acked[edge.node]]
                assert resent == [], f"{edge.node} re-sent after ACK: {resent}"
            assert after["edge-a"] == [] and after["edge-b"] == [], after
            # c's unacknowledged message (and the rest of its change) came after the restart.
            for message in unacked:
                again = [m for m in after["edge-c"] if m.resource == message.resource]
                assert again, f"unacknowledged {message.resource} forgotten"
                assert int(again[-1].header.resource_version) >= int(
                    message.header.resource_version
                )
            assert {m.resource for m in after["edge-d"]} == {
                cm_resource("cm-edge-d"),
                pod_resource("pod-edge-d-2"),
            }
            no_errors_logged(hub)
            nursery.cancel_scope.cancel()


# --- 3. deletes while the hub is down -------------------------------------------------------


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_deletes_while_the_hub_is_down_reach_the_edges(tmp_path: Path, stop: str) -> None:
    nodes = ["edge-0", "edge-1"]
    with trio.fail_after(60):
        async with hub_process(tmp_path) as hub, trio.open_nursery() as nursery:
            edges = await start_edges(nursery, hub, nodes)
            write_manifests(
                hub.manifests,
                "app.yaml",
                [
                    config_map("gone-cm", 1),
                    pod("p0", "edge-0", 1, env_from=["gone-cm"]),
                    pod("p1", "edge-1", 1, env_from=["gone-cm"]),
                ],
            )
            write_manifests(
                hub.manifests,
                "keep.yaml",
                [config_map("keep-cm", 1), pod("k0", "edge-0", 1, env_from=["keep-cm"])],
            )
            want: Want = {
                "edge-0": {
                    pod_resource("p0"): 1,
                    cm_resource("gone-cm"): 1,
                    pod_resource("k0"): 1,
                    cm_resource("keep-cm"): 1,
                },
                "edge-1": {pod_resource("p1"): 1, cm_resource("gone-cm"): 1},
            }
            await converge(hub, edges, want)
            if stop == "sigkill":
                # A crash loses the ACKs of the last flush window: let them be written first.
                await until(lambda: stored_ack_points(hub) >= 6, 10)
                hub.kill()
                assert await hub.wait() == -signal.SIGKILL
            else:
                assert await hub.terminate() == 0
            held = {edge.node: edge.holds() for edge in edges}
            acked = {edge.node: edge.acked() for edge in edges}
            restart = {edge.node: len(edge.sessions) for edge in edges}

            (hub.manifests / "app.yaml").unlink()
            await hub.start()
            want = {"edge-0": {pod_resource("k0"): 1, cm_resource("keep-cm"): 1}, "edge-1": {}}
            await converge(hub, edges, want)

            for edge in edges:
                after = edge.messages(restart[edge.node])
                assert all(m.operation == OP_DELETE for m in after), after
                gone = {pod_resource("p0" if edge.node == "edge-0" else "p1")}
                gone.add(cm_resource("gone-cm"))
                assert {m.resource for m in after} == gone
                for message in after:  # the deletes name the objects the edge holds
                    assert object_uid(message.content) == object_uid(
                        held[edge.node][message.resource]
                    )
                    assert seen_key(message) not in acked[edge.node]
            no_errors_logged(hub)
            nursery.cancel_scope.cancel()


async def test_delete_while_down_reaches_an_edge_whose_ack_was_lost(tmp_path: Path) -> None:
    """EdgeCore stores an object before it ACKs: when the ACK never reaches the hub (the
    connection broke, the edge crashed) the edge holds an object the hub has no ack point
    for. Deleted while the hub is down, it must still be deleted on that edge (the restarted
    store sends deletes to every node the object was placed on, ack point or not)."""
    settings = {"drainTimeoutSeconds": 1.0, "reconcileIntervalSeconds": 1.0}
    with trio.fail_after(60):
        async with (
            hub_process(tmp_path, trio_cloud_hub=settings) as hub,
            trio.open_nursery() as nursery,
        ):
            write_manifests(
                hub.manifests,
                "app.yaml",
                [config_map("gone-cm", 1), pod("p0", "edge-0", 1, env_from=["gone-cm"])],
            )
            # It receives (and, as EdgeCore, stores) but its ACKs get lost.
            (edge,) = await start_edges(nursery, hub, ["edge-0"], auto_ack=False)
            await until(lambda: edge.messages(), 15)
            held = set(edge.holds())
            assert held, "the edge holds nothing"
            assert await hub.terminate() == 0

            (hub.manifests / "app.yaml").unlink()
            edge.auto_ack = True
            await hub.start()
            await converge(hub, [edge], {"edge-0": {}}, within=10)
            nursery.cancel_scope.cancel()


async def test_delete_queued_for_an_away_edge_whose_ack_was_lost_survives_a_restart(
    tmp_path: Path,
) -> None:
    """As above, but the object goes while the hub runs and the edge is away: the delete
    waits in the node's queue, then the hub is restarted gracefully before the edge is back.
    The delete must not be forgotten: KubeEdge creates the ObjectSync (resourceVersion "0")
    before the first send (spec 5.1 step 4), so its SyncController still deletes the object
    after a restart; here nothing on disk remembers that the edge may hold it."""
    settings = {"drainTimeoutSeconds": 1.0, "reconcileIntervalSeconds": 1.0}
    with trio.fail_after(60):
        async with (
            hub_process(tmp_path, trio_cloud_hub=settings) as hub,
            trio.open_nursery() as nursery,
        ):
            write_manifests(
                hub.manifests,
                "app.yaml",
                [config_map("gone-cm", 1), pod("p0", "edge-0", 1, env_from=["gone-cm"])],
            )
            # It receives (and, as EdgeCore, stores) but its ACKs get lost.
            (edge,) = await start_edges(nursery, hub, ["edge-0"], auto_ack=False)
            await until(lambda: edge.messages(), 15)
            held = set(edge.holds())
            assert held, "the edge holds nothing"
            await edge.disconnect()

            (hub.manifests / "app.yaml").unlink()
            # Once the store committed the removal, its deletes wait in the node's queue.
            await until(lambda: not stored_versions(hub), 10)
            assert await hub.terminate() == 0
            edge.auto_ack = True
            edge.resume()
            await hub.start()
            await converge(hub, [edge], {"edge-0": {}}, within=6)
            nursery.cancel_scope.cancel()


# --- 4. a slow-reading edge over real TLS ---------------------------------------------------

WRITE_TIMEOUT = 4
ACK_TIMEOUT = 1.0
BIG = 3 * 1024 * 1024  # a config map close to the 4 MiB manifest bound


async def test_slow_reading_edge_is_cut_off_and_others_keep_receiving(tmp_path: Path) -> None:
    async with hub_process(
        tmp_path,
        cloud_hub={"writeTimeout": WRITE_TIMEOUT, "keepaliveInterval": 600},
        trio_cloud_hub={"ackTimeoutSeconds": ACK_TIMEOUT},
    ) as hub:
        with trio.fail_after(90):
            await _slow_reader_scenario(hub)


async def _slow_reader_scenario(hub: HubProcess) -> None:
    slow_docs = [
        config_map("big", 1, {"blob": "x" * BIG}),
        pod("slow-pod", "slow-edge", 1, env_from=["big"]),
    ]
    write_manifests(hub.manifests, "slow.yaml", slow_docs)
    write_manifests(hub.manifests, "ok.yaml", ok_docs(1))
    want: Want = {
        "slow-edge": {cm_resource("big"): 1, pod_resource("slow-pod"): 1},
        "edge-ok": {cm_resource("ok-cm"): 1, pod_resource("ok-pod"): 1},
    }
    async with trio.open_nursery() as nursery:
        (ok,) = await start_edges(nursery, hub, ["edge-ok"])
        await converge(hub, [ok], {"edge-ok": want["edge-ok"]})

        # The slow edge: a real EdgeCore handshake and one keepalive, then it never reads.
        slow_context = await node_context(hub, "slow-edge")
        began = trio.current_time()
        with trio.fail_after(CONNECT_TIMEOUT):
            raw = await connect_websocket(
                HOST,
                hub.websocket_port,
                ssl_context=slow_context,
                path=f"/{DEFAULT_PROJECT_ID}/slow-edge/events",
                headers=edge_headers("slow-edge", DEFAULT_PROJECT_ID),
                node_id="slow-edge",
            )
        try:
            await raw.send(encode(keepalive_message()))
            # The 3 MiB config map does not fit in the TCP buffers of an edge that never
            # reads: its receive window closes and the hub's write makes no progress.
            await trio.sleep(ACK_TIMEOUT + 0.5)
            write_manifests(hub.manifests, "ok.yaml", ok_docs(2))
            want["edge-ok"][cm_resource("ok-cm")] = 2
            await converge(hub, [ok], {"edge-ok": want["edge-ok"]}, within=10)
            assert "node slow-edge disconnected" not in hub.log_text(), (
                "the normal edge's change only arrived once the slow edge was cut off"
            )

            line = await hub.wait_for_log(
                "node slow-edge disconnected", within=ACK_TIMEOUT + WRITE_TIMEOUT + 10
            )
            # Linux: the kernel's progress deadline (TCP_USER_TIMEOUT); elsewhere the
            # session's bound on one write.
            if sys.platform == "linux":
                assert f"no write progress for {WRITE_TIMEOUT} s" in line, line
            else:
                assert f"write did not finish within {WRITE_TIMEOUT} s" in line, line
            print(f"slow edge cut off {trio.current_time() - began:.1f} s after connecting")
            with trio.fail_after(15), pytest.raises(EdgeDisconnected):
                while True:  # what the buffers held, then the end of the connection
                    await raw.receive()
        finally:
            await raw.abort()

        # Connecting again as a normal edge, it gets everything.
        slow = Edge(hub, slow_context, "slow-edge")
        nursery.start_soon(slow.run)
        await converge(hub, [ok, slow], want)
        assert ok.connected and len(ok.sessions) == 1, "the normal edge was disturbed"
        no_errors_logged(hub)
        nursery.cancel_scope.cancel()


def ok_docs(gen: int) -> list[dict[str, Any]]:
    return [config_map("ok-cm", gen), pod("ok-pod", "edge-ok", 1, env_from=["ok-cm"])]
