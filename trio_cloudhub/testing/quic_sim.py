"""Simulated EdgeCores over the QUIC transport: the same `SimEdge`, another connection.

    async with open_sim_quic_edge("127.0.0.1", quic_port, identity, "edge-1") as edge:
        pod = await edge.expect(lambda m: m.resource == "default/pod/web")

The edge opens the control stream with the header message, waits for `ack`, then sends on
a `msg` stream of its own and reads every stream the hub opens; it keeps alive and ACKs as the
WebSocket simulator does. Needs the `quic` extra (aioquic, trio-asyncio, protobuf).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.quic import open_quic_client
from trio_cloudhub.testing.edge_sim import EdgeIdentity, SimEdge


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
