"""The hub's read poller (edge.poller) and sessions parked on it: real TLS on loopback.

A parked session's keepalives and ACKs are read by the poller's task; anything else is
handed to the session's own task, which parks again afterwards; a connection that ends
while parked wakes its task.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from functools import partial

import pytest
import trio
import trio.testing
from certs import Pki

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.core import codec
from trio_cloudhub.edge.base import EdgeDisconnected
from trio_cloudhub.edge.poller import ReadPoller
from trio_cloudhub.edge.websocket import WebSocketConnection, connect_websocket, serve_websocket
from trio_cloudhub.hub.hub import HubSettings
from trio_cloudhub.testing.hub import (
    TestHub,
    ack_for,
    keepalive_message,
    object_message,
    open_test_hub,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the poller is epoll's")
HEADERS = [("Node_id", "edge-1"), ("Project_id", "proj-1"), ("Connectionuse", "msg")]
SETTINGS = HubSettings(keepalive_interval=60.0, ack_timeout=30.0)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (the test's fail_after bounds it; `what` names it in tracebacks)."""
    while not condition():  # noqa: ASYNC110 - hub state has no event to wait for
        await trio.sleep(0.01)


# --- the poller alone ---------------------------------------------------------------------


def start_poller(nursery: trio.Nursery, linger: float) -> ReadPoller:
    poller = ReadPoller()
    poller.linger = linger
    nursery.start_soon(poller.run)
    return poller


async def test_a_readable_socket_calls_its_callback_until_unregistered(
    nursery: trio.Nursery,
) -> None:
    poller = start_poller(nursery, linger=0)
    a, b = socket.socketpair()
    a.setblocking(False)
    received: list[bytes] = []

    def on_ready() -> bool:
        received.append(a.recv(100))
        return False

    with trio.fail_after(5), a, b:
        poller.register(a.fileno(), on_ready)
        b.send(b"one")
        await wait_until(lambda: received == [b"one"], "first read")
        poller.unregister(a.fileno(), lambda: False)  # not its callback: ignored
        b.send(b"two")
        await wait_until(lambda: received == [b"one", b"two"], "second read")
        poller.unregister(a.fileno(), on_ready)
        assert len(poller) == 0
        b.send(b"three")
        await trio.sleep(0.2)
        assert received == [b"one", b"two"]


async def test_a_callback_with_bytes_left_is_called_again_and_one_that_raises_is_dropped(
    nursery: trio.Nursery,
) -> None:
    poller = start_poller(nursery, linger=0)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    calls = {"again": 0, "broken": 0}

    def again() -> bool:
        calls["again"] += 1
        if calls["again"] == 1:
            a.recv(100)
        return calls["again"] < 3  # "more is buffered above the socket" twice

    def broken() -> bool:
        calls["broken"] += 1
        raise RuntimeError("a bug")

    with trio.fail_after(5), a, b, c, d:
        poller.register(a.fileno(), again)
        poller.register(c.fileno(), broken)
        b.send(b"x")
        d.send(b"y")
        await wait_until(lambda: calls["again"] == 3 and calls["broken"] == 1, "calls")
        await trio.sleep(0.2)
        assert calls == {"again": 3, "broken": 1}  # c is still readable: dropped, not looped
        assert len(poller) == 1


async def test_a_reused_descriptor_number_keeps_its_new_registration(
    nursery: trio.Nursery,
) -> None:
    poller = start_poller(nursery, linger=0)
    old, old_peer = socket.socketpair()
    number = old.fileno()
    poller.register(number, lambda: False)
    stale = poller._callbacks[number]
    old.close()  # closed without unregistering (the kernel forgets it)
    got: list[bytes] = []
    new, new_peer = socket.socketpair()
    with trio.fail_after(5), new, new_peer, old_peer:
        if new.fileno() != number:  # socketpair took two numbers: move one into place
            moved = socket.socket(fileno=os.dup2(new.fileno(), number))
            new.close()
            new = moved
        poller.register(new.fileno(), lambda: bool(got.append(new.recv(10))))
        poller.unregister(number, stale)  # the old owner's late unregister: no effect
        new_peer.send(b"hello")
        await wait_until(lambda: got == [b"hello"], "read on the reused number")


async def test_hurry_ends_a_linger_at_once(nursery: trio.Nursery) -> None:
    poller = start_poller(nursery, linger=30.0)
    a, b = socket.socketpair()
    got: list[bytes] = []
    with trio.fail_after(5), a, b:
        poller.register(a.fileno(), lambda: bool(got.append(a.recv(10))))
        b.send(b"1")
        await wait_until(lambda: got == [b"1"], "first round")
        await trio.sleep(0.1)  # the poller lingers (30 s) now
        b.send(b"2")
        await trio.sleep(0.2)
        assert got == [b"1"], "read during the linger"
        poller.hurry(trio.current_time())
        await wait_until(lambda: got == [b"1", b"2"], "read after hurry")


# --- sessions parked on the hub's poller ----------------------------------------------------


async def serve_hub(th: TestHub, pki: Pki) -> int:
    serve = partial(
        serve_websocket,
        th.hub.handle_connection,
        ssl_context=pki.server_context(),
        host="127.0.0.1",
        port=0,
        max_message_size=1 << 20,
    )
    port: int = await th.nursery.start(serve)
    return port


async def dial(port: int, pki: Pki) -> WebSocketConnection:
    return await connect_websocket(
        "127.0.0.1",
        port,
        ssl_context=pki.client_context(),
        path=f"/{DEFAULT_PROJECT_ID}/edge-1/events",
        headers=HEADERS,
    )


def parked(th: TestHub) -> int:
    assert th.hub.poller is not None
    return len(th.hub.poller)


async def connect_parked(th: TestHub, pki: Pki) -> WebSocketConnection:
    """edge-1 connected over WSS, its first keepalive sent, its session parked."""
    edge = await dial(await serve_hub(th, pki), pki)
    await edge.send(codec.encode(keepalive_message()))
    await wait_until(lambda: "edge-1" in th.hub.sessions and parked(th) == 1, "park")
    return edge


async def test_a_parked_session_delivers_and_hands_odd_frames_to_its_task(pki: Pki) -> None:
    with trio.fail_after(20):
        async with open_test_hub(settings=SETTINGS) as th:
            edge = await connect_parked(th, pki)
            session = th.hub.sessions["edge-1"]
            rounds = th.hub.poller.rounds if th.hub.poller else 0

            # A keepalive read by the poller.
            before = session.last_keepalive_ms
            await trio.sleep(0.01)
            await edge.send(codec.encode(keepalive_message()))
            await wait_until(lambda: session.last_keepalive_ms != before, "keepalive")
            assert th.hub.poller is not None and th.hub.poller.rounds > rounds

            # A delivery, and its ACK in EdgeCore's exact shape (the poller's fast path).
            await th.publish(object_message("edge-1", "ConfigMap", "a", rv=1))
            first = codec.decode(await edge.receive())
            await edge.send(codec.encode(ack_for(first)))
            await wait_until(lambda: session.in_flight is None, "first ACK")

            # The next ACK with spaces in its JSON: not the fast path's, handed to the task,
            # still an ACK; the session parks again afterwards.
            await th.publish(object_message("edge-1", "ConfigMap", "b", rv=2))
            second = codec.decode(await edge.receive())
            await wait_until(lambda: session.in_flight is not None, "second in flight")
            spaced = json.dumps(json.loads(codec.encode(ack_for(second))), indent=1)
            await edge.send(spaced)
            await wait_until(lambda: session.in_flight is None, "second ACK")
            await wait_until(lambda: parked(th) == 1, "parked again")
            assert th.store.acked_version("edge-1", "uid-configmap-default-b") == "2"

            # A ping: wsproto's frame, answered by the task; then keepalives still count.
            await edge.transport.flush()
            edge.transport.send_nowait(b"\x89\x80" + b"\0\0\0\0")  # masked empty ping
            await edge.transport.flush()
            before = session.last_keepalive_ms
            await trio.sleep(0.01)
            await edge.send(codec.encode(keepalive_message()))
            await wait_until(lambda: session.last_keepalive_ms != before, "keepalive after ping")
            assert not session.end_reason

            # The edge goes away while parked: its task wakes and the session ends.
            await edge.abort()
            await wait_until(lambda: "edge-1" not in th.hub.sessions, "session end")
            assert parked(th) == 0
            th.nursery.cancel_scope.cancel()


async def test_a_session_ended_by_the_hub_while_parked_unparks(pki: Pki) -> None:
    with trio.fail_after(20):
        async with open_test_hub(settings=SETTINGS) as th:
            edge = await connect_parked(th, pki)
            th.hub.sessions["edge-1"].end("test ends it")
            await wait_until(lambda: "edge-1" not in th.hub.sessions, "session end")
            assert parked(th) == 0
            with pytest.raises(EdgeDisconnected):
                while True:
                    await edge.receive()
            th.nursery.cancel_scope.cancel()


async def test_many_sessions_park_and_keep_their_keepalives(pki: Pki) -> None:
    """20 edges, keepalives every 50 ms for 1 s with a 0.3 s keepalive timeout: the poller
    (lingering 0.1 s between rounds while no ACK is awaited) keeps every session."""
    settings = HubSettings(keepalive_interval=0.3, ack_timeout=30.0)
    with trio.fail_after(30):
        async with open_test_hub(settings=settings) as th:
            port = await serve_hub(th, pki)
            edges = []
            for index in range(20):
                headers = [("Node_id", f"edge-{index}"), ("Project_id", "p")]
                edges.append(
                    await connect_websocket(
                        "127.0.0.1",
                        port,
                        ssl_context=pki.client_context(),
                        path="/",
                        headers=headers,
                    )
                )

            async def keep_alive(edge: WebSocketConnection) -> None:
                for _ in range(20):
                    await edge.send(codec.encode(keepalive_message()))
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                for edge in edges:
                    nursery.start_soon(keep_alive, edge)
            assert len(th.hub.sessions) == 20
            assert parked(th) == 20
            assert all(not s.end_reason for s in th.hub.sessions.values())
            await trio.testing.wait_all_tasks_blocked(0.01)
            th.nursery.cancel_scope.cancel()
