"""The trio-cloudhub pytest plugin: a real hub in-process, simulated EdgeCores, helpers.

Enable it (it is off by default, installed or not) with one of:

- `trio_cloudhub = true` in the `[tool.pytest.ini_options]` / `[pytest]` section (the
  `trio_cloudhub` entry point of the package reads it);
- `pytest -p trio_cloudhub.testing.pytest_plugin`;
- `pytest_plugins = ["trio_cloudhub.testing.pytest_plugin"]` in the root `conftest.py`.

It needs pytest-trio (`pip install 'trio-cloudhub[testing]'`); tests using the fixtures are
trio tests (`@pytest.mark.trio`, or `trio_mode = true`). Fixtures:

- `cloudhub`: a `CloudHub` (`testing.harness`): the real `serve` with the embedded store
  on free loopback ports, its data directory and manifests folder in the test's `tmp_path`;
  `await cloudhub.apply(obj_or_yaml)`, `await cloudhub.delete(kind, name)`,
  `await cloudhub.edge("edge-1", transport="quic", edgecore="v1.10")`, `cloudhub.token`,
  `await cloudhub.node("edge-1")` (what `trio-cloudhub get nodes` shows);
- `cloudhub_edge`: `cloudhub.edge`, the factory of simulated edges (`SimEdge`:
  `await edge.wait_holds("default/configmap/web")`, `edge.storage`, `edge.expect(...)`);
- `cloudhub_kube`: the same `CloudHub` on the Kubernetes store, against the HTTP-level
  fake API server (`cloudhub_kube.kube`), with the real `kubernetes` client (`kube` extra);
- `cloudhub_config`: `{}`; override it (in a conftest or a module) to change the hub's
  configuration, in CloudCore's YAML structure, e.g.
  `{"modules": {"cloudHub": {"authorization": {"enable": True, "debug": False}}}}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from trio_cloudhub.testing.harness import (
    CloudHub,
    EdgeFactory,
    edge_node,
    open_cloudhub,
    open_cloudhub_kube,
    resource_key,
)

try:
    import pytest_trio  # noqa: F401  (runs the async fixtures below)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the trio-cloudhub pytest plugin needs pytest-trio: pip install 'trio-cloudhub[testing]'"
    ) from exc

__all__ = ["CloudHub", "edge_node", "resource_key"]


def pytest_report_header() -> str:
    return "trio-cloudhub fixtures: cloudhub, cloudhub_edge, cloudhub_kube, cloudhub_config"


@pytest.fixture
def cloudhub_config() -> dict[str, Any]:
    """Overrides of the test hub's configuration (CloudCore YAML structure); none."""
    return {}


@pytest.fixture
async def cloudhub(tmp_path: Path, cloudhub_config: dict[str, Any]) -> AsyncIterator[CloudHub]:
    """A running hub with the embedded store (manifests folder: `cloudhub.manifests_dir`)."""
    async with open_cloudhub(tmp_path / "cloudhub", config=cloudhub_config) as hub:
        yield hub


@pytest.fixture
async def cloudhub_edge(cloudhub: CloudHub) -> EdgeFactory:
    """`await cloudhub_edge("edge-1", transport="websocket"|"quic", edgecore="v1.23"|"v1.10")`."""
    return cloudhub.edge


@pytest.fixture
async def cloudhub_kube(tmp_path: Path, cloudhub_config: dict[str, Any]) -> AsyncIterator[CloudHub]:
    """A running hub with the Kubernetes store on a fake API server (`cloudhub_kube.kube`)."""
    async with open_cloudhub_kube(tmp_path / "cloudhub-kube", config=cloudhub_config) as hub:
        yield hub
