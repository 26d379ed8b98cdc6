"""Stop-and-wait delivery of one ACK-mode message, as a function of `now` (spec 6.1/6.2).

Rules:

1. The first `poll` answers `Send`: write the message (transmission 1).
2. Until `interval` seconds after the last transmission, `poll` answers `WaitUntil(deadline)`.
3. At the deadline without an ACK, `poll` answers `Send` again with the SAME message, hence
   the same `msg_id` (the edge ACKs whichever copy it stored).
4. After the `max_sends`-th transmission and one more `interval` without an ACK, `poll`
   answers `GiveUp` (and keeps answering it); the caller hands the message back to the node
   queue with `NodeQueue.failed`, which retries it later with a back-off.
5. `count_from(now)`: the last copy left only at `now` (its write took long, or it was
   still on its way at the deadline: a slow link, whose edge TCP had not acknowledged all of
   it); the `interval` counts from then, so a copy is never sent again behind itself.
6. `on_ack(parent_msg_id)` matches the message's own `msg_id`; any other id is ignored (the
   edge may ACK an older message late), and so is a duplicate ACK or one after `GiveUp`.
   Once acknowledged, `poll` answers `Acked`.

No clock is read here: the caller passes `now` (seconds) in and sleeps until the deadline.
"""

from __future__ import annotations

import attrs

from trio_cloudhub.core.message import Message

DEFAULT_INTERVAL = 5.0
DEFAULT_MAX_SENDS = 5


@attrs.frozen(slots=True)
class Send:
    """Write `message` now; `attempt` counts transmissions from 1."""

    message: Message
    attempt: int


@attrs.frozen(slots=True)
class WaitUntil:
    """Nothing to do before `deadline` (seconds, same clock as `now`)."""

    deadline: float


@attrs.frozen(slots=True)
class GiveUp:
    """`sends` transmissions went unanswered."""

    sends: int


@attrs.frozen(slots=True)
class Acked:
    """The edge acknowledged the message."""


Action = Send | WaitUntil | GiveUp | Acked


class Delivery:
    """One message in flight to one node; see the module docstring for the rules."""

    __slots__ = (
        "_acked",
        "_deadline",
        "_gave_up",
        "interval",
        "max_sends",
        "message",
        "sends",
        "started_at",
    )

    def __init__(
        self,
        message: Message,
        now: float,
        interval: float = DEFAULT_INTERVAL,
        max_sends: int = DEFAULT_MAX_SENDS,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if max_sends < 1:
            raise ValueError("max_sends must be at least 1")
        self.message = message
        self.started_at = now
        self.interval = interval
        self.max_sends = max_sends
        self.sends = 0
        self._deadline = now
        self._acked = False
        self._gave_up = False

    @property
    def msg_id(self) -> str:
        return self.message.msg_id

    @property
    def acked(self) -> bool:
        return self._acked

    @property
    def gave_up(self) -> bool:
        return self._gave_up

    @property
    def done(self) -> bool:
        """Acked or gave up: the node queue must hear about it (`acked` or `failed`)."""
        return self._acked or self._gave_up

    def poll(self, now: float) -> Action:
        """The next thing to do at time `now`."""
        if self._acked:
            return Acked()
        if self._gave_up:
            return GiveUp(self.sends)
        if self.sends == 0:
            return self._send(now)
        if now < self._deadline:
            return WaitUntil(self._deadline)
        if self.sends >= self.max_sends:
            self._gave_up = True
            return GiveUp(self.sends)
        return self._send(now)

    def count_from(self, now: float) -> None:
        """The last copy left or reached the edge only at `now` (rule 5): wait `interval`
        from then."""
        if self.sends and not self.done:
            self._deadline = max(self._deadline, now + self.interval)

    def on_ack(self, parent_msg_id: str) -> bool:
        """True if this ACK completes the delivery: our `msg_id`, first ACK, not given up."""
        if parent_msg_id != self.message.msg_id or self._gave_up or self._acked:
            return False
        self._acked = True
        return True

    def _send(self, now: float) -> Send:
        self.sends += 1
        self._deadline = now + self.interval
        return Send(self.message, self.sends)
