"""Prometheus metrics of one hub, and the plain HTTP server that exposes them on `/metrics`.

KubeEdge's CloudCore serves one gauge, `KubeEdge_CloudHub_connected_nodes`
(`cloud/pkg/common/monitor/monitor.go`, v1.23.1), on its monitor server
(`commonConfig.monitorServer.bindAddress`, default `127.0.0.1:9091`); we serve it under the
same name on the same address so existing dashboards and alerts keep working. Ours are
prefixed `trio_cloudhub_`:

- `KubeEdge_CloudHub_connected_nodes` (gauge): nodes with a session, KubeEdge's own;
- `trio_cloudhub_connections{transport}` (gauge): edge connections the hub holds (after the
  transport's handshake; a refused one until it is closed);
- `trio_cloudhub_handshakes_total{transport,result}`: every connection once, `accepted` or
  why not (below);
- `trio_cloudhub_messages_sent_total{operation}`, `..._received_total{operation}`: messages
  written to / read from edges (sent: first transmissions; received: keepalives and ACKs too);
- `trio_cloudhub_retransmissions_total`: ACK-mode messages written again (no ACK in time);
- `trio_cloudhub_ack_latency_seconds` (histogram): first transmission of a message to its ACK;
- `trio_cloudhub_queue_depth`, `..._queue_depth_max` (gauges): messages held in all node
  queues, and in the deepest one (pending, in flight and no-ACK);
- `trio_cloudhub_rejected_messages_total{reason}`: the `rejected:*` and `dropped:*` keys of
  `Hub.stats` (e.g. `rejected:authorization`, `dropped:away`);
- `trio_cloudhub_limited_total{kind}`: times an edge hit a bound (`upstream-rate`,
  `upstream-bytes`: its reader waited; `no-ack`: a message given up after its retries;
  `foreign-identity`: another node's certificate with authorization off);
- `trio_cloudhub_reconciled_messages_total`: changes queued again by reconciliation;
- `trio_cloudhub_store_lag_seconds` (gauge): age of the oldest change the store has seen
  and not yet handed to the hub's node queues, 0 when caught up (`ChangeLag`);
- `trio_cloudhub_store_last_handover_seconds` (gauge): the last change's seen -> handed over.

Handshake results: `accepted`, `refused:node-limit`, `refused:shutting-down` (the hub),
`refused:identity` (certificate names another node), `tls` (TLS handshake or client
certificate failed), `bad-request` (upgrade request or QUIC header refused), `timeout`,
`evicted` (closed unfinished to make room for newer ones: a crowd, `netlimits`), `lost`
(the peer went away during the handshake), `error` (our bug, logged).

Cost on the hot path: one counter increment per message on a label child looked up in a
dict of known operations (unknown operations count as `other`, so an edge cannot grow the
label set), one histogram observation per ACK. Everything that can be read from the hub's
own state (connected nodes, queue depths, `Hub.stats`, store lag) is computed when scraped.
"""

from __future__ import annotations

import contextlib
import http
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import h11
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from trio_cloudhub.core.message import (
    CONTROL_OPERATIONS,
    OP_APPLICATION_RESPONSE,
    OP_CONNECTED,
    OP_DELETE,
    OP_DISCONNECTED,
    OP_ERROR,
    OP_INSERT,
    OP_KEEPALIVE,
    OP_PATCH,
    OP_QUERY,
    OP_RESPONSE,
    OP_UPDATE,
    OP_UPLOAD,
    VOLUME_OPERATIONS,
)
from trio_cloudhub.core.rules import TASK_OPERATIONS
from trio_cloudhub.store.base import ChangeLag

if TYPE_CHECKING:
    from trio_cloudhub.hub.hub import Hub

log = logging.getLogger("trio_cloudhub.metrics")
# No `<counter>_created` series (process-wide switch): they would double the lines of every
# counter and histogram and only say when the hub started.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The operations that get their own label value; anything else is `other`.
OPERATIONS = frozenset(
    {
        OP_INSERT,
        OP_DELETE,
        OP_QUERY,
        OP_UPDATE,
        OP_UPLOAD,
        OP_RESPONSE,
        OP_ERROR,
        OP_PATCH,
        OP_KEEPALIVE,
        OP_CONNECTED,
        OP_DISCONNECTED,
        OP_APPLICATION_RESPONSE,
        *CONTROL_OPERATIONS,
        *VOLUME_OPERATIONS,
        *TASK_OPERATIONS,
    }
)
OTHER = "other"
LIMITED_KINDS = ("upstream-rate", "upstream-bytes", "no-ack", "foreign-identity")
# Loopback ACKs take about a millisecond; a lost frame costs whole ACK timeouts (5 s each).
ACK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)
CONNECTED_NODES_HELP = "Number of nodes that connected to the cloudHub instance"  # KubeEdge's


class Metrics:
    """The metrics of one hub, in a registry of their own (several hubs share a test process).

    The `count_*` methods are the hot-path hooks: bind them once (`self._count =
    metrics.count_sent`) and call them with the message's operation.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._connections = Gauge(
            "trio_cloudhub_connections",
            "Edge connections the hub holds, by transport (refused ones until they are closed)",
            ["transport"],
            registry=registry,
        )
        self._handshakes = Counter(
            "trio_cloudhub_handshakes",
            "Edge connection attempts by transport and result: accepted, or why not",
            ["transport", "result"],
            registry=registry,
        )
        sent = Counter(
            "trio_cloudhub_messages_sent",
            "Messages written to edges by operation (first transmissions; see retransmissions)",
            ["operation"],
            registry=registry,
        )
        received = Counter(
            "trio_cloudhub_messages_received",
            "Messages read from edges by operation (keepalives and ACKs included)",
            ["operation"],
            registry=registry,
        )
        self._retransmissions = Counter(
            "trio_cloudhub_retransmissions",
            "ACK-mode messages written again because no ACK came in time",
            registry=registry,
        )
        self._ack_latency = Histogram(
            "trio_cloudhub_ack_latency_seconds",
            "Seconds from the first transmission of an ACK-mode message to its ACK",
            buckets=ACK_LATENCY_BUCKETS,
            registry=registry,
        )
        # Children made up front: the hot path is a dict lookup and an increment.
        self._sent = {op: sent.labels(op) for op in (*OPERATIONS, OTHER)}
        self._received = {op: received.labels(op) for op in (*OPERATIONS, OTHER)}
        self._sent_other = self._sent[OTHER]
        self._received_other = self._received[OTHER]
        self.count_retransmission = self._retransmissions.inc
        limited = Counter(
            "trio_cloudhub_limited",
            "Times an edge hit a bound: upstream-rate, upstream-bytes (its reader waited), "
            "no-ack (a message given up after its retries), foreign-identity (another "
            "node's certificate, authorization off)",
            ["kind"],
            registry=registry,
        )
        self._limited = {kind: limited.labels(kind) for kind in LIMITED_KINDS}
        self.observe_ack_latency = self._ack_latency.observe

    # --- hooks ---------------------------------------------------------------------------

    def count_sent(self, operation: str) -> None:
        self._sent.get(operation, self._sent_other).inc()

    def count_received(self, operation: str) -> None:
        self._received.get(operation, self._received_other).inc()

    def count_limited(self, kind: str) -> None:
        self._limited[kind].inc()

    def count_handshake(self, transport: str, result: str) -> None:
        """One connection attempt's outcome (the results are listed in the module docstring)."""
        self._handshakes.labels(transport, result).inc()

    def connections(self, transport: str) -> Gauge:
        """The open-connections gauge of `transport` (inc on open, dec on close)."""
        return self._connections.labels(transport)

    def watch_hub(self, hub: Hub) -> None:
        """Read `hub`'s own state at every scrape (connected nodes, queues, stats, store)."""
        self.registry.register(_HubCollector(hub))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what `/metrics` answers)."""
        return generate_latest(self.registry)


class _HubCollector:
    """What is cheaper to compute at scrape time than to keep up to date per message."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def collect(self) -> Iterable[Metric]:
        hub = self._hub
        yield GaugeMetricFamily(
            "KubeEdge_CloudHub_connected_nodes", CONNECTED_NODES_HELP, value=len(hub.sessions)
        )
        yield from _queue_depths(len(entry.queue) for entry in hub.nodes.values())
        rejected = CounterMetricFamily(
            "trio_cloudhub_rejected_messages",
            "Messages the hub did not pass on, by reason (rejected:*, dropped:* of Hub.stats)",
            labels=["reason"],
        )
        for key, count in sorted(hub.stats.items()):
            if key.startswith(("rejected:", "dropped:")):
                rejected.add_metric([key], count)
        yield rejected
        yield CounterMetricFamily(
            "trio_cloudhub_reconciled_messages",
            "Changes queued again because a node's ack points showed it missed them",
            value=hub.stats["reconciled"],
        )
        yield from _store_lag(hub.store.change_lag)


def _queue_depths(depths: Iterator[int]) -> Iterator[Metric]:
    total = deepest = 0
    for depth in depths:
        total += depth
        deepest = max(deepest, depth)
    yield GaugeMetricFamily(
        "trio_cloudhub_queue_depth",
        "Messages held in all node queues (pending, in flight and no-ACK)",
        value=total,
    )
    yield GaugeMetricFamily(
        "trio_cloudhub_queue_depth_max",
        "Messages held in the deepest node queue",
        value=deepest,
    )


def _store_lag(lag: ChangeLag) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "trio_cloudhub_store_lag_seconds",
        "Age of the oldest change the store saw and has not yet handed to the hub (0: none)",
        value=lag.behind(),
    )
    yield GaugeMetricFamily(
        "trio_cloudhub_store_last_handover_seconds",
        "Seconds the last change took from seen by the store to handed to the hub's queues",
        value=lag.last_seconds,
    )


# --- the HTTP server --------------------------------------------------------------------------

METRICS_PATH = "/metrics"
TEXT = "text/plain; charset=utf-8"
AdminRoutes = Mapping[str, Callable[[], Awaitable[Any]]]
"""Admin paths (`/admin/...`) -> their JSON-able answer (see `hub.admin`)."""
MAX_HEADER_BYTES = 8 * 1024
MAX_BODY_BYTES = 8 * 1024  # a scrape has no body; whatever comes is read and dropped
RECEIVE_BYTES = 16 * 1024
REQUEST_TIMEOUT = 30.0  # whole request, and the idle limit of a kept-alive connection
SEND_TIMEOUT = 30.0
LINGER_SECONDS = 2.0  # after an error answer, while the client's unread input is drained
LINGER_BYTES = 1024 * 1024
MAX_CONNECTIONS = 64  # scrapers are few; more connections wait their turn


class _Refused(Exception):
    """A request we answer with an error status, then close."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def parse_bind_address(text: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9091`) as (host, port); ValueError when it is not one."""
    host, colon, port = text.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        raise ValueError(f"not host:port: {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


async def serve_metrics(
    metrics: Metrics,
    host: str = "127.0.0.1",
    port: int = 9091,
    *,
    admin: AdminRoutes | None = None,
    exposition: Exposition | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `GET /metrics` over plain HTTP/1.1 forever; `task_status.started(port)` once bound.

    Plain HTTP on loopback by default, like CloudCore's monitor server. `admin` paths answer
    JSON, to loopback clients only (403 otherwise). Other paths get 404, other methods 405,
    a malformed or oversized request 400/413/431; one connection's bad input or a failing
    collector never ends the server. OSError when it cannot listen. `exposition`, when
    given, answers `/metrics` instead of `metrics` (the supervisor of `serve --workers N`).
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound: int = listeners[0].socket.getsockname()[1]
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    log.info("metrics server listening on %s:%d%s", host or "*", bound, METRICS_PATH)
    task_status.started(bound)
    answer = exposition if exposition is not None else _own(metrics)
    handler = partial(_serve_connection, _Routes(answer, admin or {}), limiter)
    await trio.serve_listeners(handler, listeners)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


Exposition = Callable[[], Awaitable[bytes]]


def _own(metrics: Metrics) -> Exposition:
    async def exposition() -> bytes:
        return metrics.exposition()

    return exposition


@attrs.frozen
class _Routes:
    exposition: Exposition
    admin: AdminRoutes


async def _serve_connection(
    routes: _Routes, limiter: trio.CapacityLimiter, stream: trio.SocketStream
) -> None:
    async with limiter:
        try:
            await _serve_requests(routes, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            log.debug("metrics connection ended: %r", exc)
        except Exception:
            # Our bug: log it, close this connection, keep serving (and the hub with it).
            log.exception("metrics connection failed")
        finally:
            await trio.aclose_forcefully(stream)


async def _serve_requests(routes: _Routes, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    while True:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await _read_request(conn, stream)
        except h11.RemoteProtocolError as exc:
            await _refuse(conn, stream, exc.error_status_hint, f"bad request: {exc}")
            return
        except _Refused as exc:
            await _refuse(conn, stream, exc.status, str(exc))
            return
        if request is None:
            return
        status, content_type, body = await _answer(routes, request, _peer_is_loopback(stream))
        head_only = request.method == b"HEAD"
        with trio.fail_after(SEND_TIMEOUT):
            await _send(conn, stream, status, content_type, body, head_only=head_only)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request, its body read and dropped; None when the client closed."""
    event = await _next_event(conn, stream)
    if not isinstance(event, h11.Request):
        return None
    received = 0
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.EndOfMessage):
            return event
        if not isinstance(part, h11.Data):
            raise h11.RemoteProtocolError("connection closed inside the request body")
        received += len(part.data)
        if received > MAX_BODY_BYTES:
            raise _Refused(413, f"request body larger than {MAX_BODY_BYTES} bytes")


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            assert not isinstance(event, type)  # PAUSED cannot happen: we never pipeline
            return event
        conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))


async def _answer(routes: _Routes, request: h11.Request, loopback: bool) -> tuple[int, str, bytes]:
    path = request.target.partition(b"?")[0].decode("ascii", "replace")
    admin = routes.admin.get(path)
    if path != METRICS_PATH and admin is None:
        return 404, TEXT, b"404 page not found\n"
    if request.method not in (b"GET", b"HEAD"):
        return 405, TEXT, b"method not allowed\n"
    if admin is not None:
        return await _answer_admin(path, admin, loopback)
    try:
        return 200, CONTENT_TYPE_PLAIN_0_0_4, await routes.exposition()
    except Exception:
        log.exception("collecting metrics failed")
        return 500, TEXT, b"collecting metrics failed\n"


async def _answer_admin(
    path: str, route: Callable[[], Awaitable[Any]], loopback: bool
) -> tuple[int, str, bytes]:
    if not loopback:
        return 403, TEXT, b"the admin endpoint answers loopback clients only\n"
    try:
        value = await route()
    except Exception:
        log.exception("admin %s failed", path)
        return 500, TEXT, f"admin {path} failed (see the hub's log)\n".encode()
    return 200, "application/json", json.dumps(value, separators=(",", ":")).encode()


def _peer_is_loopback(stream: trio.SocketStream) -> bool:
    try:
        host = stream.socket.getpeername()[0]
        address = ipaddress.ip_address(host)
    except (OSError, ValueError, IndexError):
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


async def _send(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    content_type: str,
    body: bytes,
    *,
    head_only: bool = False,
    close: bool = False,
) -> None:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if status == 405:
        headers.append(("Allow", "GET, HEAD"))
    if close:
        headers.append(("Connection", "close"))
    reason = http.HTTPStatus(status).phrase
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
    if not head_only:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _refuse(conn: h11.Connection, stream: trio.SocketStream, status: int, why: str) -> None:
    """Answer a request we could not read, when HTTP still allows an answer, and close."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    log.debug("metrics request refused with %d: %s", status, why)
    body = f"{http.HTTPStatus(status).phrase}\n".encode()
    with trio.move_on_after(SEND_TIMEOUT), contextlib.suppress(h11.LocalProtocolError):
        await _send(conn, stream, status, TEXT, body, close=True)
    await _linger(stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side, then read (bounded) what the client still sends: closing a socket
    with unread input resets the connection, and the client may lose the answer with it."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_SECONDS):
        discarded = 0
        while discarded < LINGER_BYTES:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                return
            discarded += len(data)
