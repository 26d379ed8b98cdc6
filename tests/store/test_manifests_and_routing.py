"""Manifest parsing and the routing rules, as pure functions (synchronous tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.store.conftest import config_map, node, pod
from trio_cloudhub.store.manifests import (
    MAX_FILE_BYTES,
    ManifestError,
    ObjectKey,
    make_manifest,
    parse_manifest_bytes,
    read_manifest_file,
    stamp_folder,
)
from trio_cloudhub.store.routing import StoredObject, place, plan, pod_references, to_message

# A billion-laughs style document: 7 levels of 10 aliases each expand to 10 million nodes.
BOMB = "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7)
)


def parse(text: str, *, json_format: bool = False) -> tuple[list[Any], list[str]]:
    return parse_manifest_bytes(text.encode(), json_format=json_format)


def test_multi_document_yaml_defaults_and_owned_fields() -> None:
    manifests, warnings = parse(
        """
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg, uid: forged, resourceVersion: "9", labels: {a: b}}
data: {when: 2024-01-02}
---
---
apiVersion: v1
kind: Node
metadata: {name: edge-1, namespace: ignored}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
"""
    )
    assert [m.key for m in manifests] == [
        ObjectKey("ConfigMap", "default", "cfg"),
        ObjectKey("Node", "", "edge-1"),
    ]
    cfg = manifests[0].doc
    assert cfg["metadata"] == {"name": "cfg", "namespace": "default", "labels": {"a": "b"}}
    assert cfg["data"] == {"when": "2024-01-02"}  # YAML dates become text
    assert "namespace" not in manifests[1].doc["metadata"]
    assert warnings == ["document 4: skipping unsupported kind apps/v1/Deployment"]


def test_list_kind_json_file_and_secret_string_data() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s"},
                "data": {"a": "YQ=="},
                "stringData": {"b": "b"},
            }
        ],
    }
    [secret], _ = parse(json.dumps(doc), json_format=True)
    assert secret.doc["data"] == {"a": "YQ==", "b": "Yg=="}
    assert secret.doc["type"] == "Opaque" and "stringData" not in secret.doc


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("kind: Pod\nmetadata: {name: [x\n", "invalid YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "no metadata.name"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a/b}\n", "invalid metadata.name"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: B}\n", "invalid namespace"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: x/y}\n", "nodeName"),
        ("- just\n- a list\n", "not a mapping"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\n"
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n",
            "appears twice",
        ),
        (BOMB, "too large"),
        ("[" * 5000, "nested too deeply"),
    ],
)
def test_bad_documents_fail_the_whole_file(text: str, reason: str) -> None:
    with pytest.raises(ManifestError, match=reason):
        parse(text, json_format=text.startswith("[["))


def test_file_size_bound_and_folder_stamps(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    (tmp_path / "ok.json").write_text(
        '{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}'
    )
    (tmp_path / ".hidden.yaml").write_text("x: 1")
    (tmp_path / "notes.txt").write_text("x: 1")
    stamps = stamp_folder(tmp_path)
    assert sorted(stamps) == ["big.yaml", "ok.json"]
    big = read_manifest_file(tmp_path, "big.yaml", stamps["big.yaml"])
    assert "larger than" in big.error
    ok = read_manifest_file(tmp_path, "ok.json", stamps["ok.json"])
    assert [m.key.name for m in ok.manifests] == ["n"] and not ok.error


def stored(doc: dict[str, Any], uid: str, rv: int = 1) -> StoredObject:
    manifest = parse(json.dumps(doc), json_format=True)[0][0]
    body = manifest.doc | {"metadata": manifest.doc["metadata"] | {"uid": uid}}
    return StoredObject(
        key=manifest.key,
        uid=uid,
        rv=rv,
        body=body,
        manifest=make_manifest(manifest.key, manifest.doc).text,
        source="f",
    )


def test_pod_references_ignore_malformed_parts() -> None:
    doc = pod(
        "p",
        "n",
        volumes=[{"configMap": "oops"}, {"secret": {"secretName": ""}}],
        env=[{"valueFrom": None}],
        env_from=[{"configMapRef": {"name": "c"}}],
    )
    doc["spec"]["volumes"].append("not a volume")
    doc["spec"]["initContainers"] = [{"envFrom": [{"secretRef": {"name": "s"}}]}]
    doc["metadata"]["namespace"] = "ns"
    assert pod_references(doc) == {
        ObjectKey("ConfigMap", "ns", "c"),
        ObjectKey("Secret", "ns", "s"),
    }


def test_config_maps_follow_pods_of_the_same_namespace_only() -> None:
    objects = {
        obj.key: obj
        for obj in [
            stored(config_map("c"), "cm-default"),
            stored(config_map("c", namespace="other"), "cm-other"),
            stored(pod("p", "n1", volumes=[{"name": "v", "configMap": {"name": "c"}}]), "pod"),
            stored(node("n1"), "node"),
        ]
    }
    assert place(objects) == {("n1", "cm-default"), ("n1", "pod"), ("n1", "node")}


def test_plan_orders_deletes_then_upserts_and_node_stop_resource() -> None:
    n = stored(node("n1"), "node")
    c = stored(config_map("c"), "cm")
    p = stored(pod("p", "n1"), "pod")
    objects = {"node": n, "cm": c, "pod": p}
    deliveries = plan({("n1", "node"), ("n1", "pod")}, {("n1", "cm")}, objects)
    messages = [to_message(d, 5) for d in deliveries]
    assert [(m.route.operation, m.route.resource) for m in messages] == [
        ("delete", "node/n1/default/pod/p"),
        ("delete", "node/n1/namespace/node/n1"),
        ("insert", "node/n1/default/configmap/c"),
    ]
    assert all(m.header.resource_version == "1" for m in messages)
    same = plan({("n1", "cm")}, {("n1", "cm")}, objects, changed={"cm"})
    assert [(d.operation, d.node) for d in same] == [("update", "n1")]


def test_a_file_removed_between_listing_and_read_is_read_again_not_reported(
    tmp_path: Path,
) -> None:
    (tmp_path / "gone.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    stamp = stamp_folder(tmp_path)["gone.yaml"]
    (tmp_path / "gone.yaml").unlink()
    result = read_manifest_file(tmp_path, "gone.yaml", stamp)
    assert result.unstable and not result.error
