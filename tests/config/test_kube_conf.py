"""conf/kube: the reliablesyncs CRDs (KubeEdge's names) and the hub's RBAC rules."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from trio_cloudhub.pki import kube_secrets

CONF = Path(__file__).resolve().parents[2] / "conf" / "kube"
READ = {"get", "list", "watch"}


def documents(name: str) -> list[dict[str, Any]]:
    with (CONF / name).open(encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


@pytest.mark.parametrize(
    ("name", "kind", "plural", "scope"),
    [
        ("objectsyncs.reliablesyncs.kubeedge.io", "ObjectSync", "objectsyncs", "Namespaced"),
        (
            "clusterobjectsyncs.reliablesyncs.kubeedge.io",
            "ClusterObjectSync",
            "clusterobjectsyncs",
            "Cluster",
        ),
    ],
)
def test_crds_match_kubeedge(name: str, kind: str, plural: str, scope: str) -> None:
    crds = {doc["metadata"]["name"]: doc for doc in documents("crds.yaml")}
    assert set(crds) == {
        "objectsyncs.reliablesyncs.kubeedge.io",
        "clusterobjectsyncs.reliablesyncs.kubeedge.io",
    }
    crd = crds[name]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    spec = crd["spec"]
    assert spec["group"] == "reliablesyncs.kubeedge.io"
    assert spec["scope"] == scope
    assert spec["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": plural[:-1],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    assert set(schema["spec"]["properties"]) == {"objectAPIVersion", "objectKind", "objectName"}
    assert set(schema["status"]["properties"]) == {"objectResourceVersion"}
    for field in (*schema["spec"]["properties"].values(), *schema["status"]["properties"].values()):
        assert field["type"] == "string"


def rules_by_resource(rules: list[dict[str, Any]]) -> dict[tuple[str, str, str], set[str]]:
    """(api group, resource, resource name or "*") -> verbs."""
    granted: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames", ["*"]):
                    granted[(group, resource, name)] |= set(rule["verbs"])
    return dict(granted)


def test_rbac_objects() -> None:
    docs = documents("rbac.yaml")
    assert [doc["metadata"]["name"] for doc in by_kind(docs, "Namespace")] == ["kubeedge"]
    [account] = by_kind(docs, "ServiceAccount")
    assert account["metadata"] == {"name": "trio-cloudhub", "namespace": "kubeedge"}
    subject = {"kind": "ServiceAccount", "name": "trio-cloudhub", "namespace": "kubeedge"}
    [cluster_binding] = by_kind(docs, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == "trio-cloudhub"
    assert cluster_binding["roleRef"]["kind"] == "ClusterRole"
    assert cluster_binding["subjects"] == [subject]
    [binding] = by_kind(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "kubeedge"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "trio-cloudhub-credentials",
    }
    assert binding["subjects"] == [subject]


def test_cluster_role_grants_exactly_what_the_hub_needs() -> None:
    [role] = by_kind(documents("rbac.yaml"), "ClusterRole")
    assert role["metadata"]["name"] == "trio-cloudhub"
    syncs = "reliablesyncs.kubeedge.io"
    all_verbs = READ | {"create", "update", "patch", "delete"}
    assert rules_by_resource(role["rules"]) == {
        ("", "nodes", "*"): READ | {"create", "update", "patch"},
        ("", "nodes/status", "*"): {"update", "patch"},
        ("", "pods", "*"): READ | {"create", "delete"},
        ("", "pods/status", "*"): {"update", "patch"},
        ("", "configmaps", "*"): READ,
        ("", "secrets", "*"): READ,
        ("", "namespaces", "*"): {"create"},
        ("", "namespaces", "kubeedge"): {"get"},
        ("", "serviceaccounts/token", "*"): {"create"},
        (syncs, "objectsyncs", "*"): all_verbs,
        (syncs, "clusterobjectsyncs", "*"): all_verbs,
        (syncs, "objectsyncs/status", "*"): {"get", "update", "patch"},
        (syncs, "clusterobjectsyncs/status", "*"): {"get", "update", "patch"},
        ("coordination.k8s.io", "leases", "*"): {"get", "create", "update"},
    }


def test_credentials_role_writes_only_what_kube_credentials_writes() -> None:
    [role] = by_kind(documents("rbac.yaml"), "Role")
    assert role["metadata"] == {"name": "trio-cloudhub-credentials", "namespace": "kubeedge"}
    assert rules_by_resource(role["rules"]) == {
        ("", "secrets", "*"): {"create"},
        ("", "secrets", kube_secrets.TOKEN_SECRET): {"update"},
    }


def test_no_wildcards() -> None:
    for doc in documents("rbac.yaml"):
        for rule in doc.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
