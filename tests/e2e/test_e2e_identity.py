"""`authorization.enable` end to end: real serve, real TLS, certificates from the hub."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from trio_cloudhub.core.message import new_message
from trio_cloudhub.testing.edge_sim import bootstrap, open_sim_edge
from trio_cloudhub.testing.hub_process import HOST, hub_process

ENFORCING = {"authorization": {"enable": True, "debug": False}}


def status_of(node: str) -> object:
    return new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=f"default/nodestatus/{node}",
        content={"UID": "u", "Status": {"conditions": []}, "ExtendResources": None},
        now_ms=0,
    )


async def test_a_certificate_connects_only_as_its_own_node(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with hub_process(tmp_path, cloud_hub=ENFORCING) as hub:
            token = await hub.token()
            identity = await bootstrap(HOST, hub.https_port, token, "edge-1")
            async with open_sim_edge(HOST, hub.websocket_port, identity, "edge-1") as edge:
                await edge.send_message(status_of("edge-1"))  # type: ignore[arg-type]
                await edge.expect(lambda m: m.content == "OK" and "nodestatus" in m.resource)
                await edge.send_message(status_of("edge-2"))  # type: ignore[arg-type]
                await hub.wait_for_log("rejected update default/nodestatus/edge-2", 10)
                assert edge.connected
            refusal: list[str] = []
            try:
                async with open_sim_edge(
                    HOST, hub.websocket_port, identity, "edge-2", connect_timeout=5
                ):
                    pass
            except* Exception as group:
                refusal = [str(exc) for exc in _leaves(group)]
            assert any("403" in text for text in refusal), refusal
            await hub.wait_for_log("refused node edge-2", 10)
            table = await hub.cli("get", "nodes")
            assert "edge-1" in table and "edge-2" not in table


async def test_without_authorization_any_node_name_connects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(60):
        async with hub_process(tmp_path) as hub:
            token = await hub.token()
            identity = await bootstrap(HOST, hub.https_port, token, "edge-1")
            async with open_sim_edge(HOST, hub.websocket_port, identity, "edge-2") as edge:
                await edge.send_message(status_of("edge-2"))  # type: ignore[arg-type]
                await edge.expect(lambda m: m.content == "OK" and "nodestatus" in m.resource)


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    found: list[Exception] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
