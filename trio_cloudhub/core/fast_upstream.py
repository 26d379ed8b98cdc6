"""The two messages edges send most, recognised without decoding JSON.

EdgeCore writes its keepalive and its ACK of a cloud message the same way every time (Go's
encoder, beehive's field order; see the recorded sessions in ../shared/vectors):

    {"header":{"msg_id":"…","timestamp":…},"route":{"source":"websocket","group":"resource",
     "operation":"keepalive","resource":"node"},"content":"ping"}
    {"header":{"msg_id":"…","parent_msg_id":"…","timestamp":…},"route":{"source":"…",
     "group":"resource","operation":"response","resource":"…"},"content":"OK"}

`fast_upstream(frame)` returns what `codec.decode` then `rules.classify_upstream` make of
such a frame: (Upstream.KEEPALIVE, "") or (Upstream.ACK, parent_msg_id); None for any other
frame, which takes the full path. Only frames in exactly this shape match (keys in this
order, strings without escapes or control characters, a plain non-negative int64 timestamp),
so both paths agree on every frame (tested against each other).
"""

from __future__ import annotations

import re

from trio_cloudhub.core.rules import Upstream, is_volume_resource

_S = r'"[^"\\\x00-\x1f]*"'
_CAPTURE = r'"([^"\\\x00-\x1f]*)"'
_TIMESTAMP = r"(?:0|[1-9][0-9]{0,17})"  # at most 18 digits: always inside int64
_KEEPALIVE = re.compile(
    rf'\{{"header":\{{"msg_id":{_S},"timestamp":{_TIMESTAMP}\}},'
    rf'"route":\{{"source":{_S},"group":{_S},"operation":"keepalive","resource":{_S}\}},'
    rf'"content":{_S}\}}\n?'
).fullmatch
_ACK = re.compile(
    rf'\{{"header":\{{"msg_id":{_S},"parent_msg_id":{_CAPTURE},"timestamp":{_TIMESTAMP}\}},'
    rf'"route":\{{"source":{_S},"group":{_S},"operation":"response","resource":{_CAPTURE}\}},'
    rf'"content":{_S}\}}\n?'
).fullmatch
_KEEPALIVE_ANSWER = (Upstream.KEEPALIVE, "")


def fast_upstream(frame: str) -> tuple[Upstream, str] | None:
    """See the module docstring."""
    if '"keepalive"' in frame:
        return _KEEPALIVE_ANSWER if _KEEPALIVE(frame) else None
    found = _ACK(frame)
    if found is None:
        return None
    resource = found[2]
    if "/volume/" in resource and is_volume_resource(resource):
        return None  # a volume answer completes a CSI request instead
    return Upstream.ACK, found[1]
