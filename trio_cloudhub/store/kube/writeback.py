"""What edges report, written back to the cluster as CloudCore's edgecontroller does it.

Resource strings, operations, contents and answers follow `upstream.go` of KubeEdge v1.23.1
(which still serves the v1.10 edge's messages). The edge resource is `<ns>/<type>/<name>`:

- `nodestatus` insert (v1.10 registration): get the Node, create it when NotFound; answer
  `<ns>/node/<n>` "OK" or the error text;
- `nodestatus` update (a `NodeStatusRequest`): patch the Node status (a heartbeat older than
  10 s is set to now); answer `<ns>/node/<n>` "OK" with the new resourceVersion;
- `podstatus` update (a list of `PodStatusRequest`): patch each pod's status, answer "OK"; a
  pod gone or replaced (other UID) is deleted on the edge; a pod being deleted whose
  containers all ended is deleted with grace period 0 (the end of a graceful deletion);
- `node` insert (v1.23 registration): create the Node; answer an `ObjectResp`;
- `node` update: add the edge's labels and annotations to the Node; `<ns>/node/<n>` "OK";
- `pod` insert (v1.23 mirror pods): create the pod; `ObjectResp`;
- `nodepatch`, `podpatch` patch: strategic merge patch of the status; `ObjectResp`;
- `pod` delete (the pod UID as text, or DeleteOptions): delete the pod; "OK" or the error;
- `lease` insert / update / query: create / update / get the lease; `ObjectResp`;
- `configmap`, `secret`, `node`, `pod` query: from the informer cache; the object;
- `serviceaccounttoken` query (a `TokenRequest`): create a token; the TokenRequest.
Answers go to the request's resource unless named above, with the request's msg_id as parent.
`ObjectResp` is `{"Object": <object or null>, "Err": null | {"ErrStatus": <Status>}}`. Every
call runs in a bounded worker thread behind the API rate limiter; a call that fails without an
answer or with 5xx/429 is retried (`ATTEMPTS`, back-off), any other failure is answered with
the error and logged once as a warning.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import attrs
import trio

from trio_cloudhub.core.message import (
    GROUP_RESOURCE,
    OP_DELETE,
    OP_INSERT,
    OP_PATCH,
    OP_QUERY,
    OP_RESPONSE,
    OP_UPDATE,
    SOURCE_EDGECONTROLLER,
    Message,
    ResourceParts,
    cloud_resource,
    new_message,
    response_to,
    split_edge_resource,
)
from trio_cloudhub.store.kube.calls import KubeCallError, RawApi
from trio_cloudhub.store.kube.client import RateLimiter
from trio_cloudhub.store.reconcile import now_ms

log = logging.getLogger("trio_cloudhub.kube")

ATTEMPTS = 4
RETRY_BASE = 0.5
MAX_CONTENT_BYTES = 1024 * 1024
HEARTBEAT_AGE = 10.0  # seconds: CloudCore's nodeUpdateFrequency default
OK = "OK"
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
WRITE_TYPES = frozenset(
    {"nodestatus", "podstatus", "node", "nodepatch", "podpatch", "pod", "lease"}
)
QUERY_TYPES = frozenset({"configmap", "secret", "node", "pod", "serviceaccounttoken", "lease"})

Runner = Callable[[Callable[[], Any]], Awaitable[Any]]
Cached = Callable[[str, str, str], dict[str, Any] | None]  # (type, namespace, name)


class RequestError(ValueError):
    """The edge's message cannot be used; the text says why."""


@attrs.frozen(slots=True)
class Request:
    node_id: str
    message: Message
    parts: ResourceParts

    @property
    def operation(self) -> str:
        return self.message.route.operation


def parse_request(node_id: str, message: Message) -> Request | None:
    """The request a message makes of the cluster, or None when it is not one we handle."""
    parts = split_edge_resource(message.route.resource)
    if parts is None or (not parts.name and parts.resource_type != "podstatus"):
        return None  # (a podstatus without a name carries a list of pods)
    operation = message.route.operation
    if operation == OP_QUERY:
        return Request(node_id, message, parts) if parts.resource_type in QUERY_TYPES else None
    if parts.resource_type in WRITE_TYPES:
        return Request(node_id, message, parts)
    return None


def content_json(content: Any) -> Any:
    """Content as sent: an object, JSON text, or Go `[]byte` (base64 of JSON)."""
    if not isinstance(content, str):
        return content
    if len(content) > MAX_CONTENT_BYTES:
        raise RequestError(f"content of {len(content)} bytes exceeds {MAX_CONTENT_BYTES}")
    for decode in (json.loads, lambda text: json.loads(base64.b64decode(text, validate=True))):
        try:
            return decode(content)
        except (ValueError, binascii.Error):
            continue
    raise RequestError("content is text that is neither JSON nor base64 JSON")


def object_resp(obj: Any, error: KubeCallError | None) -> dict[str, Any]:
    """edgeapi.ObjectResp as Go marshals it."""
    return {"Object": obj, "Err": None if error is None else error_status(error)}


def error_status(error: KubeCallError) -> dict[str, Any]:
    """A Go `*errors.StatusError` as JSON: the API's Status, or one made from the text."""
    try:
        status = json.loads(error.body)
    except ValueError:
        status = None
    if not isinstance(status, dict) or status.get("kind") != "Status":
        status = {
            "metadata": {},
            "status": "Failure",
            "message": str(error),
            "code": error.status or 500,
        }
    return {"ErrStatus": status}


class KubeWriteback:
    """Applies edge reports and answers edge requests against the cluster (module doc)."""

    def __init__(
        self,
        api: RawApi,
        *,
        run: Runner,
        cached: Cached,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._api = api
        self._run = run
        self._cached = cached
        self._limiter = limiter

    async def handle(self, request: Request) -> list[Message]:
        """The messages to send the edge in answer (in cloud resource form)."""
        handler = self._handler(request)
        if handler is None:
            log.debug("node %s: no write-back for %s", request.node_id, request.message.route)
            return []
        try:
            return await handler(request)
        except RequestError as exc:
            log.warning(
                "node %s: unusable %s %s: %s",
                request.node_id,
                request.operation,
                request.message.route.resource,
                exc,
            )
            return []

    def _handler(self, request: Request) -> Callable[[Request], Awaitable[list[Message]]] | None:
        kind, operation = request.parts.resource_type, request.operation
        table: dict[tuple[str, str], Callable[[Request], Awaitable[list[Message]]]] = {
            ("nodestatus", OP_INSERT): self._register_legacy,
            ("nodestatus", OP_UPDATE): self._node_status,
            ("podstatus", OP_UPDATE): self._pod_statuses,
            ("node", OP_INSERT): self._register,
            ("node", OP_UPDATE): self._node_labels,
            ("pod", OP_INSERT): self._create_pod,
            ("nodepatch", OP_PATCH): partial(self._patch_status, "nodes"),
            ("podpatch", OP_PATCH): partial(self._patch_status, "pods"),
            ("pod", OP_DELETE): self._delete_pod,
            ("lease", OP_INSERT): partial(self._lease_write, "POST"),
            ("lease", OP_UPDATE): partial(self._lease_write, "PUT"),
            ("lease", OP_QUERY): self._lease_query,
            ("serviceaccounttoken", OP_QUERY): self._token,
        }
        if operation == OP_QUERY and kind in ("configmap", "secret", "node", "pod"):
            return self._query_cache
        return table.get((kind, operation))

    # --- the API ------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """One request with retries of the transient failures; KubeCallError otherwise."""
        delay = RETRY_BASE
        for attempt in range(1, ATTEMPTS + 1):
            if self._limiter is not None:
                await self._limiter.acquire()
            try:
                return await self._run(partial(self._api.request, method, path, body, **kwargs))
            except KubeCallError as exc:
                transient = exc.status is None or exc.status >= 500 or exc.status == 429
                if not transient or attempt == ATTEMPTS:
                    raise
                await trio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _logged_call(
        self, request: Request, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[Any, KubeCallError | None]:
        try:
            return await self._call(method, path, body, **kwargs), None
        except KubeCallError as exc:
            log.warning("node %s: %s %s failed: %s", request.node_id, method, path, exc)
            return None, exc

    # --- node registration and status ----------------------------------------------------

    async def _register_legacy(self, request: Request) -> list[Message]:
        """v1.10: insert of nodestatus carries the Node; create it unless it exists."""
        name = request.parts.name
        node = _node_body(content_json(request.message.content), name)
        try:
            await self._call("GET", f"/api/v1/nodes/{name}")
            text = OK
        except KubeCallError as exc:
            if exc.status != 404:
                text = f"get node {name} info error: {exc}, register node failed"
            else:
                _, error = await self._logged_call(request, "POST", "/api/v1/nodes", node)
                text = (
                    OK
                    if error is None
                    else f"create node {name} error: {error}, register node failed"
                )
                if error is None:
                    log.info("node %s registered (created Node %s)", request.node_id, name)
        return [self._reply(request, text, resource_type="node")]

    async def _register(self, request: Request) -> list[Message]:
        """v1.23: insert of node; the answer is the created Node or the error."""
        node = _node_body(content_json(request.message.content), request.parts.name)
        created, error = await self._logged_call(request, "POST", "/api/v1/nodes", node)
        if error is None:
            log.info("node %s registered (created Node %s)", request.node_id, request.parts.name)
        return [self._reply(request, object_resp(created, error))]

    async def _node_labels(self, request: Request) -> list[Message]:
        """`node` update: the edge's labels and annotations are added (never removed)."""
        node = content_json(request.message.content)
        metadata = node.get("metadata") if isinstance(node, dict) else None
        if not isinstance(metadata, dict):
            raise RequestError("node update without metadata")
        patch = {
            "metadata": {
                field: metadata[field]
                for field in ("labels", "annotations")
                if isinstance(metadata.get(field), dict)
            }
        }
        path = _object_path("nodes", "", request.parts.name)
        patched, error = await self._logged_call(request, "PATCH", path, patch, content_type=MERGE)
        if error is not None:
            return []  # CloudCore answers nothing then either
        return [self._reply(request, OK, resource_type="node", rv=_rv(patched))]

    async def _create_pod(self, request: Request) -> list[Message]:
        """v1.23: the kubelet's mirror pod of a static pod."""
        pod = content_json(request.message.content)
        if not isinstance(pod, dict):
            raise RequestError("pod create without a Pod object")
        path = f"/api/v1/namespaces/{request.parts.namespace}/pods"
        created, error = await self._logged_call(request, "POST", path, pod)
        return [self._reply(request, object_resp(created, error), rv=_rv(created))]

    async def _node_status(self, request: Request) -> list[Message]:
        """v1.10: a NodeStatusRequest; the reported status replaces the Node's."""
        report = content_json(request.message.content)
        status = report.get("Status") if isinstance(report, dict) else None
        if not isinstance(status, dict):
            raise RequestError("node status report without a Status object")
        status = _with_fresh_heartbeats(_reportable_node_status(status))
        name = request.parts.name
        path = f"/api/v1/nodes/{name}/status"
        node, error = await self._logged_call(
            request, "PATCH", path, {"status": status}, content_type=MERGE
        )
        if error is not None:
            return []  # CloudCore answers nothing then either
        return [self._reply(request, OK, resource_type="node", rv=_rv(node))]

    async def _patch_status(self, plural: str, request: Request) -> list[Message]:
        """v1.23: nodepatch / podpatch, a strategic merge patch of the status."""
        patch = content_json(request.message.content)
        if not isinstance(patch, dict):
            raise RequestError("patch content is not a JSON object")
        path = _object_path(plural, request.parts.namespace, request.parts.name) + "/status"
        patched, error = await self._logged_call(
            request, "PATCH", path, patch, content_type=STRATEGIC
        )
        return [self._reply(request, object_resp(patched, error), rv=_rv(patched))]

    # --- pods -----------------------------------------------------------------------------

    async def _pod_statuses(self, request: Request) -> list[Message]:
        """v1.10: a list of PodStatusRequest; each pod's status is written back."""
        items = content_json(request.message.content)
        items = items if isinstance(items, list) else [items]
        replies: list[Message] = []
        for item in items:
            replies += await self._pod_status(request, item)
        return replies

    async def _pod_status(self, request: Request, item: Any) -> list[Message]:
        if not isinstance(item, dict) or not isinstance(item.get("Name"), str):
            raise RequestError("pod status report without a Name")
        namespace, name = request.parts.namespace, item["Name"]
        reported = item.get("Status")
        status: dict[str, Any] = dict(reported) if isinstance(reported, dict) else {}
        pod = self._cached("pod", namespace, name)
        if pod is None or (pod.get("metadata") or {}).get("uid") != item.get("UID"):
            # Gone or replaced: CloudCore answers OK and deletes it on the edge.
            return [self._reply(request, OK), _delete_on_edge(request.node_id, namespace, name)]
        status = _pod_status_against(pod.get("status") or {}, status)
        path = _object_path("pods", namespace, name) + "/status"
        updated, error = await self._logged_call(
            request, "PATCH", path, {"status": status}, content_type=MERGE
        )
        if error is not None:
            return [self._reply(request, error_status(error))]
        if _finished_while_deleting(updated, status):
            await self._logged_call(
                request, "DELETE", _object_path("pods", namespace, name), {"gracePeriodSeconds": 0}
            )
        return [self._reply(request, OK)]

    async def _delete_pod(self, request: Request) -> list[Message]:
        content = request.message.content
        if isinstance(content, str) and not content.lstrip().startswith("{"):
            options: Any = {"gracePeriodSeconds": 0, "preconditions": {"uid": content}}
        else:
            options = content_json(content)
        path = _object_path("pods", request.parts.namespace, request.parts.name)
        try:
            await self._call("DELETE", path, options)
        except KubeCallError as exc:
            if exc.status not in (404, 409):  # gone, or deleted and recreated: done
                log.warning("node %s: deleting pod %s failed: %s", request.node_id, path, exc)
                return [self._reply(request, error_status(exc))]
        return [self._reply(request, OK)]

    # --- leases, tokens, queries ----------------------------------------------------------

    async def _lease_write(self, method: str, request: Request) -> list[Message]:
        lease = content_json(request.message.content)
        if not isinstance(lease, dict):
            raise RequestError("lease content is not an object")
        path = _lease_path(request.parts.namespace, "" if method == "POST" else request.parts.name)
        written, error = await self._logged_call(request, method, path, lease)
        return [self._reply(request, object_resp(written, error))]

    async def _lease_query(self, request: Request) -> list[Message]:
        path = _lease_path(request.parts.namespace, request.parts.name)
        try:
            lease = await self._call("GET", path)
        except KubeCallError as exc:
            return [self._reply(request, object_resp(None, exc))]
        return [self._reply(request, object_resp(lease, None), rv=_rv(lease))]

    async def _token(self, request: Request) -> list[Message]:
        token_request = content_json(request.message.content)
        if not isinstance(token_request, dict):
            raise RequestError("service account token request is not an object")
        path = (
            _object_path("serviceaccounts", request.parts.namespace, request.parts.name) + "/token"
        )
        created, error = await self._logged_call(request, "POST", path, token_request)
        if error is not None:
            return [self._reply(request, error_status(error))]
        if isinstance(created, dict):  # SetMetaType, as CloudCore's queryInner
            created.setdefault("apiVersion", "authentication.k8s.io/v1")
            created.setdefault("kind", "TokenRequest")
        return [self._reply(request, created, rv=_rv(created))]

    async def _query_cache(self, request: Request) -> list[Message]:
        parts = request.parts
        namespace = "" if parts.resource_type == "node" else parts.namespace
        obj = self._cached(parts.resource_type, namespace, parts.name)
        if obj is None:
            status = {
                "metadata": {},
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
                "message": f'{parts.resource_type}s "{parts.name}" not found',
            }
            return [self._reply(request, {"ErrStatus": status})]
        return [self._reply(request, obj, rv=_rv(obj))]

    # --- answers --------------------------------------------------------------------------

    def _reply(
        self, request: Request, content: Any, *, resource_type: str = "", rv: str = ""
    ) -> Message:
        """edgecontroller's `response` to the request, in cloud resource form."""
        parts = request.parts
        resource = cloud_resource(
            request.node_id, parts.namespace, resource_type or parts.resource_type, parts.name
        )
        reply = response_to(request.message, content, now_ms())
        route = attrs.evolve(
            reply.route,
            source=SOURCE_EDGECONTROLLER,
            group=GROUP_RESOURCE,
            operation=OP_RESPONSE,
            resource=resource,
        )
        header = attrs.evolve(reply.header, resource_version=rv)
        return attrs.evolve(reply, route=route, header=header)


def _delete_on_edge(node_id: str, namespace: str, name: str) -> Message:
    """CloudCore's delete of a pod the cloud no longer has (content: namespace and name)."""
    return new_message(
        source=SOURCE_EDGECONTROLLER,
        group=GROUP_RESOURCE,
        operation=OP_DELETE,
        resource=cloud_resource(node_id, namespace, "pod", name),
        content={"metadata": {"name": name, "namespace": namespace}},
        now_ms=now_ms(),
    )


def _node_body(node: Any, name: str) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise RequestError("node registration without a Node object")
    metadata = dict(node.get("metadata") or {})
    metadata["name"] = name
    for server_field in ("resourceVersion", "uid", "creationTimestamp"):
        metadata.pop(server_field, None)
    return {**node, "apiVersion": "v1", "kind": "Node", "metadata": metadata}


def _reportable_node_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The reported status minus what the cloud side owns (CloudCore keeps those)."""
    kept = dict(status)
    kept.pop("volumesAttached", None)  # maintained by kube-controller-manager
    endpoints = kept.get("daemonEndpoints")
    port = (
        ((endpoints or {}).get("kubeletEndpoint") or {}).get("Port")
        if isinstance(endpoints, dict)
        else None
    )
    if not port:
        kept.pop("daemonEndpoints", None)
    return kept


def _with_fresh_heartbeats(status: dict[str, Any]) -> dict[str, Any]:
    """CloudCore's: a condition heartbeat older than HEARTBEAT_AGE (the edge's status was
    stored while it was offline) is set to now, so the node is not taken for dead."""
    now = datetime.datetime.now(datetime.UTC)
    conditions = []
    for condition in status.get("conditions") or []:
        if isinstance(condition, dict) and _older_than(condition.get("lastHeartbeatTime"), now):
            condition = {**condition, "lastHeartbeatTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
        conditions.append(condition)
    if conditions:
        status["conditions"] = conditions
    return status


def _older_than(stamp: Any, now: datetime.datetime) -> bool:
    if not isinstance(stamp, str):
        return True
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return True
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return (now - when).total_seconds() > HEARTBEAT_AGE


def _pod_status_against(old: Mapping[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """CloudCore's adjustments: condition transition times and startTime kept when unchanged."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    old_conditions = {c.get("type"): c for c in old.get("conditions") or [] if isinstance(c, dict)}
    conditions = []
    for condition in status.get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") in ("Ready", "Initialized"):
            before = old_conditions.get(condition["type"])
            same = before is not None and before.get("status") == condition.get("status")
            condition = {
                **condition,
                "lastTransitionTime": before.get("lastTransitionTime") if same and before else now,
            }
        conditions.append(condition)
    if conditions:
        status["conditions"] = conditions
    status["startTime"] = old.get("startTime") or status.get("startTime") or now
    return status


def _finished_while_deleting(pod: Any, status: Mapping[str, Any]) -> bool:
    """A pod being deleted whose containers all ended: CloudCore completes the deletion."""
    if not isinstance(pod, dict) or not (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if status.get("phase") not in ("Succeeded", "Failed"):
        return False
    containers = status.get("containerStatuses") or []
    return all(
        isinstance(c, dict)
        and "running" not in (c.get("state") or {})
        and "waiting" not in (c.get("state") or {})
        for c in containers
    )


def _object_path(plural: str, namespace: str, name: str) -> str:
    if plural == "nodes":
        return f"/api/v1/nodes/{name}"
    return f"/api/v1/namespaces/{namespace}/{plural}/{name}"


def _lease_path(namespace: str, name: str) -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


def _rv(obj: Any) -> str:
    if isinstance(obj, dict):
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if isinstance(rv, str):
            return rv
    return ""
