"""The HTTPS certificate service on port 10002: a minimal HTTP/1.1 server (h11 over TLS).

Why not an ASGI server such as hypercorn: `/edge.crt` must see the TLS client certificate (a
rotating edge authenticates with it instead of a token, spec 7.5) and must *not* have it
verified by TLS (a foreign certificate gets HTTP 401, as Go's `RequestClientCert`): the TLS
layer is our own (`tls.OpenSSLStream`, pyOpenSSL). The endpoints are a few small GETs, so h11
over that stream is little code, and every limit is ours to set.
"""

from __future__ import annotations

import contextlib
import http
import logging
import socket
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import NoReturn

import h11
import trio
from OpenSSL import SSL

from trio_cloudhub.config import Config
from trio_cloudhub.http.certs_store import HubCredentials, utc_now
from trio_cloudhub.http.probes import serve_probes
from trio_cloudhub.http.routes import (
    CertificateService,
    NodeDirectory,
    Request,
    Response,
    text,
)
from trio_cloudhub.http.tls import EagerSocketStream, OpenSSLStream
from trio_cloudhub.listen import open_tcp_listeners
from trio_cloudhub.netlimits import (
    HandshakeTurns,
    Waiting,
    accept_forever,
    listening_socket,
    peer_host,
)
from trio_cloudhub.pki.token import TokenKeeper

logger = logging.getLogger("trio_cloudhub.http")

MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
RECEIVE_BYTES = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
# Whole-request bound (headers and body), also the idle limit of a kept-alive connection.
REQUEST_TIMEOUT = 30.0
CLOSE_TIMEOUT = 2.0
# Connections waiting for their peer (handshake, a request) share the bounds of `netlimits`:
# deadlines that shrink with the crowd, the oldest closed past a total and a per-source cap.

# Bodies read at once (each up to MAX_BODY_BYTES): bounds memory; bodiless requests never wait.
MAX_BODIES = 64

TLSStream = OpenSSLStream


class _BodyTooLarge(Exception):
    pass


async def serve_https(
    credentials: HubCredentials,
    tokens: TokenKeeper,
    config: Config,
    *,
    ready_check: Callable[[], bool] | None = None,
    nodes: NodeDirectory | None = None,
    clock: Callable[[], datetime] = utc_now,
    reuse_port: bool = False,
    on_closed: Callable[[], None] = lambda: None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `/ca.crt`, `/edge.crt`, `/readyz`, `/livez` (and `/node/{name}` when `nodes`
    is given) until cancelled. `on_closed()` after each connection is closed.

    `task_status.started(port)` reports the bound port once the socket listens (port 0 in
    the configuration picks a free one).
    """
    hub = config.cloud_hub
    service = CertificateService(
        credentials.ca,
        tokens,
        hub.edge_cert_signing_duration,
        clock=clock,
        ready_check=ready_check,
        nodes=nodes,
    )
    tls_context = credentials.https_tls_context()
    listeners = await open_tcp_listeners(
        hub.https.port, hub.https.address or None, reuse_port=reuse_port
    )
    port = int(listeners[0].socket.getsockname()[1])
    logger.info("HTTPS certificate service listening on %s:%d", hub.https.address, port)
    turns = HandshakeTurns()
    bodies = trio.CapacityLimiter(MAX_BODIES)
    handler = partial(
        _handle_socket, service, Waiting("HTTPS"), turns, bodies, tls_context, on_closed
    )
    async with trio.open_nursery() as nursery:
        probes = config.trio_cloud_hub.probe_bind_address
        if probes:
            await nursery.start(partial(serve_probes, probes, ready_check, reuse_port=reuse_port))
        nursery.start_soon(turns.run)
        for listener in listeners:
            nursery.start_soon(accept_forever, listening_socket(listener), nursery, handler, turns)
        task_status.started(port)
    raise AssertionError("the accept loops returned")  # pragma: no cover


async def _handle_socket(
    service: CertificateService,
    waiting: Waiting,
    turns: HandshakeTurns,
    bodies: trio.CapacityLimiter,
    tls_context: SSL.Context,
    on_closed: Callable[[], None],
    sock: socket.socket,
) -> None:
    try:
        await _handle_connection(
            service, waiting, bodies, tls_context, EagerSocketStream(sock), turns
        )
    finally:
        on_closed()


async def _handle_connection(
    service: CertificateService,
    waiting: Waiting,
    bodies: trio.CapacityLimiter,
    tls_context: SSL.Context,
    tcp: EagerSocketStream,
    turns: HandshakeTurns | None = None,
) -> None:
    """One TLS connection: handshake, then requests until close, error or timeout."""
    stream = OpenSSLStream(tcp, tls_context)
    source = _source(tcp)
    turn = partial(turns.turn, source) if turns is not None else None
    try:
        with waiting.wait(source, HANDSHAKE_TIMEOUT) as scope:
            await stream.do_handshake(turn)
        if scope.cancelled_caught:
            return
        peer_cert = stream.peer_certificate_der()
        vouch = partial(turns.vouch, source) if turns is not None else _nobody
        await _serve_requests(service, stream, peer_cert, waiting, bodies, source, vouch)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # The peer's problem (failed handshake, reset): nothing to answer.
        logger.debug("HTTPS connection ended: %r", exc)
    except Exception:
        # Our bug on one connection must not end the server (and the hub with it).
        logger.exception("HTTPS connection failed")
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await stream.aclose()


def _nobody() -> None:
    pass


def _source(tcp: EagerSocketStream) -> str:
    try:
        return peer_host(tcp.socket.getpeername())
    except OSError:
        return ""


async def _serve_requests(
    service: CertificateService,
    stream: TLSStream,
    peer_cert: bytes | None,
    waiting: Waiting,
    bodies: trio.CapacityLimiter,
    source: str,
    vouch: Callable[[], None],
) -> None:
    """`vouch()` after each request answered without error: the source's next handshakes
    go first (`netlimits.HandshakeTurns`)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    while True:
        request: Request | None = None
        try:
            with waiting.wait(source, REQUEST_TIMEOUT):
                request = await _read_request(conn, stream, peer_cert, bodies)
        except h11.RemoteProtocolError as exc:
            await _send_error(conn, stream, exc.error_status_hint, f"bad request: {exc}")
            return
        except _BodyTooLarge:
            message = f"request body larger than {MAX_BODY_BYTES} bytes"
            await _send_error(conn, stream, 413, message)
            return
        if request is None:
            return
        response = await _answer(service, request)
        await _send(conn, stream, response, head=request.method == "HEAD")
        if response.status < 400:
            vouch()
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _answer(service: CertificateService, request: Request) -> Response:
    try:
        return await service.handle(request)
    except Exception:
        # Our bug, not the edge's: answer 500 and keep serving everyone else.
        logger.exception("internal error answering %s %s", request.method, request.path)
        return text(500, "internal server error")


async def _next_event(conn: h11.Connection, stream: TLSStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            assert not isinstance(event, type)  # PAUSED cannot happen: we never pipeline
            return event
        conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))


async def _read_request(
    conn: h11.Connection,
    stream: TLSStream,
    peer_cert: bytes | None,
    bodies: trio.CapacityLimiter,
) -> Request | None:
    """The next request with its whole body, or None when the client closed."""
    event = await _next_event(conn, stream)
    if not isinstance(event, h11.Request):
        return None
    headers = tuple(
        (name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in event.headers
    )
    declared = next((value for name, value in headers if name == "content-length"), None)
    if declared is not None and int(declared) > MAX_BODY_BYTES:
        raise _BodyTooLarge
    if declared == "0" or (declared is None and not _chunked(headers)):
        body = await _read_body(conn, stream)  # no body: never waits for a body slot
    else:
        async with bodies:
            body = await _read_body(conn, stream)
    target = event.target.decode("latin-1")
    return Request(
        method=event.method.decode("latin-1"),
        path=target.partition("?")[0],
        headers=headers,
        body=body,
        peer_cert=peer_cert,
    )


def _chunked(headers: tuple[tuple[str, str], ...]) -> bool:
    return any(name == "transfer-encoding" for name, _ in headers)


async def _read_body(conn: h11.Connection, stream: TLSStream) -> bytes:
    body = bytearray()
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _BodyTooLarge
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise h11.RemoteProtocolError("connection closed inside the request body")


async def _send(
    conn: h11.Connection,
    stream: TLSStream,
    response: Response,
    *,
    close: bool = False,
    head: bool = False,
) -> None:
    """`head`: the answer to a HEAD request, which has the headers but never a body."""
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *response.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    reason = http.HTTPStatus(response.status).phrase
    # One write, so one TLS record and one `send` (the answers are small).
    parts = [conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))]
    if not head:
        parts.append(conn.send(h11.Data(data=response.body)))
    parts.append(conn.send(h11.EndOfMessage()))
    await stream.send_all(b"".join(part for part in parts if part))


async def _send_error(conn: h11.Connection, stream: TLSStream, status: int, message: str) -> None:
    """Answer a request we could not read, when HTTP still allows an answer."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    logger.info("HTTPS request refused with %d: %s", status, message)
    with contextlib.suppress(h11.LocalProtocolError):
        await _send(conn, stream, text(status, message), close=True)
