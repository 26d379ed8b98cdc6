"""KubeEdge QUIC framing: packer header, protobuf body, content translation, header message."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from trio_cloudhub.core import quic_codec
from trio_cloudhub.core.message import Header, Message, Route, new_message
from trio_cloudhub.core.quic_codec import (
    HEADER_RESOURCE,
    MAX_PAYLOAD,
    PACKER_HEADER_SIZE,
    FrameError,
    PacketReader,
    header_message,
    header_reply,
    pack,
    parse_header,
    unpack_payload,
)

EXAMPLE_ID = "0b6c3b6e-8a3f-4c55-9f0e-2c1d5f1b2a3c"
EXAMPLE_TS = 1645412517000
EXAMPLE_PROJECT = "e632aba927ea4ac2b575ec1603d56f10"
EXAMPLE_JSON = b'{"Node_id":["edge-1"],"Project_id":["e632aba927ea4ac2b575ec1603d56f10"]}'


def _message(content: Any = None, **route: str) -> Message:
    return Message(Header(msg_id="m-1", timestamp=7), Route(**route), content)


def _wire_content(content: Any) -> bytes:
    """The Content bytes `pack` puts on the wire (last field of the payload)."""
    payload = pack(_message(content))[PACKER_HEADER_SIZE:]
    fixed = pack(_message(b""))[PACKER_HEADER_SIZE:]  # same message without a Content field
    assert payload.startswith(fixed)
    rest = payload[len(fixed) :]
    if not rest:
        return b""
    assert rest[0] == 0x1A
    length, index, shift = 0, 1, 0
    while True:
        byte = rest[index]
        length |= (byte & 0x7F) << shift
        index += 1
        shift += 7
        if byte < 0x80:
            break
    assert len(rest) == index + length
    return rest[index:]


def _received(raw: bytes) -> Any:
    """The content `unpack_payload` makes of raw Content bytes from the peer."""
    return unpack_payload(pack(_message(raw))[PACKER_HEADER_SIZE:]).content


# --- the composed example of spec 4.2 -----------------------------------------------------


def test_composed_header_message_is_byte_exact() -> None:
    message = header_message("edge-1", EXAMPLE_PROJECT, EXAMPLE_TS, msg_id=EXAMPLE_ID)
    header_sub = b"\x0a\x24" + EXAMPLE_ID.encode() + b"\x18\x90\x92\xd4\xa3\xe3\x5f"
    router_sub = b"\x1a\x06header\x22\x06header"
    payload = b"\x0a\x2d" + header_sub + b"\x12\x10" + router_sub + b"\x1a\x48" + EXAMPLE_JSON
    # The spec's example says 0x90 / 0x4d (144 / 77 bytes), but its own header map is 72 bytes
    # long (KubeEdge's client sets exactly node_id and project_id): 139 / 0x48 are the figures.
    assert len(EXAMPLE_JSON) == 72
    assert len(payload) == 139
    data = pack(message)
    assert data == bytes.fromhex("01 01 01 00 01 00 00 00 00 8b") + payload
    assert data[10:18] == bytes.fromhex("0a 2d 0a 24 30 62 36 63")
    assert unpack_payload(data[PACKER_HEADER_SIZE:]) == message
    assert parse_header(message) == ("edge-1", EXAMPLE_PROJECT)


def test_header_message_gets_a_fresh_uuid_by_default() -> None:
    one = header_message("edge-1", "p", 5)
    two = header_message("edge-1", "p", 5)
    assert one.msg_id != two.msg_id
    assert str(uuid.UUID(one.msg_id)) == one.msg_id
    assert one.header.timestamp == 5
    assert one.route == Route(resource=HEADER_RESOURCE, operation=HEADER_RESOURCE)


# --- round trips ----------------------------------------------------------------------------


def test_every_carried_field_round_trips_and_the_others_come_back_empty() -> None:
    message = Message(
        Header(
            msg_id="id-1",
            timestamp=1645412518123,
            parent_msg_id="parent-1",
            resource_version="48213",
            sync=True,
            type="channel",
        ),
        Route(
            source="edgecontroller",
            destination="somewhere",
            group="resource",
            operation="insert",
            resource="default/pod/nginx",
        ),
        {"kind": "Pod", "metadata": {"name": "nginx", "labels": {"a": "<b>"}}, "n": [1, 2.5]},
    )
    back = unpack_payload(pack(message)[PACKER_HEADER_SIZE:])
    assert back.header == Header(
        msg_id="id-1", timestamp=1645412518123, parent_msg_id="parent-1", sync=True
    )
    assert back.route == Route(
        source="edgecontroller", group="resource", operation="insert", resource="default/pod/nginx"
    )
    assert back.content == message.content


@pytest.mark.parametrize("timestamp", [0, 1, -1, 2**63 - 1, -(2**63)])
def test_timestamp_is_zigzag_sint64(timestamp: int) -> None:
    message = _message()
    message = Message(Header(msg_id="m", timestamp=timestamp), Route(), None)
    assert unpack_payload(pack(message)[PACKER_HEADER_SIZE:]).header.timestamp == timestamp


def test_negative_one_is_encoded_as_zigzag_one() -> None:
    payload = pack(Message(Header(msg_id="", timestamp=-1), Route(), b""))[PACKER_HEADER_SIZE:]
    assert payload == b"\x0a\x02\x18\x01\x12\x00"


def test_empty_message_is_packed_like_go_and_comes_back_empty() -> None:
    empty = Message(Header(msg_id="", timestamp=0), Route(), None)
    data = pack(empty)
    # Go's translator always sets header and router; json.Marshal(nil) is `null`.
    assert data == bytes.fromhex("01010100 01 00 0000000a") + b"\x0a\x00\x12\x00\x1a\x04null"
    back = unpack_payload(data[PACKER_HEADER_SIZE:])
    assert back == empty
    assert back.is_empty()
    assert unpack_payload(b"").is_empty()


def test_ack_and_keepalive_round_trip() -> None:
    keepalive = new_message(
        source="websocket",
        group="resource",
        operation="keepalive",
        resource="node",
        content="ping",
        now_ms=3,
    )
    assert unpack_payload(pack(keepalive)[PACKER_HEADER_SIZE:]) == keepalive


# --- content translation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (None, b"null"),
        (b"", b""),
        (b"\x00\xffraw", b"\x00\xffraw"),
        (bytearray(b"ba"), b"ba"),
        ("OK", b"OK"),
        ("", b""),
        ("é\u2028", "é\u2028".encode()),
        ({"a": "<&>", "b": None}, b'{"a":"\\u003c\\u0026\\u003e","b":null}'),
        ([1, "x"], b'[1,"x"]'),
        (5, b"5"),
        (True, b"true"),
    ],
)
def test_content_goes_out_like_beehive_get_content_data(content: Any, wire: bytes) -> None:
    assert _wire_content(content) == wire


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"", None),
        (b"null", None),
        (b"OK", "OK"),
        (b"ping", "ping"),
        (b"ack", "ack"),
        (b'"OK"', "OK"),  # a v1.10 edge JSON-quotes its string contents
        (b'"a\\u003cb"', "a<b"),
        (b"123", "123"),
        (b"true", "true"),
        (b"-", "-"),
        (b'{"a":1,"b":[true,null]}', {"a": 1, "b": [True, None]}),
        (b" \n[1, 2]\n", [1, 2]),
        (b"{not json", "{not json"),
        (b'"unterminated', '"unterminated'),
        (b'"a" "b"', '"a" "b"'),
        (b"[NaN]", "[NaN]"),
        (b'{"a": Infinity}', '{"a": Infinity}'),
        ("é".encode(), "é"),
        (b"\xff\x00", "/wA="),  # not UTF-8: base64 as Go marshals a []byte
        (b"[" * 100_000, "[" * 100_000),
    ],
)
def test_content_comes_in_as_a_json_value(wire: bytes, content: Any) -> None:
    assert _received(wire) == content


def test_deeply_nested_but_valid_json_stays_text() -> None:
    text = "[" * 50_000 + "]" * 50_000
    assert _received(text.encode()) == text


# --- pack refusals ----------------------------------------------------------------------------


def test_pack_refuses_a_payload_over_the_bound_naming_both_numbers() -> None:
    message = _message("x" * 200)
    size = len(pack(message)) - PACKER_HEADER_SIZE
    assert len(pack(message, max_payload=size)) == PACKER_HEADER_SIZE + size
    with pytest.raises(FrameError, match=rf"{size} bytes exceeds the bound of {size - 1}"):
        pack(message, max_payload=size - 1)


def test_pack_default_bound_is_kubeedge_32_mib() -> None:
    assert MAX_PAYLOAD == 32 * 1024 * 1024
    with pytest.raises(FrameError, match="exceeds the bound"):
        pack(_message(b"x" * MAX_PAYLOAD))


@pytest.mark.parametrize(
    "message",
    [
        _message({1, 2}),
        _message("\udc80"),
        _message({"a": "\ud800"}),
        Message(Header(msg_id="\ud800", timestamp=1), Route(), None),
        Message(Header(msg_id="m", timestamp=2**63), Route(), None),
        Message(Header(msg_id="m", timestamp=1), Route(resource="\udfff"), None),
    ],
)
def test_pack_raises_frame_error_for_unrepresentable_messages(message: Message) -> None:
    with pytest.raises(FrameError):
        pack(message)


# --- payload parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x05\x01",  # length past the end
        b"\xff\xff\xff",  # truncated varint tag
        b"\x0a\x03\x0a\x01\xff",  # header.ID not UTF-8
        b"\x0a\x02\x18",  # truncated timestamp
        b"\x1a",  # content with no length
        b"\x00",  # field number 0
    ],
)
def test_garbage_payload_is_a_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError, match="not a protobuf"):
        unpack_payload(payload)


def test_unknown_fields_are_ignored_like_go() -> None:
    payload = pack(_message("x", source="s"))[PACKER_HEADER_SIZE:] + b"\x20\x01\x2a\x01z"
    assert unpack_payload(payload) == _message("x", source="s")


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)
    assert FrameError("x").messages == ()


# --- PacketReader -----------------------------------------------------------------------------


def _stream(count: int) -> tuple[list[Message], bytes]:
    messages = [
        new_message(
            source="edged",
            group="meta",
            operation="update",
            resource=f"default/pod/p{index}",
            content={"index": index, "pad": "x" * (index * 37 % 300)},
            now_ms=1000 + index,
        )
        for index in range(count)
    ]
    return messages, b"".join(pack(message) for message in messages)


def test_reader_takes_a_stream_byte_by_byte() -> None:
    messages, data = _stream(3)
    reader = PacketReader()
    out: list[Message] = []
    for index in range(len(data)):
        out.extend(reader.feed(data[index : index + 1]))
        assert reader.buffered <= PACKER_HEADER_SIZE + MAX_PAYLOAD
    assert out == messages
    assert reader.buffered == 0


def test_reader_takes_many_packets_in_one_feed() -> None:
    messages, data = _stream(50)
    reader = PacketReader()
    assert reader.feed(data) == messages
    assert reader.buffered == 0
    assert reader.feed(b"") == []


def test_reader_takes_random_splits() -> None:
    messages, data = _stream(40)
    rng = random.Random(4)
    reader = PacketReader()
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 700)
        out.extend(reader.feed(data[pos : pos + step]))
        pos += step
    assert out == messages


def test_reader_buffered_counts_the_incomplete_packet() -> None:
    message = _message("hello")
    data = pack(message)
    reader = PacketReader()
    assert reader.feed(data[:4]) == []  # truncated header stays buffered
    assert reader.buffered == 4
    assert reader.feed(data[4:12]) == []
    assert reader.buffered == 12
    assert reader.feed(data[12:] + data[:3]) == [message]
    assert reader.buffered == 3
    assert reader.feed(data[3:]) == [message]
    assert reader.buffered == 0


def test_reader_ignores_version_type_and_flags() -> None:
    message = _message("x")
    data = bytearray(pack(message))
    data[0:6] = b"\x09\x08\x07\x06\x02\x80"
    assert PacketReader().feed(bytes(data)) == [message]


def test_reader_delivers_a_zero_length_packet_as_the_empty_message() -> None:
    reader = PacketReader()
    (message,) = reader.feed(bytes.fromhex("01010100 01 00 00000000"))
    assert message.is_empty()
    assert reader.buffered == 0


def test_reader_refuses_a_length_over_the_bound_before_buffering() -> None:
    reader = PacketReader(max_payload=100)
    header = bytes.fromhex("01010100 01 00") + (101).to_bytes(4, "big")
    with pytest.raises(FrameError, match="101 bytes exceeds the bound of 100"):
        reader.feed(header + b"x" * 50)
    assert reader.buffered == 0
    with pytest.raises(FrameError, match="already failed"):
        reader.feed(pack(_message()))


def test_reader_refuses_the_default_bound_plus_one() -> None:
    reader = PacketReader()
    header = bytes.fromhex("01010100 01 00") + (MAX_PAYLOAD + 1).to_bytes(4, "big")
    with pytest.raises(FrameError, match=f"{MAX_PAYLOAD + 1} bytes exceeds the bound of"):
        reader.feed(header)
    assert reader.buffered == 0


def test_reader_accepts_exactly_the_bound() -> None:
    message = _message("y" * 100)
    data = pack(message)
    reader = PacketReader(max_payload=len(data) - PACKER_HEADER_SIZE)
    assert reader.feed(data) == [message]


def test_reader_raises_on_a_garbage_payload_and_keeps_the_messages_before_it() -> None:
    good = _message("ok")
    bad = bytes.fromhex("01010100 01 00 00000003") + b"\x0a\x05\x01"
    reader = PacketReader()
    with pytest.raises(FrameError, match="not a protobuf") as caught:
        reader.feed(pack(good) + bad + pack(good))
    assert caught.value.messages == (good,)
    assert reader.buffered == 0
    with pytest.raises(FrameError, match="already failed"):
        reader.feed(pack(good))


def test_reader_rejects_a_negative_bound() -> None:
    with pytest.raises(ValueError, match="negative"):
        PacketReader(max_payload=-1)


# --- header message ---------------------------------------------------------------------------


def _header(content: Any, resource: str = "header", operation: str = "header") -> Message:
    return Message(
        Header(msg_id="h", timestamp=1), Route(resource=resource, operation=operation), content
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"Node_id": ["edge-1"], "Project_id": ["p"]}, ("edge-1", "p")),
        ({"node_id": ["edge-1"], "project_id": ["p"]}, ("edge-1", "p")),
        ({"NODE_ID": ["edge-1"], "PROJECT_ID": ["p"]}, ("edge-1", "p")),
        ({"Node_id": ["edge-1"]}, ("edge-1", "")),
        ({"Node_id": ["edge-1", "edge-2"], "Project_id": None}, ("edge-1", "")),
        ({"node_id": ["other"], "Node_id": ["edge-1"]}, ("edge-1", "")),  # Go's exact key wins
        ({"Node_id": ["edge-1"], "Connectionuse": ["msg"], "X": None}, ("edge-1", "")),
        ('{"Node_id":["edge-1"],"Project_id":["p"]}', ("edge-1", "p")),
        (EXAMPLE_JSON, ("edge-1", EXAMPLE_PROJECT)),
    ],
)
def test_parse_header_reads_the_go_http_header_map(content: Any, expected: tuple[str, str]) -> None:
    assert parse_header(_header(content)) == expected


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (_header({"Node_id": ["e"]}, resource="node"), "not a header message"),
        (_header({"Node_id": ["e"]}, operation="keepalive"), "not a header message"),
        (_header("not json"), "not JSON"),
        (_header(b"\xff\xfe"), "not JSON"),
        (_header("[NaN]"), "not JSON"),
        (_header(None), "not a JSON object"),
        (_header(["Node_id", "e"]), "not a JSON object"),
        (_header('["Node_id"]'), "not a JSON object"),
        (_header({"Node_id": "edge-1"}), "not a list of strings"),
        (_header({"Node_id": [1]}), "not a list of strings"),
        (_header({"Node_id": [["edge-1"]]}), "not a list of strings"),
        (_header({"Node_id": []}), "no node id"),
        (_header({"Node_id": [""]}), "no node id"),
        (_header({"Node_id": None}), "no node id"),
        (_header({"Project_id": ["p"]}), "no node id"),
        (_header({"Node-id": ["edge-1"]}), "no node id"),
        (_header({}), "no node id"),
        (_header("x" * (1024 * 1024 + 1)), "above"),
    ],
)
def test_parse_header_refuses_unusable_header_messages(message: Message, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        parse_header(message)


def test_header_message_with_bad_json_over_the_wire_is_refused() -> None:
    message = _header(b'{"Node_id":["edge-1"]')  # truncated JSON: arrives as text
    received = unpack_payload(pack(message)[PACKER_HEADER_SIZE:])
    assert received.content == '{"Node_id":["edge-1"]'
    with pytest.raises(FrameError, match="not JSON"):
        parse_header(received)


@pytest.mark.parametrize(("ok", "content"), [(True, "ack"), (False, "nack")])
def test_header_reply_answers_the_request(ok: bool, content: str) -> None:
    request = header_message("edge-1", EXAMPLE_PROJECT, EXAMPLE_TS, msg_id=EXAMPLE_ID)
    reply = header_reply(request, ok=ok, now_ms=EXAMPLE_TS + 5)
    assert reply.header.parent_msg_id == EXAMPLE_ID
    assert reply.header.timestamp == EXAMPLE_TS + 5
    assert reply.msg_id not in ("", EXAMPLE_ID)
    assert reply.route == Route(resource="header", operation="response")
    assert reply.content == content
    data = pack(reply)
    assert data.endswith(b"\x1a" + bytes([len(content)]) + content.encode())
    assert PacketReader().feed(data) == [reply]


def test_module_imports_no_trio_or_asyncio() -> None:
    source = Path(quic_codec.__file__).read_text(encoding="utf-8")
    assert "import trio" not in source
    assert "asyncio" not in source
