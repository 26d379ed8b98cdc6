"""Connection identity for KubeEdge authorization (spec 9.1, "connection authentication").

With `modules.cloudHub.authorization.enable`, CloudCore lets an edge in only when the client
certificate's subject CN is `system:node:<node_id header>`: the certificate then proves which
node speaks, not just that it belongs to the fleet. The TLS layer has already verified the chain
against our CA; this module only compares the name. Pure: no I/O, no trio.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

NODE_USER_PREFIX = "system:node:"
# Far above any real client certificate (CloudHub issues about 400 bytes); refuse to parse more.
MAX_CERT_DER = 64 * 1024
# What cryptography raises on malformed DER (found by mutating certificates).
_UNDECODABLE = (ValueError, TypeError, x509.InvalidVersion)


def connection_identity_problem(node_id: str, peer_cert_der: bytes | None) -> str | None:
    """None when the certificate's subject CN is `system:node:<node_id>`, else why not.

    `peer_cert_der` is the leaf certificate the peer presented (e.g.
    `SSLStream.getpeercert(binary_form=True)`), None when it presented none. Never raises.
    """
    if not node_id:
        return "empty node_id"
    if peer_cert_der is None:
        return "no client certificate"
    if len(peer_cert_der) > MAX_CERT_DER:
        return f"client certificate of {len(peer_cert_der)} bytes exceeds {MAX_CERT_DER}"
    names = _common_names(peer_cert_der)
    if names is None:
        return "client certificate cannot be decoded"
    # Go keeps the last of several CNs; an ambiguous subject is refused instead.
    if len(names) != 1:
        return f"client certificate has {len(names)} subject CNs, not one"
    expected = NODE_USER_PREFIX + node_id
    if names[0] != expected:
        return f"certificate CN {names[0]!r} is not {expected!r}"
    return None


def _common_names(der: bytes) -> list[str] | None:
    """The subject's CN values, or None when the certificate cannot be decoded."""
    try:
        cert = x509.load_der_x509_certificate(der)
        # The subject is decoded lazily, so junk in it raises only here.
        attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except _UNDECODABLE:
        return None
    return [str(attribute.value) for attribute in attributes]


def certificate_node(peer_cert_der: bytes | None) -> str | None:
    """X of a certificate whose only subject CN is `system:node:X`; None for any other
    (legacy shared `kubeedge.io`, none, undecodable). Never raises."""
    if peer_cert_der is None or len(peer_cert_der) > MAX_CERT_DER:
        return None
    names = _common_names(peer_cert_der)
    if not names or len(names) != 1 or not names[0].startswith(NODE_USER_PREFIX):
        return None
    return names[0][len(NODE_USER_PREFIX) :] or None
