"""One connected edge: one task reads; a message is sent by whatever made it sendable.

Rules (spec 6.2, design 3):
- the session's task reads the connection and handles what arrives; sending is synchronous
  (`EdgeConnection.send_nowait`) and happens in the task that made a message sendable: the
  store routing a change, the reader handling the ACK of the message before it, the hub's
  timers (retransmission, back-off). No task waits for work, so an idle edge costs one task;
- on a WebSocket over our TLS (Linux), the task parks while the socket is empty and the
  hub's poller (`edge.poller`) reads for it: keepalives and ACKs in EdgeCore's shape are
  handled in the poller's task, a batch of connections per wake-up; any other frame, the
  upstream limits' waits and the connection's end wake the session's task, which handles
  them as it would have read them itself and parks again;
- no keepalive for `keepaliveInterval` seconds ends the session (a timer compares the time
  of the last keepalive; other messages do not count);
- ACK-mode messages go one at a time (stop-and-wait), the same frame re-sent every
  `ackTimeout` seconds up to `ackMaxSends` times, then handed back to the queue with back-off;
- the `ackTimeout` counts from when the edge's TCP has the whole copy (on a slow link, a
  frame still in transit at its deadline is not sent again behind itself);
- bytes the connection could not send at once are flushed by a helper task started for that.
  `writeTimeout` seconds without write progress, a frame that is not a message, or any
  transport error ends the session; the node's queue stays for its next session. Progress is
  the edge acknowledging bytes: a transport that can tell (WebSocket on Linux: the kernel's
  TCP_USER_TIMEOUT, `conn.stall_timeout`) ends the connection itself, so a slow link that
  still moves bytes keeps its session however long a flush takes; on other transports a
  flush is bounded by `writeTimeout`;
- upstream is bounded per session by token buckets (messages and bytes): over them, the
  reader waits and TCP holds what the edge sends; nothing is dropped.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING

import outcome
import trio

from trio_cloudhub.core import codec
from trio_cloudhub.core.delivery import Delivery, GiveUp, Send, WaitUntil
from trio_cloudhub.core.fast_upstream import fast_upstream
from trio_cloudhub.core.limits import TokenBucket
from trio_cloudhub.core.message import (
    OP_DELETE,
    OP_INSERT,
    OP_KEEPALIVE,
    OP_RESPONSE,
    Message,
    object_uid,
)
from trio_cloudhub.core.rules import Upstream, as_sent_to, classify_upstream, control_reply
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected, NeedsTask
from trio_cloudhub.edge.websocket import WebSocketConnection
from trio_cloudhub.hub.node import NodeEntry, NodeSessionHandle, wall_ms
from trio_cloudhub.store.reconcile import SENT_RV

if TYPE_CHECKING:
    from trio_cloudhub.hub.hub import Hub, HubSettings

log = logging.getLogger("trio_cloudhub.session")
IN_FLIGHT_POLL = 0.25  # how often a copy still in transit at its ACK deadline is looked at
# The longest a first send waits for its "0" marker to be durable: a store that cannot write
# (disk full, API down) delays first sends by this much, it does not stop them.
MARKER_WAIT = 2.0
# Frames a parked session handles per call of the poller's callback before the next
# connection's turn (the rest are read in the poller's next round).
DRAIN_FRAMES = 32
# What `_drain_fast` answers when it does not return a frame.
_DRAINED = object()  # the socket is empty: park
_AGAIN = object()  # DRAIN_FRAMES handled; more may be buffered
_ASYNC = object()  # the async `receive()` must take the next step


class SessionEnded(Exception):
    """Ends the session on purpose (bad frame); the reason is logged."""


class NodeSession(NodeSessionHandle):
    def __init__(
        self, hub: Hub, entry: NodeEntry, conn: EdgeConnection, transport: str = "memory"
    ) -> None:
        super().__init__(entry, conn.remote)
        self.hub = hub
        self.conn = conn
        self.node_id = entry.node_id
        self.transport = transport
        self._settings = hub.settings
        self.finished = trio.Event()  # the hub's bookkeeping of its end is done
        self._tracing = log.isEnabledFor(logging.DEBUG)  # -v=4: every message, by route
        self._delivery: Delivery | None = None
        self._frame = ""  # the in-flight message as sent (a retransmission sends it again)
        self._keepalive_deadline = math.inf
        self._retry_at = math.inf  # a back-off timer is set for this time
        self._nursery: trio.Nursery | None = None  # open while the session reads
        self._flushing = False
        self._in_transit_since = math.inf  # the in-flight copy was still on its way then
        self._buckets: list[tuple[str, TokenBucket, bool]] = []  # upstream limits
        self._parked_task: trio.lowlevel.Task | None = None  # asleep while the poller reads
        self._owed_wait = 0.0  # a frame handed over by the poller was over the limits
        # The bound on a flush, when the transport does not bound stalls itself.
        timeout = hub.settings.write_timeout
        self._write_timeout = timeout if timeout > 0 and not conn.stall_timeout else math.inf
        # Metric hooks, bound once: the hot path pays a call and an increment.
        metrics = hub.metrics
        self._count_sent = metrics.count_sent
        self._count_received = metrics.count_received
        self._count_retransmission = metrics.count_retransmission
        self._observe_ack_latency = metrics.observe_ack_latency
        # A send that awaits an ACK tells the poller not to linger (edge.poller).
        self._hurry = hub.poller.hurry if hub.poller is not None else _no_hurry

    async def run(self) -> None:
        timers = self.hub.timers
        self._keepalive_deadline = trio.current_time() + self._settings.keepalive_interval
        if self.end_reason:
            return  # ended before it ran
        try:
            # The nursery's scope is the session's (`end()` cancels it): one scope, not two.
            async with trio.open_nursery() as nursery:
                self.cancel_scope = nursery.cancel_scope
                self._nursery = nursery
                try:
                    self.entry.listener = self
                    timers.at(self._keepalive_deadline, self._check_keepalive)
                    self.kick()
                    self.send_no_ack()
                    await self._read_loop()
                finally:
                    self._nursery = None
                    if self.entry.listener is self:
                        self.entry.listener = None
                    nursery.cancel_scope.cancel()  # a flush still waiting is moot now
        except* (EdgeDisconnected, SessionEnded) as group:
            if not self.end_reason:
                self.end_reason = str(group.exceptions[0]) or "edge disconnected"
        self._delivery = None
        self._frame = ""
        self.release_in_flight()
        self.entry.queue.drop_no_ack()

    @property
    def _open(self) -> bool:
        return self._nursery is not None and not self.end_reason

    def _write(self, frame: str) -> bool:
        """Hand one frame to the connection; a helper flushes what the socket did not take.
        False when the session is over (never raises: any task may be the caller)."""
        if not self._open:
            return False
        try:
            if not self.conn.send_nowait(frame) and not self._flushing:
                self._flushing = True
                assert self._nursery is not None
                self._nursery.start_soon(self._flush)
        except EdgeDisconnected as exc:
            self.end(str(exc) or "edge disconnected")
            return False
        return True

    async def _flush(self) -> None:
        timeout = self._write_timeout
        with trio.move_on_after(timeout) as scope:
            try:
                await self.conn.flush()
            except EdgeDisconnected as exc:
                self.end(str(exc) or "edge disconnected")
                return
        if scope.cancelled_caught:
            self.end(f"write did not finish within {timeout:g} s")
            return
        self._flushing = False
        self.send_no_ack()  # what waited behind the full socket

    def _check_keepalive(self, now: float) -> None:
        if not self._open:
            return
        if now >= self._keepalive_deadline:
            self.end("keepalive timeout")
        else:
            self.hub.timers.at(self._keepalive_deadline, self._check_keepalive)

    # --- upstream ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        conn = self.conn
        parked = isinstance(conn, WebSocketConnection) and conn.parkable
        parked = parked and self.hub.poller is not None and not self._tracing
        receive = conn.receive
        max_size = self._settings.max_message_size
        self._buckets = _upstream_buckets(self._settings, trio.current_time())
        while True:
            if parked:
                frame = await self._next_parked()
            else:
                frame = await receive()
                await self._throttle(len(frame))
                if not self._tracing and self._take_fast(frame):
                    continue
            try:
                message = codec.decode(frame, max_size)
            except codec.CodecError as exc:
                raise SessionEnded(f"undecodable frame: {exc}") from None
            del frame  # an idle session holds no message while it waits for the next
            await self._handle(message)
            del message

    def _take_fast(self, frame: str | bytes) -> bool:
        """Handle EdgeCore's keepalives and ACKs without a JSON decode (core.fast_upstream);
        False for any other frame."""
        if not isinstance(frame, str) or len(frame) > self._settings.max_message_size:
            return False
        found = fast_upstream(frame)
        if found is None:
            return False
        kind, parent_msg_id = found
        if kind is Upstream.KEEPALIVE:
            self._count_received(OP_KEEPALIVE)
            self._on_keepalive()
        else:
            self._count_received(OP_RESPONSE)
            self._on_ack(parent_msg_id)
        return True

    # --- reading parked on the hub's poller (edge.poller) -----------------------------

    async def _next_parked(self) -> str | bytes:
        """The next frame the fast path does not handle, throttled. Fast frames are handled
        here while bytes are buffered, then by the poller's callback while the task sleeps."""
        while True:
            found = self._drain_fast()
            if found is _AGAIN:
                await trio.lowlevel.checkpoint()
                continue
            if found is _DRAINED:
                found = await self._park()
            if found is _ASYNC:
                frame = await self.conn.receive()
                await self._throttle(len(frame))
                if self._take_fast(frame):
                    continue
                return frame
            assert isinstance(found, (str, bytes))
            wait, self._owed_wait = self._owed_wait, 0.0
            if wait:
                await trio.sleep(wait)
                if self._take_fast(found):
                    continue
            return found

    def _drain_fast(self) -> object:
        """Handle what can be read now without waiting: _DRAINED once the socket is empty,
        _AGAIN after DRAIN_FRAMES frames, _ASYNC when `receive()` must go on, or a frame the
        fast path does not handle (or one over the upstream limits: `_owed_wait`)."""
        conn = self.conn
        assert isinstance(conn, WebSocketConnection)
        buckets = self._buckets
        for _ in range(DRAIN_FRAMES):
            try:
                frame = conn.receive_nowait()
            except NeedsTask:
                return _ASYNC
            if frame is None:
                return _DRAINED
            if buckets:
                wait = self._take_tokens(len(frame))
                if wait:
                    self._owed_wait = wait
                    return frame
            if not self._take_fast(frame):
                return frame
        return _AGAIN

    async def _park(self) -> object:
        """Sleep until the poller's callback hands over (what `_drain_fast` returned)."""
        conn = self.conn
        assert isinstance(conn, WebSocketConnection)
        assert self.hub.poller is not None
        self._parked_task = trio.lowlevel.current_task()
        conn.park(self.hub.poller, self._on_readable)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked_task = None
            conn.unpark()
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _on_readable(self) -> bool:
        """The poller's callback: True to be called again (more bytes are buffered)."""
        try:
            found = self._drain_fast()
        except Exception as exc:  # the task raises it, as it would have read it itself
            self._hand_over(outcome.Error(exc))
            return False
        if found is _DRAINED:
            return False
        if found is _AGAIN:
            return True
        self._hand_over(outcome.Value(found))
        return False

    def _hand_over(self, result: outcome.Outcome[object]) -> None:
        self._unpark_conn()
        task, self._parked_task = self._parked_task, None
        if task is not None:
            trio.lowlevel.reschedule(task, result)

    def _unpark_conn(self) -> None:
        conn = self.conn
        if isinstance(conn, WebSocketConnection):
            conn.unpark()

    def _take_tokens(self, size: int) -> float:
        """Spend from the upstream buckets; the seconds to wait before reading on."""
        now = trio.current_time()
        wait = 0.0
        for kind, bucket, by_bytes in self._buckets:
            needed = bucket.take(size if by_bytes else 1, now)
            if needed > 0:
                self.hub.note_limited(self.node_id, kind, f"sends faster than its {kind} limit")
                wait = max(wait, needed)
        return wait

    async def _throttle(self, size: int) -> None:
        """Wait while the edge is over its upstream limits (TCP holds what it sends)."""
        if self._buckets:
            wait = self._take_tokens(size)
            if wait:
                await trio.sleep(wait)

    async def _handle(self, message: Message) -> None:
        self._count_received(message.operation)
        if self._tracing:
            self._trace("received", message)
        kind = classify_upstream(message)
        if kind is Upstream.KEEPALIVE:
            self._on_keepalive()
        elif kind is Upstream.ACK:
            self._on_ack(message.header.parent_msg_id)
        elif kind is Upstream.CONTROL:
            reply = control_reply(message, self.hub.now_ms())
            if self._write(codec.encode(reply)):
                self._count_sent(reply.operation)
        elif kind is Upstream.EMPTY:
            pass
        elif self.hub.admit(self.node_id, message):
            await self.hub.submit_upstream(self.node_id, kind, message)

    def _on_keepalive(self) -> None:
        self._keepalive_deadline = trio.current_time() + self._settings.keepalive_interval
        self.last_keepalive_ms = wall_ms()

    def _trace(self, what: str, message: Message) -> None:
        """One DEBUG line per message: route and ids, never the content (secrets)."""
        log.debug(
            "%s %s %s",
            what,
            message.operation,
            message.resource,
            extra={
                "node": self.node_id,
                "transport": self.transport,
                "msg_id": message.msg_id,
                "operation": message.operation,
                "resource": message.resource,
            },
        )

    def _on_ack(self, parent_msg_id: str) -> None:
        delivery = self._delivery
        if delivery is None or not delivery.on_ack(parent_msg_id):
            return
        self._observe_ack_latency(trio.current_time() - delivery.started_at)
        self.last_ack_ms = wall_ms()
        message = delivery.message
        self._delivery = None
        self._frame = ""
        self.end_flight()
        self.entry.queue.acked(message)
        self.hub.store.record_ack(self.node_id, message)
        self.kick()

    # --- downstream -------------------------------------------------------------------

    def kick(self) -> None:
        """Start the next ACK-mode delivery if none is in flight (stop-and-wait)."""
        if self._delivery is not None or not self._open or self.hub.draining:
            return  # drain lets in-flight sends finish but starts no new one
        queue = self.entry.queue
        now = trio.current_time()
        message = queue.pop_ready(now)
        if message is None:
            retry_at = queue.next_retry_at()
            if retry_at is not None and retry_at < self._retry_at:
                self._retry_at = retry_at
                self.hub.timers.at(retry_at, self._on_retry_time)
            return
        store = self.hub.store
        uid = object_uid(message.content)
        acked = store.acked_version(self.node_id, uid)
        if self.entry.take_mark(uid):
            acked = None if acked == SENT_RV else acked  # marked, never sent
        message = as_sent_to(message, acked)  # an insert of what the node may hold: update
        self.start_flight(message)
        store.record_sent(self.node_id, message)
        marker = store.unwritten_marker(self.node_id, uid) if acked is None else None
        if marker is not None:
            self._mark_ahead()
        settings = self._settings
        delivery = Delivery(
            message, now, interval=settings.ack_timeout, max_sends=settings.ack_max_sends
        )
        self._delivery = delivery
        self._in_transit_since = math.inf
        self._frame = self.hub.frames.for_edge(message)
        if marker is None:
            self._advance(delivery, now)
        else:
            assert self._nursery is not None  # `_open`
            self._nursery.start_soon(self._send_once_durable, delivery, marker)

    def _mark_ahead(self) -> None:
        """The "0" markers of the other queued first sends, so they are written in the same
        batch as this one: one wait for the lot, not one write per stop-and-wait round."""
        store, node = self.hub.store, self.node_id
        for queued in self.entry.queue.waiting():
            uid = object_uid(queued.content)
            if not uid or queued.operation == OP_DELETE:
                continue
            if store.acked_version(node, uid) is None:
                store.record_sent(node, queued)
                if queued.operation == OP_INSERT:
                    self.entry.mark_ahead(uid)

    async def _send_once_durable(self, delivery: Delivery, marker: trio.Event) -> None:
        """The first send of an object, once the store holds its "0" marker."""
        with trio.move_on_after(MARKER_WAIT):
            await marker.wait()
        if delivery is self._delivery and self._open:
            self._mark_ahead()  # what was queued meanwhile: its markers on their way now
            self._advance(delivery, trio.current_time())

    def _on_retry_time(self, now: float) -> None:
        self._retry_at = math.inf
        self.kick()

    def _on_delivery_time(self, delivery: Delivery, now: float) -> None:
        if delivery is not self._delivery or not self._open:
            return
        if self._flushing or self.conn.bytes_in_flight():
            # A slow link: the last copy is still on its way; sending it again would only
            # queue a duplicate behind it. Look again soon; the edge gets `ackTimeout` from
            # when its TCP has acknowledged everything written.
            self._in_transit_since = min(self._in_transit_since, now)
            poll = min(delivery.interval / 4, IN_FLIGHT_POLL)
            self.hub.timers.at(now + poll, partial(self._on_delivery_time, delivery))
            return
        if self._in_transit_since < now:
            self._in_transit_since = math.inf
            delivery.count_from(now)
        self._advance(delivery, now)

    def _advance(self, delivery: Delivery, now: float) -> None:
        """Do what the delivery asks for at `now`: send, wait (a timer), or give up."""
        action = delivery.poll(now)
        if isinstance(action, Send):
            if self._tracing:
                self._trace(f"sending (attempt {action.attempt})", delivery.message)
            if not self._write(self._frame):
                return
            self._hurry(now)
            if action.attempt == 1:
                self._count_sent(delivery.message.operation)
            else:
                self._count_retransmission()
            action = delivery.poll(now)
        if isinstance(action, WaitUntil):
            self.hub.timers.at(action.deadline, partial(self._on_delivery_time, delivery))
        elif isinstance(action, GiveUp):
            message = delivery.message
            self._delivery = None
            self._frame = ""
            self.end_flight()
            self.entry.queue.failed(message, now)
            self.hub.note_limited(
                self.node_id, "no-ack", f"no ACK for {message.resource} after retries"
            )
            self.kick()

    def send_no_ack(self) -> None:
        """Send the queued no-ACK messages (while the socket takes them)."""
        queue = self.entry.queue
        while self._open and not self._flushing:
            message = queue.pop_no_ack()
            if message is None:
                return
            if self._tracing:
                self._trace("sending (no ACK)", message)
            if self._write(self.hub.frames.for_edge(message)):
                self._count_sent(message.operation)


def _no_hurry(now: float) -> None:
    pass


def _upstream_buckets(settings: HubSettings, now: float) -> list[tuple[str, TokenBucket, bool]]:
    """(kind, bucket, counts bytes) for each upstream limit that is on."""
    buckets = []
    if settings.upstream_qps > 0 and settings.upstream_burst > 0:
        bucket = TokenBucket(settings.upstream_qps, settings.upstream_burst, now)
        buckets.append(("upstream-rate", bucket, False))
    if settings.upstream_bytes_per_second > 0 and settings.upstream_bytes_burst > 0:
        rate, burst = settings.upstream_bytes_per_second, settings.upstream_bytes_burst
        buckets.append(("upstream-bytes", TokenBucket(rate, burst, now), True))
    return buckets
