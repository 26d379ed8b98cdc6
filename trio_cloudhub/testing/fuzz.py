"""Fuzz targets: every parser of the hub, as "bytes in -> a valid result or a typed error out".

Shared by the hypothesis tests (`tests/fuzz/`, a bounded number of examples in CI) and by
`bench/fuzz.py` (millions of mutated inputs, with figures). A target takes one `bytes` input
and raises `PropertyViolation` (an AssertionError) when the property fails, or lets the
unexpected exception escape; a typed error of the parser is a normal outcome and is returned
as the outcome's name, so a runner can tell how varied its inputs were.

Properties, per target, beyond "no unexpected exception":
- codec: a decoded message re-encodes as strict JSON in valid UTF-8 and decodes to itself;
- websocket: the frame reader gives the same messages however the bytes are cut into reads
  (so the hand-written fast paths agree with wsproto's general path), none above the bound;
- quic: the packet reader gives the same messages however the bytes are cut, never holds
  more than one packet's header and bounded payload, and fails for good after a FrameError;
- http, uds: the request reader ends, and what it wrote is well-formed (HTTP responses, one
  strict-JSON message) -- whatever the request;
- manifests, config: the value is bounded and usable (a manifest's canonical text is UTF-8
  JSON that loads back; a configuration dumps and parses back to itself);
- token, csr, client_cert, pem: a result or the parser's own error, for raw input and for
  well-signed input whose content is fuzzed.
Async targets are run with a real-clock time bound (`TIME_BOUND`); their byte streams come
from `ScriptedStream`, which hands out chunks and then EOF, and records what is written.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import attrs
import h11
import trio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from trio_cloudhub import config as config_module
from trio_cloudhub import uds
from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message, new_message, response_to
from trio_cloudhub.edge.base import EdgeDisconnected
from trio_cloudhub.edge.websocket import StreamTransport, WebSocketConnection
from trio_cloudhub.netlimits import Waiting
from trio_cloudhub.pki import token as token_module
from trio_cloudhub.pki.certs import CertAndKey, generate_ca, issue_certificate
from trio_cloudhub.pki.client_cert import (
    ClientCertError,
    verify_client_cert,
    verify_rotation_cert,
)
from trio_cloudhub.pki.csr import CsrError, parse_csr, parse_ext_key_usages, sign_csr
from trio_cloudhub.pki.identity import connection_identity_problem
from trio_cloudhub.pki.pem import PemError, encode_pem, first_pem_block
from trio_cloudhub.store import manifests

TIME_BOUND = 5.0  # seconds an async target may take for one input (real clock)
WS_MAX_MESSAGE = 64 * 1024
QUIC_MAX_PAYLOAD = 64 * 1024
UDS_MAX_REQUEST = 64 * 1024
NOW = datetime(2026, 6, 1, tzinfo=UTC)
NODE = "edge-1"


class PropertyViolation(AssertionError):
    """The target's property failed for this input (a finding, not a typed parser error)."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise PropertyViolation(what)


def outcome(exc: BaseException) -> str:
    """A short name of a typed error, for counting how varied the outcomes are."""
    return f"{type(exc).__name__}: {str(exc)[:40]}"


def splits_of(data: bytes) -> list[bytes]:
    """`data` cut into reads at places derived from the data itself (deterministic)."""
    rng = random.Random(hashlib.blake2b(data, digest_size=8).digest())
    chunks: list[bytes] = []
    position = 0
    while position < len(data):
        size = rng.choice((1, 1, 2, 3, 7, 64, 1000, 1 << 16))
        chunks.append(data[position : position + size])
        position += size
    return chunks


# --- key material, made once per process ------------------------------------------------------


@attrs.frozen
class Material:
    ca: CertAndKey
    client_cert_der: bytes  # CN=system:node:edge-1, O=system:nodes, clientAuth
    legacy_cert_der: bytes  # CN=kubeedge.io, O=KubeEdge
    csr_der: bytes  # EdgeCore's request for edge-1
    token_keeper: token_module.TokenKeeper

    @property
    def jwt(self) -> str:
        return self.token_keeper.token.split(".", 1)[1]


def _client_cert(ca: CertAndKey, common_name: str, organization: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    return issue_certificate(
        ca,
        subject=subject,
        public_key=key.public_key(),
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[],
        now=NOW - timedelta(days=1),
        validity=timedelta(days=30),
    )


@cache
def material() -> Material:
    ca = generate_ca(NOW - timedelta(days=1))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{NODE}"),
                ]
            )
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("edge-1.local")]), False)
        .sign(key, hashes.SHA256())
    )
    return Material(
        ca=ca,
        client_cert_der=_client_cert(ca, f"system:node:{NODE}", "system:nodes"),
        legacy_cert_der=_client_cert(ca, "kubeedge.io", "KubeEdge"),
        csr_der=csr.public_bytes(serialization.Encoding.DER),
        token_keeper=token_module.TokenKeeper(ca.cert_der, ca.key_der, 12, NOW),
    )


# --- a byte stream that hands out chunks, then EOF -----------------------------------------


class ScriptedStream(trio.abc.Stream):
    """Reads return the given chunks in order (cut to `max_bytes`), then b"" (EOF)."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = deque(chunks)
        self.sent = bytearray()
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        if max_bytes is not None and len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


# --- codec ------------------------------------------------------------------------------------


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise PropertyViolation(f"encoded frame holds {name}, which Go cannot read")

    return json.loads(text, parse_constant=refuse)


def fuzz_codec(data: bytes) -> str:
    try:
        message = codec.decode(data, max_size=1 << 20)
    except codec.CodecError as exc:
        return outcome(exc)
    text = codec.encode(message)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PropertyViolation(f"a decoded message cannot be sent again: {exc}") from None
    _strict(text)
    check(codec.decode(text) == message, "decode(encode(message)) differs from message")
    return "message"


# --- WebSocket frame reader -------------------------------------------------------------------


async def _ws_messages(chunks: Sequence[bytes]) -> tuple[list[str | bytes], str]:
    """The messages read from a server-side connection fed `chunks`, and why it ended."""
    stream = ScriptedStream(chunks)
    connection = WebSocketConnection(
        StreamTransport(stream),
        client=False,
        node_id=NODE,
        project_id="p",
        remote="fuzz",
        max_message_size=WS_MAX_MESSAGE,
    )
    messages: list[str | bytes] = []
    with trio.fail_after(TIME_BOUND):
        while True:
            try:
                message = await connection.receive()
            except EdgeDisconnected as exc:
                return messages, str(exc)
            check(isinstance(message, str | bytes), f"receive() gave {type(message).__name__}")
            check(len(message) <= WS_MAX_MESSAGE, f"message of {len(message)} bytes passed")
            messages.append(message)


async def fuzz_websocket_async(data: bytes) -> str:
    whole, why = await _ws_messages([data])
    pieces, _ = await _ws_messages(splits_of(data))
    check(whole == pieces, f"messages differ by how reads are cut: {len(whole)}/{len(pieces)}")
    return f"{min(len(whole), 3)}+ message(s), {why}"


def ws_client_frames(parts: Sequence[tuple[str, bytes | str, bool]]) -> bytes:
    """Frames as a client writes them (masked), for seeds: (kind, payload, fin) with kind
    text, binary, ping or close; wsproto makes the bytes."""
    client = Connection(ConnectionType.CLIENT)
    out = bytearray()
    for kind, payload, fin in parts:
        if kind == "text":
            text = payload if isinstance(payload, str) else payload.decode()
            out += client.send(TextMessage(data=text, message_finished=fin))
        elif kind == "binary":
            raw = payload if isinstance(payload, bytes) else payload.encode()
            out += client.send(BytesMessage(data=raw, message_finished=fin))
        elif kind == "ping":
            out += client.send(Ping(payload=payload if isinstance(payload, bytes) else b""))
        else:
            out += client.send(CloseConnection(code=1000, reason="bye"))
            client = Connection(ConnectionType.CLIENT)  # frames after the close, for seeds
    return bytes(out)


# --- QUIC packer framing ----------------------------------------------------------------------


def _quic_feed(chunks: Sequence[bytes]) -> tuple[list[Message], str]:
    from trio_cloudhub.core.quic_codec import PACKER_HEADER_SIZE, FrameError, PacketReader

    reader = PacketReader(max_payload=QUIC_MAX_PAYLOAD)
    messages: list[Message] = []
    for chunk in chunks:
        try:
            messages += reader.feed(chunk)
        except FrameError as exc:
            messages += exc.messages
            try:
                reader.feed(b"x")
            except FrameError:
                return messages, outcome(exc)
            raise PropertyViolation("the reader accepted bytes after a FrameError") from None
        bound = PACKER_HEADER_SIZE + QUIC_MAX_PAYLOAD
        check(reader.buffered <= bound, f"reader holds {reader.buffered} bytes")
    return messages, "end"


def fuzz_quic(data: bytes) -> str:
    from trio_cloudhub.core.quic_codec import FrameError, pack, parse_header

    whole, end = _quic_feed([data])
    pieces, _ = _quic_feed(splits_of(data))
    check(whole == pieces, f"messages differ by how reads are cut: {len(whole)}/{len(pieces)}")
    for message in whole:
        with contextlib.suppress(FrameError):
            pack(message)
        with contextlib.suppress(FrameError):
            parse_header(message)
    return f"{len(whole)} message(s), {end}"


def quic_packet(payload: bytes) -> bytes:
    return b"\x01\x01\x01\x00\x01\x00" + len(payload).to_bytes(4, "big") + payload


# --- the HTTPS certificate service (request level, TLS aside) ---------------------------------


def _methods(request_bytes: bytes) -> list[bytes]:
    """The methods of the requests in `request_bytes`, as h11 reads them (HEAD answers have no
    body, so the response reader must know which ones were HEAD)."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(request_bytes)
    methods: list[bytes] = []
    for _ in range(1000):
        try:
            event = server.next_event()
        except h11.RemoteProtocolError:
            break
        if isinstance(event, h11.Request):
            methods.append(event.method)
        elif event is h11.PAUSED:
            server.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            server.send(h11.EndOfMessage())
            if server.our_state is not h11.DONE:
                break
            server.start_next_cycle()
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
    return methods


def _responses(raw: bytes, methods: Sequence[bytes] = ()) -> list[int]:
    """Status codes of the HTTP/1.1 responses in `raw` to requests with `methods`;
    PropertyViolation if malformed or cut inside a response."""
    client = h11.Connection(h11.CLIENT)
    statuses: list[int] = []
    if not raw:
        return statuses
    client.receive_data(raw)  # no EOF after it: a cut response shows as NEED_DATA
    inside = False  # a response head was read, its end not yet
    while True:
        if client.our_state is h11.IDLE:
            method = methods[len(statuses)] if len(statuses) < len(methods) else b"GET"
            client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise PropertyViolation(f"malformed HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            check(not inside, "the connection ended inside a response")
            return statuses
        if isinstance(event, h11.Response):
            statuses.append(event.status_code)
            inside = True
        elif isinstance(event, h11.EndOfMessage):
            inside = False
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                return statuses
            client.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return statuses


@cache
def _certificate_service() -> Any:
    from trio_cloudhub.http.routes import CertificateService

    m = material()
    return CertificateService(m.ca, m.token_keeper, 365, clock=lambda: NOW)


async def fuzz_http_async(data: bytes) -> str:
    from trio_cloudhub.http import server

    # The first byte picks whether the connection presented a client certificate.
    peer = (None, material().client_cert_der, material().legacy_cert_der, data[:64])
    peer_cert = peer[data[0] % len(peer)] if data else None
    stream = ScriptedStream(splits_of(data[1:]))
    with trio.fail_after(TIME_BOUND):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await server._serve_requests(
                _certificate_service(),
                stream,  # type: ignore[arg-type]
                peer_cert,
                Waiting("fuzz"),
                trio.CapacityLimiter(server.MAX_BODIES),
                "fuzz",
                lambda: None,
            )
    statuses = _responses(bytes(stream.sent), _methods(data[1:]))
    return ",".join(map(str, statuses)) or "no answer"


def http_request(
    method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: hub\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode("latin-1") + b"\r\n" + body


# --- the UDS request reader -------------------------------------------------------------------


async def _uds_hub(request: Message) -> Message:
    await trio.lowlevel.checkpoint()
    if request.operation == "deletevolume":
        raise uds.UdsRequestError(f"refused {request.resource}")
    return response_to(request, {"echo": request.content}, 1)


async def fuzz_uds_async(data: bytes) -> str:
    stream = ScriptedStream(splits_of(data))
    with trio.fail_after(TIME_BOUND):
        await uds._serve_connection(
            _uds_hub,
            stream,  # type: ignore[arg-type]
            "fuzz",
            answer_timeout=TIME_BOUND / 2,
            read_timeout=TIME_BOUND / 2,
            write_timeout=TIME_BOUND / 2,
            max_request_bytes=UDS_MAX_REQUEST,
        )
    check(stream.closed, "the connection was not closed")
    if not stream.sent:
        return "closed without answer"
    try:
        text = bytes(stream.sent).decode("utf-8")
    except UnicodeDecodeError:
        raise PropertyViolation("the answer is not UTF-8") from None
    _strict(text)
    answer = codec.decode(text)
    return answer.operation or "answer"


def uds_request(operation: str, resource: str, content: Any = None) -> bytes:
    message = new_message(
        source="csidriver",
        group="resource",
        operation=operation,
        resource=resource,
        content=content,
        now_ms=1,
    )
    return uds.encode_reply(message)


# --- manifests, configuration ---------------------------------------------------------------


def fuzz_manifests(data: bytes) -> str:
    # The last byte picks the format (and is not part of the file), so both parsers see
    # every input shape.
    json_format = bool(data) and data[-1] % 2 == 1
    try:
        found, _warnings = manifests.parse_manifest_bytes(data[:-1], json_format=json_format)
    except manifests.ManifestError as exc:
        return outcome(exc)
    for manifest in found:
        try:
            manifest.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PropertyViolation(f"manifest text is not UTF-8: {exc}") from None
        again = manifests.manifest_from_text(manifest.key, manifest.text)
        check(again.text == manifest.text, "canonical text does not load back to itself")
        check(manifests.valid_name(manifest.key.name), f"invalid name {manifest.key.name!r}")
    return f"{len(found)} manifest(s)"


def fuzz_config(data: bytes) -> str:
    from trio_cloudhub.hub.hub import HubSettings

    try:
        config = config_module.parse_config(data)
    except config_module.ConfigError as exc:
        return outcome(exc)
    HubSettings.from_config(config)
    again = config_module.parse_config(config_module.dump_config(config))
    check(again == config, "dump_config does not parse back to the same configuration")
    return "config"


# --- join token, CSR, client certificates, PEM ----------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed_jwt(header: bytes, claims: bytes, key: bytes) -> str:
    """A JWT with any header and claims bytes, correctly signed (HS256) with `key`."""
    signing_input = _b64url(header) + "." + _b64url(claims)
    digest = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64url(digest)


def fuzz_token(data: bytes) -> str:
    key = material().ca.key_der
    text = data.decode("latin-1")
    results = []
    # Raw text as a JWT and as a join token, then the bytes as a well-signed JWT's JSON parts.
    header, _, claims = data.partition(b"\x00")
    for jwt in (text, signed_jwt(header, claims, key)):
        try:
            verified = token_module.verify_token(jwt, key, NOW)
            check(isinstance(verified, dict), "claims are not an object")
            results.append("valid")
        except token_module.TokenError as exc:
            check(exc.reason in _TOKEN_REASONS, f"unknown reason {exc.reason!r}")
            results.append(exc.reason)
    with contextlib.suppress(token_module.TokenError):
        token_module.split_token(text)
    return "/".join(results)


_TOKEN_REASONS = frozenset(
    {
        token_module.TokenError.MISSING,
        token_module.TokenError.MALFORMED,
        token_module.TokenError.UNSUPPORTED,
        token_module.TokenError.BAD_SIGNATURE,
        token_module.TokenError.EXPIRED,
        token_module.TokenError.NOT_YET_VALID,
    }
)


def fuzz_csr(data: bytes) -> str:
    m = material()
    with contextlib.suppress(CsrError):
        parse_ext_key_usages(data[:64].decode("latin-1"))
    try:
        csr = parse_csr(data)
    except CsrError as exc:
        return outcome(exc)
    try:
        cert = sign_csr(csr, m.ca, NOW, 365)
    except CsrError as exc:
        return "parsed, " + outcome(exc)
    verify_client_cert(cert, m.ca.cert_der, NOW + timedelta(days=1))
    return "signed"


def fuzz_client_cert(data: bytes) -> str:
    m = material()
    problem = connection_identity_problem(NODE, data)
    check(problem is None or isinstance(problem, str), "identity check gave no reason")
    try:
        verify_rotation_cert(data, m.ca.cert_der, NODE, NOW)
    except ClientCertError as exc:
        return outcome(exc)
    return "accepted" + ("" if problem is None else " (identity: other node)")


def fuzz_pem(data: bytes) -> str:
    try:
        label, der = first_pem_block(data)
    except PemError as exc:
        return outcome(exc)
    check(bool(der) and bool(label), "empty PEM block accepted")
    return "block"


# --- the catalogue ------------------------------------------------------------------------------


@attrs.frozen
class Target:
    name: str
    run: Callable[[bytes], str] | None  # sync targets
    run_async: Callable[[bytes], Awaitable[str]] | None
    seeds: Callable[[], list[bytes]]
    tokens: tuple[bytes, ...] = ()  # what the mutator likes to insert (a dictionary)


def _message_frames() -> list[bytes]:
    messages = [
        new_message(
            source="edged",
            group="resource",
            operation=operation,
            resource=resource,
            content=content,
            now_ms=1_700_000_000_000,
        )
        for operation, resource, content in (
            ("keepalive", "", "ping"),
            ("response", "default/configmap/fan", "OK"),
            ("update", "default/podstatus/p", {"status": {"phase": "Running", "n": [1, 2.5]}}),
            ("query", "default/secret/s", None),
            ("insert", "node/edge-1/default/pod/p", {"a": "<&>", "b": True, "c": -1e10}),
        )
    ]
    return [codec.encode(message).encode() for message in messages]


_JSON_TOKENS = (
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b"1e400",
    b"NaN",
    b"-Infinity",
    b"9" * 400,
    b"[" * 2000,
    b'"timestamp":1.5',
    b'"sync":"yes"',
    b'"header":[]',
    b"\xff\xfe",
    b"\xed\xa0\x80",
    b"{}",
    b"null",
)


def _ws_seeds() -> list[bytes]:
    frames = _message_frames()
    return [
        ws_client_frames([("text", frames[0], True)]),
        ws_client_frames([("text", frames[1], True), ("binary", frames[2], True)]),
        ws_client_frames([("text", "a" * 200, False), ("ping", b"p", True), ("text", "b", True)]),
        ws_client_frames([("binary", b"\x00" * 70_000, True)]),
        ws_client_frames([("text", "hello", True), ("close", b"", True), ("text", "late", True)]),
        ws_client_frames([("text", "x" * 300, True)] * 3),
    ]


def _quic_seeds() -> list[bytes]:
    from trio_cloudhub.core.quic_codec import header_message, pack

    messages = [codec.decode(frame) for frame in _message_frames()]
    packets = [pack(message) for message in messages]
    return [
        pack(header_message(NODE, "p", 1)),
        b"".join(packets),
        packets[2],
        quic_packet(b""),
        quic_packet(b"\x0a\x00\x12\x00\x1a\x03\xff\xfe\xfd"),
    ]


def _http_seeds() -> list[bytes]:
    m = material()
    token_header = ("Authorization", "Bearer " + m.jwt)
    return [
        b"\x00" + http_request("GET", "/ca.crt"),
        b"\x00" + http_request("GET", "/readyz") + http_request("GET", "/livez"),
        b"\x00" + http_request("GET", "/edge.crt", [token_header, ("NodeName", NODE)], m.csr_der),
        b"\x01"
        + http_request(
            "GET", "/edge.crt", [("NodeName", NODE), ("ExtKeyUsages", "[1,2]")], m.csr_der
        ),
        b"\x00"
        + http_request("POST", "/edge.crt", [("Transfer-Encoding", "chunked")])
        + b"5\r\nhello\r\n0\r\n\r\n",
        b"\x02" + http_request("GET", "/nowhere?x=1", [("Connection", "close")]),
    ]


def _uds_seeds() -> list[bytes]:
    return [
        uds_request("createvolume", "node/edge-1/default/volume/v1", {"name": "v1"}),
        uds_request("deletevolume", "node/edge-1/default/volume/v2", None),
        uds_request("createvolume", "default/volume/nonode", "x"),
        b"  " + uds_request("controllerpublishvolume", "node/n/ns/volume/v", [1, "a"]) + b"tail",
    ]


def _manifest_seeds() -> list[bytes]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default", "uid": "x"},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s"},
        "stringData": {"k": "v"},
    }
    listing = {"apiVersion": "v1", "kind": "List", "items": [pod, secret]}
    bomb = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{chr(c)}: &{chr(c)} [{','.join(['*' + chr(c - 1)] * 9)}]\n".encode()
        for c in range(ord("b"), ord("h"))
    )
    return [
        yaml.safe_dump_all([pod, secret]).encode() + b"\x00",
        (json.dumps(listing) + "\n").encode() + b"\x01",
        b"kind: Node\napiVersion: v1\nmetadata: {name: edge-1, labels: {a: b}}\n"
        b"when: 2026-01-01T00:00:00Z\nblob: !!binary aGVsbG8=\n\x00",
        bomb + b"\x00",
        b'[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"k":"v"}}]\x01',
    ]


_YAML_TOKENS = (
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!binary ",
    b"!!python/object:os.system",
    b"? [1]\n: 2\n",
    b"---\n",
    b".nan",
    b".inf",
    b"2026-13-45",
    b"\t",
    b"- - - - ",
    b"{{{{",
    b'"\\ud800"',
    b"~",
)


def _config_seeds() -> list[bytes]:
    full = config_module.dump_config(config_module.Config()).encode()
    return [
        full,
        b"apiVersion: cloudcore.config.kubeedge.io/v1alpha2\nkind: CloudCore\n"
        b"modules:\n  cloudHub:\n    nodeLimit: 5\n    websocket: {port: 0}\n"
        b"    authorization: {enable: true, debug: false}\n"
        b"  edgeController: {buffer: {a: 1}}\n"
        b"trioCloudHub: {ackTimeoutSeconds: 2, store: local}\n",
        b"commonConfig: {monitorServer: {bindAddress: '[::1]:9091'}, tunnelPort: 10350}\n",
        b"",
    ]


def _token_seeds() -> list[bytes]:
    m = material()
    return [
        m.token_keeper.token.encode(),
        m.jwt.encode(),
        b'{"alg":"HS256","typ":"JWT"}\x00{"exp":1900000000}',
        b'{"alg":"HS512"}\x00{"exp":1.5e9,"nbf":100}',
        b'{"alg":"none"}\x00{}',
    ]


def _csr_seeds() -> list[bytes]:
    return [material().csr_der]


def _cert_seeds() -> list[bytes]:
    m = material()
    return [m.client_cert_der, m.legacy_cert_der, m.ca.cert_der]


def _pem_seeds() -> list[bytes]:
    m = material()
    return [
        encode_pem("CERTIFICATE", m.ca.cert_der),
        b"junk\n" + encode_pem("EC PRIVATE KEY", m.ca.key_der) + encode_pem("X", b"\x01"),
    ]


def _sync(run: Callable[[bytes], Awaitable[str]]) -> Callable[[bytes], str]:
    def once(data: bytes) -> str:
        return trio.run(run, data)

    return once


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("codec", fuzz_codec, None, _message_frames, _JSON_TOKENS),
        Target(
            "websocket",
            None,
            fuzz_websocket_async,
            _ws_seeds,
            (
                b"\x81",
                b"\x82",
                b"\x01",
                b"\x00",
                b"\x80",
                b"\x88",
                b"\x89",
                b"\x8a",
                b"\xfe",
                b"\xff",
                b"\x7e\x00\x7d",
                b"\x7f" + b"\x00" * 7 + b"\x7e",
                b"\x00\x00\x00\x00",
            ),
        ),
        Target(
            "quic",
            fuzz_quic,
            None,
            _quic_seeds,
            (
                b"\x01\x01\x01\x00\x01\x00",
                b"\x00\x00\x00\x00",
                b"\xff\xff\xff\xff",
                b"\x00\x01\x00\x00",
                b"\x0a\x00",
                b"\x12\x00",
                b"\x1a",
                *_JSON_TOKENS,
            ),
        ),
        Target(
            "http",
            None,
            fuzz_http_async,
            _http_seeds,
            (
                b"\r\n",
                b"\r\n\r\n",
                b"Content-Length: 99999999\r\n",
                b"Content-Length: -1\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"ffffffffffffffff\r\n",
                b"HTTP/1.0",
                b"Expect: 100-continue\r\n",
                b"Connection: keep-alive\r\n",
                b" /edge.crt ",
                b"NodeName: \xff\r\n",
                b"ExtKeyUsages: [3]\r\n",
                b"Authorization: a b c\r\n",
                b"HEAD ",
            ),
        ),
        Target(
            "uds",
            None,
            fuzz_uds_async,
            _uds_seeds,
            (b'"\\"', b"\\", b"}", b"]", b"{", b"[", *_JSON_TOKENS),
        ),
        Target("manifests", fuzz_manifests, None, _manifest_seeds, _YAML_TOKENS + _JSON_TOKENS),
        Target("config", fuzz_config, None, _config_seeds, _YAML_TOKENS),
        Target(
            "token",
            fuzz_token,
            None,
            _token_seeds,
            (b".", b"=", b"9" * 400, b"1e400", b"-0", b"true", b'"exp"', b'"nbf"', b"\x00"),
        ),
        Target("csr", fuzz_csr, None, _csr_seeds, (b"\x30\x82", b"\x02\x01\x05", b"\x00")),
        Target("client_cert", fuzz_client_cert, None, _cert_seeds, (b"\x30\x82", b"\xa0\x03")),
        Target("pem", fuzz_pem, None, _pem_seeds, (b"-----", b"\r\n", b":", b"=")),
    )
}


def run_target(target: Target, data: bytes) -> str:
    """One input, synchronously (an async target gets a trio.run of its own)."""
    if target.run is not None:
        return target.run(data)
    assert target.run_async is not None
    return _sync(target.run_async)(data)


# --- a mutator (for bench/fuzz.py; hypothesis brings its own) ---------------------------------

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7E, 0x22, 0x5C, 0x0A, 0x3A)


def mutate(
    seed: bytes,
    rng: random.Random,
    tokens: Sequence[bytes],
    others: Sequence[bytes],
    max_size: int = 1 << 17,
) -> bytes:
    """`seed` with 1 to 8 random edits: bit flips, interesting bytes, inserted tokens or
    random bytes, deletions, duplications, splices with another input, truncation."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        choice = rng.randrange(10)
        position = rng.randint(0, len(data))
        if choice == 0 and data:
            index = min(position, len(data) - 1)
            data[index] ^= 1 << rng.randrange(8)
        elif choice == 1 and data:
            data[min(position, len(data) - 1)] = rng.choice(_INTERESTING)
        elif choice == 2 and tokens:
            data[position:position] = rng.choice(tokens)
        elif choice == 3:
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        elif choice == 4 and data:
            end = min(len(data), position + rng.randint(1, 64))
            del data[position:end]
        elif choice == 5 and data:
            end = min(len(data), position + rng.randint(1, 256))
            data[position:position] = data[position:end] * rng.randint(1, 4)
        elif choice == 6 and others:
            other = rng.choice(others)
            cut = rng.randint(0, len(other))
            data[position:] = other[cut:]
        elif choice == 7:
            del data[position:]
        elif choice == 8 and data:
            # A length-like field: a run of 2, 4 or 8 bytes set to an extreme.
            width = rng.choice((2, 4, 8))
            data[position : position + width] = rng.choice((b"\xff", b"\x00", b"\x7f")) * width
        elif data:
            index = min(position, len(data) - 1)
            data[index] = (data[index] + rng.choice((-1, 1, 16))) % 256
        if len(data) > max_size:
            del data[max_size:]
    return bytes(data)
