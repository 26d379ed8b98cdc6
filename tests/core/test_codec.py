"""The Go-compatible codec: byte-exact round trips of real frames, and bad input."""

from __future__ import annotations

import json

import pytest

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Header, Message, Route, new_message


def test_every_recorded_frame_round_trips_byte_for_byte() -> None:
    from tests.vectors import load_frames

    frames = load_frames()
    assert len(frames) > 50
    for _name, _direction, data in frames:
        assert codec.encode(codec.decode(data)) == data


def test_empty_fields_are_omitted_and_route_and_content_always_present() -> None:
    message = Message(Header(msg_id="id", timestamp=5), Route(), None)
    assert (
        codec.encode(message)
        == '{"header":{"msg_id":"id","timestamp":5},"route":{},"content":null}\n'
    )


def test_header_key_order_matches_go() -> None:
    message = Message(
        Header(
            msg_id="a", timestamp=1, parent_msg_id="p", resource_version="9", sync=True, type="t"
        ),
        Route(source="s", destination="d", group="g", operation="o", resource="r"),
        "x",
    )
    text = codec.encode(message)
    assert text.startswith(
        '{"header":{"msg_id":"a","parent_msg_id":"p","timestamp":1,"resourceversion":"9",'
        '"sync":true,"type":"t"},"route":{"source":"s","destination":"d","group":"g",'
        '"operation":"o","resource":"r"},"content":"x"}'
    )
    assert codec.decode(text) == message


def test_html_characters_are_escaped_like_go() -> None:
    message = new_message(
        source="s", group="g", operation="o", resource="r", content="<a&b>\u2028", now_ms=1
    )
    text = codec.encode(message)
    assert "\\u003ca\\u0026b\\u003e\\u2028" in text
    assert codec.decode(text).content == "<a&b>\u2028"


def test_non_ascii_is_written_as_utf8() -> None:
    message = new_message(source="s", group="g", operation="o", resource="r", content="é", now_ms=1)
    assert '"content":"é"' in codec.encode(message)


def test_decode_accepts_bytes_trailing_newline_and_unknown_keys() -> None:
    raw = (
        b'{"header":{"msg_id":"m","timestamp":3,"extra":1},"route":{"x":"y"},'
        b'"content":[1],"more":{}}\n'
    )
    message = codec.decode(raw)
    assert (message.msg_id, message.header.timestamp, message.content) == ("m", 3, [1])


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1,2]",
        '"text"',
        '{"header":{"msg_id":"m","timestamp":1.5},"route":{},"content":null}',
        '{"header":{"msg_id":"m","timestamp":"1"},"route":{},"content":null}',
        '{"header":{"msg_id":3,"timestamp":1},"route":{},"content":null}',
        '{"header":[],"route":{},"content":null}',
        '{"header":{"msg_id":"m","timestamp":1},"route":{"resource":7},"content":null}',
        '{"header":{"msg_id":"m","timestamp":1,"sync":"yes"},"route":{},"content":null}',
        '{"header":{"msg_id":"m","timestamp":99999999999999999999999},"route":{},"content":null}',
        b"\xff\xfe",
        "[" * 100000,
    ],
)
def test_malformed_frames_raise_codec_error(frame: str | bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(frame)


def test_oversized_frame_is_rejected_before_parsing() -> None:
    with pytest.raises(codec.FrameTooLarge):
        codec.decode("x" * 101, max_size=100)


def test_large_content_round_trips() -> None:
    content = {"data": {"big": "v" * (3 * 1024 * 1024)}}
    message = new_message(
        source="s", group="g", operation="o", resource="r", content=content, now_ms=1
    )
    assert json.loads(codec.encode(message))["content"] == content


def test_message_ids_are_random_version_4_uuids() -> None:
    import uuid

    from trio_cloudhub.core.message import new_msg_id

    ids = [new_msg_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
