"""An in-process edge connection over trio memory channels, for hub tests.

`memory_connection_pair()` returns the hub's end (an `EdgeConnection`) and the edge's end
(`MemoryEdgeEnd`). Like a socket, closing either end ends the conversation: the hub's end then
raises `EdgeDisconnected`, the edge's end `HubDisconnected`. Messages already sent before a close
are still received, as on TCP. Both directions are bounded, so a test that never reads applies
backpressure to the hub as a real slow edge would.
"""

from __future__ import annotations

from collections import deque

import trio

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected

DEFAULT_BUFFER = 64
_GONE = (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError)


class HubDisconnected(Exception):
    """The hub closed the connection (or this edge end was closed already)."""


class MemoryHubEnd:
    """The hub's side: what `serve_websocket` would hand to the connection handler."""

    def __init__(
        self,
        node_id: str,
        project_id: str,
        down: trio.MemorySendChannel[str],
        up: trio.MemoryReceiveChannel[str | bytes],
    ) -> None:
        self._node_id = node_id
        self._project_id = project_id
        self._down = down
        self._up = up
        self.close_reason: str | None = None
        self._pending: deque[str] = deque()  # frames the full channel did not take yet
        self._flush_lock = trio.StrictFIFOLock()

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def project_id(self) -> str:
        return self._project_id

    @property
    def remote(self) -> str:
        return f"memory:{self._node_id}"

    @property
    def stall_timeout(self) -> float:
        return 0.0

    def bytes_in_flight(self) -> int:
        return 0

    async def receive(self) -> str | bytes:
        try:
            return await self._up.receive()
        except _GONE:
            raise EdgeDisconnected(self.close_reason or "the edge closed the connection") from None

    def send_nowait(self, text: str) -> bool:
        if self._pending:
            self._pending.append(text)
            return False
        try:
            self._down.send_nowait(text)
        except trio.WouldBlock:
            self._pending.append(text)
            return False
        except _GONE:
            raise EdgeDisconnected(self.close_reason or "the edge closed the connection") from None
        return True

    async def flush(self) -> None:
        async with self._flush_lock:
            while self._pending:
                try:
                    await self._down.send(self._pending[0])
                except _GONE:
                    raise EdgeDisconnected(
                        self.close_reason or "the edge closed the connection"
                    ) from None
                self._pending.popleft()

    async def send(self, text: str) -> None:
        if not self.send_nowait(text):
            await self.flush()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self, reason: str = "") -> None:
        if self.close_reason is None:
            self.close_reason = reason or "closed by the hub"
        self._down.close()
        self._up.close()
        await trio.lowlevel.checkpoint()


class MemoryEdgeEnd:
    """The edge's side, driven by a test: send frames up, receive what the hub sent down."""

    def __init__(
        self,
        node_id: str,
        down: trio.MemoryReceiveChannel[str],
        up: trio.MemorySendChannel[str | bytes],
    ) -> None:
        self.node_id = node_id
        self._down = down
        self._up = up
        self.hub_end: MemoryHubEnd | None = None

    @property
    def hub_close_reason(self) -> str | None:
        """The reason the hub gave when it closed the connection (a close frame's text)."""
        return self.hub_end.close_reason if self.hub_end is not None else None

    async def send(self, text: str | bytes) -> None:
        """One frame to the hub; bytes stand for a binary frame."""
        try:
            await self._up.send(text)
        except _GONE:
            raise HubDisconnected(f"{self.node_id}: the hub closed the connection") from None

    def send_nowait(self, text: str | bytes) -> None:
        try:
            self._up.send_nowait(text)
        except _GONE:
            raise HubDisconnected(f"{self.node_id}: the hub closed the connection") from None

    async def receive(self) -> str:
        try:
            return await self._down.receive()
        except _GONE:
            raise HubDisconnected(f"{self.node_id}: the hub closed the connection") from None

    def receive_nowait(self) -> str:
        """Raises trio.WouldBlock when nothing is waiting."""
        try:
            return self._down.receive_nowait()
        except _GONE:
            raise HubDisconnected(f"{self.node_id}: the hub closed the connection") from None

    async def aclose(self) -> None:
        """An abrupt close by the edge: the hub sees EdgeDisconnected."""
        self._up.close()
        self._down.close()
        await trio.lowlevel.checkpoint()


def memory_connection_pair(
    node_id: str, project_id: str = DEFAULT_PROJECT_ID, *, buffer: int = DEFAULT_BUFFER
) -> tuple[EdgeConnection, MemoryEdgeEnd]:
    """A connected (hub end, edge end) pair; each direction buffers up to `buffer` frames."""
    down_send, down_receive = trio.open_memory_channel[str](buffer)
    up_send, up_receive = trio.open_memory_channel[str | bytes](buffer)
    hub = MemoryHubEnd(node_id, project_id, down_send, up_receive)
    edge = MemoryEdgeEnd(node_id, down_receive, up_send)
    edge.hub_end = hub
    return hub, edge
