"""A fake Kubernetes API server over HTTP, for tests and benchmarks of the Kubernetes store.

The real `kubernetes` client talks to it over loopback (plain HTTP, or HTTPS with a given
`ssl.SSLContext`), so its whole code path runs: URLs, JSON, `ApiException`, watch streams.
Like the real API server it has:

- core/v1 `namespaces`, `nodes`, `pods`, `configmaps`, `secrets`, `serviceaccounts`, and the
  KubeEdge custom resources `objectsyncs` / `clusterobjectsyncs`
  (reliablesyncs.kubeedge.io/v1alpha1); more kinds through `resources=`;
- get, list, watch, create, update (optimistic concurrency), patch (JSON merge; strategic merge
  with the merge keys of the core kinds; JSON patch), delete, deletecollection; `status`
  subresources (a main-resource write keeps .status, a status write changes only .status);
  `serviceaccounts/{name}/token`;
- one global resourceVersion; a write that changes nothing bumps nothing and sends no event;
- label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and the field selectors the
  API server knows for these kinds (others are a 400, as there);
- watch: the events after `resourceVersion` (synthetic ADDED of the current state for "" or
  "0"), BOOKMARKs, an ERROR event with a 410 Expired `Status` once that history is gone,
  `timeoutSeconds`; an object that starts or stops matching the selector is ADDED / DELETED;
- errors as `Status` bodies, so the client raises `ApiException` with the right status.

List items of core kinds carry no `kind`/`apiVersion` (as from the real API server); GET,
watch events and custom-resource list items do.

Test controls on `FakeKube`: `fail_next`/`drop_next` (injected failures), `latency`,
`close_watches`, `stop`/`start` (the listener goes away and comes back on the same port),
`put`/`delete`/`get`/`objects` (direct access), `compact`, and `requests`, a counter by
(verb, resource). Everything runs in the trio thread: call the helpers from trio code.

Not implemented: pagination (`limit`/`continue` are ignored, lists are whole), list at a given
resourceVersion, dryRun, server-side apply, `sendInitialEvents`, finalizers and garbage
collection (a delete is immediate; pods can opt into graceful deletion), admission and schema
validation beyond names, immutable fields, defaulting beyond pod phase / secret type /
namespace phase, protobuf, discovery beyond `/version`, `/api` and `/apis`. The event history
is one window for all kinds (the real watch cache has one per kind), and a watch from a future
resourceVersion starts at once instead of waiting.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import http
import json
import logging
import math
import os
import re
import secrets as _secrets
import ssl
import string
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import attrs
import h11
import trio
import yaml

logger = logging.getLogger("trio_cloudhub.fake_kube")

Obj = dict[str, Any]
T = TypeVar("T")

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
RECEIVE_BYTES = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
DEFAULT_HISTORY = 10_000
DEFAULT_WATCH_BUFFER = 100_000
RELIABLESYNCS = "reliablesyncs.kubeedge.io"
ALL_FIELDS = ("metadata.name", "metadata.namespace")


# --- kinds ---------------------------------------------------------------------------------


@attrs.frozen
class ResourceType:
    """One kind the fake serves. `fields`: the field selectors it supports besides metadata."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = True  # has a status subresource
    returns_deleted: bool = False  # DELETE answers with the object, not a Status
    fields: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The name in error messages: `pods`, `objectsyncs.reliablesyncs.kubeedge.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def custom(self) -> bool:
        return bool(self.group)


POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
)
CORE_RESOURCES = (
    ResourceType("", "v1", "namespaces", "Namespace", False, fields=("status.phase",)),
    ResourceType("", "v1", "nodes", "Node", False, fields=("spec.unschedulable",)),
    ResourceType("", "v1", "pods", "Pod", True, returns_deleted=True, fields=POD_FIELDS),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, status=False),
    ResourceType("", "v1", "secrets", "Secret", True, status=False, fields=("type",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, False, True),
)
KUBEEDGE_RESOURCES = (
    ResourceType(RELIABLESYNCS, "v1alpha1", "objectsyncs", "ObjectSync", True),
    ResourceType(RELIABLESYNCS, "v1alpha1", "clusterobjectsyncs", "ClusterObjectSync", False),
)


# --- errors --------------------------------------------------------------------------------

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_body(code: int, message: str, reason: str = "", details: Obj | None = None) -> Obj:
    """A failure `Status` as the API server writes it."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or REASONS.get(code, ""),
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class _ApiError(Exception):
    def __init__(
        self,
        code: int,
        message: str,
        reason: str = "",
        details: Obj | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.body = status_body(code, message, reason, details)
        self.headers = headers


def _details(resource: ResourceType, name: str) -> Obj:
    details = {"name": name, "group": resource.group, "kind": resource.plural}
    return {k: v for k, v in details.items() if v}  # Go's omitempty


def _not_found(resource: ResourceType, name: str) -> _ApiError:
    message = f'{resource.qualified} "{name}" not found'
    return _ApiError(404, message, details=_details(resource, name))


def _conflict(resource: ResourceType, name: str, why: str) -> _ApiError:
    message = f'Operation cannot be fulfilled on {resource.qualified} "{name}": {why}'
    return _ApiError(409, message, details=_details(resource, name))


NO_RESOURCE = "the server could not find the requested resource"
NOT_ALLOWED = "the server does not allow this method on the requested resource"
CUSTOM_PATCH_TYPES = (
    "the body of the request was in an unknown format - accepted media types include: "
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
)
MODIFIED_WHY = "the object has been modified; please apply your changes to the latest version"
MODIFIED_WHY += " and try again"


# --- selectors -----------------------------------------------------------------------------

LABEL_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
LABEL_VALUE = r"[-A-Za-z0-9_.]*"
SET_TERM = re.compile(rf"^({LABEL_KEY})\s+(in|notin)\s+\(([^)]*)\)$")
EQ_TERM = re.compile(rf"^({LABEL_KEY})\s*(==|=|!=)\s*({LABEL_VALUE})$")
KEY_TERM = re.compile(rf"^(!?)\s*({LABEL_KEY})$")


@attrs.frozen
class _LabelTerm:
    key: str
    op: str  # in | notin | exists | !exists
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return self.key in labels and labels[self.key] in self.values
        return labels.get(self.key) not in self.values  # notin; absent matches too


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses (`a in (x,y),b`)."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [term.strip() for term in terms if term.strip()]


def _parse_label_selector(text: str) -> tuple[_LabelTerm, ...]:
    terms = []
    for term in _split_terms(text):
        if match := SET_TERM.match(term):
            values = frozenset(v.strip() for v in match[3].split(",") if v.strip())
            terms.append(_LabelTerm(match[1], match[2], values))
        elif match := EQ_TERM.match(term):
            op = "notin" if match[2] == "!=" else "in"
            terms.append(_LabelTerm(match[1], op, frozenset({match[3]})))
        elif match := KEY_TERM.match(term):
            terms.append(_LabelTerm(match[2], "!exists" if match[1] else "exists"))
        else:
            raise _ApiError(400, f"unable to parse requirement: {term!r}")
    return tuple(terms)


def _field_value(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _parse_field_selector(text: str, resource: ResourceType) -> tuple[tuple[str, str, bool], ...]:
    terms = []
    for term in _split_terms(text):
        match = re.match(r"^([A-Za-z.]+)\s*(==|=|!=)\s*(.*)$", term)
        if match is None:
            raise _ApiError(400, f"invalid field selector: {term!r}")
        path, op, value = match[1], match[2], match[3].strip()
        if path not in ALL_FIELDS + resource.fields:
            raise _ApiError(400, f'field label not supported: {path} for "{resource.kind}"')
        terms.append((path, value, op != "!="))
    return tuple(terms)


@attrs.frozen
class _Selector:
    labels: tuple[_LabelTerm, ...] = ()
    fields: tuple[tuple[str, str, bool], ...] = ()

    def matches(self, obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if not all(term.matches(labels) for term in self.labels):
            return False
        return all((_field_value(obj, p) == v) is eq for p, v, eq in self.fields)


# --- patches -------------------------------------------------------------------------------


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value and never changes `target`."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


# Lists that a strategic merge patch merges by key (the core kinds' patchMergeKey tags).
MERGE_KEYS = {
    "conditions": "type",
    "addresses": "type",
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "secrets": "name",
}
MERGED_PRIMITIVE_LISTS = {"finalizers"}


def _strategic_merge_patch(target: Any, patch: Any) -> Any:
    """The strategic merge patch of the core kinds, for the lists in MERGE_KEYS.

    Directives: `$patch: replace|delete`, `$retainKeys`, `$deleteFromPrimitiveList/`;
    `$setElementOrder/` is accepted and ignored (new list items go last).
    """
    if not isinstance(patch, dict):
        return patch
    if patch.get("$patch") == "replace":
        return _strategic_merge_patch({}, {k: v for k, v in patch.items() if k != "$patch"})
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.partition("/")[2]
            result[field] = [item for item in result.get(field) or [] if item not in value]
        elif value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        else:
            result[key] = _strategic_value(key, result.get(key), value)
    if isinstance(patch.get("$retainKeys"), list):
        result = {k: v for k, v in result.items() if k in patch["$retainKeys"]}
    return result


def _strategic_value(key: str, old: Any, value: Any) -> Any:
    if isinstance(value, list) and key in MERGE_KEYS:
        return _merge_list(old if isinstance(old, list) else [], value, MERGE_KEYS[key])
    if isinstance(value, list) and key in MERGED_PRIMITIVE_LISTS and isinstance(old, list):
        return old + [item for item in value if item not in old]
    return _strategic_merge_patch(old, value)


def _merge_list(old: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        rest = [i for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
        return [_strategic_merge_patch({}, item) for item in rest]
    result = list(old)
    for item in patch:
        if not isinstance(item, dict):
            result.append(item)
            continue
        index = next(
            (i for i, o in enumerate(result) if isinstance(o, dict) and merge_key in item
             and o.get(merge_key) == item.get(merge_key)),
            None,
        )  # fmt: skip
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_strategic_merge_patch({}, item))
        else:
            result[index] = _strategic_merge_patch(result[index], item)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _ApiError(400, f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> Any:
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _json_patch_op(doc: Any, op: Obj) -> Any:
    kind, parts = op.get("op"), _pointer(str(op.get("path", "")))
    if kind in ("move", "copy"):
        source = _pointer(str(op.get("from", "")))
        value = copy.deepcopy(_parent(doc, [*source, ""])) if source else copy.deepcopy(doc)
        if kind == "move":
            doc = _json_patch_op(doc, {"op": "remove", "path": op["from"]})
        return _json_patch_op(doc, {"op": "add", "path": op["path"], "value": value})
    if not parts:
        return op.get("value") if kind in ("add", "replace") else doc
    parent, last = _parent(doc, parts), parts[-1]
    if kind == "test":
        current = parent[int(last)] if isinstance(parent, list) else parent[last]
        if current != op.get("value"):
            raise _ApiError(422, f"the test of {op.get('path')} failed")
    elif kind == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif kind == "add" and isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), op.get("value"))
    elif kind in ("add", "replace"):
        if isinstance(parent, list):
            parent[int(last)] = op.get("value")
        elif kind == "replace" and last not in parent:
            raise KeyError(last)
        else:
            parent[last] = op.get("value")
    else:
        raise _ApiError(400, f"unknown JSON patch operation {kind!r}")
    return doc


def _json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch on a copy of `target`."""
    if not isinstance(operations, list):
        raise _ApiError(400, "a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    try:
        for op in operations:
            doc = _json_patch_op(doc, op)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise _ApiError(422, f"the JSON patch cannot be applied: {exc!r}") from None
    return doc


# --- objects -------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _key(obj: Obj) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _rv(obj: Obj) -> str:
    return str(_meta(obj).get("resourceVersion") or "")


def _with_meta(obj: Obj, **changes: Any) -> Obj:
    """A copy of `obj` whose metadata has `changes` (None removes a key); shares the rest."""
    meta = dict(_meta(obj))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return {**obj, "metadata": meta}


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _same_content(a: Obj, b: Obj) -> bool:
    return _with_meta(a, resourceVersion=None) == _with_meta(b, resourceVersion=None)


def fake_token(namespace: str, name: str, audiences: Iterable[str]) -> str:
    """A JWT-shaped token for a service account: deterministic, signature not verifiable."""

    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(_encode(value)).rstrip(b"=").decode()

    claims = {
        "iss": "https://fake-kube.invalid",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "aud": list(audiences),
    }
    unsigned = f"{part({'alg': 'RS256', 'kid': 'fake-kube'})}.{part(claims)}"
    signature = base64.urlsafe_b64encode(hashlib.sha256(unsigned.encode()).digest())
    return f"{unsigned}.{signature.rstrip(b'=').decode()}"


# --- store and watchers ----------------------------------------------------------------------


@attrs.define(eq=False)
class _Event:
    rv: int
    resource: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    prev: Obj | None
    _encoded: bytes | None = None

    def line(self) -> bytes:
        if self._encoded is None:
            self._encoded = _event_line(self.type, self.obj)
        return self._encoded


def _event_line(type_: str, obj: Obj) -> bytes:
    return b'{"type":"' + type_.encode() + b'","object":' + _encode(obj) + b"}\n"


class _Watcher:
    """One open watch: its filter, and the lines queued for its stream."""

    def __init__(
        self, resource: ResourceType, namespace: str, selector: _Selector, limit: int
    ) -> None:
        self.resource = resource
        self.namespace = namespace
        self.selector = selector
        self.limit = limit
        self.send, self.receive = trio.open_memory_channel[bytes](math.inf)
        self.closed = False  # no more events: the stream ends once the queue is sent
        self.cancel = trio.CancelScope()  # cancelled to drop the connection at once
        self.abort = False

    def wants(self, obj: Obj | None) -> bool:
        if obj is None or (self.namespace and _key(obj)[0] != self.namespace):
            return False
        return self.selector.matches(obj)

    def offer(self, event: _Event) -> None:
        if event.resource != self.resource or self.closed:
            return
        line = self._line(event)
        if line is None:
            return
        if self.send.statistics().current_buffer_used >= self.limit:
            # The real API server drops a watcher that cannot keep up; the client watches again.
            logger.info("fake kube: a %s watcher fell behind; closing it", self.resource.plural)
            self.close()
            return
        self.send.send_nowait(line)

    def _line(self, event: _Event) -> bytes | None:
        now, before = self.wants(event.obj), self.wants(event.prev)
        if event.type == "DELETED":
            return event.line() if before else None
        if now and (before or event.type == "ADDED"):
            return event.line()
        if now:
            return _event_line("ADDED", event.obj)
        if before and event.prev is not None:
            return _event_line("DELETED", _with_meta(event.prev, resourceVersion=str(event.rv)))
        return None

    def push(self, line: bytes) -> None:
        self.send.send_nowait(line)

    def close(self) -> None:
        self.closed = True
        self.send.close()

    def idle(self) -> bool:
        return self.receive.statistics().current_buffer_used == 0

    async def next_line(self, wake_at: float) -> bytes | None:
        """The next queued line, or None at `wake_at`; EndOfChannel once closed and sent."""
        try:
            return self.receive.receive_nowait()
        except trio.WouldBlock:
            pass
        with trio.move_on_at(wake_at):
            return await self.receive.receive()
        return None


class _Store:
    """Objects by kind and (namespace, name), one resourceVersion counter, recent events."""

    def __init__(self, history: int | None) -> None:
        self.rv = 1
        self.floor = 1  # the oldest resourceVersion a watch may start from
        self.history_limit = history
        self.history: deque[_Event] = deque()
        self.objects: defaultdict[ResourceType, dict[tuple[str, str], Obj]] = defaultdict(dict)
        self.watchers: set[_Watcher] = set()
        self.watchers_changed = trio.Event()

    def get(self, resource: ResourceType, namespace: str, name: str) -> Obj | None:
        return self.objects[resource].get((namespace, name))

    def select(self, resource: ResourceType, namespace: str, selector: _Selector) -> list[Obj]:
        items = self.objects[resource]
        return [
            items[key]
            for key in sorted(items)
            if (not namespace or key[0] == namespace) and selector.matches(items[key])
        ]

    def write(self, resource: ResourceType, obj: Obj) -> Obj:
        """Store `obj` with the next resourceVersion (unless it changes nothing)."""
        key = _key(obj)
        prev = self.objects[resource].get(key)
        if prev is not None and _same_content(prev, obj):
            return prev
        self.rv += 1
        stored = _with_meta(obj, resourceVersion=str(self.rv))
        self.objects[resource][key] = stored
        self._publish(_Event(self.rv, resource, "MODIFIED" if prev else "ADDED", stored, prev))
        return stored

    def remove(self, resource: ResourceType, obj: Obj) -> Obj:
        """Delete `obj`; returns its final state, which carries a new resourceVersion."""
        self.rv += 1
        final = _with_meta(obj, resourceVersion=str(self.rv))
        del self.objects[resource][_key(obj)]
        self._publish(_Event(self.rv, resource, "DELETED", final, obj))
        return final

    def _publish(self, event: _Event) -> None:
        self.history.append(event)
        if self.history_limit is not None:
            while len(self.history) > self.history_limit:
                self.floor = self.history.popleft().rv
        for watcher in list(self.watchers):
            watcher.offer(event)

    def compact(self) -> None:
        """Forget all history: a watch must start from the current resourceVersion or later."""
        self.history.clear()
        self.floor = self.rv

    def watch(self, watcher: _Watcher, since: int | None) -> None:
        """Queue what `watcher` missed since `since` (None: the current state), register it."""
        if since is None:
            for obj in self.select(watcher.resource, watcher.namespace, watcher.selector):
                watcher.push(_event_line("ADDED", obj))
        elif since < self.floor:
            message = f"too old resource version: {since} ({self.floor})"
            watcher.push(_event_line("ERROR", status_body(410, message, "Expired")))
            watcher.close()
            return
        else:
            for event in self._events_after(since):
                watcher.offer(event)
        self.add_watcher(watcher)

    def add_watcher(self, watcher: _Watcher) -> None:
        self.watchers.add(watcher)
        self._watchers_changed()

    def drop_watcher(self, watcher: _Watcher) -> None:
        self.watchers.discard(watcher)
        watcher.close()
        self._watchers_changed()

    def _watchers_changed(self) -> None:
        self.watchers_changed.set()
        self.watchers_changed = trio.Event()

    def _events_after(self, since: int) -> list[_Event]:
        events = []
        for event in reversed(self.history):
            if event.rv <= since:
                break
            events.append(event)
        return events[::-1]


# --- the API: request in, reply out (no I/O) -------------------------------------------------


@attrs.frozen
class _Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@attrs.frozen
class _Reply:
    status: int
    body: Obj
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class _WatchStart:
    watcher: _Watcher
    timeout: float
    bookmarks: bool


@attrs.frozen
class _Target:
    resource: ResourceType
    namespace: str
    name: str
    subresource: str
    verb: str

    @property
    def resource_name(self) -> str:
        """The resource as RBAC names it: `pods`, `pods/status`, `serviceaccounts/token`."""
        sub = self.subresource
        return f"{self.resource.plural}/{sub}" if sub else self.resource.plural


def _verb(method: str, name: str, query: Mapping[str, str]) -> str:
    if not name:
        watch = query.get("watch", "") in ("true", "1")
        verbs = {"GET": "watch" if watch else "list", "POST": "create"}
        verbs["DELETE"] = "deletecollection"
    else:
        verbs = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        verbs["POST"] = "create"
    if method not in verbs:
        raise _ApiError(405, NOT_ALLOWED)
    return verbs[method]


def _check_target(target: _Target) -> None:
    resource, sub, verb = target.resource, target.subresource, target.verb
    if sub and not (sub == "status" and resource.status) and not _is_token(target):
        raise _ApiError(404, NO_RESOURCE)
    if resource.namespaced and target.name and not target.namespace:
        raise _ApiError(404, NO_RESOURCE)
    if resource.namespaced and not target.namespace and verb not in ("list", "watch"):
        raise _ApiError(405, NOT_ALLOWED)
    allowed = {"": {"get", "update", "patch", "delete"}, "status": {"get", "update", "patch"}}
    if target.name and verb not in allowed.get(sub, {"create"}):
        raise _ApiError(405, NOT_ALLOWED)


def _is_token(target: _Target) -> bool:
    resource = target.resource
    return (
        target.subresource == "token"
        and resource.plural == "serviceaccounts"
        and not resource.custom
    )


class _Api:
    """The API server's semantics on top of `_Store`."""

    def __init__(
        self,
        store: _Store,
        resources: Iterable[ResourceType],
        *,
        watch_buffer: int,
        graceful_pod_deletion: bool,
        require_namespaces: bool,
    ) -> None:
        self.store = store
        self.resources = {(r.group, r.version, r.plural): r for r in resources}
        self.watch_buffer = watch_buffer
        self.graceful_pod_deletion = graceful_pod_deletion
        self.require_namespaces = require_namespaces

    # --- routing ---

    def route(self, request: _Request) -> _Target:
        resource, namespace, rest = self._locate(request.path)
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        target = _Target(resource, namespace, name, sub, _verb(request.method, name, request.query))
        _check_target(target)
        return target

    def _locate(self, path: str) -> tuple[ResourceType, str, list[str]]:
        """The kind, namespace and [plural, name, subresource] a URL path names."""
        parts = [unquote(part) for part in path.split("/") if part]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _ApiError(404, NO_RESOURCE)
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            inner = self.resources.get((group, version, rest[2]))
            if inner is not None and inner.namespaced:  # else: /namespaces/{name}/status
                namespace, rest = rest[1], rest[2:]
        resource = self.resources.get((group, version, rest[0])) if rest else None
        if resource is None or len(rest) > 3:
            raise _ApiError(404, NO_RESOURCE)
        return resource, namespace, rest

    def handle(self, target: _Target, request: _Request) -> _Reply | _WatchStart:
        handler: Callable[[_Target, _Request], _Reply | _WatchStart] = getattr(
            self, f"_{target.verb}"
        )
        return handler(target, request)

    # --- reads ---

    def _get(self, target: _Target, request: _Request) -> _Reply:
        return _Reply(200, self._existing(target))

    def _existing(self, target: _Target) -> Obj:
        obj = self.store.get(target.resource, target.namespace, target.name)
        if obj is None:
            raise _not_found(target.resource, target.name)
        return obj

    def _selector(self, target: _Target, query: Mapping[str, str]) -> _Selector:
        labels = _parse_label_selector(query.get("labelSelector", ""))
        return _Selector(
            labels, _parse_field_selector(query.get("fieldSelector", ""), target.resource)
        )

    def _list(self, target: _Target, request: _Request) -> _Reply:
        resource = target.resource
        items = self.store.select(resource, target.namespace, self._selector(target, request.query))
        if not resource.custom:
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        body = {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }
        return _Reply(200, body)

    def _watch(self, target: _Target, request: _Request) -> _WatchStart:
        query = request.query
        selector = self._selector(target, query)
        since = self._watch_start(query.get("resourceVersion", ""))
        try:
            timeout = float(query.get("timeoutSeconds") or math.inf)
        except ValueError:
            raise _ApiError(400, "timeoutSeconds must be a number") from None
        watcher = _Watcher(target.resource, target.namespace, selector, self.watch_buffer)
        self.store.watch(watcher, since)
        bookmarks = query.get("allowWatchBookmarks", "") in ("true", "1")
        return _WatchStart(watcher, timeout, bookmarks)

    @staticmethod
    def _watch_start(text: str) -> int | None:
        if text in ("", "0"):
            return None
        try:
            return int(text)
        except ValueError:
            raise _ApiError(400, f"invalid resource version: {text!r}") from None

    # --- writes ---

    def _body(self, request: _Request) -> Any:
        try:
            return json.loads(request.body or b"null")
        except ValueError as exc:
            raise _ApiError(400, f"the body of the request is not JSON: {exc}") from None

    def _object_body(self, target: _Target, request: _Request) -> Obj:
        body = self._body(request)
        if not isinstance(body, dict):
            raise _ApiError(400, "the body of the request must be a JSON object")
        resource = target.resource
        kind, api_version = body.get("kind"), body.get("apiVersion")
        if (kind and kind != resource.kind) or (
            api_version and api_version != resource.api_version
        ):
            message = f"{api_version}, Kind={kind} is not {resource.api_version} {resource.kind}"
            raise _ApiError(400, message)
        meta = _meta(body)
        if resource.namespaced and meta.get("namespace") not in (None, "", target.namespace):
            message = "the namespace of the provided object does not match the namespace sent"
            raise _ApiError(400, message + " on the request")
        body = {**body, "kind": resource.kind, "apiVersion": resource.api_version}
        return _with_meta(body, namespace=target.namespace or None)

    def _create(self, target: _Target, request: _Request) -> _Reply:
        if target.subresource == "token":
            return self._token(target, request)
        resource = target.resource
        obj = self._object_body(target, request)
        meta = _meta(obj)
        if meta.get("resourceVersion"):
            raise _ApiError(500, "resourceVersion should not be set on objects to be created")
        name = str(meta.get("name") or "")
        if not name and meta.get("generateName"):
            name = str(meta["generateName"]) + "".join(
                _secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5)
            )
        if not name:
            message = f"{resource.kind} is invalid: metadata.name: Required value: name is required"
            raise _ApiError(422, message, details=_details(resource, ""))
        self._check_namespace(target.namespace)
        if self.store.get(resource, target.namespace, name) is not None:
            message = f'{resource.qualified} "{name}" already exists'
            raise _ApiError(409, message, "AlreadyExists", _details(resource, name))
        obj = _with_meta(
            obj,
            name=name,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            deletionTimestamp=None,
            deletionGracePeriodSeconds=None,
        )
        return _Reply(201, self.store.write(resource, _prepare_create(resource, obj)))

    def _check_namespace(self, namespace: str) -> None:
        if not namespace or not self.require_namespaces:
            return
        namespaces = next(r for r in self.resources.values() if r.kind == "Namespace")
        if self.store.get(namespaces, "", namespace) is None:
            raise _not_found(namespaces, namespace)

    def _update(self, target: _Target, request: _Request) -> _Reply:
        obj = self._object_body(target, request)
        if _meta(obj).get("name") != target.name:
            message = f"the name of the object ({_meta(obj).get('name')}) does not match the name"
            raise _ApiError(400, f"{message} on the URL ({target.name})")
        old = self._existing(target)
        if not _rv(obj) and target.resource.custom:
            message = (
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
            )
            raise _ApiError(422, message, details=_details(target.resource, target.name))
        return _Reply(200, self._replace(target, old, obj))

    def _replace(self, target: _Target, old: Obj, new: Obj) -> Obj:
        """Write `new` over `old` under the rules of a main-resource or status write."""
        if _rv(new) and _rv(new) != _rv(old):
            raise _conflict(target.resource, target.name, MODIFIED_WHY)
        if target.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif target.resource.status:
            new = {**new, "status": old.get("status")}
        new = {k: v for k, v in new.items() if v is not None or k != "status"}
        meta = _meta(old)
        new = _with_meta(
            new,
            **{k: meta.get(k) for k in ("name", "namespace", "uid", "creationTimestamp")},
            deletionTimestamp=meta.get("deletionTimestamp"),
            deletionGracePeriodSeconds=meta.get("deletionGracePeriodSeconds"),
        )
        return self.store.write(target.resource, _prepare_update(target.resource, new))

    def _patch(self, target: _Target, request: _Request) -> _Reply:
        content_type = request.headers.get("content-type", "").partition(";")[0].strip()
        patch = self._body(request)
        old = self._existing(target)
        if content_type == "application/merge-patch+json":
            new = _merge_patch(old, patch)
        elif content_type == "application/strategic-merge-patch+json":
            if target.resource.custom:
                raise _ApiError(415, CUSTOM_PATCH_TYPES)
            new = _strategic_merge_patch(old, patch)
        elif content_type == "application/json-patch+json":
            new = _json_patch(old, patch)
        else:
            raise _ApiError(415, f"unsupported patch content type {content_type!r}")
        if not isinstance(new, dict):
            raise _ApiError(422, "the patched object is not a JSON object")
        return _Reply(200, self._replace(target, old, new))

    def _delete(self, target: _Target, request: _Request) -> _Reply:
        resource, old = target.resource, self._existing(target)
        options = self._body(request) or {}
        if not isinstance(options, dict):
            raise _ApiError(400, "DeleteOptions must be a JSON object")
        _check_preconditions(target, old, options.get("preconditions") or {})
        grace = request.query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        if self._graceful(resource, old, grace):
            return _Reply(200, self._mark_deleted(resource, old, grace))
        final = self.store.remove(resource, old)
        if resource.returns_deleted:
            return _Reply(200, final)
        details = {**_details(resource, target.name), "uid": _meta(old).get("uid")}
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        return _Reply(200, {**body, "details": details})

    def _graceful(self, resource: ResourceType, obj: Obj, grace: Any) -> bool:
        """Real pods bound to a node go away only once their kubelet confirms."""
        if not (self.graceful_pod_deletion and resource.kind == "Pod" and not resource.custom):
            return False
        return bool((obj.get("spec") or {}).get("nodeName")) and str(grace) != "0"

    def _mark_deleted(self, resource: ResourceType, obj: Obj, grace: Any) -> Obj:
        if _meta(obj).get("deletionTimestamp"):
            return obj
        default = (obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        seconds = int(default if grace is None else grace)
        when = (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        changed = _with_meta(obj, deletionTimestamp=when, deletionGracePeriodSeconds=seconds)
        return self.store.write(resource, changed)

    def _deletecollection(self, target: _Target, request: _Request) -> _Reply:
        resource = target.resource
        selector = self._selector(target, request.query)
        items = self.store.select(resource, target.namespace, selector)
        removed = [self.store.remove(resource, obj) for obj in items]
        body = {"kind": f"{resource.kind}List", "apiVersion": resource.api_version}
        return _Reply(200, {**body, "metadata": {"resourceVersion": str(self.store.rv)},
                            "items": removed})  # fmt: skip

    def _token(self, target: _Target, request: _Request) -> _Reply:
        self._existing(target)
        body = self._body(request) or {}
        spec = dict(body.get("spec") or {}) if isinstance(body, dict) else {}
        spec.setdefault("audiences", ["https://kubernetes.default.svc.cluster.local"])
        spec.setdefault("expirationSeconds", 3600)
        expires = datetime.now(UTC) + timedelta(seconds=int(spec["expirationSeconds"]))
        token = fake_token(target.namespace, target.name, spec["audiences"])
        reply = {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": target.name, "namespace": target.namespace},
            "spec": spec,
            "status": {
                "token": token,
                "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
        return _Reply(201, reply)


def _check_preconditions(target: _Target, obj: Obj, preconditions: Mapping[str, Any]) -> None:
    meta = _meta(obj)
    for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
        wanted = preconditions.get(field)
        if wanted and wanted != meta.get(field):
            why = f"Precondition failed: {label} in precondition: {wanted}, {label} in object "
            raise _conflict(target.resource, target.name, why + f"meta: {meta.get(field)}")


def _secret_data(obj: Obj) -> Obj:
    """Fold `stringData` into `data` and check `data` is base64, as the API server does."""
    data = dict(obj.get("data") or {})
    for key, value in (obj.get("stringData") or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    for key, value in data.items():
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            message = 'Secret in version "v1" cannot be handled as a Secret: illegal base64 data'
            raise _ApiError(400, f"{message} at key {key!r}") from None
    result = {k: v for k, v in obj.items() if k != "stringData"}
    if data:
        result["data"] = data
    return result


def _prepare_create(resource: ResourceType, obj: Obj) -> Obj:
    if resource.custom:
        return {k: v for k, v in obj.items() if not (resource.status and k == "status")}
    if resource.kind == "Secret":
        return {**_secret_data(obj), "type": obj.get("type") or "Opaque"}
    if resource.kind == "Pod":
        return {**obj, "status": {"phase": "Pending"}}
    if resource.kind == "Namespace":
        name = _meta(obj)["name"]
        labels = {**(_meta(obj).get("labels") or {}), "kubernetes.io/metadata.name": name}
        spec = {"finalizers": ["kubernetes"], **(obj.get("spec") or {})}
        return {**_with_meta(obj, labels=labels), "spec": spec, "status": {"phase": "Active"}}
    return obj


def _prepare_update(resource: ResourceType, obj: Obj) -> Obj:
    if resource.kind == "Secret" and not resource.custom:
        return _secret_data(obj)
    return obj


# --- HTTP ------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


@attrs.define
class Fault:
    """An injected failure: the next `remaining` matching requests get it."""

    status: int | None  # None: close the connection without an answer
    remaining: int
    method: str | None = None
    path: str = ""
    verb: str | None = None
    resource: str | None = None
    retry_after: int | None = None
    message: str = ""

    def matches(self, method: str, path: str, verb: str, resource: str) -> bool:
        return (
            self.remaining > 0
            and self.method in (None, method)
            and path.startswith(self.path)
            and self.verb in (None, verb)
            and self.resource in (None, resource)
        )

    def error(self) -> _ApiError:
        assert self.status is not None
        message = self.message or f"injected failure ({self.status})"
        details: Obj = {}
        headers: tuple[tuple[str, str], ...] = ()
        if self.retry_after is not None:
            details["retryAfterSeconds"] = self.retry_after
            headers = (("Retry-After", str(self.retry_after)),)
        return _ApiError(self.status, message, details=details, headers=headers)


class FakeKube:
    """The running fake; made by `open_fake_kube`. See the module docstring."""

    def __init__(
        self,
        nursery: trio.Nursery,
        api: _Api,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        token: str | None,
        bookmark_interval: float,
        max_body_bytes: int,
    ) -> None:
        self._nursery = nursery
        self._api = api
        self._store = api.store
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.max_body_bytes = max_body_bytes
        self.latency = 0.0  # seconds added before every answer
        self.requests: Counter[tuple[str, str]] = Counter()  # (verb, resource) -> count
        self.recent: deque[tuple[str, str, int]] = deque(maxlen=200)  # (method, target, status)
        self.faults: list[Fault] = []
        self._serve_scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    # --- addresses and clients ---

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def resource_version(self) -> int:
        return self._store.rv

    def write_kubeconfig(
        self, path: str | os.PathLike[str], *, ca_file: str | os.PathLike[str] | None = None
    ) -> Path:
        """A kubeconfig with one context for this server (token auth; CA file for HTTPS)."""
        cluster: Obj = {"server": self.url}
        if ca_file is not None:
            cluster["certificate-authority"] = str(ca_file)
        elif self.ssl_context is not None:
            cluster["insecure-skip-tls-verify"] = True
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake-kube", "cluster": cluster}],
            "users": [{"name": "fake-kube", "user": {"token": self.token or "fake-kube-token"}}],
            "contexts": [
                {"name": "fake-kube", "context": {"cluster": "fake-kube", "user": "fake-kube"}}
            ],
            "current-context": "fake-kube",
        }
        target = Path(path)
        target.write_text(yaml.safe_dump(config))
        return target

    def api_client(self, *, ca_file: str | os.PathLike[str] | None = None, **settings: Any) -> Any:
        """A `kubernetes.client.ApiClient` for this server; `settings` set Configuration fields."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"BearerToken": f"Bearer {self.token or 'fake-kube-token'}"}
        if ca_file is not None:
            configuration.ssl_ca_cert = str(ca_file)
        elif self.ssl_context is not None:
            configuration.verify_ssl = False
        for name, value in settings.items():
            setattr(configuration, name, value)
        return client.ApiClient(configuration)

    # --- direct access to the objects ---

    def _resource(self, kind: str) -> ResourceType:
        for resource in self._api.resources.values():
            if kind in (resource.kind, resource.plural):
                return resource
        raise KeyError(f"the fake serves no kind {kind!r}")

    def _resource_of(self, obj: Mapping[str, Any]) -> ResourceType:
        resource = self._resource(str(obj.get("kind") or ""))
        if obj.get("apiVersion", resource.api_version) != resource.api_version:
            raise KeyError(f"the fake serves {resource.kind} as {resource.api_version}")
        return resource

    def put(self, obj: Mapping[str, Any]) -> Obj:
        """Create or replace `obj` as given (status included), with a new resourceVersion.

        A namespaced object without a namespace goes to `default`; uid and
        creationTimestamp are kept from `obj`, else from the stored object, else made.
        """
        resource = self._resource_of(obj)
        new: Obj = copy.deepcopy(dict(obj))
        new.update(kind=resource.kind, apiVersion=resource.api_version)
        meta = _meta(new)
        namespace = str(meta.get("namespace") or "default") if resource.namespaced else ""
        if not meta.get("name"):
            raise ValueError("put() needs metadata.name")
        old = self._store.get(resource, namespace, str(meta["name"])) or {}
        new = _with_meta(
            new,
            namespace=namespace or None,
            uid=meta.get("uid") or _meta(old).get("uid") or str(uuid.uuid4()),
            creationTimestamp=meta.get("creationTimestamp")
            or _meta(old).get("creationTimestamp")
            or _now(),
            resourceVersion=_rv(old) or None,
        )
        return copy.deepcopy(self._store.write(resource, new))

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """Delete at once (no grace period); the final state, or None when there was none."""
        resource = self._resource(kind)
        obj = self._store.get(resource, namespace or "", name)
        return None if obj is None else copy.deepcopy(self._store.remove(resource, obj))

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        obj = self._store.get(self._resource(kind), namespace or "", name)
        return copy.deepcopy(obj)

    def objects(self, kind: str, namespace: str | None = None) -> list[Obj]:
        items = self._store.select(self._resource(kind), namespace or "", _Selector())
        return copy.deepcopy(items)

    def compact(self) -> None:
        """Forget the event history: watches from an older resourceVersion get 410 Expired."""
        self._store.compact()

    def count(self, verb: str, resource: str) -> int:
        return self.requests[(verb, resource)]

    # --- failures ---

    def fail_next(
        self,
        status: int = 503,
        *,
        times: int = 1,
        method: str | None = None,
        path: str = "",
        verb: str | None = None,
        resource: str | None = None,
        retry_after: int | None = None,
        message: str = "",
    ) -> Fault:
        """The next `times` requests matching all the given criteria fail with `status`.

        `path` is a prefix of the URL path; `verb` and `resource` as in `requests`.
        `retry_after` adds a Retry-After header (and details.retryAfterSeconds).
        """
        fault = Fault(status, times, method, path, verb, resource, retry_after, message)
        self.faults.append(fault)
        return fault

    def drop_next(
        self,
        *,
        times: int = 1,
        method: str | None = None,
        path: str = "",
        verb: str | None = None,
        resource: str | None = None,
    ) -> Fault:
        """The next `times` matching requests get no answer: the connection just closes."""
        fault = Fault(None, times, method, path, verb, resource)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def _take_fault(self, method: str, path: str, verb: str, resource: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path, verb, resource):
                fault.remaining -= 1
                return fault
        return None

    # --- watches ---

    def watchers(self, resource: str | None = None) -> int:
        """How many watch streams are open (for `resource`, a plural or kind, if given)."""
        return sum(
            1
            for w in self._store.watchers
            if resource is None or resource in (w.resource.plural, w.resource.kind)
        )

    async def wait_watchers(self, count: int, resource: str | None = None) -> None:
        """Wait until exactly `count` watch streams are open (bound it with fail_after)."""
        while self.watchers(resource) != count:
            await self._store.watchers_changed.wait()

    def close_watches(self, *, abort: bool = False) -> int:
        """End every open watch stream now; returns how many.

        Cleanly (what is queued is sent, then the response ends, as on `timeoutSeconds`), or
        with `abort` by closing the connection mid-stream.
        """
        watchers = list(self._store.watchers)
        for watcher in watchers:
            self._store.drop_watcher(watcher)
            if abort:
                watcher.abort = True
                watcher.cancel.cancel()
        return len(watchers)

    # --- the listener ---

    async def start(self) -> None:
        """Listen again (on the same port once one was picked); no-op when listening."""
        if self._serve_scope is None:
            await self._nursery.start(self._serve)

    async def stop(self) -> None:
        """Close the listener and every connection, watch streams included, at once."""
        if self._serve_scope is not None:
            self._serve_scope.cancel()
            await self._stopped.wait()

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                listeners = await trio.open_tcp_listeners(self.port, host=self.host)
                self.port = int(listeners[0].socket.getsockname()[1])
                self._serve_scope = scope
                task_status.started()
                if self.ssl_context is None:
                    await trio.serve_listeners(self._connection, listeners)
                context = self.ssl_context
                tls = [trio.SSLListener(x, context, https_compatible=True) for x in listeners]
                await trio.serve_listeners(self._connection, tls)
        finally:
            self._serve_scope = None
            self._stopped.set()

    async def _connection(self, stream: trio.abc.Stream) -> None:
        try:
            if isinstance(stream, trio.SSLStream):
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.do_handshake()
            await self._serve_requests(stream)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
        ) as exc:
            logger.debug("fake kube: connection ended: %r", exc)
        finally:
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _serve_requests(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            try:
                request = await _read_request(conn, stream, self.max_body_bytes)
            except h11.RemoteProtocolError as exc:
                error = _ApiError(exc.error_status_hint, f"bad request: {exc}")
                await _send_error(conn, stream, error)
                return
            except _BodyTooLarge:
                message = f"the request body is larger than {self.max_body_bytes} bytes"
                await _send_error(conn, stream, _ApiError(413, message))
                return
            if request is None or not await self._answer(conn, stream, request):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _answer(
        self, conn: h11.Connection, stream: trio.abc.Stream, request: _Request
    ) -> bool:
        """Answer one request; False when the connection must close."""
        try:
            target = self._admit(request)
            if self.latency > 0:
                await trio.sleep(self.latency)
            outcome = target if isinstance(target, _Reply) else self._api.handle(target, request)
        except _Dropped:
            self.recent.append((request.method, request.path, 0))
            return False
        except _ApiError as error:
            outcome = _Reply(error.code, error.body, error.headers)
        if isinstance(outcome, _WatchStart):
            self.recent.append((request.method, request.path, 200))
            return await self._stream_watch(conn, stream, outcome)
        self.recent.append((request.method, request.path, outcome.status))
        if outcome.status >= 400:
            logger.debug("fake kube: %s %s -> %d", request.method, request.path, outcome.status)
        await _send(conn, stream, outcome)
        return True

    def _admit(self, request: _Request) -> _Target | _Reply:
        """Authenticate, route and count the request, then apply an injected failure."""
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            raise _ApiError(401, "Unauthorized")
        discovery = self._discovery(request)
        if discovery is not None:
            return discovery
        target = self._api.route(request)
        resource = target.resource_name
        self.requests[(target.verb, resource)] += 1
        fault = self._take_fault(request.method, request.path, target.verb, resource)
        if fault is not None and fault.status is None:
            raise _Dropped
        if fault is not None:
            raise fault.error()
        return target

    def _discovery(self, request: _Request) -> _Reply | None:
        path = request.path.rstrip("/")
        if request.method != "GET":
            return None
        if path == "/version":
            body = {"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake", "platform": "fake"}
            return _Reply(200, body)
        if path == "/api":
            return _Reply(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            groups = sorted({r.group for r in self._api.resources.values() if r.group})
            listed = [{"name": g, "versions": [], "preferredVersion": {}} for g in groups]
            return _Reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": listed})
        return None

    async def _stream_watch(
        self, conn: h11.Connection, stream: trio.abc.Stream, start: _WatchStart
    ) -> bool:
        """Stream one watch; False when the connection must close afterwards."""
        watcher = start.watcher
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        try:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_notice_close, stream, watcher)
                with watcher.cancel:
                    try:
                        await self._pump(conn, stream, watcher, start)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        watcher.abort = True  # the client went away mid-send
                nursery.cancel_scope.cancel()
        finally:
            self._store.drop_watcher(watcher)
        if watcher.abort:
            return False
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True

    async def _pump(
        self, conn: h11.Connection, stream: trio.abc.Stream, watcher: _Watcher, start: _WatchStart
    ) -> None:
        # Deadlines are checked between sends, never cancel one: a half-sent chunk would
        # corrupt the stream that the client reads to its clean end.
        deadline = trio.current_time() + start.timeout
        interval = self.bookmark_interval if start.bookmarks else math.inf
        next_bookmark = trio.current_time() + interval
        while (now := trio.current_time()) < deadline:
            if now >= next_bookmark and watcher.idle():
                # Nothing queued: every event up to the current resourceVersion is out.
                line: bytes | None = self._bookmark(watcher.resource)
                next_bookmark = now + interval
            else:
                try:
                    line = await watcher.next_line(min(next_bookmark, deadline))
                except trio.EndOfChannel:
                    return
            if line is not None:
                await stream.send_all(conn.send(h11.Data(data=line)))

    def _bookmark(self, resource: ResourceType) -> bytes:
        obj = {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self._store.rv)},
        }
        return _event_line("BOOKMARK", obj)


class _Dropped(Exception):
    """An injected failure that closes the connection without an answer."""


async def _notice_close(stream: trio.abc.Stream, watcher: _Watcher) -> None:
    """A watch client sends nothing more: any byte or EOF means it went away."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.receive_some(RECEIVE_BYTES)
    watcher.abort = True
    watcher.cancel.cancel()


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            assert not isinstance(event, type)  # PAUSED cannot happen: we never pipeline
            return event
        conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, max_body: int
) -> _Request | None:
    """The next request with its whole body, or None when the client closed."""
    event = await _next_event(conn, stream)
    if not isinstance(event, h11.Request):
        return None
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers
    }
    if int(headers.get("content-length") or 0) > max_body:
        raise _BodyTooLarge
    body = bytearray()
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > max_body:
                raise _BodyTooLarge
        elif isinstance(part, h11.EndOfMessage):
            break
        else:
            raise h11.RemoteProtocolError("connection closed inside the request body")
    path, _, query = event.target.decode("latin-1").partition("?")
    return _Request(
        method=event.method.decode("latin-1"),
        path=path,
        query=dict(parse_qsl(query, keep_blank_values=True)),
        headers=headers,
        body=bytes(body),
    )


async def _send(
    conn: h11.Connection, stream: trio.abc.Stream, reply: _Reply, *, close: bool = False
) -> None:
    body = _encode(reply.body)
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *reply.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    try:
        reason = http.HTTPStatus(reply.status).phrase
    except ValueError:
        reason = ""
    response = h11.Response(status_code=reply.status, headers=headers, reason=reason)
    await stream.send_all(
        conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    )


async def _send_error(conn: h11.Connection, stream: trio.abc.Stream, error: _ApiError) -> None:
    """Answer a request we could not read, when HTTP still allows an answer."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    with suppress(h11.LocalProtocolError):
        await _send(conn, stream, _Reply(error.code, error.body), close=True)


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking `kubernetes` client call in a worker thread.

    Cancelling abandons the thread (it ends when its connection does), so a `fail_after`
    around a call that hangs fails the test instead of hanging it.
    """
    call = partial(function, *args, **kwargs)
    return await trio.to_thread.run_sync(call, abandon_on_cancel=True)


@asynccontextmanager
async def open_fake_kube(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    token: str | None = None,
    history: int | None = DEFAULT_HISTORY,
    bookmark_interval: float = 1.0,
    watch_buffer: int = DEFAULT_WATCH_BUFFER,
    max_body_bytes: int = MAX_BODY_BYTES,
    graceful_pod_deletion: bool = False,
    require_namespaces: bool = False,
    resources: Iterable[ResourceType] = (),
) -> AsyncIterator[FakeKube]:
    """Run a fake API server on `host`:`port` (0: a free port) until the block ends.

    `token`: when set, requests must carry `Authorization: Bearer <token>` (else 401).
    `history`: how many recent events a watch can resume from (None: all, until `compact`).
    `watch_buffer`: events queued for a slow watch stream before it is closed.
    `graceful_pod_deletion`: deleting a pod bound to a node only sets deletionTimestamp, as
    the real API server does until the kubelet deletes it with gracePeriodSeconds=0.
    `require_namespaces`: creating in a namespace that does not exist is a 404, as for real.
    `resources`: more kinds (custom resources) to serve.
    """
    store = _Store(history)
    api = _Api(
        store,
        (*CORE_RESOURCES, *KUBEEDGE_RESOURCES, *resources),
        watch_buffer=watch_buffer,
        graceful_pod_deletion=graceful_pod_deletion,
        require_namespaces=require_namespaces,
    )
    async with trio.open_nursery() as nursery:
        kube = FakeKube(
            nursery,
            api,
            host=host,
            port=port,
            ssl_context=ssl_context,
            token=token,
            bookmark_interval=bookmark_interval,
            max_body_bytes=max_body_bytes,
        )
        await kube.start()
        try:
            yield kube
        finally:
            nursery.cancel_scope.cancel()
