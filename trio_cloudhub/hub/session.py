"""One connected edge: reader, ACK sender and no-ACK sender inside a keepalive cancel scope.

Rules (spec 6.2, design 3):
- no keepalive for `keepaliveInterval` seconds ends the session (the scope's deadline moves
  on each keepalive; other messages do not move it);
- ACK-mode messages go one at a time (stop-and-wait), the same frame re-sent every
  `ackTimeout` seconds up to `ackMaxSends` times, then handed back to the queue with back-off;
  the `ackTimeout` counts from when the edge's TCP has the whole copy (on a slow link, a
  frame still in transit at its deadline is not sent again behind itself);
- a frame that is not a message, `writeTimeout` seconds without write progress, or any
  transport error ends the session; the node's queue stays for its next session. Progress is
  the edge acknowledging bytes: a transport that can tell (WebSocket on Linux: the kernel's
  TCP_USER_TIMEOUT, `conn.stall_timeout`) ends the connection itself, so a slow link that
  still moves bytes keeps its session however long a write takes; on other transports each
  write is bounded by `writeTimeout`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from trio_cloudhub.core import codec
from trio_cloudhub.core.delivery import Acked, Delivery, Send, WaitUntil
from trio_cloudhub.core.limits import TokenBucket
from trio_cloudhub.core.message import Message, object_uid, trim_for_edge
from trio_cloudhub.core.rules import Upstream, as_sent_to, classify_upstream, control_reply
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.hub.node import NodeEntry, NodeSessionHandle, wall_ms

if TYPE_CHECKING:
    from trio_cloudhub.hub.hub import Hub, HubSettings

log = logging.getLogger("trio_cloudhub.session")
IN_FLIGHT_POLL = 0.25  # how often a copy still in transit at its ACK deadline is looked at


class SessionEnded(Exception):
    """Ends the session on purpose (bad frame, slow writer); the reason is logged."""


class NodeSession(NodeSessionHandle):
    def __init__(
        self, hub: Hub, entry: NodeEntry, conn: EdgeConnection, transport: str = "memory"
    ) -> None:
        super().__init__(entry, conn.remote)
        self.hub = hub
        self.conn = conn
        self.node_id = entry.node_id
        self.transport = transport
        self._tracing = log.isEnabledFor(logging.DEBUG)  # -v=4: every message, by route
        self._delivery: Delivery | None = None
        # The bound on one write, when the transport does not bound stalls itself.
        timeout = hub.settings.write_timeout
        self._write_timeout = timeout if timeout > 0 and not conn.stall_timeout else math.inf
        self._acked = trio.Event()
        # Metric hooks, bound once: the hot path pays a call and an increment.
        metrics = hub.metrics
        self._count_sent = metrics.count_sent
        self._count_received = metrics.count_received
        self._count_retransmission = metrics.count_retransmission
        self._observe_ack_latency = metrics.observe_ack_latency

    async def run(self) -> None:
        settings = self.hub.settings
        with self.cancel_scope:
            self.cancel_scope.deadline = trio.current_time() + settings.keepalive_interval
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_loop)
                    nursery.start_soon(self._ack_send_loop)
                    nursery.start_soon(self._no_ack_send_loop)
            except* (EdgeDisconnected, SessionEnded) as group:
                if not self.end_reason:
                    self.end_reason = str(group.exceptions[0]) or "edge disconnected"
        if self.cancel_scope.cancelled_caught and not self.end_reason:
            self.end_reason = "keepalive timeout"
        self.release_in_flight()
        self.entry.queue.drop_no_ack()

    # --- upstream ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        settings = self.hub.settings
        max_size = settings.max_message_size
        buckets = _upstream_buckets(settings, trio.current_time())
        while True:
            frame = await self.conn.receive()
            if buckets:
                await self._throttle(buckets, len(frame))
            try:
                message = codec.decode(frame, max_size)
            except codec.CodecError as exc:
                raise SessionEnded(f"undecodable frame: {exc}") from None
            await self._handle(message)

    async def _throttle(self, buckets: list[tuple[str, TokenBucket, bool]], size: int) -> None:
        """Wait while the edge is over its upstream limits (TCP holds what it sends)."""
        now = trio.current_time()
        wait = 0.0
        for kind, bucket, by_bytes in buckets:
            needed = bucket.take(size if by_bytes else 1, now)
            if needed > 0:
                self.hub.note_limited(self.node_id, kind, f"sends faster than its {kind} limit")
                wait = max(wait, needed)
        if wait:
            await trio.sleep(wait)

    async def _handle(self, message: Message) -> None:
        self._count_received(message.operation)
        if self._tracing:
            self._trace("received", message)
        kind = classify_upstream(message)
        if kind is Upstream.KEEPALIVE:
            self.cancel_scope.deadline = trio.current_time() + self.hub.settings.keepalive_interval
            self.last_keepalive_ms = wall_ms()
        elif kind is Upstream.ACK:
            self._on_ack(message)
        elif kind is Upstream.CONTROL:
            reply = control_reply(message, self.hub.now_ms())
            await self._send(codec.encode(reply))
            self._count_sent(reply.operation)
        elif kind is Upstream.EMPTY:
            pass
        elif self.hub.admit(self.node_id, message):
            await self.hub.submit_upstream(self.node_id, kind, message)

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

    def _on_ack(self, message: Message) -> None:
        delivery = self._delivery
        if delivery is not None and delivery.on_ack(message.header.parent_msg_id):
            self.last_ack_ms = wall_ms()
            self._observe_ack_latency(trio.current_time() - delivery.started_at)
            self._acked.set()

    # --- downstream -------------------------------------------------------------------

    async def _ack_send_loop(self) -> None:
        while True:
            message = await self.entry.next_ack_message()
            if self.hub.draining:
                # Drain lets in-flight sends finish but starts no new one.
                self.entry.queue.release(message)
                break
            store = self.hub.store
            acked = store.acked_version(self.node_id, object_uid(message.content))
            message = as_sent_to(message, acked)  # an insert of what the node may hold: update
            self.start_flight(message)
            store.record_sent(self.node_id, message)
            if await self._deliver(message):
                self.end_flight()
                self.entry.queue.acked(message)
                store.record_ack(self.node_id, message)
            else:
                self.end_flight()
                self.entry.queue.failed(message, trio.current_time())
                self.hub.note_limited(
                    self.node_id, "no-ack", f"no ACK for {message.resource} after retries"
                )
        await trio.sleep_forever()

    async def _deliver(self, message: Message) -> bool:
        settings = self.hub.settings
        frame = codec.encode(message.with_resource(trim_for_edge(message.resource)))
        delivery = Delivery(
            message,
            trio.current_time(),
            interval=settings.ack_timeout,
            max_sends=settings.ack_max_sends,
        )
        self._delivery = delivery
        self._acked = trio.Event()
        try:
            while True:
                action = delivery.poll(trio.current_time())
                if isinstance(action, Send):
                    if self._tracing:
                        self._trace(f"sending (attempt {action.attempt})", message)
                    await self._send(frame)
                    delivery.count_from(trio.current_time())  # a slow write: from its end
                    if action.attempt == 1:
                        self._count_sent(message.operation)
                    else:
                        self._count_retransmission()
                elif isinstance(action, WaitUntil):
                    with trio.move_on_at(action.deadline):
                        await self._acked.wait()
                    if self._acked.is_set():
                        return True
                    await self._until_reached_edge(delivery)
                else:
                    return isinstance(action, Acked)
        finally:
            self._delivery = None

    async def _until_reached_edge(self, delivery: Delivery) -> None:
        """On a slow link the last copy may still be on its way at the ACK deadline: sending
        it again would only queue a duplicate behind it. Wait (or for the ACK) until the edge's
        TCP has acknowledged everything written, then give the edge `ackTimeout` from there."""
        if not self.conn.bytes_in_flight():
            return
        poll = min(delivery.interval / 4, IN_FLIGHT_POLL)
        while self.conn.bytes_in_flight():
            with trio.move_on_after(poll):
                await self._acked.wait()
            if self._acked.is_set():
                return
        delivery.count_from(trio.current_time())

    async def _no_ack_send_loop(self) -> None:
        while True:
            message = await self.entry.next_no_ack_message()
            trimmed = message.with_resource(trim_for_edge(message.resource))
            if self._tracing:
                self._trace("sending (no ACK)", message)
            await self._send(codec.encode(trimmed))
            self._count_sent(message.operation)

    async def _send(self, frame: str) -> None:
        timeout = self._write_timeout
        if timeout == math.inf:
            await self.conn.send(frame)
            return
        with trio.move_on_after(timeout) as scope:
            await self.conn.send(frame)
        if scope.cancelled_caught:
            raise SessionEnded(f"write did not finish within {timeout:g} s")


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
