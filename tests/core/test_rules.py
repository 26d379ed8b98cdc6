from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.vectors import CLOUD_TO_EDGE, EDGE_TO_CLOUD, load_frames
from trio_cloudhub.core.codec import decode
from trio_cloudhub.core.message import Header, Message, Route, new_message
from trio_cloudhub.core.rules import (
    Downstream,
    Upstream,
    as_sent_to,
    classify_downstream,
    classify_upstream,
    control_reply,
    is_to_edge,
    is_volume_resource,
)


def down(
    resource: str,
    operation: str = "update",
    *,
    source: str = "edgecontroller",
    group: str = "resource",
    content: Any = None,
) -> Message:
    return new_message(
        source=source,
        group=group,
        operation=operation,
        resource=resource,
        content=content if content is not None else {"metadata": {"uid": "u1"}},
        now_ms=0,
        resource_version="1",
    )


def up(
    resource: str,
    operation: str = "update",
    *,
    source: str = "edged",
    group: str = "meta",
    content: Any = None,
) -> Message:
    return new_message(
        source=source,
        group=group,
        operation=operation,
        resource=resource,
        content=content,
        now_ms=0,
    )


# --- downstream ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        down("node/n1/default/pod/p", "insert"),
        down("node/n1/default/pod/p", "update"),
        down("node/n1/default/pod/p", "delete"),
        down("node/n1/default/configmap/cm", "update"),
        down("node/n1/default/secret/s", "insert"),
        down("node/n1/null/node/n1", "update"),  # node update needs an ACK
        down("node/n1/default/configmap/cm", "response", content={"metadata": {}}),
        down("node/n1/default/service/svc", "update", source="dynamiccontroller"),
    ],
    ids=lambda m: f"{m.route.source}:{m.operation}:{m.resource}",
)
def test_downstream_ack(message: Message) -> None:
    assert classify_downstream(message) is Downstream.ACK


@pytest.mark.parametrize(
    "message",
    [
        down("node/n1/default/podlist", "update"),
        down("node/n1/membership", "update", source="devicecontroller", group="twin"),
        down("node/n1/device/d1/twin/cloud_updated", "update", source="devicecontroller"),
        down("node/n1/default/serviceaccounttoken/t", "update"),
        down("node/n1/k8s/ca.crt", "response", source="cloudhub", content="PEM"),
        down("node/n1/default/volume/v1", "createvolume"),
        down("node/n1/default/volume/v1", "deletevolume"),
        down("node/n1/default/volume/v1", "controllerpublishvolume"),
        down("node/n1/default/volume/v1", "controllerunpublishvolume"),
        down(
            "node/n1/ignore/Application/ignore", "applicationResponse", source="dynamiccontroller"
        ),
        down("node/n1/default/rule/r", "publish", source="router", group="user"),
        down("node/n1/default/task/t", "upgrade", source="taskmanager", group="taskmanager"),
        down("node/n1/default/job/j", "upgrade", source="nodeupgradejobcontroller"),
        down("node/n1/default/nodestatus/n1", "response", content="OK"),
        down("node/n1/null/node/n1", "insert"),
        down("node/n1/null/node/n1", "response", content={"metadata": {}}),
        down("node/n1/default/lease/n1", "update"),
        down("node/n1/default/nodepatch/n1", "response", content={}),
        down("node/n1/default/podpatch/p", "response", content={}),
        down("node/n1/default/podstatus/p", "update"),
        down("node/n1/null/certificatesigningrequest/c", "response", content={}),
        down("node/n1/default/pod/p", "response", content={"metadata": {}}),
    ],
    ids=lambda m: f"{m.route.source}:{m.operation}:{m.resource}",
)
def test_downstream_no_ack(message: Message) -> None:
    assert classify_downstream(message) is Downstream.NO_ACK


def test_downstream_node_stop() -> None:
    message = down("node/n1/namespace/node/n1", "delete")
    assert classify_downstream(message) is Downstream.NODE_STOP


def test_node_stop_checked_before_no_ack() -> None:
    # A node `delete` would match the no-ACK rule (type node, op != update) if checked first.
    assert classify_downstream(down("node/n1/null/node/n1", "delete")) is Downstream.NODE_STOP


def test_node_delete_from_other_source_is_not_node_stop() -> None:
    message = down("node/n1/null/node/n1", "delete", source="dynamiccontroller")
    assert classify_downstream(message) is Downstream.ACK


@pytest.mark.parametrize("resource", ["default/pod/p", "", "nodes/x/default/pod/p", "node/"])
def test_downstream_without_node_id_dropped(resource: str) -> None:
    assert classify_downstream(down(resource)) is Downstream.DROP


@pytest.mark.parametrize(
    ("resource", "operation"),
    [
        ("node/n1/membership", "get"),
        ("node/n1/device/d/twin", "delta"),
        ("node/n1/device/d/twin", "document"),
        ("node/n1/device/d/twin", "get"),
        ("node/n1/auth_info", "get"),
        ("node/n1/node/n1", "deleted"),
    ],
)
def test_downstream_edgemgr_not_to_edge_dropped(resource: str, operation: str) -> None:
    message = down(resource, operation, source="edgemgr")
    assert not is_to_edge(message)
    assert classify_downstream(message) is Downstream.DROP


def test_is_to_edge_only_filters_edgemgr() -> None:
    assert is_to_edge(down("node/n1/membership", "get", source="devicecontroller"))
    assert is_to_edge(down("node/n1/default/pod/p", "update", source="edgemgr"))


def test_ack_mode_with_group_other_than_resource_dropped() -> None:
    message = down("node/n1/default/device/d", "update", group="twin")
    assert classify_downstream(message) is Downstream.DROP


# --- upstream -----------------------------------------------------------------------------


def test_upstream_empty() -> None:
    message = Message(header=Header(msg_id="", timestamp=0), route=Route(), content=None)
    assert classify_upstream(message) is Upstream.EMPTY


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            up("node", "keepalive", source="websocket", group="resource", content="ping"),
            Upstream.KEEPALIVE,
        ),
        (up("default/pod/p", "ping", source="x"), Upstream.CONTROL),
        (up("default/pod/p", "pong", source="x"), Upstream.CONTROL),
        (up("default/pod/p", "config", source="x"), Upstream.CONTROL),
        (up("default/volume/pvc-1", "response", source="csidriver"), Upstream.VOLUME),
        (up("default/volume/vol.a+b-1", "createvolume"), Upstream.VOLUME),
        (up("default/pod/p", "response", source="edgecontroller", content="OK"), Upstream.ACK),
        (up("default/pod/p", "error", source="metaManager"), Upstream.ERROR),
        (up("bus/topic", "upload", source="router_eventbus", group="user"), Upstream.ROUTER),
        (up("default/x", "prepull", source="edged"), Upstream.TASK),
        (up("default/x", "upgrade", source="edged"), Upstream.TASK),
        (up("default/x", "UpdateNodeActionStatus", source="edged"), Upstream.TASK),
        (up("k8s/ca.crt", "query", source="metaManager"), Upstream.CA_QUERY),
        (up("default/pod/p", "update", source="edgecontroller"), Upstream.CLOUD_SOURCE_DROP),
        (up("default/pod/p", "update", source="cloudhub"), Upstream.CLOUD_SOURCE_DROP),
        (up("default/pod/p", "update", source="cloudStream"), Upstream.CLOUD_SOURCE_DROP),
        (up("default/pod/p", "update", source="devicecontroller"), Upstream.CLOUD_SOURCE_DROP),
        (up("default/pod/p", "update", source="synccontroller"), Upstream.CLOUD_SOURCE_DROP),
        (up("null", "null", source="metaserver", group="dynamiccontroller"), Upstream.APPLICATION),
        (up("default/configmap/cm", "query", source="metaManager"), Upstream.QUERY),
        (up("default/nodestatus/n1", "update"), Upstream.REPORT),
        (up("default/nodestatus/n1", "insert"), Upstream.REPORT),
        (up("default/podstatus", "update"), Upstream.REPORT),
        (up("default/podstatus/p", "patch"), Upstream.REPORT),
        (up("default/event/e", "insert"), Upstream.OTHER),
        (up("membership/detail", "get", source="twin", group="twin"), Upstream.OTHER),
    ],
    ids=lambda v: (
        f"{v.route.source}:{v.operation}:{v.resource}" if isinstance(v, Message) else str(v.name)
    ),
)
def test_upstream_classification(message: Message, expected: Upstream) -> None:
    assert classify_upstream(message) is expected


def test_upstream_order_response_beats_cloud_source_filter() -> None:
    # Edge ACKs copy the acked message's source (edgecontroller): still an ACK.
    ack = up("default/pod/p", "response", source="edgecontroller", group="resource")
    assert classify_upstream(ack) is Upstream.ACK


def test_upstream_order_keepalive_first() -> None:
    message = up("default/volume/v", "keepalive", source="websocket")
    assert classify_upstream(message) is Upstream.KEEPALIVE


def test_upstream_ca_query_exact_resource_only() -> None:
    assert classify_upstream(up("x/k8s/ca.crt", "query")) is Upstream.QUERY


@pytest.mark.parametrize(
    ("resource", "matches"),
    [
        ("default/volume/pvc-1", True),
        ("ns_1/volume/id.with+chars", True),
        ("default/volume/", False),
        ("/volume/x", False),
        ("-ns/volume/x", False),
        ("default/volumes/x", False),
        ("node/n1/default/volume/x", False),  # prefixed: not an edge resource
        ("dé/volume/x", False),  # Go's \w is ASCII
    ],
)
def test_volume_regex(resource: str, matches: bool) -> None:
    assert is_volume_resource(resource) is matches


def test_control_reply() -> None:
    request = up("default/pod/p", "ping", source="src", group="grp")
    reply = control_reply(request, now_ms=1234)
    assert reply.operation == "response"
    assert reply.content == "ack"
    assert reply.header.parent_msg_id == request.msg_id
    assert reply.header.timestamp == 1234
    assert reply.msg_id and reply.msg_id != request.msg_id
    assert (reply.route.source, reply.route.group, reply.resource) == (
        "src",
        "grp",
        "default/pod/p",
    )


# --- real frames recorded between CloudCore v1.23.1 and EdgeCore --------------------------

FRAMES = load_frames()


def expected_downstream(message: Message) -> Downstream:
    if message.operation == "applicationResponse":
        return Downstream.NO_ACK
    return Downstream.ACK


def test_vectors_cover_both_directions_and_both_edges() -> None:
    files = {name for name, _, _ in FRAMES}
    assert len(files) >= 2
    assert {direction for _, direction, _ in FRAMES} == {CLOUD_TO_EDGE, EDGE_TO_CLOUD}


@pytest.mark.parametrize(
    ("name", "data"),
    [(name, data) for name, direction, data in FRAMES if direction == CLOUD_TO_EDGE],
)
def test_vector_cloud_to_edge_classified_as_cloudcore_sent_it(name: str, data: str) -> None:
    message = decode(data)
    cloud_side = message.with_resource("node/edge-node-1/" + message.resource)
    assert classify_downstream(cloud_side) is expected_downstream(message), name


def test_vector_cloud_to_edge_kinds() -> None:
    seen: Counter[tuple[str, Downstream]] = Counter()
    for _, direction, data in FRAMES:
        if direction == CLOUD_TO_EDGE:
            message = decode(data)
            kind = message.resource.split("/")[1]
            cloud_side = message.with_resource("node/edge-node-1/" + message.resource)
            seen[(f"{kind}:{message.operation}", classify_downstream(cloud_side))] += 1
    assert seen[("Application:applicationResponse", Downstream.NO_ACK)] >= 6
    for kind in ("node:update", "pod:insert", "configmap:update", "pod:delete", "pod:update"):
        assert seen[(kind, Downstream.ACK)] >= 2, kind


@pytest.mark.parametrize(
    ("name", "data"),
    [(name, data) for name, direction, data in FRAMES if direction == EDGE_TO_CLOUD],
)
def test_vector_edge_to_cloud_classified(name: str, data: str) -> None:
    message = decode(data)
    expected = {
        "keepalive": Upstream.KEEPALIVE,
        "response": Upstream.ACK,
        "null": Upstream.APPLICATION,
        "": Upstream.EMPTY,
    }[message.operation]
    assert classify_upstream(message) is expected, name


def test_vector_acks_answer_cloud_messages() -> None:
    sent: set[str] = set()
    for _, direction, data in FRAMES:
        message = decode(data)
        if direction == CLOUD_TO_EDGE:
            sent.add(message.msg_id)
        elif classify_upstream(message) is Upstream.ACK:
            assert message.header.parent_msg_id in sent


def _object_insert() -> Message:
    return new_message(
        source="edgecontroller",
        group="resource",
        operation="insert",
        resource="node/n1/default/configmap/cfg",
        content={"metadata": {"uid": "u1", "resourceVersion": "5"}},
        now_ms=0,
        resource_version="5",
    )


@pytest.mark.parametrize(
    ("acked", "operation"), [(None, "insert"), ("0", "update"), ("4", "update")]
)
def test_an_insert_of_what_the_node_may_hold_goes_as_update(
    acked: str | None, operation: str
) -> None:
    message = _object_insert()
    sent = as_sent_to(message, acked)
    assert sent.operation == operation
    assert (sent.msg_id, sent.resource, sent.content) == (
        message.msg_id,
        message.resource,
        message.content,
    )


def test_only_inserts_change_operation() -> None:
    message = _object_insert().with_operation("delete")
    assert as_sent_to(message, "4") is message
