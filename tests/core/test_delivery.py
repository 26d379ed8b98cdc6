from __future__ import annotations

import pytest

from trio_cloudhub.core.delivery import Acked, Delivery, GiveUp, Send, WaitUntil
from trio_cloudhub.core.message import Message, new_message


def make_message() -> Message:
    return new_message(
        source="edgecontroller",
        group="resource",
        operation="update",
        resource="node/n1/default/pod/p",
        content={"metadata": {"uid": "u1"}},
        now_ms=0,
        resource_version="1",
    )


def run_without_ack(delivery: Delivery, start: float) -> list[tuple[float, object]]:
    """Poll as a hub would (sleeping until each deadline) and record the actions."""
    now = start
    actions: list[tuple[float, object]] = []
    while True:
        action = delivery.poll(now)
        actions.append((now, action))
        if isinstance(action, GiveUp):
            return actions
        if isinstance(action, WaitUntil):
            now = action.deadline


def test_first_poll_sends() -> None:
    message = make_message()
    delivery = Delivery(message, now=100.0)
    action = delivery.poll(100.0)
    assert action == Send(message, 1)
    assert delivery.sends == 1


def test_waits_interval_before_resending() -> None:
    delivery = Delivery(make_message(), now=0.0)
    delivery.poll(0.0)
    assert delivery.poll(1.0) == WaitUntil(5.0)
    assert delivery.poll(4.999) == WaitUntil(5.0)
    assert isinstance(delivery.poll(5.0), Send)
    assert delivery.poll(5.0) == WaitUntil(10.0)


def test_exactly_five_sends_then_give_up() -> None:
    delivery = Delivery(make_message(), now=0.0)
    actions = run_without_ack(delivery, 0.0)
    sends = [(now, a) for now, a in actions if isinstance(a, Send)]
    assert [now for now, _ in sends] == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert [a.attempt for _, a in sends] == [1, 2, 3, 4, 5]
    assert actions[-1] == (25.0, GiveUp(5))
    assert delivery.sends == 5
    assert delivery.gave_up and delivery.done


def test_retransmissions_keep_the_same_msg_id() -> None:
    message = make_message()
    delivery = Delivery(message, now=0.0)
    sends = [a for _, a in run_without_ack(delivery, 0.0) if isinstance(a, Send)]
    assert {a.message.msg_id for a in sends} == {message.msg_id}
    assert all(a.message is message for a in sends)


def test_give_up_is_sticky_and_late_ack_ignored() -> None:
    message = make_message()
    delivery = Delivery(message, now=0.0)
    run_without_ack(delivery, 0.0)
    assert delivery.poll(1000.0) == GiveUp(5)
    assert delivery.on_ack(message.msg_id) is False
    assert not delivery.acked


def test_ack_stops_retransmission() -> None:
    message = make_message()
    delivery = Delivery(message, now=0.0)
    delivery.poll(0.0)
    assert delivery.on_ack(message.msg_id) is True
    assert delivery.poll(50.0) == Acked()
    assert delivery.sends == 1
    assert delivery.acked and delivery.done


def test_ack_after_last_send_before_deadline_is_accepted() -> None:
    message = make_message()
    delivery = Delivery(message, now=0.0)
    now = 0.0
    for _ in range(5):
        action = delivery.poll(now)
        assert isinstance(action, Send)
        now += 5.0
    assert delivery.on_ack(message.msg_id) is True
    assert delivery.poll(now) == Acked()


def test_unknown_ack_ignored() -> None:
    delivery = Delivery(make_message(), now=0.0)
    delivery.poll(0.0)
    assert delivery.on_ack("someone-else") is False
    assert delivery.on_ack("") is False
    assert delivery.poll(5.0) == Send(delivery.message, 2)


def test_duplicate_ack_reports_false() -> None:
    message = make_message()
    delivery = Delivery(message, now=0.0)
    delivery.poll(0.0)
    assert delivery.on_ack(message.msg_id) is True
    assert delivery.on_ack(message.msg_id) is False


def test_late_poll_resends_once_and_rearms_from_now() -> None:
    delivery = Delivery(make_message(), now=0.0)
    delivery.poll(0.0)
    assert delivery.poll(12.0) == Send(delivery.message, 2)
    assert delivery.poll(12.0) == WaitUntil(17.0)


def test_custom_interval_and_max_sends() -> None:
    delivery = Delivery(make_message(), now=0.0, interval=1.0, max_sends=2)
    actions = run_without_ack(delivery, 0.0)
    assert [type(a).__name__ for _, a in actions] == [
        "Send",
        "WaitUntil",
        "Send",
        "WaitUntil",
        "GiveUp",
    ]
    assert actions[-1][0] == 2.0


@pytest.mark.parametrize(("interval", "max_sends"), [(0.0, 5), (-1.0, 5), (5.0, 0)])
def test_rejects_bad_parameters(interval: float, max_sends: int) -> None:
    with pytest.raises(ValueError):
        Delivery(make_message(), now=0.0, interval=interval, max_sends=max_sends)


def test_count_from_moves_the_deadline_to_when_the_copy_left() -> None:
    """A write that took 20 s (a slow link): the interval counts from its end, so the copy is
    not sent again the moment the write returns."""
    delivery = Delivery(make_message(), now=0.0)
    assert isinstance(delivery.poll(0.0), Send)
    delivery.count_from(20.0)
    assert delivery.poll(20.0) == WaitUntil(25.0)
    assert isinstance(delivery.poll(25.0), Send)


def test_count_from_never_shortens_the_wait_or_revives_a_finished_delivery() -> None:
    delivery = Delivery(make_message(), now=0.0)
    delivery.count_from(3.0)  # nothing sent yet: nothing to wait for
    assert isinstance(delivery.poll(0.0), Send)
    delivery.count_from(-10.0)
    assert delivery.poll(1.0) == WaitUntil(5.0)
    assert delivery.on_ack(delivery.msg_id)
    delivery.count_from(100.0)
    assert delivery.poll(1.0) == Acked()
