"""KubeEdge's QUIC lane framing: a 10-byte packer header and a protobuf body (spec 4.2).

Every message on a QUIC stream is `version(4) type(1) flags(1) length(4)` (big-endian) followed
by `length` bytes of the protobuf `message.Message`. The reader ignores version, type and flags
as KubeEdge does, and refuses a length above the bound before it holds any of the payload.

Translation (viaduct `translator/message.go`, beehive `GetContentData`): `resourceversion`,
`destination` and `type` are not carried. Content goes out as the bytes of a `bytes` value, the
UTF-8 of a `str` (as v1.13+ does; older lines JSON-quote strings, see below), `null` for None (Go's
`json.Marshal(nil)`, which both KubeEdge lines send for a nil content) and Go-compatible JSON
for anything else. It always arrives as bytes, which we turn back into a JSON-able value:

- empty or `null` → None;
- a JSON object, array or string literal → the parsed value. Objects and arrays are what a Go
  struct, map or slice was marshalled to; a string literal is how an edge before v1.13 (v1.10)
  sends every Go string content (`"OK"`, `"ping"`; raw since kubeedge#4318);
- other UTF-8 text → that string, as it is. A v1.23 edge writes its string contents raw, so
  `OK`, `ping` or `123` are the strings the edge wrote; bare numbers and booleans are left as
  text because a raw Go string is far likelier content than a marshalled Go number;
- bytes that are not UTF-8 → their standard base64 text (with padding), which is what Go's
  encoding/json makes of a `[]byte`, so the content stays a JSON value for the rest of the hub.

The control stream's first message is the "header" message: resource and operation `header`,
content the JSON of a Go `http.Header` (`{"Node_id":["edge-1"],"Project_id":["..."]}`). The
server answers it with a response whose content is `ack` or `nack`.

Pure: no I/O, no clock (time comes in as `now_ms`). protobuf is the optional `quic` dependency;
only `edge/quic.py` imports this module.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from google.protobuf import (  # type: ignore[import-untyped,unused-ignore]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]

from trio_cloudhub.core.codec import go_json, strict_json_loads
from trio_cloudhub.core.message import (
    Header,
    Message,
    Route,
    new_msg_id,
    response_to,
)

PACKER_HEADER_SIZE = 10
MAX_PAYLOAD = 32 * 1024 * 1024  # KubeEdge v1.23.1 bound on read and write
USE_TYPE_SIZE = 3
USE_MESSAGE = b"msg"  # data stream use type (first 3 bytes on a data stream)
USE_STREAM = b"str"  # defined by KubeEdge, unused by CloudHub
HEADER_RESOURCE = "header"  # control stream header message: resource and operation

HEADER_ACK = "ack"
HEADER_NACK = "nack"

_VERSION = b"\x01\x01\x01\x00"  # major 1, minor 1, fix 1
_TYPE_MESSAGE = 0x01
_FLAGS = 0x00
_PACKER_PREFIX = _VERSION + bytes((_TYPE_MESSAGE, _FLAGS))
_LENGTH_LIMIT = 0xFFFFFFFF  # what the 4-byte length field can say
_MAX_HEADER_TEXT = 1024 * 1024  # Go's http.DefaultMaxHeaderBytes, for a header map given as text

_NODE_ID = "Node_id"
_PROJECT_ID = "Project_id"


class FrameError(ValueError):
    """A packet or payload that is not a KubeEdge QUIC message; the text says why.

    `messages` holds the whole messages a `PacketReader.feed` call decoded before it hit the
    fault, so that data accepted ahead of the bad packet is not lost.
    """

    def __init__(self, text: str, messages: Sequence[Message] = ()) -> None:
        super().__init__(text)
        self.messages: tuple[Message, ...] = tuple(messages)


# --- protobuf schema (viaduct pkg/protos/message/message.proto), built without protoc ------


def _build_message_class() -> Any:
    fdp = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="trio_cloudhub/viaduct/message.proto", package="message", syntax="proto3"
    )

    def add(message: Any, name: str, number: int, kind: int, type_name: str = "") -> None:
        field = message.field.add(name=name, number=number, type=kind, label=fdp.LABEL_OPTIONAL)
        if type_name:
            field.type_name = type_name

    header = file.message_type.add(name="MessageHeader")
    add(header, "ID", 1, fdp.TYPE_STRING)
    add(header, "ParentID", 2, fdp.TYPE_STRING)
    add(header, "Timestamp", 3, fdp.TYPE_SINT64)
    add(header, "Sync", 4, fdp.TYPE_BOOL)
    add(header, "MessageType", 5, fdp.TYPE_STRING)
    router = file.message_type.add(name="MessageRouter")
    add(router, "Source", 1, fdp.TYPE_STRING)
    add(router, "Group", 2, fdp.TYPE_STRING)
    add(router, "Operation", 3, fdp.TYPE_STRING)
    add(router, "Resource", 4, fdp.TYPE_STRING)
    message = file.message_type.add(name="Message")
    add(message, "header", 1, fdp.TYPE_MESSAGE, ".message.MessageHeader")
    add(message, "router", 2, fdp.TYPE_MESSAGE, ".message.MessageRouter")
    add(message, "Content", 3, fdp.TYPE_BYTES)

    pool = descriptor_pool.DescriptorPool()  # private: never clashes with another "message"
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("message.Message"))


_ProtoMessage: Any = _build_message_class()


# --- content translation ------------------------------------------------------------------

_JSON_WHITESPACE = b" \t\r\n"
_JSON_OPENERS = (b"{", b"[", b'"')
_NULL = b"null"


# NaN/Infinity and 1e400 refused, escaped lone surrogates made U+FFFD, as Go reads JSON.
_json_loads = strict_json_loads


def _content_to_bytes(content: Any) -> bytes:
    if content is None:
        return _NULL
    if isinstance(content, bytes | bytearray | memoryview):
        return bytes(content)
    try:
        if isinstance(content, str):
            return content.encode("utf-8")
        return go_json(content).encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError("content is not encodable as UTF-8 (lone surrogate)") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise FrameError(f"content is not JSON-encodable: {exc}") from None


def _content_from_bytes(data: bytes) -> Any:
    if not data or data == _NULL:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii")
    first = data.lstrip(_JSON_WHITESPACE)[:1]
    if first in _JSON_OPENERS:
        try:
            return _json_loads(text)
        except (ValueError, RecursionError):
            pass  # not (usable) JSON after all: the edge's raw string
    return text


# --- payload and packet -------------------------------------------------------------------


def _payload_of(message: Message) -> bytes:
    header, route = message.header, message.route
    try:
        proto = _ProtoMessage()
        proto.header.SetInParent()  # Go always sets both (translator Encode): `0a 00 12 00`
        proto.router.SetInParent()
        proto.header.ID = header.msg_id
        proto.header.ParentID = header.parent_msg_id
        proto.header.Timestamp = header.timestamp
        proto.header.Sync = header.sync
        proto.router.Source = route.source
        proto.router.Group = route.group
        proto.router.Operation = route.operation
        proto.router.Resource = route.resource
        proto.Content = _content_to_bytes(message.content)
        payload: bytes = proto.SerializeToString()
    except FrameError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"message not representable in protobuf: {exc}") from None
    return payload


def pack(message: Message, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """Packer header + protobuf payload of `message` (translation rules of spec 4.2)."""
    payload = _payload_of(message)
    bound = min(max_payload, _LENGTH_LIMIT)
    if len(payload) > bound:
        raise FrameError(f"payload of {len(payload)} bytes exceeds the bound of {bound} bytes")
    return _PACKER_PREFIX + len(payload).to_bytes(4, "big") + payload


def unpack_payload(payload: bytes) -> Message:
    """The Message of one protobuf payload; FrameError when it is not one."""
    proto = _ProtoMessage()
    try:
        proto.ParseFromString(bytes(payload))
    except (DecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"payload is not a protobuf message.Message: {exc}") from None
    ph, pr = proto.header, proto.router
    header = Header(
        msg_id=str(ph.ID),
        timestamp=int(ph.Timestamp),
        parent_msg_id=str(ph.ParentID),
        sync=bool(ph.Sync),
    )
    route = Route(
        source=str(pr.Source),
        group=str(pr.Group),
        operation=str(pr.Operation),
        resource=str(pr.Resource),
    )
    return Message(header=header, route=route, content=_content_from_bytes(bytes(proto.Content)))


class PacketReader:
    """Incremental: feed() any chunk of a stream's bytes, get the whole messages so far.

    Holds at most one incomplete packet (header + at most `max_payload` bytes): a length above
    the bound is refused as soon as the header is complete, before any payload is kept. After
    a FrameError the stream is out of step and every later feed() raises again.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must not be negative")
        self._max_payload = max_payload
        self._header = bytearray()  # the incomplete packet's header bytes
        self._payload = bytearray()  # its payload bytes so far (once the header is complete)
        self._need: int | None = None  # payload length once the header is complete
        self._failure: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete packet (its header and payload bytes so far)."""
        return len(self._header) + len(self._payload)

    def feed(self, data: bytes) -> list[Message]:
        if self._failure is not None:
            raise FrameError(f"stream already failed: {self._failure}")
        view = memoryview(data)
        end = len(view)
        pos = 0
        out: list[Message] = []
        while pos < end:
            need = self._need
            if need is None:
                take = min(PACKER_HEADER_SIZE - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < PACKER_HEADER_SIZE:
                    break
                length = int.from_bytes(self._header[6:10], "big")
                if length > self._max_payload:
                    self._fail(
                        f"packet length of {length} bytes exceeds the bound of "
                        f"{self._max_payload} bytes",
                        out,
                    )
                self._need = need = length
                if need == 0:
                    self._deliver(b"", out)
                continue
            if not self._payload and end - pos >= need:
                payload = bytes(view[pos : pos + need])  # whole payload at hand: one copy
                pos += need
            else:
                take = min(need - len(self._payload), end - pos)
                self._payload += view[pos : pos + take]
                pos += take
                if len(self._payload) < need:
                    break
                payload = bytes(self._payload)
            self._deliver(payload, out)
        return out

    def _deliver(self, payload: bytes, out: list[Message]) -> None:
        self._header.clear()
        self._payload.clear()
        self._need = None
        try:
            out.append(unpack_payload(payload))
        except FrameError as exc:
            self._fail(str(exc), out)

    def _fail(self, reason: str, out: list[Message]) -> None:
        self._failure = reason
        self._header.clear()
        self._payload.clear()
        self._need = None
        raise FrameError(reason, out)


# --- control stream header message --------------------------------------------------------


def header_message(
    node_id: str, project_id: str, now_ms: int, *, msg_id: str | None = None
) -> Message:
    """The control-stream message a QUIC client sends first (content: JSON of Go http.Header,
    e.g. {"Node_id":["edge-1"],"Project_id":["e632..."]}).

    The content is the header map itself (keys already in Go's sorted order), so `pack` writes
    Go's compact JSON of it. `msg_id` defaults to a new UUID as in `new_message`.
    """
    header = Header(msg_id=new_msg_id() if msg_id is None else msg_id, timestamp=now_ms)
    route = Route(resource=HEADER_RESOURCE, operation=HEADER_RESOURCE)
    return Message(
        header=header,
        route=route,
        content={_NODE_ID: [node_id], _PROJECT_ID: [project_id]},
    )


def parse_header(message: Message) -> tuple[str, str]:
    """(node_id, project_id) from a header message; FrameError when it is not a usable one
    (wrong resource/operation, content not JSON of that shape, empty node id). Header names
    are matched case-insensitively like Go's canonical form (Node_id / node_id / NODE_ID)."""
    route = message.route
    if route.resource != HEADER_RESOURCE or route.operation != HEADER_RESOURCE:
        raise FrameError(
            f"not a header message: resource {route.resource!r}, operation {route.operation!r}"
        )
    headers = _header_map(message.content)
    node_id = _header_get(headers, _NODE_ID)
    if not node_id:
        raise FrameError("header message carries no node id")
    return node_id, _header_get(headers, _PROJECT_ID)


def header_reply(request: Message, *, ok: bool, now_ms: int) -> Message:
    """The server's answer on the control stream: a response to `request` (NewRespByMessage),
    content "ack" or "nack"."""
    return response_to(request, HEADER_ACK if ok else HEADER_NACK, now_ms)


def _header_map(content: Any) -> dict[str, list[str]]:
    """The content as Go would json.Unmarshal it into an http.Header, or FrameError."""
    if isinstance(content, bytes | bytearray | memoryview | str):
        if len(content) > _MAX_HEADER_TEXT:
            raise FrameError(f"header content above {_MAX_HEADER_TEXT} bytes")
        try:
            raw = bytes(content) if not isinstance(content, str) else content
            content = _json_loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FrameError("header content is not JSON") from None
    if not isinstance(content, dict):
        raise FrameError("header content is not a JSON object of header names")
    headers: dict[str, list[str]] = {}
    for name, values in content.items():
        if values is None:  # Go: null leaves a nil slice
            headers[name] = []
            continue
        if not isinstance(values, list) or not all(
            value is None or isinstance(value, str) for value in values
        ):
            raise FrameError(f"header {name!r} is not a list of strings")
        headers[name] = ["" if value is None else value for value in values]
    return headers


def _header_get(headers: dict[str, list[str]], canonical: str) -> str:
    """First value of `canonical`, or of a name equal to it ignoring ASCII case."""
    values = headers.get(canonical)
    if values is None:
        wanted = canonical.lower()
        for name, candidate in headers.items():
            if name.isascii() and name.lower() == wanted:
                values = candidate
                break
    return values[0] if values else ""
