from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest

from trio_cloudhub.pki import certs, token
from trio_cloudhub.pki.certs import CertAndKey
from trio_cloudhub.pki.token import TokenError, TokenKeeper

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
HS256_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return certs.generate_ca(NOW)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, object], claims: dict[str, object], key: bytes, digest: str) -> str:
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    sig = hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64(sig)


def test_token_format(ca: CertAndKey) -> None:
    tok = token.make_token(ca.cert_der, ca.key_der, NOW, 12)
    parts = tok.split(".")
    assert len(parts) == 4
    assert parts[0] == hashlib.sha256(ca.cert_der).hexdigest()
    assert parts[1] == HS256_HEADER
    exp = int(NOW.timestamp()) + 24 * 3600
    assert base64.urlsafe_b64decode(parts[2] + "==") == f'{{"exp":{exp}}}'.encode()
    expected = hmac.new(ca.key_der, f"{parts[1]}.{parts[2]}".encode(), "sha256").digest()
    assert parts[3] == b64(expected)
    assert "=" not in tok


def test_verify_valid_and_lifetime(ca: CertAndKey) -> None:
    _, jwt = token.split_token(token.make_token(ca.cert_der, ca.key_der, NOW, 12))
    exp = int(NOW.timestamp()) + 24 * 3600
    assert token.verify_token(jwt, ca.key_der, NOW) == {"exp": exp}
    assert token.verify_token(jwt, ca.key_der, NOW + timedelta(hours=24)) == {"exp": exp}
    with pytest.raises(TokenError) as info:
        token.verify_token(jwt, ca.key_der, NOW + timedelta(hours=24, seconds=1))
    assert info.value.reason == TokenError.EXPIRED
    assert str(info.value) == "token is expired"


def test_forged_signature_is_refused(ca: CertAndKey) -> None:
    other = certs.generate_ca(NOW)
    _, jwt = token.split_token(token.make_token(ca.cert_der, other.key_der, NOW, 12))
    with pytest.raises(TokenError) as info:
        token.verify_token(jwt, ca.key_der, NOW)
    assert info.value.reason == TokenError.BAD_SIGNATURE
    # A longer exp with the original signature must not verify either.
    _, jwt = token.split_token(token.make_token(ca.cert_der, ca.key_der, NOW, 12))
    header, _, sig = jwt.split(".")
    longer = b64(b'{"exp":99999999999}')
    tampered = f"{header}.{longer}.{sig}"
    with pytest.raises(TokenError, match="signature"):
        token.verify_token(tampered, ca.key_der, NOW)


@pytest.mark.parametrize("alg,digest", [("HS384", "sha384"), ("HS512", "sha512")])
def test_other_hmac_algorithms_accepted(ca: CertAndKey, alg: str, digest: str) -> None:
    exp = int(NOW.timestamp()) + 60
    jwt = forge({"alg": alg, "typ": "JWT"}, {"exp": exp}, ca.key_der, digest)
    assert token.verify_token(jwt, ca.key_der, NOW) == {"exp": exp}


def test_token_without_exp_is_accepted(ca: CertAndKey) -> None:
    jwt = forge({"alg": "HS256"}, {}, ca.key_der, "sha256")
    assert token.verify_token(jwt, ca.key_der, NOW) == {}


@pytest.mark.parametrize(
    "header",
    [{"alg": "none", "typ": "JWT"}, {"alg": "RS256"}, {"typ": "JWT"}, {"alg": 5}],
)
def test_non_hmac_algorithms_refused(ca: CertAndKey, header: dict[str, object]) -> None:
    jwt = forge(header, {"exp": int(NOW.timestamp()) + 60}, ca.key_der, "sha256")
    with pytest.raises(TokenError) as info:
        token.verify_token(jwt, ca.key_der, NOW)
    assert info.value.reason == TokenError.UNSUPPORTED


def test_not_before_is_enforced(ca: CertAndKey) -> None:
    jwt = forge({"alg": "HS256"}, {"nbf": int(NOW.timestamp()) + 60}, ca.key_der, "sha256")
    with pytest.raises(TokenError) as info:
        token.verify_token(jwt, ca.key_der, NOW)
    assert info.value.reason == TokenError.NOT_YET_VALID


def test_empty_token(ca: CertAndKey) -> None:
    with pytest.raises(TokenError) as info:
        token.verify_token("", ca.key_der, NOW)
    assert info.value.reason == TokenError.MISSING


@pytest.mark.parametrize(
    "jwt",
    [
        "abc",
        "a.b",
        "a.b.c.d",
        f"{HS256_HEADER}.@@@.abc",
        f"{HS256_HEADER}.{b64(b'[1]')}.abc",
        f"{HS256_HEADER}.{b64(b'not json')}.abc",
        f"{b64(b'[')}.{b64(b'{}')}.abc",
        f"{HS256_HEADER}.{b64(b'{}')}=.abc",
        f"{HS256_HEADER}.{b64(b'{}')}.é",
        "x" * 5000,
        "." * 2,
    ],
)
def test_malformed_tokens(ca: CertAndKey, jwt: str) -> None:
    with pytest.raises(TokenError) as info:
        token.verify_token(jwt, ca.key_der, NOW)
    assert info.value.reason == TokenError.MALFORMED


@pytest.mark.parametrize("exp", ['"soon"', "true", "NaN", "Infinity", "[1]"])
def test_malformed_exp(ca: CertAndKey, exp: str) -> None:
    payload = b64(f'{{"exp":{exp}}}'.encode())
    signing_input = f"{HS256_HEADER}.{payload}"
    sig = b64(hmac.new(ca.key_der, signing_input.encode(), "sha256").digest())
    with pytest.raises(TokenError) as info:
        token.verify_token(f"{signing_input}.{sig}", ca.key_der, NOW)
    assert info.value.reason == TokenError.MALFORMED


def test_split_token() -> None:
    with pytest.raises(TokenError):
        token.split_token("abc.def")
    with pytest.raises(TokenError):
        token.split_token("a" * 64 + ".x.y")


def test_token_keeper_refresh_keeps_old_tokens_valid(ca: CertAndKey) -> None:
    keeper = TokenKeeper(ca.cert_der, ca.key_der, 12, NOW)
    first = keeper.token
    assert keeper.refresh_interval == timedelta(hours=12)
    later = NOW + timedelta(hours=12)
    second = keeper.refresh(later)
    assert second == keeper.token != first
    for tok in (first, second):
        assert keeper.verify(token.split_token(tok)[1], later)
    with pytest.raises(TokenError):
        keeper.verify(token.split_token(first)[1], NOW + timedelta(hours=25))
    keeper.verify(token.split_token(second)[1], NOW + timedelta(hours=25))


def test_token_keeper_rejects_bad_interval(ca: CertAndKey) -> None:
    with pytest.raises(ValueError):
        TokenKeeper(ca.cert_der, ca.key_der, 0, NOW)
