"""What the hub sees of one edge connection, whatever the transport."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class EdgeDisconnected(Exception):
    """The edge went away (close frame, TCP reset, TLS error, or we closed it)."""


class NeedsTask(Exception):
    """`receive_nowait()` cannot go on without waiting: the next step is the async
    `receive()`'s (a frame only the full parser handles, a message too big, the end of the
    connection). Nothing is lost: the connection keeps what it read."""


class EdgeConnection(Protocol):
    @property
    def node_id(self) -> str: ...

    @property
    def project_id(self) -> str: ...

    @property
    def remote(self) -> str:
        """`host:port` of the peer, for logs."""
        ...

    @property
    def stall_timeout(self) -> float:
        """Seconds after which the transport itself ends the connection when the bytes sent
        stop being acknowledged (a progress deadline); 0 when it does not, and the session
        bounds each write instead."""
        ...

    def bytes_in_flight(self) -> int:
        """Bytes written that the peer has not acknowledged yet (the kernel's send queue);
        0 when the transport cannot tell."""
        ...

    async def receive(self) -> str | bytes:
        """The next whole message (text or binary); raises EdgeDisconnected."""
        ...

    def send_nowait(self, text: str) -> bool:
        """Send one text message without waiting: True when it is all on its way, False when
        part of it waits for `flush()` (it is queued, in order, either way). Synchronous, so
        any task may call it; raises EdgeDisconnected."""
        ...

    async def flush(self) -> None:
        """Until nothing sent waits any more (one flushing task at a time); cancel-safe, bound
        it with the caller's deadline; raises EdgeDisconnected."""
        ...

    async def send(self, text: str) -> None:
        """`send_nowait`, then `flush` when needed; raises EdgeDisconnected."""
        ...

    async def aclose(self, reason: str = "") -> None:
        """Close (idempotent, bounded in time)."""
        ...


# Called once per accepted connection in its own task; the connection is closed when it returns.
ConnectionHandler = Callable[[EdgeConnection], Awaitable[None]]
