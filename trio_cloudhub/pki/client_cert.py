"""Checking the certificate an edge presents when it rotates its own (spec 7.5 step 1, NEW).

TLS on port 10002 only asks for a client certificate, so the checks Go's `Verify` does plus
NEW's subject rule are done here: issued by our CA, inside its validity, usable for client
authentication, and naming the node that asks (or the legacy shared identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_cloudhub.pki.certs import PkiError, is_issued_by, load_der_certificate

LEGACY_ORGANIZATIONS = frozenset({"KubeEdge", "kubeEdge"})
LEGACY_COMMON_NAME = "kubeedge.io"
NODES_ORGANIZATION = "system:nodes"
NODE_PREFIX = "system:node:"


class ClientCertError(ValueError):
    """A presented client certificate that does not authorise signing; message is for the edge."""


def _names(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(attr.value) for attr in cert.subject.get_attributes_for_oid(oid)]


def _check_usage(cert: x509.Certificate) -> None:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise ClientCertError("client certificate has no extended key usage") from None
    allowed = {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if not allowed & set(usages):
        raise ClientCertError("client certificate is not valid for client authentication")


def check_node_subject(common_name: str, organizations: Sequence[str], node_name: str) -> None:
    """NEW's `verifyCertSubject`: legacy shared identity or `system:node:<NodeName>`.

    Both spellings of the legacy organization are accepted: REF-era edges asked for
    `kubeEdge`, NEW's check expects `KubeEdge`. A subject with no O is refused, not a crash.
    """
    if not organizations:
        raise ClientCertError("subject has no organization")
    org = organizations[0]
    if org in LEGACY_ORGANIZATIONS and common_name == LEGACY_COMMON_NAME:
        return
    if org == NODES_ORGANIZATION and node_name and common_name == NODE_PREFIX + node_name:
        return
    raise ClientCertError(
        f"subject CN={common_name!r}, O={org!r} does not match node {node_name!r}"
    )


def _check_cert_subject(cert: x509.Certificate, node_name: str) -> None:
    try:
        check_node_subject(*subject_identity(cert), node_name)
    except ClientCertError as exc:
        raise ClientCertError(f"client certificate {exc}") from None


def verify_client_cert(cert_der: bytes, ca_der: bytes, now: datetime) -> x509.Certificate:
    """What Go's `Verify` checks of a client certificate (for transports whose TLS stack does
    not, e.g. aioquic's server): issued by our CA, inside its validity, for client auth."""
    try:
        cert = load_der_certificate(cert_der)
        ca_cert = load_der_certificate(ca_der)
        if not is_issued_by(cert, ca_cert):
            raise ClientCertError("client certificate is not signed by the hub CA")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ClientCertError("client certificate is expired or not yet valid")
        _check_usage(cert)
    except ClientCertError:
        raise
    except (PkiError, ValueError) as exc:
        # cryptography decodes extensions and names lazily and raises ValueError on junk.
        raise ClientCertError(f"client certificate cannot be used: {exc}") from None
    return cert


def verify_rotation_cert(
    cert_der: bytes, ca_der: bytes, node_name: str, now: datetime
) -> x509.Certificate:
    """The parsed certificate when it may ask for a new one; else ClientCertError."""
    cert = verify_client_cert(cert_der, ca_der, now)
    try:
        _check_cert_subject(cert, node_name)
    except ClientCertError:
        raise
    except ValueError as exc:
        raise ClientCertError(f"client certificate cannot be used: {exc}") from None
    return cert


def subject_identity(cert: x509.Certificate) -> tuple[str, tuple[str, ...]]:
    """(CN, O values) of a certificate, to compare with a rotation request's subject."""
    common = _names(cert, NameOID.COMMON_NAME)
    return (common[0] if common else "", tuple(_names(cert, NameOID.ORGANIZATION_NAME)))
