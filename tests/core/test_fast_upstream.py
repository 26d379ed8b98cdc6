"""The keepalive/ACK fast path agrees with the full decode and classification on every frame."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from trio_cloudhub.core import codec
from trio_cloudhub.core.fast_upstream import fast_upstream
from trio_cloudhub.core.rules import Upstream, classify_upstream

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
KEEPALIVE = (
    '{"header":{"msg_id":"4053a1fd-e67a-42c9-a97c-0ba49f1812f4","timestamp":1795704854672},'
    '"route":{"source":"websocket","group":"resource","operation":"keepalive","resource":"node"},'
    '"content":"ping"}\n'
)
ACK = (
    '{"header":{"msg_id":"2a47a24b-95ef-4dae-a13f-16b7cf56608b",'
    '"parent_msg_id":"6b4c8690-9f99-41e8-a049-4ac5be023649","timestamp":1795704873005},'
    '"route":{"source":"edgecontroller","group":"resource","operation":"response",'
    '"resource":"null/node/edge-node-1"},"content":"OK"}\n'
)


def full_path(frame: str) -> tuple[Upstream, str] | None:
    """What the session's general path makes of `frame` (None: it does not decode)."""
    try:
        message = codec.decode(frame)
    except codec.CodecError:
        return None
    kind = classify_upstream(message)
    return kind, message.header.parent_msg_id


def assert_agrees(frame: str) -> bool:
    """True when the fast path took the frame (and then agrees with the full path)."""
    fast = fast_upstream(frame)
    if fast is None:
        return False
    full = full_path(frame)
    assert full is not None, frame
    assert fast[0] is full[0], frame
    if fast[0] is Upstream.ACK:
        assert fast[1] == full[1], frame
    return True


def recorded_upstream() -> list[str]:
    frames = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["dir"] == "edge->cloud":
                frames.append(record["data"])
    return frames


def test_recorded_edgecore_keepalives_and_acks_take_the_fast_path() -> None:
    frames = recorded_upstream()
    assert frames
    taken = [frame for frame in frames if assert_agrees(frame)]
    keepalives = [f for f in frames if '"operation":"keepalive"' in f]
    acks = [f for f in frames if '"operation":"response"' in f]
    assert keepalives and acks
    assert set(taken) == set(keepalives) | set(acks)


@pytest.mark.parametrize(
    "frame",
    [
        KEEPALIVE,
        KEEPALIVE.rstrip("\n"),
        ACK,
        ACK.replace('"content":"OK"', '"content":""'),
        ACK.replace('"resource":"null/node/edge-node-1"', '"resource":"ns/volume/v1"'),
        ACK.replace('"resource":"null/node/edge-node-1"', '"resource":"ns/volume"'),
        KEEPALIVE.replace("1795704854672", "-1"),
        KEEPALIVE.replace("1795704854672", "01"),
        KEEPALIVE.replace("1795704854672", "9223372036854775808"),
        KEEPALIVE.replace("1795704854672", "1.5"),
        KEEPALIVE.replace('"ping"', '"pi\\"ng"'),
        KEEPALIVE.replace('"ping"', '"p\\u0069ng"'),
        KEEPALIVE.replace('"ping"', '"p\x01ng"'),
        KEEPALIVE.replace('"ping"', '{"x":1}'),
        KEEPALIVE.replace('"ping"', '"é ✓"'),
        KEEPALIVE.replace('"keepalive"', '"keepalive","operation":"query"'),
        KEEPALIVE.replace('{"msg_id"', '{"sync":true,"msg_id"'),
        KEEPALIVE + " ",
        " " + KEEPALIVE,
        KEEPALIVE + "\n",
        ACK.replace('"parent_msg_id":"6b4c8690-9f99-41e8-a049-4ac5be023649",', ""),
        ACK.replace('"operation":"response"', '"operation":"ping"'),
        ACK.replace('"source":"edgecontroller"', '"source":"edge\\ncontroller"'),
        '{"header":{},"route":{},"content":null}',
    ],
)
def test_edge_cases_agree(frame: str) -> None:
    assert_agrees(frame)


def test_the_shapes_edgecore_sends_are_fast() -> None:
    assert fast_upstream(KEEPALIVE) == (Upstream.KEEPALIVE, "")
    assert fast_upstream(ACK) == (Upstream.ACK, "6b4c8690-9f99-41e8-a049-4ac5be023649")
    volume = ACK.replace('"resource":"null/node/edge-node-1"', '"resource":"ns/volume/v1"')
    assert fast_upstream(volume) is None  # completes a CSI request: the full path


def test_random_mutations_agree() -> None:
    """Bytes replaced, inserted or removed anywhere in both shapes: never a disagreement."""
    rng = random.Random(13)
    alphabet = '{}[]":,\\/ \n\tanu0159-.eé\x00'
    taken = 0
    for _ in range(20_000):
        text = list(rng.choice([KEEPALIVE, ACK]))
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(text))
            how = rng.random()
            if how < 0.4:
                text[where] = rng.choice(alphabet)
            elif how < 0.7:
                text.insert(where, rng.choice(alphabet))
            else:
                del text[where]
        taken += assert_agrees("".join(text))
    assert taken > 1000  # mutations inside the ids and names still take the fast path
