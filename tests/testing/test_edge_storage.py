"""The simulator's model of EdgeCore's metaManager database, per EdgeCore line."""

from __future__ import annotations

from typing import Any

import pytest

from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.testing.edge_storage import (
    V1_10,
    V1_23,
    MetaStore,
    UnknownEdgeCoreLine,
)


def cloud(
    operation: str,
    resource: str,
    rv: int,
    uid: str = "uid-1",
    *,
    source: str = "edgecontroller",
    content: Any = None,
    parent: str = "",
) -> Message:
    body = content
    if body is None:
        body = {"metadata": {"name": resource.rsplit("/", 1)[-1], "uid": uid}}
        body["metadata"]["resourceVersion"] = str(rv)
    return new_message(
        source=source,
        group="resource",
        operation=operation,
        resource=resource,
        content=body,
        now_ms=0,
        resource_version=str(rv),
        parent_msg_id=parent,
    )


CM = "default/configmap/app-config"
POD = "default/pod/web-0"


def test_v110_insert_of_a_stored_key_is_acked_but_keeps_the_old_row() -> None:
    store = MetaStore(V1_10)
    first = store.handle(cloud("insert", CM, 4))
    again = cloud("insert", CM, 5)
    answer = store.handle(again)
    assert first is not None and first.content == "OK"
    assert answer is not None and answer.content == "OK"
    assert answer.header.parent_msg_id == again.msg_id
    assert store.resource_version(CM) == "4"  # the bug of issue 12: "OK", nothing written
    assert store.ignored_inserts == 1


def test_v123_insert_replaces() -> None:
    store = MetaStore(V1_23)
    store.handle(cloud("insert", CM, 4))
    store.handle(cloud("insert", CM, 5))
    assert store.resource_version(CM) == "5"
    assert store.ignored_inserts == 0


@pytest.mark.parametrize("line", [V1_10, V1_23])
def test_update_is_insert_or_replace_in_both_lines(line: str) -> None:
    store = MetaStore(line)
    assert store.handle(cloud("update", CM, 3)) is not None  # not held yet: stored
    assert store.resource_version(CM) == "3"
    answer = store.handle(cloud("update", CM, 7))
    assert answer is not None and answer.route.operation == "response"
    assert store.resource_version(CM) == "7"


@pytest.mark.parametrize(("line", "acked"), [(V1_10, False), (V1_23, True)])
def test_update_sources_that_get_an_answer(line: str, acked: bool) -> None:
    store = MetaStore(line)
    answer = store.handle(cloud("update", CM, 3, source="devicecontroller"))
    assert (answer is not None) is acked
    assert store.resource_version(CM) == "3"  # stored before the source is looked at
    assert store.handle(cloud("update", CM, 4, source="somebody")) is None


def test_v110_pod_delete_goes_by_key_and_removes_a_recreated_pod() -> None:
    store = MetaStore(V1_10)
    store.handle(cloud("insert", POD, 10, uid="new-uid"))
    answer = store.handle(cloud("delete", POD, 9, uid="old-uid"))
    assert answer is not None and answer.content == "OK"
    assert store.get(POD) is None


def test_v123_pod_delete_needs_the_pods_uid() -> None:
    store = MetaStore(V1_23)
    store.handle(cloud("insert", POD, 10, uid="new-uid"))
    answer = store.handle(cloud("delete", POD, 9, uid="old-uid"))
    assert answer is not None and answer.content == "OK"
    assert store.uid(POD) == "new-uid"
    store.handle(cloud("delete", POD, 11, uid="new-uid"))
    assert store.get(POD) is None


@pytest.mark.parametrize("line", [V1_10, V1_23])
def test_delete_of_what_is_not_held_is_acked(line: str) -> None:
    store = MetaStore(line)
    for resource in (CM, POD):
        answer = store.handle(cloud("delete", resource, 3))
        assert answer is not None and answer.content == "OK"
    assert list(store.keys()) == []


def test_v123_pod_delete_with_unreadable_content_is_an_error_not_an_ack() -> None:
    store = MetaStore(V1_23)
    request = cloud("delete", POD, 3, content="not a pod")
    answer = store.handle(request)
    assert answer is not None
    assert answer.route.operation == "error"
    assert answer.header.parent_msg_id == request.msg_id


def test_sync_answers_and_other_groups_do_not_reach_the_table() -> None:
    store = MetaStore(V1_23)
    assert store.handle(cloud("insert", CM, 3, parent="some-request")) is None
    other = new_message(
        source="edgecontroller",
        group="twin",
        operation="insert",
        resource=CM,
        content={},
        now_ms=0,
    )
    assert store.handle(other) is None
    assert store.handle(cloud("patch", CM, 3)) is None
    assert list(store.keys()) == []


def test_node_object_is_kept_under_null() -> None:
    store = MetaStore(V1_10)
    store.handle(cloud("update", "null/node/edge-1", 2))
    assert store.resource_version("null/node/edge-1") == "2"
    assert store.versions() == {"null/node/edge-1": "2"}


def test_unknown_line_is_refused() -> None:
    with pytest.raises(UnknownEdgeCoreLine, match=r"v1\.5"):
        MetaStore("v1.5")
