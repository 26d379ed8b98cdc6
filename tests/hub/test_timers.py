"""The hub's timer task: order, its wake-up grid, callbacks adding timers, failures."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_cloudhub.hub.timers import Timers


async def test_callbacks_run_in_deadline_order_on_the_grid(autojump_clock: MockClock) -> None:
    timers = Timers(resolution=0.25)
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.testing.wait_all_tasks_blocked()
        for name, delay in [("c", 3.0), ("a", 1.1), ("b", 1.2), ("a2", 1.1)]:
            timers.at(start + delay, lambda now, name=name: fired.append((name, now - start)))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [name for name, _ in fired] == ["a", "a2", "b", "c"]
    # a, a2 and b fall in the same 0.25 s step: one wake-up at 1.25 s serves them all.
    assert [round(at, 6) for _, at in fired] == [1.25, 1.25, 1.25, 3.0]


async def test_a_callback_may_add_timers_and_a_failing_one_stops_nothing(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    timers = Timers(resolution=0)
    fired: list[float] = []

    def again(now: float) -> None:
        fired.append(now)
        if len(fired) < 3:
            timers.at(now + 1, again)

    def broken(now: float) -> None:
        raise RuntimeError("boom")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        timers.at(start + 0.5, broken)
        timers.at(start + 1, again)
        await trio.sleep(10)
        assert [at - start for at in fired] == [1, 2, 3]
        assert len(timers) == 0
        assert timers._next == math.inf  # nothing pending: asleep without a deadline
        nursery.cancel_scope.cancel()
    assert "timer callback" in caplog.text and "boom" in caplog.text


async def test_an_earlier_deadline_wakes_the_task(autojump_clock: MockClock) -> None:
    timers = Timers(resolution=0)
    fired: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        timers.at(start + 100, lambda now: fired.append("late"))
        await trio.sleep(1)
        timers.at(start + 2, lambda now: fired.append("early"))
        await trio.sleep(2)
        assert fired == ["early"]
        nursery.cancel_scope.cancel()
