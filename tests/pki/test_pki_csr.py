from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_cloudhub.pki import certs, csr
from trio_cloudhub.pki.certs import CertAndKey
from trio_cloudhub.pki.client_cert import (
    ClientCertError,
    check_node_subject,
    verify_rotation_cert,
)
from trio_cloudhub.pki.csr import CsrError

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return certs.generate_ca(NOW)


def make_csr(
    cn: str | None = "system:node:edge-1",
    orgs: tuple[str, ...] = ("system:nodes",),
    sans: list[x509.GeneralName] | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COUNTRY_NAME, "CN")]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
    attributes += [
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Hangzhou"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Zhejiang"),
    ]
    if cn is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    request = builder.sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.DER), key


def issue(
    ca: CertAndKey, der: bytes, usages: tuple[int, ...] = (2,), now: datetime = NOW
) -> x509.Certificate:
    return x509.load_der_x509_certificate(csr.sign_csr(csr.parse_csr(der), ca, now, 365, usages))


def test_signed_cert_fields(ca: CertAndKey) -> None:
    der, key = make_csr()
    cert = issue(ca, der)
    assert cert.subject.rfc4514_string() == "CN=system:node:edge-1,O=system:nodes"
    assert cert.issuer.rfc4514_string() == "CN=KubeEdge"
    cert.verify_directly_issued_by(x509.load_der_x509_certificate(ca.cert_der))
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert 0 < cert.serial_number < 2**63 - 1


def test_legacy_subject_and_multiple_orgs(ca: CertAndKey) -> None:
    der, _ = make_csr("kubeedge.io", ("kubeEdge", "second"))
    cert = issue(ca, der)
    assert cert.subject.rfc4514_string() == "CN=kubeedge.io,O=second,O=kubeEdge"


def test_sans_are_copied(ca: CertAndKey) -> None:
    sans: list[x509.GeneralName] = [
        x509.DNSName("edge-1.example"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
        x509.RFC822Name("root@example.com"),
    ]
    der, _ = make_csr(sans=sans)
    ext = issue(ca, der).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ext.get_values_for_type(x509.DNSName) == ["edge-1.example"]
    assert ext.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert ext.get_values_for_type(x509.RFC822Name) == []


def test_ext_key_usages_header(ca: CertAndKey) -> None:
    usages = csr.parse_ext_key_usages("[1,2]")
    assert usages == (1, 2)
    cert = issue(ca, make_csr()[0], usages)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize("header", [None, "", "  ", "[]"])
def test_ext_key_usages_default(header: str | None) -> None:
    assert csr.parse_ext_key_usages(header) == (2,)


@pytest.mark.parametrize("header", ["[0]", "[3]", "[true]", '["1"]', "{}", "1", "[1", "[" * 3000])
def test_ext_key_usages_invalid(header: str) -> None:
    with pytest.raises(CsrError):
        csr.parse_ext_key_usages(header)


@pytest.mark.parametrize(
    "data",
    [b"", b"not a csr", b"\x30\x82\xff\xff" + b"\x00" * 10, b"\x30" * (70 * 1024)],
)
def test_garbage_csr(data: bytes) -> None:
    with pytest.raises(CsrError):
        csr.parse_csr(data)


def test_certificate_is_not_a_csr(ca: CertAndKey) -> None:
    with pytest.raises(CsrError, match="invalid certificate request"):
        csr.parse_csr(ca.cert_der)


def test_csr_with_broken_signature(ca: CertAndKey) -> None:
    der, _ = make_csr()
    broken = der[:-4] + bytes(b ^ 0xFF for b in der[-4:])
    with pytest.raises(CsrError):
        csr.parse_csr(broken)


# Rotation: the certificate an edge presents instead of a token.


def client_cert(
    ca: CertAndKey,
    cn: str = "system:node:edge-1",
    orgs: tuple[str, ...] = ("system:nodes",),
    usages: tuple[int, ...] = (2,),
    now: datetime = NOW,
) -> bytes:
    cert = issue(ca, make_csr(cn, orgs)[0], usages, now)
    return cert.public_bytes(serialization.Encoding.DER)


def test_rotation_node_identity(ca: CertAndKey) -> None:
    der = client_cert(ca)
    cert = verify_rotation_cert(der, ca.cert_der, "edge-1", NOW + timedelta(days=1))
    assert cert.public_bytes(serialization.Encoding.DER) == der


@pytest.mark.parametrize("org", ["KubeEdge", "kubeEdge"])
def test_rotation_legacy_identity(ca: CertAndKey, org: str) -> None:
    der = client_cert(ca, "kubeedge.io", (org,))
    verify_rotation_cert(der, ca.cert_der, "any-node", NOW)


@pytest.mark.parametrize(
    "cn,orgs,node",
    [
        ("system:node:edge-2", ("system:nodes",), "edge-1"),
        ("system:node:edge-1", ("system:masters",), "edge-1"),
        ("system:node:", ("system:nodes",), ""),
        ("kubeedge.io", ("Other",), "edge-1"),
        ("kubeedge.io", ("second", "KubeEdge"), "edge-1"),
    ],
)
def test_rotation_wrong_subject(ca: CertAndKey, cn: str, orgs: tuple[str, ...], node: str) -> None:
    with pytest.raises(ClientCertError, match="does not match"):
        verify_rotation_cert(client_cert(ca, cn, orgs), ca.cert_der, node, NOW)


def test_rotation_no_organization_is_an_error(ca: CertAndKey) -> None:
    with pytest.raises(ClientCertError, match="no organization"):
        verify_rotation_cert(client_cert(ca, "system:node:edge-1", ()), ca.cert_der, "edge-1", NOW)
    with pytest.raises(ClientCertError):
        check_node_subject("kubeedge.io", (), "edge-1")


def test_rotation_other_ca(ca: CertAndKey) -> None:
    other = certs.generate_ca(NOW)
    with pytest.raises(ClientCertError, match="not signed by the hub CA"):
        verify_rotation_cert(client_cert(other), ca.cert_der, "edge-1", NOW)


def test_rotation_expired_or_early(ca: CertAndKey) -> None:
    der = client_cert(ca)
    with pytest.raises(ClientCertError, match="expired"):
        verify_rotation_cert(der, ca.cert_der, "edge-1", NOW + timedelta(days=366))
    with pytest.raises(ClientCertError, match="not yet valid"):
        verify_rotation_cert(der, ca.cert_der, "edge-1", NOW - timedelta(seconds=1))


def test_rotation_server_only_usage(ca: CertAndKey) -> None:
    with pytest.raises(ClientCertError, match="client authentication"):
        verify_rotation_cert(client_cert(ca, usages=(1,)), ca.cert_der, "edge-1", NOW)


def test_rotation_garbage_cert(ca: CertAndKey) -> None:
    with pytest.raises(ClientCertError):
        verify_rotation_cert(b"\x30\x03junk", ca.cert_der, "edge-1", NOW)
