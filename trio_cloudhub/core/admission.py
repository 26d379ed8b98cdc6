"""Message admission for an authenticated edge node (spec 9.1, "message admission").

Once a connection's certificate proves which node speaks (`pki/identity.py`), the messages it
sends are checked here before the hub acts on them. We enforce status ownership only, the part
of the Kubernetes Node authorizer and NodeRestriction that matters to a hub which writes back
what edges report:

- a node reports, registers or patches only its own Node: `<ns>/nodestatus/<name>` (v1.10
  edged: `insert` to register, `update` for status), `<ns>/nodepatch/<name>` (v1.23 `patch`,
  content the patch text) and writes (insert/update/patch/delete) of `<ns>/node/<name>`
  (v1.23 register/update) need `<name> == node_id`;
- it reports or patches status only for pods bound to it (`spec.nodeName == node_id`, asked of
  `pod_node`): `<ns>/podstatus/<name>` with a `PodStatusRequest` (`UID`, `Name`, `Status`),
  `<ns>/podstatus` whose content lists several of them (metaManager's resync; the whole message
  is refused for the first offending pod), `<ns>/podpatch/<name>` (v1.23 `patch`). Every
  `Name` in the content is checked as well as the resource's name, because the store keys the
  report on the content's `Name`. An unknown pod is refused;
- a metaServer Application (source `metaserver`) must carry `Nodename == node_id` (what
  CloudCore's dynamiccontroller checks with authorization on), and its `update`,
  `updatestatus` and `patch` of core/v1 `nodes` or `pods` (status subresource or not) obey the
  two rules above for every name the cloud would act on: the Key's name, plus the request
  body's `metadata.name` (update) or the PatchInfo `Name` (patch), both base64 JSON.

Everything else is admitted: keepalives, ACKs (`response`), errors, queries, Application
get/list/watch, events, leases and the rest. We do not implement the Kubernetes Node authorizer
graph (which secrets, config maps, volumes a node may read) beyond this status ownership.
Content we cannot parse in a message these rules cover is refused with a reason; nothing here
raises. Pure: no I/O, no trio.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from typing import Any

from trio_cloudhub.core.message import (
    OP_DELETE,
    OP_INSERT,
    OP_PATCH,
    OP_UPDATE,
    Message,
    split_edge_resource,
)
from trio_cloudhub.core.rules import Upstream, classify_upstream

PodNode = Callable[[str, str], str | None]

_NODE_REPORT_TYPES = frozenset({"nodestatus", "nodepatch"})
_NODE_WRITES = frozenset({OP_INSERT, OP_UPDATE, OP_PATCH, OP_DELETE})
_APP_WRITE_VERBS = frozenset({"update", "updatestatus", "patch"})
# Deeply nested JSON inside base64 content makes json raise RecursionError.
_DECODE_ERRORS = (ValueError, RecursionError)


def admission_problem(node_id: str, message: Message, pod_node: PodNode) -> str | None:
    """None to admit `message` from the edge authenticated as `node_id`, else why not.

    `message` is as the edge sent it (resource not yet prefixed with `node/<id>/`).
    `pod_node(namespace, name)` answers the node a pod is bound to (`spec.nodeName`), or None
    for an unknown pod; it must not raise. A refused message should be dropped, as CloudCore
    does, without an answer to the edge.
    """
    if not node_id:
        return "empty node_id"
    kind = classify_upstream(message)
    if kind is Upstream.APPLICATION:
        return _application_problem(node_id, message.content, pod_node)
    if kind is Upstream.REPORT or kind is Upstream.OTHER:
        return _resource_problem(node_id, message, pod_node)
    return None  # keepalives, ACKs, queries and the like change no state


# --- resource-addressed messages ----------------------------------------------------------------


def _resource_problem(node_id: str, message: Message, pod_node: PodNode) -> str | None:
    parts = split_edge_resource(message.resource)
    if parts is None:
        return None
    kind = parts.resource_type
    if kind in _NODE_REPORT_TYPES or (kind == "node" and message.operation in _NODE_WRITES):
        return _node_problem(node_id, parts.name, kind)
    if kind == "podpatch":
        return _pods_problem(node_id, parts.namespace, [parts.name], pod_node)
    if kind == "podstatus":
        names = _pod_status_names(message.content)
        if isinstance(names, str):
            return names
        named = [parts.name] if parts.name else []
        return _pods_problem(node_id, parts.namespace, named + names, pod_node)
    return None


def _node_problem(node_id: str, name: str, what: str) -> str | None:
    if name != node_id:
        return f"{what} of node {name!r} from node {node_id!r}"
    return None


def _pods_problem(
    node_id: str, namespace: str, names: Iterable[str], pod_node: PodNode
) -> str | None:
    """The first pod in `names` not bound to `node_id`, as a reason."""
    for name in names:
        if not name:
            return "pod status without a pod name"
        bound = pod_node(namespace, name)
        if bound is None:
            return f"status of unknown pod {namespace}/{name}"
        if bound != node_id:
            return f"status of pod {namespace}/{name} bound to node {bound!r}, not {node_id!r}"
    return None


def _pod_status_names(content: Any) -> list[str] | str:
    """The `Name` of every PodStatusRequest in the content, or a reason string."""
    try:
        decoded = _json_value(content)
    except _DECODE_ERRORS:
        return "pod status content is neither JSON nor base64 JSON"
    items = decoded if isinstance(decoded, list) else [decoded]
    names: list[str] = []
    for item in items:
        name = item.get("Name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            return "pod status report without a Name"
        names.append(name)
    return names


def _json_value(content: Any) -> Any:
    """Content as sent; text is JSON, or base64 of JSON (a Go `[]byte`). Raises
    _DECODE_ERRORS when it is neither."""
    if not isinstance(content, str):
        return content
    try:
        return json.loads(content)
    except ValueError:
        return _go_bytes_json(content)


def _go_bytes_json(value: Any) -> Any:
    """A Go `[]byte` field holding JSON, which travels as base64 text. Raises _DECODE_ERRORS
    (binascii.Error and JSONDecodeError are ValueErrors) when it is not that."""
    if not isinstance(value, str):
        raise ValueError("not base64 text")
    return json.loads(base64.b64decode(value, validate=True))


# --- metaServer Applications --------------------------------------------------------------------


def _application_problem(node_id: str, app: Any, pod_node: PodNode) -> str | None:
    if not isinstance(app, dict):
        return None  # not an Application: the answering side refuses it, nothing is written
    nodename = app.get("Nodename")
    if nodename != node_id:
        return f"Application for node {nodename!r} from node {node_id!r}"
    if app.get("Verb") not in _APP_WRITE_VERBS:
        return None
    target = _application_target(app.get("Key"))
    if target is None or isinstance(target, str):
        return target
    resource, namespace, name = target
    names = _application_names(app, name)
    if isinstance(names, str):
        return names
    if resource == "nodes":
        for each in names:
            problem = _node_problem(node_id, each, "Application write")
            if problem is not None:
                return problem
        return None
    return _pods_problem(node_id, namespace, names, pod_node)


def _application_target(key: Any) -> tuple[str, str, str] | str | None:
    """(resource, namespace, name) when the Key names core `nodes` or `pods`, a reason when
    it does so in a shape other than `/core/v1/<resource>/<ns>/<name>`, else None.

    metaServer writes `null` for an empty namespace or name (`KeyFuncReq`); CloudCore's
    `ParseKey` reads shorter Keys too, so any other shape of a node or pod Key is refused.
    """
    if not isinstance(key, str):
        return None
    tokens = key.rstrip("/").split("/")
    if len(tokens) < 4 or tokens[1] not in ("core", "") or tokens[3] not in ("nodes", "pods"):
        return None
    if len(tokens) != 6 or tokens[0]:
        return f"Application Key {key!r} is not /core/v1/<resource>/<namespace>/<name>"
    resource, namespace, name = tokens[3:]
    return resource, _unnull(namespace), _unnull(name)


def _unnull(token: str) -> str:
    return "" if token == "null" else token


def _application_names(app: dict[str, Any], key_name: str) -> list[str] | str:
    """Every name the cloud would act on: the Key's, and the body's `metadata.name` (update)
    or the PatchInfo's `Name` (patch); a reason string when that cannot be read."""
    patch = app.get("Verb") == "patch"
    label = "PatchInfo" if patch else "body"
    try:
        decoded = _go_bytes_json(app.get("Option" if patch else "ReqBody"))
    except _DECODE_ERRORS:
        return f"Application {label} is not base64 JSON"
    name = _patch_name(decoded) if patch else _object_name(decoded)
    if not isinstance(name, str):
        return f"Application {label} names no object"
    return [key_name, name]


def _patch_name(info: Any) -> Any:
    return info.get("Name") if isinstance(info, dict) else None


def _object_name(obj: Any) -> Any:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    return metadata.get("name") if isinstance(metadata, dict) else None
