"""The shared bounds of the HTTPS and WebSocket ports (issue 14)."""

from __future__ import annotations

import socket
import time

import pytest
import trio
import trio.testing

from trio_cloudhub.netlimits import (
    ACCEPT_BATCH,
    ADMIT_PER_ROUND,
    CALM_WAITING,
    FIRST_STEP_COST,
    MIN_WAIT,
    Admission,
    HandshakeTurns,
    Wait,
    Waiting,
    accept_forever,
    listening_socket,
)


def spend_a_step() -> None:
    """A step as costly as the first estimate: the measured cost, and so the number of turns
    per round, stays put instead of drifting with how fast this machine appends to a list."""
    until = time.perf_counter() + FIRST_STEP_COST
    while time.perf_counter() < until:
        pass


def test_deadlines_shrink_with_the_crowd_down_to_the_minimum() -> None:
    crowd = Waiting("test")
    assert crowd.timeout(30) == 30
    for index in range(CALM_WAITING * 2):
        crowd._waits[Wait(trio.CancelScope())] = f"s{index}"
    assert crowd.timeout(30) == 15
    for index in range(CALM_WAITING * 100):
        crowd._waits[Wait(trio.CancelScope())] = f"t{index}"
    assert crowd.timeout(30) == MIN_WAIT


async def test_the_oldest_from_the_full_source_makes_room() -> None:
    waiting = Waiting("test", limit=10, per_source=3)
    ended: list[str] = []

    async def wait(name: str, source: str, task_status: trio.TaskStatus[None]) -> None:
        with waiting.wait(source, 30) as scope:
            task_status.started()
            await trio.sleep_forever()
        ended.append(f"{name}{' evicted' if scope.evicted else ''}")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name, source in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("a3", "a"), ("a4", "a")]:
                await nursery.start(wait, name, source)
            await trio.testing.wait_all_tasks_blocked()
            assert ended == ["a1 evicted"]
            assert waiting.from_source("a") == 3 and waiting.from_source("b") == 1
            nursery.cancel_scope.cancel()


async def flood_then(turns: HandshakeTurns, late: list[str]) -> tuple[list[str], int]:
    """40 steps from source "flood", then, once the first has run, one step from "probe" per
    name in `late`: the order the steps ran in, and how many had run when the late came."""
    order: list[str] = []

    async def step(name: str, source: str) -> None:
        async with turns.turn(source):
            spend_a_step()
            order.append(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turns.run)
            async with trio.open_nursery() as steps:
                for index in range(40):
                    steps.start_soon(step, f"flood{index}", "flood")
                while not order:  # the flood's first turns are handed out
                    await trio.lowlevel.checkpoint()
                before = len(order)
                for name in late:
                    steps.start_soon(step, name, "probe")
            nursery.cancel_scope.cancel()
    assert len(order) == 40 + len(late)
    return order, before


async def test_a_new_source_gets_a_turn_before_a_crowd_from_another() -> None:
    order, before = await flood_then(HandshakeTurns(budget=2 * FIRST_STEP_COST), ["probe"])
    assert before < 10
    # Within a round of its arrival, not behind the whole flood (FIFO would make it 41st):
    # granted turns run one round after they are handed out, and the probe task itself
    # starts a round late, so a few rounds of 2 turns may run first.
    assert order.index("probe") <= before + 8 < 40


async def test_every_waiting_connection_is_accepted_in_one_turn(nursery: trio.Nursery) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    sock = listening_socket(listener)
    accepted: list[socket.socket] = []

    async def keep(connection: socket.socket) -> None:
        accepted.append(connection)

    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        with trio.fail_after(5):
            nursery.start_soon(accept_forever, sock, nursery, keep)
            await trio.testing.wait_all_tasks_blocked()
            assert len(accepted) == 50
            assert all(not connection.getblocking() for connection in accepted)
    finally:
        for connection in clients + accepted:
            connection.close()


async def test_a_vouched_source_steps_ahead_of_an_unknown_crowd() -> None:
    turns = HandshakeTurns(budget=FIRST_STEP_COST)
    turns.vouch("probe")
    names = [f"probe{index}" for index in range(3)]
    order, before = await flood_then(turns, names)
    # One probe step needs no turn; the others of the same round queue ahead of the unknown
    # crowd, which still gets a turn per round. Which probe task runs first is trio's choice.
    probes = sorted(order.index(name) for name in names)
    assert probes[0] <= before + 3
    assert probes[-1] <= before + 8 < 40
    assert turns.vouched("probe") and not turns.vouched("flood")


def test_admission_takes_round_robin_by_source_and_closes_past_its_bounds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pairs = [socket.socketpair() for _ in range(6)]
    a1, a2, a3, b1, c1, d1 = (ours for ours, _ in pairs)
    admission = Admission("test", limit=4, per_source=2)
    try:
        for source, connection in [("a", a1), ("a", a2), ("a", a3), ("b", b1), ("c", c1)]:
            admission.add(source, connection)
        admission.add("d", d1)  # four wait already: the limit in all
        assert a3.fileno() == -1 and d1.fileno() == -1
        assert admission.refused == 2
        assert "test: 2 connections wait to be served, closed a new one (from a;" in caplog.text
        assert admission.take(3) == [a1, b1, c1]
        assert admission.take(3) == [a2]
        assert not admission
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


async def test_a_vouched_source_is_served_ahead_of_a_crowd_waiting_for_admission(
    nursery: trio.Nursery,
) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    turns = HandshakeTurns()
    turns.vouch("127.0.0.2")
    started: list[str] = []
    crowd = 4 * ACCEPT_BATCH
    all_started = trio.Event()

    async def record(connection: socket.socket) -> None:
        started.append(connection.getpeername()[0])
        connection.close()
        if len(started) == crowd + 1:
            all_started.set()

    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(crowd)]
    clients.append(socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)))
    try:
        with trio.fail_after(5):
            nursery.start_soon(accept_forever, listening_socket(listener), nursery, record, turns)
            await all_started.wait()
        # The kernel's queue is FIFO: it came last. Each accepted batch admits only
        # ADMIT_PER_ROUND of the crowd, so it is started in the batch that accepts it.
        assert started.index("127.0.0.2") <= 5 * ADMIT_PER_ROUND < crowd
    finally:
        for client in clients:
            client.close()
