"""The join token (spec 7.3): `<sha256 hex of CA DER>.<HS256 JWT {"exp": ...}>`.

The JWT is keyed with the CA private key's DER bytes, so any hub holding the same CA
(including a real CloudCore) accepts our tokens and we accept theirs. Tokens are stateless:
refreshing makes a new one and old ones stay valid until their own `exp`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

# Real tokens are ~170 characters; the bound only stops a hostile header from costing work.
MAX_TOKEN_CHARS = 4096
_HEADER = {"alg": "HS256", "typ": "JWT"}
_ALGORITHMS: dict[str, Callable[[], Any]] = {
    "HS256": hashlib.sha256,
    "HS384": hashlib.sha384,
    "HS512": hashlib.sha512,
}
_BAD_SEGMENT = "token is malformed: bad base64url segment"
_B64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class TokenError(ValueError):
    """A token that must be refused; `reason` is one of the class constants."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNSUPPORTED = "unsupported-algorithm"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def ca_hash(ca_der: bytes) -> str:
    """The token's first part: lowercase hex SHA-256 of the CA certificate DER."""
    return hashlib.sha256(ca_der).hexdigest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(part: str) -> bytes:
    """Unpadded base64url (RFC 7515), strictly: padding or other characters are malformed."""
    raw = part.encode("ascii", "replace")
    if not raw or not set(raw) <= _B64URL or len(raw) % 4 == 1:
        raise TokenError(TokenError.MALFORMED, _BAD_SEGMENT)
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(TokenError.MALFORMED, _BAD_SEGMENT) from None


def _compact_json(value: dict[str, Any]) -> bytes:
    # Go's encoding/json: sorted map keys, no spaces.
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def make_jwt(ca_key_der: bytes, exp: int) -> str:
    """An HS256 JWT whose only claim is `exp`."""
    header = _b64encode(_compact_json(_HEADER))
    signing_input = header + "." + _b64encode(_compact_json({"exp": exp}))
    digest = hmac.new(ca_key_der, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64encode(digest)


def make_token(ca_der: bytes, ca_key_der: bytes, now: datetime, refresh_hours: int) -> str:
    """A join token valid for twice the refresh period (KubeEdge's rule)."""
    exp = int(now.timestamp()) + 2 * refresh_hours * 3600
    return ca_hash(ca_der) + "." + make_jwt(ca_key_der, exp)


def split_token(token: str) -> tuple[str, str]:
    """(CA hash, JWT) of a join token; what an edge does before bootstrapping."""
    hash_part, dot, jwt_part = token.strip().partition(".")
    if not dot or len(hash_part) != 64 or jwt_part.count(".") != 2:
        raise TokenError(TokenError.MALFORMED, "join token must be <ca hash>.<jwt>")
    return hash_part, jwt_part


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON for a token")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise TokenError(TokenError.MALFORMED, f"token is malformed: {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenError(TokenError.MALFORMED, f"token is malformed: {what} is not an object")
    return value


def _numeric_date(claims: dict[str, Any], name: str) -> int | float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(TokenError.MALFORMED, f"token is malformed: {name} is not a number")
    # An int is compared as it is: float() of a 400-digit exp raises OverflowError.
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenError(TokenError.MALFORMED, f"token is malformed: {name} is not a number")
    return value


def _check_signature(header: dict[str, Any], signing_input: str, sig: bytes, key: bytes) -> None:
    alg = header.get("alg")
    digest = _ALGORITHMS.get(alg) if isinstance(alg, str) else None
    if digest is None:
        raise TokenError(TokenError.UNSUPPORTED, f"token signing method {alg!r} is not allowed")
    expected = hmac.new(key, signing_input.encode("ascii"), digest).digest()
    if not hmac.compare_digest(expected, sig):
        raise TokenError(TokenError.BAD_SIGNATURE, "token signature is invalid")


def _check_times(claims: dict[str, Any], now: datetime) -> None:
    current = now.timestamp()
    exp = _numeric_date(claims, "exp")
    if exp is not None and current > exp:
        raise TokenError(TokenError.EXPIRED, "token is expired")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and current < nbf:
        raise TokenError(TokenError.NOT_YET_VALID, "token is not valid yet")


def verify_token(jwt_part: str, ca_key_der: bytes, now: datetime) -> dict[str, Any]:
    """The claims of a valid JWT (HS256/384/512 keyed with the CA key); else TokenError.

    `exp` (and `nbf`) are enforced when present; a token without `exp` is accepted, as
    golang-jwt does.
    """
    if not jwt_part:
        raise TokenError(TokenError.MISSING, "token is empty")
    if len(jwt_part) > MAX_TOKEN_CHARS:
        raise TokenError(TokenError.MALFORMED, "token is malformed: too long")
    parts = jwt_part.split(".")
    if len(parts) != 3:
        raise TokenError(TokenError.MALFORMED, "token is malformed: expected 3 segments")
    header = _json_object(_b64decode(parts[0]), "header")
    claims = _json_object(_b64decode(parts[1]), "claims")
    signature = _b64decode(parts[2])
    _check_signature(header, parts[0] + "." + parts[1], signature, ca_key_der)
    _check_times(claims, now)
    return claims


class TokenKeeper:
    """The current join token; `refresh` replaces it, verification needs only the CA key."""

    def __init__(self, ca_der: bytes, ca_key_der: bytes, refresh_hours: int, now: datetime) -> None:
        if refresh_hours <= 0:
            raise ValueError("refresh_hours must be > 0")
        self._ca_der = ca_der
        self._ca_key_der = ca_key_der
        self._refresh_hours = refresh_hours
        self._token = make_token(ca_der, ca_key_der, now, refresh_hours)

    @property
    def token(self) -> str:
        return self._token

    @property
    def refresh_interval(self) -> timedelta:
        return timedelta(hours=self._refresh_hours)

    def refresh(self, now: datetime) -> str:
        self._token = make_token(self._ca_der, self._ca_key_der, now, self._refresh_hours)
        return self._token

    def verify(self, jwt_part: str, now: datetime) -> dict[str, Any]:
        return verify_token(jwt_part, self._ca_key_der, now)
