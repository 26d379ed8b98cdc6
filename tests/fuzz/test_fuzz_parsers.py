"""Property tests of every parser (issue 14, item 3): a typed error or a valid result, never
an unexpected exception, a hang or unbounded memory.

Each target of `trio_cloudhub.testing.fuzz` gets raw bytes, mutations of valid inputs, and
inputs built by a strategy that knows the format (valid frames with odd boundaries, signed
tokens with hostile claims, alias bombs...). The number of examples comes from the hypothesis
profile (conftest.py; `ci` by default).
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import trio
import yaml
from hypothesis import given
from hypothesis import strategies as st

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Header, Message, Route
from trio_cloudhub.core.quic_codec import PacketReader, pack, unpack_payload
from trio_cloudhub.pki import token as token_module
from trio_cloudhub.testing import fuzz

pytestmark = pytest.mark.usefixtures("quiet_parsers")
SLOW = 5.0  # seconds: one example taking longer is a hang


def bounded(run: Callable[[bytes], str], data: bytes) -> str:
    started = time.perf_counter()
    result = run(data)
    elapsed = time.perf_counter() - started
    assert elapsed < SLOW, f"one input took {elapsed:.1f} s"
    return result


def mutations(name: str) -> st.SearchStrategy[bytes]:
    target = fuzz.TARGETS[name]
    seeds = target.seeds()

    def mutate(seed: bytes, rng: random.Random) -> bytes:
        return fuzz.mutate(seed, rng, target.tokens, seeds)

    return st.builds(mutate, st.sampled_from(seeds), st.randoms(use_true_random=False))


def inputs(name: str, max_size: int = 4096) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=max_size), mutations(name))


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
@given(data=st.data())
def test_every_target_gives_a_result_or_a_typed_error(name: str, data: st.DataObject) -> None:
    bounded(lambda raw: fuzz.run_target(fuzz.TARGETS[name], raw), data.draw(inputs(name)))


# --- codec ------------------------------------------------------------------------------------

ODD_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\ud800", "\udfff", "x\udc00y", "<&>", "\u2028", "\x00", "\U0001f600"]),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    ODD_TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(ODD_TEXT, children, max_size=5)
    ),
    max_leaves=30,
)
FIELDS = st.dictionaries(
    st.sampled_from(
        [
            "msg_id",
            "parent_msg_id",
            "timestamp",
            "sync",
            "type",
            "resourceversion",
            "source",
            "group",
            "operation",
            "resource",
            "destination",
        ]
    ),
    JSON_VALUES,
    max_size=6,
)


@given(header=FIELDS, route=FIELDS, content=JSON_VALUES, extra=st.booleans())
def test_codec_on_json_objects_of_any_shape(
    header: dict[str, Any], route: dict[str, Any], content: Any, extra: bool
) -> None:
    frame: dict[str, Any] = {"header": header, "route": route, "content": content}
    if extra:
        frame["unknown"] = content
    # ensure_ascii writes lone surrogates as \udXXX escapes, as a hostile edge could.
    text = json.dumps(frame, ensure_ascii=True)
    bounded(fuzz.fuzz_codec, text.encode())


@given(depth=st.integers(1, 100_000), width=st.integers(0, 50_000))
def test_codec_memory_is_bounded_by_the_frame(depth: int, width: int) -> None:
    content = "[" * depth + ",".join(["0"] * width) + "]" * depth
    frame = '{"header":{},"route":{},"content":' + content + "}"
    tracemalloc.start()
    try:
        bounded(fuzz.fuzz_codec, frame.encode())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(frame) + 2 * 1024 * 1024


# --- WebSocket frames -------------------------------------------------------------------------


def _frame(opcode: int, payload: bytes, fin: bool, key: bytes, wide: int) -> bytes:
    """A masked client frame by hand; `wide` chooses a longer length form than needed
    (0: minimal), which RFC 6455 forbids and the reader must refuse, not misparse."""
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if size < 126 and wide == 0:
        head += bytes([0x80 | size])
    elif size < 0x10000 and wide < 2:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return head + key + masked


MESSAGE_PARTS = st.lists(
    st.tuples(
        st.one_of(st.text(max_size=300).map(str.encode), st.binary(max_size=300)),
        st.booleans(),  # text (True) or binary
        st.integers(1, 3),  # fragments
    ),
    max_size=6,
)


@given(
    parts=MESSAGE_PARTS,
    pings=st.lists(st.binary(max_size=20), max_size=3),
    keys=st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=4),
    cuts=st.randoms(use_true_random=False),
)
def test_websocket_valid_frames_give_exactly_their_messages(
    parts: list[tuple[bytes, bool, int]],
    pings: list[bytes],
    keys: list[bytes],
    cuts: random.Random,
) -> None:
    """Fragmented or not, with pings between fragments, cut anywhere: the fast paths and
    wsproto together return each message whole and in order."""
    stream = bytearray()
    expected: list[str | bytes] = []
    key_index = 0
    for payload, is_text, fragments in parts:
        if is_text:
            try:
                expected.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                continue
        else:
            expected.append(payload)
        step = max(1, len(payload) // fragments)
        pieces = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
        for index, piece in enumerate(pieces):
            opcode = (0x1 if is_text else 0x2) if index == 0 else 0x0
            key = keys[key_index % len(keys)]
            key_index += 1
            stream += _frame(opcode, piece, index == len(pieces) - 1, key, 0)
            if pings and index == 0:
                stream += _frame(0x9, pings[index % len(pings)], True, key, 0)
    data = bytes(stream)
    chunks, position = [], 0
    while position < len(data):
        size = cuts.choice((1, 2, 5, 100, 4096))
        chunks.append(data[position : position + size])
        position += size
    messages, _ = trio.run(fuzz._ws_messages, chunks)
    assert messages == expected


@given(
    frames=st.lists(
        st.tuples(
            st.integers(0, 15),
            st.binary(max_size=200),
            st.booleans(),
            st.binary(min_size=4, max_size=4),
            st.integers(0, 2),
            st.integers(0, 7),
        ),
        max_size=6,
    )
)
def test_websocket_odd_frames_end_in_a_message_or_a_close(
    frames: list[tuple[int, bytes, bool, bytes, int, int]],
) -> None:
    """Any opcode, RSV bits, non-minimal lengths: the differential target holds."""
    data = bytearray()
    for opcode, payload, fin, key, wide, rsv in frames:
        frame = bytearray(_frame(opcode, payload, fin, key, wide))
        frame[0] |= rsv << 4
        data += frame
    bounded(fuzz.run_target.__get__(fuzz.TARGETS["websocket"]), bytes(data))


# --- QUIC -------------------------------------------------------------------------------------

MESSAGES = st.builds(
    Message,
    header=st.builds(
        Header,
        msg_id=st.text(max_size=40),
        parent_msg_id=st.text(max_size=40),
        timestamp=st.integers(-(2**63), 2**63 - 1),
        sync=st.booleans(),
    ),
    route=st.builds(
        Route,
        source=st.text(max_size=10),
        group=st.text(max_size=10),
        operation=st.text(max_size=10),
        resource=st.text(max_size=30),
    ),
    content=st.one_of(st.none(), st.binary(max_size=200), st.dictionaries(st.text(), st.text())),
)


@given(messages=st.lists(MESSAGES, max_size=5), cuts=st.randoms(use_true_random=False))
def test_quic_packets_cut_anywhere_give_the_same_messages(
    messages: list[Message], cuts: random.Random
) -> None:
    packets = [pack(message) for message in messages]
    expected = [unpack_payload(packet[10:]) for packet in packets]
    data = b"".join(packets)
    reader = PacketReader(max_payload=fuzz.QUIC_MAX_PAYLOAD)
    got: list[Message] = []
    position = 0
    while position < len(data):
        size = cuts.choice((1, 3, 10, 11, 500))
        got += reader.feed(data[position : position + size])
        position += size
    assert got == expected
    assert reader.buffered == 0


# --- HTTP, UDS --------------------------------------------------------------------------------

HEADER_NAMES = st.sampled_from(
    [
        "Authorization",
        "NodeName",
        "ExtKeyUsages",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Expect",
        "Host",
        "X-Junk",
    ]
)
HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60),
    st.sampled_from(["Bearer x.y.z", "chunked", "close", "[1,2]", "[3]", "edge-1", "100-continue"]),
)


@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(["GET", "POST", "PUT", "HEAD", "BREW", "GET "]),
            st.sampled_from(["/ca.crt", "/edge.crt", "/readyz", "/livez", "/", "*", "/edge.crt?x"]),
            st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4),
            st.one_of(st.binary(max_size=100), st.just(fuzz.material().csr_der)),
            st.booleans(),
        ),
        min_size=1,
        max_size=3,
    ),
    peer=st.integers(0, 3),
)
def test_http_requests_of_any_shape_are_answered_or_closed(
    requests: list[tuple[str, str, list[tuple[str, str]], bytes, bool]], peer: int
) -> None:
    data = bytes([peer])
    for method, path, headers, body, use_token in requests:
        all_headers = list(headers)
        if use_token:
            all_headers.append(("Authorization", "Bearer " + fuzz.material().jwt))
        data += fuzz.http_request(method, path, all_headers, body)
    bounded(fuzz.run_target.__get__(fuzz.TARGETS["http"]), data)


@given(
    header=FIELDS,
    route=FIELDS,
    content=JSON_VALUES,
    before=st.sampled_from(["", " ", "\n\t"]),
    after=st.binary(max_size=50),
)
def test_uds_requests_of_any_shape_get_one_json_answer(
    header: dict[str, Any], route: dict[str, Any], content: Any, before: str, after: bytes
) -> None:
    route.setdefault("resource", "node/edge-1/default/volume/v")
    route.setdefault("operation", "createvolume")
    frame = {"header": header, "route": route, "content": content}
    data = before.encode() + json.dumps(frame, ensure_ascii=True).encode() + after
    bounded(fuzz.run_target.__get__(fuzz.TARGETS["uds"]), data)


# --- manifests, configuration -----------------------------------------------------------------


@given(
    width=st.integers(2, 60),
    depth=st.integers(2, 10),
    use=st.sampled_from(["data", "metadata", "list"]),
)
def test_manifest_alias_bombs_are_refused_with_bounded_work_and_memory(
    width: int, depth: int, use: str
) -> None:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, depth):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    top = f"*a{depth - 1}"
    body = {
        "data": f"data: {{k: {top}}}",
        "metadata": f"metadata: {{name: x, labels: {top}}}",
        "list": f"items: {top}",
    }[use]
    text = "\n".join([*lines, "apiVersion: v1", "kind: ConfigMap", body, ""])
    if use != "metadata":
        text += "metadata: {name: x}\n"
    tracemalloc.start()
    try:
        result = bounded(fuzz.fuzz_manifests, text.encode() + b"\x00")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024 + 512 * len(text), f"peak {peak} for {len(text)} bytes"
    leaves = width**depth
    if leaves > 20_000:
        assert "too large" in result or "ManifestError" in result


MANIFEST_DOCS = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["v1", "v2", 1]),
        "kind": st.sampled_from(["Pod", "ConfigMap", "Secret", "Node", "List", "Other"]),
        "metadata": st.one_of(
            st.fixed_dictionaries(
                {"name": st.one_of(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), ODD_TEXT)},
                optional={"namespace": ODD_TEXT, "uid": ODD_TEXT, "labels": JSON_VALUES},
            ),
            JSON_VALUES,
        ),
    },
    optional={
        "data": JSON_VALUES,
        "stringData": JSON_VALUES,
        "spec": JSON_VALUES,
        "items": JSON_VALUES,
    },
)


@given(docs=st.lists(MANIFEST_DOCS, max_size=4), as_json=st.booleans())
def test_manifests_of_any_shape_are_objects_or_a_file_error(
    docs: list[dict[str, Any]], as_json: bool
) -> None:
    if as_json:
        data = json.dumps(docs, ensure_ascii=True).encode() + b"\x01"
    else:
        data = yaml.safe_dump_all(docs, allow_unicode=False).encode() + b"\x00"
    bounded(fuzz.fuzz_manifests, data)


CONFIG_LEAVES = st.one_of(
    JSON_SCALARS,
    st.sampled_from(["0.0.0.0", "127.0.0.1:0", "unix:///tmp/x.sock", "local", "kube", "a:99999"]),
)


def _config_tree() -> st.SearchStrategy[dict[str, Any]]:
    keys = [
        "websocket",
        "quic",
        "https",
        "port",
        "address",
        "enable",
        "nodeLimit",
        "keepaliveInterval",
        "authorization",
        "debug",
        "modes",
        "node",
        "dnsNames",
        "advertiseAddress",
        "unixsocket",
        "writeTimeout",
        "tlsCAFile",
    ]
    return st.recursive(
        st.dictionaries(st.sampled_from(keys), CONFIG_LEAVES, max_size=3),
        lambda children: st.dictionaries(
            st.sampled_from(keys), st.one_of(children, st.lists(children, max_size=2)), max_size=3
        ),
        max_leaves=12,
    )


@given(
    cloud_hub=_config_tree(),
    extra=st.dictionaries(
        st.sampled_from(
            [
                "ackTimeoutSeconds",
                "ackMaxSends",
                "maxMessageSize",
                "store",
                "logLevel",
                "manifestsPollInterval",
                "drainTimeoutSeconds",
                "reconcileIntervalSeconds",
            ]
        ),
        CONFIG_LEAVES,
        max_size=4,
    ),
    version=st.sampled_from(["cloudcore.config.kubeedge.io/v1alpha1", "v9", None]),
)
def test_configs_of_any_shape_load_or_say_why(
    cloud_hub: dict[str, Any], extra: dict[str, Any], version: str | None
) -> None:
    document = {"apiVersion": version, "kind": "CloudCore", "modules": {"cloudHub": cloud_hub}}
    document["trioCloudHub"] = extra
    try:
        text = yaml.safe_dump(document, allow_unicode=False)
    except yaml.YAMLError:
        return
    bounded(fuzz.fuzz_config, text.encode())


# --- join token, CSR, client certificates -----------------------------------------------------

CLAIM_VALUES = st.one_of(
    JSON_SCALARS, st.integers(min_value=-(10**500), max_value=10**500), st.lists(JSON_SCALARS)
)


@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "typ", "kid"]),
        st.one_of(st.sampled_from(["HS256", "HS384", "HS512", "none", "RS256"]), JSON_SCALARS),
    ),
    claims=st.dictionaries(st.sampled_from(["exp", "nbf", "iat", "sub"]), CLAIM_VALUES),
)
def test_well_signed_tokens_with_hostile_claims_are_valid_or_refused(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    key = fuzz.material().ca.key_der
    jwt = fuzz.signed_jwt(json.dumps(header).encode(), json.dumps(claims).encode(), key)
    try:
        assert isinstance(token_module.verify_token(jwt, key, fuzz.NOW), dict)
    except token_module.TokenError as exc:
        assert exc.reason in fuzz._TOKEN_REASONS


@given(data=mutations("csr"))
def test_mutated_csrs(data: bytes) -> None:
    bounded(fuzz.fuzz_csr, data)


@given(data=mutations("client_cert"))
def test_mutated_client_certificates(data: bytes) -> None:
    bounded(fuzz.fuzz_client_cert, data)


def test_codec_roundtrip_sanity() -> None:
    """The codec target's roundtrip property holds on a normal message (else it is moot)."""
    assert codec.decode(fuzz._message_frames()[2]).route.operation == "update"
    assert all(fuzz.fuzz_codec(frame) == "message" for frame in fuzz._message_frames())
