"""Replays of the sessions recorded between real CloudCore v1.23.1 and EdgeCore (v1.23/v1.10).

The objects CloudCore sent become manifests of the embedded store; the hub then must send the
same events in the same shape (route, header fields, object), answer the edge's recorded
Application queries in the recorded shape, and take every recorded edge frame without error.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.vectors import VECTORS_DIR
from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message
from trio_cloudhub.edge.memory import MemoryEdgeEnd
from trio_cloudhub.store.local import LocalStore
from trio_cloudhub.testing.hub import ack_for, open_test_hub

NODE = "edge-node-1"
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation")
SESSIONS = sorted(path.name for path in VECTORS_DIR.glob("*.jsonl"))


def recorded(name: str) -> list[tuple[str, str]]:
    lines = (VECTORS_DIR / name).read_text().splitlines()
    return [(entry["dir"], entry["data"]) for entry in map(json.loads, lines)]


def decoded(frames: list[tuple[str, str]], direction: str) -> list[Message]:
    return [codec.decode(data) for way, data in frames if way == direction]


def as_manifest(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in obj["metadata"].items() if k not in SERVER_FIELDS}
    metadata.pop("deletionTimestamp", None)
    metadata.pop("deletionGracePeriodSeconds", None)
    return {**obj, "metadata": metadata}


def manifests_from(cloud: list[Message]) -> dict[str, dict[str, Any]]:
    """The first full object CloudCore sent (or returned) for each name."""
    objects: dict[str, dict[str, Any]] = {}
    for message in cloud:
        content = message.content
        if message.operation == "applicationResponse":
            body = json.loads(base64.b64decode(content["RespBody"]))
            items = body.get("items", [body])
        else:
            items = [content]
        for item in items:
            objects.setdefault(item["metadata"]["name"], as_manifest(item))
    return objects


async def next_message(edge: MemoryEdgeEnd) -> Message:
    with trio.fail_after(10):
        return codec.decode(await edge.receive())


def shape(message: Message) -> dict[str, Any]:
    return {
        "header": sorted(codec.header_to_dict(message.header)),
        "route": codec.route_to_dict(message.route),
    }


def same_object(ours: dict[str, Any], theirs: dict[str, Any], data: bool = True) -> None:
    for key in ("apiVersion", "kind"):
        assert ours[key] == theirs[key]
    for key in ("name", "namespace", "labels"):
        assert ours["metadata"].get(key) == theirs["metadata"].get(key)
    for key in ("spec", "data") if data else ("spec",):
        assert ours.get(key) == theirs.get(key)


@pytest.mark.parametrize("session", SESSIONS)
async def test_replayed_session_gets_cloudcore_shaped_frames(tmp_path: Path, session: str) -> None:
    frames = recorded(session)
    cloud, edge_frames = decoded(frames, "cloud->edge"), decoded(frames, "edge->cloud")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for name, obj in manifests_from(cloud).items():
        (manifests / f"{name}.json").write_text(json.dumps(obj))
    store = LocalStore(tmp_path / "data", manifests, poll_interval=0.05)

    with trio.fail_after(60):
        async with open_test_hub(store) as th:
            edge = await th.connect(NODE)
            await check_initial_delivery(edge, cloud)
            await check_application_answers(edge, cloud, edge_frames)
            await replay_every_edge_frame(th.hub.sessions, edge, frames)


async def check_initial_delivery(edge: MemoryEdgeEnd, cloud: list[Message]) -> None:
    """Node, config map, secret and pod arrive once each, CloudCore-shaped, and are ACKed."""
    first_of = {}
    for message in cloud:
        if message.operation in ("insert", "update"):
            first_of.setdefault(message.resource, message)
    expected = {"null/node/" + NODE, "default/pod/pod-capture", "default/configmap/cm-capture"}
    assert expected <= set(first_of)
    seen: dict[str, Message] = {}
    while len(seen) < 4:
        ours = await next_message(edge)
        seen[ours.resource] = ours
        await edge.send(codec.encode(ack_for(ours)))
    assert set(seen) == expected | {"default/secret/secret-capture"}
    for resource in expected:
        ours, theirs = seen[resource], first_of[resource]
        assert ours.route.source == theirs.route.source == "edgecontroller"
        assert ours.route.group == theirs.route.group == "resource"
        assert sorted(codec.header_to_dict(ours.header)) == sorted(
            codec.header_to_dict(theirs.header)
        )
        assert ours.content["metadata"]["resourceVersion"] == ours.header.resource_version
        # The recorded config map frame is an edit; the manifest holds the first version.
        same_object(ours.content, theirs.content, data="configmap" not in resource)
    # CloudCore sends nodes as update, pods as insert; we push config maps as insert (spec 15).
    assert seen["null/node/" + NODE].operation == "update"
    assert seen["default/pod/pod-capture"].operation == "insert"


async def check_application_answers(
    edge: MemoryEdgeEnd, cloud: list[Message], edge_frames: list[Message]
) -> None:
    answers = {m.header.parent_msg_id: m for m in cloud if m.operation == "applicationResponse"}
    requests = [m for m in edge_frames if m.route.source == "metaserver"]
    assert len(requests) == 3
    for request in requests:
        await edge.send(codec.encode(request))
        ours, theirs = await next_message(edge), answers[request.msg_id]
        assert shape(ours) == shape(theirs)
        assert ours.header.parent_msg_id == request.msg_id
        assert list(ours.content) == list(theirs.content)
        assert ours.content["Status"] == theirs.content["Status"] == "Approved"
        our_body = json.loads(base64.b64decode(ours.content["RespBody"]))
        their_body = json.loads(base64.b64decode(theirs.content["RespBody"]))
        assert list(our_body) == sorted(our_body), "RespBody is a Go map: sorted keys"
        if "items" in their_body:
            names = [
                [item["metadata"]["name"] for item in body["items"]]
                for body in (our_body, their_body)
            ]
            assert names[0] == names[1]
            assert our_body["kind"] == their_body["kind"]
        else:
            same_object(our_body, their_body)


async def replay_every_edge_frame(
    sessions: dict[str, Any], edge: MemoryEdgeEnd, frames: list[tuple[str, str]]
) -> None:
    """Every recorded edge frame, byte for byte: stale ACKs, queries, the empty message."""
    for way, data in frames:
        if way == "edge->cloud":
            await edge.send(data)
    await trio.testing.wait_all_tasks_blocked()
    replies = 0
    with trio.move_on_after(1):
        while True:
            reply = await next_message(edge)
            assert reply.operation == "applicationResponse"
            replies += 1
    assert replies == 3
    assert NODE in sessions
