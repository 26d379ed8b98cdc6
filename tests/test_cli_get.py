"""`get`'s pieces without a hub: kubectl's ages, aligned columns, merging several hubs'
answers, and the admin endpoint's answers over HTTP (loopback only, bad answers named)."""

from __future__ import annotations

import datetime
import json
from functools import partial
from typing import Any

import pytest
import trio

from trio_cloudhub import cli_get
from trio_cloudhub.metrics import Metrics, _answer, _Routes, serve_metrics

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)


def ago(seconds: float) -> str:
    return (NOW - datetime.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-0.5, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (125, "2m5s"),
        (600, "10m"),
        (179 * 60 + 59, "179m"),
        (3 * 3600, "3h"),
        (7 * 3600 + 59 * 60, "7h59m"),
        (47 * 3600, "47h"),
        (2 * 86400 + 3 * 3600, "2d3h"),
        (9 * 86400, "9d"),
        (3 * 365 * 86400 + 86400, "3y1d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_ages_read_like_kubectls(seconds: float, text: str) -> None:
    assert cli_get.human_age(seconds) == text


def node(name: str, status: str, since: str | None, **fields: Any) -> dict[str, Any]:
    item = {"name": name, "status": status, "since": since, "transport": "", "remote": ""}
    item.update(waiting=0, lastAck=None, lastKeepalive=None, hub=1)
    return item | fields


def test_the_table_is_aligned_like_kubectls() -> None:
    items = [
        node(
            "edge-1",
            "Connected",
            ago(75),
            transport="websocket",
            remote="10.0.0.7:53122",
            waiting=3,
            lastAck=ago(2),
            lastKeepalive=ago(14),
        ),
        node("edge-10", "NeverConnected", None),
        node("e", "Disconnected", None),  # a session whose end was not recorded
    ]
    assert cli_get.render("nodes", items, [], None, NOW) == (
        "NAME      STATUS           SINCE       TRANSPORT   REMOTE           WAITING   LAST-ACK"
        "   LAST-KEEPALIVE\n"
        "edge-1    Connected        75s         websocket   10.0.0.7:53122   3         2s"
        "         14s\n"
        "edge-10   NeverConnected   <none>      <none>      <none>           0         <none>"
        "     <none>\n"
        "e         Disconnected     <unknown>   <none>      <none>           0         <none>"
        "     <none>\n"
    )


def test_json_and_yaml_carry_the_items_and_the_hubs() -> None:
    items = [node("edge-1", "Connected", ago(1))]
    hubs = [{"pid": 7, "store": "local", "started": ago(60), "url": "http://127.0.0.1:9"}]
    doc = json.loads(cli_get.render("nodes", items, hubs, "json", NOW))
    assert doc == {
        "apiVersion": "trio-cloudhub/v1",
        "kind": "NodeList",
        "hubs": hubs,
        "items": items,
    }
    assert "kind: NodeList" in cli_get.render("nodes", items, hubs, "yaml", NOW)


def test_merging_prefers_the_session_then_the_newest_record() -> None:
    a = {
        "items": [
            node("n1", "Disconnected", ago(5), hub=1),
            node("n2", "Connected", ago(50), hub=1),
            node("n3", "Disconnected", ago(100), hub=1),
        ]
    }
    b = {
        "items": [
            node("n1", "Connected", ago(300), hub=2),
            node("n2", "Connected", ago(10), hub=2),
            node("n3", "Disconnected", ago(20), hub=2),
            "junk",
            {"name": 5},
        ]
    }
    merged = {item["name"]: item["hub"] for item in cli_get.merge_nodes([a, b])}
    assert merged == {"n1": 2, "n2": 2, "n3": 2}
    assert [item["name"] for item in cli_get.merge_nodes([b, a])] == ["n1", "n2", "n3"]


async def admin_server(routes: dict[str, Any], nursery: trio.Nursery) -> str:
    port = await nursery.start(partial(serve_metrics, Metrics(), "127.0.0.1", 0, admin=routes))
    return f"http://127.0.0.1:{port}"


async def test_a_hub_whose_answer_is_not_an_admin_answer_is_named() -> None:
    async def not_a_list() -> Any:
        return {"nope": 1}

    async def failing() -> Any:
        raise RuntimeError("boom")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await admin_server({"/admin/nodes": not_a_list, "/admin/pods": failing}, nursery)
            endpoint = cli_get.Endpoint(url)
            with pytest.raises(cli_get.HubNotReachable, match="not a trio-cloudhub admin answer"):
                await trio.to_thread.run_sync(cli_get.fetch, endpoint, "/admin/nodes")
            with pytest.raises(cli_get.HubNotReachable, match="answered 500: admin /admin/pods"):
                await trio.to_thread.run_sync(cli_get.fetch, endpoint, "/admin/pods")
            with pytest.raises(cli_get.HubNotReachable, match="answered 404"):
                await trio.to_thread.run_sync(cli_get.fetch, endpoint, "/admin/other")
            nursery.cancel_scope.cancel()


async def test_nothing_listening_is_named_with_the_url() -> None:
    with trio.fail_after(10):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await listener.aclose()  # a port nobody listens on now
        endpoint = cli_get.Endpoint(f"http://127.0.0.1:{port}", pid=42)
        with pytest.raises(cli_get.HubNotReachable, match=rf"127.0.0.1:{port} \(hub pid 42\)"):
            await trio.to_thread.run_sync(cli_get.fetch, endpoint, "/admin/nodes")


async def test_the_admin_paths_answer_loopback_clients_only() -> None:
    import h11

    async def nodes() -> Any:
        return {"items": []}

    routes = _Routes(Metrics(), {"/admin/nodes": nodes})
    request = h11.Request(method="GET", target="/admin/nodes", headers=[("Host", "x")])
    status, _, body = await _answer(routes, request, loopback=False)
    assert (status, body) == (403, b"the admin endpoint answers loopback clients only\n")
    status, content_type, body = await _answer(routes, request, loopback=True)
    assert (status, content_type, json.loads(body)) == (200, "application/json", {"items": []})
    post = h11.Request(method="POST", target="/admin/nodes", headers=[("Host", "x")])
    assert (await _answer(routes, post, loopback=True))[0] == 405
