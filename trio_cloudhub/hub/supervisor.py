"""`serve --workers N`: the parent process of N hub workers on the same ports.

The supervisor starts worker 0 (it prepares the certificates and, on the embedded store,
syncs the manifests folder into SQLite: the other workers load what it wrote), then the
others; each worker binds the WebSocket and HTTPS ports with SO_REUSEPORT, so the kernel
spreads the edges over them. The supervisor

- grants nodes (`hub.claims`), at most `nodeLimit` in all workers together: a worker
  claims a node before its session starts; a node held by another worker is released there
  first (that session ends as "replaced by a new connection", the worker writes its ack
  points, answers), at most `release_timeout` seconds (then the claim is granted anyway,
  with a warning). A worker's death frees its nodes;
- says when every worker is ready (each worker's `/readyz` answers ok only then);
- passes "objects changed" from the embedded store's leader (worker 0) to the others;
- restarts a worker that exits (after `restart_delay`); one that fails before it was ever
  ready stops the hub (a configuration that cannot start);
- on SIGTERM/SIGINT sends SIGTERM to every worker (each drains as one hub would) and
  returns when all have exited;
- answers the metrics port itself: every worker's series with a `worker` label.
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import trio

from trio_cloudhub.hub.claims import LineReader, encode
from trio_cloudhub.metrics_merge import merge_expositions

log = logging.getLogger("trio_cloudhub.workers")
RELEASE_TIMEOUT = 5.0
RESTART_DELAY = 1.0
SCRAPE_TIMEOUT = 5.0
MAX_SCRAPE_BYTES = 64 * 1024 * 1024
SCRAPE_REQUEST = b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"

WorkerCommand = Callable[[int, int, dict[str, int]], Sequence[str]]
"""The command line of worker `index` whose supervisor link is file descriptor `fd`, to
listen on `ports` (worker 0's, once known: a port 0 in the configuration is picked once)."""


class WorkerFailed(Exception):
    """A worker exited before it was ever ready: the hub cannot start."""


@attrs.define(eq=False)
class _Lifetime:
    """One run of one worker process."""

    index: int
    process: trio.Process
    stream: trio.SocketStream
    send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    ports: dict[str, int] | None = None  # set when it said it is ready
    releases: dict[int, trio.Event] = attrs.field(factory=dict)
    alive: bool = True


class Supervisor:
    def __init__(
        self,
        command: WorkerCommand,
        count: int,
        *,
        release_timeout: float = RELEASE_TIMEOUT,
        restart_delay: float = RESTART_DELAY,
        node_limit: int = 0,
    ) -> None:
        self._command = command
        self.node_limit = node_limit  # sessions in all workers together; 0: no limit
        self.count = count
        self.release_timeout = release_timeout
        self.restart_delay = restart_delay
        self.workers: list[_Lifetime | None] = [None] * count
        self.owners: dict[str, tuple[_Lifetime, int]] = {}  # node -> holder, grant id
        self._locks: dict[str, list[Any]] = {}  # node -> [lock, users]
        self._ids = itertools.count(1)
        self._all_ready = False
        self._ready_changed = trio.Event()
        self.stopping = False
        self.ports: dict[str, int] = {}  # worker 0's first lifetime bound these
        self.restarts = 0
        self.forced_grants = 0  # a holder did not answer a release in time

    # --- lifetime ---------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the workers; `task_status.started(worker 0's ports)` once all are ready;
        return when all have exited after `stop()`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keep_worker, 0)
            await self._until(lambda: self._ready(0))
            for index in range(1, self.count):
                if not self.stopping:
                    nursery.start_soon(self._keep_worker, index)
            await self._until(lambda: self._all_ready)
            if self.stopping:
                task_status.started({})  # stopped while starting
                return
            first = self.workers[0]
            task_status.started(dict(first.ports or {}) if first is not None else {})

    def stop(self) -> None:
        """SIGTERM every worker; `run` returns once they have exited."""
        self.stopping = True
        self._ready_changed.set()
        for life in self.workers:
            if life is not None and life.alive:
                with suppress(ProcessLookupError, OSError):
                    life.process.send_signal(signal.SIGTERM)

    def _stopped(self) -> bool:
        return self.stopping

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition() and not self.stopping:
            await self._ready_changed.wait()

    def _ready(self, index: int) -> bool:
        life = self.workers[index]
        return life is not None and life.alive and life.ports is not None

    async def _keep_worker(self, index: int) -> None:
        """Run worker `index`, again and again until the hub stops."""
        ever_ready = False
        while not self.stopping:
            life, code = await self._run_worker(index)
            ever_ready = ever_ready or life.ports is not None
            if self._stopped():
                return
            if not ever_ready:
                raise WorkerFailed(f"worker {index} exited with status {code} before it was ready")
            self.restarts += 1
            log.warning(
                "worker %d (pid %d) exited with status %s; restarting it",
                index,
                life.process.pid,
                code,
            )
            await trio.sleep(self.restart_delay)

    async def _run_worker(self, index: int) -> tuple[_Lifetime, int]:
        ours, theirs = socket.socketpair()
        try:
            command = list(self._command(index, theirs.fileno(), self.ports))
            process = await trio.lowlevel.open_process(command, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        life = _Lifetime(index, process, stream)
        self.workers[index] = life
        log.info("worker %d started (pid %d)", index, process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, life)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:  # cancelled (the hub failed): no orphan
                process.kill()
            self._lost(life)
            with trio.CancelScope(shield=True):
                await stream.aclose()
        return life, code

    def _lost(self, life: _Lifetime) -> None:
        life.alive = False
        for node, (holder, _) in list(self.owners.items()):
            if holder is life:
                del self.owners[node]
        for done in life.releases.values():
            done.set()
        self._readiness_changed()

    def _readiness_changed(self) -> None:
        self._ready_changed.set()
        self._ready_changed = trio.Event()
        ready = all(self._ready(index) for index in range(self.count))
        if ready != self._all_ready:
            self._all_ready = ready
            self._broadcast(None, "ready", ready)

    # --- the link ---------------------------------------------------------------------

    async def _read(self, life: _Lifetime) -> None:
        reader = LineReader(life.stream)
        while True:
            try:
                fields = await reader.next()
            except ValueError as exc:
                log.error("worker %d: bad message on its link: %s", life.index, exc)
                continue
            if fields is None:
                return
            try:
                self._handle(life, fields)
            except (IndexError, TypeError, ValueError) as exc:
                log.error("worker %d: bad message %r: %s", life.index, fields[:3], exc)

    def _handle(self, life: _Lifetime, fields: list[Any]) -> None:
        kind = fields[0]
        if kind == "claim":
            self._nursery.start_soon(self._grant, life, str(fields[1]), int(fields[2]))
        elif kind == "end":
            node, grant = str(fields[1]), int(fields[2])
            if self.owners.get(node) == (life, grant):
                del self.owners[node]
        elif kind == "released":
            done = life.releases.pop(int(fields[1]), None)
            if done is not None:
                done.set()
        elif kind == "ready":
            life.ports = {str(key): int(value) for key, value in dict(fields[1]).items()}
            if not self.ports:
                self.ports = dict(life.ports)
            log.info("worker %d ready (pid %d)", life.index, life.process.pid)
            self._readiness_changed()
            if self._all_ready:
                self._send_soon(life, "ready", True)  # it may have missed the broadcast
        elif kind == "objects":
            self._broadcast(life, "objects")
        else:
            log.warning("worker %d: unknown message %r", life.index, kind)

    async def _grant(self, life: _Lifetime, node: str, grant: int) -> None:
        async with self._node_lock(node):
            holder = self.owners.get(node)
            if holder is None and self.node_limit and len(self.owners) >= self.node_limit:
                reason = f"node limit: {self.node_limit} nodes connected"
                await self._send(life, "refused", node, grant, reason)
                return
            if holder is not None and holder[0] is not life and holder[0].alive:
                await self._release(holder[0], node, life.index)
            if not life.alive:
                return
            self.owners[node] = (life, grant)
            await self._send(life, "granted", node, grant)

    async def _release(self, holder: _Lifetime, node: str, claimant: int) -> None:
        request = next(self._ids)
        done = holder.releases[request] = trio.Event()
        await self._send(holder, "release", node, request)
        with trio.move_on_after(self.release_timeout) as waited:
            await done.wait()
        holder.releases.pop(request, None)
        if waited.cancelled_caught:
            self.forced_grants += 1
            log.warning(
                "worker %d did not release node %s within %g s; granted to worker %d anyway",
                holder.index,
                node,
                self.release_timeout,
                claimant,
            )

    @asynccontextmanager
    async def _node_lock(self, node: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(node, [trio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[node]

    def _broadcast(self, source: _Lifetime | None, *fields: Any) -> None:
        for life in self.workers:
            if life is not None and life is not source and life.alive:
                self._send_soon(life, *fields)

    def _send_soon(self, life: _Lifetime, *fields: Any) -> None:
        self._nursery.start_soon(self._send, life, *fields)

    async def _send(self, life: _Lifetime, *fields: Any) -> None:
        if not life.alive:
            return
        async with life.send_lock:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await life.stream.send_all(encode(*fields))

    # --- metrics ----------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """Every ready worker's `/metrics`, each series labelled with its worker."""
        texts: dict[str, str] = {}

        async def scrape(life: _Lifetime) -> None:
            port = (life.ports or {}).get("metrics", 0)
            if port:
                with trio.move_on_after(SCRAPE_TIMEOUT):
                    with suppress(OSError, trio.BrokenResourceError, ValueError):
                        texts[str(life.index)] = await _get_metrics(port)

        async with trio.open_nursery() as nursery:
            for life in self.workers:
                if life is not None and life.alive:
                    nursery.start_soon(scrape, life)
        own = (
            "# HELP trio_cloudhub_workers Worker processes running and ready.\n"
            "# TYPE trio_cloudhub_workers gauge\n"
            f"trio_cloudhub_workers {sum(self._ready(i) for i in range(self.count))}\n"
            "# HELP trio_cloudhub_worker_restarts_total Workers restarted after they exited.\n"
            "# TYPE trio_cloudhub_worker_restarts_total counter\n"
            f"trio_cloudhub_worker_restarts_total {self.restarts}\n"
        )
        merged = merge_expositions([texts[key] for key in sorted(texts)], sorted(texts))
        return (own + merged).encode()


async def _get_metrics(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(SCRAPE_REQUEST)
        chunks = bytearray()
        while data := await stream.receive_some(65536):
            chunks += data
            if len(chunks) > MAX_SCRAPE_BYTES:
                raise ValueError("metrics answer too large")
    head, _, body = bytes(chunks).partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        raise ValueError(f"metrics answer: {head[:40]!r}")
    return body.decode("utf-8", "replace")
