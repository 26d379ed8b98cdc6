from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_cloudhub.pki import certs
from trio_cloudhub.pki.certs import CertAndKey, PkiError
from trio_cloudhub.pki.pem import PemError, encode_pem, first_pem_block

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return certs.generate_ca(NOW)


def test_ca_fields(ca: CertAndKey) -> None:
    cert = x509.load_der_x509_certificate(ca.cert_der)
    assert cert.serial_number == 1024
    assert cert.subject.rfc4514_string() == "CN=KubeEdge"
    assert cert.issuer == cert.subject
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == NOW + timedelta(days=100 * 364)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.key_cert_sign
    assert not usage.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    cert.verify_directly_issued_by(cert)


def test_ca_key_is_sec1_p256(ca: CertAndKey) -> None:
    key = serialization.load_der_private_key(ca.key_der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    sec1 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert sec1 == ca.key_der


def test_server_cert_fields(ca: CertAndKey) -> None:
    server = certs.generate_server_cert(ca, NOW, ["10.1.2.3", "::1"], ["hub.example", ""])
    cert = x509.load_der_x509_certificate(server.cert_der)
    cert.verify_directly_issued_by(x509.load_der_x509_certificate(ca.cert_der))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "KubeEdge"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "KubeEdge"
    assert 0 < cert.serial_number < 2**63 - 1
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=36400)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["hub.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign


def test_server_cert_rejects_non_ip_advertise_address(ca: CertAndKey) -> None:
    with pytest.raises(PkiError, match="not an IP address"):
        certs.generate_server_cert(ca, NOW, ["hub.example"], [])


def test_serials_are_random(ca: CertAndKey) -> None:
    serials = {
        x509.load_der_x509_certificate(
            certs.generate_server_cert(ca, NOW, ["127.0.0.1"], []).cert_der
        ).serial_number
        for _ in range(3)
    }
    assert len(serials) == 3


def test_pem_round_trip_keeps_exact_ca_key_bytes(ca: CertAndKey) -> None:
    loaded = certs.load_ca_pem(certs.cert_pem(ca.cert_der), certs.key_pem(ca.key_der))
    assert loaded == ca
    assert certs.key_pem(ca.key_der).startswith(b"-----BEGIN EC PRIVATE KEY-----\n")


def test_load_takes_first_pem_block(ca: CertAndKey) -> None:
    other = certs.generate_ca(NOW)
    bundle = certs.cert_pem(ca.cert_der) + certs.cert_pem(other.cert_der)
    assert certs.load_ca_pem(bundle, certs.key_pem(ca.key_der)).cert_der == ca.cert_der


def test_ca_key_must_match_and_be_ec(ca: CertAndKey) -> None:
    other = certs.generate_ca(NOW)
    with pytest.raises(PkiError, match="does not belong"):
        certs.load_ca_pem(certs.cert_pem(ca.cert_der), certs.key_pem(other.key_der))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(PkiError, match="must be an EC"):
        certs.load_ca_pem(certs.cert_pem(ca.cert_der), rsa_pem)


def test_load_server_pem(ca: CertAndKey) -> None:
    server = certs.generate_server_cert(ca, NOW, ["127.0.0.1"], [])
    loaded = certs.load_server_pem(certs.cert_pem(server.cert_der), certs.key_pem(server.key_der))
    assert loaded == server
    with pytest.raises(PkiError, match="does not belong"):
        certs.load_server_pem(certs.cert_pem(server.cert_der), certs.key_pem(ca.key_der))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        b"-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n"
        b"-----END EC PRIVATE KEY-----\n",
    ],
)
def test_bad_pem(data: bytes) -> None:
    with pytest.raises(PemError):
        first_pem_block(data)
    with pytest.raises(PkiError):
        certs.load_ca_pem(data, data)


def test_pem_not_a_certificate(ca: CertAndKey) -> None:
    junk = encode_pem("CERTIFICATE", b"\x30\x03\x02\x01\x01")
    with pytest.raises(PkiError, match="not a DER certificate"):
        certs.load_ca_pem(junk, certs.key_pem(ca.key_der))


def test_check_pair_both_or_neither() -> None:
    assert certs.check_pair("ca", "caKey", has_cert=True, has_key=True) is True
    assert certs.check_pair("ca", "caKey", has_cert=False, has_key=False) is False
    with pytest.raises(PkiError, match="Both of ca and caKey should be specified!"):
        certs.check_pair("ca", "caKey", has_cert=True, has_key=False)
    with pytest.raises(PkiError):
        certs.check_pair("ca", "caKey", has_cert=False, has_key=True)


def test_server_cert_problem(ca: CertAndKey) -> None:
    server = certs.generate_server_cert(ca, NOW, ["10.0.0.1"], ["hub.example"])
    assert certs.server_cert_problem(server.cert_der, ca.cert_der, NOW, ["10.0.0.1"], []) is None
    missing = certs.server_cert_problem(server.cert_der, ca.cert_der, NOW, ["10.0.0.2"], [])
    assert missing is not None and "10.0.0.2" in missing
    dns = certs.server_cert_problem(server.cert_der, ca.cert_der, NOW, [], ["other.example"])
    assert dns is not None and "other.example" in dns
    other_ca = certs.generate_ca(NOW)
    assert certs.server_cert_problem(server.cert_der, other_ca.cert_der, NOW, [], []) == (
        "not signed by the current CA"
    )
    late = NOW + timedelta(days=36401)
    assert certs.server_cert_problem(server.cert_der, ca.cert_der, late, [], []) == (
        "outside its validity period"
    )
    assert certs.server_cert_problem(b"junk", ca.cert_der, NOW, [], []) is not None
