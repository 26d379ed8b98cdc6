"""One session per node across the processes of `serve --workers N` (the worker's side).

A worker that accepted an edge claims its node from the supervisor before the session
starts; the supervisor asks the worker that holds the node to release it first (that worker
ends the session as "replaced by a new connection" and makes its ack points durable), then
grants. A session's end gives the node back. In one process (`SoleProcess`) every claim is
granted at once and the hub's own registry replaces an older session, as before.

The link to the supervisor is one socket (a socketpair the worker inherits) carrying JSON
lines (`wire`); see `hub.supervisor` for the other end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from trio_cloudhub.hub.hub import Hub

log = logging.getLogger("trio_cloudhub.workers")
MAX_LINE = 64 * 1024  # a line names a node and a few numbers
SESSION_END_TIMEOUT = 4.0  # a released session's end; the supervisor waits 5 s in all


class ClaimRefused(Exception):
    """The hub may not serve the node now (its node limit); the text says why."""


class Claims(Protocol):
    async def claim(self, node_id: str) -> int:
        """Until this process may serve `node_id`; the grant's id. ClaimRefused when the
        hub as a whole may not serve it."""

    def holds(self, node_id: str, grant: int) -> bool:
        """Whether `grant` still stands (a later claim elsewhere may have taken it back)."""

    def ended(self, node_id: str, grant: int) -> None:
        """The session of `grant` ended: the node is free."""


class SoleProcess:
    """One process serves every edge: nothing to ask anybody."""

    async def claim(self, node_id: str) -> int:
        return 0

    def holds(self, node_id: str, grant: int) -> bool:
        return True

    def ended(self, node_id: str, grant: int) -> None:
        pass


def encode(*fields: Any) -> bytes:
    return json.dumps(list(fields), separators=(",", ":")).encode() + b"\n"


class LineReader:
    """JSON lines from a stream, each at most MAX_LINE bytes; None at the end of the stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> list[Any] | None:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                fields = json.loads(line)
                if not isinstance(fields, list) or not fields:
                    raise ValueError(f"not a message: {line[:80]!r}")
                return fields
            if len(self._buffer) > MAX_LINE:
                raise ValueError("a line longer than 64 KiB")
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self._buffer += data


class WorkerLink:
    """A worker's `Claims`, readiness and object-change notices, over the supervisor link."""

    def __init__(self, index: int, stream: trio.SocketStream) -> None:
        self.index = index
        self._stream = stream
        self._reader = LineReader(stream)
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.Event] = {}
        self._abandoned: set[int] = set()  # claims whose connection went before the grant
        self._granted: dict[str, int] = {}  # node -> grant id
        self._releases: dict[str, int] = {}  # node -> releases asked of this worker
        self._refused: dict[int, str] = {}  # claim -> why the supervisor refused it
        self._nursery: trio.Nursery | None = None
        self.all_ready = False  # every worker of the hub is ready (the supervisor says)
        self.hub: Hub | None = None
        # Set by the server: make this process's ack points durable (before a release), load
        # a node's ack points written by another worker (after a grant), objects changed.
        self.flush: Callable[[], Awaitable[None]] = _nothing
        self.reload_node: Callable[[str], Awaitable[None]] = _nothing_for
        self.on_objects: Callable[[], None] = lambda: None

    # --- Claims ---------------------------------------------------------------------------

    async def claim(self, node_id: str) -> int:
        grant = next(self._ids)
        # Held here all along (a reconnect to the same worker): its ack points are ours.
        kept = node_id in self._granted, self._releases.get(node_id, 0)
        done = self._waiting[grant] = trio.Event()
        try:
            await self._send("claim", node_id, grant)
            await done.wait()
        except BaseException:
            if not done.is_set():
                self._abandoned.add(grant)
            elif self._granted.get(node_id) == grant:
                self.ended(node_id, grant)
            raise
        finally:
            self._waiting.pop(grant, None)
        refusal = self._refused.pop(grant, None)
        if refusal is not None:
            raise ClaimRefused(refusal)
        if kept != (True, self._releases.get(node_id, 0)):
            try:
                await self.reload_node(node_id)
            except BaseException:
                self.ended(node_id, grant)  # no session will end it
                raise
        return grant

    def holds(self, node_id: str, grant: int) -> bool:
        return self._granted.get(node_id) == grant

    def ended(self, node_id: str, grant: int) -> None:
        if self._granted.get(node_id) != grant:
            return  # released to another worker already
        del self._granted[node_id]
        self._send_soon("end", node_id, grant)

    # --- the rest ------------------------------------------------------------------------

    def objects_written(self) -> None:
        """The leader's store committed new objects: the other workers reload them."""
        self._send_soon("objects")

    async def ready(self, ports: dict[str, int]) -> None:
        await self._send("ready", ports)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the supervisor's messages until it goes (then this worker stops too)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                fields = await self._reader.next()
                if fields is None:
                    raise SupervisorGone("the supervisor closed the link: stopping")
                self._handle(nursery, fields)

    def _handle(self, nursery: trio.Nursery, fields: list[Any]) -> None:
        kind = fields[0]
        if kind == "granted":
            node_id, grant = str(fields[1]), int(fields[2])
            if grant in self._abandoned:
                self._abandoned.discard(grant)
                self._send_soon("end", node_id, grant)
                return
            self._granted[node_id] = grant
            waiter = self._waiting.get(grant)
            if waiter is not None:
                waiter.set()
        elif kind == "refused":
            grant = int(fields[2])
            if grant in self._abandoned:
                self._abandoned.discard(grant)
                return
            self._refused[grant] = str(fields[3])
            waiter = self._waiting.get(grant)
            if waiter is not None:
                waiter.set()
        elif kind == "release":
            nursery.start_soon(self._release, str(fields[1]), int(fields[2]))
        elif kind == "ready":
            self.all_ready = bool(fields[1])
        elif kind == "objects":
            self.on_objects()
        else:
            log.warning("unknown message from the supervisor: %r", kind)

    async def _release(self, node_id: str, request: int) -> None:
        """End the node's session here, make its ack points durable, then say so."""
        self._granted.pop(node_id, None)
        self._releases[node_id] = self._releases.get(node_id, 0) + 1
        session = self.hub.sessions.get(node_id) if self.hub is not None else None
        if session is not None:
            session.end("replaced by a new connection")
            with trio.move_on_after(SESSION_END_TIMEOUT):
                await session.finished.wait()
        await self.flush()
        await self._send("released", request)

    def _send_soon(self, *fields: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send_quietly, *fields)

    async def _send_quietly(self, *fields: Any) -> None:
        # The supervisor gone: `run` ends this worker.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send(*fields)

    async def _send(self, *fields: Any) -> None:
        async with self._send_lock:
            await self._stream.send_all(encode(*fields))


class SupervisorGone(Exception):
    """The supervisor's end of the link closed: the worker must not serve on alone."""


async def _nothing() -> None:
    pass


async def _nothing_for(node_id: str) -> None:
    pass
