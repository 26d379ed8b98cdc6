"""Connections waiting for their peer, shared by the HTTPS and the WebSocket ports.

A connection "waits" while the hub cannot do anything until the peer sends: the TLS hello,
the rest of the TLS handshake, an HTTP request or the WebSocket upgrade request. Up to
CALM_WAITING of them get the full timeout of what they wait for; beyond, the timeouts shrink
in proportion to the crowd (never below MIN_WAIT), and past MAX_WAITING (MAX_WAITING_PER_SOURCE
from one address) the oldest waiting connection is closed to make room. So a flood of idle or
slow clients never makes a new one wait: a probe or an edge is served at once, the flood pays.
Established edge sessions never wait here: they are neither counted nor closed.

The numbers are constants, not settings: a real client (EdgeCore, a kubelet probe, keadm)
finishes a handshake in milliseconds, so 1 s under a crowd is ample, and 4,096 half-open
connections per port is far above any fleet reconnecting at once (edges retry every few
seconds, each waiting a few milliseconds here) while its memory (a few KB each) stays small.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator

import trio

logger = logging.getLogger("trio_cloudhub.netlimits")

CALM_WAITING = 64
MIN_WAIT = 1.0
MAX_WAITING = 4096
MAX_WAITING_PER_SOURCE = 1024
# One warning per this many closed connections: a flood logs a line now and then, not per socket.
LOG_EVERY = 1000


class Wait:
    """One wait on the peer: a deadline (`scope`), and whether the crowd ended it early."""

    __slots__ = ("evicted", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.evicted = False

    @property
    def cancelled_caught(self) -> bool:
        """The wait ended by its deadline or by eviction (not by the peer)."""
        return self.scope.cancelled_caught


class Waiting:
    """Connections of one port waiting for their peer, oldest first (see the module doc)."""

    def __init__(
        self,
        name: str,
        limit: int = MAX_WAITING,
        per_source: int = MAX_WAITING_PER_SOURCE,
    ) -> None:
        self.name = name
        self.limit = limit
        self.per_source = per_source
        self._waits: dict[Wait, str] = {}  # insertion order: oldest first
        self._sources: Counter[str] = Counter()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._waits)

    def from_source(self, source: str) -> int:
        return self._sources[source]

    def timeout(self, base: float) -> float:
        crowd = len(self._waits)
        return base if crowd <= CALM_WAITING else max(MIN_WAIT, base * CALM_WAITING / crowd)

    @contextlib.contextmanager
    def wait(self, source: str, base: float) -> Iterator[Wait]:
        """A scope for one wait on the peer: its deadline, and room made if needed."""
        if self._sources[source] >= self.per_source:
            self._evict(lambda wait_source: wait_source == source)
        elif len(self._waits) >= self.limit:
            self._evict(lambda wait_source: True)
        wait = Wait(trio.CancelScope(deadline=trio.current_time() + self.timeout(base)))
        self._waits[wait] = source
        self._sources[source] += 1
        try:
            with wait.scope:
                yield wait
        finally:
            del self._waits[wait]
            self._sources[source] -= 1
            if not self._sources[source]:
                del self._sources[source]

    def _evict(self, matches: Callable[[str], bool]) -> None:
        for wait, source in self._waits.items():
            if matches(source) and not wait.evicted:
                wait.evicted = True
                wait.scope.cancel()
                self.evicted += 1
                if self.evicted % LOG_EVERY == 1:
                    logger.warning(
                        "%s: %d connections waiting for their peer, closed the oldest "
                        "(from %s; %d so far)",
                        self.name,
                        len(self._waits),
                        source,
                        self.evicted,
                    )
                return


def peer_host(address: object) -> str:
    """The host part of a socket's peer address (the per-source key); "" when unknown."""
    return str(address[0]) if isinstance(address, tuple) else str(address or "")
