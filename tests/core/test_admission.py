"""Status ownership of an authenticated edge: what it may report, patch and ask for.

The recorded sessions (tests/vectors.py) hold keepalives, ACKs and metaServer Applications but
no status report: that edge ran without edged. Status messages are therefore built in the
shapes EdgeCore's own code sends (v1.10.0 edged and metaManager, v1.23.1 kubelet bridge), and
Application writes start from a recorded Application with the fields EdgeCore sets for writes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs
import pytest

from tests.vectors import EDGE_TO_CLOUD, load_frames
from trio_cloudhub.core.admission import admission_problem
from trio_cloudhub.core.codec import decode
from trio_cloudhub.core.message import Message, new_message

NODE = "edge-node-1"  # the node of the recorded sessions
PODS = {
    ("default", "web"): NODE,
    ("default", "db"): NODE,
    ("kube-system", "proxy"): NODE,
    ("default", "elsewhere"): "edge-node-2",
    ("default", "pending"): "",  # not scheduled yet
}
EDGE_MESSAGES = [
    (name, decode(data)) for name, direction, data in load_frames() if direction == EDGE_TO_CLOUD
]
APPLICATIONS = [m for _, m in EDGE_MESSAGES if m.route.source == "metaserver"]


def pod_node(namespace: str, name: str) -> str | None:
    return PODS.get((namespace, name))


def check(message: Message, node: str = NODE) -> str | None:
    return admission_problem(node, message, pod_node)


def edge(resource: str, operation: str, content: Any, source: str = "edged") -> Message:
    """An upstream message as EdgeCore's metaclient builds it (group `meta`)."""
    return new_message(
        source=source,
        group="meta",
        operation=operation,
        resource=resource,
        content=content,
        now_ms=1,
    )


def pod_status(name: str) -> dict[str, Any]:
    """edgeapi.PodStatusRequest as v1.10 edged's status manager fills it."""
    return {"UID": f"uid-{name}", "Name": name, "Status": {"phase": "Running"}}


def go_bytes(value: Any) -> str:
    """A Go []byte field holding JSON, as it appears inside a message."""
    return b64(json.dumps(value))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


DEEP = "[" * 100_000  # json raises RecursionError on it, not ValueError


def application(verb: str, key: str, **fields: Any) -> Message:
    """A recorded v1.23 Application turned into a write the way metaServer builds one."""
    template = next(m for m in APPLICATIONS if "Subresource" in m.content)
    content = {**template.content, "Verb": verb, "Key": key, **fields}
    return attrs.evolve(template, content=content)


def node_patch_info(name: str) -> str:
    return go_bytes(
        {
            "Name": name,
            "PatchType": "application/strategic-merge-patch+json",
            "Data": go_bytes({"status": {"conditions": []}}),
            "Options": {},
            "Subresources": ["status"],
        }
    )


# --- the recorded sessions --------------------------------------------------------------------


def test_vectors_hold_edge_messages_of_both_sessions() -> None:
    assert {name for name, _ in EDGE_MESSAGES} == {
        "cloudcore-v1.23.1_edgecore-v1.10.0.jsonl",
        "cloudcore-v1.23.1_edgecore-v1.23.1.jsonl",
    }
    assert len(APPLICATIONS) == 6


@pytest.mark.parametrize(("name", "message"), EDGE_MESSAGES)
def test_every_recorded_edge_message_is_admitted(name: str, message: Message) -> None:
    assert check(message) is None


@pytest.mark.parametrize("message", [m for _, m in EDGE_MESSAGES if m not in APPLICATIONS])
def test_recorded_keepalives_and_acks_are_admitted_for_any_node(message: Message) -> None:
    assert check(message, node="edge-node-2") is None


@pytest.mark.parametrize("message", APPLICATIONS)
def test_recorded_application_from_another_node_is_refused(message: Message) -> None:
    problem = check(message, node="edge-node-2")
    assert problem == "Application for node 'edge-node-1' from node 'edge-node-2'"


def test_application_without_nodename_is_refused() -> None:
    (message, *_) = APPLICATIONS
    content = {k: v for k, v in message.content.items() if k != "Nodename"}
    assert check(attrs.evolve(message, content=content)) is not None


# --- node status ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "operation", "content"),
    [
        # v1.10 edged: register (the Node object), then NodeStatusRequest updates.
        (f"default/nodestatus/{NODE}", "insert", {"kind": "Node", "metadata": {"name": NODE}}),
        (
            f"default/nodestatus/{NODE}",
            "update",
            {"UID": "u", "Status": {}, "ExtendResources": None},
        ),
        # v1.23 kubelet bridge: register and update the Node, patch its status (text).
        (f"null/node/{NODE}", "insert", {"kind": "Node", "metadata": {"name": NODE}}),
        (f"null/node/{NODE}", "update", {"kind": "Node", "metadata": {"name": NODE}}),
        (f"null/nodepatch/{NODE}", "patch", '{"status":{"conditions":[]}}'),
    ],
)
def test_node_reports_its_own_status(resource: str, operation: str, content: Any) -> None:
    assert check(edge(resource, operation, content)) is None
    other = resource.replace(NODE, "edge-node-2")
    kind = resource.split("/")[1]
    problem = check(edge(other, operation, content))
    assert problem == f"{kind} of node 'edge-node-2' from node '{NODE}'"


def test_node_status_without_a_name_is_refused() -> None:
    assert check(edge("default/nodestatus", "update", {"UID": "u"})) is not None


def test_reading_another_node_is_admitted() -> None:
    assert check(edge("null/node/edge-node-2", "query", None)) is None


# --- pod status -------------------------------------------------------------------------------


def test_pod_status_of_own_pod_is_admitted() -> None:
    assert check(edge("default/podstatus/web", "update", pod_status("web"))) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("elsewhere", "status of pod default/elsewhere bound to node 'edge-node-2', not '{NODE}'"),
        ("pending", "status of pod default/pending bound to node '', not '{NODE}'"),
        ("ghost", "status of unknown pod default/ghost"),
    ],
)
def test_pod_status_of_a_pod_not_bound_here_is_refused(name: str, problem: str) -> None:
    message = edge(f"default/podstatus/{name}", "update", pod_status(name))
    assert check(message) == problem.format(NODE=NODE)


def test_content_name_is_checked_not_only_the_resource() -> None:
    # The store keys a report on the content's Name: a foreign Name under our resource fails.
    message = edge("default/podstatus/web", "update", pod_status("elsewhere"))
    assert check(message) is not None


def test_multi_pod_status_from_metamanager_resync() -> None:
    # v1.10 metaManager's syncPodStatus: `<ns>/podstatus`, a list of PodStatusRequest.
    ours = [pod_status("web"), pod_status("db")]
    message = edge("default/podstatus", "update", ours, source="metaManager")
    assert check(message) is None
    mixed = [pod_status("web"), pod_status("ghost"), pod_status("elsewhere")]
    refused = edge("default/podstatus", "update", mixed, source="metaManager")
    assert check(refused) == "status of unknown pod default/ghost"


def test_pod_namespace_comes_from_the_resource() -> None:
    message = edge("kube-system/podstatus/proxy", "update", pod_status("proxy"))
    assert check(message) is None
    assert check(edge("kube-system/podstatus/web", "update", pod_status("web"))) is not None


def test_pod_status_content_as_go_bytes_or_json_text() -> None:
    assert check(edge("default/podstatus", "update", go_bytes([pod_status("web")]))) is None
    text = json.dumps(pod_status("elsewhere"))
    assert check(edge("default/podstatus/elsewhere", "update", text)) is not None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("%%not json%%", "pod status content is neither JSON nor base64 JSON"),
        (DEEP, "pod status content is neither JSON nor base64 JSON"),
        (b64(DEEP), "pod status content is neither JSON nor base64 JSON"),
        (None, "pod status report without a Name"),
        (42, "pod status report without a Name"),
        ([{"UID": "u"}], "pod status report without a Name"),
        ([pod_status("web"), "x"], "pod status report without a Name"),
        ({"Name": ""}, "pod status report without a Name"),
    ],
)
def test_unparseable_pod_status_is_refused(content: Any, problem: str) -> None:
    assert check(edge("default/podstatus", "update", content)) == problem


def test_pod_patch_of_own_pod_only() -> None:
    # v1.23 kubelet bridge: `<ns>/podpatch/<name>`, content the patch text.
    patch = '{"status":{"phase":"Running"}}'
    assert check(edge("default/podpatch/web", "patch", patch)) is None
    assert check(edge("default/podpatch/elsewhere", "patch", patch)) is not None
    assert check(edge("default/podpatch/ghost", "patch", patch)) is not None
    assert check(edge("default/podpatch", "patch", patch)) == "pod status without a pod name"


def test_acks_and_queries_on_status_resources_are_admitted() -> None:
    assert check(edge("default/podstatus/elsewhere", "response", "OK")) is None
    assert check(edge("default/podstatus/elsewhere", "query", None)) is None


def test_other_traffic_is_admitted() -> None:
    assert check(edge("default/event/web.1", "insert", {"kind": "Event"})) is None
    assert check(edge("kube-node-lease/lease/edge-node-2", "update", {})) is None
    assert check(edge("default/configmap/cfg", "query", None)) is None


def test_empty_node_id_is_refused() -> None:
    keepalive = next(m for _, m in EDGE_MESSAGES if m.operation == "keepalive")
    assert admission_problem("", keepalive, pod_node) == "empty node_id"


# --- metaServer Application writes ------------------------------------------------------------


def test_application_reads_of_anything_are_admitted() -> None:
    assert check(application("get", "/core/v1/pods/default/elsewhere")) is None
    assert check(application("get", "/core/v1/nodes/null/edge-node-2")) is None
    assert check(application("watch", "/core/v1/pods/null/null")) is None


def test_application_node_status_patch() -> None:
    own = application("patch", f"/core/v1/nodes/null/{NODE}", Option=node_patch_info(NODE))
    assert check(own) is None
    other = application(
        "patch", "/core/v1/nodes/null/edge-node-2", Option=node_patch_info("edge-node-2")
    )
    assert check(other) == f"Application write of node 'edge-node-2' from node '{NODE}'"
    # CloudCore patches the PatchInfo's Name, whatever the Key says.
    hidden = application(
        "patch", f"/core/v1/nodes/null/{NODE}", Option=node_patch_info("edge-node-2")
    )
    assert check(hidden) is not None


@pytest.mark.parametrize("verb", ["update", "updatestatus"])
def test_application_pod_status_update(verb: str) -> None:
    def body(name: str) -> str:
        return go_bytes({"kind": "Pod", "metadata": {"name": name, "namespace": "default"}})

    own = application(verb, "/core/v1/pods/default/web", ReqBody=body("web"), Subresource="status")
    assert check(own) is None
    foreign = application(
        verb, "/core/v1/pods/default/elsewhere", ReqBody=body("elsewhere"), Subresource="status"
    )
    assert check(foreign) == (
        f"status of pod default/elsewhere bound to node 'edge-node-2', not '{NODE}'"
    )
    # The dynamic client updates the body's name, so a foreign body is refused too.
    hidden = application(verb, "/core/v1/pods/default/web", ReqBody=body("elsewhere"))
    assert check(hidden) is not None


@pytest.mark.parametrize(
    ("verb", "fields", "problem"),
    [
        ("update", {"ReqBody": None}, "Application body is not base64 JSON"),
        ("update", {"ReqBody": "@@"}, "Application body is not base64 JSON"),
        ("update", {"ReqBody": go_bytes({"kind": "Pod"})}, "Application body names no object"),
        ("patch", {"Option": "e30="}, "Application PatchInfo names no object"),
        ("patch", {"Option": b64(DEEP)}, "Application PatchInfo is not base64 JSON"),
    ],
)
def test_unreadable_application_write_is_refused(
    verb: str, fields: dict[str, Any], problem: str
) -> None:
    assert check(application(verb, "/core/v1/pods/default/web", **fields)) == problem


@pytest.mark.parametrize(
    "key", ["/core/v1/nodes/edge-node-2", "/core/v1/pods/default/web/status", "//v1/nodes/x"]
)
def test_application_write_with_an_odd_node_or_pod_key_is_refused(key: str) -> None:
    body = go_bytes({"metadata": {"name": NODE}})
    problem = check(application("update", key, ReqBody=body))
    assert problem is not None and problem.startswith("Application Key")


def test_application_writes_of_other_resources_are_admitted() -> None:
    body = go_bytes({"metadata": {"name": "cfg"}})
    message = application("update", "/core/v1/configmaps/default/cfg", ReqBody=body)
    assert check(message) is None


def test_application_content_that_is_not_an_object_is_left_to_the_answerer() -> None:
    (message, *_) = APPLICATIONS
    assert check(attrs.evolve(message, content="not an Application")) is None
