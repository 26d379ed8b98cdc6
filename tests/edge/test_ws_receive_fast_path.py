"""The receive fast path of the WebSocket transport against wsproto as the reference.

Every byte sequence goes through two readers: `WebSocketConnection.receive()` on a scripted
stream (the fast path for whole single-frame messages, wsproto for the rest), cut into reads in
several ways, and a reader that hands every byte to wsproto, as the transport did before the
fast path. Both must yield the same messages and send the peer the same frames (pongs, close
code and reason).
"""

from __future__ import annotations

import random
import ssl
import struct
from collections.abc import Iterable, Sequence
from functools import partial

import attrs
import pytest
import trio
from certs import Pki
from test_edge_websocket import EchoRecorder, dial, start_server
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.edge.tls import TlsTransport
from trio_cloudhub.edge.websocket import StreamTransport, WebSocketConnection, serve_websocket

MiB = 1024 * 1024
MASK = b"\x37\xfa\x21\x3d"
SIZES = [0, 1, 125, 126, 65535, 65536, MiB]


# --- frames, built here by hand (RFC 6455 5.2) so that odd ones can be made too ---------------


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bytes | None = MASK,
    rsv: int = 0,
    length_bytes: int | None = None,
) -> bytes:
    """One frame; `length_bytes` forces a 0/2/8-byte extended length (even a non-minimal one)."""
    size = len(payload)
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 0x10000 else 8
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if mask is not None else 0
    if length_bytes == 0:
        head += bytes([mask_bit | size])
    elif length_bytes == 2:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if mask is None:
        return head + payload
    keys = (mask * (size // 4 + 1))[:size]
    return head + mask + bytes(a ^ b for a, b in zip(payload, keys, strict=True))


def text(payload: str | bytes, **kwargs: object) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return frame(0x1, data, **kwargs)  # type: ignore[arg-type]


def binary(payload: bytes, **kwargs: object) -> bytes:
    return frame(0x2, payload, **kwargs)  # type: ignore[arg-type]


def continuation(payload: str | bytes, **kwargs: object) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return frame(0x0, data, **kwargs)  # type: ignore[arg-type]


def ping(payload: bytes = b"p", **kwargs: object) -> bytes:
    return frame(0x9, payload, **kwargs)  # type: ignore[arg-type]


def close(code: int = 1000, reason: str = "bye", **kwargs: object) -> bytes:
    return frame(0x8, struct.pack("!H", code) + reason.encode(), **kwargs)  # type: ignore[arg-type]


def text_of(size: int) -> str:
    """Text of exactly `size` UTF-8 bytes, with two-byte characters that reads may cut."""
    pairs = size // 4
    return "é" * pairs + "x" * (size - 2 * pairs)


def bytes_of(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


# --- the two readers ---------------------------------------------------------------------------


@attrs.frozen
class Transcript:
    messages: list[str | bytes]
    to_peer: list[tuple[object, ...]]  # what the peer reads from us: pongs, the close frame


def peer_view(sent: bytes, *, we_are_client: bool) -> list[tuple[object, ...]]:
    peer = Connection(ConnectionType.SERVER if we_are_client else ConnectionType.CLIENT)
    peer.receive_data(sent)
    seen: list[tuple[object, ...]] = []
    for event in peer.events():
        if isinstance(event, Pong):
            seen.append(("pong", bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            seen.append(("close", event.code, event.reason))
        else:
            seen.append(("other", repr(event)))
    return seen


def wsproto_transcript(data: bytes, *, client: bool = False) -> Transcript:
    """Every byte through wsproto, answered as WebSocketConnection always has."""
    ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
    ws.receive_data(data)
    messages: list[str | bytes] = []
    parts: list[str | bytes] = []
    sent = b""
    event: Event
    for event in ws.events():
        if isinstance(event, (TextMessage, BytesMessage)):
            payload = event.data
            parts.append(bytes(payload) if isinstance(payload, bytearray) else payload)
            if event.message_finished:
                empty: str | bytes = "" if isinstance(event.data, str) else b""
                messages.append(empty.join(parts))  # type: ignore[arg-type]
                parts = []
        elif isinstance(event, Ping):
            sent += ws.send(event.response())
        elif isinstance(event, CloseConnection):
            reason = None if ws.state is ConnectionState.REMOTE_CLOSING else event.reason
            sent += ws.send(CloseConnection(code=event.code, reason=reason))
            break
    return Transcript(messages, peer_view(sent, we_are_client=client))


class ScriptedStream(trio.abc.Stream):
    """Returns the given chunks, one per read, then EOF; keeps what is sent."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = list(chunks)
        self.reads = 0
        self.sent = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.reads >= len(self.chunks):
            return b""
        self.reads += 1
        return self.chunks[self.reads - 1]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def connection_on(
    stream: trio.abc.Stream, *, client: bool = False, max_size: int = 64 * MiB
) -> WebSocketConnection:
    return WebSocketConnection(
        StreamTransport(stream),
        client=client,
        node_id="edge-1",
        project_id="p",
        remote="test",
        max_message_size=max_size,
    )


async def fast_transcript(
    chunks: Sequence[bytes], *, client: bool = False, max_size: int = 64 * MiB
) -> tuple[Transcript, str]:
    stream = ScriptedStream(chunks)
    connection = connection_on(stream, client=client, max_size=max_size)
    messages: list[str | bytes] = []
    with trio.fail_after(30):
        while True:
            try:
                messages.append(await connection.receive())
            except EdgeDisconnected as exc:
                ending = str(exc)
                break
    return Transcript(messages, peer_view(stream.sent, we_are_client=client)), ending


def cuts(data: bytes, how: str, seed: int = 0) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[index : index + 1] for index in range(len(data))]
    # "random": reads of 1 to 64 bytes, with one of up to 16 KiB (a TLS record) now and then
    rng = random.Random(seed)
    pieces, start = [], 0
    while start < len(data):
        size = rng.randint(1, 16 * 1024) if rng.random() < 0.2 else rng.randint(1, 64)
        pieces.append(data[start : start + size])
        start += size
    return pieces


async def assert_same(data: bytes, hows: Sequence[str], *, client: bool = False) -> Transcript:
    reference = wsproto_transcript(data, client=client)
    for how in hows:
        got, _ = await fast_transcript(cuts(data, how), client=client)
        assert got == reference, how
    return reference


# --- single-frame messages -------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_single_frame_messages_match_wsproto(size: int, kind: str) -> None:
    message: str | bytes = text_of(size) if kind == "text" else bytes_of(size)
    first = text(message) if isinstance(message, str) else binary(message)
    # Two frames behind it in the same reads: leftovers must stay in order.
    data = first + text("after") + binary(b"\x00\xff")
    hows = ["whole", "random"] + (["bytewise"] if size <= 65536 else [])
    reference = await assert_same(data, hows)
    assert reference.messages == [message, "after", b"\x00\xff"]
    assert reference.to_peer == []


@pytest.mark.parametrize("size", SIZES)
async def test_client_side_reads_unmasked_server_frames(size: int) -> None:
    data = text(text_of(size), mask=None) + binary(bytes_of(size), mask=None)
    reference = await assert_same(data, ["whole", "random"], client=True)
    assert reference.messages == [text_of(size), bytes_of(size)]


async def test_many_small_frames_in_one_read() -> None:
    frames = [text(f'{{"n":{index}}}\n') for index in range(500)]
    reference = await assert_same(b"".join(frames), ["whole", "random", "bytewise"])
    assert len(reference.messages) == 500


# --- what goes to wsproto ----------------------------------------------------------------------


async def test_fragments_interleaved_with_pings_and_fast_frames() -> None:
    data = b"".join(
        [
            text("single"),
            text("frag-é-one ", fin=False),
            ping(b"1"),
            continuation("two ", fin=False),
            ping(b"2"),
            ping(b""),
            continuation("three"),
            text("fast again"),
            binary(bytes_of(300), fin=False),
            continuation(bytes_of(70000), fin=False),  # a 64-bit length inside a message
            ping(b"3"),
            continuation(b"end"),
            binary(b"last"),
            ping(b"4"),
        ]
    )
    reference = await assert_same(data, ["whole", "random", "bytewise"])
    assert reference.messages == [
        "single",
        "frag-é-one two three",
        "fast again",
        bytes_of(300) + bytes_of(70000) + b"end",
        b"last",
    ]
    assert reference.to_peer == [("pong", payload) for payload in [b"1", b"2", b"", b"3", b"4"]]


async def test_utf8_sequence_split_across_fragments() -> None:
    encoded = "aé€𝄞z".encode()
    data = text(encoded[:2], fin=False) + continuation(encoded[2:5], fin=False)
    data += continuation(encoded[5:])
    reference = await assert_same(data, ["whole", "bytewise"])
    assert reference.messages == ["aé€𝄞z"]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("invalid UTF-8", text(b"ok \xff\xfe")),
        ("truncated UTF-8", text(b"ok \xc3")),
        ("invalid UTF-8, 16-bit length", text(b"x" * 200 + b"\xed\xa0\x80")),
        ("invalid UTF-8 in a fragment", text(b"a", fin=False) + continuation(b"\xff")),
        ("unmasked", text("unmasked", mask=None)),
        ("unmasked binary", binary(b"x" * 300, mask=None)),
        ("RSV1", text("x", rsv=4)),
        ("RSV3 on binary", binary(b"x", rsv=1)),
        ("reserved opcode", frame(0x3, b"x")),
        ("reserved control opcode", frame(0xB, b"x")),
        ("16-bit length for 125 bytes", text("x" * 125, length_bytes=2)),
        ("64-bit length for 65535 bytes", text("x" * 65535, length_bytes=8)),
        ("64-bit length with the top bit", text(b"", length_bytes=8)[:2] + b"\x80" + b"\0" * 7),
        ("continuation first", continuation("x")),
        ("text inside a fragmented message", text("a", fin=False) + text("b")),
        ("fragmented ping", ping(fin=False)),
        ("long ping", ping(b"x" * 126)),
        ("close with 1 byte", frame(0x8, b"\x03")),
        ("close with a reserved code", close(1004)),
    ],
)
async def test_protocol_errors_close_as_wsproto_does(name: str, data: bytes) -> None:
    data = text("before") + data + text("never read")
    reference = await assert_same(data, ["whole", "bytewise"])
    assert reference.messages == ["before"], name
    ((kind, code, _),) = reference.to_peer
    assert kind == "close" and code in (1002, 1007), name
    _, ending = await fast_transcript([data])
    assert ending.startswith("protocol error:"), ending


async def test_invalid_utf8_closes_with_1007() -> None:
    got, ending = await fast_transcript([text(b"\xff")])
    assert got.messages == []
    ((kind, code, reason),) = got.to_peer
    assert (kind, code) == ("close", 1007)
    assert "UTF-8" in str(reason) or "utf-8" in str(reason)
    assert ending.startswith("protocol error:")


async def test_unmasked_client_frame_closes_with_1002() -> None:
    got, _ = await fast_transcript([text("x", mask=None)])
    assert got.messages == []
    assert got.to_peer[0][:2] == ("close", 1002)


async def test_masked_server_frame_closes_the_client_side() -> None:
    got, _ = await fast_transcript([text("x")], client=True)
    assert got.to_peer[0][:2] == ("close", 1002)


# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length_bytes", [0, 2, 8])
async def test_message_at_the_bound_passes(length_bytes: int) -> None:
    size = {0: 100, 2: 1000, 8: 70000}[length_bytes]
    got, _ = await fast_transcript([text("x" * size, length_bytes=length_bytes)], max_size=size)
    assert got.messages == ["x" * size]


@pytest.mark.parametrize("size", [101, 1001, 70001, 1 << 40])
async def test_frame_above_the_bound_is_refused_before_its_payload(size: int) -> None:
    """The header alone decides: the payload is never buffered (what follows the close frame
    is read and dropped, for at most CLOSE_TIMEOUT, so that our close frame is not overtaken
    by a TCP reset)."""
    head = text(b"", length_bytes=0 if size < 126 else 2 if size < 0x10000 else 8)[:2]
    if size < 126:
        head = bytes([0x81, 0x80 | size])
    elif size < 0x10000:
        head += struct.pack("!H", size)
    else:
        head += struct.pack("!Q", size)
    chunks = [text("ok"), head + MASK, b"x" * 50, b"x" * 50]
    stream = ScriptedStream(chunks)
    max_size = {101: 100, 1001: 1000, 70001: 70000, 1 << 40: MiB}[size]
    connection = connection_on(stream, max_size=max_size)
    with trio.fail_after(5):
        assert await connection.receive() == "ok"
        with pytest.raises(EdgeDisconnected, match=f"message above {max_size} bytes"):
            await connection.receive()
    assert not connection._buffer  # nothing kept after the header
    assert stream.reads == len(chunks)  # the rest was drained until EOF, and dropped
    assert peer_view(stream.sent, we_are_client=False) == [
        ("close", 1009, f"message above {max_size} bytes")
    ]


async def test_fragmented_message_above_the_bound_is_refused() -> None:
    data = text("x" * 600, fin=False) + continuation("x" * 600) + text("never")
    got, ending = await fast_transcript(cuts(data, "random"), max_size=1000)
    assert got.messages == []
    assert got.to_peer == [("close", 1009, "message above 1000 bytes")]
    assert ending == "message above 1000 bytes"


# --- close frames and the end of the stream -------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "bytewise"])
async def test_close_frame_after_messages(how: str) -> None:
    data = text("one") + binary(b"two") + close(1000, "bye") + text("after the close")
    reference = wsproto_transcript(data)
    got, ending = await fast_transcript(cuts(data, how))
    assert got == reference
    assert got.messages == ["one", b"two"]
    assert got.to_peer == [("close", 1000, "")]  # we echo the code, without a reason
    assert ending == "close frame from the peer (1000 bye)"


async def test_eof_inside_a_frame_is_a_disconnect() -> None:
    got, ending = await fast_transcript([text("whole"), text("cut short")[:5]])
    assert got.messages == ["whole"]
    assert ending == "closed without a close frame"


async def test_trailing_bytes_of_the_upgrade_are_read_first() -> None:
    """Frames pipelined behind the upgrade request, the last one cut: read before the socket."""
    stream = ScriptedStream([text("end")[2:]])
    connection = WebSocketConnection(
        StreamTransport(stream),
        client=False,
        node_id="edge-1",
        project_id="p",
        remote="test",
        max_message_size=MiB,
        trailing=text("start") + ping(b"t") + text("end")[:2],
    )
    with trio.fail_after(5):
        assert await connection.receive() == "start"
        assert await connection.receive() == "end"
    assert peer_view(stream.sent, we_are_client=False) == [("pong", b"t")]


# --- cancellation -----------------------------------------------------------------------------


class ChannelStream(trio.abc.Stream):
    """Reads come from a memory channel: the test decides when each byte arrives."""

    def __init__(self) -> None:
        self.send_channel, self._receive_channel = trio.open_memory_channel[bytes](1000)
        self.sent = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._receive_channel.receive()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_receive_is_cancel_safe_byte_by_byte(autojump_clock: trio.abc.Clock) -> None:
    data = text("one") + text("two-é", fin=False) + ping(b"x") + continuation("!")
    data += binary(bytes_of(300)) + text("x" * 70000)
    stream = ChannelStream()
    connection = connection_on(stream)
    got: list[str | bytes] = []
    for index in range(len(data)):
        stream.send_channel.send_nowait(data[index : index + 1])
        with trio.move_on_after(1):  # cancelled whenever it waits for the next byte
            while True:
                got.append(await connection.receive())
    assert got == ["one", "two-é!", bytes_of(300), "x" * 70000]
    assert peer_view(stream.sent, we_are_client=False) == [("pong", b"x")]


# --- over real TLS ----------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
async def test_over_tls_1_3_and_1_2(nursery: trio.Nursery, pki: Pki, tls: str) -> None:
    with trio.fail_after(20):
        recorder = EchoRecorder()
        port = await start_server(nursery, pki, recorder)
        context = pki.client_context()
        if tls == "1.2":
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        client = await dial(port, context)
        framer = Connection(ConnectionType.CLIENT)
        await client.send("hello")
        assert await client.receive() == "hello"
        (server_side,) = recorder.connections
        assert isinstance(server_side, WebSocketConnection)
        assert isinstance(server_side.transport, TlsTransport)
        assert isinstance(client.transport, TlsTransport)
        assert client.transport.version() == f"TLSv{tls}"
        big = text_of(MiB)
        parts = [framer.send(TextMessage(data="a" * 5000, message_finished=False))]
        parts.append(framer.send(Ping(payload=b"p")))
        parts.append(framer.send(TextMessage(data="b", message_finished=True)))
        for part in parts:
            await client.send_raw(part)
        assert await client.receive() == "a" * 5000 + "b"
        async with trio.open_nursery() as inner:
            inner.start_soon(client.send, big)
            assert await client.receive() == big
        for index in range(200):
            await client.send(f"k{index}")
        for index in range(200):
            assert await client.receive() == f"k{index}"
        await client.aclose()
        await recorder.ended.wait()
        assert "close frame" in str(recorder.endings[0])


async def test_tls_read_is_cancel_safe(nursery: trio.Nursery, pki: Pki) -> None:
    """Deadlines shorter than the gaps between bytes, over TLS (records split across reads)."""
    with trio.fail_after(20):
        got: list[str | bytes] = []
        done = trio.Event()

        async def impatient(connection: EdgeConnection) -> None:
            while len(got) < 3:
                with trio.move_on_after(0.002):
                    got.append(await connection.receive())
            done.set()

        port: int = await nursery.start(
            partial(
                serve_websocket,
                impatient,
                ssl_context=pki.server_context(),
                host="127.0.0.1",
                port=0,
                max_message_size=MiB,
            )
        )
        client = await dial(port, pki.client_context())
        data = text("one") + text("two") + text("x" * 300)
        for index in range(0, len(data), 7):
            await client.send_raw(data[index : index + 7])
            await trio.sleep(0.004)
        await done.wait()
        assert got == ["one", "two", "x" * 300]
        await client.aclose()
