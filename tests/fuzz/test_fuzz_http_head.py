"""Found by the HTTP request fuzzer: a HEAD request made the certificate service write a body
h11 must refuse (LocalProtocolError), which escaped the connection handler and ended the HTTPS
server, and the hub with it. Real TLS on loopback."""

from __future__ import annotations

import trio

from tests.http.test_http_server import TIMEOUT, Hub, fetch, hub, raw_exchange

__all__ = ["hub"]  # the fixture, used below by name


async def test_a_head_request_gets_headers_only_and_the_server_lives_on(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        answer = await raw_exchange(
            hub, b"HEAD /readyz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405 ")
        assert b"Content-Length: 18" in head  # what a GET of the same answer would carry
        assert body == b""
        assert (await fetch(hub, "/livez")).status == 200
