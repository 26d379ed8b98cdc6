"""The hub: node registry, downstream routing into node queues, upstream dispatch to the store.

Downstream, the store calls `route_downstream` synchronously for each message, which puts it
in its node's queue (no shared FIFO in front of the per-node queues: a node that receives a
burst or reconnects in a loop holds up only itself). Every `reconcile_interval`, and when a
node connects, the node's ack points are compared with the desired state and what it missed
is queued again (`reconcile_node`). Upstream, sessions hand queries and reports to the
`UpstreamDispatcher`: a bounded queue per node, served in turn.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from trio_cloudhub.config import Config
from trio_cloudhub.core.admission import admission_problem
from trio_cloudhub.core.codec import FrameEncoder
from trio_cloudhub.core.limits import EveryPeriod
from trio_cloudhub.core.message import (
    VOLUME_OPERATIONS,
    Message,
    new_msg_id,
    node_id_of,
    object_uid,
    response_to,
)
from trio_cloudhub.core.rules import Downstream, Upstream, classify_downstream
from trio_cloudhub.edge.base import EdgeConnection
from trio_cloudhub.edge.poller import make_poller
from trio_cloudhub.hub.claims import ClaimRefused, Claims, SoleProcess
from trio_cloudhub.hub.node import NodeEntry, wall_ms
from trio_cloudhub.hub.session import NodeSession
from trio_cloudhub.hub.timers import Timers
from trio_cloudhub.hub.trim import BURST_QUIET, TRIM_AFTER_CHURN, TRIM_ANYWAY, release_free_memory
from trio_cloudhub.hub.upstream import UpstreamDispatcher, UpstreamWork
from trio_cloudhub.metrics import Metrics
from trio_cloudhub.pki.identity import certificate_node, connection_identity_problem
from trio_cloudhub.store.base import CloudStore, SessionEvent, StoreError
from trio_cloudhub.uds import UdsRequestError

log = logging.getLogger("trio_cloudhub.hub")
CLOSE_GRACE = 2.0  # drain: time for ended sessions to send their close frames


class VolumeRequestError(UdsRequestError):
    """A volume request the hub cannot send: no node named, not a volume operation, the
    node not connected, the hub draining, or a request with the same id already waiting."""


@attrs.define
class _VolumeWaiter:
    """A volume request waiting for its node's answer (the `parent_msg_id` of the answer)."""

    node_id: str
    done: trio.Event = attrs.field(factory=trio.Event)
    answer: Message | None = None
    lost: str = ""  # why no answer can come (the node's session ended)


@attrs.frozen
class HubSettings:
    keepalive_interval: float = 30.0
    node_limit: int = 1000
    write_timeout: float = 30.0
    ack_timeout: float = 5.0
    ack_max_sends: int = 5
    max_message_size: int = 64 * 1024 * 1024
    drain_timeout: float = 5.0
    reconcile_interval: float = 5.0
    # modules.cloudHub.authorization: check identities and status ownership; with `debug`
    # (KubeEdge's default once enabled) failures are only logged.
    authorization: bool = False
    authorization_debug: bool = True
    # Keep a node's queue while it has no session (one hub: changes wait for it). With
    # several hubs a node may be served by another one, so a hub keeps queues only for its
    # sessions and a node that connects is brought up to date by reconciliation.
    queue_while_away: bool = True
    # Per-session upstream limits (0: off) and the period of warnings about bad actors.
    upstream_qps: float = 300.0
    upstream_burst: int = 600
    upstream_bytes_per_second: float = 8.0 * 1024 * 1024
    upstream_bytes_burst: int = 64 * 1024 * 1024
    warning_period: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> HubSettings:
        hub = config.cloud_hub
        extra = config.trio_cloud_hub
        return cls(
            keepalive_interval=float(hub.keepalive_interval),
            node_limit=hub.node_limit,
            write_timeout=float(hub.write_timeout),
            ack_timeout=extra.ack_timeout_seconds,
            ack_max_sends=extra.ack_max_sends,
            max_message_size=extra.max_message_size,
            drain_timeout=extra.drain_timeout_seconds,
            reconcile_interval=extra.reconcile_interval_seconds,
            authorization=hub.authorization.enable,
            authorization_debug=hub.authorization.debug,
            queue_while_away=config.store_kind == "local",
            upstream_qps=extra.upstream_qps,
            upstream_burst=extra.upstream_burst,
            upstream_bytes_per_second=extra.upstream_bytes_per_second,
            upstream_bytes_burst=extra.upstream_bytes_burst,
            warning_period=extra.warning_period_seconds,
        )


class Hub:
    def __init__(
        self,
        settings: HubSettings,
        store: CloudStore,
        *,
        metrics: Metrics | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.settings = settings
        # One session per node across the processes of `serve --workers N` (hub.claims).
        self.claims: Claims = claims if claims is not None else SoleProcess()
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch_hub(self)
        self.nodes: dict[str, NodeEntry] = {}
        self.sessions: dict[str, NodeSession] = {}
        self.draining = False
        self.stats: Counter[str] = Counter()  # events worth counting, e.g. refused:node-limit
        self._open_connections = 0
        self._no_connections = trio.Event()  # set (then replaced) when the count drops to 0
        self._session_added = trio.Event()
        self._churn = 0  # sessions and connections started or ended since the last heap trim
        self.timers = Timers()  # keepalive checks, ACK timeouts, back-off: run_timers()
        self.poller = make_poller()  # reads the sessions' idle connections: run_timers()
        self.frames = FrameEncoder()  # a change's content encoded once for all its nodes
        self.upstream = UpstreamDispatcher(self._handle_upstream)
        self._volume_waiters: dict[str, _VolumeWaiter] = {}  # request msg_id -> waiter
        self._warnings = EveryPeriod(settings.warning_period)

    @staticmethod
    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    def entry(self, node_id: str) -> NodeEntry:
        entry = self.nodes.get(node_id)
        if entry is None:
            entry = self.nodes[node_id] = NodeEntry(node_id)
        return entry

    # --- downstream -------------------------------------------------------------------

    def route_downstream(self, message: Message) -> None:
        kind = classify_downstream(message)
        node_id = node_id_of(message.resource)
        if kind is Downstream.DROP:
            log.debug("dropped downstream %s %s", message.operation, message.resource)
        elif kind is Downstream.NODE_STOP:
            self.remove_node(node_id)
        elif kind is Downstream.ACK:
            if not self.settings.queue_while_away and node_id not in self.sessions:
                self.stats["dropped:away"] += 1  # reconciliation delivers it on connect
                return
            entry = self.entry(node_id)
            acked = self.store.acked_version(node_id, object_uid(message.content))
            if entry.queue.offer(message, acked):
                entry.notify_ack_work()
        elif node_id in self.sessions:
            entry = self.entry(node_id)
            entry.queue.offer_no_ack(message)
            entry.notify_no_ack_work()
        else:
            log.debug("node %s not connected: dropped no-ACK %s", node_id, message.resource)

    def reconcile_node(self, node_id: str) -> int:
        """Queue what `node_id` missed according to its ack points; returns how many."""
        entry = self.entry(node_id)
        stamp = self.store.change_stamp(node_id)
        if entry.complete_at == stamp:
            return 0  # complete when last compared, and nothing changed since
        missed_list = self.store.missed(node_id)
        if not missed_list:
            entry.complete_at = stamp
        queued = 0
        for missed in missed_list:
            if entry.queue.covers(missed.uid, missed.resource_version, missed.delete):
                continue
            acked = self.store.acked_version(node_id, missed.uid)
            if entry.queue.offer(missed.build(), acked):
                queued += 1
        if queued:
            entry.notify_ack_work()
            self.stats["reconciled"] += queued
            log.info("node %s: reconciliation queued %d missed change(s)", node_id, queued)
        return queued

    async def run_timers(self) -> None:
        """The sessions' deadlines (see `hub.timers`) and the poller that reads their idle
        connections (`edge.poller`); runs beside the sessions."""
        poller = self.poller
        if poller is None:
            await self.timers.run()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.timers.run)
            nursery.start_soon(poller.run)

    async def reconcile_forever(self) -> None:
        """Every `reconcile_interval` seconds, reconcile each connected node (asleep while
        no node is connected)."""
        interval = self.settings.reconcile_interval
        if interval <= 0:
            return
        while True:
            if not self.sessions:
                self._session_added = trio.Event()
                await self._session_added.wait()
            await trio.sleep(interval)
            for count, node_id in enumerate(list(self.sessions), start=1):
                self.reconcile_node(node_id)
                if count % 64 == 0:
                    await trio.lowlevel.checkpoint()

    def handshake_failed(self, transport: str, reason: str) -> None:
        """A connection ended before it became a session (a flood's, or a failed handshake):
        counted in the metrics, and as churn for the heap trim."""
        self.metrics.count_handshake(transport, reason)
        self._note_churn()

    def connection_ended(self) -> None:
        """A connection of the HTTPS port closed: churn for the heap trim."""
        self._note_churn()

    def _note_churn(self) -> None:
        """A session or a connection started or ended; after many, once they stop coming for
        a moment (`BURST_QUIET`), what their handshakes freed goes back to the system
        (`hub.trim`): without it, a flood of 45,000 connections in 30 s left the hub's RSS
        at its peak (204 MiB, from 54) after the flood; with it, 75 MiB."""
        self._churn += 1
        if self._churn == TRIM_AFTER_CHURN:  # one check chain at a time
            self.timers.at(trio.current_time() + BURST_QUIET, self._trim_check(TRIM_AFTER_CHURN))

    def _trim_check(self, seen: int) -> Callable[[float], None]:
        def check(now: float) -> None:
            churn = self._churn
            if churn != seen and churn < TRIM_ANYWAY:  # the burst goes on
                self.timers.at(now + BURST_QUIET, self._trim_check(churn))
                return
            self._churn = 0
            release_free_memory()

        return check

    def remove_node(self, node_id: str) -> None:
        """The node left the desired state: end its session, drop its queue (logged once)."""
        session = self.sessions.pop(node_id, None)
        if session is not None:
            session.end("node removed")
        if self.nodes.pop(node_id, None) is not None or session is not None:
            log.info("node %s removed from the desired state; its queue was dropped", node_id)

    # --- volume requests (CSI driver over the UDS server, spec 8) -----------------------

    async def request_volume(self, message: Message) -> Message:
        """Send a CSI volume request to its node; return the node's answer.

        `message` is the CSI driver's request: a volume operation (createvolume, deletevolume,
        controllerpublishvolume, controllerunpublishvolume) on `node/<id>/<ns>/volume/<id>`.
        It goes down once, without ACK, as KubeEdge sends it; the answer is the node's
        message on `<ns>/volume/<id>` whose `parent_msg_id` is the request's id (a request
        without an id gets one). KubeEdge drops no-ACK messages for a node that is not
        connected, so that fails at once with `VolumeRequestError` instead of waiting.

        Waits for the answer without a bound of its own: the caller sets one with
        `trio.fail_after` (KubeEdge waits one minute). The waiter is removed however this
        ends, cancellation included.
        """
        node_id = node_id_of(message.resource)
        if not node_id:
            raise VolumeRequestError(f"resource {message.resource!r} names no node")
        if message.operation not in VOLUME_OPERATIONS:
            raise VolumeRequestError(f"{message.operation!r} is not a volume operation")
        if classify_downstream(message) is not Downstream.NO_ACK:
            raise VolumeRequestError(f"{message.resource!r} is not delivered to the edge")
        if self.draining:
            raise VolumeRequestError("hub shutting down")
        if node_id not in self.sessions:
            raise VolumeRequestError(f"node {node_id} is not connected")
        if not message.msg_id:
            header = attrs.evolve(message.header, msg_id=new_msg_id())
            message = attrs.evolve(message, header=header)
        msg_id = message.msg_id
        if msg_id in self._volume_waiters:
            raise VolumeRequestError(f"a request with msg_id {msg_id} is already waiting")
        waiter = self._volume_waiters[msg_id] = _VolumeWaiter(node_id)
        try:
            self.route_downstream(message)
            await waiter.done.wait()
            if waiter.answer is None:
                raise VolumeRequestError(f"node {node_id} {waiter.lost} before answering")
            return waiter.answer
        finally:
            if self._volume_waiters.get(msg_id) is waiter:
                del self._volume_waiters[msg_id]

    def _abandon_volume_requests(self, node_id: str, reason: str) -> None:
        """The node's session ended: its pending volume requests get no answer now (the
        request went with the connection), so they fail at once instead of timing out."""
        for waiter in self._volume_waiters.values():
            if waiter.node_id == node_id and waiter.answer is None and not waiter.done.is_set():
                waiter.lost = reason
                waiter.done.set()

    def answer_volume(self, node_id: str, message: Message) -> None:
        """An edge's `<ns>/volume/<id>` message: complete the request it answers, if any."""
        parent = message.header.parent_msg_id
        waiter = self._volume_waiters.get(parent) if parent else None
        if waiter is None or waiter.answer is not None:
            log.debug(
                "node %s: volume %s %s answers no waiting request (parent %r); dropped",
                node_id,
                message.operation,
                message.resource,
                parent,
            )
            return
        if waiter.node_id != node_id:
            log.warning(
                "node %s answered a volume request sent to node %s; dropped",
                node_id,
                waiter.node_id,
            )
            return
        waiter.answer = message
        waiter.done.set()

    # --- sessions ---------------------------------------------------------------------

    async def handle_connection(self, conn: EdgeConnection, transport: str = "memory") -> None:
        """Run one edge connection as the node's session; refuse it if it may not have one.

        `transport` names the edge skin (websocket, quic) in the metrics. One coroutine
        lives as long as the session (admission and bookkeeping are done by helpers that
        return): a frame per idle edge less.
        """
        self._open_connections += 1
        connections = self.metrics.connections(transport)
        connections.inc()
        try:
            grant = await self._admit(conn, transport)
            if grant is None:
                return
            session = self._start_session(conn, transport)
            try:
                await session.run()
            except Exception:
                log.exception("node %s: session failed", conn.node_id)
                session.end("internal error")
            finally:
                self._end_session(session, grant, transport)
            await conn.aclose(session.end_reason)
        finally:
            connections.dec()
            self._open_connections -= 1
            if not self._open_connections:
                self._no_connections.set()
                self._no_connections = trio.Event()

    async def _admit(self, conn: EdgeConnection, transport: str) -> int | None:
        """The node's claim (grant) if the connection gets a session, else None (closed)."""
        node_id = conn.node_id
        code, refusal = self._refusal(node_id)
        if not refusal:
            try:
                grant = await self.claims.claim(node_id)
            except ClaimRefused as exc:  # the hub-wide node limit of `serve --workers N`
                code, refusal = "node-limit", str(exc)
        if refusal:
            self.stats[f"refused:{refusal.split(':')[0]}"] += 1
            self.metrics.count_handshake(transport, f"refused:{code}")
            # Refusals while draining are expected (edges reconnect at once): not a warning.
            level = logging.INFO if self.draining else logging.WARNING
            fields = {"node": node_id, "transport": transport, "remote": conn.remote}
            log.log(
                level,
                "refused node %s from %s: %s",
                node_id,
                conn.remote,
                refusal,
                extra={**fields, "reason": refusal},
            )
            await conn.aclose(refusal)
            return None
        if not self.claims.holds(node_id, grant) or self.draining:
            # Another worker took the node meanwhile (its edge connected again), or a drain.
            reason = "hub shutting down" if self.draining else "replaced by a new connection"
            self.claims.ended(node_id, grant)
            await conn.aclose(reason)
            return None
        return grant

    def _start_session(self, conn: EdgeConnection, transport: str) -> NodeSession:
        node_id = conn.node_id
        self.metrics.count_handshake(transport, "accepted")
        session = NodeSession(self, self.entry(node_id), conn, transport)
        previous = self.sessions.get(node_id)
        if previous is not None:
            previous.end("replaced by a new connection")
            self.store.record_connection(node_id, _ended(previous))
        self.sessions[node_id] = session
        self._session_added.set()
        self._note_churn()
        self.store.record_connection(
            node_id,
            SessionEvent(session.connected_ms, True, transport, conn.remote, conn.project_id),
        )
        log.info(
            "node %s connected from %s (project %s)",
            node_id,
            conn.remote,
            conn.project_id,
            extra={"node": node_id, "transport": transport, "remote": conn.remote},
        )
        self.reconcile_node(node_id)
        return session

    def _end_session(self, session: NodeSession, grant: int, transport: str) -> None:
        node_id, conn = session.node_id, session.conn
        if self.sessions.get(node_id) is session:
            del self.sessions[node_id]
            self._note_churn()
            self.store.record_connection(node_id, _ended(session))
            self._abandon_volume_requests(node_id, "disconnected")
            if not self.settings.queue_while_away:
                self.nodes.pop(node_id, None)
            self.claims.ended(node_id, grant)
        session.finished.set()
        reason = session.end_reason or "closed"
        fields = {"node": node_id, "transport": transport, "remote": conn.remote}
        log.info("node %s disconnected: %s", node_id, reason, extra={**fields, "reason": reason})

    def _refusal(self, node_id: str) -> tuple[str, str]:
        """Why a new connection of `node_id` gets no session, as (metric label, text for the
        edge and the log); ("", "") = it gets one.

        A reconnect replaces the node's session, so it never counts against the limit twice.
        """
        if self.draining:
            return "shutting-down", "hub shutting down"
        limit = self.settings.node_limit
        if node_id not in self.sessions and len(self.sessions) >= limit:
            return "node-limit", f"node limit: {limit} nodes connected"
        return "", ""

    async def drain(self) -> None:
        """Refuse new sessions, let in-flight ACK waits finish (bounded), then end sessions."""
        self.draining = True
        with trio.move_on_after(self.settings.drain_timeout):
            for session in list(self.sessions.values()):
                await session.wait_settled()
        for session in list(self.sessions.values()):
            session.end("hub shutting down")
        with trio.move_on_after(CLOSE_GRACE):
            while self._open_connections:
                await self._no_connections.wait()

    # --- bad actors -------------------------------------------------------------------

    def note_limited(self, node_id: str, kind: str, detail: str) -> None:
        """An edge hit a bound (`kind`: upstream-rate, upstream-bytes, no-ack,
        foreign-identity): counted every time, logged once per period per node and kind."""
        self.metrics.count_limited(kind)
        held = self._warnings.due((node_id, kind), trio.current_time())
        if held is None:
            return
        more = f" ({held} more since the last such line)" if held else ""
        log.warning(
            "node %s: %s%s",
            node_id,
            detail,
            more,
            extra={"node": node_id, "reason": kind},
        )

    # --- identity (modules.cloudHub.authorization, spec 9.1) -------------------------

    def authenticate(self, node_id: str, peer_cert_der: bytes | None) -> str | None:
        """The transport's handshake check: None to accept, else why it is refused.

        With authorization off (KubeEdge's default) any fleet certificate may speak for any
        node, as in KubeEdge; a per-node certificate (CN system:node:X) used for another node
        is accepted but counted (`foreign-identity`) and warned about once per period.
        """
        if not self.settings.authorization:
            owner = certificate_node(peer_cert_der)
            if owner is not None and owner != node_id:
                self.note_limited(
                    node_id,
                    "foreign-identity",
                    f"connected with the certificate of node {owner!r} (accepted: "
                    "authorization is off)",
                )
            return None
        problem = connection_identity_problem(node_id, peer_cert_der)
        if problem is None:
            return None
        if self.settings.authorization_debug:
            log.warning("node %s: %s (accepted: authorization.debug is on)", node_id, problem)
            return None
        self.stats["refused:identity"] += 1
        return problem

    def admit(self, node_id: str, message: Message) -> bool:
        """Whether a message from the edge may act on the cloud side (status ownership)."""
        if not self.settings.authorization:
            return True
        problem = admission_problem(node_id, message, self.store.pod_node)
        if problem is None:
            return True
        if self.settings.authorization_debug:
            log.warning(
                "node %s: %s %s would be rejected: %s (authorization.debug is on)",
                node_id,
                message.operation,
                message.resource,
                problem,
            )
            return True
        self.stats["rejected:authorization"] += 1
        log.warning(
            "node %s: rejected %s %s: %s", node_id, message.operation, message.resource, problem
        )
        return False

    # --- upstream ---------------------------------------------------------------------

    async def submit_upstream(self, node_id: str, kind: Upstream, message: Message) -> None:
        if kind is Upstream.VOLUME:
            # A waiting request is completed at once: it never queues behind the store.
            self.answer_volume(node_id, message)
            return
        await self.upstream.submit(UpstreamWork(node_id, kind, message))

    async def dispatch_upstream(self) -> None:
        await self.upstream.run()

    async def _handle_upstream(self, work: UpstreamWork) -> None:
        try:
            reply = await self._answer_upstream(work)
        except StoreError as exc:
            log.warning("node %s: store failed on %s: %s", work.node_id, work.kind.name, exc)
            return
        except Exception:
            log.exception("node %s: %s message failed", work.node_id, work.kind.name)
            return
        if reply is not None:
            self.route_downstream(reply)

    async def _answer_upstream(self, work: UpstreamWork) -> Message | None:
        kind, message = work.kind, work.message
        if kind in (Upstream.APPLICATION, Upstream.QUERY):
            return await self.store.answer_query(work.node_id, message)
        if kind in (Upstream.REPORT, Upstream.OTHER):
            return await self.store.apply_report(work.node_id, message)
        if kind is Upstream.CA_QUERY:
            reply = response_to(message, self.store.api_server_ca(), self.now_ms())
            route = attrs.evolve(
                reply.route,
                source="cloudhub",
                group="resource",
                resource=f"node/{work.node_id}/{message.resource}",
            )
            return attrs.evolve(reply, route=route)
        if kind is Upstream.VOLUME:
            self.answer_volume(work.node_id, message)
        elif kind is Upstream.ERROR:
            log.warning("node %s reported an error: %r", work.node_id, message.content)
        else:
            log.debug("node %s: %s message not handled: %s", work.node_id, kind.name, message.route)
        return None


def _ended(session: NodeSession) -> SessionEvent:
    return SessionEvent(
        wall_ms(),
        False,
        reason=session.end_reason or "closed",
        last_keepalive_ms=session.last_keepalive_ms,
        last_ack_ms=session.last_ack_ms,
    )
