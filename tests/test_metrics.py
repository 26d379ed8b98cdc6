"""Prometheus metrics: scraped over HTTP from a running `serve` (real TLS, a simulated edge),
and the metrics server's own handling of bad requests."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from trio_cloudhub.config import parse_config
from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.hub.hub import Hub, HubSettings
from trio_cloudhub.hub.server import ServeInfo, serve
from trio_cloudhub.metrics import (
    MAX_HEADER_BYTES,
    Metrics,
    parse_bind_address,
    serve_metrics,
)
from trio_cloudhub.store.base import ChangeLag
from trio_cloudhub.testing.edge_sim import bootstrap, open_sim_edge
from trio_cloudhub.testing.hub import object_message, open_test_hub
from trio_cloudhub.testing.quic_sim import open_sim_quic_edge

HOST = "127.0.0.1"
CONFIG = """\
commonConfig:
  monitorServer: {{bindAddress: "{monitor}"}}
modules:
  cloudHub:
    advertiseAddress: [127.0.0.1]
    nodeLimit: {node_limit}
    websocket: {{address: 127.0.0.1, port: 0}}
    https: {{address: 127.0.0.1, port: 0}}
    quic: {{enable: {quic}, address: 127.0.0.1, port: 0}}
    unixsocket: {{enable: false}}
trioCloudHub: {{dataDir: "{data}", manifestsDir: "{manifests}", manifestsPollInterval: 0.05}}
"""
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  nodeName: edge-1
  containers: [{name: app, image: busybox, envFrom: [{configMapRef: {name: web-config}}]}]
"""
CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config, namespace: default}
data: {mode: "%s"}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def running_hub(
    tmp_path: Path, *, node_limit: int = 1000, monitor: str = "127.0.0.1:0", quic: bool = False
) -> AsyncIterator[ServeInfo]:
    manifests = tmp_path / "manifests"
    manifests.mkdir(parents=True)
    (manifests / "config.yaml").write_text(CONFIG_MAP % "one")
    (manifests / "pod.yaml").write_text(POD)
    text = CONFIG.format(
        monitor=monitor,
        node_limit=node_limit,
        quic=str(quic).lower(),
        data=tmp_path / "data",
        manifests=manifests,
    )
    async with trio.open_nursery() as nursery:
        info: ServeInfo = await nursery.start(serve, parse_config(text, "metrics.yaml"))
        yield info
        nursery.cancel_scope.cancel()


@attrs.frozen
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


async def http_get(port: int, target: str = "/metrics", method: str = "GET") -> Answer:
    """One request over a fresh connection; the response with its body in `.body`."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method=method, target=target, headers=[("Host", HOST)])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        return await read_response(conn, stream)


async def read_response(conn: h11.Connection, stream: trio.SocketStream) -> Answer:
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return Answer(response.status_code, dict(response.headers), body)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def scrape(port: int) -> Samples:
    response = await http_get(port)
    assert response.status == 200
    assert response.headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    text = response.body.decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def wait_for(port: int, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until `name{labels}` has the expected value (the hub updates it asynchronously)."""
    with trio.fail_after(10):
        while True:
            samples = await scrape(port)
            if samples.get((name, frozenset(labels.items()))) == expected:
                return samples
            await trio.sleep(0.05)


def is_object(kind: str, name: str, operation: str | None = None) -> object:
    def match(message: Message) -> bool:
        parts = message.resource.split("/")
        ok = len(parts) == 3 and parts[1] == kind and parts[2] == name
        return ok and (operation is None or message.operation == operation)

    return match


# --- a running hub -----------------------------------------------------------------------------


async def test_a_connected_edge_shows_in_the_metrics_and_leaves_them(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_hub(tmp_path) as hub:
            assert hub.metrics_port
            before = await scrape(hub.metrics_port)
            assert value(before, "KubeEdge_CloudHub_connected_nodes") == 0
            assert value(before, "trio_cloudhub_queue_depth") >= 2  # the pod and config map wait
            identity = await bootstrap(HOST, hub.https_port, hub.tokens.token, "edge-1")
            async with open_sim_edge(HOST, hub.websocket_port, identity, "edge-1") as edge:
                await edge.expect(is_object("pod", "web", "insert"), 10)
                await edge.expect(is_object("configmap", "web-config", "insert"), 10)
                samples = await wait_for(hub.metrics_port, "trio_cloudhub_queue_depth", 0)
                assert value(samples, "KubeEdge_CloudHub_connected_nodes") == 1
                assert value(samples, "trio_cloudhub_connections", transport="websocket") == 1
                handshakes = "trio_cloudhub_handshakes_total"
                assert value(samples, handshakes, transport="websocket", result="accepted") == 1
                sent = "trio_cloudhub_messages_sent_total"
                received = "trio_cloudhub_messages_received_total"
                assert value(samples, sent, operation="insert") >= 2
                assert value(samples, received, operation="keepalive") >= 1
                assert value(samples, received, operation="response") >= 2  # the ACKs
                assert value(samples, "trio_cloudhub_ack_latency_seconds_count") >= 2
                assert value(samples, "trio_cloudhub_retransmissions_total") == 0
                assert value(samples, "trio_cloudhub_queue_depth_max") == 0
                assert value(samples, "trio_cloudhub_store_lag_seconds") >= 0

                # A change of a manifest: seen by the store, handed over, delivered, ACKed.
                (hub.manifests_dir / "config.yaml").write_text(CONFIG_MAP % "two")
                await edge.expect(is_object("configmap", "web-config", "update"), 10)
                samples = await wait_for(hub.metrics_port, sent, 1, operation="update")
                assert value(samples, "trio_cloudhub_store_last_handover_seconds") > 0
                assert value(samples, "trio_cloudhub_store_lag_seconds") == 0
            samples = await wait_for(hub.metrics_port, "KubeEdge_CloudHub_connected_nodes", 0)
            assert value(samples, "trio_cloudhub_connections", transport="websocket") == 0


async def test_refusals_show_with_their_reason(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_hub(tmp_path, node_limit=1) as hub:
            identity = await bootstrap(HOST, hub.https_port, hub.tokens.token, "edge-1")
            async with open_sim_edge(HOST, hub.websocket_port, identity, "edge-1"):
                async with open_sim_edge(HOST, hub.websocket_port, identity, "edge-2") as extra:
                    assert "node limit" in await extra.wait_disconnected()
                # Not TLS at all: refused by the transport before the hub sees it.
                stream = await trio.open_tcp_stream(HOST, hub.websocket_port)
                async with stream:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    with trio.move_on_after(5):
                        while await stream.receive_some(1024):
                            pass
                handshakes = "trio_cloudhub_handshakes_total"
                samples = await wait_for(
                    hub.metrics_port, handshakes, 1, transport="websocket", result="tls"
                )
                refused = value(
                    samples, handshakes, transport="websocket", result="refused:node-limit"
                )
                assert refused == 1
                assert value(samples, handshakes, transport="websocket", result="accepted") == 1
                assert value(samples, "KubeEdge_CloudHub_connected_nodes") == 1


async def test_quic_connections_are_counted_as_quic(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_hub(tmp_path, quic=True) as hub:
            identity = await bootstrap(HOST, hub.https_port, hub.tokens.token, "edge-1")
            async with open_sim_quic_edge(HOST, hub.quic_port, identity, "edge-1") as edge:
                await edge.expect(is_object("pod", "web", "insert"), 10)
                samples = await scrape(hub.metrics_port)
                assert value(samples, "trio_cloudhub_connections", transport="quic") == 1
                handshakes = "trio_cloudhub_handshakes_total"
                assert value(samples, handshakes, transport="quic", result="accepted") == 1
                assert value(samples, "KubeEdge_CloudHub_connected_nodes") == 1
            await wait_for(hub.metrics_port, "trio_cloudhub_connections", 0, transport="quic")


async def test_a_taken_metrics_address_does_not_stop_the_hub(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(60):
            async with running_hub(tmp_path, monitor=f"{HOST}:{port}") as hub:
                assert hub.metrics_port == 0
                assert hub.websocket_port and hub.https_port


# --- an in-process hub (memory connections, MockClock) -----------------------------------------


def sample(hub: Hub, name: str, **labels: str) -> float | None:
    return hub.metrics.registry.get_sample_value(name, labels)


async def test_queue_depths_rejections_and_retransmissions(autojump_clock: MockClock) -> None:
    settings = HubSettings(authorization=True, authorization_debug=False)
    async with open_test_hub(settings=settings) as th:
        for rv, name in enumerate(("a", "b"), start=1):
            await th.publish(object_message("n1", "Pod", name, rv=rv))
        await th.publish(object_message("n2", "Pod", "c", rv=3))
        assert sample(th.hub, "trio_cloudhub_queue_depth") == 3
        assert sample(th.hub, "trio_cloudhub_queue_depth_max") == 2
        assert sample(th.hub, "KubeEdge_CloudHub_connected_nodes") == 0

        edge = await th.connect("n1")  # never ACKs: every message is sent again
        assert sample(th.hub, "KubeEdge_CloudHub_connected_nodes") == 1
        assert sample(th.hub, "trio_cloudhub_connections", transport="memory") == 1
        report = new_message(
            source="edged",
            group="meta",
            operation="update",
            resource="default/nodestatus/n2",  # another node's status: rejected
            content={"UID": "u", "Status": {}, "ExtendResources": None},
            now_ms=0,
        )
        await edge.send(codec.encode(report))
        await trio.sleep(settings.ack_timeout * 2 + 1)
        assert sample(th.hub, "trio_cloudhub_messages_sent_total", operation="insert") == 1
        assert sample(th.hub, "trio_cloudhub_retransmissions_total") == 2
        assert sample(th.hub, "trio_cloudhub_ack_latency_seconds_count") == 0
        reason = "rejected:authorization"
        assert sample(th.hub, "trio_cloudhub_rejected_messages_total", reason=reason) == 1
        received = "trio_cloudhub_messages_received_total"
        assert sample(th.hub, received, operation="update") == 1
        assert sample(th.hub, received, operation="keepalive") == 1


# --- the HTTP server ---------------------------------------------------------------------------


@asynccontextmanager
async def metrics_server() -> AsyncIterator[tuple[Metrics, int]]:
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_metrics, metrics, HOST, 0)
        yield metrics, port
        nursery.cancel_scope.cancel()


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
        return answer


async def test_the_server_answers_metrics_and_refuses_the_rest() -> None:
    with trio.fail_after(30):
        async with metrics_server() as (metrics, port):
            metrics.count_sent("insert")
            metrics.count_sent("made-up-by-an-edge")
            samples = await scrape(port)
            sent = "trio_cloudhub_messages_sent_total"
            assert value(samples, sent, operation="insert") == 1
            assert value(samples, sent, operation="other") == 1
            assert (sent, frozenset({("operation", "made-up-by-an-edge")})) not in samples
            query = await http_get(port, "/metrics?name[]=x")
            assert query.status == 200
            assert (await http_get(port, "/")).status == 404
            assert (await http_get(port, "/debug/pprof/")).status == 404
            assert (await http_get(port, "/metrics", "POST")).status == 405
            head = await http_get(port, "/metrics", "HEAD")
            assert head.status == 200
            assert head.body == b""


async def test_bad_requests_are_refused_and_the_server_keeps_serving() -> None:
    with trio.fail_after(30):
        async with metrics_server() as (_, port):
            assert (await raw_exchange(port, b"NOT HTTP\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_HEADER_BYTES * 2)
            assert (await raw_exchange(port, huge)).startswith(b"HTTP/1.1 431 ")
            body = b"x" * 100_000
            head = f"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            assert (await raw_exchange(port, head.encode() + body)).startswith(b"HTTP/1.1 413 ")
            # The peer vanishing halfway is nothing either.
            stream = await trio.open_tcp_stream(HOST, port)
            await stream.send_all(b"GET /metr")
            await stream.aclose()
            # Two requests on one kept-alive connection.
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                for _ in range(2):
                    request = h11.Request(method="GET", target="/metrics", headers=[("Host", "x")])
                    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                    assert (await read_response(conn, stream)).status == 200
                    conn.start_next_cycle()


async def test_a_failing_collector_costs_a_500_not_the_server() -> None:
    class Broken:
        def collect(self) -> list[object]:
            raise RuntimeError("collector bug")

    with trio.fail_after(30):
        async with metrics_server() as (metrics, port):
            metrics.registry.register(Broken())  # type: ignore[arg-type]
            assert (await http_get(port)).status == 500
            assert (await http_get(port, "/nothing")).status == 404


# --- pieces ------------------------------------------------------------------------------------


def test_bind_addresses() -> None:
    assert parse_bind_address("127.0.0.1:9091") == ("127.0.0.1", 9091)
    assert parse_bind_address("[::1]:0") == ("::1", 0)
    assert parse_bind_address("0.0.0.0:9091") == ("0.0.0.0", 9091)
    for bad in ("9091", "host:", "host:99999", "host:port"):
        with pytest.raises(ValueError):
            parse_bind_address(bad)


def test_change_lag_counts_from_the_first_change_seen_to_the_hand_over() -> None:
    now = [100.0]
    lag = ChangeLag(clock=lambda: now[0])
    assert lag.behind() == 0
    lag.seen()
    now[0] = 101.0
    lag.seen()  # a later change does not make the oldest younger
    now[0] = 102.0
    assert lag.behind() == 2
    lag.sending()
    now[0] = 103.0
    lag.seen()  # during the hand-over: waits for the next batch
    now[0] = 104.0
    lag.handed_over()
    assert lag.last_seconds == 4
    assert lag.behind() == 1  # the change seen during the hand-over
    lag.sending()
    now[0] = 105.0
    lag.handed_over()
    assert (lag.behind(), lag.last_seconds) == (0, 2)
    lag.seen()
    lag.clear()
    assert lag.behind() == 0


def test_a_failed_hand_over_keeps_its_age() -> None:
    now = [0.0]
    lag = ChangeLag(clock=lambda: now[0])
    lag.seen()
    lag.sending()  # ... and the store fails before handing over
    now[0] = 5.0
    lag.seen()
    lag.sending()
    assert lag.behind() == 5
    lag.handed_over()
    assert (lag.behind(), lag.last_seconds) == (0, 5)


def test_each_hub_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.count_received("keepalive")
    name = "trio_cloudhub_messages_received_total"
    labels = {"operation": "keepalive"}
    assert first.registry.get_sample_value(name, labels) == 1
    assert second.registry.get_sample_value(name, labels) == 0
