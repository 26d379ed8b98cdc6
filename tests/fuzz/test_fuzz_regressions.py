"""One test per bug the fuzzers found (issue 14, item 3); each failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509

from trio_cloudhub import config
from trio_cloudhub.core import codec, quic_codec
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.pki import csr, token
from trio_cloudhub.store import manifests
from trio_cloudhub.testing import fuzz
from trio_cloudhub.uds import serve_uds

# --- codec ------------------------------------------------------------------------------------

SURROGATE_FRAME = (
    '{"header":{"msg_id":"\\ud800","timestamp":1},"route":{"resource":"a/b\\udfff"},'
    '"content":{"k\\udc00":["\\ud800x"]}}'
)


def test_an_escaped_lone_surrogate_becomes_u_fffd_so_the_message_can_be_sent_again() -> None:
    message = codec.decode(SURROGATE_FRAME)
    assert message.header.msg_id == "\ufffd"
    assert message.route.resource == "a/b\ufffd"
    assert message.content == {"k\ufffd": ["\ufffdx"]}
    codec.encode(message).encode("utf-8")  # raised UnicodeEncodeError before the fix


def test_an_escaped_surrogate_pair_is_kept() -> None:
    frame = '{"header":{"msg_id":"\\ud83d\\ude00"},"route":{},"content":null}'
    assert codec.decode(frame).header.msg_id == "\U0001f600"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_numbers_go_cannot_read_are_refused(number: str) -> None:
    frame = '{"header":{},"route":{},"content":{"x":' + number + "}}"
    with pytest.raises(codec.CodecError):
        codec.decode(frame)


def test_quic_content_follows_the_same_json_rules() -> None:
    assert quic_codec._content_from_bytes(b'["\\ud800"]') == ["\ufffd"]
    assert quic_codec._content_from_bytes(b"[1e400]") == "[1e400]"  # the edge's raw text


# --- UDS --------------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    folder = tempfile.mkdtemp(prefix="uds-fz-", dir="/tmp")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _exchange(path: Path, request: bytes) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    stream = trio.SocketStream(sock)
    await stream.send_all(request)
    answer = bytearray()
    while data := await stream.receive_some(65536):
        answer += data
    await stream.aclose()
    return bytes(answer)


async def _unserializable_answer(request: Message) -> Message:
    await trio.lowlevel.checkpoint()
    return new_message(
        source="edge", group="g", operation="response", resource="r", content=object(), now_ms=1
    )


async def test_a_request_with_a_lone_surrogate_is_answered_and_the_server_lives_on(
    sock_dir: Path,
) -> None:
    path = sock_dir / "s.sock"
    request = (
        b'{"header":{"msg_id":"\\ud800"},"route":{"operation":"createvolume",'
        b'"resource":"default/volume/v"},"content":null}'
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_uds, fuzz._uds_hub, f"unix://{path}")
            for _ in range(2):  # the second proves the server is still there
                answer = codec.decode(await _exchange(path, request))
                assert answer.operation == "error"
                assert answer.header.parent_msg_id == "\ufffd"
            nursery.cancel_scope.cancel()


async def test_a_failure_on_one_connection_does_not_end_the_uds_server(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sock_dir / "s.sock"
    request = fuzz.uds_request("createvolume", "node/n1/default/volume/v")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_uds, _unserializable_answer, f"unix://{path}")
            assert await _exchange(path, request) == b""  # closed: the answer could not be made
            assert await _exchange(path, request) == b""  # and the server still accepts
            nursery.cancel_scope.cancel()
    assert "connection failed" in caplog.text


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000 + "]" * 5000,
        "modules: {edgeController: " + "[" * 5000 + "]" * 5000 + "}",
        "commonConfig: {monitorServer: {bindAddress: 'a:\u00b2'}}",
        "commonConfig: {monitorServer: {bindAddress: 'a:" + "9" * 5000 + "'}}",
        "1: 2",
        "modules: {cloudHub: {3: x}}",
        "---\n2026-13-45",
        "trioCloudHub: {ackTimeoutSeconds: .nan}",
        "trioCloudHub: {drainTimeoutSeconds: .inf}",
        "modules: {cloudHub: {keepaliveInterval: " + "9" * 400 + "}}",
        "trioCloudHub: {ackTimeoutSeconds: " + "9" * 400 + "}",
    ],
)
def test_config_loader_errors_are_config_errors(text: str) -> None:
    with pytest.raises(config.ConfigError):
        config.parse_config(text)


def test_a_config_alias_bomb_in_a_section_we_read_is_refused() -> None:
    """Nine levels of nine aliases: 387 million leaves from about 400 bytes (not a bug found,
    a bound of the key check added with the fixes, which walks the sections we read)."""
    lines = ["modules:", "  edgeController:", "    a: &a [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        previous = "a" if level == 1 else f"l{level - 1}"
        lines.append(f"    l{level}: &l{level} [{', '.join(['*' + previous] * 9)}]")
    lines += ["  cloudHub:", "    authorization: {modes: [{node: {x: *l8}}]}"]
    with pytest.raises(config.ConfigError, match="YAML aliases"):
        config.parse_config("\n".join(lines))


# --- join token, CSR --------------------------------------------------------------------------


def test_a_signed_token_with_a_huge_integer_exp_is_judged_not_crashed() -> None:
    key = fuzz.material().ca.key_der
    far = fuzz.signed_jwt(b'{"alg":"HS256"}', b'{"exp":1%s}' % (b"0" * 400), key)
    assert token.verify_token(far, key, fuzz.NOW)["exp"] == 10**400
    past = fuzz.signed_jwt(b'{"alg":"HS256"}', b'{"exp":-1%s}' % (b"0" * 400), key)
    with pytest.raises(token.TokenError) as caught:
        token.verify_token(past, key, fuzz.NOW)
    assert caught.value.reason == token.TokenError.EXPIRED


def test_a_csr_with_an_invalid_version_is_a_csr_error() -> None:
    der = bytearray(fuzz.material().csr_der)
    # The version INTEGER is the first field of CertificationRequestInfo: 02 01 00.
    index = der.index(b"\x02\x01\x00")
    der[index + 2] = 8
    with pytest.raises(x509.InvalidVersion):
        x509.load_der_x509_csr(bytes(der))
    with pytest.raises(csr.CsrError):
        csr.parse_csr(bytes(der))


# --- manifests --------------------------------------------------------------------------------


def test_a_json_manifest_with_a_lone_surrogate_is_stored_as_utf8() -> None:
    data = b'{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"k":"\\ud800"}}'
    [found], _ = manifests.parse_manifest_bytes(data, json_format=True)
    assert json.loads(found.text.encode("utf-8"))["data"] == {"k": "\ufffd"}


def test_an_alias_bomb_costs_work_in_proportion_to_its_size() -> None:
    bomb = b"a: &a [x, x, x, x, x, x, x, x, x]\n"
    for level in range(1, 9):
        previous = b"a" if level == 1 else b"l%d" % (level - 1)
        bomb += b"l%d: &l%d [%s]\n" % (level, level, b", ".join([b"*" + previous] * 9))
    tracemalloc.start()
    try:
        with pytest.raises(manifests.ManifestError, match="too large"):
            manifests.parse_manifest_bytes(bomb, json_format=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Expanded up to the absolute bound (a million nodes) it peaked at about 19 MiB.
    assert peak < 4 * 1024 * 1024


def _read_in_thread(folder: Path, name: str, stamp: manifests.FileStamp) -> list[object]:
    """read_manifest_file in a thread; [] if it has not returned within 5 s."""
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(manifests.read_manifest_file(folder, name, stamp)),
        daemon=True,
    )
    thread.start()
    thread.join(5)
    return result


def test_a_manifest_replaced_by_a_fifo_after_listing_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("kind: Node\napiVersion: v1\nmetadata: {name: n}\n")
    stamp = manifests.stamp_folder(tmp_path)["a.yaml"]
    path.unlink()
    os.mkfifo(path)
    result = _read_in_thread(tmp_path, "a.yaml", stamp)
    if not result:  # the bug: open() waits for a writer forever; let the thread go
        with open(path, "wb"):
            pass
    assert result, "reading a FIFO hung"
    [outcome] = result
    assert isinstance(outcome, manifests.FileResult)
    assert outcome.error or outcome.unstable
    assert not outcome.manifests


def test_a_manifest_symlink_re_pointed_to_dev_zero_is_not_read(tmp_path: Path) -> None:
    target = tmp_path / "real.txt"
    target.write_text("kind: Node\napiVersion: v1\nmetadata: {name: n}\n")
    link = tmp_path / "a.yaml"
    link.symlink_to(target)
    stamp = manifests.stamp_folder(tmp_path)["a.yaml"]
    link.unlink()
    link.symlink_to("/dev/zero")
    [outcome] = _read_in_thread(tmp_path, "a.yaml", stamp)
    assert isinstance(outcome, manifests.FileResult)
    assert "not a regular file" in outcome.error


def test_material_is_valid() -> None:
    """The fixtures the fuzz targets mutate are themselves accepted (else fuzzing is moot)."""
    m = fuzz.material()
    assert fuzz.fuzz_csr(m.csr_der) == "signed"
    assert fuzz.fuzz_client_cert(m.client_cert_der) == "accepted"
    assert token.verify_token(m.jwt, m.ca.key_der, fuzz.NOW + timedelta(hours=1))


@pytest.mark.parametrize("kind", ["{name: p}", "[Pod]"])
def test_a_manifest_whose_kind_is_not_a_string_is_skipped(kind: str) -> None:
    data = f"kind: {kind}\napiVersion: v1\nmetadata: {{name: n}}\n".encode()
    found, warnings = manifests.parse_manifest_bytes(data, json_format=False)
    assert found == []
    assert "unsupported kind" in warnings[0]
