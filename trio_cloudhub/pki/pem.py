"""PEM framing: KubeEdge keeps only the first block of each file, as DER (spec 2, 7)."""

from __future__ import annotations

import base64
import binascii
import re

MAX_PEM_BYTES = 1024 * 1024

_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----",
    re.DOTALL,
)


class PemError(ValueError):
    """The bytes hold no usable PEM block."""


def first_pem_block(data: bytes) -> tuple[str, bytes]:
    """The label and DER bytes of the first PEM block, like Go's `pem.Decode`."""
    if len(data) > MAX_PEM_BYTES:
        raise PemError(f"PEM data larger than {MAX_PEM_BYTES} bytes")
    match = _BLOCK.search(data)
    if match is None:
        raise PemError("no PEM block found")
    label = match.group(1).decode("ascii")
    body = match.group(2)
    # Encrypted legacy keys carry `Proc-Type:` headers; we have no passphrase to offer.
    if b":" in body:
        raise PemError(f"PEM block {label!r} has headers (encrypted keys are not supported)")
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PemError(f"PEM block {label!r} is not valid base64") from None
    if not der:
        raise PemError(f"PEM block {label!r} is empty")
    return label, der


def encode_pem(label: str, der: bytes) -> bytes:
    """One PEM block with 64-character lines."""
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    head = f"-----BEGIN {label}-----\n".encode("ascii")
    tail = f"-----END {label}-----\n".encode("ascii")
    return head + b"\n".join(lines) + b"\n" + tail
