"""The hub's CA and server certificate (spec 7.1, 7.2): generate, load, check.

Keys travel as DER bytes because the CA key's exact DER bytes are also the join token's
HMAC key (spec 7.3): re-encoding a loaded key could change them and break old tokens.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_cloudhub.pki.pem import PemError, encode_pem, first_pem_block

CA_SERIAL = 1024
CA_VALIDITY = timedelta(days=100 * 364)
SERVER_VALIDITY = timedelta(days=36400)
COMMON_NAME = "KubeEdge"
# Go draws serials from [0, 2**63-1); X.509 wants them positive, so 0 is skipped.
MAX_SERIAL = 2**63 - 1

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SignatureHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


class PkiError(ValueError):
    """Key material that cannot be used; the message says which and why."""


@attrs.frozen
class CertAndKey:
    """A certificate and its private key, both DER; the key is SEC1 for EC keys."""

    cert_der: bytes
    key_der: bytes = attrs.field(repr=False)


def kubeedge_key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """DigitalSignature|KeyEncipherment (spec 7.1/7.2), plus CertSign for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def random_serial() -> int:
    return secrets.randbelow(MAX_SERIAL - 1) + 1


def signature_hash(key: ec.EllipticCurvePrivateKey) -> SignatureHash:
    """The digest Go's x509 pairs with an EC issuer key (SHA-256 unless a larger curve)."""
    if key.curve.key_size > 384:
        return hashes.SHA512()
    if key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _sec1_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _start(now: datetime) -> datetime:
    return now.replace(microsecond=0)


def generate_ca(now: datetime) -> CertAndKey:
    """A self-signed P-256 CA shaped like KubeEdge NEW's (`x509_ca.go`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    start = _start(now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(CA_SERIAL)
        .not_valid_before(start)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(
            kubeedge_key_usage(cert_sign=True),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert.public_bytes(serialization.Encoding.DER), _sec1_der(key))


def parse_ip_addresses(addresses: Iterable[str]) -> list[IPAddress]:
    """advertiseAddress entries as IPs; a non-IP entry is a configuration error."""
    parsed: list[IPAddress] = []
    for text in addresses:
        try:
            parsed.append(ipaddress.ip_address(text.strip()))
        except ValueError:
            raise PkiError(f"advertiseAddress {text!r} is not an IP address") from None
    return parsed


def _server_sans(ips: Sequence[str], dns_names: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names if name]
    names.extend(x509.IPAddress(ip) for ip in parse_ip_addresses(ips))
    return names


def issue_certificate(
    ca: CertAndKey,
    *,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    usages: Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName],
    now: datetime,
    validity: timedelta,
) -> bytes:
    """A leaf certificate signed by `ca` (DigitalSignature|KeyEncipherment); DER."""
    ca_cert = load_der_certificate(ca.cert_der)
    ca_key = load_issuer_key(ca.key_der)
    start = _start(now)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(start)
        .not_valid_after(start + validity)
        .add_extension(
            kubeedge_key_usage(cert_sign=False),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, signature_hash(ca_key))
    return cert.public_bytes(serialization.Encoding.DER)


def generate_server_cert(
    ca: CertAndKey,
    now: datetime,
    advertise_addresses: Sequence[str],
    dns_names: Sequence[str],
) -> CertAndKey:
    """The hub's TLS certificate (ports 10000-10002), as KubeEdge NEW makes it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, COMMON_NAME),
            x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME),
        ]
    )
    cert_der = issue_certificate(
        ca,
        subject=subject,
        public_key=key.public_key(),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=_server_sans(advertise_addresses, dns_names),
        now=now,
        validity=SERVER_VALIDITY,
    )
    return CertAndKey(cert_der, _sec1_der(key))


def load_der_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, TypeError, x509.InvalidVersion) as exc:
        raise PkiError(f"not a DER certificate: {exc}") from None


def load_private_key(der: bytes) -> PrivateKeyTypes:
    """A DER private key: SEC1 EC, PKCS#1 RSA or unencrypted PKCS#8."""
    try:
        return serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"not a usable DER private key: {exc}") from None


def load_issuer_key(der: bytes) -> ec.EllipticCurvePrivateKey:
    """The CA key; KubeEdge parses it with `x509.ParseECPrivateKey`, so it must be EC."""
    key = load_private_key(der)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the CA key must be an EC private key")
    return key


def _same_public_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return bool(cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt))


def _pem_der(what: str, data: bytes) -> bytes:
    try:
        return first_pem_block(data)[1]
    except PemError as exc:
        raise PkiError(f"{what}: {exc}") from None


def load_ca_pem(cert_pem: bytes, key_pem: bytes) -> CertAndKey:
    """The CA from PEM files: the first block of each, the key EC and matching the cert."""
    ca = CertAndKey(_pem_der("CA certificate", cert_pem), _pem_der("CA key", key_pem))
    cert = load_der_certificate(ca.cert_der)
    if not _same_public_key(cert, load_issuer_key(ca.key_der)):
        raise PkiError("the CA key does not belong to the CA certificate")
    return ca


def load_server_pem(cert_pem: bytes, key_pem: bytes) -> CertAndKey:
    """The server certificate and key from PEM files (any key type `ssl` accepts)."""
    pair = CertAndKey(_pem_der("server certificate", cert_pem), _pem_der("server key", key_pem))
    cert = load_der_certificate(pair.cert_der)
    if not _same_public_key(cert, load_private_key(pair.key_der)):
        raise PkiError("the server key does not belong to the server certificate")
    return pair


def check_pair(cert_name: str, key_name: str, *, has_cert: bool, has_key: bool) -> bool:
    """Both-or-neither (KubeEdge exits otherwise); True when both are present."""
    if has_cert != has_key:
        raise PkiError(f"Both of {cert_name} and {key_name} should be specified!")
    return has_cert


def cert_pem(cert_der: bytes) -> bytes:
    return encode_pem("CERTIFICATE", cert_der)


def key_pem(key_der: bytes) -> bytes:
    """PEM for a key; SEC1 EC keys keep their exact DER so the token key is unchanged."""
    key = load_private_key(key_der)
    if isinstance(key, ec.EllipticCurvePrivateKey) and _sec1_der(key) == key_der:
        return encode_pem("EC PRIVATE KEY", key_der)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def is_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Issuer name and signature check against the CA (no chain building: no intermediates)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def server_cert_problem(
    cert_der: bytes,
    ca_der: bytes,
    now: datetime,
    advertise_addresses: Sequence[str],
    dns_names: Sequence[str],
) -> str | None:
    """Why a stored server certificate must be replaced, or None when it still fits."""
    try:
        cert = load_der_certificate(cert_der)
        ca_cert = load_der_certificate(ca_der)
    except PkiError as exc:
        return str(exc)
    if not is_issued_by(cert, ca_cert):
        return "not signed by the current CA"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return "outside its validity period"
    have_ips, have_dns = _cert_sans(cert)
    missing_ips = set(parse_ip_addresses(advertise_addresses)) - have_ips
    missing_dns = {name for name in dns_names if name} - have_dns
    if missing_ips or missing_dns:
        missing = sorted(str(ip) for ip in missing_ips) + sorted(missing_dns)
        return f"missing subject alternative names {', '.join(missing)}"
    return None


def _cert_sans(cert: x509.Certificate) -> tuple[set[IPAddress], set[str]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set(), set()
    ips: set[IPAddress] = set()
    for value in ext.value.get_values_for_type(x509.IPAddress):
        # Networks only appear in name constraints, never in a server's SANs.
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            ips.add(value)
    return ips, set(ext.value.get_values_for_type(x509.DNSName))
