"""Faults around delivery, in-process on trio's MockClock (issue 3).

Each test ends by checking what every edge holds against the desired state: nothing accepted
is lost, nothing acknowledged comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
import trio.testing
from trio.testing import MockClock

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message, new_message, object_uid
from trio_cloudhub.edge.memory import MemoryEdgeEnd
from trio_cloudhub.hub.hub import HubSettings
from trio_cloudhub.store.base import Missed
from trio_cloudhub.testing.hub import (
    EdgeState,
    TestHub,
    ack_for,
    object_message,
    open_test_hub,
    run_auto_ack_edge,
)
from trio_cloudhub.testing.memory_store import MemoryStore

SETTINGS = HubSettings(reconcile_interval=5.0)


async def receive(edge: MemoryEdgeEnd, within: float = 60.0) -> Message:
    with trio.fail_after(within):
        return codec.decode(await edge.receive())


async def nothing_within(edge: MemoryEdgeEnd, seconds: float) -> None:
    with trio.move_on_after(seconds) as scope:
        frame = await edge.receive()
        raise AssertionError(f"unexpected frame {frame!r}")
    assert scope.cancelled_caught


def desired_versions(store: MemoryStore, node: str) -> dict[str, int]:
    return {
        uid: int(message.header.resource_version)
        for uid, message in store.desired.get(node, {}).items()
    }


async def settle(seconds: float = 30.0) -> None:
    """Let deliveries, retries and a few reconciliations run (virtual time)."""
    await trio.sleep(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def start_edge(
    th: TestHub, node: str, state: EdgeState, ack: Callable[[Message], bool] | None = None
) -> MemoryEdgeEnd:
    edge = await th.connect(node, keepalive=False)
    if ack is None:
        th.nursery.start_soon(run_auto_ack_edge, edge, state)
    else:
        th.nursery.start_soon(lambda: run_auto_ack_edge(edge, state, ack=ack))
    return edge


# --- reconciliation ---------------------------------------------------------------------------


async def test_reconciliation_delivers_a_change_whose_notification_was_lost(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        state = EdgeState()
        await start_edge(th, "n1", state)
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        await settle(1)
        assert state.objects == {"uid-pod-default-web": 1}
        th.store.set_desired(object_message("n1", "Pod", "web", rv=2, operation="update"))
        th.store.set_desired(object_message("n1", "ConfigMap", "cfg", rv=3))
        await settle(6)  # one reconciliation period
        assert state.objects == desired_versions(th.store, "n1")
        assert th.hub.stats["reconciled"] == 2
        assert state.duplicates == 0


async def test_reconciliation_sends_a_delete_whose_notification_was_lost(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        state = EdgeState()
        await start_edge(th, "n1", state)
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        await th.publish(object_message("n1", "Pod", "db", rv=2))
        await settle(1)
        th.store.set_desired(object_message("n1", "Pod", "web", rv=3, operation="delete"))
        await settle(6)
        assert state.objects == {"uid-pod-default-db": 2} == desired_versions(th.store, "n1")
        assert ("n1", "uid-pod-default-web") not in th.store.ack_points


async def test_reconciliation_resends_nothing_acknowledged_nor_what_waits(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        first = await receive(edge)
        await edge.send(codec.encode(ack_for(first)))
        await th.publish(object_message("n1", "Pod", "db", rv=2))
        waiting = await receive(edge)
        # Not ACKed: only retransmissions of the same msg_id may come, never a second copy.
        ids = set()
        with trio.move_on_after(20):
            while True:
                ids.add((await receive(edge)).msg_id)
        assert ids == {waiting.msg_id}
        assert th.hub.stats["reconciled"] == 0


async def test_a_node_connecting_gets_what_it_missed_without_a_queue(
    autojump_clock: MockClock,
) -> None:
    """The desired state changed while the hub held no queue for the node (a restart)."""
    async with open_test_hub(settings=HubSettings(reconcile_interval=0)) as th:
        th.store.set_desired(object_message("n1", "Pod", "web", rv=4))
        th.store.ack_points[("n1", "uid-pod-default-old")] = "1"
        th.store._last_acked[("n1", "uid-pod-default-old")] = object_message(
            "n1", "Pod", "old", rv=1
        )
        state = EdgeState()
        state.objects["uid-pod-default-old"] = 1
        await start_edge(th, "n1", state)
        await settle(5)
        assert state.objects == {"uid-pod-default-web": 4}


# --- ACK faults -------------------------------------------------------------------------------


async def test_edge_dropping_mid_ack_gets_the_message_again(autojump_clock: MockClock) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        got = await receive(edge)
        await edge.aclose()  # gone before its ACK
        state = EdgeState()
        await start_edge(th, "n1", state)
        await settle()
        assert state.objects == {"uid-pod-default-web": 1}
        assert [m.header.resource_version for m in state.received] == ["1"]
        assert state.received[0].msg_id == got.msg_id  # the same message, handed back
        assert th.store.ack_points[("n1", "uid-pod-default-web")] == "1"


async def test_ack_sent_just_before_the_edge_drops_is_recorded(autojump_clock: MockClock) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        got = await receive(edge)
        await edge.send(codec.encode(ack_for(got)))
        await edge.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert th.store.ack_points[("n1", "uid-pod-default-web")] == "1"
        state = EdgeState()
        await start_edge(th, "n1", state)
        await settle()
        assert state.received == []  # acknowledged: never sent again


async def test_duplicate_late_and_unknown_acks_change_nothing(autojump_clock: MockClock) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        v1 = await receive(edge)
        # v1 goes unanswered through all its transmissions; v2 arrives meanwhile.
        await th.publish(object_message("n1", "Pod", "web", rv=2, operation="update"))
        with trio.move_on_after(26):
            while True:
                assert (await receive(edge)).msg_id == v1.msg_id
        v2 = await receive(edge)  # after the back-off the newest version goes instead
        assert v2.header.resource_version == "2"
        await edge.send(codec.encode(ack_for(v1)))  # late: ignored
        unknown = new_message(
            source="edgecontroller",
            group="resource",
            operation="response",
            resource="default/pod/web",
            content="OK",
            now_ms=0,
            parent_msg_id="no-such-message",
        )
        await edge.send(codec.encode(unknown))  # unknown: ignored
        await trio.testing.wait_all_tasks_blocked()
        assert th.store.ack_points[("n1", "uid-pod-default-web")] == "0"  # sent, not acked
        await edge.send(codec.encode(ack_for(v2)))
        await edge.send(codec.encode(ack_for(v2)))  # duplicate: ignored
        await trio.testing.wait_all_tasks_blocked()
        assert th.store.ack_points[("n1", "uid-pod-default-web")] == "2"
        assert th.store.reports == [] and th.store.queries == []  # never forwarded
        await th.publish(object_message("n1", "Pod", "db", rv=3))
        assert (await receive(edge, within=1)).header.resource_version == "3"
        assert "n1" in th.hub.sessions


async def test_out_of_order_resource_versions_keep_the_newest(autojump_clock: MockClock) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        state = EdgeState()
        await th.publish(object_message("n1", "Pod", "web", rv=5))
        await th.publish(object_message("n1", "Pod", "web", rv=3, operation="update"))
        await start_edge(th, "n1", state)
        await settle(2)
        await th.publish(object_message("n1", "Pod", "web", rv=4, operation="update"))
        await th.publish(object_message("n1", "Pod", "web", rv=6, operation="update"))
        await th.publish(object_message("n1", "Pod", "web", rv=2, operation="update"))
        await settle()
        assert [m.header.resource_version for m in state.received] == ["5", "6"]
        assert state.objects == {"uid-pod-default-web": 6}
        assert th.store.ack_points[("n1", "uid-pod-default-web")] == "6"


# --- fairness, flapping, memory -------------------------------------------------------------


async def test_node_flapping_100_times_while_others_receive(autojump_clock: MockClock) -> None:
    others = [f"n{i}" for i in range(10)]
    async with open_test_hub(settings=SETTINGS) as th:
        states = {node: EdgeState() for node in others}
        for node in others:
            await start_edge(th, node, states[node])

        async def flap() -> None:
            for _ in range(100):
                edge = await th.connect("flapper")
                await trio.sleep(0.05)
                await edge.aclose()

        async def publish_changes() -> None:
            for version in range(1, 51):
                for node in others:
                    await th.publish(object_message(node, "Pod", f"p{version % 7}", rv=version))
                await th.publish(object_message("flapper", "Pod", f"f{version}", rv=version))
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flap)
            nursery.start_soon(publish_changes)
        flapper = EdgeState()
        await start_edge(th, "flapper", flapper)
        await settle(60)
        for node in others:
            assert states[node].objects == desired_versions(th.store, node), node
        assert flapper.objects == desired_versions(th.store, "flapper")
        assert len(flapper.objects) == 50


async def test_a_burst_to_one_node_does_not_hold_up_another(autojump_clock: MockClock) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        busy, quiet = EdgeState(), EdgeState()
        await start_edge(th, "busy", busy)
        await start_edge(th, "quiet", quiet)
        for i in range(3000):
            th.store.publish(object_message("busy", "ConfigMap", f"c{i}", rv=i + 1))
        th.store.publish(object_message("quiet", "Pod", "web", rv=9999))
        with trio.fail_after(1):
            # Polling on purpose: each pass is one trip through the scheduler.
            while not quiet.acked:
                await trio.lowlevel.checkpoint()
        # The quiet node's one object went through while the busy one had barely started.
        print("busy node progress when the quiet one was served:", len(busy.received))
        assert len(busy.received) < 50
        await settle(600)
        assert len(busy.objects) == 3000


async def test_memory_for_an_absent_node_follows_objects_not_changes(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        for version in range(1, 201):
            for i in range(50):
                th.store.publish(object_message("away", "ConfigMap", f"c{i}", rv=version * 100 + i))
        await trio.testing.wait_all_tasks_blocked()
        assert len(th.hub.nodes["away"].queue) == 50  # 10,000 changes, 50 objects
        state = EdgeState()
        await start_edge(th, "away", state)
        await settle(60)
        assert state.objects == desired_versions(th.store, "away")
        assert len(state.received) == 50


# --- node limit, removal, drain ---------------------------------------------------------------


async def test_node_limit_refusal_says_why_and_leaves_sessions_alone(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_test_hub(settings=HubSettings(node_limit=2)) as th:
        states = {node: EdgeState() for node in ("n1", "n2")}
        for node, state in states.items():
            await start_edge(th, node, state)
        with caplog.at_level(logging.WARNING, logger="trio_cloudhub.hub"):
            refused = await th.connect("n3")
        assert refused.hub_close_reason == "node limit: 2 nodes connected"
        assert [r.getMessage() for r in caplog.records] == [
            "refused node n3 from memory:n3: node limit: 2 nodes connected"
        ]
        assert th.hub.stats["refused:node limit"] == 1
        reconnect = EdgeState()
        await start_edge(th, "n1", reconnect)  # a reconnect does not count twice
        assert set(th.hub.sessions) == {"n1", "n2"}
        await th.publish(object_message("n2", "Pod", "web", rv=1))
        await settle(1)
        assert states["n2"].objects == {"uid-pod-default-web": 1}


async def test_node_removal_is_logged_once_and_forgets_the_node(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        state = EdgeState()
        edge = await start_edge(th, "n1", state)
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        await settle(1)
        stop = new_message(
            source="edgecontroller",
            group="resource",
            operation="delete",
            resource="node/n1/namespace/node/n1",
            content=None,
            now_ms=0,
        )
        with caplog.at_level(logging.INFO, logger="trio_cloudhub.hub"):
            await th.publish(stop)
            await th.publish(stop)
            await settle(1)
        removed = [r for r in caplog.records if "removed from the desired state" in r.getMessage()]
        assert len(removed) == 1
        assert edge.hub_close_reason == "node removed"
        assert "n1" not in th.hub.nodes and "n1" not in th.hub.sessions


async def test_drain_finishes_the_in_flight_ack_and_starts_nothing_new(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=HubSettings(drain_timeout=10)) as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        await th.publish(object_message("n1", "Pod", "db", rv=2))
        first = await receive(edge)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(th.hub.drain)
            await trio.sleep(2)
            await edge.send(codec.encode(ack_for(first)))
        assert th.store.ack_points == {("n1", object_uid(first.content)): "1"}
        assert edge.hub_close_reason == "hub shutting down"
        assert th.hub.nodes["n1"].queue.pending_count == 1  # db: kept for the next run
        refused = await th.connect("n2")
        assert refused.hub_close_reason == "hub shutting down"


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.compared = 0

    def missed(self, node_id: str) -> list[Missed]:
        self.compared += 1
        return super().missed(node_id)


async def test_a_complete_node_is_not_compared_again_until_something_changes(
    autojump_clock: MockClock,
) -> None:
    store = CountingStore()
    async with open_test_hub(store, settings=SETTINGS) as th:
        state = EdgeState()
        await start_edge(th, "n1", state)
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        await settle(11)  # two periods: the first finds n1 complete, the second skips it
        compared = store.compared
        await settle(20)
        assert store.compared == compared
        th.store.set_desired(object_message("n1", "Pod", "web", rv=2, operation="update"))
        await settle(6)
        assert store.compared > compared
        assert state.objects == {"uid-pod-default-web": 2}
