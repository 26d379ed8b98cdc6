"""The fake API server, driven by the real `kubernetes` client (blocking calls in threads)."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.edge.certs import issue_server_cert, make_ca, server_context
from trio_cloudhub.config import KubeAPIConfig
from trio_cloudhub.store.kube.client import api_client
from trio_cloudhub.testing.fake_kube import (
    RELIABLESYNCS,
    FakeKube,
    fake_token,
    in_thread,
    open_fake_kube,
)

WAIT = 5  # seconds; an int, as timeoutSeconds must be
CALL_WAIT = 10  # the bound of one blocking call, watches included
EDGE = "node-role.kubernetes.io/edge"
T = TypeVar("T")


async def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with trio.fail_after(CALL_WAIT):
        return await in_thread(function, *args, **kwargs)


def node(name: str, *, edge: bool = True) -> dict[str, Any]:
    labels = {EDGE: ""} if edge else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def pod(name: str, node_name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "busybox"}]},
    }


def config_map(name: str, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "data": data}


def object_sync(name: str, namespace: str = "default") -> dict[str, Any]:
    kind = "ObjectSync" if namespace else "ClusterObjectSync"
    metadata = {"name": name, "namespace": namespace} if namespace else {"name": name}
    return {
        "apiVersion": f"{RELIABLESYNCS}/v1alpha1",
        "kind": kind,
        "metadata": metadata,
        "spec": {"objectAPIVersion": "v1", "objectKind": "Pod", "objectName": "p1"},
        "status": {"objectResourceVersion": "ignored on create"},
    }


def status_of(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def raw(function: Any, *args: Any, **kwargs: Any) -> bytes:
    """The answer's body as sent (read in the calling thread: it blocks)."""
    data: bytes = function(*args, _preload_content=False, **kwargs).data
    return data


def watch_events(function: Any, *args: Any, count: int, **kwargs: Any) -> list[dict[str, Any]]:
    """The first `count` events of a watch (fewer if it ends first), as raw dicts."""
    events: list[dict[str, Any]] = []
    watcher = watch.Watch()
    for event in watcher.stream(function, *args, **kwargs):
        events.append({"type": event["type"], "object": event["raw_object"]})
        if len(events) == count:
            watcher.stop()
    return events


def kinds_and_names(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


# --- reads and writes --------------------------------------------------------------------------


async def test_create_get_and_list_with_label_and_field_selectors(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    for body in (node("n1"), node("n2", edge=False)):
        await call(core_v1.create_node, body)
    await call(core_v1.create_namespaced_pod, "default", pod("p1", "n1", app="a"))
    await call(core_v1.create_namespaced_pod, "default", pod("p2", "n2", app="b"))

    got = await call(core_v1.read_namespaced_pod, "p1", "default")
    assert got.metadata.uid and got.metadata.creation_timestamp is not None
    assert got.status.phase == "Pending"  # set on create, as the API server does
    edge_nodes = await call(core_v1.list_node, label_selector=EDGE)
    assert [n.metadata.name for n in edge_nodes.items] == ["n1"]
    not_edge = await call(core_v1.list_node, label_selector=f"!{EDGE}")
    assert [n.metadata.name for n in not_edge.items] == ["n2"]
    on_n1 = await call(core_v1.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in on_n1.items] == ["p1"]
    by_label = await call(core_v1.list_namespaced_pod, "default", label_selector="app in (b,c)")
    assert [p.metadata.name for p in by_label.items] == ["p2"]
    by_name = await call(core_v1.list_namespaced_pod, "default", field_selector="metadata.name=p2")
    assert [p.metadata.name for p in by_name.items] == ["p2"]
    assert by_name.metadata.resource_version == str(fake_kube.resource_version)


async def test_list_answers_like_the_api_server(fake_kube: FakeKube, core_v1: Any) -> None:
    fake_kube.put(pod("p1", "n1"))
    body = json.loads(await call(raw, core_v1.list_namespaced_pod, "default"))
    assert (body["kind"], body["apiVersion"]) == ("PodList", "v1")
    assert body["metadata"]["resourceVersion"] == str(fake_kube.resource_version)
    # Items of a built-in kind carry no kind/apiVersion in a real list answer.
    assert "kind" not in body["items"][0] and "apiVersion" not in body["items"][0]
    with pytest.raises(ApiException) as raised:
        await call(core_v1.list_namespaced_pod, "default", field_selector="spec.image=x")
    assert raised.value.status == 400


async def test_create_of_an_existing_object_is_409_already_exists(core_v1: Any) -> None:
    await call(core_v1.create_namespaced_config_map, "default", config_map("c1", a="1"))
    with pytest.raises(ApiException) as raised:
        await call(core_v1.create_namespaced_config_map, "default", config_map("c1"))
    assert raised.value.status == 409
    assert status_of(raised.value) | {"details": None} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'configmaps "c1" already exists',
        "reason": "AlreadyExists",
        "code": 409,
        "details": None,
    }


async def test_update_with_a_stale_resource_version_is_a_409_conflict(core_v1: Any) -> None:
    await call(core_v1.create_namespaced_config_map, "default", config_map("c1", a="1"))
    first = await call(core_v1.read_namespaced_config_map, "c1", "default")
    first.data = {"a": "2"}
    second = await call(core_v1.replace_namespaced_config_map, "c1", "default", first)
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    first.data = {"a": "3"}  # still carries the first resourceVersion
    with pytest.raises(ApiException) as raised:
        await call(core_v1.replace_namespaced_config_map, "c1", "default", first)
    assert (raised.value.status, status_of(raised.value)["reason"]) == (409, "Conflict")
    second.data = {"a": "3"}
    third = await call(core_v1.replace_namespaced_config_map, "c1", "default", second)
    assert third.data == {"a": "3"}


async def test_a_write_that_changes_nothing_keeps_the_resource_version(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    await call(core_v1.create_namespaced_config_map, "default", config_map("c1", a="1"))
    before = fake_kube.resource_version
    same = await call(core_v1.patch_namespaced_config_map, "c1", "default", {"data": {"a": "1"}})
    assert (same.metadata.resource_version, fake_kube.resource_version) == (str(before), before)


async def test_patches_merge_strategic_and_json(core_v1: Any) -> None:
    body = config_map("c1", a="1", b="2")
    await call(core_v1.create_namespaced_config_map, "default", body)
    merge = {"data": {"a": None, "c": "3"}}
    patched = await call(
        core_v1.patch_namespaced_config_map,
        "c1",
        "default",
        merge,
        _content_type="application/merge-patch+json",
    )
    assert patched.data == {"b": "2", "c": "3"}
    operations = [{"op": "replace", "path": "/data/b", "value": "20"}]
    patched = await call(core_v1.patch_namespaced_config_map, "c1", "default", operations)
    assert patched.data == {"b": "20", "c": "3"}


async def test_strategic_merge_patch_merges_conditions_by_type(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    conditions = [{"type": "Ready", "status": "False"}, {"type": "DiskPressure", "status": "False"}]
    fake_kube.put({**node("n1"), "status": {"conditions": conditions}})
    patch = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    # A dict body: the client sends it as a strategic merge patch.
    patched = await call(core_v1.patch_node_status, "n1", patch)
    assert [(c.type, c.status) for c in patched.status.conditions] == [
        ("Ready", "True"),
        ("DiskPressure", "False"),
    ]


async def test_pod_status_changes_only_through_the_status_subresource(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    await call(core_v1.create_namespaced_pod, "default", pod("p1", "n1"))
    current = await call(core_v1.read_namespaced_pod, "p1", "default")
    current.status.phase = "Running"
    current.metadata.labels = {"new": "label"}
    replaced = await call(core_v1.replace_namespaced_pod, "p1", "default", current)
    assert (replaced.status.phase, replaced.metadata.labels) == ("Pending", {"new": "label"})

    patch = {"metadata": {"labels": {"ignored": "yes"}}, "status": {"phase": "Running"}}
    patched = await call(core_v1.patch_namespaced_pod_status, "p1", "default", patch)
    assert (patched.status.phase, patched.metadata.labels) == ("Running", {"new": "label"})
    stored = fake_kube.get("Pod", "default", "p1")
    assert stored is not None and stored["status"] == {"phase": "Running"}


async def test_node_status_changes_only_through_the_status_subresource(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    created = await call(core_v1.create_node, {**node("n1"), "status": {"capacity": {"cpu": "2"}}})
    assert created.status.capacity == {"cpu": "2"}  # kept on create, unlike pods
    spec_patch = {"spec": {"unschedulable": True}, "status": {"phase": "ignored"}}
    patched = await call(core_v1.patch_node, "n1", spec_patch)
    assert patched.spec.unschedulable and patched.status.phase is None
    current = await call(core_v1.read_node, "n1")
    current.status.phase = "Running"
    current.spec.unschedulable = False
    replaced = await call(core_v1.replace_node_status, "n1", current)
    assert (replaced.status.phase, replaced.spec.unschedulable) == ("Running", True)


async def test_delete_sends_the_final_state_and_then_404(fake_kube: FakeKube, core_v1: Any) -> None:
    await call(core_v1.create_namespaced_config_map, "default", config_map("c1"))
    status = await call(core_v1.delete_namespaced_config_map, "c1", "default")
    # v37 returns a plain dict here (its return type is `object`).
    assert (status["status"], status["details"]["name"]) == ("Success", "c1")
    with pytest.raises(ApiException) as raised:
        await call(core_v1.read_namespaced_config_map, "c1", "default")
    assert (raised.value.status, status_of(raised.value)["reason"]) == (404, "NotFound")
    with pytest.raises(ApiException) as raised:
        await call(core_v1.delete_namespaced_config_map, "c1", "default")
    assert raised.value.status == 404
    await call(core_v1.create_namespaced_pod, "default", pod("p1", "n1"))
    deleted = await call(core_v1.delete_namespaced_pod, "p1", "default")
    assert deleted.metadata.name == "p1"  # pods answer with the object
    assert fake_kube.objects("pods") == []


async def test_graceful_pod_deletion_waits_for_grace_period_zero() -> None:
    async with open_fake_kube(graceful_pod_deletion=True) as kube:
        kube.put(pod("p1", "n1"))
        with kube.api_client() as api:
            core = client.CoreV1Api(api)
            marked = await call(core.delete_namespaced_pod, "p1", "default")
            assert marked.metadata.deletion_timestamp is not None
            assert kube.get("Pod", "default", "p1") is not None
            await call(core.delete_namespaced_pod, "p1", "default", grace_period_seconds=0)
            assert kube.get("Pod", "default", "p1") is None


# --- watch ---------------------------------------------------------------------------------


async def test_watch_from_a_list_sends_later_changes_in_order(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    fake_kube.put(pod("p0", "n1"))
    listed = await call(core_v1.list_namespaced_pod, "default")
    fake_kube.put(pod("p1", "n1"))  # before the watch starts: replayed from history
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:

            async def changes() -> None:
                await fake_kube.wait_watchers(1, "pods")
                fake_kube.put(pod("p1", "n1", changed="yes"))
                fake_kube.delete("Pod", "default", "p1")

            nursery.start_soon(changes)
            events = await call(
                watch_events,
                core_v1.list_namespaced_pod,
                "default",
                count=3,
                resource_version=listed.metadata.resource_version,
                timeout_seconds=WAIT,
            )
    assert kinds_and_names(events) == [("ADDED", "p1"), ("MODIFIED", "p1"), ("DELETED", "p1")]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[-1] == fake_kube.resource_version
    assert events[0]["object"]["kind"] == "Pod"  # watch events carry kind and apiVersion


async def test_watch_without_resource_version_starts_with_the_current_state(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    fake_kube.put(pod("p1", "n1"))
    fake_kube.put(pod("p2", "n2"))
    events = await call(
        watch_events, core_v1.list_namespaced_pod, "default", count=2, timeout_seconds=WAIT
    )
    assert kinds_and_names(events) == [("ADDED", "p1"), ("ADDED", "p2")]


async def test_a_watch_with_a_selector_sees_objects_enter_and_leave_it(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    rv = str(fake_kube.resource_version)
    fake_kube.put(pod("p1", "n1"))
    fake_kube.put(pod("p1", "n1", app="a"))
    fake_kube.put(pod("p1", "n1", app="b"))
    events = await call(
        watch_events,
        core_v1.list_namespaced_pod,
        "default",
        count=2,
        resource_version=rv,
        label_selector="app=a",
        timeout_seconds=WAIT,
    )
    assert kinds_and_names(events) == [("ADDED", "p1"), ("DELETED", "p1")]


async def test_bookmarks_carry_the_current_resource_version(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    fake_kube.put(node("n1"))
    events = await call(
        watch_events,
        core_v1.list_node,
        count=2,
        resource_version=str(fake_kube.resource_version),
        allow_watch_bookmarks=True,
        timeout_seconds=WAIT,
    )
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
    assert events[0]["object"] == {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(fake_kube.resource_version)},
    }


async def test_watch_from_a_compacted_resource_version_is_410_expired(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    old = str(fake_kube.resource_version)
    fake_kube.put(pod("p1", "n1"))
    fake_kube.compact()
    body = await call(raw, core_v1.list_namespaced_pod, "default", watch=True, resource_version=old)
    lines = body.decode().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {old} ({fake_kube.resource_version})",
            "reason": "Expired",
            "code": 410,
        },
    }
    with pytest.raises(ApiException) as raised:  # what Watch makes of it
        await call(
            watch_events, core_v1.list_namespaced_pod, "default", count=1,
            resource_version=old, timeout_seconds=1,
        )  # fmt: skip
    assert raised.value.status == 410
    current = str(fake_kube.resource_version)
    assert await call(
        watch_events, core_v1.list_namespaced_pod, "default", count=1,
        resource_version=current, timeout_seconds=1,
    ) == []  # fmt: skip


async def test_a_short_history_expires_old_resource_versions() -> None:
    async with open_fake_kube(history=2) as kube:
        start = str(kube.resource_version)
        for index in range(3):
            kube.put(config_map(f"c{index}") | {"kind": "ConfigMap"})
        with kube.api_client() as api:
            core = client.CoreV1Api(api)
            with pytest.raises(ApiException) as raised:
                await call(
                    watch_events, core.list_namespaced_config_map, "default", count=1,
                    resource_version=start, timeout_seconds=1,
                )  # fmt: skip
            assert raised.value.status == 410
            events = await call(
                watch_events, core.list_namespaced_config_map, "default", count=2,
                resource_version=str(kube.resource_version - 2), timeout_seconds=1,
            )  # fmt: skip
            assert kinds_and_names(events) == [("ADDED", "c1"), ("ADDED", "c2")]


async def test_timeout_seconds_ends_the_stream(fake_kube: FakeKube, core_v1: Any) -> None:
    start = trio.current_time()
    events = await call(watch_events, core_v1.list_node, count=1, timeout_seconds=1)
    assert events == [] and 1 <= trio.current_time() - start < 3
    assert fake_kube.watchers() == 0


async def test_close_watches_ends_streams_cleanly_or_abruptly(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    async def watch_then(abort: bool) -> None:
        await fake_kube.wait_watchers(1)
        assert fake_kube.close_watches(abort=abort) == 1

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_then, False)
            events = await call(watch_events, core_v1.list_node, count=1, timeout_seconds=30)
        assert events == []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_then, True)
            with pytest.raises(urllib3.exceptions.ProtocolError):
                await call(watch_events, core_v1.list_node, count=1, timeout_seconds=30)
    assert fake_kube.count("watch", "nodes") == 2


async def test_a_client_leaving_a_busy_watch_frees_it(fake_kube: FakeKube, core_v1: Any) -> None:
    start = str(fake_kube.resource_version)
    for index in range(2000):
        fake_kube.put(config_map(f"c{index}", blob="x" * 100) | {"kind": "ConfigMap"})
    with trio.fail_after(WAIT):
        events = await call(
            watch_events, core_v1.list_namespaced_config_map, "default", count=1,
            resource_version=start, timeout_seconds=WAIT,
        )  # fmt: skip
        assert len(events) == 1
        await fake_kube.wait_watchers(0)
    assert len((await call(core_v1.list_namespaced_config_map, "default")).items) == 2000


# --- failures ------------------------------------------------------------------------------


async def test_an_injected_503_fails_once_then_calls_succeed(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    fault = fake_kube.fail_next(503, path="/api/v1/nodes", verb="list")
    with pytest.raises(ApiException) as raised:
        await call(core_v1.list_node)
    assert (raised.value.status, status_of(raised.value)["reason"]) == (503, "ServiceUnavailable")
    assert fault.remaining == 0
    assert (await call(core_v1.list_node)).items == []
    assert fake_kube.count("list", "nodes") == 2


async def test_429_with_retry_after(fake_kube: FakeKube, core_v1: Any) -> None:
    fake_kube.fail_next(429, method="POST", retry_after=1)
    with pytest.raises(ApiException) as raised:
        await call(core_v1.create_node, node("n1"))
    assert raised.value.status == 429 and raised.value.headers["Retry-After"] == "1"
    assert status_of(raised.value)["details"] == {"retryAfterSeconds": 1}
    # urllib3 itself retries an idempotent request after Retry-After (its default Retry).
    fake_kube.fail_next(429, method="GET", retry_after=0)
    assert (await call(core_v1.list_node)).items == []
    assert fake_kube.count("list", "nodes") == 2


async def test_a_dropped_connection(fake_kube: FakeKube, core_v1: Any) -> None:
    fake_kube.drop_next(method="POST")
    with pytest.raises(urllib3.exceptions.ProtocolError):
        await call(core_v1.create_node, node("n1"))
    assert fake_kube.objects("nodes") == []
    fake_kube.drop_next(method="GET")  # urllib3 retries a GET once more by itself
    assert (await call(core_v1.list_node)).items == []


async def test_the_api_server_goes_away_and_comes_back_on_the_same_port(
    fake_kube: FakeKube, core_v1: Any
) -> None:
    fake_kube.put(node("n1"))
    url = fake_kube.url
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:

            async def stop_when_watched() -> None:
                await fake_kube.wait_watchers(1)
                await fake_kube.stop()

            nursery.start_soon(stop_when_watched)
            with pytest.raises(urllib3.exceptions.ProtocolError):
                await call(watch_events, core_v1.list_node, count=5, timeout_seconds=30)
        assert fake_kube.watchers() == 0
        with pytest.raises(urllib3.exceptions.MaxRetryError):
            await call(core_v1.list_node)
        await fake_kube.start()
    assert fake_kube.url == url
    assert [n.metadata.name for n in (await call(core_v1.list_node)).items] == ["n1"]


async def test_latency_delays_answers(fake_kube: FakeKube, core_v1: Any) -> None:
    fake_kube.latency = 0.2
    start = trio.current_time()
    await call(core_v1.list_node)
    assert trio.current_time() - start >= 0.2


async def test_a_body_above_the_bound_is_413() -> None:
    async with open_fake_kube(max_body_bytes=1024) as kube:
        with kube.api_client() as api:
            core = client.CoreV1Api(api)
            with pytest.raises(ApiException) as raised:
                body = config_map("big", blob="x" * 2048)
                await call(core.create_namespaced_config_map, "default", body)
            assert raised.value.status == 413
            assert kube.objects("configmaps") == []


# --- kinds ---------------------------------------------------------------------------------


async def test_object_syncs_and_cluster_object_syncs(
    fake_kube: FakeKube, custom_objects: Any
) -> None:
    api = custom_objects
    group, version = RELIABLESYNCS, "v1alpha1"
    created = await call(
        api.create_namespaced_custom_object,
        group, version, "default", "objectsyncs", object_sync("n1.uid-1"),
    )  # fmt: skip
    assert "status" not in created  # a status subresource: status is ignored on create
    created["status"] = {"objectResourceVersion": "42"}
    updated = await call(
        api.replace_namespaced_custom_object_status,
        group, version, "default", "objectsyncs", "n1.uid-1", created,
    )  # fmt: skip
    assert updated["status"] == {"objectResourceVersion": "42"}
    fetched = await call(
        api.get_namespaced_custom_object, group, version, "default", "objectsyncs", "n1.uid-1"
    )
    assert fetched == updated and fetched["kind"] == "ObjectSync"
    with pytest.raises(ApiException) as raised:  # `created` holds an old resourceVersion
        await call(
            api.replace_namespaced_custom_object_status,
            group, version, "default", "objectsyncs", "n1.uid-1", created,
        )  # fmt: skip
    assert raised.value.status == 409

    await call(
        api.create_cluster_custom_object, group, version, "clusterobjectsyncs",
        object_sync("n1.uid-2", namespace=""),
    )  # fmt: skip
    patch = {"status": {"objectResourceVersion": "7"}}
    patched = await call(
        api.patch_cluster_custom_object_status,
        group, version, "clusterobjectsyncs", "n1.uid-2", patch,
    )  # fmt: skip
    assert patched["status"] == {"objectResourceVersion": "7"}
    events = await call(
        watch_events, api.list_cluster_custom_object, group, version, "clusterobjectsyncs",
        count=1, resource_version=created["metadata"]["resourceVersion"], timeout_seconds=WAIT,
    )  # fmt: skip
    assert kinds_and_names(events) == [("ADDED", "n1.uid-2")]
    listed = await call(api.list_cluster_custom_object, group, version, "clusterobjectsyncs")
    assert listed["kind"] == "ClusterObjectSyncList"
    assert [item["kind"] for item in listed["items"]] == ["ClusterObjectSync"]
    assert fake_kube.count("patch", "clusterobjectsyncs/status") == 1


async def test_custom_resources_need_a_resource_version_and_no_strategic_patch(
    custom_objects: Any,
) -> None:
    args = (RELIABLESYNCS, "v1alpha1", "default", "objectsyncs")
    created = await call(custom_objects.create_namespaced_custom_object, *args, object_sync("a"))
    del created["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as raised:
        await call(custom_objects.replace_namespaced_custom_object, *args, "a", created)
    assert raised.value.status == 422
    with pytest.raises(ApiException) as raised:
        await call(
            custom_objects.patch_namespaced_custom_object, *args, "a", {"spec": {}},
            _content_type="application/strategic-merge-patch+json",
        )  # fmt: skip
    assert raised.value.status == 415


async def test_secrets_hold_base64_data(fake_kube: FakeKube, core_v1: Any) -> None:
    body = {
        "metadata": {"name": "tokensecret", "namespace": "kubeedge"},
        "data": {"tokendata": base64.b64encode(b"\x00binary").decode()},
        "stringData": {"plain": "text"},
    }
    await call(core_v1.create_namespaced_secret, "kubeedge", body)
    secret = await call(core_v1.read_namespaced_secret, "tokensecret", "kubeedge")
    assert secret.type == "Opaque"
    assert base64.b64decode(secret.data["tokendata"]) == b"\x00binary"
    assert base64.b64decode(secret.data["plain"]) == b"text"
    with pytest.raises(ApiException) as raised:
        bad = {"metadata": {"name": "bad"}, "data": {"k": "not base64!"}}
        await call(core_v1.create_namespaced_secret, "kubeedge", bad)
    assert raised.value.status == 400


async def test_token_request_for_a_service_account(core_v1: Any) -> None:
    body = {"spec": {"audiences": ["edge"], "expirationSeconds": 600}}
    with pytest.raises(ApiException) as raised:
        await call(core_v1.create_namespaced_service_account_token, "sa", "default", body)
    assert raised.value.status == 404
    sa = {"metadata": {"name": "sa"}}
    await call(core_v1.create_namespaced_service_account, "default", sa)
    answer = await call(core_v1.create_namespaced_service_account_token, "sa", "default", body)
    assert answer.status.token == fake_token("default", "sa", ["edge"])
    assert answer.status.expiration_timestamp is not None


async def test_require_namespaces_refuses_objects_in_a_missing_namespace() -> None:
    async with open_fake_kube(require_namespaces=True) as kube:
        with kube.api_client() as api:
            core = client.CoreV1Api(api)
            with pytest.raises(ApiException) as raised:
                await call(core.create_namespaced_config_map, "kubeedge", config_map("c"))
            assert raised.value.status == 404
            created = await call(core.create_namespace, {"metadata": {"name": "kubeedge"}})
            assert created.status.phase == "Active"
            await call(core.create_namespaced_config_map, "kubeedge", config_map("c"))


# --- how clients reach it ----------------------------------------------------------------------


async def test_the_hub_client_reaches_it_through_a_written_kubeconfig(tmp_path: Path) -> None:
    async with open_fake_kube(token="s3cret") as kube:
        kube.put(node("n1"))
        path = kube.write_kubeconfig(tmp_path / "kubeconfig")
        with api_client(KubeAPIConfig(kube_config=str(path))) as api:
            nodes = await call(client.CoreV1Api(api).list_node)
        assert [n.metadata.name for n in nodes.items] == ["n1"]
        with kube.api_client(api_key={}) as anonymous, pytest.raises(ApiException) as raised:
            await call(client.CoreV1Api(anonymous).list_node)
        assert raised.value.status == 401


async def test_over_tls(tmp_path: Path) -> None:
    ca = make_ca()
    context = server_context(ca, issue_server_cert(ca))
    context.verify_mode = ssl.CERT_NONE  # the Kubernetes client presents no certificate here
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    async with open_fake_kube(ssl_context=context) as kube:
        assert kube.url.startswith("https://127.0.0.1:")
        kube.put(node("n1"))
        path = kube.write_kubeconfig(tmp_path / "kubeconfig", ca_file=ca_file)
        api = await call(config.new_client_from_config, str(path))
        with api:
            nodes = await call(client.CoreV1Api(api).list_node)
        assert [n.metadata.name for n in nodes.items] == ["n1"]
