"""Answers to edge requests, built from the objects the local store holds (pure functions).

- metaServer *Application* requests (source `metaserver`): `get` and `list` of core/v1
  configmaps, secrets, pods and nodes, answered exactly in the shape CloudCore's
  dynamiccontroller uses (spec 15): the request's Application with `Status: Approved` and
  `RespBody` = base64 of the object (or List) JSON as Go writes a map (keys sorted, compact).
  Not found and unsupported requests are `Rejected` with a Kubernetes Status in `Error` and
  the message also in `Reason` (a v1.10 edge reads Reason, a v1.23 edge reads Error).
- metamanager `query` of `<ns>/<type>/<name>`: a `response` carrying the object and its
  resourceVersion; when there is none the content is the error text `<type> "<name>" not
  found` (CloudCore's edgecontroller stays silent and lets the edge time out; an immediate
  error is kinder and the edge logs it).
- node and pod status reports: parsed into rows for the database, answered with "OK" like
  edgecontroller does.
Every reply is in cloud resource form (`node/<id>/...`) so the hub routes it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from trio_cloudhub.core.codec import go_json
from trio_cloudhub.core.message import (
    GROUP_RESOURCE,
    OP_APPLICATION_RESPONSE,
    OP_QUERY,
    OP_RESPONSE,
    SOURCE_DYNAMICCONTROLLER,
    SOURCE_EDGECONTROLLER,
    Message,
    cloud_resource,
    new_message,
    prefix_from_edge,
    response_to,
    split_edge_resource,
)
from trio_cloudhub.store.localdb import KIND_NODE_STATUS, KIND_POD_STATUS, ReportRow
from trio_cloudhub.store.manifests import SUPPORTED_KINDS, ObjectKey
from trio_cloudhub.store.routing import KINDS_BY_TYPE, StoredObject

SOURCE_METASERVER = "metaserver"
APPROVED = "Approved"
REJECTED = "Rejected"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time
MAX_REPORT_BYTES = 256 * 1024
# Application resource (plural) -> kind
_PLURALS = {"nodes": "Node", "pods": "Pod", "configmaps": "ConfigMap", "secrets": "Secret"}
_KIND_PLURALS = {kind: plural for plural, kind in _PLURALS.items()}
_NO_ERROR: dict[str, Any] = {"ErrStatus": {"metadata": {}}}

Objects = Mapping[ObjectKey, StoredObject]


class RequestError(ValueError):
    """The edge sent a request or report this store cannot use; the text says why."""


@attrs.frozen(slots=True)
class _Rejection:
    reason: str  # e.g. NotFound
    message: str
    code: int
    details: dict[str, str] = attrs.field(factory=dict)


# --- metaServer Application -----------------------------------------------------------------


def is_application(message: Message) -> bool:
    return message.route.source == SOURCE_METASERVER


def answer_application(
    node_id: str, request: Message, objects: Objects, rv: int, now_ms: int
) -> Message:
    """The applicationResponse to a metaServer request; RequestError if it is no Application."""
    app = request.content
    if not isinstance(app, dict) or not isinstance(app.get("Key"), str):
        raise RequestError("metaserver request without an Application (Key) in its content")
    try:
        body = _application_body(app, objects, rv)
    except _Rejected as rejected:
        content = _application_content(node_id, app, REJECTED, rejection=rejected.args[0])
    else:
        content = _application_content(node_id, app, APPROVED, resp_body=body)
    return new_message(
        source=SOURCE_DYNAMICCONTROLLER,
        group=GROUP_RESOURCE,
        operation=OP_APPLICATION_RESPONSE,
        resource=cloud_resource(node_id, "ignore", "Application", "ignore"),
        content=content,
        now_ms=now_ms,
        parent_msg_id=request.header.msg_id,
    )


class _Rejected(Exception):
    """Carries the _Rejection of an Application."""


def _reject(reason: str, message: str, code: int, **details: str) -> _Rejected:
    return _Rejected(_Rejection(reason=reason, message=message, code=code, details=details))


def _application_body(app: dict[str, Any], objects: Objects, rv: int) -> str:
    """base64 of the answer's JSON, or raises _Rejected."""
    verb = app.get("Verb")
    kind, namespace, name = _parse_key(app["Key"], verb)
    namespace = namespace if SUPPORTED_KINDS[kind] else ""  # cluster-scoped: ignored
    plural = _KIND_PLURALS[kind]
    if verb == "get":
        obj = objects.get(ObjectKey(kind, namespace, name))
        if obj is None:
            raise _reject("NotFound", f'{plural} "{name}" not found', 404, name=name, kind=plural)
        return _base64_json(obj.body)
    if verb == "list":
        selectors = _list_selectors(app.get("Option"))
        items = [obj.body for obj in _list(objects, kind, namespace) if selectors(obj.body)]
        listed = {
            "apiVersion": "v1",
            "items": items,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(rv)},
        }
        return _base64_json(listed)
    raise _reject(
        "MethodNotAllowed", f"verb {verb!r} is not supported by the local store", 405, kind=plural
    )


def _parse_key(key: str, verb: Any) -> tuple[str, str, str]:
    """`/core/v1/<plural>/<ns or null>/<name or null>` -> (kind, namespace, name)."""
    tokens = key.split("/")
    if len(tokens) != 6 or tokens[0] != "":
        raise _reject("BadRequest", f"malformed Application key {key!r}", 400)
    _, group, version, plural, namespace, name = tokens
    kind = _PLURALS.get(plural) if (group, version) == ("core", "v1") else None
    if kind is None:
        raise _reject(
            "NotFound",
            f"the server could not find the requested resource ({verb} {plural}.{version}.{group})",
            404,
            kind=plural,
        )
    namespace = "" if namespace == "null" else namespace
    name = "" if name == "null" else name
    if verb == "get" and not name:
        raise _reject("BadRequest", f"get of {plural} without a name", 400, kind=plural)
    return kind, namespace, name


def _list(objects: Objects, kind: str, namespace: str) -> list[StoredObject]:
    found = [
        obj
        for key, obj in objects.items()
        if key.kind == kind and (not namespace or key.namespace == namespace)
    ]
    return sorted(found, key=lambda obj: obj.key)


def _application_content(
    node_id: str,
    app: dict[str, Any],
    status: str,
    *,
    resp_body: str | None = None,
    rejection: _Rejection | None = None,
) -> dict[str, Any]:
    """The Application in CloudCore's field order; missing v1.10 fields get Go zero values."""
    error = app.get("Error") if isinstance(app.get("Error"), dict) else _NO_ERROR
    reason = ""
    if rejection is not None:
        error = {"ErrStatus": _status(rejection)}
        reason = rejection.message
    return {
        "ID": app.get("ID", ""),
        "Key": app["Key"],
        "Verb": app.get("Verb", ""),
        "Nodename": node_id,  # CloudCore takes it from the connection, not the request
        "Option": app.get("Option"),
        "ReqBody": app.get("ReqBody"),
        "Subresource": app.get("Subresource", ""),
        "RespBody": resp_body if resp_body is not None else app.get("RespBody"),
        "Status": status,
        "Reason": reason,
        "Error": error,
        "Timestamp": app.get("Timestamp", ZERO_TIME),
    }


def _status(rejection: _Rejection) -> dict[str, Any]:
    """A Kubernetes Status (metav1.Status field order)."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": rejection.message,
        "reason": rejection.reason,
    }
    if rejection.details:
        status["details"] = rejection.details
    status["code"] = rejection.code
    return status


def _base64_json(value: Any) -> str:
    return base64.b64encode(go_map_json(value).encode("utf-8")).decode("ascii")


def go_map_json(value: Any) -> str:
    """JSON as Go marshals a map[string]interface{}: keys sorted at every level, compact."""
    return go_json(_sorted(value))


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


# --- list options ---------------------------------------------------------------------------

Selector = Callable[[Mapping[str, Any]], bool]


def _list_selectors(option: Any) -> Selector:
    """labelSelector and fieldSelector of the base64 ListOptions (equality forms only)."""
    options = _decode_option(option)
    label = _parse_selector(options.get("labelSelector"), allow_exists=True)
    field = _parse_selector(options.get("fieldSelector"), allow_exists=False)

    def matches(body: Mapping[str, Any]) -> bool:
        labels = _dig(body, "metadata.labels")
        labels = labels if isinstance(labels, dict) else {}
        return all(test(labels.get(key)) for key, test in label) and all(
            test(_field_value(body, key)) for key, test in field
        )

    return matches


def _decode_option(option: Any) -> dict[str, Any]:
    if not option:
        return {}
    try:
        raw = base64.b64decode(option, validate=True) if isinstance(option, str) else b""
        value = json.loads(raw) if raw else {}
    except (binascii.Error, ValueError):
        raise _reject("BadRequest", "Option is not base64 JSON list options", 400) from None
    return value if isinstance(value, dict) else {}


def _parse_selector(text: Any, *, allow_exists: bool) -> list[tuple[str, Callable[[Any], bool]]]:
    if not isinstance(text, str) or not text.strip():
        return []
    tests: list[tuple[str, Callable[[Any], bool]]] = []
    for term in (part.strip() for part in text.split(",")):
        tests.append(_selector_term(term, allow_exists))
    return tests


def _selector_term(term: str, allow_exists: bool) -> tuple[str, Callable[[Any], bool]]:
    for op in ("!=", "==", "="):
        if op in term:
            key, _, expected = (part.strip() for part in term.partition(op))
            if op == "!=":
                return key, lambda actual, e=expected: actual != e
            return key, lambda actual, e=expected: actual == e
    if allow_exists and term and " " not in term:
        if term.startswith("!"):
            return term[1:], lambda actual: actual is None
        return term, lambda actual: actual is not None
    raise _reject("BadRequest", f"unsupported selector {term!r}", 400)


def _field_value(body: Mapping[str, Any], path: str) -> Any:
    value = _dig(body, path)
    if value is None and path == "spec.nodeName":
        return ""  # an unscheduled pod matches spec.nodeName=
    return value if isinstance(value, str) else (None if value is None else str(value))


def _dig(body: Mapping[str, Any], path: str) -> Any:
    value: Any = body
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# --- metamanager query ----------------------------------------------------------------------


def is_metamanager_query(message: Message) -> bool:
    if message.route.operation != OP_QUERY:
        return False
    parts = split_edge_resource(message.route.resource)
    return parts is not None and parts.resource_type in KINDS_BY_TYPE and bool(parts.name)


def answer_metamanager_query(
    node_id: str, request: Message, objects: Objects, now_ms: int
) -> Message:
    parts = split_edge_resource(request.route.resource)
    assert parts is not None  # checked by is_metamanager_query
    kind = KINDS_BY_TYPE[parts.resource_type]
    namespace = parts.namespace if SUPPORTED_KINDS[kind] else ""
    obj = objects.get(ObjectKey(kind, namespace, parts.name))
    content: Any = obj.body if obj else f'{parts.resource_type} "{parts.name}" not found'
    reply = _cloud_reply(node_id, request, content, now_ms)
    if obj is None:
        return reply
    header = attrs.evolve(reply.header, resource_version=str(obj.rv))
    return attrs.evolve(reply, header=header)


def _cloud_reply(node_id: str, request: Message, content: Any, now_ms: int) -> Message:
    """response_to from edgecontroller, resource prefixed so the hub can route it."""
    reply = response_to(request, content, now_ms)
    route = attrs.evolve(
        reply.route,
        source=SOURCE_EDGECONTROLLER,
        group=GROUP_RESOURCE,
        operation=OP_RESPONSE,
        resource=prefix_from_edge(node_id, request.route.resource),
    )
    return attrs.evolve(reply, route=route)


# --- status reports -------------------------------------------------------------------------


def is_report(message: Message) -> bool:
    parts = split_edge_resource(message.route.resource)
    return parts is not None and parts.resource_type in (KIND_NODE_STATUS, KIND_POD_STATUS)


def report_rows(node_id: str, message: Message, now_ms: int) -> list[ReportRow]:
    """Rows to store for a nodestatus/podstatus report; RequestError when unusable."""
    parts = split_edge_resource(message.route.resource)
    if parts is None or parts.resource_type not in (KIND_NODE_STATUS, KIND_POD_STATUS):
        raise RequestError(f"resource {message.route.resource!r} is not a status report")
    content = _json_content(message.content)
    if parts.resource_type == KIND_NODE_STATUS:
        # A node reports only its own status (what CloudCore's node authorizer enforces).
        if parts.name != node_id:
            raise RequestError(f"node {node_id!r} reported the status of {parts.name!r}")
        if not isinstance(content, dict):
            raise RequestError("node status report is not an object")
        return [_row(KIND_NODE_STATUS, "", node_id, node_id, content, now_ms)]
    items = content if isinstance(content, list) else [content]
    return [_pod_row(node_id, parts.namespace, item, now_ms) for item in items]


def _pod_row(node_id: str, namespace: str, item: Any, now_ms: int) -> ReportRow:
    name = item.get("Name") if isinstance(item, dict) else None
    if not isinstance(name, str) or not name or "/" in name:
        raise RequestError("pod status report without a valid Name")
    return _row(KIND_POD_STATUS, namespace, name, node_id, item, now_ms)


def _row(kind: str, namespace: str, name: str, node: str, body: Any, now_ms: int) -> ReportRow:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_REPORT_BYTES:
        raise RequestError(f"{kind} report of {len(text)} bytes exceeds {MAX_REPORT_BYTES}")
    return ReportRow(
        kind=kind, namespace=namespace, name=name, node=node, body=text, updated_ms=now_ms
    )


def _json_content(content: Any) -> Any:
    """Content as sent; Go `[]byte` content arrives as base64 text of JSON."""
    if not isinstance(content, str):
        return content
    for decode in (_plain_json, _base64_json_text):
        try:
            return decode(content)
        except (ValueError, binascii.Error):
            continue
    raise RequestError("report content is text that is neither JSON nor base64 JSON")


def _plain_json(text: str) -> Any:
    return json.loads(text)


def _base64_json_text(text: str) -> Any:
    return json.loads(base64.b64decode(text, validate=True))


def report_reply(node_id: str, request: Message, now_ms: int) -> Message:
    """edgecontroller's "OK" to a status report."""
    return _cloud_reply(node_id, request, "OK", now_ms)
