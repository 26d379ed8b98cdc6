"""The hub's side of `get nodes`: sessions reported to the store, what the admin list says of
connected, replaced, disconnected and never-connected nodes (in-process, memory edges)."""

from __future__ import annotations

import trio
import trio.testing

from trio_cloudhub.core import codec
from trio_cloudhub.hub.admin import HubIdentity, node_list
from trio_cloudhub.testing.hub import ack_for, keepalive_message, object_message, open_test_hub


async def test_the_node_list_follows_sessions_keepalives_acks_and_queues() -> None:
    identity = HubIdentity(pid=1, store="local", started="")
    with trio.fail_after(10):
        async with open_test_hub() as th:
            await th.publish(object_message("away", "Pod", "p", rv=1))
            edge = await th.connect("n1")
            await th.publish(object_message("n1", "Pod", "web", rv=7))
            sent = codec.decode(await edge.receive())
            await edge.send(codec.encode(ack_for(sent)))
            await edge.send(codec.encode(keepalive_message()))
            await trio.testing.wait_all_tasks_blocked()
            items = {item["name"]: item for item in (await node_list(th.hub, identity))["items"]}
            n1 = items["n1"]
            assert (n1["status"], n1["transport"], n1["remote"]) == (
                "Connected",
                "memory",
                "memory:n1",
            )
            assert n1["lastAck"] and n1["lastKeepalive"] and n1["since"] and n1["hub"] == 1
            assert (n1["waiting"], n1["behind"]) == (0, 0)
            away = items["away"]
            assert (away["status"], away["since"], away["waiting"]) == ("NeverConnected", None, 1)

            replacing = await th.connect("n1")  # a reconnect replaces the session
            record = th.store.records["n1"]
            assert record.session_open  # the old session's end does not end the new one
            await replacing.aclose()
            await trio.testing.wait_all_tasks_blocked()
            after = (await node_list(th.hub, identity))["items"]
            n1 = next(item for item in after if item["name"] == "n1")
            assert n1["status"] == "Disconnected" and n1["since"] == n1["lastDisconnect"]["at"]
            assert n1["lastAck"]  # kept from the session that got it
            assert th.store.records["n1"].first_connected_ms <= th.store.records["n1"].connected_ms
