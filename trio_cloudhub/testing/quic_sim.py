"""Simulated EdgeCores over the QUIC transport: the same `SimEdge`, another connection.

    async with open_sim_quic_edge("127.0.0.1", quic_port, identity, "edge-1") as edge:
        pod = await edge.expect(lambda m: m.resource == "default/pod/web")

    async with open_quic_fleet("127.0.0.1", quic_port, identity, 300) as fleet:
        ...  # `fleet.edges`, as `edge_sim.open_fleet` gives

The edge opens the control stream with the header message, waits for `ack`, then sends on
a `msg` stream of its own and reads every stream the hub opens; it keeps alive and ACKs as the
WebSocket simulator does. Needs the `quic` extra (aioquic, trio-asyncio, protobuf).

`open_sim_quic_edge` opens an asyncio loop (trio-asyncio) of its own, as `open_quic_client`
does. A fleet opens one loop for all its edges and one client `QuicConfiguration` (the
certificate chain is loaded once): each edge is then one UDP socket, one aioquic connection
and one trio task, inside that loop (`start_sim_quic_edge`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio_asyncio
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.quic import (
    ALPN,
    QuicClientConnection,
    _ClientProtocol,
    _pem_files,
    open_quic_client,
)
from trio_cloudhub.testing.edge_sim import EdgeIdentity, Fleet, SimEdge


@asynccontextmanager
async def open_sim_quic_edge(
    host: str,
    port: int,
    identity: EdgeIdentity,
    node_id: str,
    project_id: str = DEFAULT_PROJECT_ID,
    *,
    auto_ack: bool = True,
    keepalive_interval: float = 15.0,
    connect_timeout: float = 10.0,
) -> AsyncIterator[SimEdge]:
    """A connected QUIC edge running for the duration of the block."""
    async with open_quic_client(
        host,
        port,
        ca_pem=identity.ca_pem,
        cert_pem=identity.cert_pem,
        key_pem=identity.key_pem,
        node_id=node_id,
        project_id=project_id,
        connect_timeout=connect_timeout,
    ) as connection:
        edge = SimEdge(
            connection,
            node_id,
            project_id,
            auto_ack=auto_ack,
            keepalive_interval=keepalive_interval,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(edge.run)
            try:
                yield edge
            finally:
                nursery.cancel_scope.cancel()


def client_configuration(identity: EdgeIdentity, host: str) -> QuicConfiguration:
    """One client configuration for many connections (what `open_quic_client` builds each
    time): the hub's CA, the edge's certificate and key, ALPN `kubeedge`."""
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], cadata=identity.ca_pem, server_name=host
    )
    with _pem_files(identity.cert_pem, identity.key_pem) as (cert, key):
        configuration.load_cert_chain(cert, key)
    return configuration


@asynccontextmanager
async def connect_quic_in_loop(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    node_id: str,
    project_id: str = DEFAULT_PROJECT_ID,
    *,
    connect_timeout: float = 10.0,
) -> AsyncIterator[QuicClientConnection]:
    """`open_quic_client` without a loop of its own: the caller runs inside
    `trio_asyncio.open_loop()`. Connected and identified (header answered `ack`).

    The header is written at once and leaves with the first 1-RTT packet: its answer is the
    wait for the handshake too (a TLS failure ends it as `QuicHeaderRefused`). aioquic's own
    wait (`wait_connected`) is not used: cancelled by a timeout, it leaves a future that gets
    `ConnectionError` later, which nobody retrieves, and trio-asyncio raises such errors into
    the loop's nursery, ending every other edge of the loop too."""
    with trio.fail_after(connect_timeout):
        manager = connect(
            host,
            port,
            configuration=configuration,
            create_protocol=_ClientProtocol,
            wait_connected=False,
        )
        protocol = await trio_asyncio.aio_as_trio(manager.__aenter__)()
    client: QuicClientConnection = protocol.client
    try:
        with trio.fail_after(connect_timeout):
            await client.handshake(node_id, project_id)
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await client.abort()
            await trio_asyncio.aio_as_trio(manager.__aexit__)(None, None, None)


async def start_sim_quic_edge(
    nursery: trio.Nursery,
    host: str,
    port: int,
    configuration: QuicConfiguration,
    node_id: str,
    project_id: str = DEFAULT_PROJECT_ID,
    *,
    auto_ack: bool = True,
    keepalive_interval: float = 15.0,
    connect_timeout: float = 10.0,
) -> SimEdge:
    """Connect one QUIC edge and run it in `nursery` (inside a trio-asyncio loop); its
    connection is closed when the task ends. Connection failures are raised here."""

    async def run(*, task_status: trio.TaskStatus[SimEdge]) -> None:
        async with connect_quic_in_loop(
            host, port, configuration, node_id, project_id, connect_timeout=connect_timeout
        ) as connection:
            edge = SimEdge(
                connection,
                node_id,
                project_id,
                auto_ack=auto_ack,
                keepalive_interval=keepalive_interval,
            )
            task_status.started(edge)
            await edge.run()

    edge: SimEdge = await nursery.start(run)
    return edge


@asynccontextmanager
async def open_quic_fleet(
    host: str,
    port: int,
    identity: EdgeIdentity,
    count: int,
    *,
    prefix: str = "edge-",
    start: int = 0,
    project_id: str = DEFAULT_PROJECT_ID,
    concurrency: int = 50,
    auto_ack: bool = True,
    keepalive_interval: float = 15.0,
    connect_timeout: float = 30.0,
) -> AsyncIterator[Fleet]:
    """`edge_sim.open_fleet` over QUIC: `count` edges named `<prefix><start>`… with one
    shared identity, at most `concurrency` handshakes in flight, all in one trio-asyncio
    loop; failures are recorded in `fleet.failures`, not raised."""
    configuration = client_configuration(identity, host)
    fleet = Fleet()
    limiter = trio.CapacityLimiter(concurrency)

    async def connect_one(nursery: trio.Nursery, node_id: str) -> None:
        async with limiter:
            began = trio.current_time()
            try:
                edge = await start_sim_quic_edge(
                    nursery,
                    host,
                    port,
                    configuration,
                    node_id,
                    project_id,
                    auto_ack=auto_ack,
                    keepalive_interval=keepalive_interval,
                    connect_timeout=connect_timeout,
                )
            except Exception as exc:  # recorded; one edge's failure must not stop the fleet
                fleet.failures[node_id] = f"{type(exc).__name__}: {exc}"
                return
            fleet.connect_times.append(trio.current_time() - began)
            fleet.edges.append(edge)

    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        began = trio.current_time()
        async with trio.open_nursery() as connecting:
            for index in range(start, start + count):
                connecting.start_soon(connect_one, nursery, f"{prefix}{index}")
        fleet.connect_seconds = trio.current_time() - began
        try:
            yield fleet
        finally:
            nursery.cancel_scope.cancel()
