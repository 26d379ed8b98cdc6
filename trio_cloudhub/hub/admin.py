"""The running hub's admin endpoint: what `trio-cloudhub get nodes|pods` shows.

Only the running process knows which nodes have a session, over which transport, from where,
how many messages wait for each and when the last ACK and keepalive came, so `get nodes`
asks it instead of guessing from the database. The metrics server
(`commonConfig.monitorServer.bindAddress`) answers, to loopback clients only (node names
and addresses are not for the network a Prometheus scrape may come from):

- `GET /admin/nodes`: `{"apiVersion": "trio-cloudhub/v1", "kind": "NodeList", "hub": {...},
  "items": [...]}`, one item per node the hub knows: the store's nodes (`known_nodes`: the
  embedded store's joined, connected, desired nodes and nodes with pods or ack points; the
  Kubernetes store's edge nodes) plus every node with a session or a queue in this process;
- `GET /admin/pods`: `{"kind": "PodList", ...}`, what edges reported of their pods (the
  embedded store's database; the Kubernetes store's informer cache of pods on edge nodes).

Each process answers for itself (`hub.pid`): its own sessions and queues. At start a hub
writes `<data dir>/run/admin-<pid>-<port>.json` (its URL, pid, store; `admin_api`) and
removes it at exit; the command line reads every such file in the data directory and
merges the answers (a node connected to one process is connected; otherwise the latest
record wins). Several processes serving one data directory or one cluster (e.g.
`serve --workers N`) therefore need only each write their own file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_cloudhub.admin_api import (
    API_VERSION,
    CONNECTED,
    DISCONNECTED,
    FILE_PREFIX,
    NEVER_CONNECTED,
    RUN_DIR,
    announced_pid,
    process_alive,
    report_item,
    rfc3339,
)
from trio_cloudhub.hub.node import wall_ms
from trio_cloudhub.store.base import NodeRecord
from trio_cloudhub.store.localdb import pod_summary, read_reports
from trio_cloudhub.store.routing import pod_node

if TYPE_CHECKING:
    from trio_cloudhub.hub.hub import Hub
    from trio_cloudhub.store.kube.store import KubeStore

log = logging.getLogger("trio_cloudhub.admin")

AdminRoute = Callable[[], Awaitable[Any]]
"""An admin path's answer: a JSON-able value."""
PodSource = Callable[[], Awaitable[list[dict[str, Any]]]]


@attrs.frozen
class HubIdentity:
    """Which process answers (every answer names it, so merged answers stay traceable)."""

    pid: int
    store: str  # local or kube
    started: str  # RFC 3339

    @classmethod
    def of_this_process(cls, store: str) -> HubIdentity:
        return cls(pid=os.getpid(), store=store, started=rfc3339(wall_ms()) or "")

    def as_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "store": self.store, "started": self.started}


# --- nodes ----------------------------------------------------------------------------------


async def node_list(hub: Hub, identity: HubIdentity) -> dict[str, Any]:
    known = hub.store.known_nodes()
    names = sorted(set(known) | set(hub.sessions) | set(hub.nodes))
    items = []
    for count, name in enumerate(names, start=1):
        items.append(node_item(hub, known.get(name) or NodeRecord(name), identity.pid))
        if count % 64 == 0:
            await trio.lowlevel.checkpoint()  # a large fleet: let the sessions run
    return {
        "apiVersion": API_VERSION,
        "kind": "NodeList",
        "hub": identity.as_json(),
        "items": items,
    }


def node_item(hub: Hub, record: NodeRecord, pid: int) -> dict[str, Any]:
    """One node as this process sees it: its session here if any, else the store's record."""
    name = record.name
    session = hub.sessions.get(name)
    entry = hub.nodes.get(name)
    queue = entry.queue if entry is not None else None
    in_flight = queue.in_flight if queue is not None else None
    item: dict[str, Any] = {
        "name": name,
        "status": _status(record, connected=session is not None),
        "since": None,
        "transport": record.transport,
        "remote": record.remote,
        "project": record.project,
        "waiting": len(queue) if queue is not None else 0,
        "inFlight": in_flight.resource if in_flight is not None else None,
        "behind": len(hub.store.missed(name)),
        "lastAck": rfc3339(record.last_ack_ms),
        "lastKeepalive": rfc3339(record.last_keepalive_ms),
        "firstConnected": rfc3339(record.first_connected_ms),
        "lastDisconnect": None,
        "joined": rfc3339(record.joined_ms),
        "desired": record.desired,
        "ready": record.reported or None,
        "hub": pid,
    }
    if session is not None:
        item.update(
            since=rfc3339(session.connected_ms),
            transport=session.transport,
            remote=session.remote,
            lastAck=rfc3339(max(session.last_ack_ms, record.last_ack_ms)),
            lastKeepalive=rfc3339(session.last_keepalive_ms),
        )
    if record.disconnected_ms:
        item["lastDisconnect"] = {"at": rfc3339(record.disconnected_ms), "reason": record.reason}
    if session is None and record.connected_ms and not record.session_open:
        item["since"] = rfc3339(record.disconnected_ms)
    return item


def _status(record: NodeRecord, *, connected: bool) -> str:
    if connected:
        return CONNECTED
    # A session whose end was never recorded (the hub was killed, or another process of
    # the same data directory serves it) is not connected here; since when is unknown.
    return DISCONNECTED if record.connected_ms else NEVER_CONNECTED


# --- pods -----------------------------------------------------------------------------------


async def pod_list(source: PodSource, identity: HubIdentity) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "PodList",
        "hub": identity.as_json(),
        "items": await source(),
    }


async def local_pod_items(data_dir: Path) -> list[dict[str, Any]]:
    """The embedded store: the pod status reports in its database (read-only, in a thread)."""
    reports = await trio.to_thread.run_sync(read_reports, data_dir, "pods")
    return [report_item(report, os.getpid()) for report in reports]


async def kube_pod_items(store: KubeStore) -> list[dict[str, Any]]:
    """The Kubernetes store: pods on edge nodes as the informer cache holds them (their
    status is what the edges wrote back); `reported` is the newest condition change."""
    items = []
    for key, obj in store.objects.items():
        if key.kind == "Pod":
            items.append(pod_object_item(obj.body))
    return sorted(items, key=lambda item: (item["namespace"], item["name"]))


def pod_object_item(pod: Mapping[str, Any]) -> dict[str, Any]:
    metadata = pod.get("metadata") or {}
    found = pod.get("status")
    status: Mapping[str, Any] = found if isinstance(found, dict) else {}
    times = [
        str(condition["lastTransitionTime"])
        for condition in status.get("conditions") or []
        if isinstance(condition, dict) and condition.get("lastTransitionTime")
    ]
    return {
        "namespace": str(metadata.get("namespace", "")),
        "name": str(metadata.get("name", "")),
        "node": pod_node(pod),
        "status": pod_summary({"Status": status}),
        "reported": max(times) if times else None,
        "hub": os.getpid(),
    }


def admin_routes(hub: Hub, pods: PodSource, identity: HubIdentity) -> dict[str, AdminRoute]:
    """The admin paths the metrics server answers (under `/admin/`)."""
    return {
        "/admin/nodes": lambda: node_list(hub, identity),
        "/admin/pods": lambda: pod_list(pods, identity),
    }


# --- discovery ------------------------------------------------------------------------------


def write_admin_file(path: Path, identity: HubIdentity, extra: Mapping[str, Any]) -> bool:
    """Announce the endpoint (atomically: a reader never sees half a file); False, with a
    warning, when the data directory is not writable (the hub serves on)."""
    body = json.dumps({**identity.as_json(), **extra}, indent=1) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(body, encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        log.warning("admin endpoint not announced in %s: %s", path.parent, exc)
        return False
    return True


def remove_stale_admin_files(data_dir: Path) -> None:
    """Announcements of processes that are gone (a hub killed with SIGKILL)."""
    for path in (Path(data_dir) / RUN_DIR).glob(f"{FILE_PREFIX}*.json"):
        pid = announced_pid(path)
        if pid is not None and not process_alive(pid):
            remove_admin_file(path)


def remove_admin_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
