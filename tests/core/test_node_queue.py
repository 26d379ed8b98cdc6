from __future__ import annotations

from typing import Any

import pytest

from tests.vectors import CLOUD_TO_EDGE, load_frames
from trio_cloudhub.core.codec import decode
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.core.node_queue import (
    NodeQueue,
    ack_key,
    backoff_delay,
    parse_resource_version,
)
from trio_cloudhub.core.rules import Downstream, classify_downstream


def obj(
    uid: str,
    rv: str,
    op: str = "update",
    *,
    deleting: bool = False,
    name: str = "p",
) -> Message:
    metadata: dict[str, Any] = {"uid": uid, "name": name, "resourceVersion": rv}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return new_message(
        source="edgecontroller",
        group="resource",
        operation=op,
        resource=f"node/n1/default/pod/{name}",
        content={"kind": "Pod", "metadata": metadata},
        now_ms=0,
        resource_version=rv,
    )


def response(content: Any = None, rv: str = "") -> Message:
    return new_message(
        source="edgecontroller",
        group="resource",
        operation="response",
        resource="node/n1/default/configmap/cm",
        content=content if content is not None else {"metadata": {"uid": "cm-uid"}},
        now_ms=0,
        resource_version=rv,
        parent_msg_id="edge-query-id",
    )


def no_ack(index: int) -> Message:
    return new_message(
        source="dynamiccontroller",
        group="resource",
        operation="applicationResponse",
        resource="node/n1/ignore/Application/ignore",
        content={"i": index},
        now_ms=0,
    )


def send_and_ack(queue: NodeQueue, now: float = 0.0) -> Message:
    message = queue.pop_ready(now)
    assert message is not None
    queue.acked(message)
    return message


# --- helpers ------------------------------------------------------------------------------


def test_parse_resource_version() -> None:
    assert parse_resource_version("42") == 42
    assert parse_resource_version("") is None
    assert parse_resource_version(None) is None
    assert parse_resource_version("abc") is None
    assert parse_resource_version("-1") is None
    assert parse_resource_version("٣") is None  # non-ASCII digit
    assert parse_resource_version("9" * 5000) is None  # no ValueError from int()


def test_ack_key_is_uid_or_msg_id_for_response() -> None:
    assert ack_key(obj("u1", "1")) == "u1"
    answer = response()
    assert ack_key(answer) == answer.msg_id


def test_backoff_delay_doubles_and_caps() -> None:
    assert [backoff_delay(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(10_000) == 60


# --- admission rules ----------------------------------------------------------------------


def test_first_version_queued() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "5")) is True
    assert queue.pending_count == 1 and len(queue) == 1


def test_no_uid_dropped() -> None:
    queue = NodeQueue()
    message = new_message(
        source="edgecontroller",
        group="resource",
        operation="update",
        resource="node/n1/default/pod/p",
        content={"metadata": {"name": "p"}},
        now_ms=0,
        resource_version="3",
    )
    assert queue.offer(message) is False
    assert queue.pending_count == 0


def test_empty_rv_dropped() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "")) is False
    assert queue.known_count == 0


def test_non_numeric_rv_rejected_without_crash() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "abc")) is False
    assert queue.offer(obj("u1", "5")) is True
    assert queue.offer(obj("u1", "6x")) is False


def test_newest_version_wins() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "5"))
    newer = obj("u1", "7")
    assert queue.offer(newer)
    assert queue.pending_count == 1
    assert queue.pop_ready(0.0) is newer


def test_replacement_keeps_position_in_order() -> None:
    queue = NodeQueue()
    queue.offer(obj("a", "1", name="a"))
    queue.offer(obj("b", "2", name="b"))
    newer_a = obj("a", "3", name="a")
    queue.offer(newer_a)
    assert send_and_ack(queue) is newer_a
    assert ack_key(send_and_ack(queue)) == "b"


def test_rv_lower_or_equal_dropped() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "10"))
    assert queue.offer(obj("u1", "10")) is False
    assert queue.offer(obj("u1", "9")) is False
    assert queue.offer(obj("u1", "11")) is True


def test_rv_compared_as_integers() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "9"))
    assert queue.offer(obj("u1", "10")) is True  # "10" < "9" as strings


def test_rv_checked_against_last_acked() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "10"))
    send_and_ack(queue)
    assert queue.known_count == 1 and queue.pending_count == 0
    assert queue.offer(obj("u1", "10")) is False
    assert queue.offer(obj("u1", "11")) is True


def test_rv_checked_against_in_flight() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "10"))
    assert queue.pop_ready(0.0) is not None
    assert queue.offer(obj("u1", "8")) is False


def test_delete_always_accepted() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "10"))
    assert queue.offer(obj("u1", "3", op="delete")) is True
    assert queue.offer(obj("u2", "", op="delete")) is True  # empty RV: still a delete


def test_deletion_timestamp_counts_as_delete() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "10"))
    graceful = obj("u1", "", deleting=True)
    assert queue.offer(graceful) is True
    assert queue.pending(graceful.content["metadata"]["uid"]) is graceful


def test_delete_precedence_drops_later_updates() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "10"))
    queue.offer(obj("u1", "11", op="delete"))
    assert queue.offer(obj("u1", "12")) is False
    assert queue.offer(obj("u1", "13", op="delete")) is True


def test_delete_precedence_while_delete_in_flight() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "11", op="delete"))
    assert queue.pop_ready(0.0) is not None
    assert queue.offer(obj("u1", "12")) is False


def test_graceful_delete_acked_keeps_precedence_until_delete() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "269", deleting=True))
    send_and_ack(queue)
    assert queue.offer(obj("u1", "270")) is False
    assert queue.offer(obj("u1", "271", deleting=True)) is True
    assert queue.offer(obj("u1", "272", op="delete")) is True
    send_and_ack(queue)
    assert queue.known_count == 0


def test_acked_delete_forgets_the_key() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "5"))
    send_and_ack(queue)
    queue.offer(obj("u1", "6", op="delete"))
    send_and_ack(queue)
    assert queue.known_count == 0
    assert len(queue) == 0


def test_ack_point_filters_unknown_key() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "10"), acked_version="10") is False
    assert queue.offer(obj("u1", "9"), acked_version="10") is False
    assert queue.offer(obj("u1", "11"), acked_version="10") is True
    assert queue.offer(obj("u2", "1"), acked_version="0") is True


def test_ack_point_empty_or_bad_is_ignored() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "1"), acked_version="") is True
    assert queue.offer(obj("u2", "1"), acked_version="garbage") is True
    assert queue.offer(obj("u3", "1"), acked_version=None) is True


def test_ack_point_not_consulted_for_known_key() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "10"))
    assert queue.offer(obj("u1", "11"), acked_version="50") is True


def test_ack_point_does_not_stop_delete() -> None:
    queue = NodeQueue()
    assert queue.offer(obj("u1", "5", op="delete"), acked_version="10") is True


def test_response_keyed_by_msg_id() -> None:
    queue = NodeQueue()
    update = obj("cm-uid", "10")
    queue.offer(update)
    answer = response({"metadata": {"uid": "cm-uid", "resourceVersion": "4"}})
    assert queue.offer(answer) is True  # no RV checks, does not replace the update
    assert queue.pending_count == 2
    assert queue.pending("cm-uid") is update
    assert queue.pending(answer.msg_id) is answer


def test_response_with_empty_rv_accepted() -> None:
    queue = NodeQueue()
    assert queue.offer(response("plain text answer")) is True


def test_acked_response_is_forgotten() -> None:
    queue = NodeQueue()
    queue.offer(response())
    send_and_ack(queue)
    assert queue.known_count == 0 and len(queue) == 0


def test_response_does_not_block_object_updates() -> None:
    queue = NodeQueue()
    queue.offer(response({"metadata": {"uid": "cm-uid", "resourceVersion": "99"}}))
    assert queue.offer(obj("cm-uid", "1")) is True


# --- sending: stop-and-wait, in-flight replacement, failures ------------------------------


def test_fifo_order_of_keys() -> None:
    queue = NodeQueue()
    for name in ("a", "b", "c"):
        queue.offer(obj(name, "1", name=name))
    assert [ack_key(send_and_ack(queue)) for _ in range(3)] == ["a", "b", "c"]
    assert queue.pop_ready(0.0) is None


def test_only_one_in_flight() -> None:
    queue = NodeQueue()
    queue.offer(obj("a", "1", name="a"))
    queue.offer(obj("b", "1", name="b"))
    first = queue.pop_ready(0.0)
    assert queue.in_flight is first
    with pytest.raises(RuntimeError):
        queue.pop_ready(0.0)


def test_ack_of_other_message_is_an_error() -> None:
    queue = NodeQueue()
    queue.offer(obj("a", "1"))
    with pytest.raises(RuntimeError):
        queue.acked(obj("a", "1"))
    queue.pop_ready(0.0)
    with pytest.raises(RuntimeError):
        queue.acked(obj("a", "1"))


def test_in_flight_replacement_requeues_after_ack() -> None:
    queue = NodeQueue()
    queue.offer(obj("a", "1", name="a"))
    queue.offer(obj("b", "1", name="b"))
    first = queue.pop_ready(0.0)
    assert first is not None and ack_key(first) == "a"
    newer = obj("a", "2", name="a")
    assert queue.offer(newer) is True
    assert queue.pending_count == 2 and len(queue) == 3
    queue.acked(first)
    assert ack_key(send_and_ack(queue)) == "b"  # re-queued at the end
    assert send_and_ack(queue) is newer
    assert queue.pop_ready(0.0) is None


def test_failure_backs_off_and_retries_same_message() -> None:
    queue = NodeQueue()
    message = obj("a", "1")
    queue.offer(message)
    assert queue.pop_ready(0.0) is message
    queue.failed(message, now=25.0)
    assert queue.pop_ready(26.9) is None
    assert queue.next_retry_at() == 27.0
    assert queue.pop_ready(27.0) is message
    assert queue.next_retry_at() is None


def test_failure_backoff_doubles_capped_and_resets_on_ack() -> None:
    queue = NodeQueue()
    message = obj("a", "1")
    queue.offer(message)
    now = 0.0
    delays = []
    for _ in range(7):
        assert queue.pop_ready(now) is message
        queue.failed(message, now)
        retry_at = queue.next_retry_at()
        assert retry_at is not None
        delays.append(retry_at - now)
        now = retry_at
    assert delays == [2, 4, 8, 16, 32, 60, 60]
    assert queue.pop_ready(now) is message
    queue.acked(message)
    newer = obj("a", "2")
    queue.offer(newer)
    assert queue.pop_ready(now) is newer
    queue.failed(newer, now)
    assert queue.next_retry_at() == now + 2  # reset by the ack


def test_failed_key_does_not_block_others() -> None:
    queue = NodeQueue()
    a = obj("a", "1", name="a")
    b = obj("b", "1", name="b")
    queue.offer(a)
    queue.offer(b)
    assert queue.pop_ready(0.0) is a
    queue.failed(a, 0.0)
    assert queue.pop_ready(0.0) is b


def test_failure_sends_newer_version_next() -> None:
    queue = NodeQueue()
    old = obj("a", "1")
    queue.offer(old)
    assert queue.pop_ready(0.0) is old
    newer = obj("a", "2")
    queue.offer(newer)
    queue.failed(old, 0.0)
    assert queue.pending_count == 1
    assert queue.pop_ready(1.0) is None
    assert queue.pop_ready(2.0) is newer


def test_offer_during_backoff_replaces_and_waits() -> None:
    queue = NodeQueue()
    old = obj("a", "1")
    queue.offer(old)
    queue.pop_ready(0.0)
    queue.failed(old, 0.0)
    newer = obj("a", "2")
    assert queue.offer(newer)
    assert queue.pop_ready(1.0) is None
    assert queue.pop_ready(2.0) is newer


def test_backed_off_key_requeued_at_end() -> None:
    queue = NodeQueue()
    a = obj("a", "1", name="a")
    queue.offer(a)
    queue.pop_ready(0.0)
    queue.failed(a, 0.0)
    queue.offer(obj("b", "1", name="b"))
    queue.offer(obj("c", "1", name="c"))
    order = [ack_key(send_and_ack(queue, now=5.0)) for _ in range(3)]
    assert order == ["b", "c", "a"]


# --- memory -------------------------------------------------------------------------------


def test_memory_10000_updates_of_one_object_leave_one_slot() -> None:
    queue = NodeQueue()
    for rv in range(1, 10_001):
        assert queue.offer(obj("u1", str(rv)))
    assert queue.pending_count == 1 and queue.known_count == 1 and len(queue) == 1
    last = send_and_ack(queue)
    assert last.header.resource_version == "10000"
    assert len(queue) == 0 and queue.known_count == 1


def test_memory_updates_while_in_flight_and_failing_stay_bounded() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "1"))
    now = 0.0
    rv = 1
    for _ in range(100):
        message = queue.pop_ready(now)
        assert message is not None
        for _ in range(100):
            rv += 1
            queue.offer(obj("u1", str(rv)))
        queue.failed(message, now)
        now += 120.0
    assert queue.pending_count == 1 and queue.known_count == 1
    assert len(queue._retry_heap) <= 1


# --- no-ACK FIFO --------------------------------------------------------------------------


def test_no_ack_fifo_order() -> None:
    queue = NodeQueue()
    messages = [no_ack(i) for i in range(3)]
    for message in messages:
        assert queue.offer_no_ack(message) is True
    assert [queue.pop_no_ack() for _ in range(4)] == [*messages, None]


def test_no_ack_fifo_bound_drops_oldest() -> None:
    queue = NodeQueue(no_ack_capacity=3)
    messages = [no_ack(i) for i in range(5)]
    for message in messages:
        queue.offer_no_ack(message)
    assert queue.no_ack_count == 3
    assert queue.dropped_no_ack == 2
    assert [queue.pop_no_ack() for _ in range(3)] == messages[2:]


def test_no_ack_default_capacity_1024() -> None:
    queue = NodeQueue()
    for i in range(1030):
        queue.offer_no_ack(no_ack(i))
    assert queue.no_ack_count == 1024 and queue.dropped_no_ack == 6


def test_drop_no_ack_discards_all() -> None:
    queue = NodeQueue()
    queue.offer(obj("u1", "1"))
    queue.offer_no_ack(no_ack(0))
    queue.offer_no_ack(no_ack(1))
    assert queue.drop_no_ack() == 2
    assert queue.pop_no_ack() is None
    assert queue.pending_count == 1  # the ACK path is untouched


def test_no_ack_fifo_bound_holds_after_emptied_and_refilled() -> None:
    queue = NodeQueue(no_ack_capacity=2)
    first = no_ack(0)
    queue.offer_no_ack(first)
    assert queue.pop_no_ack() is first and queue.no_ack_count == 0 and len(queue) == 0
    messages = [no_ack(i) for i in range(1, 5)]
    for message in messages:
        queue.offer_no_ack(message)
    assert queue.no_ack_count == 2 and queue.dropped_no_ack == 2
    assert [queue.pop_no_ack() for _ in range(3)] == [*messages[2:], None]
    queue.offer_no_ack(no_ack(9))
    assert queue.drop_no_ack() == 1 and queue.drop_no_ack() == 0


def test_no_ack_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        NodeQueue(no_ack_capacity=0)


# --- real frames --------------------------------------------------------------------------


def test_vector_ack_frames_all_accepted_in_order() -> None:
    """Each recorded session's ACK-mode frames, offered and ACKed one by one, all pass."""
    queues: dict[str, NodeQueue] = {}
    accepted = 0
    for name, direction, data in load_frames():
        if direction != CLOUD_TO_EDGE:
            continue
        message = decode(data)
        message = message.with_resource("node/edge-node-1/" + message.resource)
        if classify_downstream(message) is not Downstream.ACK:
            continue
        queue = queues.setdefault(name, NodeQueue())
        assert queue.offer(message), (name, message.operation, message.resource)
        assert send_and_ack(queue) is message
        accepted += 1
    assert accepted == 13  # 7 + 6 frames in the two recorded sessions
    for queue in queues.values():
        assert len(queue) == 0
        assert queue.known_count == 2  # node and config map; the pod was deleted


def test_release_puts_the_interrupted_key_first_without_back_off() -> None:
    from trio_cloudhub.testing.hub import object_message

    queue = NodeQueue()
    first = object_message("n1", "Pod", "a", rv=1)
    second = object_message("n1", "Pod", "b", rv=2)
    assert queue.offer(first) and queue.offer(second)
    popped = queue.pop_ready(0.0)
    assert popped is first
    queue.release(popped)
    assert queue.next_retry_at() is None
    assert queue.pop_ready(0.0) is first


def test_insert_after_a_pending_withdrawal_is_accepted_and_wins_the_slot() -> None:
    from trio_cloudhub.testing.hub import object_message

    queue = NodeQueue()
    insert = object_message("n1", "ConfigMap", "cfg", rv=5)
    assert queue.offer(insert)
    queue.acked(queue.pop_ready(0.0) or insert)
    withdraw = object_message("n1", "ConfigMap", "cfg", rv=5, operation="delete")
    assert queue.offer(withdraw)
    assert not queue.offer(object_message("n1", "ConfigMap", "cfg", rv=6, operation="update"))
    again = object_message("n1", "ConfigMap", "cfg", rv=5)
    assert queue.offer(again)
    assert queue.pop_ready(0.0) is again
