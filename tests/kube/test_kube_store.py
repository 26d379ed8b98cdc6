"""KubeStore against the fake API server with the real client: placement, messages, ack points."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from trio_cloudhub.core.message import Message
from trio_cloudhub.store.kube.store import EDGE_LABEL, KubeStore
from trio_cloudhub.testing.fake_kube import FakeKube


def edge_node(name: str, **labels: str) -> dict[str, Any]:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {EDGE_LABEL: "", **labels}},
    }


def pod(name: str, node: str, config_map: str = "", namespace: str = "default") -> dict[str, Any]:
    volumes = [{"name": "c", "configMap": {"name": config_map}}] if config_map else []
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}], "volumes": volumes},
    }


def config_map(name: str, value: str = "1", namespace: str = "default") -> dict[str, Any]:
    return {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"k": value},
    }


class Sent:
    """What the store delivered, as (operation, resource, resourceVersion)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = trio.Event()

    def __call__(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    def seen(self) -> list[tuple[str, str]]:
        return [(m.route.operation, m.route.resource) for m in self.messages]

    async def wait_for(self, check: Callable[[], bool], seconds: float = 5.0) -> None:
        with trio.fail_after(seconds):
            while not check():
                self._changed = trio.Event()
                await self._changed.wait()


@pytest.fixture
async def running(fake_kube: FakeKube, kube_api: Any) -> AsyncIterator[tuple[KubeStore, Sent]]:
    store = KubeStore(kube_api, watch_timeout=30)
    sent = Sent()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run, sent)
        yield store, sent
        nursery.cancel_scope.cancel()


async def test_start_up_sends_nothing_and_a_node_gets_its_state_by_reconciliation(
    fake_kube: FakeKube, kube_api: Any
) -> None:
    fake_kube.put(edge_node("e1"))
    fake_kube.put({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "cloud-1"}})
    fake_kube.put(config_map("cm"))
    fake_kube.put(config_map("unused"))
    fake_kube.put(pod("p1", "e1", "cm"))
    fake_kube.put(pod("p2", "cloud-1", "cm"))
    store = KubeStore(kube_api, watch_timeout=30)
    sent = Sent()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run, sent)
        assert sent.messages == []
        built = [missed.build() for missed in store.missed("e1")]
        described = sorted((m.route.operation, m.route.resource) for m in built)
        assert described == [
            ("insert", "node/e1/default/configmap/cm"),
            ("insert", "node/e1/default/pod/p1"),
            ("update", "node/e1/null/node/e1"),
        ]
        pod_message = next(m for m in built if "/pod/" in m.route.resource)
        assert pod_message.content["kind"] == "Pod"
        assert pod_message.content["apiVersion"] == "v1"
        live = fake_kube.get("Pod", "default", "p1")
        assert live is not None
        assert pod_message.header.resource_version == live["metadata"]["resourceVersion"]
        assert store.missed("cloud-1") == []
        nursery.cancel_scope.cancel()


async def test_changes_are_delivered_as_cloudcore_sends_them(
    fake_kube: FakeKube, running: tuple[KubeStore, Sent]
) -> None:
    _, sent = running
    fake_kube.put(edge_node("e1"))
    await sent.wait_for(lambda: ("update", "node/e1/null/node/e1") in sent.seen())
    fake_kube.put(config_map("cm"))
    fake_kube.put(pod("p1", "e1", "cm"))
    await sent.wait_for(lambda: ("insert", "node/e1/default/pod/p1") in sent.seen())
    assert ("insert", "node/e1/default/configmap/cm") in sent.seen()
    fake_kube.put(config_map("cm", "2"))
    await sent.wait_for(lambda: ("update", "node/e1/default/configmap/cm") in sent.seen())
    update = sent.messages[-1]
    assert update.content["data"] == {"k": "2"}
    assert update.header.resource_version == update.content["metadata"]["resourceVersion"]
    fake_kube.delete("Pod", "default", "p1")
    await sent.wait_for(lambda: ("delete", "node/e1/default/pod/p1") in sent.seen())
    # The config map is no longer needed there: withdrawn.
    assert ("delete", "node/e1/default/configmap/cm") in sent.seen()
    fake_kube.delete("Node", None, "e1")
    await sent.wait_for(lambda: ("delete", "node/e1/namespace/node/e1") in sent.seen())


async def test_a_node_that_gains_the_edge_label_gets_its_pods(
    fake_kube: FakeKube, running: tuple[KubeStore, Sent]
) -> None:
    store, sent = running
    fake_kube.put({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n"}})
    fake_kube.put(pod("p", "n"))
    await trio.sleep(0.2)
    assert sent.messages == []
    fake_kube.put(edge_node("n"))
    await sent.wait_for(lambda: ("insert", "node/n/default/pod/p") in sent.seen())
    assert store.pod_node("default", "p") == "n"


async def test_ack_points_are_object_syncs(
    fake_kube: FakeKube, running: tuple[KubeStore, Sent]
) -> None:
    store, sent = running
    fake_kube.put(edge_node("e1"))
    fake_kube.put(pod("p1", "e1"))
    await sent.wait_for(lambda: ("insert", "node/e1/default/pod/p1") in sent.seen())
    message = next(m for m in sent.messages if m.route.resource.endswith("/pod/p1"))
    node_message = next(m for m in sent.messages if "/node/e1" in m.route.resource)
    store.record_sent("e1", message)
    store.record_sent("e1", node_message)
    assert store.acked_version("e1", message.content["metadata"]["uid"]) == "0"
    await store.acks.wait_written()
    uid = message.content["metadata"]["uid"]
    sync = fake_kube.get("ObjectSync", "default", f"e1.{uid}")
    assert sync is not None
    assert sync["spec"] == {"objectAPIVersion": "v1", "objectKind": "Pod", "objectName": "p1"}
    assert sync["status"] == {"objectResourceVersion": "0"}
    store.record_ack("e1", message)
    store.record_ack("e1", node_message)
    await store.acks.wait_written()
    sync = fake_kube.get("ObjectSync", "default", f"e1.{uid}")
    assert sync is not None
    assert sync["status"]["objectResourceVersion"] == message.header.resource_version
    node_uid = node_message.content["metadata"]["uid"]
    cluster_sync = fake_kube.get("ClusterObjectSync", None, f"e1.{node_uid}")
    assert cluster_sync is not None
    assert cluster_sync["spec"]["objectKind"] == "Node"
    assert store.missed("e1") == []
