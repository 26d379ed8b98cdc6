"""nodeLimit over real TLS: the extra node is told why in a close frame; the others stay."""

from __future__ import annotations

from pathlib import Path

import trio

from trio_cloudhub.testing.edge_sim import bootstrap, open_sim_edge
from trio_cloudhub.testing.hub_process import HOST, hub_process


async def test_the_node_beyond_the_limit_gets_a_close_frame_with_the_reason(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with hub_process(tmp_path, cloud_hub={"nodeLimit": 1}) as hub:
            token = await hub.token()
            identity = await bootstrap(HOST, hub.https_port, token, "edge-1")
            port = hub.websocket_port
            async with open_sim_edge(HOST, port, identity, "edge-1") as first:
                async with open_sim_edge(HOST, port, identity, "edge-2") as extra:
                    reason = await extra.wait_disconnected()
                    assert "node limit: 1 nodes connected" in reason
                await hub.wait_for_log("refused node edge-2", 10)
                # A reconnect of the connected node does not count twice.
                async with open_sim_edge(HOST, port, identity, "edge-1") as again:
                    await first.wait_disconnected()
                    await trio.sleep(0.5)
                    assert again.connected
