"""Signing an edge's certificate request (spec 7.5 step 3).

Only CN and O of the request's subject are kept (KubeEdge NEW), SANs are copied (DNS and
IP only), and the key usages come from the `ExtKeyUsages` header as Go `x509.ExtKeyUsage`
integers. Unlike KubeEdge we also check the request's own signature (proof that the edge
holds the key); real edges always sign their requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_cloudhub.pki.certs import CertAndKey, issue_certificate

# Real requests are about 300 bytes; this bound is for hostile ones.
MAX_CSR_BYTES = 64 * 1024
MAX_USAGES_HEADER = 1024
GO_SERVER_AUTH = 1
GO_CLIENT_AUTH = 2
# Go's x509.ExtKeyUsage numbering, restricted to the usages an edge certificate may carry.
GO_EXT_KEY_USAGES: dict[int, x509.ObjectIdentifier] = {
    GO_SERVER_AUTH: ExtendedKeyUsageOID.SERVER_AUTH,
    GO_CLIENT_AUTH: ExtendedKeyUsageOID.CLIENT_AUTH,
}
DEFAULT_USAGES = (GO_CLIENT_AUTH,)


class CsrError(ValueError):
    """A request we cannot sign; the message is safe to send back to the edge."""


@attrs.frozen
class EdgeCsr:
    """The parts of a certificate request that end up in the issued certificate."""

    common_name: str
    organizations: tuple[str, ...]
    public_key: CertificatePublicKeyTypes = attrs.field(eq=False, repr=False)
    sans: tuple[x509.GeneralName, ...]


def parse_ext_key_usages(header: str | None) -> tuple[int, ...]:
    """The `ExtKeyUsages` header (a JSON array of Go ints); absent or empty means clientAuth.

    An empty array would give a certificate with no EKU at all (valid for anything), so it
    falls back to the default too.
    """
    if header is None or not header.strip():
        return DEFAULT_USAGES
    if len(header) > MAX_USAGES_HEADER:
        raise CsrError("ExtKeyUsages header is too long")
    try:
        value = json.loads(header)
    except (ValueError, RecursionError):
        raise CsrError("ExtKeyUsages header is not a JSON array") from None
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise CsrError("ExtKeyUsages header is not a JSON array of integers")
    unknown = [item for item in value if item not in GO_EXT_KEY_USAGES]
    if unknown:
        raise CsrError(f"ExtKeyUsages {unknown} not supported (1=serverAuth, 2=clientAuth)")
    return tuple(dict.fromkeys(value)) or DEFAULT_USAGES


def _subject(csr: x509.CertificateSigningRequest) -> tuple[str, tuple[str, ...]]:
    common = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return (
        str(common[0].value) if common else "",
        tuple(str(attr.value) for attr in orgs),
    )


def _sans(csr: x509.CertificateSigningRequest) -> tuple[x509.GeneralName, ...]:
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(name for name in ext.value if isinstance(name, x509.DNSName | x509.IPAddress))


def parse_csr(der: bytes) -> EdgeCsr:
    """A DER PKCS#10 request, checked for size, structure and its own signature."""
    if not der:
        raise CsrError("certificate request is empty")
    if len(der) > MAX_CSR_BYTES:
        raise CsrError(f"certificate request larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(der)
        # Subject, extensions and key are decoded lazily; force them here.
        common_name, organizations = _subject(csr)
        sans = _sans(csr)
        public_key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CsrError(f"invalid certificate request: {exc}") from None
    if not signed:
        raise CsrError("invalid certificate request: signature does not verify")
    return EdgeCsr(common_name, organizations, public_key, sans)


def _edge_subject(csr: EdgeCsr) -> x509.Name:
    # Go's pkix.Name marshals O before CN; an empty CN is left out, as Go does.
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in csr.organizations]
    if csr.common_name:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, csr.common_name))
    return x509.Name(attributes)


def sign_csr(
    csr: EdgeCsr,
    ca: CertAndKey,
    now: datetime,
    signing_days: int,
    usages: Sequence[int] = DEFAULT_USAGES,
) -> bytes:
    """The edge certificate (DER) for `csr`, valid `signing_days` days from `now`."""
    unknown = [usage for usage in usages if usage not in GO_EXT_KEY_USAGES]
    if unknown:
        raise CsrError(f"ExtKeyUsages {unknown} not supported")
    try:
        return issue_certificate(
            ca,
            subject=_edge_subject(csr),
            public_key=csr.public_key,
            usages=[GO_EXT_KEY_USAGES[usage] for usage in usages],
            sans=csr.sans,
            now=now,
            validity=timedelta(days=signing_days),
        )
    except (ValueError, TypeError) as exc:
        # e.g. an empty subject attribute or a key type cryptography cannot embed.
        raise CsrError(f"cannot sign certificate request: {exc}") from None
