"""Issue 14, CI size: a mixed flood of idle and slow clients on both ports of a real
`trio-cloudhub serve`, from several 127.x sources, while a probe, a connected edge and a new
edge go about their business. Timing figures live in bench/flood.py; this asserts behaviour."""

from __future__ import annotations

import resource
from pathlib import Path

import trio

from trio_cloudhub.testing.edge_sim import bootstrap, https_get, start_sim_edge
from trio_cloudhub.testing.flood import (
    CONFIG_MAP,
    Flood,
    FloodTarget,
    holds_round,
    insecure_context,
    sources,
    until,
    write_delivery_manifests,
)
from trio_cloudhub.testing.hub_process import HOST, hub_process

PER_KIND = 50  # 7 kinds: 350 connections


def raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def test_probes_and_edges_get_through_a_mixed_flood(tmp_path: Path) -> None:
    raise_open_files(1000)
    with trio.fail_after(120):
        async with hub_process(tmp_path) as hub, trio.open_nursery() as nursery:
            token = await hub.token()
            old = await bootstrap(HOST, hub.https_port, token, "edge-old")
            write_delivery_manifests(hub.manifests, ["edge-old", "edge-new"], 1)
            connected = await start_sim_edge(
                nursery, HOST, hub.websocket_port, old, "edge-old", keepalive_interval=2
            )
            key = f"default/configmap/{CONFIG_MAP}"
            await connected.wait_holds(key, matching=holds_round(1), within=20)
            flooder = await bootstrap(HOST, hub.https_port, token, "flooder")

            target = FloodTarget(
                HOST, hub.https_port, hub.websocket_port, flooder.client_ssl_context()
            )
            flood = Flood(target)
            ws, https = hub.websocket_port, hub.https_port
            mix = [
                ("tcp", ws, PER_KIND),
                ("hello", ws, PER_KIND),
                ("ws-unfinished", ws, PER_KIND),
                ("tcp", https, PER_KIND),
                ("hello", https, PER_KIND),
                ("tls-idle", https, PER_KIND),
                ("slow-headers", https, PER_KIND),
            ]
            flood.plan(mix, sources(4, base="127.3"))
            nursery.start_soon(flood.run)
            await until(lambda: flood.open_now() >= 5 * PER_KIND, within=30)

            status, body = await https_get(HOST, hub.https_port, "/readyz", insecure_context())
            assert (status, body) == (200, b"ok")
            new = await bootstrap(HOST, hub.https_port, token, "edge-new")
            fresh = await start_sim_edge(nursery, HOST, hub.websocket_port, new, "edge-new")
            write_delivery_manifests(hub.manifests, ["edge-old", "edge-new"], 2)
            for edge in (connected, fresh):
                await edge.wait_holds(key, matching=holds_round(2), within=20)
            status, _ = await https_get(HOST, hub.https_port, "/readyz", insecure_context())
            assert status == 200

            # The hub's shortened deadlines close every flood connection; the edges stay.
            try:
                await until(lambda: flood.closed_by_hub() == len(flood.connections), within=60)
            except trio.TooSlowError:
                raise AssertionError(f"still open: {flood.by_kind()}") from None
            assert not flood.failures(), flood.failures()
            assert connected.connected and fresh.connected
            assert connected.keepalives_sent >= 2
            nursery.cancel_scope.cancel()
