"""The informer against the fake API server, through the real `kubernetes` client."""

from __future__ import annotations

from typing import Any

import trio
from kubernetes import client

from trio_cloudhub.store.kube.informer import Informer
from trio_cloudhub.testing.fake_kube import FakeKube

WAIT = 10.0


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.changed = trio.Event()

    def __call__(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((kind, obj["metadata"]["name"]))
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, count: int) -> list[tuple[str, str]]:
        with trio.fail_after(WAIT):
            while len(self.events) < count:
                await self.changed.wait()
        return self.events


async def started(
    nursery: trio.Nursery, kube_api: Any, recorder: Recorder, **kwargs: Any
) -> Informer:
    informer = Informer(
        "nodes",
        client.CoreV1Api(kube_api).list_node,
        limiter=trio.CapacityLimiter(4),
        watch_timeout=30,
        list_kwargs=kwargs,
    )
    with trio.fail_after(WAIT):
        await nursery.start(informer.run, recorder)
    return informer


async def test_list_then_watch_in_order(fake_kube: FakeKube, kube_api: Any) -> None:
    fake_kube.put(node("a"))
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        informer = await started(nursery, kube_api, recorder)
        assert recorder.events == [("ADDED", "a")] and informer.synced.is_set()
        await fake_kube.wait_watchers(1, "nodes")
        fake_kube.put(node("b"))
        fake_kube.put(node("a", zone="x"))
        fake_kube.delete("Node", "", "b")
        assert await recorder.until(4) == [
            ("ADDED", "a"),
            ("ADDED", "b"),
            ("MODIFIED", "a"),
            ("DELETED", "b"),
        ]
        assert set(informer.cache) == {("", "a")}
        assert informer.lists == 1
        nursery.cancel_scope.cancel()


async def test_label_selector_keeps_only_edge_nodes(fake_kube: FakeKube, kube_api: Any) -> None:
    fake_kube.put(node("edge", **{"node-role.kubernetes.io/edge": ""}))
    fake_kube.put(node("master"))
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        await started(nursery, kube_api, recorder, label_selector="node-role.kubernetes.io/edge")
        assert recorder.events == [("ADDED", "edge")]
        nursery.cancel_scope.cancel()


async def test_expired_history_relists_and_hands_over_only_the_difference(
    fake_kube: FakeKube, kube_api: Any
) -> None:
    fake_kube.put(node("keep"))
    fake_kube.put(node("gone"))
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        informer = await started(nursery, kube_api, recorder)
        await fake_kube.wait_watchers(1, "nodes")
        await fake_kube.stop()  # the API server goes away ...
        fake_kube.delete("Node", "", "gone")
        fake_kube.put(node("new"))
        fake_kube.compact()  # ... and comes back without the history the watch needs
        await fake_kube.start()
        events = await recorder.until(4)
        assert sorted(events[2:]) == [("ADDED", "new"), ("DELETED", "gone")]
        assert informer.lists == 2
        assert set(informer.cache) == {("", "keep"), ("", "new")}
        nursery.cancel_scope.cancel()


async def test_a_broken_watch_resumes_without_a_relist(fake_kube: FakeKube, kube_api: Any) -> None:
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        informer = await started(nursery, kube_api, recorder)
        await fake_kube.wait_watchers(1, "nodes")
        fake_kube.close_watches(abort=True)
        fake_kube.put(node("later"))
        assert await recorder.until(1) == [("ADDED", "later")]
        assert informer.lists == 1  # resumed from its resourceVersion
        nursery.cancel_scope.cancel()


async def test_bookmarks_move_the_resource_version(fake_kube: FakeKube, kube_api: Any) -> None:
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        informer = await started(nursery, kube_api, recorder)
        before = informer.resource_version
        fake_kube.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
        with trio.fail_after(WAIT):
            while informer.resource_version == before:  # noqa: ASYNC110 - set from a thread
                await trio.sleep(0.05)
        assert recorder.events == []  # another kind's change: only a bookmark
        nursery.cancel_scope.cancel()


async def test_a_failing_list_is_retried(fake_kube: FakeKube, kube_api: Any) -> None:
    fake_kube.put(node("a"))
    fake_kube.fail_next(500, times=2, verb="list", resource="nodes")
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        await started(nursery, kube_api, recorder)
        assert recorder.events == [("ADDED", "a")]
        assert fake_kube.count("list", "nodes") == 3
        nursery.cancel_scope.cancel()
