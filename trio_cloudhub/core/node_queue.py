"""Per-node pending store for downstream messages: a pure data structure (spec 5.1, 5.2).

ACK path (`offer`, `pop_ready`, `acked`, `failed`), keyed by object UID:

1. Key = `metadata.uid` of the content; for operation `response` the `msg_id` (a query
   answer never takes an object's slot). No key -> drop.
2. Empty resourceVersion and not a delete -> drop (a `response` is exempt).
3. A delete (operation `delete` or a deletionTimestamp) or a `response` -> accepted, no
   version checks.
4. Known key (pending, in flight, or last sent and ACKed): drop if the latest accepted
   message is a delete (delete precedence) unless the new one is an insert (an object
   withdrawn from the node and needed again), or if the new RV <= its RV. RVs compare as
   integers; a non-numeric RV is dropped.
5. Unknown key: drop if an ack point (`acked_version`, the ObjectSync RV) is given and the
   new RV <= it; otherwise accept.
6. One slot per key, newest version wins: a newer version replaces a pending one in place
   (same position); offered while the key is in flight, it waits and the key is ready again
   when the in-flight send ends.
7. Stop-and-wait: `pop_ready` hands out the oldest ready key and marks it in flight; only
   one message is in flight at a time.
8. `acked`: the key remembers only (RV, is-delete) of what was sent; after an ACKed
   `delete` (or `response`) the key is forgotten. The key's back-off is reset.
9. `release`: the send was interrupted (the session ended); the key is ready again at once,
   at the front of the order.
10. `failed`: the key goes back with a back-off of 2 s doubling up to 60 s, re-queued at
   the end of the order when it expires; a newer version that arrived meanwhile is sent
   instead of the failed one.

Memory is bounded by the number of distinct objects, never by the number of changes.

NO_ACK path: a FIFO of `no_ack_capacity` messages; when full the oldest is dropped and
counted in `dropped_no_ack`.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque

import attrs

from trio_cloudhub.core.message import (
    OP_DELETE,
    OP_INSERT,
    OP_RESPONSE,
    Message,
    is_delete,
    object_uid,
)

DEFAULT_NO_ACK_CAPACITY = 1024
BACKOFF_BASE = 2.0
BACKOFF_CAP = 60.0
_MAX_RV_DIGITS = 20  # uint64; also keeps int() clear of Python's digit limit


@attrs.frozen(slots=True)
class _Known:
    """What the rules need to remember of the latest accepted message for a key."""

    rv: int | None
    delete: bool


def parse_resource_version(text: str | None) -> int | None:
    """A decimal unsigned resourceVersion as an int, or None if empty or not a number."""
    if not text or len(text) > _MAX_RV_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def ack_key(message: Message) -> str:
    """The slot of a message: `msg_id` for a `response`, else the object UID ("" = none)."""
    if message.operation == OP_RESPONSE:
        return message.msg_id
    return object_uid(message.content)


def backoff_delay(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait after the `failures`-th consecutive failure of a key (1, 2, ...)."""
    exponent = min(max(failures, 1) - 1, 32)
    return float(min(base * 2**exponent, cap))


class NodeQueue:
    """Pending downstream messages of one node; rules in the module docstring."""

    # One per node, kept while the node is away: slots, and no no-ACK FIFO while it is empty.
    __slots__ = (
        "_backoff_base",
        "_backoff_cap",
        "_failures",
        "_in_flight",
        "_in_flight_key",
        "_known",
        "_no_ack",
        "_no_ack_capacity",
        "_pending",
        "_ready",
        "_retry_at",
        "_retry_heap",
        "_seq",
        "dropped_no_ack",
    )

    def __init__(
        self,
        no_ack_capacity: int = DEFAULT_NO_ACK_CAPACITY,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        if no_ack_capacity < 1:
            raise ValueError("no_ack_capacity must be at least 1")
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._known: dict[str, _Known] = {}  # every key the rules remember
        self._pending: dict[str, Message] = {}  # newest unsent version per key
        self._ready: OrderedDict[str, None] = OrderedDict()  # sendable keys, oldest first
        self._retry_at: dict[str, float] = {}  # keys backing off
        self._retry_heap: list[tuple[float, int, str]] = []
        self._failures: dict[str, int] = {}
        self._seq = 0
        self._in_flight: Message | None = None
        self._in_flight_key = ""
        self._no_ack_capacity = no_ack_capacity
        # Made on the first no-ACK message, dropped when emptied (an empty deque is 760 bytes).
        self._no_ack: deque[Message] | None = None
        self.dropped_no_ack = 0

    # --- ACK path: admission -------------------------------------------------------------

    def offer(self, message: Message, acked_version: str | None = None) -> bool:
        """Queue an ACK-mode message; False if the rules drop it."""
        key = ack_key(message)
        if not key or not self._admit(key, message, acked_version):
            return False
        if message.operation != OP_RESPONSE:
            rv = parse_resource_version(message.header.resource_version)
            self._known[key] = _Known(rv, is_delete(message))
        self._put(key, message)
        return True

    def _admit(self, key: str, message: Message, acked_version: str | None) -> bool:
        if message.operation == OP_RESPONSE or is_delete(message):
            return True
        rv = parse_resource_version(message.header.resource_version)
        if rv is None:
            return False
        known = self._known.get(key)
        if known is not None and known.delete:
            # Only an insert follows a delete: an object withdrawn from the node (no pod
            # there needs it) and needed again keeps its uid and resourceVersion.
            return message.operation == OP_INSERT
        if known is not None:
            return known.rv is None or rv > known.rv
        acked = parse_resource_version(acked_version)
        return acked is None or rv > acked

    def _put(self, key: str, message: Message) -> None:
        waiting = key in self._pending  # ready or backing off: keep its place
        self._pending[key] = message
        if not waiting and key != self._in_flight_key:
            self._ready[key] = None

    # --- ACK path: sending ---------------------------------------------------------------

    def pop_ready(self, now: float) -> Message | None:
        """The oldest ready message, now in flight; None if nothing is due at `now`."""
        if self._in_flight is not None:
            raise RuntimeError("a message is already in flight (stop-and-wait)")
        self._promote_due(now)
        if not self._ready:
            return None
        key, _ = self._ready.popitem(last=False)
        message = self._pending.pop(key)
        self._in_flight = message
        self._in_flight_key = key
        return message

    def next_retry_at(self) -> float | None:
        """When the earliest backing-off key becomes ready, or None if none is waiting."""
        heap = self._retry_heap
        while heap and self._retry_at.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # stale entry
        return heap[0][0] if heap else None

    def acked(self, message: Message) -> None:
        """The in-flight message was ACKed by the edge."""
        key = self._finish(message)
        self._failures.pop(key, None)
        if key in self._pending:
            self._ready[key] = None
        elif message.operation in (OP_DELETE, OP_RESPONSE):
            self._known.pop(key, None)

    def failed(self, message: Message, now: float) -> None:
        """The in-flight message went unanswered: retry the key later with a back-off."""
        key = self._finish(message)
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        self._pending.setdefault(key, message)  # a newer version, if any, wins
        retry_at = now + backoff_delay(failures, self._backoff_base, self._backoff_cap)
        self._retry_at[key] = retry_at
        heapq.heappush(self._retry_heap, (retry_at, self._seq, key))
        self._seq += 1

    def release(self, message: Message) -> None:
        """The in-flight send was interrupted (session ended): ready again at once, first."""
        key = self._finish(message)
        self._pending.setdefault(key, message)  # a newer version, if any, wins
        if key not in self._retry_at:
            self._ready[key] = None
            self._ready.move_to_end(key, last=False)

    def _finish(self, message: Message) -> str:
        if self._in_flight is None or self._in_flight.msg_id != message.msg_id:
            raise RuntimeError(f"message {message.msg_id!r} is not the one in flight")
        key = self._in_flight_key
        self._in_flight = None
        self._in_flight_key = ""
        return key

    def _promote_due(self, now: float) -> None:
        heap = self._retry_heap
        while heap and heap[0][0] <= now:
            retry_at, _, key = heapq.heappop(heap)
            if self._retry_at.get(key) == retry_at:
                del self._retry_at[key]
                self._ready[key] = None

    # --- ACK path: inspection ------------------------------------------------------------

    @property
    def in_flight(self) -> Message | None:
        return self._in_flight

    @property
    def pending_count(self) -> int:
        """ACK-mode messages waiting to be sent (ready or backing off), not the in-flight one."""
        return len(self._pending)

    @property
    def ready_count(self) -> int:
        """Keys sendable without waiting for a back-off (as of the last `pop_ready`)."""
        return len(self._ready)

    @property
    def known_count(self) -> int:
        """Keys whose last accepted version is remembered (bounded by distinct objects)."""
        return len(self._known)

    def covers(self, key: str, resource_version: str, delete: bool) -> bool:
        """True when `key` already holds (pending, in flight or sent) this change or a newer
        one, so a reconciliation need not offer it: a delete when the latest is a delete, an
        upsert when the latest is an upsert with an RV at least as high."""
        known = self._known.get(key)
        if known is None:
            return False
        if delete or known.delete:
            return delete and known.delete
        rv = parse_resource_version(resource_version)
        return rv is not None and known.rv is not None and rv <= known.rv

    def pending(self, key: str) -> Message | None:
        """The message waiting in `key`'s slot, if any."""
        return self._pending.get(key)

    def waiting(self) -> list[Message]:
        """Every ACK-mode message waiting to be sent (ready or backing off)."""
        return list(self._pending.values())

    # --- NO_ACK path ---------------------------------------------------------------------

    def offer_no_ack(self, message: Message) -> bool:
        """Append to the no-ACK FIFO, dropping (and counting) the oldest when full."""
        fifo = self._no_ack
        if fifo is None:
            fifo = self._no_ack = deque(maxlen=self._no_ack_capacity)
        elif len(fifo) == self._no_ack_capacity:
            self.dropped_no_ack += 1
        fifo.append(message)
        return True

    def pop_no_ack(self) -> Message | None:
        fifo = self._no_ack
        if fifo is None:
            return None
        message = fifo.popleft()
        if not fifo:
            self._no_ack = None
        return message

    def drop_no_ack(self) -> int:
        """Discard every queued no-ACK message (a session ended); returns how many."""
        count = self.no_ack_count
        self._no_ack = None
        return count

    @property
    def no_ack_count(self) -> int:
        return len(self._no_ack) if self._no_ack is not None else 0

    def __len__(self) -> int:
        """Every message held for sending: pending, in flight and no-ACK."""
        return len(self._pending) + (self._in_flight is not None) + self.no_ack_count
