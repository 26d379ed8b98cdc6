"""KubeEdge's credential secrets: bodies as CloudCore writes them, parsing, start-up decisions."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from trio_cloudhub.pki import certs, kube_secrets, token
from trio_cloudhub.pki.certs import CertAndKey
from trio_cloudhub.pki.kube_secrets import (
    ReadOutcome,
    SecretError,
    StartupAction,
    classify_read,
    is_already_exists,
    load_secret_json,
    parse_ca_secret,
    parse_server_secret,
    parse_token_secret,
    startup_action,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)

# A CA shaped like CloudCore's (ECDSA P-256, serial 1024, CN=KubeEdge, CA:TRUE), its key as
# SEC1 DER like Go's x509.MarshalECPrivateKey, a server certificate (CN=O=KubeEdge, IP SAN
# 127.0.0.1) and a join token, all made with openssl independently of our code. The token's
# exp is 2100-01-01.
CLOUDCORE_CA = (
    "MIIBeDCCAR+gAwIBAgICBAAwCgYIKoZIzj0EAwIwEzERMA8GA1UEAwwIS3ViZUVkZ2UwIBcNMjYxMTI2MjEwNjA2"
    "WhgPMjEyNjA3MjUyMTA2MDZaMBMxETAPBgNVBAMMCEt1YmVFZGdlMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE"
    "o9imzpPM4jO8hqFKXKhjxmVcyMgOBL17ECppldrS1/JrzJuVuh6D4QlpTi3+irfk7yonOg6m4oGLh8rBq5nvvqNh"
    "MF8wDgYDVR0PAQH/BAQDAgKkMB0GA1UdJQQWMBQGCCsGAQUFBwMBBggrBgEFBQcDAjAPBgNVHRMBAf8EBTADAQH/"
    "MB0GA1UdDgQWBBRXOU/LzREJjgerdcKqYJQoo7kvXTAKBggqhkjOPQQDAgNHADBEAiASD68w3Zm8Zy2w7Ek9mMKN"
    "0ky12Q7mY3PkCQg69a8GzAIgf7jLMP30S+1Dn2iAVJohsPWX2vXWHs8pHbmyGHz2RXc="
)
CLOUDCORE_CA_KEY = (
    "MHcCAQEEIF4Jo88YL/8YU38Ov7nYdqysAHRNvPMSc3MUBUkkLOm4oAoGCCqGSM49AwEHoUQDQgAEo9imzpPM4jO8"
    "hqFKXKhjxmVcyMgOBL17ECppldrS1/JrzJuVuh6D4QlpTi3+irfk7yonOg6m4oGLh8rBq5nvvg=="
)
CLOUDCORE_SERVER = (
    "MIIBqDCCAU+gAwIBAgIIOlt8nR4vQFEwCgYIKoZIzj0EAwIwEzERMA8GA1UEAwwIS3ViZUVkZ2UwIBcNMjYxMTI2"
    "MjEwNjEzWhgPMjEyNjA3MjUyMTA2MTNaMCYxETAPBgNVBAoMCEt1YmVFZGdlMREwDwYDVQQDDAhLdWJlRWRnZTBZ"
    "MBMGByqGSM49AgEGCCqGSM49AwEHA0IABObFhypceSG8NiI42z4p2EEODowSlwPhvLyBw9L5JkL3VNFXHZoiK+Dn"
    "/QSdCbvAd+Bg6tXFmLINGukwGojjL5ejeDB2MA4GA1UdDwEB/wQEAwIFoDATBgNVHSUEDDAKBggrBgEFBQcDATAP"
    "BgNVHREECDAGhwR/AAABMB0GA1UdDgQWBBSvYsu/Kmi4h1LPxkzHjveiQMcz0DAfBgNVHSMEGDAWgBRXOU/LzREJ"
    "jgerdcKqYJQoo7kvXTAKBggqhkjOPQQDAgNHADBEAiBgdQ42x0QqlN3WKc+5I+LeQmISnLdOfgBqQGre+Rs9IQIg"
    "DhgHcRMgogWZ+8vj/XUARbS6ZMThpu1QNF35HvdXu/8="
)
CLOUDCORE_SERVER_KEY = (
    "MHcCAQEEILo+4gPCHy2qEnJrpww4p14YC+I+Bp0OVd1zk5S2/3IroAoGCCqGSM49AwEHoUQDQgAE5sWHKlx5Ibw2"
    "IjjbPinYQQ4OjBKXA+G8vIHD0vkmQvdU0VcdmiIr4Of9BJ0Ju8B34GDq1cWYsg0a6TAaiOMvlw=="
)
CLOUDCORE_TOKEN = (
    "174c3e36f8c6cd00ec0e70b214d2d015490167a6694ca8aec97cb59cd12cb0df"
    ".eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjQxMDI0NDQ4MDB9"
    ".QlAQNHjw-yg180lQxY_S8PtCIxo7dprYZ08UtW9jR2I"
)


def cloudcore_secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    """A Secret as the API server returns it after CloudCore's SaveSecret (client-go)."""
    keys = {f"f:{key}": {} for key in data}
    return {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": "kubeedge",
            "uid": "6f1c2b1e-0d7e-4c4f-9d0e-3b1f5a7c9e21",
            "resourceVersion": "1187",
            "creationTimestamp": "2026-11-26T21:06:20Z",
            "managedFields": [
                {
                    "manager": "cloudcore",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-26T21:06:20Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:data": {".": {}, **keys}, "f:type": {}},
                }
            ],
        },
        "data": data,
        "type": "Opaque",
    }


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return certs.generate_ca(NOW)


@pytest.fixture(scope="module")
def server(ca: CertAndKey) -> CertAndKey:
    return certs.generate_server_cert(ca, NOW, ["10.0.0.1"], ["hub.example"])


def test_ca_secret_has_cloudcore_shape(ca: CertAndKey) -> None:
    body = kube_secrets.ca_secret(ca)
    assert body == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "casecret", "namespace": "kubeedge"},
        "data": {
            "cadata": base64.b64encode(ca.cert_der).decode(),
            "cakeydata": base64.b64encode(ca.key_der).decode(),
        },
        "type": "Opaque",
    }


def test_server_and_token_secret_shapes(server: CertAndKey) -> None:
    body = kube_secrets.server_secret(server)
    assert body["metadata"] == {"name": "cloudcoresecret", "namespace": "kubeedge"}
    assert set(body["data"]) == {"cloudcoredata", "cloudcorekeydata"}
    assert body["type"] == "Opaque"
    tokens = kube_secrets.token_secret(CLOUDCORE_TOKEN)
    assert tokens["metadata"] == {"name": "tokensecret", "namespace": "kubeedge"}
    assert base64.b64decode(tokens["data"]["tokendata"]) == CLOUDCORE_TOKEN.encode()


def test_round_trips_keep_the_exact_bytes(ca: CertAndKey, server: CertAndKey) -> None:
    ca_body = load_secret_json(raw(kube_secrets.ca_secret(ca)), "casecret")
    assert parse_ca_secret(ca_body) == ca
    server_body = load_secret_json(raw(kube_secrets.server_secret(server)), "cloudcoresecret")
    assert parse_server_secret(server_body) == server
    assert parse_token_secret(kube_secrets.token_secret(CLOUDCORE_TOKEN)) == CLOUDCORE_TOKEN


def test_namespace_body() -> None:
    assert kube_secrets.namespace_body() == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "kubeedge"},
    }


def test_reads_a_cloudcore_cluster_and_its_tokens_stay_valid() -> None:
    """A cluster migrated from CloudCore: same CA bytes, its token accepted, ours accepted."""
    ca_body = cloudcore_secret("casecret", {"cadata": CLOUDCORE_CA, "cakeydata": CLOUDCORE_CA_KEY})
    ca = parse_ca_secret(load_secret_json(raw(ca_body), "casecret"))
    assert ca.cert_der == base64.b64decode(CLOUDCORE_CA)
    assert ca.key_der == base64.b64decode(CLOUDCORE_CA_KEY)

    token_body = cloudcore_secret(
        "tokensecret", {"tokendata": base64.b64encode(CLOUDCORE_TOKEN.encode()).decode()}
    )
    theirs = parse_token_secret(load_secret_json(raw(token_body), "tokensecret"))
    ca_part, jwt = token.split_token(theirs)
    assert ca_part == hashlib.sha256(ca.cert_der).hexdigest() == token.ca_hash(ca.cert_der)
    assert token.verify_token(jwt, ca.key_der, NOW) == {"exp": 4102444800}

    ours = token.make_token(ca.cert_der, ca.key_der, NOW, 12)
    assert ours.split(".")[0] == ca_part
    token.verify_token(token.split_token(ours)[1], base64.b64decode(CLOUDCORE_CA_KEY), NOW)


def test_reads_cloudcore_server_secret_and_it_fits() -> None:
    body = cloudcore_secret(
        "cloudcoresecret",
        {"cloudcoredata": CLOUDCORE_SERVER, "cloudcorekeydata": CLOUDCORE_SERVER_KEY},
    )
    pair = parse_server_secret(load_secret_json(raw(body), "cloudcoresecret"))
    ca_der = base64.b64decode(CLOUDCORE_CA)
    assert certs.server_cert_problem(pair.cert_der, ca_der, NOW, ["127.0.0.1"], []) is None


def test_a_secret_we_write_reads_like_cloudcores(ca: CertAndKey) -> None:
    """Ours as stored by the API server (metadata added) parses the same."""
    stored = copy.deepcopy(kube_secrets.ca_secret(ca))
    stored["metadata"].update(
        uid="u", resourceVersion="7", creationTimestamp="2030-01-01T00:00:00Z"
    )
    assert parse_ca_secret(load_secret_json(raw(stored), "casecret")) == ca


def with_data(body: dict[str, Any], **data: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    changed["data"].update(data)
    return {**changed, "data": {k: v for k, v in changed["data"].items() if v is not None}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cakeydata": None}, "key cakeydata: missing"),
        ({"cadata": None}, "key cadata: missing"),
        ({"cadata": "not base64!"}, "key cadata: not valid base64"),
        ({"cadata": ""}, "key cadata: empty"),
        ({"cadata": 42}, "key cadata: not a base64 string"),
        ({"cadata": base64.b64encode(b"junk").decode()}, "not a DER certificate"),
        ({"cakeydata": base64.b64encode(b"junk").decode()}, "not a usable DER private key"),
        ({"cadata": CLOUDCORE_CA}, "the key does not belong to the certificate"),
        ({"cadata": "A" * 200_000}, "key cadata: larger than"),
    ],
)
def test_unusable_ca_secret_is_named(ca: CertAndKey, data: dict[str, Any], message: str) -> None:
    body = with_data(kube_secrets.ca_secret(ca), **data)
    with pytest.raises(SecretError, match="secret kubeedge/casecret") as info:
        parse_ca_secret(body)
    assert message in str(info.value)


def test_ca_key_must_be_ec(ca: CertAndKey) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    body = with_data(kube_secrets.ca_secret(ca), cakeydata=base64.b64encode(der).decode())
    with pytest.raises(SecretError, match="must be an EC private key"):
        parse_ca_secret(body)


def test_secret_without_data_or_wrong_shape() -> None:
    with pytest.raises(SecretError, match="key cadata: missing"):
        parse_ca_secret({"kind": "Secret", "metadata": {"name": "casecret"}})
    with pytest.raises(SecretError, match="not JSON"):
        load_secret_json(b"<html>", "casecret")
    with pytest.raises(SecretError, match="not a JSON object"):
        load_secret_json(b"[]", "casecret")
    with pytest.raises(SecretError, match="not Secret"):
        load_secret_json(b'{"kind": "Status"}', "casecret")
    with pytest.raises(SecretError, match="larger than"):
        load_secret_json(b" " * (kube_secrets.MAX_SECRET_JSON_BYTES + 1), "casecret")


def test_bad_token_secret() -> None:
    body = kube_secrets.token_secret(CLOUDCORE_TOKEN)
    for bad in (b"no-dots", b"\xff\xfe", b"x" * 8000):
        broken = with_data(body, tokendata=base64.b64encode(bad).decode())
        with pytest.raises(SecretError, match="secret kubeedge/tokensecret key tokendata"):
            parse_token_secret(broken)


def not_found(name: str, kind: str = "secrets") -> bytes:
    return raw(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f'{kind} "{name}" not found',
            "reason": "NotFound",
            "details": {"name": name, "kind": kind},
            "code": 404,
        }
    )


def test_classify_read() -> None:
    assert classify_read(200, b"{}", "casecret") is ReadOutcome.FOUND
    assert classify_read(404, not_found("casecret"), "casecret") is ReadOutcome.NOT_FOUND
    no_details = raw({"kind": "Status", "reason": "NotFound", "code": 404})
    assert classify_read(404, no_details, "casecret") is ReadOutcome.NOT_FOUND


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (None, b""),  # no answer: connection refused, TLS, timeout
        (500, b'{"kind":"Status","reason":"InternalError","code":500}'),
        (403, b'{"kind":"Status","reason":"Forbidden","code":403}'),
        (401, b""),
        (429, b""),
        (503, b"etcdserver: leader changed"),
        (404, b"404 page not found"),  # a proxy or a wrong URL, not the API server's NotFound
        (404, not_found("other")),
        (404, not_found("casecret", kind="namespaces")),
        (404, b'{"kind":"Status","reason":"NotFound"' + b" " * 70_000 + b"}"),
    ],
)
def test_only_notfound_generates(status: int | None, body: bytes) -> None:
    outcome = classify_read(status, body, "casecret")
    assert outcome is ReadOutcome.FAILED
    assert startup_action(outcome) is StartupAction.RETRY


def test_startup_actions() -> None:
    assert startup_action(ReadOutcome.FOUND) is StartupAction.USE
    assert startup_action(ReadOutcome.NOT_FOUND) is StartupAction.GENERATE
    assert startup_action(ReadOutcome.FAILED) is StartupAction.RETRY


def test_is_already_exists() -> None:
    exists = raw({"kind": "Status", "reason": "AlreadyExists", "code": 409})
    assert is_already_exists(409, exists)
    assert is_already_exists(409, b"")
    assert not is_already_exists(409, raw({"kind": "Status", "reason": "Conflict", "code": 409}))
    assert not is_already_exists(500, exists)
    assert not is_already_exists(None, b"")


def test_status_message_is_short() -> None:
    assert kube_secrets.status_message(not_found("casecret")) == 'secrets "casecret" not found'
    assert kube_secrets.status_message(b"x" * 1000, limit=10) == "x" * 10
    assert kube_secrets.status_message(b"") == "(no body)"
    assert kube_secrets.status_message(b'{"kind":"Status","reason":"Forbidden"}') == "Forbidden"
