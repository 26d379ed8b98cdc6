"""The root of the task tree (design section 3): `serve(config, task_status)`.

Order matters: the cloud side's certificates first (nothing can listen without them: files
and SQLite for the embedded store, the kubeedge secrets for Kubernetes), then HTTPS (/readyz
answers "not ready" until the end), the metrics server (optional: the hub serves without it
when its address is taken), then the store, which hands each message straight to the
hub's router (its `started()` means the caches are synced), the reconciliation loop, the
WebSocket listener, and only then `task_status.started(ServeInfo)`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio

from trio_cloudhub.admin_api import admin_file, admin_url
from trio_cloudhub.config import Config, ConfigError
from trio_cloudhub.edge.websocket import serve_websocket
from trio_cloudhub.http.certs_store import (
    HubCredentials,
    new_token_keeper,
    prepare_credentials,
    run_token_refresher,
)
from trio_cloudhub.http.kube_credentials import (
    kube_secret_ops,
    prepare_kube_credentials,
    run_kube_token_refresher,
)
from trio_cloudhub.http.server import serve_https
from trio_cloudhub.hub.admin import (
    HubIdentity,
    PodSource,
    admin_routes,
    kube_pod_items,
    local_pod_items,
    remove_admin_file,
    remove_stale_admin_files,
    write_admin_file,
)
from trio_cloudhub.hub.claims import SoleProcess, WorkerLink
from trio_cloudhub.hub.hub import Hub, HubSettings
from trio_cloudhub.metrics import AdminRoutes, Metrics, parse_bind_address, serve_metrics
from trio_cloudhub.pki.token import TokenKeeper
from trio_cloudhub.store.base import CloudStore
from trio_cloudhub.store.kube.client import KubeConfigError, RateLimiter, api_client
from trio_cloudhub.store.kube.store import KubeStore
from trio_cloudhub.store.local import LocalStore
from trio_cloudhub.uds import UdsSocketError, serve_uds

log = logging.getLogger("trio_cloudhub.hub")
QUIC_MAX_PAYLOAD = 32 * 1024 * 1024  # KubeEdge v1.23.1's bound on a QUIC message


@attrs.frozen
class ServeInfo:
    websocket_port: int
    https_port: int
    quic_port: int
    data_dir: Path
    manifests_dir: Path
    hub: Hub
    credentials: HubCredentials
    tokens: TokenKeeper
    metrics_port: int = 0  # 0: the metrics server is not running


def host_addresses() -> list[str]:
    """This host's non-loopback addresses, plus 127.0.0.1 so local edges can join too."""
    found: list[str] = []
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        address = str(info[4][0])
        if not ipaddress.ip_address(address).is_loopback and address not in found:
            found.append(address)
    return [*found[:1], "127.0.0.1"]


def with_advertise_default(config: Config) -> Config:
    hub = config.cloud_hub
    if hub.advertise_address:
        return config
    hub = attrs.evolve(hub, advertise_address=tuple(host_addresses()))
    return attrs.evolve(config, modules=attrs.evolve(config.modules, cloud_hub=hub))


async def serve(
    config: Config,
    *,
    worker: WorkerLink | None = None,
    task_status: trio.TaskStatus[ServeInfo],
) -> None:
    """The hub; `worker`: one worker process of `serve --workers N` (see `hub.supervisor`)."""
    config = with_advertise_default(config)
    if worker is not None:
        config = worker_config(config, worker.index)
    extra = config.trio_cloud_hub
    data_dir = Path(extra.data_dir)
    manifests_dir = Path(extra.manifests_dir or data_dir / "manifests")
    _warn_unimplemented(config)
    announced: list[Path] = []  # the admin file, removed at exit
    try:
        await _serve(config, data_dir, manifests_dir, announced, worker, task_status)
    finally:
        for path in announced:
            remove_admin_file(path)


async def _serve(
    config: Config,
    data_dir: Path,
    manifests_dir: Path,
    announced: list[Path],
    worker: WorkerLink | None,
    task_status: trio.TaskStatus[ServeInfo],
) -> None:
    shared = "" if worker is None else "leader" if worker.index == 0 else "follower"
    async with _open_cloud_side(config, data_dir, manifests_dir, shared) as cloud:
        settings = HubSettings.from_config(config)
        if worker is not None:
            # Another worker may serve a node meanwhile: reconciliation brings it up to date.
            settings = attrs.evolve(settings, queue_while_away=False)
        hub = Hub(settings, cloud.store, claims=worker)
        identity = HubIdentity.of_this_process(config.store_kind)
        admin = admin_routes(hub, cloud.pods, identity)
        ready = False
        async with trio.open_nursery() as root:
            if worker is not None:
                _link_worker(worker, hub, cloud.store)
                await root.start(worker.run)
            root.start_soon(hub.dispatch_upstream)
            root.start_soon(hub.run_timers)
            await root.start(cloud.run_token_refresher)
            # HTTPS first: /livez answers and /readyz says "not ready" during the cache sync.
            https_port = await root.start(
                partial(
                    serve_https,
                    cloud.credentials,
                    cloud.tokens,
                    config,
                    ready_check=lambda: ready and (worker is None or worker.all_ready),
                    nodes=cloud.store,
                    reuse_port=worker is not None,
                    on_closed=hub.connection_ended,
                )
            )
            metrics_port = await _start_metrics(root, hub.metrics, config, admin)
            await root.start(cloud.store.run, hub.route_downstream)
            root.start_soon(hub.reconcile_forever)
            if config.cloud_hub.unixsocket.enable:
                await _start_uds(root, hub, config)
            websocket_port = quic_port = 0
            if config.cloud_hub.websocket.enable:
                websocket_port = await root.start(_serve_edges, hub, cloud.credentials, config)
            if config.cloud_hub.quic.enable:
                quic_port = await root.start(_serve_quic_edges, hub, cloud.credentials, config)
            ready = True
            if metrics_port and config.trio_cloud_hub.data_dir:
                announced.extend(_announce(data_dir, config, metrics_port, identity))
            if worker is not None:
                ports = {"websocket": websocket_port, "https": https_port, "quic": quic_port}
                await worker.ready({**ports, "metrics": metrics_port})
            task_status.started(
                ServeInfo(
                    websocket_port=websocket_port,
                    https_port=https_port,
                    quic_port=quic_port,
                    data_dir=data_dir,
                    manifests_dir=manifests_dir,
                    hub=hub,
                    credentials=cloud.credentials,
                    tokens=cloud.tokens,
                    metrics_port=metrics_port,
                )
            )


@attrs.frozen
class _CloudSide:
    """What the configured cloud side gives the hub: its store and where credentials live."""

    store: CloudStore
    credentials: HubCredentials
    tokens: TokenKeeper
    run_token_refresher: Callable[..., Awaitable[None]]
    pods: PodSource  # what edges reported of their pods (`get pods`)


@asynccontextmanager
async def _open_cloud_side(
    config: Config, data_dir: Path, manifests_dir: Path, shared: str = ""
) -> AsyncIterator[_CloudSide]:
    if config.store_kind == "kube":
        async with _open_kube_side(config) as side:
            yield side
        return
    credentials = await trio.to_thread.run_sync(prepare_credentials, config, data_dir)
    tokens = new_token_keeper(credentials, config)
    store = LocalStore(
        data_dir,
        manifests_dir,
        poll_interval=config.trio_cloud_hub.manifests_poll_interval,
        shared=shared,
    )
    refresher = partial(run_token_refresher, tokens, data_dir)
    yield _CloudSide(store, credentials, tokens, refresher, partial(local_pod_items, data_dir))


@asynccontextmanager
async def _open_kube_side(config: Config) -> AsyncIterator[_CloudSide]:
    api = config.kube_api_config
    try:
        client = api_client(api)
    except KubeConfigError as exc:
        raise ConfigError(str(exc)) from None
    try:
        log.info("cloud side: Kubernetes API server %s", client.configuration.host)
        credentials = await prepare_kube_credentials(config, client)
        tokens = new_token_keeper(credentials, config)
        store = KubeStore(client, rate_limiter=RateLimiter(api.qps, api.burst))
        refresher = partial(run_kube_token_refresher, tokens, kube_secret_ops(client))
        yield _CloudSide(store, credentials, tokens, refresher, partial(kube_pod_items, store))
    finally:
        client.close()


async def _serve_edges(
    hub: Hub,
    credentials: HubCredentials,
    config: Config,
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    websocket = config.cloud_hub.websocket
    await serve_websocket(
        partial(hub.handle_connection, transport="websocket"),
        ssl_context=credentials.websocket_ssl_context(),
        host=websocket.address,
        port=websocket.port,
        max_message_size=config.trio_cloud_hub.max_message_size,
        write_timeout=float(config.cloud_hub.write_timeout),
        authenticate=hub.authenticate,
        on_handshake_failure=partial(hub.handshake_failed, "websocket"),
        reuse_port=not isinstance(hub.claims, SoleProcess),
        task_status=task_status,
    )


def worker_config(config: Config, index: int) -> Config:
    """A worker's view of the configuration: its metrics (and admin) server on a free
    loopback port (the supervisor answers the configured one); QUIC and the CSI socket in
    worker 0 only (one UDP socket per port keeps QUIC's connections whole)."""
    common = config.common_config
    monitor = attrs.evolve(common.monitor_server, bind_address="127.0.0.1:0")
    hub = config.cloud_hub
    if index:
        hub = attrs.evolve(
            hub,
            quic=attrs.evolve(hub.quic, enable=False),
            unixsocket=attrs.evolve(hub.unixsocket, enable=False),
        )
    return attrs.evolve(
        config,
        common_config=attrs.evolve(common, monitor_server=monitor),
        modules=attrs.evolve(config.modules, cloud_hub=hub),
    )


def _link_worker(worker: WorkerLink, hub: Hub, store: CloudStore) -> None:
    """What the supervisor link does to this process's hub and store."""
    worker.hub = hub
    if isinstance(store, LocalStore):
        worker.flush = store.flush
        worker.reload_node = store.reload_node
        worker.on_objects = store.shared_changed
        store.on_shared_write = worker.objects_written
    elif isinstance(store, KubeStore):
        # Ack points are ObjectSyncs every worker's informer sees: write ours out first.
        worker.flush = store.acks.wait_written


async def _start_metrics(
    nursery: trio.Nursery, metrics: Metrics, config: Config, admin: AdminRoutes
) -> int:
    """Prometheus `/metrics` (and the admin endpoint) on
    `commonConfig.monitorServer.bindAddress`; its port, or 0 when it cannot listen there
    (e.g. a CloudCore still holds 9091): metrics are not worth refusing edges for, so that is
    a warning and the hub serves on."""
    monitor = config.common_config.monitor_server
    address = monitor.bind_address
    if monitor.enable_profiling:
        log.warning("monitorServer.enableProfiling: Go's /debug/pprof has no equivalent here")
    try:
        host, port = parse_bind_address(address)
        bound: int = await nursery.start(partial(serve_metrics, metrics, host, port, admin=admin))
    except (OSError, ValueError) as exc:
        log.warning("metrics server not started on %s: %s", address, exc)
        return 0
    return bound


def _announce(data_dir: Path, config: Config, port: int, identity: HubIdentity) -> list[Path]:
    """Write the admin file `trio-cloudhub get` finds this hub by; [] when it could not."""
    host, _ = parse_bind_address(config.common_config.monitor_server.bind_address)
    remove_stale_admin_files(data_dir)
    path = admin_file(data_dir, port)
    written = write_admin_file(path, identity, {"url": admin_url(host, port)})
    return [path] if written else []


async def _start_uds(nursery: trio.Nursery, hub: Hub, config: Config) -> None:
    """The CSI driver's socket; the hub serves edges without it when it cannot be made
    (e.g. /var/lib/kubeedge is not writable for a non-root hub)."""
    address = config.cloud_hub.unixsocket.address
    try:
        await nursery.start(serve_uds, hub.request_volume, address)
    except UdsSocketError as exc:
        log.warning("unix socket server not started: %s", exc)


async def _serve_quic_edges(
    hub: Hub,
    credentials: HubCredentials,
    config: Config,
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    try:
        from trio_cloudhub.edge.quic import QuicServerSettings, serve_quic
    except ImportError as exc:
        raise ConfigError(
            f"quic.enable needs the quic extra (pip install 'trio-cloudhub[quic]'): {exc}"
        ) from None
    quic = config.cloud_hub.quic
    settings = QuicServerSettings(
        certificate_pem=credentials.server_cert_pem,
        private_key_pem=credentials.server_key_pem,
        ca_der=credentials.ca_der,
        max_incoming_streams=quic.max_incoming_streams,
        max_payload=min(config.trio_cloud_hub.max_message_size, QUIC_MAX_PAYLOAD),
    )
    await serve_quic(
        partial(hub.handle_connection, transport="quic"),
        settings,
        host=quic.address,
        port=quic.port,
        authenticate=hub.authenticate,
        on_handshake_failure=partial(hub.handshake_failed, "quic"),
        task_status=task_status,
    )


def _warn_unimplemented(config: Config) -> None:
    hub = config.cloud_hub
    if not hub.websocket.enable:
        log.warning("websocket.enable is false: no edge can connect")
