"""KubeEdge's credential secrets (spec 7.1-7.3) as Kubernetes Secret bodies, and back.

CloudCore keeps its CA, its server certificate and the join token in three `Opaque` secrets
in namespace `kubeedge`, without labels or annotations (REF
`cloud/pkg/cloudhub/servers/httpserver/secretsutil.go`, NEW `.../httpserver/pre_server.go`):

    casecret         cadata = CA certificate DER,      cakeydata = CA key DER (SEC1 EC)
    cloudcoresecret  cloudcoredata = server cert DER,  cloudcorekeydata = server key DER
    tokensecret      tokendata = the join token's ASCII text

In JSON every `data` value is standard base64 of those bytes. Reading them back keeps the
CA key's bytes exactly: they are the token's HMAC key, so a cluster migrated from CloudCore
keeps its join tokens valid.

Pure: no I/O. The decision functions say what start-up does with the result of a read;
`trio_cloudhub.http.kube_credentials` makes the calls.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)

from trio_cloudhub.pki import certs
from trio_cloudhub.pki.certs import CertAndKey, PkiError
from trio_cloudhub.pki.token import MAX_TOKEN_CHARS, TokenError, split_token

__all__ = [
    "CA_CERT_KEY",
    "CA_KEY_KEY",
    "CA_SECRET",
    "NAMESPACE",
    "SECRET_TYPE",
    "SERVER_CERT_KEY",
    "SERVER_KEY_KEY",
    "SERVER_SECRET",
    "TOKEN_KEY",
    "TOKEN_SECRET",
    "ReadOutcome",
    "SecretError",
    "StartupAction",
    "ca_secret",
    "classify_read",
    "is_already_exists",
    "load_secret_json",
    "namespace_body",
    "parse_ca_secret",
    "parse_server_secret",
    "parse_token_secret",
    "server_secret",
    "startup_action",
    "status_message",
    "token_secret",
]

NAMESPACE = "kubeedge"
SECRET_TYPE = "Opaque"
CA_SECRET = "casecret"
CA_CERT_KEY = "cadata"
CA_KEY_KEY = "cakeydata"
SERVER_SECRET = "cloudcoresecret"
SERVER_CERT_KEY = "cloudcoredata"
SERVER_KEY_KEY = "cloudcorekeydata"
TOKEN_SECRET = "tokensecret"
TOKEN_KEY = "tokendata"

# A Secret's data is capped at 1 MiB by the API server; base64 and a copy in an annotation
# (kubectl apply) can roughly triple that.
MAX_SECRET_JSON_BYTES = 4 * 1024 * 1024
# Real certificates and keys here are a few hundred bytes; RSA-8192 keys stay below 8 KiB.
MAX_DER_BYTES = 64 * 1024
# An error Status is small; a larger 404/409 body is not one the API server wrote.
MAX_STATUS_BYTES = 64 * 1024


class SecretError(PkiError):
    """A secret that cannot be used; the message names the secret and the key."""


def namespace_body() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


def _secret_body(name: str, data: Mapping[str, bytes]) -> dict[str, Any]:
    """A Secret as CloudCore creates it: Opaque, no labels or annotations, data base64."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {key: base64.b64encode(value).decode("ascii") for key, value in data.items()},
        "type": SECRET_TYPE,
    }


def ca_secret(ca: CertAndKey) -> dict[str, Any]:
    return _secret_body(CA_SECRET, {CA_CERT_KEY: ca.cert_der, CA_KEY_KEY: ca.key_der})


def server_secret(server: CertAndKey) -> dict[str, Any]:
    return _secret_body(
        SERVER_SECRET, {SERVER_CERT_KEY: server.cert_der, SERVER_KEY_KEY: server.key_der}
    )


def token_secret(token: str) -> dict[str, Any]:
    return _secret_body(TOKEN_SECRET, {TOKEN_KEY: token.encode("ascii")})


def _json_object(raw: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(raw) > limit:
        raise SecretError(f"{what}: larger than {limit} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise SecretError(f"{what}: not JSON") from None
    if not isinstance(value, dict):
        raise SecretError(f"{what}: not a JSON object")
    return value


def load_secret_json(raw: bytes, name: str) -> dict[str, Any]:
    """The API server's JSON answer for secret `name`, size-bounded and checked for shape."""
    what = f"secret {NAMESPACE}/{name}"
    body = _json_object(raw, MAX_SECRET_JSON_BYTES, what)
    if body.get("kind", "Secret") != "Secret":
        raise SecretError(f"{what}: kind is {body.get('kind')!r}, not Secret")
    return body


def _secret_value(body: Mapping[str, Any], name: str, key: str, limit: int) -> bytes:
    """One `data` value decoded; a clear error when missing, not base64, empty or too big."""
    where = f"secret {NAMESPACE}/{name} key {key}"
    data = body.get("data")
    if not isinstance(data, dict) or key not in data:
        raise SecretError(f"{where}: missing")
    text = data[key]
    if not isinstance(text, str):
        raise SecretError(f"{where}: not a base64 string")
    if len(text) > 4 * (limit // 3 + 1):
        raise SecretError(f"{where}: larger than {limit} bytes")
    try:
        value = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SecretError(f"{where}: not valid base64") from None
    if not value:
        raise SecretError(f"{where}: empty")
    return value


def _public_der(key: CertificatePublicKeyTypes | PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checked_pair(name: str, cert_der: bytes, key_der: bytes, *, issuer: bool) -> CertAndKey:
    """Certificate and key decodable and belonging together; the DER bytes kept as read."""
    try:
        cert = certs.load_der_certificate(cert_der)
        key = certs.load_issuer_key(key_der) if issuer else certs.load_private_key(key_der)
    except PkiError as exc:
        raise SecretError(f"secret {NAMESPACE}/{name}: {exc}") from None
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise SecretError(f"secret {NAMESPACE}/{name}: the key does not belong to the certificate")
    return CertAndKey(cert_der, key_der)


def parse_ca_secret(body: Mapping[str, Any]) -> CertAndKey:
    """The CA from `casecret`; the key must be EC (CloudCore parses it as such)."""
    cert_der = _secret_value(body, CA_SECRET, CA_CERT_KEY, MAX_DER_BYTES)
    key_der = _secret_value(body, CA_SECRET, CA_KEY_KEY, MAX_DER_BYTES)
    return _checked_pair(CA_SECRET, cert_der, key_der, issuer=True)


def parse_server_secret(body: Mapping[str, Any]) -> CertAndKey:
    """The server certificate and key from `cloudcoresecret` (any key type `ssl` loads)."""
    cert_der = _secret_value(body, SERVER_SECRET, SERVER_CERT_KEY, MAX_DER_BYTES)
    key_der = _secret_value(body, SERVER_SECRET, SERVER_KEY_KEY, MAX_DER_BYTES)
    return _checked_pair(SERVER_SECRET, cert_der, key_der, issuer=False)


def parse_token_secret(body: Mapping[str, Any]) -> str:
    """The join token from `tokensecret`, checked for the `<ca hash>.<jwt>` shape."""
    raw = _secret_value(body, TOKEN_SECRET, TOKEN_KEY, MAX_TOKEN_CHARS + 128)
    where = f"secret {NAMESPACE}/{TOKEN_SECRET} key {TOKEN_KEY}"
    try:
        token = raw.decode("ascii")
        split_token(token)
    except (UnicodeDecodeError, TokenError) as exc:
        raise SecretError(f"{where}: not a join token ({exc})") from None
    return token.strip()


class ReadOutcome(enum.Enum):
    FOUND = "found"
    NOT_FOUND = "not-found"
    FAILED = "failed"


class StartupAction(enum.Enum):
    USE = "use"  # parse the secret and use it (an unusable one is an error, never replaced)
    GENERATE = "generate"  # generate, create only if absent, on AlreadyExists read back
    RETRY = "retry"  # wait (back-off) and read again; never generate


def _status(status_body: bytes) -> dict[str, Any] | None:
    """A Kubernetes `Status` object from an error answer, or None when it is not one."""
    try:
        body = _json_object(status_body, MAX_STATUS_BYTES, "status")
    except SecretError:
        return None
    return body if body.get("kind") == "Status" else None


def status_message(status_body: bytes, limit: int = 300) -> str:
    """A short text for logs: the Status message or reason, else the body's start."""
    status = _status(status_body) or {}
    for field in ("message", "reason"):
        text = status.get(field)
        if isinstance(text, str) and text:
            return text[:limit]
    return status_body[:limit].decode("utf-8", "replace") or "(no body)"


def _is_not_found(status_body: bytes, name: str) -> bool:
    status = _status(status_body)
    if status is None or status.get("reason") != "NotFound":
        return False
    details = status.get("details")
    if not isinstance(details, dict):
        return True
    # A NotFound about something else (another name or kind) is not this secret's absence.
    same_name = details.get("name", name) == name
    return bool(same_name and details.get("kind", "secrets") == "secrets")


def classify_read(status: int | None, body: bytes, name: str) -> ReadOutcome:
    """What reading secret `name` gave: `status` None means no HTTP answer at all.

    Only a Kubernetes NotFound Status about this secret counts as absent (spec 12: REF
    treated any error as absent and could replace the CA on a transient failure); a bare
    404 from a proxy or a wrong URL is a failure.
    """
    if status is not None and 200 <= status <= 299:
        return ReadOutcome.FOUND
    if status == 404 and _is_not_found(body, name):
        return ReadOutcome.NOT_FOUND
    return ReadOutcome.FAILED


def startup_action(outcome: ReadOutcome) -> StartupAction:
    """Only NotFound may lead to generating: any other failure waits and reads again."""
    if outcome is ReadOutcome.FOUND:
        return StartupAction.USE
    if outcome is ReadOutcome.NOT_FOUND:
        return StartupAction.GENERATE
    return StartupAction.RETRY


def is_already_exists(status: int | None, body: bytes) -> bool:
    """A create refused because the object exists (409, unless the Status says otherwise)."""
    if status != 409:
        return False
    status_object = _status(body)
    if status_object is None:
        return True
    return bool(status_object.get("reason", "AlreadyExists") == "AlreadyExists")
