"""Edge reports and requests written back to the fake API server, answered as CloudCore does."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from kubernetes import client

from tests.e2e.test_e2e_kube import assert_granted_by_rbac
from tests.kube.test_kube_store import Sent, config_map, edge_node, pod
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.store.kube.store import KubeStore
from trio_cloudhub.testing.fake_kube import FakeKube, ResourceType, in_thread, open_fake_kube

LEASES = ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True)


def from_edge(operation: str, resource: str, content: Any, source: str = "edged") -> Message:
    return new_message(
        source=source,
        group="meta",
        operation=operation,
        resource=resource,
        content=content,
        now_ms=0,
    )


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with open_fake_kube(
        bookmark_interval=0.2, graceful_pod_deletion=True, resources=[LEASES]
    ) as fake:
        yield fake
        assert_granted_by_rbac(fake)  # what the write-back did, conf/kube/rbac.yaml allows


@pytest.fixture
async def store(kube: FakeKube) -> AsyncIterator[tuple[KubeStore, Sent]]:
    api = kube.api_client()
    store = KubeStore(api, watch_timeout=30)
    sent = Sent()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run, sent)
        yield store, sent
        nursery.cancel_scope.cancel()
    api.close()


async def seen(store: KubeStore, resource_type: str, namespace: str, name: str, rv: str) -> None:
    """Until the informers hold that object at resourceVersion `rv` or newer."""
    with trio.fail_after(5):
        while True:
            cached = store.cached(resource_type, namespace, name) or {}
            if int(cached.get("metadata", {}).get("resourceVersion") or 0) >= int(rv):
                return
            await trio.sleep(0.01)


async def test_node_status_update_patches_the_node_and_answers_ok(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    kube.put(edge_node("e1"))
    status = {
        "conditions": [{"type": "Ready", "status": "True", "reason": "EdgeReady"}],
        "nodeInfo": {"kubeletVersion": "v1.22.6-kubeedge-v1.10.0"},
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    }
    report = from_edge("update", "default/nodestatus/e1", {"UID": "u", "Status": status})
    reply = await hub.apply_report("e1", report)
    node = kube.get("Node", None, "e1")
    assert node is not None
    assert node["status"]["conditions"][0]["reason"] == "EdgeReady"
    assert node["status"]["nodeInfo"]["kubeletVersion"].endswith("v1.10.0")
    assert reply is not None
    assert reply.content == "OK"
    assert reply.route.resource == "node/e1/default/node/e1"
    assert reply.route.operation == "response" and reply.route.source == "edgecontroller"
    assert reply.header.parent_msg_id == report.header.msg_id
    assert reply.header.resource_version == node["metadata"]["resourceVersion"]


async def test_legacy_registration_creates_a_missing_node_only(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    body = {"metadata": {"name": "e2", "labels": {"node-role.kubernetes.io/edge": ""}}}
    reply = await hub.apply_report("e2", from_edge("insert", "default/nodestatus/e2", body))
    assert reply is not None and reply.content == "OK"
    created = kube.get("Node", None, "e2")
    assert created is not None
    assert "node-role.kubernetes.io/edge" in created["metadata"]["labels"]
    again = await hub.apply_report("e2", from_edge("insert", "default/nodestatus/e2", body))
    assert again is not None and again.content == "OK"
    assert kube.count("create", "nodes") == 1


async def test_v123_registration_answers_the_created_node(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "e3"}}
    reply = await hub.apply_report("e3", from_edge("insert", "default/node/e3", body))
    assert reply is not None
    assert reply.content["Err"] is None
    assert reply.content["Object"]["metadata"]["name"] == "e3"
    assert reply.route.resource == "node/e3/default/node/e3"
    duplicate = await hub.apply_report("e3", from_edge("insert", "default/node/e3", body))
    assert duplicate is not None
    assert duplicate.content["Object"] is None
    assert duplicate.content["Err"]["ErrStatus"]["reason"] == "AlreadyExists"


async def test_node_and_pod_patches_are_strategic_merges_of_the_status(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    kube.put(edge_node("e1"))
    kube.put(pod("p", "e1"))
    patch = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    node_reply = await hub.apply_report(
        "e1", from_edge("patch", "default/nodepatch/e1", json.dumps(patch))
    )
    assert node_reply is not None and node_reply.content["Err"] is None
    assert node_reply.content["Object"]["status"]["conditions"][0]["type"] == "Ready"
    assert node_reply.header.resource_version
    encoded = base64.b64encode(json.dumps({"status": {"phase": "Running"}}).encode()).decode()
    pod_reply = await hub.apply_report("e1", from_edge("patch", "default/podpatch/p", encoded))
    assert pod_reply is not None and pod_reply.content["Err"] is None
    live = kube.get("Pod", "default", "p")
    assert live is not None and live["status"]["phase"] == "Running"


async def test_pod_status_reports_are_written_and_a_stranger_pod_is_deleted_on_the_edge(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, sent = store
    kube.put(edge_node("e1"))
    created = kube.put(pod("p", "e1"))
    await seen(hub, "pod", "default", "p", created["metadata"]["resourceVersion"])
    uid = created["metadata"]["uid"]
    statuses = [
        {
            "UID": uid,
            "Name": "p",
            "Status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        },
        {"UID": "someone-else", "Name": "ghost", "Status": {"phase": "Running"}},
    ]
    reply = await hub.apply_report("e1", from_edge("update", "default/podstatus/p", statuses))
    assert reply is not None and reply.content == "OK"
    live = kube.get("Pod", "default", "p")
    assert live is not None
    assert live["status"]["phase"] == "Running"
    assert live["status"]["conditions"][0]["lastTransitionTime"]
    assert live["status"]["startTime"]
    deletes = [m for m in sent.messages if m.route.operation == "delete"]
    assert [m.route.resource for m in deletes] == ["node/e1/default/pod/ghost"]


async def test_a_graceful_deletion_ends_when_the_edge_reports_the_pod_finished(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, sent = store
    kube.put(edge_node("e1"))
    created = kube.put(pod("p", "e1"))
    await sent.wait_for(lambda: ("insert", "node/e1/default/pod/p") in sent.seen())
    api = kube.api_client()
    # Through the API, as kubectl does: only deletionTimestamp is set.
    await in_thread(client.CoreV1Api(api).delete_namespaced_pod, "p", "default")
    api.close()
    terminating = kube.get("Pod", "default", "p")
    assert terminating is not None and terminating["metadata"].get("deletionTimestamp")
    await seen(hub, "pod", "default", "p", terminating["metadata"]["resourceVersion"])
    finished = {
        "phase": "Succeeded",
        "containerStatuses": [{"name": "c", "state": {"terminated": {"exitCode": 0}}}],
    }
    status = [{"UID": created["metadata"]["uid"], "Name": "p", "Status": finished}]
    await hub.apply_report("e1", from_edge("update", "default/podstatus/p", status))
    assert kube.get("Pod", "default", "p") is None
    await sent.wait_for(lambda: ("delete", "node/e1/default/pod/p") in sent.seen())


async def test_the_edge_deleting_a_pod_by_uid_deletes_it(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    kube.put(edge_node("e1"))
    created = kube.put(pod("p", "e1"))
    wrong = await hub.apply_report("e1", from_edge("delete", "default/pod/p", "not-its-uid"))
    assert wrong is not None and wrong.content == "OK"  # a recreated pod is left alone
    assert kube.get("Pod", "default", "p") is not None
    uid = created["metadata"]["uid"]
    reply = await hub.apply_report("e1", from_edge("delete", "default/pod/p", uid))
    assert reply is not None and reply.content == "OK"
    assert kube.get("Pod", "default", "p") is None


async def test_queries_are_answered_from_the_caches_and_tokens_from_the_api(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    cm = kube.put(config_map("cm", "7"))
    kube.put(
        {
            "kind": "ServiceAccount",
            "apiVersion": "v1",
            "metadata": {"name": "sa", "namespace": "default"},
        }
    )
    await seen(hub, "configmap", "default", "cm", cm["metadata"]["resourceVersion"])
    found = await hub.answer_query(
        "e1", from_edge("query", "default/configmap/cm", None, "metamanager")
    )
    assert found is not None
    assert found.content["data"] == {"k": "7"}
    assert found.route.resource == "node/e1/default/configmap/cm"
    assert found.header.resource_version == found.content["metadata"]["resourceVersion"]
    missing = await hub.answer_query(
        "e1", from_edge("query", "default/secret/nope", None, "metamanager")
    )
    assert missing is not None
    assert missing.content["ErrStatus"]["reason"] == "NotFound"
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": ["api"], "expirationSeconds": 3600},
    }
    token = await hub.answer_query(
        "e1", from_edge("query", "default/serviceaccounttoken/sa", request, "metamanager")
    )
    assert token is not None
    assert token.content["status"]["token"]


async def test_leases_pass_through(kube: FakeKube, store: tuple[KubeStore, Sent]) -> None:
    hub, _ = store
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "e1", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "e1", "leaseDurationSeconds": 40},
    }
    created = await hub.apply_report("e1", from_edge("insert", "kube-node-lease/lease/e1", lease))
    assert created is not None and created.content["Err"] is None
    current = created.content["Object"]
    current["spec"]["renewTime"] = "2026-11-26T00:00:00.000000Z"
    updated = await hub.apply_report("e1", from_edge("update", "kube-node-lease/lease/e1", current))
    assert updated is not None and updated.content["Err"] is None
    queried = await hub.answer_query("e1", from_edge("query", "kube-node-lease/lease/e1", None))
    assert queried is not None
    assert queried.content["Object"]["spec"]["renewTime"].startswith("2026-11-26")


async def test_transient_api_failures_are_retried_and_permanent_ones_answered(
    kube: FakeKube, store: tuple[KubeStore, Sent], caplog: pytest.LogCaptureFixture
) -> None:
    hub, _ = store
    kube.put(edge_node("e1"))
    kube.fail_next(503, times=2, verb="patch", resource="nodes/status")
    patch = json.dumps({"status": {"phase": "Running"}})
    reply = await hub.apply_report("e1", from_edge("patch", "default/nodepatch/e1", patch))
    assert reply is not None and reply.content["Err"] is None
    kube.fail_next(403, verb="patch", resource="nodes/status", message="forbidden by test")
    with caplog.at_level(logging.WARNING, "trio_cloudhub.kube"):
        refused = await hub.apply_report("e1", from_edge("patch", "default/nodepatch/e1", patch))
    assert refused is not None
    assert refused.content["Err"]["ErrStatus"]["code"] == 403
    assert "forbidden by test" in caplog.text


async def test_garbage_from_the_edge_is_logged_not_raised(
    kube: FakeKube, store: tuple[KubeStore, Sent], caplog: pytest.LogCaptureFixture
) -> None:
    hub, _ = store
    with caplog.at_level(logging.WARNING, "trio_cloudhub.kube"):
        for message in (
            from_edge("update", "default/nodestatus/e1", "not json at all"),
            from_edge("update", "default/nodestatus/e1", {"Status": "nope"}),
            from_edge("patch", "default/podpatch/p", "[1, 2]"),
            from_edge("update", "default/podstatus/p", [{"Name": 5}]),
        ):
            assert await hub.apply_report("e1", message) is None
    assert caplog.text.count("unusable") == 4


async def test_node_update_adds_labels_and_annotations_and_never_removes(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    kube.put(edge_node("e1", zone="a"))
    body = {"metadata": {"name": "e1", "labels": {"gpu": "yes"}, "annotations": {"note": "x"}}}
    reply = await hub.apply_report("e1", from_edge("update", "null/node/e1", body))
    node = kube.get("Node", None, "e1")
    assert node is not None
    assert node["metadata"]["labels"]["gpu"] == "yes"
    assert node["metadata"]["labels"]["zone"] == "a"
    assert node["metadata"]["annotations"]["note"] == "x"
    assert reply is not None and reply.content == "OK"
    assert reply.header.resource_version == node["metadata"]["resourceVersion"]


async def test_mirror_pods_are_created(kube: FakeKube, store: tuple[KubeStore, Sent]) -> None:
    hub, _ = store
    mirror = pod("static-e1", "e1")
    reply = await hub.apply_report("e1", from_edge("insert", "default/pod/static-e1", mirror))
    assert reply is not None and reply.content["Err"] is None
    assert kube.get("Pod", "default", "static-e1") is not None


async def test_a_stale_heartbeat_is_refreshed_and_a_list_of_pod_statuses_accepted(
    kube: FakeKube, store: tuple[KubeStore, Sent]
) -> None:
    hub, _ = store
    kube.put(edge_node("e1"))
    created = kube.put(pod("p", "e1"))
    await seen(hub, "pod", "default", "p", created["metadata"]["resourceVersion"])
    old = "2020-01-01T00:00:00Z"
    ready = {"type": "Ready", "status": "True", "lastHeartbeatTime": old}
    report = {"UID": "u", "Status": {"conditions": [ready]}}
    await hub.apply_report("e1", from_edge("update", "default/nodestatus/e1", report))
    node = kube.get("Node", None, "e1")
    assert node is not None
    assert node["status"]["conditions"][0]["lastHeartbeatTime"] > old
    statuses = [{"UID": created["metadata"]["uid"], "Name": "p", "Status": {"phase": "Failed"}}]
    reply = await hub.apply_report("e1", from_edge("update", "default/podstatus", statuses))
    assert reply is not None and reply.content == "OK"
    live = kube.get("Pod", "default", "p")
    assert live is not None and live["status"]["phase"] == "Failed"
