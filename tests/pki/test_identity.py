"""The certificate name check of KubeEdge authorization: CN must be system:node:<node_id>."""

from __future__ import annotations

import datetime
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trio_cloudhub.pki.identity import MAX_CERT_DER, connection_identity_problem

KEY = ec.generate_private_key(ec.SECP256R1())


def cert_der(*common_names: str) -> bytes:
    """A certificate with the subject a v1.23 EdgeCore asks for, with the given CN values."""
    attributes = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Zhejiang"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Hangzhou"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
        *(x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names),
    ]
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KubeEdge")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(issuer)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_matching_common_name_is_accepted() -> None:
    assert connection_identity_problem("edge-1", cert_der("system:node:edge-1")) is None


@pytest.mark.parametrize(
    ("common_name", "node_id"),
    [
        ("system:node:edge-2", "edge-1"),
        ("system:node:Edge-1", "edge-1"),  # names are compared exactly
        ("system:node:edge-1x", "edge-1"),
        ("kubeedge.io", "edge-1"),  # the shared identity a v1.10 EdgeCore asks for
        ("edge-1", "edge-1"),
    ],
)
def test_other_common_name_is_refused(common_name: str, node_id: str) -> None:
    problem = connection_identity_problem(node_id, cert_der(common_name))
    assert problem == f"certificate CN {common_name!r} is not 'system:node:{node_id}'"


def test_no_certificate_is_refused() -> None:
    assert connection_identity_problem("edge-1", None) == "no client certificate"


def test_empty_node_id_is_refused_even_with_a_matching_prefix() -> None:
    assert connection_identity_problem("", cert_der("system:node:")) == "empty node_id"


@pytest.mark.parametrize("count", [0, 2])
def test_subject_without_exactly_one_common_name_is_refused(count: int) -> None:
    names = ["system:node:edge-1"] * count
    problem = connection_identity_problem("edge-1", cert_der(*names))
    assert problem == f"client certificate has {count} subject CNs, not one"


def with_byte(der: bytes, marker: bytes, offset: int, value: int) -> bytes:
    at = der.index(marker) + offset
    return der[:at] + bytes([value]) + der[at + 1 :]


# The v3 version field (a0 03 02 01 02), and a CN whose value is tagged BIT STRING: cryptography
# raises InvalidVersion and TypeError on those, not ValueError.
BAD_VERSION = with_byte(cert_der("system:node:edge-1"), b"\xa0\x03\x02\x01\x02", 4, 9)
BIT_STRING_CN = with_byte(cert_der("\x00system:node:edge-1"), b"\x0c\x13\x00system", 0, 0x03)


@pytest.mark.parametrize(
    "der",
    [
        b"",
        b"junk",
        b"\x30\x82\x01\x00",
        cert_der("system:node:edge-1")[:-40],
        BAD_VERSION,
        BIT_STRING_CN,
    ],
    ids=["empty", "junk", "header-only", "truncated", "bad-version", "bit-string-cn"],
)
def test_undecodable_certificate_is_refused(der: bytes) -> None:
    assert connection_identity_problem("edge-1", der) == "client certificate cannot be decoded"


def test_oversized_certificate_is_refused_before_parsing() -> None:
    der = cert_der("system:node:edge-1") + b"\x00" * MAX_CERT_DER
    problem = connection_identity_problem("edge-1", der)
    assert problem == f"client certificate of {len(der)} bytes exceeds {MAX_CERT_DER}"


# cryptography warns about some malformed attributes it still decodes.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_certificates_never_raise() -> None:
    good = cert_der("system:node:edge-1")
    rng = random.Random(7)
    for _ in range(5000):
        der = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            der[rng.randrange(len(der))] = rng.randrange(256)
        problem = connection_identity_problem("edge-1", bytes(der))
        assert problem is None or isinstance(problem, str)
