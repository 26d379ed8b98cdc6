"""FrameEncoder: the frames it splices equal codec.encode's, and its cache stays bounded."""

from __future__ import annotations

import random

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Header, Message, Route, trim_for_edge

ALPHABET = [
    "a",
    "Z",
    "/",
    "-",
    '"',
    "\\",
    "<",
    ">",
    "&",
    "\u2028",
    "é",
    "\n",
    "\x01",
    " ",
    "😀",
    "\x7f",
]


def text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))


def random_message(rng: random.Random) -> Message:
    header = Header(
        msg_id=text(rng),
        timestamp=rng.choice([0, 1, -5, 2**62, 1795704604310]),
        parent_msg_id=rng.choice(["", text(rng)]),
        resource_version=rng.choice(["", text(rng), "123"]),
        sync=rng.random() < 0.3,
        type=rng.choice(["", text(rng)]),
    )
    route = Route(
        source=rng.choice(["", "edgecontroller", text(rng)]),
        destination=rng.choice(["", text(rng)]),
        group=rng.choice(["", "resource", text(rng)]),
        operation=rng.choice(["", "update", text(rng)]),
        resource=rng.choice(
            ["", text(rng), "node/n1/default/pod/x", "node/n/x", "node/" + text(rng)]
        ),
    )
    content = rng.choice(
        [
            None,
            text(rng),
            {"a": text(rng), "b": [1, 2.5, True, None], text(rng): {}},
            [text(rng)],
            3,
        ]
    )
    return Message(header=header, route=route, content=content)


def test_frames_equal_encode_of_the_trimmed_message() -> None:
    rng = random.Random(7)
    encoder = codec.FrameEncoder()
    for _ in range(20_000):
        message = random_message(rng)
        expected = codec.encode(message.with_resource(trim_for_edge(message.resource)))
        assert encoder.for_edge(message) == expected


def test_a_shared_content_is_encoded_once() -> None:
    encoder = codec.FrameEncoder()
    body = {"kind": "ConfigMap", "metadata": {"name": "fan", "uid": "u1"}, "data": {"k": "<v>"}}
    frames = []
    for node in range(100):
        message = Message(
            header=Header(msg_id=f"id-{node}", timestamp=5, resource_version="9"),
            route=Route(
                "edgecontroller", "", "resource", "update", f"node/n{node}/default/configmap/fan"
            ),
            content=body,
        )
        frames.append(encoder.for_edge(message))
    assert encoder.content_json(body) is encoder.content_json(body)  # the cached text
    assert all(frame.endswith(',"content":' + codec.go_json(body) + "}\n") for frame in frames)
    assert len({frame for frame in frames}) == 100  # each with its own id and resource


def test_the_cache_is_bounded_in_entries_and_characters() -> None:
    encoder = codec.FrameEncoder(max_entries=8, max_chars=4000)
    kept = [{"n": index, "pad": "x" * 300} for index in range(50)]
    for content in kept:
        encoder.content_json(content)
    assert len(encoder._entries) <= 8
    assert encoder._chars <= 4000
    huge = {"pad": "y" * 2000}  # above a quarter of the bound: encoded, never kept
    assert encoder.content_json(huge) == codec.go_json(huge)
    assert id(huge) not in encoder._entries
    assert encoder._chars == sum(len(text) for _, text in encoder._entries.values())
