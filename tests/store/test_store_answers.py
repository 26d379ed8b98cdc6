"""Edge requests answered by the local store: metaServer Applications against the recorded
CloudCore answers, metamanager queries, and status reports read back for the CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.store.conftest import config_map, node, pod, running_store, write_manifest
from tests.vectors import CLOUD_TO_EDGE, EDGE_TO_CLOUD, load_frames
from trio_cloudhub.core.codec import decode
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.store.answers import go_map_json
from trio_cloudhub.store.base import StoreError
from trio_cloudhub.store.local import open_local_store, read_reports

Dirs = tuple[Path, Path]
NODE = "edge-node-1"


def recorded_applications() -> list[tuple[str, Message, Message]]:
    """(file, request, CloudCore's answer) for every recorded metaServer Application."""
    frames = load_frames()
    requests = {}
    pairs = []
    for name, direction, data in frames:
        message = decode(data)
        if direction == EDGE_TO_CLOUD and message.route.source == "metaserver":
            requests[message.msg_id] = message
        elif direction == CLOUD_TO_EDGE and message.route.operation == "applicationResponse":
            pairs.append((name, requests[message.header.parent_msg_id], message))
    assert len(pairs) == 6
    return pairs


def capture_manifests(manifests: Path) -> None:
    """The objects of the recorded scenario."""
    cm = config_map("cm-capture", {"app.conf": "debug=false", "key1": "value1"})
    sec = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "secret-capture"},
        "data": {"username": "YWRtaW4="},
    }
    volumes = [
        {"name": "cfg", "configMap": {"name": "cm-capture"}},
        {"name": "sec", "secret": {"secretName": "secret-capture"}},
    ]
    write_manifest(
        manifests,
        "capture.yaml",
        node(NODE),
        cm,
        sec,
        pod("pod-capture", NODE, volumes=volumes),
        pod("elsewhere", "edge-9"),
        config_map("other-ns", namespace="kube-system"),
    )


def resp_body(content: dict[str, Any]) -> Any:
    text = base64.b64decode(content["RespBody"]).decode()
    assert text == go_map_json(json.loads(text))  # Go map JSON: sorted keys, compact
    return json.loads(text)


@pytest.mark.parametrize("index", range(6))
async def test_application_answer_has_the_recorded_shape(dirs: Dirs, index: int) -> None:
    data, manifests = dirs
    capture_manifests(manifests)
    _name, request, recorded = recorded_applications()[index]
    async with running_store(data, manifests) as hub:
        answer = await hub.store.answer_query(NODE, request)
    assert answer is not None
    assert answer.route == recorded.route.__class__(
        source="dynamiccontroller",
        group="resource",
        operation="applicationResponse",
        resource=f"node/{NODE}/ignore/Application/ignore",
    )
    assert answer.header.parent_msg_id == request.msg_id
    assert list(answer.content) == list(recorded.content)
    for field, value in recorded.content.items():
        if field != "RespBody":
            assert answer.content[field] == value, field
    ours, theirs = resp_body(answer.content), resp_body(recorded.content)
    assert list(ours) == list(theirs)
    if request.content["Verb"] == "list":
        assert ours["kind"] == "PodList" and ours["metadata"]["resourceVersion"].isdigit()
        assert [item["metadata"]["name"] for item in ours["items"]] == ["elsewhere", "pod-capture"]
    else:
        assert ours["metadata"]["name"] == theirs["metadata"]["name"]
        assert ours["data"] == {k: theirs["data"][k] for k in ours["data"]}


def application(key: str, verb: str = "get", option: dict[str, Any] | None = None) -> Message:
    content = {
        "ID": "id",
        "Key": key,
        "Verb": verb,
        "Nodename": NODE,
        "Option": base64.b64encode(json.dumps(option or {}).encode()).decode(),
        "ReqBody": None,
        "Status": "InApplying",
        "Reason": "",
        "RespBody": "",
    }
    return new_message(
        source="metaserver",
        group="dynamiccontroller",
        operation="null",
        resource="null",
        content=content,
        now_ms=1,
    )


async def test_application_not_found_unsupported_and_selectors(dirs: Dirs) -> None:
    data, manifests = dirs
    capture_manifests(manifests)
    async with running_store(data, manifests) as hub:
        store = hub.store
        missing = await store.answer_query(NODE, application("/core/v1/configmaps/default/nope"))
        watch = await store.answer_query(NODE, application("/core/v1/pods/default/null", "watch"))
        deploy = await store.answer_query(NODE, application("/apps/v1/deployments/default/d"))
        mine = await store.answer_query(
            NODE,
            application(
                "/core/v1/pods/null/null", "list", {"fieldSelector": f"spec.nodeName={NODE}"}
            ),
        )
        node_get = await store.answer_query(NODE, application(f"/core/v1/nodes/null/{NODE}"))
        not_app = await store.answer_query(
            NODE,
            new_message(
                source="metaserver",
                group="dynamiccontroller",
                operation="null",
                resource="null",
                content="junk",
                now_ms=1,
            ),
        )
    assert missing is not None and missing.content["Status"] == "Rejected"
    assert missing.content["Reason"] == 'configmaps "nope" not found'
    assert missing.content["Error"] == {
        "ErrStatus": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'configmaps "nope" not found',
            "reason": "NotFound",
            "details": {"name": "nope", "kind": "configmaps"},
            "code": 404,
        }
    }
    assert missing.content["Subresource"] == "" and missing.content["Timestamp"].startswith("0001")
    assert watch is not None and watch.content["Status"] == "Rejected"
    assert watch.content["Error"]["ErrStatus"]["code"] == 405 and "watch" in watch.content["Reason"]
    assert deploy is not None and deploy.content["Error"]["ErrStatus"]["reason"] == "NotFound"
    assert mine is not None
    assert [i["metadata"]["name"] for i in resp_body(mine.content)["items"]] == ["pod-capture"]
    assert node_get is not None and resp_body(node_get.content)["kind"] == "Node"
    assert not_app is None


def query(resource: str) -> Message:
    return new_message(
        source="metaManager",
        group="meta",
        operation="query",
        resource=resource,
        content=None,
        now_ms=1,
    )


async def test_metamanager_query_answers_with_the_object_or_an_error(dirs: Dirs) -> None:
    data, manifests = dirs
    capture_manifests(manifests)
    async with running_store(data, manifests) as hub:
        store = hub.store
        request = query("default/configmap/cm-capture")
        found = await store.answer_query(NODE, request)
        node_found = await store.answer_query(NODE, query(f"null/node/{NODE}"))
        missing = await store.answer_query(NODE, query("default/secret/nope"))
        other = await store.answer_query(NODE, query("default/serviceaccounttoken/x"))
    assert found is not None
    assert (found.route.source, found.route.group, found.route.operation) == (
        "edgecontroller",
        "resource",
        "response",
    )
    assert found.route.resource == f"node/{NODE}/default/configmap/cm-capture"
    assert found.header.parent_msg_id == request.msg_id
    assert found.content["data"]["key1"] == "value1"
    assert found.header.resource_version == found.content["metadata"]["resourceVersion"]
    assert node_found is not None and node_found.content["kind"] == "Node"
    assert missing is not None and missing.content == 'secret "nope" not found'
    assert missing.route.resource == f"node/{NODE}/default/secret/nope"
    assert other is None


def report(resource: str, content: Any) -> Message:
    return new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=resource,
        content=content,
        now_ms=1,
    )


async def test_reports_are_stored_answered_and_readable(dirs: Dirs) -> None:
    data, manifests = dirs
    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    running = {"phase": "Running", "containerStatuses": [{"name": "app", "ready": True}]}
    async with open_local_store(data, manifests) as store:
        status = report(
            "default/nodestatus/edge-1", {"UID": "u", "Status": ready, "ExtendResources": None}
        )
        reply = await store.apply_report("edge-1", status)
        assert reply is not None
        assert (reply.route.source, reply.route.group, reply.route.operation) == (
            "edgecontroller",
            "resource",
            "response",
        )
        assert reply.route.resource == "node/edge-1/default/nodestatus/edge-1"
        assert reply.content == "OK" and reply.header.parent_msg_id == status.msg_id
        one = report("default/podstatus/web", {"UID": "p1", "Name": "web", "Status": running})
        assert await store.apply_report("edge-1", one) is not None
        many = [{"UID": "p2", "Name": "db", "Status": {"phase": "Pending"}}]
        assert await store.apply_report("edge-1", report("default/podstatus", many)) is not None
        # Someone else's status, a nameless pod, junk: ignored, never stored.
        assert await store.apply_report("edge-2", status) is None
        assert await store.apply_report("edge-1", report("default/podstatus", [{"x": 1}])) is None
        assert await store.apply_report("edge-1", report("default/podstatus/a", "%%")) is None
        assert (
            await store.apply_report(
                "edge-1", report("default/podstatus/big", {"Name": "big", "x": "y" * 300_000})
            )
            is None
        )
    nodes = read_reports(data, "nodes")
    assert [(r.name, r.node, r.summary) for r in nodes] == [("edge-1", "edge-1", "Ready")]
    pods = read_reports(data, "podstatus")
    assert [(r.namespace, r.name, r.node, r.summary) for r in pods] == [
        ("default", "db", "edge-1", "Pending"),
        ("default", "web", "edge-1", "Running (1/1 ready)"),
    ]
    assert pods[1].updated.tzinfo is not None and pods[1].body["UID"] == "p1"


def test_read_reports_without_a_database_and_with_a_bad_kind(tmp_path: Path) -> None:
    assert read_reports(tmp_path, "pods") == []
    with pytest.raises(StoreError):
        read_reports(tmp_path, "deployments")
