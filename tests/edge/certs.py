"""Throwaway certificates for transport tests, made with `cryptography` (not trio_cloudhub.pki).

A CA like KubeEdge's (ECDSA P-256, CN=KubeEdge), a server certificate with IP SAN 127.0.0.1 and
client certificates like the ones CloudHub issues to edges; plus ready-made ssl contexts.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@attrs.frozen
class KeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )


def _name(common_name: str, organization: str = "") -> x509.Name:
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(common_name: str = "KubeEdge") -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                key_cert_sign=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def _issue(
    ca: KeyPair, subject: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(subject, ca.cert.subject, key).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return KeyPair(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server_cert(ca: KeyPair, ip: str = "127.0.0.1") -> KeyPair:
    san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip))]
    return _issue(ca, _name("KubeEdge", "KubeEdge"), ExtendedKeyUsageOID.SERVER_AUTH, san)


def issue_client_cert(ca: KeyPair, node: str) -> KeyPair:
    subject = _name(f"system:node:{node}", "system:nodes")
    return _issue(ca, subject, ExtendedKeyUsageOID.CLIENT_AUTH, [])


def _load_chain(context: ssl.SSLContext, pair: KeyPair) -> None:
    # ssl only loads a certificate chain from files.
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(pair.cert_pem)
        key.write_bytes(pair.key_pem)
        context.load_cert_chain(cert, key)


def server_context(ca: KeyPair, server: KeyPair) -> ssl.SSLContext:
    """Port 10000's context: our server cert, client certificates required and verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.cert_pem.decode())
    _load_chain(context, server)
    return context


def client_context(ca: KeyPair, client: KeyPair | None) -> ssl.SSLContext:
    """An edge's context: verifies the hub against `ca` (IP SAN included), presents `client`."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.cert_pem.decode())
    if client is not None:
        _load_chain(context, client)
    return context


@attrs.frozen
class Pki:
    ca: KeyPair
    server: KeyPair
    client: KeyPair

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.ca, self.server)

    def client_context(self, client: KeyPair | None = None) -> ssl.SSLContext:
        return client_context(self.ca, client or self.client)


def make_pki(node: str = "edge-1") -> Pki:
    ca = make_ca()
    return Pki(ca=ca, server=issue_server_cert(ca), client=issue_client_cert(ca, node))
