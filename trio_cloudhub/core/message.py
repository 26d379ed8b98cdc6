"""The beehive message that travels between CloudHub and EdgeHub, and its vocabularies.

A message is an immutable value: header (ids, time, resourceVersion), route (who, what) and
content (any JSON value). Resource strings are `/`-separated; inside the cloud they carry a
`node/<id>/` prefix that is trimmed before a message goes to the edge (spec 3.3).
"""

from __future__ import annotations

import os
from typing import Any

import attrs

# Operations (beehive, cloudhub model, viaduct control).
OP_INSERT = "insert"
OP_DELETE = "delete"
OP_QUERY = "query"
OP_UPDATE = "update"
OP_UPLOAD = "upload"
OP_RESPONSE = "response"
OP_ERROR = "error"
OP_PATCH = "patch"
OP_KEEPALIVE = "keepalive"
OP_CONNECTED = "connected"
OP_DISCONNECTED = "disconnected"
OP_APPLICATION_RESPONSE = "applicationResponse"
CONTROL_OPERATIONS = frozenset({"ping", "pong", "config"})
VOLUME_OPERATIONS = frozenset(
    {"createvolume", "deletevolume", "controllerpublishvolume", "controllerunpublishvolume"}
)

GROUP_RESOURCE = "resource"
GROUP_USER = "user"
GROUP_TWIN = "twin"

SOURCE_EDGECONTROLLER = "edgecontroller"
SOURCE_DYNAMICCONTROLLER = "dynamiccontroller"
SOURCE_CLOUDHUB = "cloudhub"
CLOUD_SOURCES = frozenset(
    {"cloudhub", "cloudStream", "devicecontroller", "edgecontroller", "synccontroller"}
)


@attrs.frozen(slots=True)
class Header:
    msg_id: str
    timestamp: int
    parent_msg_id: str = ""
    resource_version: str = ""
    sync: bool = False
    type: str = ""


@attrs.frozen(slots=True)
class Route:
    source: str = ""
    destination: str = ""
    group: str = ""
    operation: str = ""
    resource: str = ""


@attrs.frozen(slots=True)
class Message:
    header: Header
    route: Route
    content: Any = None

    @property
    def msg_id(self) -> str:
        return self.header.msg_id

    @property
    def operation(self) -> str:
        return self.route.operation

    @property
    def resource(self) -> str:
        return self.route.resource

    def with_resource(self, resource: str) -> Message:
        return attrs.evolve(self, route=attrs.evolve(self.route, resource=resource))

    def with_operation(self, operation: str) -> Message:
        return attrs.evolve(self, route=attrs.evolve(self.route, operation=operation))

    def is_empty(self) -> bool:
        """The message a v1.23 EdgeCore sends on shutdown: no id, no route, no content."""
        return not self.header.msg_id and self.route == Route() and self.content is None


def new_msg_id() -> str:
    """A random (version 4) UUID as text, as `str(uuid.uuid4())` makes it, in half the time
    (a change to N nodes makes N of them)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def new_message(
    *,
    source: str,
    group: str,
    operation: str,
    resource: str,
    content: Any,
    now_ms: int,
    resource_version: str = "",
    parent_msg_id: str = "",
) -> Message:
    header = Header(
        msg_id=new_msg_id(),
        timestamp=now_ms,
        parent_msg_id=parent_msg_id,
        resource_version=resource_version,
    )
    route = Route(source=source, group=group, operation=operation, resource=resource)
    return Message(header=header, route=route, content=content)


def response_to(request: Message, content: Any, now_ms: int) -> Message:
    """`NewRespByMessage`: answer `request`, copying source, group and resource."""
    header = Header(
        msg_id=new_msg_id(),
        timestamp=now_ms,
        parent_msg_id=request.header.msg_id,
        type=request.header.type,
    )
    route = Route(
        source=request.route.source,
        group=request.route.group,
        operation=OP_RESPONSE,
        resource=request.route.resource,
    )
    return Message(header=header, route=route, content=content)


def error_to(request: Message, error: str, now_ms: int) -> Message:
    """`NewErrorMessage` as fixed in v1.23: parent is the request's own id."""
    header = Header(msg_id=new_msg_id(), timestamp=now_ms, parent_msg_id=request.header.msg_id)
    route = Route(
        source=SOURCE_CLOUDHUB,
        group=request.route.group,
        operation=OP_ERROR,
        resource=request.route.resource,
    )
    return Message(header=header, route=route, content=error)


# --- resource strings (spec 3.3, 3.4) ---------------------------------------------------


def node_id_of(resource: str) -> str:
    """First token after a `node` token, or "" when the resource names no node."""
    tokens = resource.split("/")
    for index, token in enumerate(tokens[:-1]):
        if token == "node" and tokens[index + 1]:
            return tokens[index + 1]
    return ""


def trim_for_edge(resource: str) -> str:
    """Drop `node/<id>/` (TrimMessage); a two-token resource is left as it is."""
    if not resource.startswith("node"):
        return resource
    tokens = resource.split("/")
    if len(tokens) < 3:
        return resource
    return "/".join(tokens[2:])


def prefix_from_edge(node_id: str, resource: str) -> str:
    return f"node/{node_id}/{resource}"


def cloud_resource(node_id: str, namespace: str, resource_type: str, name: str = "") -> str:
    """`node/<id>/<ns>/<type>[/<name>]`; cluster-scoped objects use namespace `null`."""
    base = f"node/{node_id}/{namespace or 'null'}/{resource_type}"
    return f"{base}/{name}" if name else base


@attrs.frozen(slots=True)
class ResourceParts:
    namespace: str
    resource_type: str
    name: str


def split_cloud_resource(resource: str) -> ResourceParts | None:
    """Tokens 2..4 of `node/<id>/<ns>/<type>[/<name>]`, or None for other shapes."""
    tokens = resource.split("/")
    if len(tokens) < 4 or tokens[0] != "node":
        return None
    name = "/".join(tokens[4:])
    return ResourceParts(namespace=tokens[2], resource_type=tokens[3], name=name)


def split_edge_resource(resource: str) -> ResourceParts | None:
    """`<ns>/<type>[/<name>]` as an edge writes it, or None."""
    tokens = resource.split("/")
    if len(tokens) < 2:
        return None
    return ResourceParts(namespace=tokens[0], resource_type=tokens[1], name="/".join(tokens[2:]))


# --- content helpers ----------------------------------------------------------------------


def object_metadata(content: Any) -> dict[str, Any]:
    if isinstance(content, dict):
        metadata = content.get("metadata")
        if isinstance(metadata, dict):
            return metadata
    return {}


def object_uid(content: Any) -> str:
    uid = object_metadata(content).get("uid")
    return uid if isinstance(uid, str) else ""


def is_delete(message: Message) -> bool:
    """Delete operation, or an object that carries a deletionTimestamp (spec 5.1 step 1)."""
    if message.route.operation == OP_DELETE:
        return True
    return bool(object_metadata(message.content).get("deletionTimestamp"))
