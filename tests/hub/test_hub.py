"""In-process hub: sessions, ACKs, retransmission, keepalive, on trio's MockClock."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.edge.memory import MemoryEdgeEnd
from trio_cloudhub.hub.hub import HubSettings
from trio_cloudhub.hub.timers import RESOLUTION
from trio_cloudhub.testing.hub import (
    ack_for,
    keepalive_message,
    object_message,
    open_test_hub,
)
from trio_cloudhub.testing.memory_store import MemoryStore


async def receive(edge: MemoryEdgeEnd, within: float = 60.0) -> Message:
    with trio.fail_after(within):
        return codec.decode(await edge.receive())


async def assert_closed(edge: MemoryEdgeEnd) -> None:
    with trio.fail_after(1):
        with pytest.raises(Exception):  # noqa: B017 - any "closed" error of the memory end
            while True:
                await edge.receive()


async def nothing_within(edge: MemoryEdgeEnd, seconds: float) -> None:
    with trio.move_on_after(seconds) as scope:
        frame = await edge.receive()
        raise AssertionError(f"unexpected frame {frame!r}")
    assert scope.cancelled_caught


async def test_pod_is_delivered_trimmed_and_ack_records_the_ack_point(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=7))
        got = await receive(edge)
        assert got.resource == "default/pod/web"
        assert got.operation == "insert"
        assert got.header.resource_version == "7"
        await edge.send(codec.encode(ack_for(got)))
        await trio.testing.wait_all_tasks_blocked()
        assert th.store.ack_points[("n1", "uid-pod-default-web")] == "7"


async def test_unacked_message_is_resent_five_times_with_same_id_then_backed_off(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=7))
        sends = []
        for _ in range(5):
            message = await receive(edge)
            sends.append((trio.current_time(), message))
            await edge.send(codec.encode(keepalive_message()))
        ids = {message.msg_id for _, message in sends}
        assert len(ids) == 1
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(sends)]
        # The hub's timers wake on a grid (hub.timers.RESOLUTION): deadlines run up to that late.
        assert gaps == pytest.approx([5.0] * 4, abs=RESOLUTION + 0.01)
        # After the fifth send and another 5 s the hub gives up, backs off, and retries.
        start = trio.current_time()
        await edge.send(codec.encode(keepalive_message()))
        retried = await receive(edge, within=29)
        assert retried.resource == "default/pod/web"
        assert trio.current_time() - start > 5.0


async def test_ack_stops_retransmission(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=7))
        got = await receive(edge)
        await edge.send(codec.encode(ack_for(got)))
        await nothing_within(edge, 20)


async def test_only_one_ack_message_in_flight_per_node(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "a", rv=1))
        await th.publish(object_message("n1", "Pod", "b", rv=2))
        first = await receive(edge)
        await nothing_within(edge, 4)
        await edge.send(codec.encode(ack_for(first)))
        second = await receive(edge, within=1)
        assert {first.resource, second.resource} == {"default/pod/a", "default/pod/b"}


async def test_newest_version_wins_while_node_is_away(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        for rv in (3, 4, 9):
            await th.publish(object_message("n1", "ConfigMap", "cfg", rv=rv, operation="update"))
        edge = await th.connect("n1")
        got = await receive(edge)
        assert got.header.resource_version == "9"
        await edge.send(codec.encode(ack_for(got)))
        await nothing_within(edge, 10)


async def test_acknowledged_version_is_not_sent_again(autojump_clock: MockClock) -> None:
    store = MemoryStore()
    store.ack_points[("n1", "uid-pod-default-web")] = "7"
    async with open_test_hub(store) as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=7))
        await nothing_within(edge, 10)
        await th.publish(object_message("n1", "Pod", "web", rv=8, operation="update"))
        assert (await receive(edge)).header.resource_version == "8"


async def test_reconnect_is_not_resent_what_was_acknowledged(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=7))
        await edge.send(codec.encode(ack_for(await receive(edge))))
        await edge.aclose()
        await trio.testing.wait_all_tasks_blocked()
        again = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=7))
        await nothing_within(again, 10)


async def test_reconnect_replaces_session_and_resends_unacked_message(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub() as th:
        old = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=7))
        first = await receive(old)
        new = await th.connect("n1")
        await assert_closed(old)
        again = await receive(new, within=1)
        assert again.resource == first.resource
        assert again.header.resource_version == "7"
        assert len(th.hub.sessions) == 1


async def test_keepalive_timeout_closes_the_session(autojump_clock: MockClock) -> None:
    async with open_test_hub(settings=HubSettings(keepalive_interval=30)) as th:
        edge = await th.connect("n1")
        start = trio.current_time()
        await assert_closed_within(edge, 31)
        assert trio.current_time() - start == pytest.approx(30, abs=RESOLUTION + 0.01)
        assert "n1" not in th.hub.sessions


async def assert_closed_within(edge: MemoryEdgeEnd, seconds: float) -> None:
    with trio.fail_after(seconds):
        with pytest.raises(Exception):  # noqa: B017
            while True:
                await edge.receive()


async def test_keepalives_keep_the_session_and_other_messages_do_not(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=HubSettings(keepalive_interval=30)) as th:
        edge = await th.connect("n1")
        for _ in range(4):
            await trio.sleep(20)
            await edge.send(codec.encode(keepalive_message()))
        assert "n1" in th.hub.sessions
        ping = new_message(
            source="edged", group="meta", operation="ping", resource="x", content=None, now_ms=0
        )
        last_keepalive = trio.current_time()
        for _ in range(3):
            await trio.sleep(8)
            await edge.send(codec.encode(ping))
            assert (await receive(edge)).content == "ack"
        await assert_closed_within(edge, 31)
        assert trio.current_time() - last_keepalive == pytest.approx(30, abs=RESOLUTION + 0.01)


async def test_control_message_gets_ack_reply(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        ping = new_message(
            source="src", group="grp", operation="ping", resource="res", content=None, now_ms=0
        )
        await edge.send(codec.encode(ping))
        reply = await receive(edge)
        assert (reply.operation, reply.content, reply.header.parent_msg_id) == (
            "response",
            "ack",
            ping.msg_id,
        )
        assert (reply.route.source, reply.route.group, reply.resource) == ("src", "grp", "res")


async def test_empty_shutdown_message_is_ignored(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        await edge.send('{"header":{"msg_id":"","timestamp":0},"route":{},"content":null}\n')
        await trio.testing.wait_all_tasks_blocked()
        assert "n1" in th.hub.sessions
        assert th.store.reports == [] and th.store.queries == []


async def test_garbage_frame_ends_only_that_session(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        bad = await th.connect("bad")
        good = await th.connect("good")
        await bad.send("this is not json")
        await assert_closed(bad)
        await th.publish(object_message("good", "Pod", "web", rv=1))
        assert (await receive(good)).resource == "default/pod/web"


async def test_no_ack_messages_flow_while_an_ack_message_waits(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        await receive(edge)
        reply = new_message(
            source="dynamiccontroller",
            group="resource",
            operation="applicationResponse",
            resource="node/n1/ignore/Application/ignore",
            content={"Status": "Approved"},
            now_ms=0,
        )
        await th.publish(reply)
        got = await receive(edge, within=1)
        assert got.operation == "applicationResponse"
        assert got.resource == "ignore/Application/ignore"


async def test_node_status_report_goes_to_store_and_is_answered(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        report = new_message(
            source="edged",
            group="meta",
            operation="update",
            resource="default/nodestatus/n1",
            content={"UID": "u", "Status": {}},
            now_ms=0,
        )
        await edge.send(codec.encode(report))
        reply = await receive(edge)
        assert reply.header.parent_msg_id == report.msg_id and reply.content == "OK"
        assert th.store.reports[0][0] == "n1"


async def test_node_removal_closes_session_and_drops_queue(autojump_clock: MockClock) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        stop = new_message(
            source="edgecontroller",
            group="resource",
            operation="delete",
            resource="node/n1/namespace/node/n1",
            content=None,
            now_ms=0,
        )
        await th.publish(stop)
        await assert_closed(edge)
        assert "n1" not in th.hub.nodes and "n1" not in th.hub.sessions


async def test_node_limit_refuses_new_nodes_but_not_reconnects(autojump_clock: MockClock) -> None:
    async with open_test_hub(settings=HubSettings(node_limit=1)) as th:
        first = await th.connect("n1")
        refused = await th.connect("n2")
        await assert_closed(refused)
        again = await th.connect("n1")
        await assert_closed(first)
        assert set(th.hub.sessions) == {"n1"}
        await th.publish(object_message("n1", "Pod", "web", rv=1))
        assert (await receive(again)).resource == "default/pod/web"


async def test_hub_keeps_serving_after_many_sessions_end(autojump_clock: MockClock) -> None:
    th_nodes = 20
    async with open_test_hub() as th:
        edges: list[MemoryEdgeEnd] = [await th.connect(f"n{i}") for i in range(th_nodes)]
        for edge in edges[::2]:
            await edge.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert len(th.hub.sessions) == th_nodes // 2


def application_response(node: str, index: int) -> Message:
    return new_message(
        source="dynamiccontroller",
        group="resource",
        operation="applicationResponse",
        resource=f"node/{node}/ignore/Application/a{index}",
        content={"Status": "Approved", "n": index},
        now_ms=0,
    )


async def test_a_write_that_does_not_finish_ends_the_session(autojump_clock: MockClock) -> None:
    """An edge that stops reading: what the connection cannot take waits for a flush, and a
    flush that does not finish within writeTimeout ends the session (only that one)."""
    settings = HubSettings(write_timeout=10, keepalive_interval=600)
    async with open_test_hub(settings=settings) as th:
        stuck = await th.connect("stuck")
        other = await th.connect("other")
        start = trio.current_time()
        for index in range(200):  # more than the memory connection buffers (64 frames)
            await th.publish(application_response("stuck", index))
        await th.publish(application_response("other", 0))
        assert (await receive(other, within=1)).operation == "applicationResponse"
        assert "stuck" in th.hub.sessions
        with trio.fail_after(15):
            while "stuck" in th.hub.sessions:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert trio.current_time() - start == pytest.approx(10, abs=0.2)
        assert stuck.hub_close_reason == "write did not finish within 10 s"
        assert "other" in th.hub.sessions


async def test_a_slow_reader_that_catches_up_gets_everything_in_order(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=HubSettings(write_timeout=10)) as th:
        edge = await th.connect("n1")
        for index in range(200):
            await th.publish(application_response("n1", index))
        await trio.sleep(5)  # the flush waits, within its deadline
        got = [(await receive(edge, within=1)).resource for _ in range(200)]
        assert got == [f"ignore/Application/a{index}" for index in range(200)]
        assert "n1" in th.hub.sessions
