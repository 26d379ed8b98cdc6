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

import collections
import contextlib
import errno
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import NoReturn, TypeVar

import trio

logger = logging.getLogger("trio_cloudhub.netlimits")
T = TypeVar("T")

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


# --- accepting ----------------------------------------------------------------------------------

# Connections accepted per scheduler turn. trio's `SocketListener.accept` takes one per turn,
# and a turn is long when thousands of connections are busy: the kernel's accept queue then
# fills up and a probe or an edge waits in it behind the whole flood.
ACCEPT_BATCH = 64
# Connections from sources not vouched for whose task is started per scheduler round and port
# (`Admission`): about 1.5 ms of their first steps. A probe's exchange takes about four
# rounds, so what a round may hold (this, and TURN_BUDGET, on each port) is what it waits:
# 16 and 4 ms gave rounds of 16 ms at p99 under a flood, 8 and 2 ms 10 ms (bench.flood).
ADMIT_PER_ROUND = 8
# accept(2) failures that mean "overloaded", not "broken": wait a little and accept again.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# The connection died in the accept queue (as trio.serve_listeners, these are skipped).
_ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_RETRY = 0.1


def listening_socket(listener: trio.SocketListener) -> socket.socket:
    """The stdlib socket under a trio listener (non-blocking; the listener is unusable)."""
    trio_socket = listener.socket
    family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
    sock = socket.socket(family, kind, proto, fileno=trio_socket.detach())
    sock.setblocking(False)
    return sock


async def accept_forever(
    sock: socket.socket,
    nursery: trio.Nursery,
    serve_one: Callable[[socket.socket], Awaitable[object]],
    turns: HandshakeTurns | None = None,
) -> NoReturn:
    """Run `serve_one(connection)` in `nursery` for every connection, a non-blocking stdlib
    socket with trio's stream options, accepting all that wait (up to ACCEPT_BATCH) per turn.
    With `turns`, connections from sources it does not vouch for are admitted (their task
    started) at most ADMIT_PER_ROUND per scheduler round, round-robin by source: see
    `Admission`."""
    admission = Admission(f"port {sock.getsockname()[1]}")
    with sock, contextlib.closing(admission):
        while True:
            if admission:
                await trio.lowlevel.checkpoint()  # admit more in the next round
            else:
                await trio.lowlevel.wait_readable(sock)
            for connection, address in await _accept_waiting(sock):
                _stream_options(connection)
                source = peer_host(address)
                if turns is None or turns.vouched(source):
                    nursery.start_soon(serve_one, connection)
                else:
                    admission.add(source, connection)
            for connection in admission.take(ADMIT_PER_ROUND):
                nursery.start_soon(serve_one, connection)


async def _accept_waiting(sock: socket.socket) -> list[tuple[socket.socket, object]]:
    """The connections waiting in the kernel's queue (with their peer), up to ACCEPT_BATCH."""
    accepted = []
    for _ in range(ACCEPT_BATCH):
        try:
            accepted.append(sock.accept())
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno in _ACCEPT_SKIP_ERRNOS:
                continue
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            logger.error(
                "accept failed: %s; retrying in %s s", os.strerror(exc.errno), ACCEPT_RETRY
            )
            await trio.sleep(ACCEPT_RETRY)
            break
    return accepted


class Admission:
    """Accepted connections whose task is not started yet, round-robin by source. Starting a
    connection's task costs its first step in the next round (a TLS object, a deadline, a
    read: 0.1-0.3 ms); a flood accepted 64 at a time per port would make every round, and so
    every probe and edge, wait behind that. The kernel's queue cannot be the waiting room: it
    is one FIFO, so a probe would wait in it behind the flood. Past `limit` in all, or
    `per_source` from one source, a newly accepted connection is closed."""

    def __init__(
        self, name: str, limit: int = MAX_WAITING, per_source: int = MAX_WAITING_PER_SOURCE
    ) -> None:
        self.name = name
        self.limit = limit
        self.per_source = per_source
        self._queues: dict[str, collections.deque[socket.socket]] = {}
        self._count = 0
        self.refused = 0

    def __bool__(self) -> bool:
        return self._count > 0

    def add(self, source: str, connection: socket.socket) -> None:
        queue = self._queues.get(source)
        if self._count >= self.limit or (queue is not None and len(queue) >= self.per_source):
            connection.close()
            self.refused += 1
            if self.refused % LOG_EVERY == 1:
                logger.warning(
                    "%s: %d connections wait to be served, closed a new one (from %s; %d so far)",
                    self.name,
                    self._count,
                    source,
                    self.refused,
                )
            return
        if queue is None:
            queue = self._queues[source] = collections.deque()
        queue.append(connection)
        self._count += 1

    def take(self, most: int) -> list[socket.socket]:
        taken = _round_robin(self._queues, most)
        self._count -= len(taken)
        return taken

    def close(self) -> None:
        """Close every waiting connection (the port is shutting down)."""
        for queue in self._queues.values():
            for connection in queue:
                connection.close()
        self._queues.clear()
        self._count = 0


def _stream_options(connection: socket.socket) -> None:
    """What trio.SocketStream sets: no Nagle delay, and at most 16 KiB of unsent bytes in the
    kernel (backpressure reaches us, so slow links are seen and memory stays bounded)."""
    connection.setblocking(False)
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if lowat is not None:
        with contextlib.suppress(OSError):
            connection.setsockopt(socket.IPPROTO_TCP, lowat, 2**14)


# --- handshake turns ----------------------------------------------------------------------------

# TLS handshake steps on received bytes (the server's key exchange and signature on the
# ClientHello; the client certificate's verification on its second flight: 0.5-1.7 ms of CPU
# each) are handed out as turns, at most about TURN_BUDGET seconds of them per scheduler round.
# A step is CPU work that never yields: without turns, a thousand TLS hellos make every round,
# and so every probe and edge, wait behind a second of cryptography. Turns go round-robin over
# source addresses, so a new client waits behind at most one step per other source; sources
# that completed a request or a session lately (`vouch`: probes, edges) go first. While nobody
# queues and the round's budget is not spent, a step runs at once (no round trip through the
# task that hands out turns: that trip cost a connect storm of 5,000 edges ~8 % more time).
TURN_BUDGET = 0.002
# Step cost assumed before any is measured (seconds), and the weight of each new measurement.
FIRST_STEP_COST = 0.001
STEP_COST_WEIGHT = 0.1
# Vouched sources remembered (least recently vouched forgotten first).
KNOWN_SOURCES = 4096
# What a handshake enters around each step: `partial(turns.turn, source)`.
Turn = Callable[[], contextlib.AbstractAsyncContextManager[None]]


class HandshakeTurns:
    """Turns for handshake steps, about `budget` seconds of them per scheduler round, fair by
    source, vouched sources first (see the comment above)."""

    def __init__(self, budget: float = TURN_BUDGET, known_sources: int = KNOWN_SOURCES) -> None:
        self.budget = budget
        self.known_sources = known_sources
        self.step_cost = FIRST_STEP_COST
        # Round-robin order in each; vouched sources' queue first.
        self._vouched: dict[str, collections.deque[trio.Event]] = {}
        self._others: dict[str, collections.deque[trio.Event]] = {}
        self._known: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._unqueued: set[str] = set()  # vouched sources that took their step this round
        self._spent = 0.0  # CPU of the steps run in this round (reset by `_RoundStart`)
        self._work = trio.Event()

    def vouch(self, source: str) -> None:
        """`source` just completed a request or a session: its next steps go first."""
        self._known[source] = None
        self._known.move_to_end(source)
        if len(self._known) > self.known_sources:
            self._known.popitem(last=False)

    def vouched(self, source: str) -> bool:
        return source in self._known

    def turn(self, source: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Wait for a turn; the step in the block must not await (it is one CPU step)."""
        return _Turn(self, source)

    async def wait_for_turn(self, source: str) -> None:
        if self._unqueued_step(source):
            return
        granted = trio.Event()
        queues = self._vouched if source in self._known else self._others
        queue = queues.get(source)
        if queue is None:
            queue = queues[source] = collections.deque()
        queue.append(granted)
        self._work.set()
        try:
            await granted.wait()
        except BaseException:
            _forget(queues, source, granted)
            raise

    def _unqueued_step(self, source: str) -> bool:
        """A step runs at once (no round trip through `run`) while nobody is queued and the
        round's budget is not spent, or as a vouched source's first step in a round (a probe,
        an edge); other steps queue."""
        if not self._vouched and not self._others and self._spent + self.step_cost <= self.budget:
            return True
        if source not in self._known or source in self._vouched:
            return False
        if source in self._unqueued:
            return False
        self._unqueued.add(source)
        return True

    def spent(self, seconds: float) -> None:
        """A step took `seconds` of CPU: counted in this round, and in the cost estimate."""
        self._spent += seconds
        self.step_cost += STEP_COST_WEIGHT * (seconds - self.step_cost)

    def per_round(self) -> int:
        return max(1, int(self.budget / max(self.step_cost, 1e-6)))

    def new_round(self) -> None:
        self._spent = 0.0
        self._unqueued.clear()

    async def run(self) -> NoReturn:
        """Hand out the turns (one task per port)."""
        round_start = _RoundStart(self)
        trio.lowlevel.add_instrument(round_start)
        try:
            await self._hand_out()
        finally:
            trio.lowlevel.remove_instrument(round_start)

    async def _hand_out(self) -> NoReturn:
        while True:
            if not self._vouched and not self._others:
                self._work = trio.Event()
                await self._work.wait()
            turns = self.per_round()
            # Vouched sources first, but one turn per round stays for the others: a source
            # vouched for once cannot keep new edges out.
            first = _grant(self._vouched, max(1, turns - 1) if self._others else turns)
            _grant(self._others, max(1, turns - first))
            await trio.lowlevel.cancel_shielded_checkpoint()


class _Turn:
    """`HandshakeTurns.turn`: a class, not a generator, as it runs for every TLS step."""

    __slots__ = ("began", "source", "turns")

    def __init__(self, turns: HandshakeTurns, source: str) -> None:
        self.turns = turns
        self.source = source
        self.began = 0.0

    async def __aenter__(self) -> None:
        await self.turns.wait_for_turn(self.source)
        self.began = time.perf_counter()

    async def __aexit__(self, *exc_info: object) -> None:
        self.turns.spent(time.perf_counter() - self.began)


class _RoundStart(trio.abc.Instrument):
    """Tells `turns` when a scheduler round begins (after each I/O wait: once per round)."""

    def __init__(self, turns: HandshakeTurns) -> None:
        self.turns = turns

    def after_io_wait(self, timeout: float) -> None:
        self.turns.new_round()


def _grant(queues: dict[str, collections.deque[trio.Event]], most: int) -> int:
    """Up to `most` turns, one per source in round-robin order; how many were granted."""
    granted = _round_robin(queues, most)
    for event in granted:
        event.set()
    return len(granted)


def _round_robin(queues: dict[str, collections.deque[T]], most: int) -> list[T]:
    """Up to `most` items off the fronts of `queues`, one per source in turn; a source whose
    queue is left non-empty goes to the back, an emptied one is removed."""
    taken: list[T] = []
    while queues and len(taken) < most:
        source = next(iter(queues))
        queue = queues.pop(source)
        taken.append(queue.popleft())
        if queue:
            queues[source] = queue  # to the back of the round
    return taken


def _forget(
    queues: dict[str, collections.deque[trio.Event]], source: str, granted: trio.Event
) -> None:
    queue = queues.get(source)
    if queue is not None and granted in queue:
        queue.remove(granted)
        if not queue:
            del queues[source]
