"""Issue 14: connections that never finish their handshake on the WebSocket port are bounded
like the HTTPS port's (`netlimits.Waiting`): per source, in total, and by deadlines that
shrink with the crowd; established sessions are never counted or closed."""

from __future__ import annotations

import resource
from collections import Counter
from functools import partial

import trio
from certs import Pki

from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.edge.websocket import connect_websocket, serve_websocket
from trio_cloudhub.netlimits import Waiting
from trio_cloudhub.testing.flood import connect_from, until

EDGE_HEADERS = [("Node_id", "edge-1"), ("Project_id", "proj-1")]


def raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def echo(connection: EdgeConnection) -> None:
    try:
        while True:
            await connection.send(str(await connection.receive()))
    except EdgeDisconnected:
        pass


async def start(
    nursery: trio.Nursery, pki: Pki, failures: Counter[str], waiting: Waiting, deadline: float
) -> int:
    serve = partial(
        serve_websocket,
        echo,
        ssl_context=pki.server_context(),
        host="127.0.0.1",
        port=0,
        max_message_size=1 << 20,
        handshake_timeout=deadline,
        on_handshake_failure=lambda reason: failures.update([reason]),
        waiting=waiting,
    )
    port: int = await nursery.start(serve)
    return port


async def dial(port: int, pki: Pki) -> EdgeConnection:
    return await connect_websocket(
        "127.0.0.1",
        port,
        ssl_context=pki.client_context(),
        path="/proj-1/edge-1/events",
        headers=EDGE_HEADERS,
    )


async def is_closed_soon(stream: trio.SocketStream, within: float = 5.0) -> bool:
    with trio.move_on_after(within):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_the_oldest_unfinished_handshakes_make_room_per_source_and_in_total(
    nursery: trio.Nursery, pki: Pki
) -> None:
    raise_open_files(400)
    failures: Counter[str] = Counter()
    waiting = Waiting("WebSocket", limit=60, per_source=20)
    port = await start(nursery, pki, failures, waiting, deadline=30)
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(30):
            session = await dial(port, pki)  # established first, from the flood's address
            for _ in range(30):  # one source, 10 above its cap
                idle.append(await connect_from("127.0.0.1", "127.0.0.1", port))
            await until(lambda: failures["evicted"] >= 10, within=10)
            assert all([await is_closed_soon(stream) for stream in idle[:10]])
            for index in range(50):  # five more sources: 70 in total, 10 above the cap
                idle.append(await connect_from(f"127.0.9.{index % 5 + 1}", "127.0.0.1", port))
            await until(lambda: failures["evicted"] >= 20, within=10)
            # The total cap closed the oldest overall: the next ten from the first source.
            assert all([await is_closed_soon(stream) for stream in idle[10:20]])
            assert not await is_closed_soon(idle[-1], within=0.2)
            assert len(waiting) == 60
            assert failures["evicted"] == 20 and waiting.evicted == 20
            # The established session was neither counted nor closed; a new edge gets in,
            # its handshake making room by closing the oldest waiting one.
            await session.send("still here")
            assert await session.receive() == "still here"
            fresh = await dial(port, pki)
            await fresh.send("new")
            assert await fresh.receive() == "new"
            assert await is_closed_soon(idle[20])
            assert waiting.evicted == 21 and len(waiting) == 59
            await session.aclose()
            await fresh.aclose()
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)


async def test_a_crowd_gets_shorter_handshake_deadlines(nursery: trio.Nursery, pki: Pki) -> None:
    raise_open_files(800)
    failures: Counter[str] = Counter()
    port = await start(nursery, pki, failures, Waiting("WebSocket"), deadline=30)
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(40):
            for index in range(300):
                idle.append(await connect_from(f"127.0.8.{index % 3 + 1}", "127.0.0.1", port))
            began = trio.current_time()
            # 300 waiting: the newest get about 30 s * 64 / 300 ≈ 6.4 s, not 30 s.
            assert await is_closed_soon(idle[-1], within=20)
            assert trio.current_time() - began < 20
            # The first CALM_WAITING got the full deadline: still open.
            assert not await is_closed_soon(idle[0], within=0.1)
            assert failures["timeout"] >= 1 and failures["evicted"] == 0
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)
