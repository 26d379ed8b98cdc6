"""The HTTPS certificate service over real TLS on loopback, driven like an EdgeCore would."""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_cloudhub.config import CloudHub, Config, Https, Modules
from trio_cloudhub.http.certs_store import HubCredentials, new_token_keeper, prepare_credentials
from trio_cloudhub.http.server import MAX_BODY_BYTES, serve_https
from trio_cloudhub.pki import certs, csr, token
from trio_cloudhub.pki.token import TokenKeeper

TIMEOUT = 20


@attrs.define
class Nodes:
    """The cloud side's answers about nodes, as the service sees them."""

    known: set[str] = attrs.field(factory=set)
    joined: list[str] = attrs.field(factory=list)
    failing: bool = False

    def node_known(self, name: str) -> bool:
        if self.failing:
            raise RuntimeError("the store is away")
        return name in self.known

    async def node_joined(self, name: str) -> None:
        self.joined.append(name)


@attrs.define
class Hub:
    port: int
    credentials: HubCredentials
    keeper: TokenKeeper
    tmp_path: Path
    ready: bool = True
    nodes: Nodes = attrs.field(factory=Nodes)
    closed: int = 0  # connections the server reported closed (`on_closed`)

    def on_closed(self) -> None:
        self.closed += 1


@attrs.frozen
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]


@pytest.fixture
async def hub(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Hub]:
    absent = tmp_path / "etc"
    config = Config(
        modules=Modules(
            cloud_hub=CloudHub(
                tls_ca_file=str(absent / "ca.crt"),
                tls_ca_key_file=str(absent / "ca.key"),
                tls_cert_file=str(absent / "server.crt"),
                tls_private_key_file=str(absent / "server.key"),
                advertise_address=("127.0.0.1",),
                https=Https(address="127.0.0.1", port=0),
            )
        )
    )
    credentials = prepare_credentials(config, tmp_path / "data")
    keeper = new_token_keeper(credentials, config)
    state = Hub(0, credentials, keeper, tmp_path)
    state.port = await nursery.start(
        partial(
            serve_https,
            credentials,
            keeper,
            config,
            ready_check=lambda: state.ready,
            nodes=state.nodes,
            on_closed=state.on_closed,
        )
    )
    yield state


def client_context(ca_der: bytes | None, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    if ca_der is None:
        # Bootstrap `/ca.crt`: the edge does not verify the hub yet.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        # Verifies the chain and the IP SAN 127.0.0.1, as Go does.
        context = ssl.create_default_context(cadata=ca_der)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def _fetch(
    port: int,
    path: str,
    context: ssl.SSLContext,
    method: str,
    body: bytes | None,
    headers: dict[str, str],
) -> Reply:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, response.read(), dict(response.getheaders()))
    finally:
        conn.close()


async def fetch(
    hub: Hub,
    path: str,
    *,
    ca_der: bytes | None = None,
    cert: tuple[Path, Path] | None = None,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    context = client_context(ca_der, cert)
    return await trio.to_thread.run_sync(
        _fetch, hub.port, path, context, method, body, headers or {}
    )


def _raw_exchange(port: int, data: bytes) -> bytes:
    context = client_context(None)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(data)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def raw_exchange(hub: Hub, data: bytes) -> bytes:
    return await trio.to_thread.run_sync(_raw_exchange, hub.port, data)


def make_csr(
    cn: str = "system:node:edge-1", org: str = "system:nodes"
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Hangzhou"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    request = (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER), key


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + token.split_token(tok)[1], "NodeName": "edge-1"}


def save_client_cert(
    folder: Path, cert_der: bytes, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = folder / "client.crt", folder / "client.key"
    cert_path.write_bytes(certs.cert_pem(cert_der))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def issue_client_cert(hub: Hub, cn: str = "system:node:edge-1") -> tuple[Path, Path]:
    der, key = make_csr(cn)
    cert = csr.sign_csr(csr.parse_csr(der), hub.credentials.ca, datetime.now(UTC), 365)
    return save_client_cert(hub.tmp_path, cert, key)


async def test_bootstrap_like_an_edge(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        join_token = hub.keeper.token
        ca_reply = await fetch(hub, "/ca.crt")
        assert ca_reply.status == 200
        assert ca_reply.body == hub.credentials.ca_der
        assert hashlib.sha256(ca_reply.body).hexdigest() == join_token.split(".")[0]

        der, key = make_csr()
        reply = await fetch(
            hub, "/edge.crt", ca_der=ca_reply.body, body=der, headers=bearer(join_token)
        )
        assert reply.status == 200, reply.body
        assert reply.headers["Content-Type"] == "application/octet-stream"
        cert = x509.load_der_x509_certificate(reply.body)
        cert.verify_directly_issued_by(x509.load_der_x509_certificate(hub.credentials.ca_der))
        assert cert.subject.rfc4514_string() == "CN=system:node:edge-1,O=system:nodes"
        assert cert.public_key() == key.public_key()
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=365)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


async def test_every_closed_connection_is_reported(hub: Hub) -> None:
    """What the hub counts as churn for its heap trim: answered or not, TLS or not."""
    assert (await fetch(hub, "/readyz")).status == 200
    with socket.create_connection(("127.0.0.1", hub.port), timeout=TIMEOUT):
        pass  # no TLS hello at all
    assert await raw_exchange(hub, b"GET /nope HTTP/1.1\r\n\r\n")
    with trio.fail_after(TIMEOUT):
        while hub.closed < 3:  # noqa: ASYNC110 (a counter the server bumps)
            await trio.sleep(0.01)
    await trio.sleep(0.1)
    assert hub.closed == 3


async def test_ext_key_usages_header(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        headers = {**bearer(hub.keeper.token), "ExtKeyUsages": "[1,2]"}
        reply = await fetch(hub, "/edge.crt", body=make_csr()[0], headers=headers)
        assert reply.status == 200
        eku = x509.load_der_x509_certificate(reply.body).extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        )
        assert set(eku.value) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        headers["ExtKeyUsages"] = "[99]"
        bad = await fetch(hub, "/edge.crt", body=make_csr()[0], headers=headers)
        assert bad.status == 400


async def test_missing_and_malformed_authorization(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        der = make_csr()[0]
        missing = await fetch(hub, "/edge.crt", body=der, headers={"NodeName": "edge-1"})
        assert missing.status == 401
        assert missing.body == b"token validation failure, token is empty"
        jwt = token.split_token(hub.keeper.token)[1]
        for value in (jwt, f"Bearer {jwt} extra", "Bearer"):
            reply = await fetch(hub, "/edge.crt", body=der, headers={"Authorization": value})
            assert reply.status == 401, value
            assert reply.body.startswith(b"token validation failure")


async def test_forged_and_expired_tokens(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        der = make_csr()[0]
        other_ca = certs.generate_ca(datetime.now(UTC))
        forged = token.make_token(hub.credentials.ca_der, other_ca.key_der, datetime.now(UTC), 12)
        reply = await fetch(hub, "/edge.crt", body=der, headers=bearer(forged))
        assert reply.status == 401
        assert reply.body == b"token validation failure, err: token signature is invalid"

        past = datetime.now(UTC) - timedelta(hours=25)
        expired = token.make_token(hub.credentials.ca_der, hub.credentials.ca_key_der, past, 12)
        reply = await fetch(hub, "/edge.crt", body=der, headers=bearer(expired))
        assert reply.status == 401
        assert reply.body == b"token validation failure, err: token is expired"

        garbage = {"Authorization": "Bearer not.a-token", "NodeName": "edge-1"}
        reply = await fetch(hub, "/edge.crt", body=der, headers=garbage)
        assert reply.status == 401
        assert reply.body.startswith(b"token validation failure, err: token is malformed")


async def test_old_token_still_valid_after_refresh(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        old = hub.keeper.token
        hub.keeper.refresh(datetime.now(UTC) + timedelta(seconds=1))
        assert hub.keeper.token != old
        reply = await fetch(hub, "/edge.crt", body=make_csr()[0], headers=bearer(old))
        assert reply.status == 200


async def test_bad_csr_is_400(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        for body in (b"this is not DER", b""):
            reply = await fetch(hub, "/edge.crt", body=body, headers=bearer(hub.keeper.token))
            assert reply.status == 400
            assert b"certificate request" in reply.body


async def test_oversized_body_is_413(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        head = (
            b"GET /edge.crt HTTP/1.1\r\nHost: hub\r\n"
            + f"Content-Length: {2 * MAX_BODY_BYTES}\r\n\r\n".encode()
        )
        answer = await raw_exchange(hub, head + b"x" * 100)
        assert answer.startswith(b"HTTP/1.1 413 ")
        # Chunked bodies have no declared length: the bound is applied while reading.
        chunked = (
            b"GET /edge.crt HTTP/1.1\r\nHost: hub\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{MAX_BODY_BYTES + 1:x}\r\n".encode()
            + b"x" * (MAX_BODY_BYTES + 1)
        )
        answer = await raw_exchange(hub, chunked)
        assert answer.startswith(b"HTTP/1.1 413 ")


async def test_garbage_http_is_400_and_server_survives(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        answer = await raw_exchange(hub, b"\x00\x01 garbage\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        answer = await raw_exchange(hub, b"GET /edge.crt HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert (await fetch(hub, "/livez")).status == 200


async def test_rotation_with_client_cert_and_no_token(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        client = issue_client_cert(hub)
        der, key = make_csr()
        reply = await fetch(
            hub,
            "/edge.crt",
            ca_der=hub.credentials.ca_der,
            cert=client,
            body=der,
            headers={"NodeName": "edge-1"},
        )
        assert reply.status == 200, reply.body
        cert = x509.load_der_x509_certificate(reply.body)
        assert cert.public_key() == key.public_key()


async def test_rotation_with_wrong_cn_is_401(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        client = issue_client_cert(hub, "system:node:other")
        reply = await fetch(
            hub,
            "/edge.crt",
            cert=client,
            body=make_csr()[0],
            headers={**bearer(hub.keeper.token), "NodeName": "edge-1"},
        )
        # A presented certificate is checked first; the token does not rescue it.
        assert reply.status == 401
        assert b"does not match node 'edge-1'" in reply.body


async def test_rotation_cannot_request_another_node(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        client = issue_client_cert(hub)
        reply = await fetch(
            hub,
            "/edge.crt",
            cert=client,
            body=make_csr("system:node:edge-2")[0],
            headers={"NodeName": "edge-1"},
        )
        assert reply.status == 401
        assert reply.body.startswith(b"certificate request subject")


async def test_client_cert_from_another_ca_is_401(hub: Hub) -> None:
    """Go's RequestClientCert: TLS takes any certificate, the handler refuses it (item 48)."""
    with trio.fail_after(TIMEOUT):
        other = certs.generate_ca(datetime.now(UTC))
        der, key = make_csr()
        cert = csr.sign_csr(csr.parse_csr(der), other, datetime.now(UTC), 365)
        client = save_client_cert(hub.tmp_path, cert, key)
        reply = await fetch(
            hub,
            "/edge.crt",
            cert=client,
            body=der,
            headers={**bearer(hub.keeper.token), "NodeName": "edge-1"},
        )
        assert (reply.status, reply.body) == (
            401,
            b"client certificate is not signed by the hub CA",
        )
        # The same foreign certificate may still fetch the CA (no authentication there).
        assert (await fetch(hub, "/ca.crt", cert=client)).status == 200
        assert (await fetch(hub, "/livez")).status == 200


@pytest.mark.parametrize(
    ("issued_at", "usages", "reason"),
    [
        (datetime.now(UTC) - timedelta(days=400), (2,), b"expired or not yet valid"),
        (datetime.now(UTC), (1,), b"not valid for client authentication"),
    ],
)
async def test_hub_signed_but_unusable_client_cert_is_401(
    hub: Hub, issued_at: datetime, usages: tuple[int, ...], reason: bytes
) -> None:
    with trio.fail_after(TIMEOUT):
        der, key = make_csr()
        cert = csr.sign_csr(csr.parse_csr(der), hub.credentials.ca, issued_at, 365, usages)
        client = save_client_cert(hub.tmp_path, cert, key)
        reply = await fetch(hub, "/edge.crt", cert=client, body=der, headers={"NodeName": "edge-1"})
        assert reply.status == 401
        assert reason in reply.body


async def test_health_and_routing(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        assert (await fetch(hub, "/livez")).status == 200
        ready = await fetch(hub, "/readyz")
        assert (ready.status, ready.body) == (200, b"ok")
        hub.ready = False
        assert (await fetch(hub, "/readyz")).status == 503
        assert (await fetch(hub, "/livez")).status == 200
        assert (await fetch(hub, "/nope")).status == 404
        post = await fetch(hub, "/ca.crt", method="POST", body=b"")
        assert post.status == 405
        assert post.headers["Allow"] == "GET"
        query = await fetch(hub, "/ca.crt?x=1")
        assert query.body == hub.credentials.ca_der


async def test_check_node_answers_as_cloudcore(hub: Hub) -> None:
    """`GET /node/{name}` (keadm join): no authentication, CloudCore's bodies."""
    with trio.fail_after(TIMEOUT):
        hub.nodes.known.add("edge-1")
        found = await fetch(hub, "/node/edge-1")
        assert (found.status, found.body) == (200, b"Node founded")
        missing = await fetch(hub, "/node/edge-2")
        assert (missing.status, missing.body) == (404, b"Node not found")
        assert (await fetch(hub, "/node/a/b")).body == b"404 page not found"
        assert (await fetch(hub, "/node/edge-1", method="POST", body=b"")).status == 405
        hub.nodes.failing = True
        failed = await fetch(hub, "/node/edge-1")
        assert (failed.status, failed.body) == (500, b"Failed to query node information")
        assert (await fetch(hub, "/livez")).status == 200


async def test_an_issued_certificate_records_the_node_as_joined(hub: Hub) -> None:
    with trio.fail_after(TIMEOUT):
        reply = await fetch(
            hub, "/edge.crt", body=make_csr()[0], headers={**bearer(hub.keeper.token)}
        )
        assert reply.status == 200
        assert hub.nodes.joined == ["edge-1"]
        refused = await fetch(hub, "/edge.crt", body=b"junk", headers=bearer(hub.keeper.token))
        assert refused.status == 400
        assert hub.nodes.joined == ["edge-1"]


async def test_keep_alive_serves_several_requests(hub: Hub) -> None:
    def two_requests() -> list[int]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", hub.port, context=client_context(hub.credentials.ca_der), timeout=TIMEOUT
        )
        try:
            statuses = []
            for path in ("/ca.crt", "/livez"):
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            return statuses
        finally:
            conn.close()

    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(two_requests) == [200, 200]
