"""The QUIC transport alone: an echo handler behind `serve_quic`, real aioquic on loopback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from certs import Pki, issue_client_cert, make_ca
from cryptography.hazmat.primitives import serialization

from trio_cloudhub.core.codec import decode, encode
from trio_cloudhub.core.message import new_message
from trio_cloudhub.core.quic_codec import USE_MESSAGE, pack
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.edge.quic import (
    QuicHeaderRefused,
    QuicServerSettings,
    open_quic_client,
    serve_quic,
)


def settings(pki: Pki, **overrides: Any) -> QuicServerSettings:
    ca_der = pki.ca.cert.public_bytes(serialization.Encoding.DER)
    return QuicServerSettings(
        certificate_pem=pki.server.cert_pem,
        private_key_pem=pki.server.key_pem,
        ca_der=ca_der,
        **overrides,
    )


class Echo:
    """Sends every message back; remembers who connected."""

    def __init__(self) -> None:
        self.identities: list[tuple[str, str]] = []

    async def __call__(self, connection: EdgeConnection) -> None:
        self.identities.append((connection.node_id, connection.project_id))
        try:
            while True:
                await connection.send(str(await connection.receive()))
        except EdgeDisconnected:
            pass


@asynccontextmanager
async def echo_server(pki: Pki, **overrides: Any) -> AsyncIterator[tuple[int, Echo]]:
    echo = Echo()
    authenticate = overrides.pop("authenticate", None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_quic(
                echo,
                settings(pki, **overrides),
                host="127.0.0.1",
                port=0,
                authenticate=authenticate,
                task_status=task_status,
            )
        )
        yield port, echo
        nursery.cancel_scope.cancel()


def client(pki: Pki, port: int, **kwargs: Any) -> Any:
    cert = kwargs.pop("cert", pki.client)
    return open_quic_client(
        "127.0.0.1",
        port,
        ca_pem=pki.ca.cert_pem,
        cert_pem=cert.cert_pem,
        key_pem=cert.key_pem,
        node_id=kwargs.pop("node_id", "edge-1"),
        project_id="proj",
        **kwargs,
    )


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


async def test_messages_go_both_ways_after_the_header(pki: Pki) -> None:
    with trio.fail_after(20):
        async with echo_server(pki) as (port, echo), client(pki, port) as connection:
            message = new_message(
                source="edged",
                group="meta",
                operation="update",
                resource="default/podstatus/p",
                content={"phase": "Running"},
                now_ms=1,
            )
            await connection.send(encode(message))
            back = decode(await connection.receive())
            assert back.content == {"phase": "Running"}
            assert back.header.msg_id == message.header.msg_id
            assert echo.identities == [("edge-1", "proj")]


async def test_a_client_that_never_sends_the_header_is_closed(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(20), caplog.at_level(logging.WARNING):
        async with (
            echo_server(pki, header_timeout=0.5) as (port, echo),
            client(pki, port, send_header=False) as connection,
        ):
            with trio.fail_after(5):
                with pytest.raises(EdgeDisconnected):
                    await connection.receive()
            assert echo.identities == []
    assert "no header message on the control stream" in caplog.text


async def test_a_bad_header_is_answered_nack_and_closed(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(20), caplog.at_level(logging.WARNING):
        async with (
            echo_server(pki) as (port, echo),
            client(pki, port, send_header=False) as connection,
        ):
            bad = new_message(
                source="",
                group="",
                operation="header",
                resource="header",
                content="not json",
                now_ms=0,
            )
            await connection.send_raw(0, pack(bad))
            connection.streams.expect_messages(0, control=True)
            with trio.fail_after(5):
                with pytest.raises(EdgeDisconnected):
                    await connection.receive()
            assert connection.header_answer == "nack"
            assert echo.identities == []
    assert "bad header" in caplog.text


async def test_the_identity_check_applies_to_quic_too(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    def only_edge_2(node_id: str, der: bytes | None) -> str | None:
        assert der  # the client certificate reaches the check
        return None if node_id == "edge-2" else f"certificate does not name {node_id}"

    with trio.fail_after(20), caplog.at_level(logging.WARNING):
        async with echo_server(pki, authenticate=only_edge_2) as (port, echo):
            with pytest.raises(BaseException) as refused:
                async with client(pki, port, node_id="edge-1"):
                    pass
            assert any(isinstance(leaf, QuicHeaderRefused) for leaf in leaves(refused.value))
            assert "certificate does not name edge-1" in caplog.text
            async with client(pki, port, node_id="edge-2"):
                pass
            assert [node for node, _ in echo.identities] == ["edge-2"]


async def test_a_certificate_of_another_ca_is_refused(pki: Pki) -> None:
    stranger = issue_client_cert(make_ca("Other"), "edge-1")
    with trio.fail_after(20):
        async with echo_server(pki) as (port, echo):
            with pytest.raises(BaseException) as refused:
                async with client(pki, port, cert=stranger):
                    pass
            assert any("not signed by the hub CA" in str(leaf) for leaf in leaves(refused.value))
            assert echo.identities == []


async def test_max_incoming_streams_is_the_clients_stream_limit(pki: Pki) -> None:
    with trio.fail_after(20):
        async with (
            echo_server(pki, max_incoming_streams=3) as (port, _),
            client(pki, port) as connection,
        ):
            for number in range(4):  # control stream + 2 may be open; 2 of these wait
                message = new_message(
                    source="edged",
                    group="meta",
                    operation="update",
                    resource=f"default/podstatus/p{number}",
                    content=None,
                    now_ms=0,
                )
                await connection.send_raw(None, USE_MESSAGE + pack(message))
            echoed = []
            with trio.move_on_after(1.0):
                while True:
                    echoed.append(decode(await connection.receive()).route.resource)
            assert sorted(echoed) == ["default/podstatus/p0", "default/podstatus/p1"]
