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
from functools import partial

import trio

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.quic import (
    ClientConfiguration,
    connect_quic,
    quic_client_configuration,
    quic_runtime,
)
from trio_cloudhub.testing.edge_sim import EdgeIdentity, Fleet, SimEdge, run_fleet
from trio_cloudhub.testing.edge_storage import V1_23, MetaStore


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
    storage: MetaStore | None = None,
) -> AsyncIterator[SimEdge]:
    """A connected QUIC edge running for the duration of the block."""
    configuration = await trio.to_thread.run_sync(
        partial(
            quic_client_configuration,
            host,
            ca_pem=identity.ca_pem,
            cert_pem=identity.cert_pem,
            key_pem=identity.key_pem,
        )
    )
    async with quic_runtime(), trio.open_nursery() as nursery:
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
            storage=storage,
        )
        try:
            yield edge
        finally:
            nursery.cancel_scope.cancel()


async def start_sim_quic_edge(
    nursery: trio.Nursery,
    host: str,
    port: int,
    configuration: ClientConfiguration,
    node_id: str,
    project_id: str = DEFAULT_PROJECT_ID,
    *,
    auto_ack: bool = True,
    keepalive_interval: float = 15.0,
    connect_timeout: float = 10.0,
    storage: MetaStore | None = None,
) -> SimEdge:
    """Connect one QUIC edge and run it in `nursery` (inside a trio-asyncio loop); its
    connection is closed when the task ends. Connection failures are raised here."""

    async def run(*, task_status: trio.TaskStatus[SimEdge]) -> None:
        async with connect_quic(
            host,
            port,
            configuration,
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
                storage=storage,
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
    edgecore: str = V1_23,
) -> AsyncIterator[Fleet]:
    """`edge_sim.open_fleet` over QUIC: `count` edges named `<prefix><start>`… with one
    shared identity, at most `concurrency` handshakes in flight, all in one trio-asyncio
    loop; failures are recorded in `fleet.failures`, not raised."""
    configuration = await trio.to_thread.run_sync(
        partial(
            quic_client_configuration,
            host,
            ca_pem=identity.ca_pem,
            cert_pem=identity.cert_pem,
            key_pem=identity.key_pem,
        )
    )

    async def start_one(nursery: trio.Nursery, node_id: str) -> SimEdge:
        return await start_sim_quic_edge(
            nursery,
            host,
            port,
            configuration,
            node_id,
            project_id,
            auto_ack=auto_ack,
            keepalive_interval=keepalive_interval,
            connect_timeout=connect_timeout,
            storage=MetaStore(edgecore),
        )

    names = [f"{prefix}{index}" for index in range(start, start + count)]
    async with quic_runtime(), run_fleet(names, start_one, concurrency) as fleet:
        yield fleet
