"""The upstream dispatcher: per-node bounded queues served in turn."""

from __future__ import annotations

import trio
import trio.testing
from trio.testing import MockClock

from trio_cloudhub.core.message import new_message
from trio_cloudhub.core.rules import Upstream
from trio_cloudhub.hub.upstream import UpstreamDispatcher, UpstreamWork


def work(node: str, n: int) -> UpstreamWork:
    message = new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=f"default/nodestatus/{node}-{n}",
        content=None,
        now_ms=0,
    )
    return UpstreamWork(node, Upstream.REPORT, message)


async def test_a_flooding_node_does_not_hold_up_another(autojump_clock: MockClock) -> None:
    handled: list[str] = []

    async def slow_store(item: UpstreamWork) -> None:
        await trio.sleep(1)  # e.g. a slow database write
        handled.append(item.message.resource)

    dispatcher = UpstreamDispatcher(slow_store, per_node=100, workers=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run)
        for n in range(100):
            await dispatcher.submit(work("flood", n))
        await dispatcher.submit(work("calm", 0))
        await trio.sleep(3.5)
        # Two workers, one item per node per turn: calm's report is among the first few.
        assert "default/nodestatus/calm-0" in handled
        assert len(handled) <= 6
        nursery.cancel_scope.cancel()


async def test_a_full_node_queue_makes_only_that_node_wait(autojump_clock: MockClock) -> None:
    release = trio.Event()
    handled: list[str] = []

    async def blocked_store(item: UpstreamWork) -> None:
        await release.wait()
        handled.append(item.node_id)

    dispatcher = UpstreamDispatcher(blocked_store, per_node=3, workers=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run)
        for n in range(4):  # one taken by the worker, three queued
            await dispatcher.submit(work("busy", n))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(5) as waited:
            await dispatcher.submit(work("busy", 4))
        assert waited.cancelled_caught  # busy's queue is full: its reader waits
        with trio.fail_after(1):
            await dispatcher.submit(work("other", 0))  # another node is not held up
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert handled.count("busy") == 4 and handled.count("other") == 1
        assert dispatcher.queued("busy") == 0
        nursery.cancel_scope.cancel()
