"""The UDS request server (spec 8) in front of a real hub and an in-memory edge.

Sockets are real, so these tests run on the real clock with short bounds (each well under 2 s).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import VOLUME_OPERATIONS, Header, Message, new_message
from trio_cloudhub.edge.memory import HubDisconnected, MemoryEdgeEnd
from trio_cloudhub.hub.hub import VolumeRequestError
from trio_cloudhub.testing.hub import TestHub, open_test_hub
from trio_cloudhub.uds import (
    UdsSocketError,
    _JsonEnd,
    serve_uds,
    tcp_host_port,
    unix_socket_path,
)

CSI_CONTENT = '{"name":"pvc-1","capacity_range":{"required_bytes":1073741824}}'
ANSWER = {"volume": {"volume_id": "vol-1", "capacity_bytes": 1073741824}}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is long."""
    folder = tempfile.mkdtemp(prefix="uds-", dir="/tmp")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def volume_request(
    node: str = "n1", volume: str = "vol-1", operation: str = "createvolume"
) -> Message:
    """What KubeEdge's CSI driver writes (jsonpb CSI request as a JSON string)."""
    return new_message(
        source="cloudhub",
        group="resource",
        operation=operation,
        resource=f"node/{node}/default/volume/{volume}",
        content=CSI_CONTENT,
        now_ms=1_700_000_000_000,
    )


def wire(message: Message) -> bytes:
    """As Go's json.Marshal writes it (no newline)."""
    return codec.go_json(codec.message_to_dict(message)).encode()


async def run_volume_edge(
    edge: MemoryEdgeEnd, received: list[Message], *, answer: bool = True
) -> None:
    """An edge that answers each volume operation as edged does: `response`, parent = id."""
    try:
        while True:
            message = codec.decode(await edge.receive())
            received.append(message)
            if answer and message.operation in VOLUME_OPERATIONS:
                reply = new_message(
                    source="edged",
                    group="resource",
                    operation="response",
                    resource=message.resource,
                    content=ANSWER,
                    now_ms=0,
                    parent_msg_id=message.msg_id,
                )
                await edge.send(codec.encode(reply))
    except HubDisconnected:
        pass


@asynccontextmanager
async def uds_hub(
    address: str, *, answer: bool = True, connect: bool = True, **options: Any
) -> AsyncIterator[tuple[TestHub, str, list[Message]]]:
    """A test hub, node n1 connected (with a volume-answering edge), serve_uds started."""
    received: list[Message] = []
    async with open_test_hub() as th:
        if connect:
            edge = await th.connect("n1")
            th.nursery.start_soon(partial(run_volume_edge, edge, received, answer=answer))
        bound = await th.nursery.start(
            partial(serve_uds, th.hub.request_volume, address, **options)
        )
        yield th, bound, received


async def exchange(bound: str, payload: bytes, *, within: float = 1.5) -> bytes:
    """Connect, write `payload` without closing our side (as the CSI driver), read to EOF."""
    with trio.fail_after(within):
        stream = await connect(bound)
        async with stream:
            if payload:
                await stream.send_all(payload)
            return await read_to_eof(stream)


async def connect(bound: str) -> trio.SocketStream:
    if bound.startswith("unix://"):
        return await trio.open_unix_socket(unix_socket_path(bound))
    host, port = tcp_host_port(bound)
    return await trio.open_tcp_stream(host, port)


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def assert_error(reply: Message, request: Message | None, *, containing: str) -> None:
    assert reply.operation == "error"
    assert reply.route.source == "cloudhub"
    assert containing in reply.content
    if request is not None:
        assert reply.header.parent_msg_id == request.msg_id
        assert reply.route.group == request.route.group
        assert reply.resource == request.resource
    else:
        assert reply.header.parent_msg_id == ""


# --- the full path ------------------------------------------------------------------------


async def test_create_volume_goes_to_the_edge_and_its_answer_comes_back(sock_dir: Path) -> None:
    address = f"unix://{sock_dir}/kubeedge.sock"
    async with uds_hub(address) as (th, bound, received):
        assert bound == f"unix://{sock_dir}/kubeedge.sock"
        request = volume_request()
        data = await exchange(bound, wire(request))
        assert not data.endswith(b"\n")  # json.Marshal form
        reply = codec.decode(data)
        assert reply.operation == "response"
        assert reply.header.parent_msg_id == request.msg_id
        assert reply.resource == "default/volume/vol-1"  # as the edge wrote it
        assert reply.content == ANSWER
        # The edge got it once, trimmed, content untouched.
        [sent] = [m for m in received if m.operation == "createvolume"]
        assert sent.resource == "default/volume/vol-1"
        assert sent.msg_id == request.msg_id
        assert sent.content == CSI_CONTENT
        assert th.hub._volume_waiters == {}


async def test_every_volume_operation_and_a_request_in_pieces(sock_dir: Path) -> None:
    async with uds_hub(f"unix://{sock_dir}/k.sock") as (_, bound, _received):
        for operation in sorted(VOLUME_OPERATIONS):
            request = volume_request(operation=operation)
            reply = codec.decode(await exchange(bound, wire(request)))
            assert (reply.operation, reply.header.parent_msg_id) == ("response", request.msg_id)
        # KubeEdge reads once; we read until the JSON is complete.
        request = volume_request(volume="vol-2")
        payload = wire(request)
        with trio.fail_after(1.5):
            stream = await connect(bound)
            async with stream:
                await stream.send_all(payload[:40])
                await trio.sleep(0.05)
                await stream.send_all(payload[40:])
                reply = codec.decode(await read_to_eof(stream))
        assert reply.header.parent_msg_id == request.msg_id


async def test_a_request_the_client_closes_after_writing_is_answered(sock_dir: Path) -> None:
    async with uds_hub(f"unix://{sock_dir}/k.sock") as (_, bound, _received):
        request = volume_request()
        with trio.fail_after(1.5):
            stream = await trio.open_unix_socket(unix_socket_path(bound))
            async with stream:
                await stream.send_all(wire(request) + b"\n")
                await stream.send_eof()
                reply = codec.decode(await read_to_eof(stream))
        assert reply.header.parent_msg_id == request.msg_id


async def test_tcp_address_works() -> None:
    async with uds_hub("tcp://127.0.0.1:0") as (_, bound, _received):
        host, port = tcp_host_port(bound)
        assert host == "127.0.0.1" and port > 0
        request = volume_request()
        reply = codec.decode(await exchange(bound, wire(request)))
        assert reply.operation == "response"
        assert reply.header.parent_msg_id == request.msg_id


# --- errors answered ----------------------------------------------------------------------


async def test_no_answer_in_time_is_an_error_and_leaves_no_waiter(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_cloudhub.uds")
    address = f"unix://{sock_dir}/k.sock"
    async with uds_hub(address, answer=False, answer_timeout=0.2) as (th, bound, received):
        request = volume_request()
        with trio.fail_after(1):
            reply = codec.decode(await exchange(bound, wire(request)))
        assert_error(reply, request, containing="no answer from node n1 within 0.2 s")
        assert [m.operation for m in received if m.operation != "keepalive"] == ["createvolume"]
        assert th.hub._volume_waiters == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no answer from node n1" in warnings[0].getMessage()
    assert CSI_CONTENT not in warnings[0].getMessage()  # content may hold secrets


async def test_node_not_connected_fails_fast(sock_dir: Path) -> None:
    async with uds_hub(f"unix://{sock_dir}/k.sock", connect=False) as (th, bound, _):
        request = volume_request(node="n2")
        with trio.fail_after(0.5):
            reply = codec.decode(await exchange(bound, wire(request)))
        assert_error(reply, request, containing="node n2 is not connected")
        assert th.hub._volume_waiters == {}


async def test_resource_without_node_is_an_error(sock_dir: Path) -> None:
    async with uds_hub(f"unix://{sock_dir}/k.sock") as (_, bound, _received):
        request = volume_request().with_resource("default/volume/vol-1")
        reply = codec.decode(await exchange(bound, wire(request)))
        assert_error(reply, request, containing="names no node")


async def test_other_operations_are_not_sent_to_the_edge(sock_dir: Path) -> None:
    async with uds_hub(f"unix://{sock_dir}/k.sock") as (_, bound, received):
        request = volume_request(operation="insert")
        reply = codec.decode(await exchange(bound, wire(request)))
        assert_error(reply, request, containing="not a volume operation")
        assert not [m for m in received if m.operation == "insert"]


@pytest.mark.parametrize(
    ("payload", "containing"),
    [
        (b"hello", "not JSON"),
        (b'["not", "an", "object"]', "not a JSON object"),
        (b'{"header": {"timestamp": 1.5}, "route": {}}', "timestamp"),
        (b'{"header": {"msg_id": "a"}, "route": {"resource": 7}}', "resource"),
        (b"{\xff}", "not JSON"),
    ],
)
async def test_malformed_requests_are_answered_with_an_error(
    sock_dir: Path, payload: bytes, containing: str
) -> None:
    async with uds_hub(f"unix://{sock_dir}/k.sock") as (_, bound, _received):
        # Answered at once although the client keeps its side open.
        reply = codec.decode(await exchange(bound, payload, within=1))
        assert_error(reply, None, containing=containing)


async def test_oversized_request_is_an_error(sock_dir: Path) -> None:
    address = f"unix://{sock_dir}/k.sock"
    async with uds_hub(address, max_request_bytes=4096) as (_, bound, received):
        big = new_message(
            source="cloudhub",
            group="resource",
            operation="createvolume",
            resource="node/n1/default/volume/big",
            content="x" * 5000,
            now_ms=0,
        )
        reply = codec.decode(await exchange(bound, wire(big)))
        assert_error(reply, None, containing="request larger than 4096 bytes")
        assert not [m for m in received if m.operation == "createvolume"]
        # Just under the bound is fine.
        small = volume_request()
        reply = codec.decode(await exchange(bound, wire(small)))
        assert reply.operation == "response"


async def test_idle_client_is_cut_at_the_deadline_while_others_are_served(sock_dir: Path) -> None:
    address = f"unix://{sock_dir}/k.sock"
    async with uds_hub(address, read_timeout=0.5) as (_, bound, _received):
        with trio.fail_after(1.5):
            idle = await connect(bound)
            async with idle:
                await idle.send_all(b'{"header": {')  # never finished
                start = trio.current_time()
                request = volume_request()
                reply = codec.decode(await exchange(bound, wire(request)))
                assert reply.header.parent_msg_id == request.msg_id
                assert trio.current_time() - start < 0.4  # not held up by the idle one
                cut = codec.decode(await read_to_eof(idle))
                assert trio.current_time() - start >= 0.45
        assert_error(cut, None, containing="no complete request within 0.5 s")


async def test_connections_beyond_the_limit_wait_their_turn(sock_dir: Path) -> None:
    address = f"unix://{sock_dir}/k.sock"
    async with uds_hub(address, read_timeout=0.4, max_connections=1) as (_, bound, _received):
        with trio.fail_after(1.5):
            idle = await connect(bound)
            async with idle:
                await trio.sleep(0.05)
                start = trio.current_time()
                request = volume_request()
                reply = codec.decode(await exchange(bound, wire(request)))
                assert reply.header.parent_msg_id == request.msg_id
                # Served only once the idle one was cut.
                assert trio.current_time() - start >= 0.25


async def test_an_empty_connection_is_closed_without_answer(sock_dir: Path) -> None:
    async with uds_hub(f"unix://{sock_dir}/k.sock") as (_, bound, _received):
        with trio.fail_after(1):
            stream = await trio.open_unix_socket(unix_socket_path(bound))
            async with stream:
                await stream.send_eof()
                assert await read_to_eof(stream) == b""
        # Still serving.
        reply = codec.decode(await exchange(bound, wire(volume_request())))
        assert reply.operation == "response"


# --- the socket file ----------------------------------------------------------------------


async def test_socket_is_0600_in_a_created_directory_and_removed_on_exit(sock_dir: Path) -> None:
    path = sock_dir / "var" / "lib" / "kubeedge" / "kubeedge.sock"
    async with open_test_hub() as th, trio.open_nursery() as nursery:
        bound = await nursery.start(serve_uds, th.hub.request_volume, f"unix://{path}")
        assert bound == f"unix://{path}"
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not path.exists()
    assert path.parent.is_dir()


def test_kubeedge_address_forms() -> None:
    assert unix_socket_path("unix:///var/lib/kubeedge/kubeedge.sock") == (
        "/var/lib/kubeedge/kubeedge.sock"
    )
    assert unix_socket_path("unix://var/lib/kubeedge/kubeedge.sock") == (
        "/var/lib/kubeedge/kubeedge.sock"
    )
    assert tcp_host_port("tcp://[::1]:10005") == ("::1", 10005)
    assert tcp_host_port("tcp://:10005") == ("", 10005)
    for bad in ("unix://", "http://x", "/var/lib/x.sock"):
        with pytest.raises(ValueError):
            unix_socket_path(bad)
    for bad in ("tcp://host", "tcp://host:x", "tcp://h:70000"):
        with pytest.raises(ValueError):
            tcp_host_port(bad)


async def test_a_stale_socket_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "k.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    async with uds_hub(f"unix://{path}") as (_, bound, _received):
        reply = codec.decode(await exchange(bound, wire(volume_request())))
        assert reply.operation == "response"
    assert not path.exists()


async def test_a_regular_file_at_the_path_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "k.sock"
    path.write_text("precious")
    async with open_test_hub() as th:
        with pytest.raises(UdsSocketError) as caught:
            await th.nursery.start(serve_uds, th.hub.request_volume, f"unix://{path}")
    assert str(path) in str(caught.value)
    assert "not a socket" in str(caught.value)
    assert path.read_text() == "precious"


async def test_a_socket_that_cannot_be_created_raises_with_path_and_reason(
    sock_dir: Path,
) -> None:
    (sock_dir / "file").write_text("")
    path = sock_dir / "file" / "k.sock"  # parent is not a directory (EACCES needs non-root)
    async with open_test_hub() as th:
        with pytest.raises(UdsSocketError) as caught:
            await th.nursery.start(serve_uds, th.hub.request_volume, f"unix://{path}")
    assert isinstance(caught.value, OSError)
    assert str(path) in str(caught.value)
    assert caught.value.errno is not None


# --- the hub's side -----------------------------------------------------------------------


async def test_request_volume_waiter_is_removed_on_cancellation() -> None:
    received: list[Message] = []
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        th.nursery.start_soon(partial(run_volume_edge, edge, received, answer=False))
        with trio.move_on_after(0.05):
            await th.hub.request_volume(volume_request())
        assert th.hub._volume_waiters == {}


async def test_request_volume_refusals() -> None:
    async with open_test_hub() as th:
        with pytest.raises(VolumeRequestError, match="not connected"):
            await th.hub.request_volume(volume_request(node="away"))
        with pytest.raises(VolumeRequestError, match="names no node"):
            await th.hub.request_volume(volume_request().with_resource("default/volume/v"))
        with pytest.raises(VolumeRequestError, match="not a volume operation"):
            await th.hub.request_volume(volume_request(operation="update"))
        assert th.hub._volume_waiters == {}


async def test_answers_from_another_node_or_for_nobody_are_dropped() -> None:
    n1_got: list[Message] = []
    async with open_test_hub() as th:
        n1 = await th.connect("n1")
        th.nursery.start_soon(partial(run_volume_edge, n1, n1_got, answer=False))
        n2 = await th.connect("n2")
        request = volume_request()
        result: list[Message] = []

        async def ask() -> None:
            result.append(await th.hub.request_volume(request))

        th.nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()

        def answer(parent: str) -> str:
            return codec.encode(
                new_message(
                    source="edged",
                    group="resource",
                    operation="response",
                    resource="default/volume/vol-1",
                    content=ANSWER,
                    now_ms=0,
                    parent_msg_id=parent,
                )
            )

        await n2.send(answer(request.msg_id))  # not the node asked
        await n1.send(answer("no-such-request"))
        await trio.testing.wait_all_tasks_blocked()
        assert result == [] and request.msg_id in th.hub._volume_waiters
        await n1.send(answer(request.msg_id))
        await trio.testing.wait_all_tasks_blocked()
        assert [m.header.parent_msg_id for m in result] == [request.msg_id]
        assert th.hub._volume_waiters == {}


async def test_a_request_without_id_gets_one() -> None:
    received: list[Message] = []
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        th.nursery.start_soon(partial(run_volume_edge, edge, received))
        request = volume_request()
        request = Message(header=Header(msg_id="", timestamp=0), route=request.route)
        with trio.fail_after(1):
            reply = await th.hub.request_volume(request)
        assert reply.header.parent_msg_id
        assert [m.msg_id for m in received if m.operation == "createvolume"] == [
            reply.header.parent_msg_id
        ]


# --- framing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "end"),
    [
        (b'{"a": "}"}xyz', 10),
        (b'{"a": "\\"}"}', 12),
        (b'  {"a": [1, {"b": 2}]}\n', 22),
        (b"  hello", 7),
        (b'{"a": ', None),
        (b"   ", None),
    ],
)
def test_json_end_scanner(stream: bytes, end: int | None) -> None:
    whole = _JsonEnd()
    assert whole.feed(stream) == (end is not None)
    assert whole.end == end
    bytewise = _JsonEnd()
    for index in range(1, len(stream) + 1):
        if bytewise.feed(stream[:index]):
            break
    if stream.lstrip().startswith(b"{"):
        assert bytewise.end == end
    else:  # not an object: ended at once, the parser says what is wrong
        assert (bytewise.end is not None) == (end is not None)


async def test_a_tcp_port_in_use_raises_with_address_and_reason() -> None:
    async with uds_hub("tcp://127.0.0.1:0", connect=False) as (th, bound, _):
        with pytest.raises(UdsSocketError) as caught:
            await th.nursery.start(serve_uds, th.hub.request_volume, bound)
        assert bound in str(caught.value)


async def test_a_node_that_disconnects_before_answering_fails_the_request_at_once(
    sock_dir: Path,
) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        bound = await th.nursery.start(
            partial(serve_uds, th.hub.request_volume, f"unix://{sock_dir}/k.sock")
        )
        request = volume_request()
        replies: list[bytes] = []

        async def ask() -> None:
            replies.append(await exchange(bound, wire(request), within=2))

        with trio.fail_after(2):  # far below the 60 s answer timeout
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                while True:  # the edge gets the request, then goes away without answering
                    if codec.decode(await edge.receive()).operation == "createvolume":
                        break
                await edge.aclose()
        reply = codec.decode(replies[0])
        assert_error(reply, request, containing="node n1 disconnected before answering")
        assert th.hub._volume_waiters == {}
