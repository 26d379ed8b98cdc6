"""A real hub in-process for tests of edge-side code and of manifests (what the pytest plugin,
`trio_cloudhub.testing.pytest_plugin`, gives as fixtures; usable without pytest too)::

    async with open_cloudhub(tmp_path) as hub:             # embedded store
        edge = await hub.edge("edge-1")                      # bootstrapped, connected, ACKing
        await hub.apply({"apiVersion": "v1", "kind": "ConfigMap", ...})
        await edge.wait_holds("default/configmap/web")

    async with open_cloudhub_kube(tmp_path) as hub:        # Kubernetes store, fake API server
        ...                                                  # the same calls; hub.kube is the fake

The hub is the real `serve` (the same task tree as `trio-cloudhub serve`) on free loopback
ports (WebSocket, HTTPS, metrics; QUIC too when the `quic` extra is installed), with its
data directory and manifests folder under the given directory, its certificates generated
there (never KubeEdge's /etc paths). Edges are `SimEdge`s (`testing.edge_sim`): they
bootstrap their certificate over HTTPS with the join token as EdgeCore does, connect over
WebSocket or QUIC, keep alive, and store what they receive under the v1.10 or v1.23 rules of
EdgeCore's metaManager (`edge.storage`), ACKing as that line does.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import yaml

from trio_cloudhub.config import API_VERSION, Config, parse_config
from trio_cloudhub.hub.hub import Hub
from trio_cloudhub.hub.server import ServeInfo, serve
from trio_cloudhub.testing.edge_sim import EdgeIdentity, SimEdge, bootstrap, start_sim_edge
from trio_cloudhub.testing.edge_storage import EDGECORE_LINES, V1_10, V1_23, MetaStore

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
EDGE_TIMEOUT = 15.0
EDGE_LABEL = "node-role.kubernetes.io/edge"
TRANSPORTS = ("websocket", "quic")

Obj = dict[str, Any]
EdgeFactory = Callable[..., Awaitable[SimEdge]]
"""`CloudHub.edge`: `await factory("edge-1", transport=..., edgecore=...)`."""


class HarnessError(Exception):
    """The test asked for something this hub cannot do (say what to change)."""


def quic_available() -> bool:
    """Whether the `quic` extra (aioquic, trio-asyncio) is installed."""
    return all(importlib.util.find_spec(name) for name in ("aioquic", "trio_asyncio"))


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` over `base`, mappings merged key by key, anything else replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def harness_config(
    root: Path,
    *,
    quic: bool | None = None,
    kubeconfig: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """The hub's CloudCore config: loopback, free ports, everything under `root`;
    `overrides` (CloudCore YAML structure) on top. QUIC: on when installed unless `quic`."""
    pki = root / "pki-files"  # absent: the hub generates its certificates in the data dir
    hub: dict[str, Any] = {
        "advertiseAddress": [HOST],
        "tlsCAFile": str(pki / "rootCA.crt"),
        "tlsCAKeyFile": str(pki / "rootCA.key"),
        "tlsCertFile": str(pki / "server.crt"),
        "tlsPrivateKeyFile": str(pki / "server.key"),
        "websocket": {"address": HOST, "port": 0},
        "https": {"address": HOST, "port": 0},
        "quic": {"enable": quic_available() if quic is None else quic, "address": HOST, "port": 0},
        "unixsocket": {"enable": False},
    }
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "CloudCore",
        "commonConfig": {"monitorServer": {"bindAddress": f"{HOST}:0"}},
        "modules": {"cloudHub": hub},
        "trioCloudHub": {
            "dataDir": str(root / "data"),
            "manifestsDir": str(root / "manifests"),
            "manifestsPollInterval": 0.05,
            "reconcileIntervalSeconds": 1.0,
        },
    }
    if kubeconfig is not None:
        doc["kubeAPIConfig"] = {"kubeConfig": str(kubeconfig), "qps": 1000, "burst": 1000}
    doc = merge(doc, overrides or {})
    return parse_config(yaml.safe_dump(doc), "<trio-cloudhub test harness>")


def resource_key(kind: str, name: str, namespace: str = "default") -> str:
    """The key an edge stores an object under: `default/configmap/web`, `null/node/edge-1`."""
    if kind == "Node":
        return f"null/node/{name}"
    return f"{namespace}/{kind.lower()}/{name}"


@attrs.define
class CloudHub:
    """A running hub and what a test does with it (see the module docstring)."""

    info: ServeInfo
    config: Config
    nursery: trio.Nursery
    kube: Any = None  # the FakeKube of the Kubernetes-store variant
    _identities: dict[tuple[str, bool], EdgeIdentity] = attrs.field(factory=dict)
    _files: dict[tuple[str, str, str], Path] = attrs.field(factory=dict)

    # --- what is running ---------------------------------------------------------------

    @property
    def hub(self) -> Hub:
        return self.info.hub

    @property
    def store_kind(self) -> str:
        return self.config.store_kind

    @property
    def data_dir(self) -> Path:
        return self.info.data_dir

    @property
    def manifests_dir(self) -> Path:
        return self.info.manifests_dir

    @property
    def token(self) -> str:
        """A valid join token, as `trio-cloudhub token` prints it."""
        return self.info.tokens.token

    @property
    def websocket_port(self) -> int:
        return self.info.websocket_port

    @property
    def https_port(self) -> int:
        return self.info.https_port

    @property
    def quic_port(self) -> int:
        return self.info.quic_port

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.info.metrics_port}"

    # --- the desired state -------------------------------------------------------------

    async def apply(self, *objects: Mapping[str, Any] | str, file: str | None = None) -> list[Obj]:
        """Objects (dicts, or YAML text of one or more documents) into the desired state.

        Embedded store: written into the manifests folder, each object in a file named after
        it (`configmap-default-web.yaml`), or all of this call's objects in `file`; applying
        an object again replaces it (an update). Kubernetes store: put into the fake API
        server. Returns the objects as stored (with resourceVersion on Kubernetes)."""
        docs = _documents(objects)
        if not docs:
            raise HarnessError("apply() needs at least one object")
        if self.kube is not None:
            return [self.kube.put(doc) for doc in docs]
        groups: dict[Path, list[Obj]] = {}
        for doc in docs:
            path = self.manifests_dir / (file or _file_name(doc))
            groups.setdefault(path, []).append(doc)
            old = self._files.get(_key(doc))
            if old is not None and old != path:
                self._forget(_key(doc))
                await self._rewrite_without(old, _key(doc))
        for path, group in groups.items():
            keys = {_key(doc) for doc in group}
            kept = [doc for doc in await self._tracked_in(path) if _key(doc) not in keys]
            for doc in group:
                self._files[_key(doc)] = path
            await _write_atomically(path, yaml.safe_dump_all([*kept, *group], sort_keys=False))
        return docs

    async def _tracked_in(self, path: Path) -> list[Obj]:
        """The objects of `path` applied earlier (a file shared through `file=`)."""
        if path not in self._files.values() or not await trio.Path(path).exists():
            return []
        return [doc for doc in yaml.safe_load_all(await trio.Path(path).read_text()) if doc]

    async def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        """Remove an object from the desired state (its file, or it from its file; on
        Kubernetes from the fake API server)."""
        key = (kind, "" if kind == "Node" else namespace, name)
        if self.kube is not None:
            if self.kube.delete(kind, key[1] or None, name) is None:
                raise HarnessError(f"no {kind} {namespace}/{name} in the fake API server")
            return
        path = self._files.get(key)
        if path is None:
            raise HarnessError(f"{kind} {namespace}/{name} was not applied through this hub")
        self._forget(key)
        await self._rewrite_without(path, key)

    def _forget(self, key: tuple[str, str, str]) -> None:
        self._files.pop(key, None)

    async def _rewrite_without(self, path: Path, key: tuple[str, str, str]) -> None:
        docs = [doc for doc in yaml.safe_load_all(await trio.Path(path).read_text()) if doc]
        kept = [doc for doc in docs if _key(doc) != key]
        if kept:
            await _write_atomically(path, yaml.safe_dump_all(kept, sort_keys=False))
        else:
            await trio.Path(path).unlink(missing_ok=True)

    # --- edges -------------------------------------------------------------------------

    async def edge(
        self,
        node_id: str = "edge-1",
        *,
        transport: str = "websocket",
        edgecore: str | None = None,
        storage: MetaStore | None = None,
        auto_ack: bool = True,
        keepalive_interval: float = 15.0,
        within: float = EDGE_TIMEOUT,
    ) -> SimEdge:
        """A simulated EdgeCore named `node_id`, connected and running until the hub stops
        (or `await edge.close_abruptly()`).

        `edgecore` ("v1.10" or "v1.23", default v1.23) picks metaManager's storage rules and
        the certificate request of that line. `storage`: the database of an edge that
        connected before (`previous.storage`), to reconnect an edge that kept it. On the
        Kubernetes store the edge's Node is created with the edge label when it does not
        exist, as EdgeCore registers itself."""
        if transport not in TRANSPORTS:
            raise HarnessError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        storage = _storage(edgecore, storage)
        identity = await self.identity(node_id, legacy_v110=storage.line == V1_10)
        if self.kube is not None and self.kube.get("Node", None, node_id) is None:
            self.kube.put(edge_node(node_id))
        with trio.fail_after(within):
            if transport == "quic":
                return await self._quic_edge(
                    identity, node_id, storage, auto_ack, keepalive_interval, within
                )
            return await start_sim_edge(
                self.nursery,
                HOST,
                self.websocket_port,
                identity,
                node_id,
                auto_ack=auto_ack,
                keepalive_interval=keepalive_interval,
                connect_timeout=within,
                storage=storage,
            )

    async def identity(self, node_id: str, *, legacy_v110: bool = False) -> EdgeIdentity:
        """The edge's certificate, bootstrapped once with the join token (EdgeCore keeps it)."""
        key = (node_id, legacy_v110)
        if key not in self._identities:
            self._identities[key] = await bootstrap(
                HOST, self.https_port, self.token, node_id, legacy_v110=legacy_v110
            )
        return self._identities[key]

    async def _quic_edge(
        self,
        identity: EdgeIdentity,
        node_id: str,
        storage: MetaStore,
        auto_ack: bool,
        keepalive_interval: float,
        within: float,
    ) -> SimEdge:
        if not self.quic_port:
            why = "the quic extra is not installed (pip install 'trio-cloudhub[quic]')"
            if quic_available():
                why = "QUIC is disabled in this hub's config (modules.cloudHub.quic.enable)"
            raise HarnessError(f"no QUIC edge: {why}")
        from trio_cloudhub.testing.quic_sim import open_sim_quic_edge

        async def run(*, task_status: trio.TaskStatus[SimEdge]) -> None:
            async with open_sim_quic_edge(
                HOST,
                self.quic_port,
                identity,
                node_id,
                auto_ack=auto_ack,
                keepalive_interval=keepalive_interval,
                connect_timeout=within,
                storage=storage,
            ) as edge:
                task_status.started(edge)
                await edge.wait_disconnected(math.inf)

        edge: SimEdge = await self.nursery.start(run)
        return edge

    # --- what `trio-cloudhub get` shows --------------------------------------------------

    async def admin(self, what: str = "nodes") -> Obj:
        """The hub's admin answer (`/admin/nodes` or `/admin/pods`), as `get` reads it."""
        url = f"{self.metrics_url}/admin/{what}"

        def read() -> Obj:
            with urllib.request.urlopen(url, timeout=10) as response:
                doc: Obj = json.loads(response.read())
                return doc

        return await trio.to_thread.run_sync(read)

    async def node(self, name: str) -> Obj:
        """One node's item of `/admin/nodes` (KeyError when the hub does not know it)."""
        for item in (await self.admin("nodes"))["items"]:
            if item["name"] == name:
                return dict(item)
        raise KeyError(name)


def edge_node(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    """A Node the Kubernetes store treats as an edge node."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {EDGE_LABEL: "", **(labels or {})}},
    }


def _storage(edgecore: str | None, storage: MetaStore | None) -> MetaStore:
    if storage is None:
        line = edgecore or V1_23
        if line not in EDGECORE_LINES:
            raise HarnessError(f"edgecore must be one of {EDGECORE_LINES}, not {line!r}")
        return MetaStore(line)
    if edgecore is not None and edgecore != storage.line:
        raise HarnessError(f"edgecore={edgecore!r} but the storage given is {storage.line!r}")
    return storage


def _documents(objects: tuple[Mapping[str, Any] | str, ...]) -> list[Obj]:
    docs: list[Obj] = []
    for item in objects:
        found = list(yaml.safe_load_all(item)) if isinstance(item, str) else [item]
        for doc in found:
            if doc is None:
                continue
            if not isinstance(doc, Mapping) or not isinstance(doc.get("metadata"), Mapping):
                raise HarnessError(f"not a Kubernetes object (kind, metadata.name): {doc!r}")
            docs.append(copy.deepcopy(dict(doc)))
    return docs


def _key(doc: Mapping[str, Any]) -> tuple[str, str, str]:
    kind = str(doc.get("kind", ""))
    metadata = doc["metadata"]
    namespace = "" if kind == "Node" else str(metadata.get("namespace") or "default")
    return kind, namespace, str(metadata.get("name", ""))


def _file_name(doc: Mapping[str, Any]) -> str:
    kind, namespace, name = _key(doc)
    parts = [kind.lower(), namespace, name] if namespace else [kind.lower(), name]
    return "-".join(parts) + ".yaml"


async def _write_atomically(path: Path, text: str) -> None:
    """Write then rename: the store never reads half a file (dot files are skipped)."""
    partial = trio.Path(path.with_name(f".{path.name}.tmp"))
    await partial.write_text(text)
    await partial.replace(path)


@asynccontextmanager
async def _running(config: Config, kube: Any = None) -> AsyncIterator[CloudHub]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            info: ServeInfo = await nursery.start(serve, config)
        try:
            yield CloudHub(info=info, config=config, nursery=nursery, kube=kube)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_cloudhub(
    root: Path, *, config: Mapping[str, Any] | None = None, quic: bool | None = None
) -> AsyncIterator[CloudHub]:
    """A hub with the embedded store under `root` (data/, manifests/), until the block ends.
    `config`: CloudCore-format overrides; `quic`: force QUIC on or off."""
    await trio.Path(root / "manifests").mkdir(parents=True, exist_ok=True)
    async with _running(harness_config(root, quic=quic, overrides=config)) as hub:
        yield hub


@asynccontextmanager
async def open_cloudhub_kube(
    root: Path, *, config: Mapping[str, Any] | None = None, quic: bool | None = None
) -> AsyncIterator[CloudHub]:
    """A hub with the Kubernetes store, on the HTTP-level fake API server (`hub.kube`,
    `testing.fake_kube`) with the real `kubernetes` client (needs the `kube` extra)."""
    try:
        import kubernetes  # noqa: F401  (the store's client)
    except ImportError as exc:
        raise HarnessError(
            f"the Kubernetes store needs the kube extra (pip install 'trio-cloudhub[kube]'): {exc}"
        ) from None
    from trio_cloudhub.testing.fake_kube import open_fake_kube

    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    async with open_fake_kube(bookmark_interval=0.2) as kube:
        kubeconfig = kube.write_kubeconfig(root / "kubeconfig")
        settings = harness_config(root, quic=quic, kubeconfig=kubeconfig, overrides=config)
        async with _running(settings, kube) as hub:
            yield hub
