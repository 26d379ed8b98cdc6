"""The `authenticate` hook of the WSS server on real TLS: CN system:node:<node_id> or 403."""

from __future__ import annotations

import logging
import ssl
from functools import partial

import pytest
import trio
import trio.testing
from certs import Pki, issue_client_cert
from cryptography.hazmat.primitives import serialization

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.edge.base import EdgeConnection
from trio_cloudhub.edge.websocket import (
    Authenticate,
    HandshakeRejected,
    WebSocketConnection,
    connect_websocket,
    serve_websocket,
)
from trio_cloudhub.pki.identity import connection_identity_problem

EDGE_HEADERS = [("Node_id", "edge-1"), ("Project_id", "proj-1"), ("Connectionuse", "msg")]
LOGGER = "trio_cloudhub.edge.websocket"


class Recorder:
    """Echoes messages; remembers the node of every connection the handler ran for."""

    def __init__(self) -> None:
        self.nodes: list[str] = []

    async def __call__(self, connection: EdgeConnection) -> None:
        self.nodes.append(connection.node_id)
        while True:
            message = await connection.receive()
            await connection.send(message if isinstance(message, str) else message.decode())


async def start_server(
    nursery: trio.Nursery,
    handler: Recorder,
    context: ssl.SSLContext,
    authenticate: Authenticate | None,
) -> int:
    serve = partial(
        serve_websocket,
        handler,
        ssl_context=context,
        host="127.0.0.1",
        port=0,
        max_message_size=1 << 20,
        handshake_timeout=5.0,
        authenticate=authenticate,
    )
    port: int = await nursery.start(serve)
    return port


async def dial(port: int, context: ssl.SSLContext) -> WebSocketConnection:
    path = f"/{DEFAULT_PROJECT_ID}/edge-1/events"
    return await connect_websocket(
        "127.0.0.1", port, ssl_context=context, path=path, headers=EDGE_HEADERS
    )


async def echo_once(client: WebSocketConnection) -> None:
    await client.send('{"a":1}\n')
    assert await client.receive() == '{"a":1}\n'
    await client.aclose()


async def test_matching_certificate_is_accepted(nursery: trio.Nursery, pki: Pki) -> None:
    with trio.fail_after(10):
        recorder = Recorder()
        port = await start_server(
            nursery, recorder, pki.server_context(), connection_identity_problem
        )
        await echo_once(await dial(port, pki.client_context()))
        assert recorder.nodes == ["edge-1"]


async def test_certificate_of_another_node_is_refused_with_403(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        recorder = Recorder()
        port = await start_server(
            nursery, recorder, pki.server_context(), connection_identity_problem
        )
        other = pki.client_context(issue_client_cert(pki.ca, "edge-2"))
        with (
            caplog.at_level(logging.WARNING, logger=LOGGER),
            pytest.raises(HandshakeRejected) as refused,
        ):
            await dial(port, other)
        assert (refused.value.status, refused.value.reason) == (403, "Forbidden")
        (record,) = [r for r in caplog.records if r.name == LOGGER]
        assert record.levelno == logging.WARNING
        message = record.getMessage()
        assert message.startswith("refused node edge-1 from 127.0.0.1:")
        assert message.endswith(": certificate CN 'system:node:edge-2' is not 'system:node:edge-1'")
        # The server keeps serving, and only the accepted connection reached the handler.
        await echo_once(await dial(port, pki.client_context()))
        assert recorder.nodes == ["edge-1"]


async def test_without_authenticate_any_node_certificate_is_accepted(
    nursery: trio.Nursery, pki: Pki
) -> None:
    # KubeEdge's default (authorization off): the certificate only proves fleet membership.
    with trio.fail_after(10):
        recorder = Recorder()
        port = await start_server(nursery, recorder, pki.server_context(), None)
        other = pki.client_context(issue_client_cert(pki.ca, "edge-2"))
        await echo_once(await dial(port, other))
        assert recorder.nodes == ["edge-1"]


async def test_authenticate_gets_the_header_node_and_the_presented_der(
    nursery: trio.Nursery, pki: Pki
) -> None:
    with trio.fail_after(10):
        calls: list[tuple[str, bytes | None]] = []

        def remember(node_id: str, der: bytes | None) -> str | None:
            calls.append((node_id, der))
            return None

        port = await start_server(nursery, Recorder(), pki.server_context(), remember)
        await echo_once(await dial(port, pki.client_context()))
        assert calls == [("edge-1", pki.client.cert.public_bytes(serialization.Encoding.DER))]


async def test_no_certificate_on_an_optional_port_is_refused(
    nursery: trio.Nursery, pki: Pki
) -> None:
    # With client certificates optional (like port 10002) the hook sees None.
    with trio.fail_after(10):
        context = pki.server_context()
        context.verify_mode = ssl.CERT_OPTIONAL
        recorder = Recorder()
        port = await start_server(nursery, recorder, context, connection_identity_problem)
        anonymous = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
        with pytest.raises(HandshakeRejected) as refused:
            await dial(port, anonymous)
        assert refused.value.status == 403
        assert recorder.nodes == []


async def test_the_callback_verdict_refuses_even_a_matching_certificate(
    nursery: trio.Nursery, pki: Pki
) -> None:
    with trio.fail_after(10):
        recorder = Recorder()
        port = await start_server(
            nursery, recorder, pki.server_context(), lambda node_id, der: "no"
        )
        with pytest.raises(HandshakeRejected):
            await dial(port, pki.client_context())
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.nodes == []
