"""Pure PKI logic: CA and server certificates, join tokens, CSR signing, client checks.

No trio and no I/O here: functions take bytes and the current time (`now`, an aware UTC
datetime) and return bytes or values; `trio_cloudhub.http` does the files and sockets.
"""

from __future__ import annotations

from trio_cloudhub.pki.certs import (
    CertAndKey,
    PkiError,
    check_pair,
    generate_ca,
    generate_server_cert,
    load_ca_pem,
    load_server_pem,
    server_cert_problem,
)
from trio_cloudhub.pki.client_cert import (
    ClientCertError,
    check_node_subject,
    subject_identity,
    verify_rotation_cert,
)
from trio_cloudhub.pki.csr import CsrError, EdgeCsr, parse_csr, parse_ext_key_usages, sign_csr
from trio_cloudhub.pki.token import (
    TokenError,
    TokenKeeper,
    ca_hash,
    make_token,
    split_token,
    verify_token,
)

__all__ = [
    "CertAndKey",
    "ClientCertError",
    "CsrError",
    "EdgeCsr",
    "PkiError",
    "TokenError",
    "TokenKeeper",
    "ca_hash",
    "check_node_subject",
    "check_pair",
    "generate_ca",
    "generate_server_cert",
    "load_ca_pem",
    "load_server_pem",
    "make_token",
    "parse_csr",
    "parse_ext_key_usages",
    "server_cert_problem",
    "sign_csr",
    "split_token",
    "subject_identity",
    "verify_rotation_cert",
    "verify_token",
]
