from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.base import EdgeDisconnected
from trio_cloudhub.edge.memory import HubDisconnected, memory_connection_pair


async def test_both_directions_and_identity() -> None:
    with trio.fail_after(5):
        hub, edge = memory_connection_pair("n1")
        assert (hub.node_id, hub.project_id, hub.remote) == ("n1", DEFAULT_PROJECT_ID, "memory:n1")
        await hub.send("down")
        assert await edge.receive() == "down"
        await edge.send("up")
        await edge.send(b"binary")
        assert await hub.receive() == "up"
        assert await hub.receive() == b"binary"


async def test_edge_close_disconnects_the_hub_after_pending_frames() -> None:
    with trio.fail_after(5):
        hub, edge = memory_connection_pair("n1", "p1")
        assert hub.project_id == "p1"
        await edge.send("last words")
        await edge.aclose()
        assert await hub.receive() == "last words"
        with pytest.raises(EdgeDisconnected):
            await hub.receive()
        with pytest.raises(EdgeDisconnected):
            await hub.send("x")
        with pytest.raises(HubDisconnected):
            await edge.receive()


async def test_hub_close_wakes_a_waiting_edge_and_a_waiting_hub_reader() -> None:
    with trio.fail_after(5):
        hub, edge = memory_connection_pair("n1")
        outcomes: list[str] = []

        async def edge_reader() -> None:
            with pytest.raises(HubDisconnected):
                await edge.receive()
            outcomes.append("edge")

        async def hub_reader() -> None:
            with pytest.raises(EdgeDisconnected, match="bye"):
                await hub.receive()
            outcomes.append("hub")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(edge_reader)
            nursery.start_soon(hub_reader)
            await trio.testing.wait_all_tasks_blocked()
            await hub.aclose("bye")
            await hub.aclose()  # idempotent
        assert sorted(outcomes) == ["edge", "hub"]
        with pytest.raises(HubDisconnected):
            await edge.send("x")


async def test_bounded_buffer_applies_backpressure() -> None:
    with trio.fail_after(5):
        hub, edge = memory_connection_pair("n1", buffer=2)
        await hub.send("1")
        await hub.send("2")
        with trio.move_on_after(0.05) as scope:
            await hub.send("3")
        assert scope.cancelled_caught
        assert edge.receive_nowait() == "1"
        assert edge.receive_nowait() == "2"
        with pytest.raises(trio.WouldBlock):
            edge.receive_nowait()
