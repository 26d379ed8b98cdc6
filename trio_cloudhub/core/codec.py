"""Go-compatible JSON codec of a beehive message (spec 3.1).

Encoding reproduces Go's `json.Encoder` output byte for byte for the values we handle: keys in
struct order, empty optional fields omitted, HTML characters escaped as `\\u003c` etc., and a
trailing newline. Decoding accepts text or bytes, ignores unknown keys, and rejects frames Go
could not decode (e.g. a fractional timestamp) with a typed error.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from typing import Any

from trio_cloudhub.core.message import Header, Message, Route, trim_for_edge

DEFAULT_MAX_FRAME = 64 * 1024 * 1024

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python accepts NaN/Infinity, Go does not


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Go's float64 cannot hold it either
        raise ValueError(f"number {text} is out of range")
    return value


_strict_loads = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float).decode


def strict_json_loads(text: str) -> Any:
    """Strict JSON as Go reads it: no NaN/Infinity, floats in range, and an escaped lone
    surrogate (`"\\ud800"`) becomes U+FFFD, as Go's decoder does. Python keeps it, and a
    string holding one cannot be encoded as UTF-8 again (every later send would fail)."""
    value = _strict_loads(text)
    if "\\ud" in text or "\\uD" in text:
        value = _replace_lone_surrogates(value)
    return value


def _replace_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {
            _replace_lone_surrogates(key): _replace_lone_surrogates(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_replace_lone_surrogates(item) for item in value]
    return value


class CodecError(ValueError):
    """A frame that is not a beehive message."""


class FrameTooLarge(CodecError):
    """A frame above the configured size bound; rejected before parsing."""


def go_json(value: Any) -> str:
    """JSON text as Go's encoding/json writes it (without the encoder's newline)."""
    text = _dumps(value)
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        for raw, escaped in _GO_ESCAPES.items():
            text = text.replace(raw, escaped)
    return text


def header_to_dict(header: Header) -> dict[str, Any]:
    out: dict[str, Any] = {"msg_id": header.msg_id}
    if header.parent_msg_id:
        out["parent_msg_id"] = header.parent_msg_id
    out["timestamp"] = header.timestamp
    if header.resource_version:
        out["resourceversion"] = header.resource_version
    if header.sync:
        out["sync"] = True
    if header.type:
        out["type"] = header.type
    return out


def route_to_dict(route: Route) -> dict[str, str]:
    pairs = (
        ("source", route.source),
        ("destination", route.destination),
        ("group", route.group),
        ("operation", route.operation),
        ("resource", route.resource),
    )
    return {key: value for key, value in pairs if value}


def message_to_dict(message: Message) -> dict[str, Any]:
    return {
        "header": header_to_dict(message.header),
        "route": route_to_dict(message.route),
        "content": message.content,
    }


def encode(message: Message) -> str:
    """One WebSocket text message: Go JSON plus the encoder's trailing newline."""
    return go_json(message_to_dict(message)) + "\n"


def decode(frame: str | bytes, max_size: int = DEFAULT_MAX_FRAME) -> Message:
    if len(frame) > max_size:
        raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds the bound of {max_size}")
    try:
        text = frame.decode("utf-8") if isinstance(frame, bytes) else frame
        raw = _strict_loads(text)
        if "\\ud" in text or "\\uD" in text:
            raw = _replace_lone_surrogates(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"frame is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CodecError("frame is not a JSON object")
    return message_from_dict(raw)


def message_from_dict(raw: dict[str, Any]) -> Message:
    header = _header_from(_object(raw, "header"))
    route = _route_from(_object(raw, "route"))
    return Message(header=header, route=route, content=raw.get("content"))


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CodecError(f"{key!r} must be an object")
    return value


def _string(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CodecError(f"{key!r} must be a string")
    return value


def _header_from(raw: dict[str, Any]) -> Header:
    timestamp = raw.get("timestamp", 0)
    if timestamp is None:
        timestamp = 0
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise CodecError("'timestamp' must be an integer of milliseconds")
    if not -(2**63) <= timestamp < 2**63:
        raise CodecError("'timestamp' does not fit in int64")
    sync = raw.get("sync", False)
    if sync is None:
        sync = False
    if not isinstance(sync, bool):
        raise CodecError("'sync' must be a boolean")
    return Header(
        msg_id=_string(raw, "msg_id"),
        parent_msg_id=_string(raw, "parent_msg_id"),
        timestamp=timestamp,
        resource_version=_string(raw, "resourceversion"),
        sync=sync,
        type=_string(raw, "type"),
    )


def _route_from(raw: dict[str, Any]) -> Route:
    return Route(
        source=_string(raw, "source"),
        destination=_string(raw, "destination"),
        group=_string(raw, "group"),
        operation=_string(raw, "operation"),
        resource=_string(raw, "resource"),
    )


# --- frames for the edge, one content encoding per object version -------------------------

# Printable ASCII that Go's encoder writes as it is (no quote, backslash or HTML character).
_PLAIN = re.compile(r"[ !#-%\'-;=?-\[\]-~]*").fullmatch
CONTENT_CACHE_ENTRIES = 64
CONTENT_CACHE_CHARS = 16 * 1024 * 1024


def json_string(text: str) -> str:
    """A JSON string as Go writes it."""
    return f'"{text}"' if _PLAIN(text) else go_json(text)


def header_json(header: Header) -> str:
    """`go_json(header_to_dict(header))`, built directly."""
    out = '{"msg_id":' + json_string(header.msg_id)
    if header.parent_msg_id:
        out += ',"parent_msg_id":' + json_string(header.parent_msg_id)
    out += f',"timestamp":{header.timestamp}'
    if header.resource_version:
        out += ',"resourceversion":' + json_string(header.resource_version)
    if header.sync:
        out += ',"sync":true'
    if header.type:
        out += ',"type":' + json_string(header.type)
    return out + "}"


def route_json(route: Route, resource: str) -> str:
    """`go_json(route_to_dict(route))` with `resource` in place of the route's own."""
    out = ""
    for key, value in (
        ("source", route.source),
        ("destination", route.destination),
        ("group", route.group),
        ("operation", route.operation),
        ("resource", resource),
    ):
        if value:
            out += f',"{key}":' + json_string(value)
    return "{" + out[1:] + "}"


class FrameEncoder:
    """`encode` for messages to edges, with each content's JSON computed once.

    The messages of one change to N nodes share their content (the stored object): its JSON
    is kept, by identity, for the next message with the same content, and only the header
    and route (with the node prefix trimmed from the resource) are made per message. Message
    contents are values, never changed once in a message. Bounded in entries and characters.
    """

    __slots__ = ("_chars", "_entries", "max_chars", "max_entries")

    def __init__(
        self, max_entries: int = CONTENT_CACHE_ENTRIES, max_chars: int = CONTENT_CACHE_CHARS
    ) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._entries: OrderedDict[int, tuple[Any, str]] = OrderedDict()
        self._chars = 0

    def content_json(self, content: Any) -> str:
        if not isinstance(content, (dict, list)):
            return go_json(content)
        key = id(content)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is content:
            return entry[1]
        text = go_json(content)
        if len(text) <= self.max_chars // 4:
            if entry is not None:  # a dead object's id, reused
                self._chars -= len(entry[1])
            self._entries[key] = (content, text)
            self._chars += len(text)
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._chars -= len(dropped)
        return text

    def for_edge(self, message: Message) -> str:
        """`encode(message.with_resource(trim_for_edge(message.resource)))`, byte for byte."""
        return (
            '{"header":'
            + header_json(message.header)
            + ',"route":'
            + route_json(message.route, trim_for_edge(message.route.resource))
            + ',"content":'
            + self.content_json(message.content)
            + "}\n"
        )
