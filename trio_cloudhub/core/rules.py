"""Classification of messages in both directions (spec 5.2 and 6.2, v1.23 rules).

Downstream (cloud -> edge), first match wins:

1. no node id in the resource -> DROP (spec 3.4, 11 item 23);
2. `IsToEdge` false (legacy `edgemgr` get/delta/document/deleted messages) -> DROP;
3. edgecontroller deleting the node (`node/<n>/namespace/node/<n>`) -> NODE_STOP: end the
   session, never deliver (spec 11 item 21);
4. the `noAckRequired` table of spec 5.2 -> NO_ACK (sent once, no retransmission);
5. group other than `resource` -> DROP (an ACK-mode message needs an object key; item 33);
6. everything else -> ACK (stop-and-wait delivery through the node queue).

Upstream (edge -> cloud) follows `DispatchUpstream` of spec 6.2; see `classify_upstream`.
The upstream resource is the one the edge wrote, before the `node/<id>/` prefix is added.
"""

from __future__ import annotations

import enum
import re

from trio_cloudhub.core.message import (
    CLOUD_SOURCES,
    CONTROL_OPERATIONS,
    GROUP_RESOURCE,
    GROUP_USER,
    OP_APPLICATION_RESPONSE,
    OP_DELETE,
    OP_ERROR,
    OP_INSERT,
    OP_KEEPALIVE,
    OP_QUERY,
    OP_RESPONSE,
    OP_UPDATE,
    OP_UPLOAD,
    SOURCE_EDGECONTROLLER,
    VOLUME_OPERATIONS,
    Message,
    node_id_of,
    response_to,
    split_cloud_resource,
    split_edge_resource,
)

SOURCE_EDGEMGR = "edgemgr"
SOURCE_METASERVER = "metaserver"
SOURCE_TASKMANAGER = "taskmanager"
SOURCE_NODEUPGRADEJOBCONTROLLER = "nodeupgradejobcontroller"

RESOURCE_K8S_CA = "k8s/ca.crt"
CONTENT_ACK_OK = "OK"
CONTENT_CONTROL_ACK = "ack"

TASK_OPERATIONS = frozenset({"prepull", "upgrade", "UpdateNodeActionStatus"})
REPORT_RESOURCE_TYPES = frozenset({"nodestatus", "podstatus"})

# Substrings of the resource that make a downstream message no-ACK.
_NO_ACK_RESOURCE_PARTS = (
    "podlist",
    "membership",
    "twin/cloud_updated",
    "serviceaccounttoken",
    RESOURCE_K8S_CA,
)
_NO_ACK_SOURCES = frozenset({SOURCE_TASKMANAGER, SOURCE_NODEUPGRADEJOBCONTROLLER})
# Resource types edgecontroller sends without ACK (a `node` only when not an update).
_NO_ACK_EDGECONTROLLER_TYPES = frozenset(
    {"lease", "nodepatch", "podpatch", "podstatus", "certificatesigningrequest"}
)

# `IsToEdge`: (resource substring, operation) pairs from `edgemgr` that stay in the cloud.
_NOT_TO_EDGE = (
    ("membership", "get"),
    ("twin", "delta"),
    ("twin", "document"),
    ("twin", "get"),
    ("auth_info", "get"),
    ("node", "deleted"),
)

# Go's `\w` is ASCII only, and MatchString is anchored at the start only.
_VOLUME_RESOURCE = re.compile(r"\w[-\w.+]*/volume/\w[-\w.+]*", re.ASCII)


class Downstream(enum.Enum):
    ACK = "ack"
    NO_ACK = "no_ack"
    NODE_STOP = "node_stop"
    DROP = "drop"


class Upstream(enum.Enum):
    EMPTY = "empty"  # the v1.23 shutdown message: ignore
    KEEPALIVE = "keepalive"  # feed the session's keepalive deadline
    CONTROL = "control"  # viaduct ping/pong/config: answer with `control_reply`
    VOLUME = "volume"  # CSI result: complete the waiting UDS request
    ACK = "ack"  # `response`: ACK of a downstream message (parent_msg_id)
    ERROR = "error"  # logged only
    ROUTER = "router"  # upload + group user: to the router
    TASK = "task"  # prepull/upgrade/UpdateNodeActionStatus: to the task manager
    CA_QUERY = "ca_query"  # `k8s/ca.crt`: answer with the kube CA, no-ACK
    CLOUD_SOURCE_DROP = "cloud_source_drop"  # edge claims a cloud module as source: drop
    APPLICATION = "application"  # metaServer Application request: answer it
    QUERY = "query"  # metaManager query of an object: answer it
    REPORT = "report"  # node or pod status: write back
    OTHER = "other"  # publish to edgecontroller (twin source: devicecontroller)


# --- downstream ---------------------------------------------------------------------------


def classify_downstream(message: Message) -> Downstream:
    """What to do with a cloud-side message addressed to a node (rules in the module doc)."""
    if not node_id_of(message.resource) or not is_to_edge(message):
        return Downstream.DROP
    if is_node_stop(message):
        return Downstream.NODE_STOP
    if no_ack_required(message):
        return Downstream.NO_ACK
    if message.route.group != GROUP_RESOURCE:
        return Downstream.DROP
    return Downstream.ACK


def as_sent_to(message: Message, acked_version: str | None) -> Message:
    """The operation an ACK-mode message goes out with, by what the node may already hold.

    An `insert` of an object the node has an ack point for (acknowledged, or only the "sent"
    marker "0": it may have stored it without its ACK reaching us) goes as `update`:
    EdgeCore v1.10 stores an insert with a plain INSERT and treats a duplicate key as
    success, so an insert of a newer version would be answered "OK" and never stored, while
    an update is insert-or-replace in every EdgeCore line. `insert` stays for objects the
    node was never sent (CloudCore's sync controller decides the same way).
    """
    if message.operation == OP_INSERT and acked_version is not None:
        return message.with_operation(OP_UPDATE)
    return message


def is_to_edge(message: Message) -> bool:
    """`IsToEdge`: only a few legacy `edgemgr` messages stay in the cloud."""
    if message.route.source != SOURCE_EDGEMGR:
        return True
    resource = message.resource
    if resource.startswith("node"):
        tokens = resource.split("/")
        if len(tokens) >= 3:
            resource = "/".join(tokens[2:])
    operation = message.operation
    return not any(op == operation and part in resource for part, op in _NOT_TO_EDGE)


def resource_type(message: Message) -> str:
    """Token 3 of `node/<id>/<ns>/<type>[/<name>]`, or "" (messagelayer.GetResourceType)."""
    parts = split_cloud_resource(message.resource)
    return parts.resource_type if parts is not None else ""


def is_node_stop(message: Message) -> bool:
    """edgecontroller deleting the Node object: the session ends, nothing is sent."""
    return (
        message.route.source == SOURCE_EDGECONTROLLER
        and message.operation == OP_DELETE
        and resource_type(message) == "node"
    )


def no_ack_required(message: Message) -> bool:
    """`noAckRequired` of v1.23 (spec 5.2): sent once, no retransmission, no version rules."""
    resource = message.resource
    operation = message.operation
    if any(part in resource for part in _NO_ACK_RESOURCE_PARTS):
        return True
    if operation in VOLUME_OPERATIONS or operation == OP_APPLICATION_RESPONSE:
        return True
    if message.route.group == GROUP_USER or message.route.source in _NO_ACK_SOURCES:
        return True
    if operation == OP_RESPONSE and message.content == CONTENT_ACK_OK:
        return True
    return _edgecontroller_no_ack(message)


def _edgecontroller_no_ack(message: Message) -> bool:
    if message.route.source != SOURCE_EDGECONTROLLER:
        return False
    kind = resource_type(message)
    if kind == "node":
        return message.operation != OP_UPDATE
    if kind == "pod":
        return message.operation == OP_RESPONSE
    return kind in _NO_ACK_EDGECONTROLLER_TYPES


# --- upstream -----------------------------------------------------------------------------


def classify_upstream(message: Message) -> Upstream:
    """Where a message from the edge goes, in the order of spec 6.2 (first match wins)."""
    route = message.route
    operation = route.operation
    if message.is_empty():
        return Upstream.EMPTY
    if operation == OP_KEEPALIVE:
        return Upstream.KEEPALIVE
    if operation in CONTROL_OPERATIONS:
        return Upstream.CONTROL
    if is_volume_resource(route.resource):
        return Upstream.VOLUME
    if operation == OP_RESPONSE:
        return Upstream.ACK
    if operation == OP_ERROR:
        return Upstream.ERROR
    if operation == OP_UPLOAD and route.group == GROUP_USER:
        return Upstream.ROUTER
    if operation in TASK_OPERATIONS:
        return Upstream.TASK
    if route.resource == RESOURCE_K8S_CA:
        return Upstream.CA_QUERY
    return _classify_publish(message)


def _classify_publish(message: Message) -> Upstream:
    """Step 8 of spec 6.2: cloud-source filter, then what the publish is for."""
    route = message.route
    if route.source in CLOUD_SOURCES:
        return Upstream.CLOUD_SOURCE_DROP
    if route.source == SOURCE_METASERVER:
        return Upstream.APPLICATION
    if route.operation == OP_QUERY:
        return Upstream.QUERY
    parts = split_edge_resource(route.resource)
    if parts is not None and parts.resource_type in REPORT_RESOURCE_TYPES:
        return Upstream.REPORT
    return Upstream.OTHER


def is_volume_resource(resource: str) -> bool:
    """`<ns>/volume/<id>` as matched by CloudHub's regex (spec 3.5)."""
    return _VOLUME_RESOURCE.match(resource) is not None


def control_reply(message: Message, now_ms: int) -> Message:
    """Viaduct's answer to ping/pong/config: `response`, content "ack" (spec 3.5, item 13)."""
    return response_to(message, CONTENT_CONTROL_ACK, now_ms)
