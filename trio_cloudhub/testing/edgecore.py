"""A simulated EdgeCore *process*: its database outlives connections, it reconnects by itself.

`SimEdge` (edge_sim) is one connection. A real EdgeCore keeps its metaManager database across
reconnects and restarts and connects again on its own when the hub goes away; tests of a
whole life (hub crash and restart, edge restart, an edge away while things change, a node
moving to another hub) need that. `SimEdgeCore` is a loop of `SimEdge` connections sharing
one `MetaStore` (the v1.10 or v1.23 storage rules of `edge_storage`), so `core.storage` is
what a real edge of that line holds, whatever happened on the way.

    core = SimEdgeCore("edge-1", identity, port=hub.websocket_port, line="v1.10")
    nursery.start_soon(core.run)
    await core.wait_until(lambda db: db.resource_version("default/configmap/cfg") == "5")

Reconnects back off from `retry_first` doubling to `retry_cap` (EdgeCore waits far longer;
tests want speed, the order of events is the same). `stop()` is EdgeCore stopping (v1.23
sends its empty shutdown message first, then closes TCP without a close frame), `start()`
starts it again with its database; change `port` to send the edge to another hub.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.testing.edge_sim import IdentitySource, SimEdge, start_sim_edge
from trio_cloudhub.testing.edge_storage import V1_23, MetaStore

POLL = 0.02


class SimEdgeCore:
    def __init__(
        self,
        node_id: str,
        identity: IdentitySource,
        *,
        port: int,
        host: str = "127.0.0.1",
        line: str = V1_23,
        project_id: str = DEFAULT_PROJECT_ID,
        keepalive_interval: float = 15.0,
        retry_first: float = 0.05,
        retry_cap: float = 0.5,
        connect_timeout: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.identity = identity
        self.host = host
        self.port = port  # the hub it connects to next
        self.storage = MetaStore(line)
        self.project_id = project_id
        self.keepalive_interval = keepalive_interval
        self.retry_first = retry_first
        self.retry_cap = retry_cap
        self.connect_timeout = connect_timeout
        self.sessions: list[SimEdge] = []
        self.connect_failures = 0
        self.last_error = ""
        self._running = True
        self._started = trio.Event()

    @property
    def connected(self) -> bool:
        return bool(self.sessions) and self.sessions[-1].connected

    @property
    def session(self) -> SimEdge | None:
        return self.sessions[-1] if self.sessions else None

    async def run(self) -> None:
        """Connect, serve the connection, connect again; forever (cancel to end it)."""
        delay = self.retry_first
        while True:
            if not self._running:
                await self._started.wait()
                continue
            try:
                async with trio.open_nursery() as nursery:
                    edge = await start_sim_edge(
                        nursery,
                        self.host,
                        self.port,
                        self.identity,
                        self.node_id,
                        self.project_id,
                        keepalive_interval=self.keepalive_interval,
                        connect_timeout=self.connect_timeout,
                        storage=self.storage,
                    )
                    self.sessions.append(edge)
                    await edge.wait_disconnected(math.inf)
            except Exception as exc:  # the hub is away or refused us: as EdgeCore, retry
                self.connect_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                await trio.sleep(delay)
                delay = min(2 * delay, self.retry_cap)
            else:
                delay = self.retry_first
                await trio.sleep(self.retry_first)

    async def stop(self) -> None:
        """EdgeCore stops: its database stays; it does not connect until `start()`."""
        self._running = False
        self._started = trio.Event()
        edge = self.session
        if edge is not None and edge.connected:
            if self.storage.line == V1_23:
                await edge.send_shutdown()
            await edge.close_abruptly()
            await edge.wait_disconnected()

    def start(self) -> None:
        self._running = True
        self._started.set()

    async def reconnect(self) -> None:
        """Drop the connection (TCP closed, no close frame); the loop connects again."""
        edge = self.session
        if edge is not None and edge.connected:
            await edge.close_abruptly()

    async def wait_connected(self, *, after: int = 0, within: float = 15.0) -> SimEdge:
        """The first connected session with index >= `after`."""
        with trio.fail_after(within):
            while True:  # polled: the session to wait on may not exist yet
                if len(self.sessions) > after and self.sessions[-1].connected:
                    return self.sessions[-1]
                await trio.sleep(POLL)

    async def wait_until(
        self, check: Callable[[MetaStore], bool], within: float = 20.0, what: str = ""
    ) -> None:
        """Until `check(self.storage)` holds; TimeoutError naming `what` and the holdings."""
        with trio.move_on_after(within):
            while True:  # polled: fed by whichever connection is up
                if check(self.storage):
                    return
                await trio.sleep(POLL)
        raise TimeoutError(
            f"{self.node_id} ({self.storage.line}): not {what or 'as expected'} within "
            f"{within} s; holds {self.storage.versions()}; last error: {self.last_error or '-'}"
        )
