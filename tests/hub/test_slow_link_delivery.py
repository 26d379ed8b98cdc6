"""ACK-mode delivery on a slow link, in-process on trio's MockClock (issue 14).

A copy still in transit (written but not acknowledged by the edge's TCP, or a write that took
longer than `ackTimeout`) must not be sent again behind itself: on a 64 kbit/s link every
duplicate of a large object costs as long as the object itself.
"""

from __future__ import annotations

import trio
import trio.testing
from trio.testing import MockClock

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message
from trio_cloudhub.edge.memory import MemoryEdgeEnd, MemoryHubEnd
from trio_cloudhub.hub.hub import HubSettings
from trio_cloudhub.testing.hub import TestHub, ack_for, object_message, open_test_hub

SETTINGS = HubSettings(ack_timeout=5.0, ack_max_sends=5, keepalive_interval=1e6)


class SlowLinkEnd(MemoryHubEnd):
    """A hub end whose kernel send queue a test sets, as SIOCOUTQ would report it."""

    in_flight = 0

    def bytes_in_flight(self) -> int:
        return self.in_flight


def connect(th: TestHub, node: str, buffer: int) -> tuple[SlowLinkEnd, MemoryEdgeEnd]:
    down_send, down_receive = trio.open_memory_channel[str](buffer)
    up_send, up_receive = trio.open_memory_channel[str | bytes](buffer)
    hub_end = SlowLinkEnd(node, DEFAULT_PROJECT_ID, down_send, up_receive)
    edge = MemoryEdgeEnd(node, down_receive, up_send)
    edge.hub_end = hub_end
    th.nursery.start_soon(th.hub.handle_connection, hub_end)
    return hub_end, edge


async def receive(edge: MemoryEdgeEnd) -> tuple[float, Message]:
    message = codec.decode(await edge.receive())
    return trio.current_time(), message


async def test_no_copy_is_sent_while_the_last_one_is_in_transit(
    autojump_clock: MockClock,
) -> None:
    async with open_test_hub(settings=SETTINGS) as th:
        hub_end, edge = connect(th, "n1", buffer=16)
        await trio.testing.wait_all_tasks_blocked()
        hub_end.in_flight = 10_000_000  # the first copy is still on its way
        began = trio.current_time()
        await th.publish(object_message("n1", "Secret", "big", rv=1))
        _, first = await receive(edge)
        with trio.move_on_after(60) as scope:
            await edge.receive()
        assert scope.cancelled_caught, "a copy was sent again while the first was in transit"

        hub_end.in_flight = 0  # the edge's TCP has it all now
        reached = trio.current_time()
        at, again = await receive(edge)
        assert again.msg_id == first.msg_id
        assert reached + 5.0 <= at <= reached + 5.5, at - reached
        await edge.send(codec.encode(ack_for(again)))
        await trio.testing.wait_all_tasks_blocked()
        assert th.hub.sessions["n1"].in_flight is None
        assert at - began > 60


async def test_the_ack_wait_counts_from_the_end_of_a_slow_write(
    autojump_clock: MockClock,
) -> None:
    """The edge takes 20 s to read the copy (ackTimeout 5 s): it gets no second copy until
    ackTimeout after it has the first."""
    async with open_test_hub(settings=SETTINGS) as th:
        _, edge = connect(th, "n1", buffer=0)  # every write waits for the edge
        await trio.testing.wait_all_tasks_blocked()
        await th.publish(object_message("n1", "Secret", "big", rv=1))
        await trio.sleep(20)
        got_at, first = await receive(edge)
        again_at, again = await receive(edge)
        assert again.msg_id == first.msg_id
        assert again_at - got_at >= 5.0, again_at - got_at
        await edge.send(codec.encode(ack_for(again)))
