"""Handing a change's deliveries to the hub, the same way for every store."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from trio_cloudhub.store.base import Deliver
from trio_cloudhub.store.reconcile import now_ms
from trio_cloudhub.store.routing import Delivery, is_node_stop, to_message

SEND_BATCH = 256  # messages handed over between checkpoints


async def hand_over(
    deliveries: Iterable[Delivery], deliver: Deliver, forget_node: Callable[[str], None]
) -> None:
    """In order, straight into the hub's node queues; a checkpoint every SEND_BATCH messages
    so a large change never holds the scheduler for long. A node stop first forgets the
    node's ack points (`forget_node`), as KubeEdge garbage-collects its ObjectSyncs."""
    for count, delivery in enumerate(deliveries, start=1):
        if is_node_stop(delivery):
            forget_node(delivery.node)
        deliver(to_message(delivery, now_ms()))
        if count % SEND_BATCH == 0:
            await trio.lowlevel.checkpoint()
