"""An edge simulator that behaves on the wire like an unmodified KubeEdge EdgeCore (spec 10, 14).

- `bootstrap()` does EdgeCore's certificate bootstrap over HTTPS: `/ca.crt` checked against the
  join token, then a CSR signed through `/edge.crt`.
- `open_sim_edge()` connects one edge over WSS with EdgeCore's headers, sends a keepalive at
  once and then every `keepalive_interval`, records what the cloud sends and applies it to a
  model of EdgeCore's metaManager database (`edge_storage.MetaStore`, v1.10 or v1.23 rules),
  answering as that line does ("OK" ACKs, or nothing); `edge.storage` is what a real edge of
  that line would now hold. Pass the same store to every connection of one edge: a restarted
  EdgeCore keeps its database.
- `open_fleet()` runs many edges in one process; `python -m trio_cloudhub.testing.edge_sim fleet`
  does so from the command line and prints one JSON line of figures (used by `bench/`).

One task per edge: it reads with a deadline at the next keepalive, so an idle fleet of N edges
costs N sleeping tasks and N TLS connections, nothing more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import resource
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import attrs
import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trio_cloudhub.config import DEFAULT_PROJECT_ID
from trio_cloudhub.core.codec import CodecError, decode, encode
from trio_cloudhub.core.message import (
    GROUP_RESOURCE,
    OP_DELETE,
    OP_INSERT,
    OP_KEEPALIVE,
    OP_QUERY,
    OP_RESPONSE,
    OP_UPDATE,
    Header,
    Message,
    Route,
    new_message,
    response_to,
)
from trio_cloudhub.edge.base import EdgeDisconnected
from trio_cloudhub.edge.websocket import connect_websocket
from trio_cloudhub.testing.edge_storage import EDGECORE_LINES, V1_23, MetaStore

logger = logging.getLogger(__name__)

MAX_HTTP_BODY = 1024 * 1024
HTTP_TIMEOUT = 30.0
# Sources whose `update` EdgeCore's meta manager acknowledges (v1.23; v1.10 knows the first two).
UPDATE_ACK_SOURCES = frozenset(
    {"edgecontroller", "dynamiccontroller", "devicecontroller", "policycontroller"}
)
SHUTDOWN_FRAME = encode(Message(header=Header(msg_id="", timestamp=0), route=Route()))


class BootstrapError(Exception):
    """The certificate bootstrap failed (EdgeCore would exit)."""


class SimEdgeDisconnected(Exception):
    """The simulated edge's connection is over while a helper was still waiting on it."""


# --- bootstrap ------------------------------------------------------------------------------


@attrs.frozen
class EdgeIdentity:
    """What bootstrap leaves on an edge's disk: the CA, its client certificate and key (PEM)."""

    node_name: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def client_ssl_context(self) -> ssl.SSLContext:
        """Verifies the hub against the CA (IP SAN included) and presents our certificate."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        # ssl loads a key pair only from files.
        with tempfile.TemporaryDirectory() as folder:
            cert, key = Path(folder, "edge.crt"), Path(folder, "edge.key")
            cert.write_bytes(self.cert_pem)
            key.write_bytes(self.key_pem)
            context.load_cert_chain(cert, key)
        return context


def csr_subject(node_name: str, *, legacy_v110: bool = False) -> x509.Name:
    """EdgeCore's CSR subject, in Go's RDN order (C, ST, L, O, CN)."""
    common_name, organization = (
        ("kubeedge.io", "kubeEdge") if legacy_v110 else (f"system:node:{node_name}", "system:nodes")
    )
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Zhejiang"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Hangzhou"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


async def bootstrap(
    host: str, https_port: int, token: str, node_name: str, *, legacy_v110: bool = False
) -> EdgeIdentity:
    """EdgeCore's first start: fetch and pin the CA by the token, then get a signed client cert."""
    parts = token.strip().split(".")
    if len(parts) != 4:
        raise BootstrapError(f"token must have 4 dot-separated parts, it has {len(parts)}")
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    # EdgeCore ignores the status of /ca.crt and hashes whatever body came back.
    _, ca_der = await https_get(host, https_port, "/ca.crt", insecure)
    digest = hashlib.sha256(ca_der).hexdigest()
    if digest != parts[0]:
        raise BootstrapError(f"CA hash {digest} does not match the token's {parts[0]}")
    try:
        ca_pem = x509.load_der_x509_certificate(ca_der).public_bytes(serialization.Encoding.PEM)
    except ValueError as exc:
        raise BootstrapError(f"/ca.crt is not a DER certificate: {exc}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(csr_subject(node_name, legacy_v110=legacy_v110))
        .sign(key, hashes.SHA256())
    )
    verified = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    status, body = await https_get(
        host,
        https_port,
        "/edge.crt",
        verified,
        headers=[("Authorization", "Bearer " + ".".join(parts[1:])), ("NodeName", node_name)],
        body=csr.public_bytes(serialization.Encoding.DER),
        server_hostname=host,
    )
    if status != 200:
        text = body.decode("utf-8", "replace").strip()
        raise BootstrapError(f"/edge.crt answered {status}: {text}")
    try:
        cert = x509.load_der_x509_certificate(body)
    except ValueError as exc:
        raise BootstrapError(f"/edge.crt body is not a DER certificate: {exc}") from None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return EdgeIdentity(
        node_name=node_name,
        ca_pem=ca_pem,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key_pem,
    )


async def https_get(
    host: str,
    port: int,
    path: str,
    context: ssl.SSLContext,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    server_hostname: str | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET (with a body if given, as EdgeCore sends its CSR); (status, body)."""
    with trio.fail_after(HTTP_TIMEOUT):
        tcp = await trio.open_tcp_stream(host, port)
        stream = trio.SSLStream(tcp, context, server_hostname=server_hostname)
        try:
            return await _exchange(stream, host, port, path, headers, body)
        except trio.BrokenResourceError as exc:
            raise BootstrapError(
                f"GET {path}: TLS or connection failure: {exc.__cause__}"
            ) from None
        finally:
            await trio.aclose_forcefully(stream)


async def _exchange(
    stream: trio.SSLStream[trio.SocketStream],
    host: str,
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> tuple[int, bytes]:
    client = h11.Connection(h11.CLIENT)
    all_headers = [("Host", f"{host}:{port}"), ("User-Agent", "Go-http-client/1.1"), *headers]
    if body:
        all_headers.append(("Content-Length", str(len(body))))
    data = client.send(h11.Request(method="GET", target=path, headers=all_headers)) or b""
    if body:
        data += client.send(h11.Data(data=body)) or b""
    data += client.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    status, chunks, size = 0, [], 0
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise BootstrapError(f"GET {path}: bad HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some())  # type: ignore[arg-type]
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_HTTP_BODY:
                raise BootstrapError(f"GET {path}: response body above {MAX_HTTP_BODY} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, b"".join(chunks)


# --- one simulated edge ---------------------------------------------------------------------


@attrs.frozen(slots=True)
class Received:
    message: Message
    at: float  # trio.current_time() when it arrived


Predicate = Callable[[Message], bool]
IdentitySource = EdgeIdentity | ssl.SSLContext


def _now_ms() -> int:
    return int(time.time() * 1000)


def keepalive_message() -> Message:
    return new_message(
        source="websocket",
        group=GROUP_RESOURCE,
        operation=OP_KEEPALIVE,
        resource="node",
        content="ping",
        now_ms=_now_ms(),
    )


def needs_ack(message: Message, pending_queries: set[str]) -> bool:
    """EdgeCore's meta manager: which cloud messages it answers with an "OK" response."""
    route = message.route
    if route.group != GROUP_RESOURCE:
        return False
    if route.operation in (OP_INSERT, OP_DELETE):
        return True
    if route.operation == OP_UPDATE:
        return route.source in UPDATE_ACK_SOURCES
    # The answer to one of our own `query` messages is stored, then acknowledged.
    return route.operation == OP_RESPONSE and message.header.parent_msg_id in pending_queries


class EdgeTransport(Protocol):
    """What a simulated edge needs of its connection: a WebSocket or a QUIC client."""

    async def receive(self) -> str | bytes: ...

    async def send(self, text: str) -> None: ...

    async def abort(self) -> None: ...


class SimEdge:
    """One connected edge. Create it with `open_sim_edge` or `start_sim_edge`."""

    def __init__(
        self,
        connection: EdgeTransport,
        node_id: str,
        project_id: str,
        *,
        auto_ack: bool,
        keepalive_interval: float,
        storage: MetaStore | None = None,
    ) -> None:
        self.connection = connection
        self.storage = storage if storage is not None else MetaStore()
        self.node_id = node_id
        self.project_id = project_id
        self.auto_ack = auto_ack
        self.keepalive_interval = keepalive_interval
        self.received: list[Received] = []
        self.undecodable: list[str | bytes] = []
        self.acks_sent = 0
        self.keepalives_sent = 0
        self.close_reason: str | None = None
        self._pending_queries: set[str] = set()
        self._changed = trio.Event()
        # Called after each message is handled (ACK sent), e.g. by a benchmark recording
        # arrival and ACK times without a waiting task per edge.
        self.observer: Callable[[SimEdge, Received], None] | None = None

    @property
    def connected(self) -> bool:
        return self.close_reason is None

    async def run(self) -> None:
        """Receive, ACK and keep alive until the connection ends (never raises EdgeDisconnected)."""
        receive = self.connection.receive
        try:
            while True:
                await self.send_message(keepalive_message())
                self.keepalives_sent += 1
                # One deadline per keepalive period, not one per message: receive() is
                # cancel-safe, and so is sending an ACK (what is not out yet stays queued).
                with trio.move_on_after(self.keepalive_interval):
                    while True:
                        await self._handle(await receive())
        except EdgeDisconnected as exc:
            self.close_reason = str(exc) or "disconnected"
        finally:
            if self.close_reason is None:
                self.close_reason = "stopped"
            self._wake()

    async def _handle(self, frame: str | bytes) -> None:
        try:
            message = decode(frame)
        except CodecError:
            # EdgeCore closes the connection on a frame it cannot decode (spec 11 item 58).
            self.undecodable.append(frame)
            await self.connection.abort()
            raise EdgeDisconnected("undecodable frame from the cloud") from None
        received = Received(message, trio.current_time())
        self.received.append(received)
        self._wake()
        parent = message.header.parent_msg_id
        if parent in self._pending_queries:
            # metaManager's remote query: the answer is stored, then acknowledged.
            self._pending_queries.discard(parent)
            self.storage.store_answer(message.route.resource, message.content)
            reply: Message | None = response_to(message, "OK", _now_ms())
        else:
            reply = self.storage.handle(message, _now_ms())
        self._wake()  # the storage changed: wake `wait_holds`
        if self.auto_ack and reply is not None:
            if reply.route.operation == OP_RESPONSE:
                self.acks_sent += 1  # counted first: a deadline may end the send after it left
            await self.send_message(reply)
        if self.observer is not None:
            self.observer(self, received)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def send_message(self, message: Message) -> None:
        if message.route.operation == OP_QUERY:
            self._pending_queries.add(message.msg_id)
        await self.connection.send(encode(message))

    async def send_text(self, text: str) -> None:
        """A raw frame, e.g. something that is not a valid message."""
        await self.connection.send(text)

    async def send_shutdown(self) -> None:
        """What a v1.23 EdgeCore sends before it stops (spec 14)."""
        await self.connection.send(SHUTDOWN_FRAME)

    async def close_abruptly(self) -> None:
        """Close TCP under TLS without a close frame, as EdgeCore's gorilla `Close()` does."""
        await self.connection.abort()

    async def expect(self, predicate: Predicate, within: float = 10.0) -> Message:
        """The first received message (old or new) matching `predicate`."""
        checked = 0
        with trio.move_on_after(within):
            while True:
                for item in self.received[checked:]:
                    if predicate(item.message):
                        return item.message
                checked = len(self.received)
                if not self.connected:
                    raise SimEdgeDisconnected(f"{self.node_id}: {self.close_reason}")
                await self._changed.wait()
        raise TimeoutError(
            f"{self.node_id}: no matching message within {within} s; got {self._summary()}"
        )

    async def wait_for_messages(self, count: int, within: float = 10.0) -> list[Message]:
        """Wait until at least `count` messages arrived in total; returns them all."""
        with trio.move_on_after(within):
            while len(self.received) < count:
                if not self.connected:
                    raise SimEdgeDisconnected(f"{self.node_id}: {self.close_reason}")
                await self._changed.wait()
            return [item.message for item in self.received]
        raise TimeoutError(f"{self.node_id}: {len(self.received)} of {count} messages")

    async def wait_holds(
        self,
        resource: str,
        resource_version: str | None = None,
        *,
        matching: Callable[[Any], bool] | None = None,
        within: float = 10.0,
    ) -> Any:
        """Until the edge's database (`storage`) holds `resource` — the key EdgeCore stores it
        under: `<namespace>/<type>/<name>` such as `default/configmap/web`, `null/node/<n>`
        for its Node — at `resource_version` or newer when given, with content `matching`
        accepts when given. Returns the stored content. TimeoutError saying what it holds
        instead after `within` seconds; SimEdgeDisconnected when the connection ends first."""

        def holds() -> bool:
            return self._holds(resource, resource_version, matching)

        await self._wait_storage(holds, within, lambda: f"hold {resource}")
        return self.storage.get(resource)

    async def wait_gone(self, resource: str, within: float = 10.0) -> None:
        """Until the edge's database no longer holds `resource` (see `wait_holds`)."""
        await self._wait_storage(
            lambda: self.storage.get(resource) is None, within, lambda: f"drop {resource}"
        )

    def _holds(
        self, resource: str, version: str | None, matching: Callable[[Any], bool] | None
    ) -> bool:
        content = self.storage.get(resource)
        if content is None:
            return False
        if version is not None and not _at_least(self.storage.resource_version(resource), version):
            return False
        return matching is None or bool(matching(content))

    async def _wait_storage(
        self, done: Callable[[], bool], within: float, what: Callable[[], str]
    ) -> None:
        with trio.move_on_after(within):
            while not done():
                if not self.connected:
                    raise SimEdgeDisconnected(
                        f"{self.node_id}: {self.close_reason} before it would {what()}"
                    )
                await self._changed.wait()
            return
        held = ", ".join(f"{key}@{rv or '-'}" for key, rv in self.storage.versions().items())
        raise TimeoutError(
            f"{self.node_id} did not {what()} within {within} s; it holds: {held or 'nothing'}"
        )

    async def wait_disconnected(self, within: float = 10.0) -> str:
        with trio.fail_after(within):
            while self.connected:
                await self._changed.wait()
        return self.close_reason or ""

    async def query_application(self, key: str, verb: str = "get", within: float = 10.0) -> Message:
        """A metaServer request (v1.23 Application form, spec 15); returns the answer."""
        content: dict[str, Any] = {
            "ID": hashlib.sha256(f"{self.node_id}{key}{verb}{time.time_ns()}".encode()).hexdigest(),
            "Key": key,
            "Verb": verb,
            "Nodename": self.node_id,
            "Option": "e30=",
            "ReqBody": None,
            "Subresource": "",
            "RespBody": None,
            "Status": "InApplying",
            "Reason": "",
            "Error": {"ErrStatus": {"metadata": {}}},
            "Timestamp": "0001-01-01T00:00:00Z",
        }
        request = new_message(
            source="metaserver",
            group="dynamiccontroller",
            operation="null",
            resource="null",
            content=content,
            now_ms=_now_ms(),
        )
        await self.send_message(request)
        return await self.expect(lambda m: m.header.parent_msg_id == request.msg_id, within)

    def messages(self) -> list[Message]:
        return [item.message for item in self.received]

    def _summary(self) -> str:
        return ", ".join(f"{m.operation} {m.resource}" for m in self.messages()[-10:]) or "nothing"


def _at_least(held: str | None, wanted: str) -> bool:
    """resourceVersions compare as numbers when both are (KubeEdge's are), else exactly."""
    if held is None:
        return False
    if held.isdigit() and wanted.isdigit():
        return int(held) >= int(wanted)
    return held == wanted


def edge_headers(node_id: str, project_id: str) -> list[tuple[str, str]]:
    """EdgeCore's handshake headers, in Go's canonical case."""
    return [("Connectionuse", "msg"), ("Node_id", node_id), ("Project_id", project_id)]


async def start_sim_edge(
    nursery: trio.Nursery,
    host: str,
    port: int,
    identity: IdentitySource,
    node_id: str,
    project_id: str = DEFAULT_PROJECT_ID,
    *,
    auto_ack: bool = True,
    keepalive_interval: float = 15.0,
    headers: Sequence[tuple[str, str]] | None = None,
    path: str | None = None,
    connect_timeout: float = 30.0,
    storage: MetaStore | None = None,
) -> SimEdge:
    """Connect one edge and run it in `nursery` (its connection is closed when the task ends).

    `storage` is the edge's database (a new v1.23 one when not given); pass the previous
    connection's `edge.storage` to reconnect an edge that kept its database."""
    context = identity if isinstance(identity, ssl.SSLContext) else identity.client_ssl_context()
    with trio.fail_after(connect_timeout):
        connection = await connect_websocket(
            host,
            port,
            ssl_context=context,
            path=path or f"/{project_id}/{node_id}/events",
            headers=edge_headers(node_id, project_id) if headers is None else headers,
            node_id=node_id,
            project_id=project_id,
        )
    edge = SimEdge(
        connection,
        node_id,
        project_id,
        auto_ack=auto_ack,
        keepalive_interval=keepalive_interval,
        storage=storage,
    )
    nursery.start_soon(_run_and_close, edge)
    return edge


async def _run_and_close(edge: SimEdge) -> None:
    try:
        await edge.run()
    finally:
        with trio.CancelScope(shield=True):
            await edge.connection.abort()


@asynccontextmanager
async def open_sim_edge(
    host: str,
    port: int,
    identity: IdentitySource,
    node_id: str,
    project_id: str = DEFAULT_PROJECT_ID,
    auto_ack: bool = True,
    keepalive_interval: float = 15.0,
    *,
    headers: Sequence[tuple[str, str]] | None = None,
    path: str | None = None,
    connect_timeout: float = 30.0,
    storage: MetaStore | None = None,
) -> AsyncIterator[SimEdge]:
    """A connected edge for the duration of the block; on exit TCP is closed like EdgeCore."""
    async with trio.open_nursery() as nursery:
        edge = await start_sim_edge(
            nursery,
            host,
            port,
            identity,
            node_id,
            project_id,
            auto_ack=auto_ack,
            keepalive_interval=keepalive_interval,
            headers=headers,
            path=path,
            connect_timeout=connect_timeout,
            storage=storage,
        )
        try:
            yield edge
        finally:
            nursery.cancel_scope.cancel()


# --- a fleet ----------------------------------------------------------------------------------

IdentityFactory = Callable[[str], Awaitable[IdentitySource]]


@attrs.define
class Fleet:
    edges: list[SimEdge] = attrs.field(factory=list)
    failures: dict[str, str] = attrs.field(factory=dict)
    connect_times: list[float] = attrs.field(factory=list)
    connect_seconds: float = 0.0

    @property
    def connected(self) -> list[SimEdge]:
        return [edge for edge in self.edges if edge.connected]

    async def wait_all(self, predicate: Predicate, within: float = 30.0) -> None:
        """Every edge still connected has received a message matching `predicate`."""
        with trio.fail_after(within):
            for edge in self.edges:
                if edge.connected:
                    await edge.expect(predicate, within)


@asynccontextmanager
async def open_fleet(
    host: str,
    port: int,
    identity: IdentitySource | IdentityFactory,
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
    """`count` edges named `<prefix><start>`… connected with at most `concurrency` handshakes
    in flight, each storing what it receives under the `edgecore` line's rules; failures are
    recorded in `fleet.failures`, not raised."""
    shared: ssl.SSLContext | None = None
    if isinstance(identity, EdgeIdentity):
        shared = identity.client_ssl_context()  # one context for all: far less memory
    elif isinstance(identity, ssl.SSLContext):
        shared = identity

    async def start_one(nursery: trio.Nursery, node_id: str) -> SimEdge:
        if shared is not None:
            source: IdentitySource = shared
        else:
            assert callable(identity)
            source = await identity(node_id)
        return await start_sim_edge(
            nursery,
            host,
            port,
            source,
            node_id,
            project_id,
            auto_ack=auto_ack,
            keepalive_interval=keepalive_interval,
            connect_timeout=connect_timeout,
            storage=MetaStore(edgecore),
        )

    names = [f"{prefix}{index}" for index in range(start, start + count)]
    async with run_fleet(names, start_one, concurrency) as fleet:
        yield fleet


StartEdge = Callable[[trio.Nursery, str], Awaitable[SimEdge]]


@asynccontextmanager
async def run_fleet(
    names: Sequence[str], start_edge: StartEdge, concurrency: int
) -> AsyncIterator[Fleet]:
    """Start an edge per name with at most `concurrency` starting at once (whatever the
    transport); failures are recorded in `fleet.failures`, not raised."""
    fleet = Fleet()
    limiter = trio.CapacityLimiter(concurrency)

    async def connect(nursery: trio.Nursery, node_id: str) -> None:
        async with limiter:
            began = trio.current_time()
            try:
                edge = await start_edge(nursery, node_id)
            except Exception as exc:  # recorded; one edge's failure must not stop the fleet
                fleet.failures[node_id] = f"{type(exc).__name__}: {exc}"
                return
            fleet.connect_times.append(trio.current_time() - began)
            fleet.edges.append(edge)

    async with trio.open_nursery() as nursery:
        began = trio.current_time()
        async with trio.open_nursery() as connecting:
            for node_id in names:
                connecting.start_soon(connect, nursery, node_id)
        fleet.connect_seconds = trio.current_time() - began
        try:
            yield fleet
        finally:
            nursery.cancel_scope.cancel()


# --- command line -----------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)], 3)

    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": round(ordered[-1], 3)}


def fleet_figures(fleet: Fleet, wall_offset: float) -> dict[str, Any]:
    """One JSON-able summary; times of arrival are wall-clock (unix seconds) for merging."""
    latencies: list[float] = []
    arrivals: list[float] = []
    for edge in fleet.edges:
        for item in edge.received:
            wall = item.at + wall_offset
            arrivals.append(wall)
            if item.message.header.timestamp > 0:
                latencies.append(wall * 1000 - item.message.header.timestamp)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "edges": len(fleet.edges) + len(fleet.failures),
        "connected": len(fleet.edges),
        "failed": len(fleet.failures),
        "failures": dict(list(fleet.failures.items())[:5]),
        "still_connected": len(fleet.connected),
        "connect_s": round(fleet.connect_seconds, 3),
        "connect_ms": _percentiles([t * 1000 for t in fleet.connect_times]),
        "received": len(arrivals),
        "acked": sum(edge.acks_sent for edge in fleet.edges),
        "keepalives": sum(edge.keepalives_sent for edge in fleet.edges),
        "latency_ms": _percentiles(latencies),
        "first_arrival_unix": round(min(arrivals), 6) if arrivals else None,
        "last_arrival_unix": round(max(arrivals), 6) if arrivals else None,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "max_rss_kb": usage.ru_maxrss,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trio_cloudhub.testing.edge_sim")
    commands = parser.add_subparsers(dest="command", required=True)
    fleet = commands.add_parser("fleet", help="connect N simulated edges and report figures")
    fleet.add_argument("--host", default="127.0.0.1")
    fleet.add_argument("--port", type=int, default=10000, help="WebSocket port")
    fleet.add_argument("--https-port", type=int, default=10002)
    fleet.add_argument("--token", required=True)
    fleet.add_argument("--count", type=int, required=True)
    fleet.add_argument("--prefix", default="edge-")
    fleet.add_argument("--start", type=int, default=0, help="first index of the node names")
    fleet.add_argument("--project", default=DEFAULT_PROJECT_ID)
    fleet.add_argument("--concurrency", type=int, default=50)
    fleet.add_argument("--keepalive", type=float, default=15.0)
    fleet.add_argument("--no-ack", action="store_true")
    fleet.add_argument("--legacy-v110", action="store_true", help="v1.10's CSR subject")
    fleet.add_argument(
        "--edgecore",
        choices=EDGECORE_LINES,
        default=V1_23,
        help="whose metaManager storage rules the edges follow",
    )
    fleet.add_argument(
        "--per-edge-certs", action="store_true", help="bootstrap a certificate for every edge"
    )
    fleet.add_argument("--duration", type=float, default=0.0, help="stay connected this long")
    fleet.add_argument(
        "--until-messages",
        type=int,
        default=0,
        help="stop once every edge received this many messages",
    )
    fleet.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run")
    return parser


async def _run_fleet_command(args: argparse.Namespace) -> dict[str, Any]:
    identity: IdentitySource | IdentityFactory
    if args.per_edge_certs:

        async def identity_of(node: str) -> IdentitySource:
            found = await bootstrap(
                args.host, args.https_port, args.token, node, legacy_v110=args.legacy_v110
            )
            return found.client_ssl_context()

        identity = identity_of
    else:
        identity = await bootstrap(
            args.host,
            args.https_port,
            args.token,
            f"{args.prefix}{args.start}",
            legacy_v110=args.legacy_v110,
        )
    wall_offset = time.time() - trio.current_time()
    async with open_fleet(
        args.host,
        args.port,
        identity,
        args.count,
        prefix=args.prefix,
        start=args.start,
        project_id=args.project,
        concurrency=args.concurrency,
        auto_ack=not args.no_ack,
        keepalive_interval=args.keepalive,
        edgecore=args.edgecore,
    ) as fleet:
        print(
            json.dumps({"event": "connected", "connected": len(fleet.edges)}),
            file=sys.stderr,
            flush=True,
        )
        with trio.move_on_after(args.timeout):
            await _wait_for_end(fleet, args.duration, args.until_messages)
        return fleet_figures(fleet, wall_offset)


async def _wait_for_end(fleet: Fleet, duration: float, until_messages: int) -> None:
    """Until the duration passed, every edge got its messages, or SIGINT/SIGTERM."""
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        if until_messages:
            for edge in fleet.edges:
                if edge.connected:
                    with suppress(SimEdgeDisconnected):
                        await edge.wait_for_messages(until_messages, within=math.inf)
        if duration:
            await trio.sleep(duration)
        elif not until_messages:
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        figures = trio.run(_run_fleet_command, args)
    except BootstrapError as exc:
        print(f"bootstrap failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
