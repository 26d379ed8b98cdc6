from __future__ import annotations

import hashlib
import ssl
import stat
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from cryptography import x509

from trio_cloudhub.config import CloudHub, Config, Modules
from trio_cloudhub.http import certs_store
from trio_cloudhub.http.certs_store import CredentialsError, prepare_credentials
from trio_cloudhub.pki import certs, token

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def make_config(tmp_path: Path, **hub: object) -> Config:
    absent = tmp_path / "etc"
    settings: dict[str, object] = {
        "tls_ca_file": str(absent / "rootCA.crt"),
        "tls_ca_key_file": str(absent / "rootCA.key"),
        "tls_cert_file": str(absent / "server.crt"),
        "tls_private_key_file": str(absent / "server.key"),
        "advertise_address": ("127.0.0.1",),
        **hub,
    }
    return Config(modules=Modules(cloud_hub=CloudHub(**settings)))  # type: ignore[arg-type]


def server_cert(credentials: certs_store.HubCredentials) -> x509.Certificate:
    return x509.load_pem_x509_certificate(credentials.server_cert_pem)


def test_generates_then_reuses_data_dir(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    data = tmp_path / "data"
    first = prepare_credentials(config, data, now=NOW)
    pki = data / "pki"
    assert sorted(p.name for p in pki.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600
    assert (pki / "ca.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    second = prepare_credentials(config, data, now=NOW + timedelta(days=1))
    assert second == first
    assert "ca_key_der" not in repr(first) and "server_key_pem" not in repr(first)


def test_server_cert_regenerated_for_new_address_same_ca(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = prepare_credentials(make_config(tmp_path), data, now=NOW)
    config = make_config(tmp_path, advertise_address=("10.9.8.7",), dns_names=("hub.example",))
    second = prepare_credentials(config, data, now=NOW)
    assert second.ca_der == first.ca_der and second.ca_key_der == first.ca_key_der
    assert second.server_cert_pem != first.server_cert_pem
    sans = server_cert(second).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)] == ["10.9.8.7"]
    assert sans.value.get_values_for_type(x509.DNSName) == ["hub.example"]
    # The regenerated certificate was stored: a third start keeps it.
    assert prepare_credentials(config, data, now=NOW) == second


def test_configured_files_take_precedence(tmp_path: Path) -> None:
    ca = certs.generate_ca(NOW)
    server = certs.generate_server_cert(ca, NOW, ["127.0.0.1"], [])
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "rootCA.crt").write_bytes(certs.cert_pem(ca.cert_der))
    (etc / "rootCA.key").write_bytes(certs.key_pem(ca.key_der))
    (etc / "server.crt").write_bytes(certs.cert_pem(server.cert_der))
    (etc / "server.key").write_bytes(certs.key_pem(server.key_der))
    credentials = prepare_credentials(make_config(tmp_path), tmp_path / "data", now=NOW)
    assert credentials.ca_der == ca.cert_der
    assert credentials.ca_key_der == ca.key_der
    assert credentials.server_cert_pem == certs.cert_pem(server.cert_der)
    assert not (tmp_path / "data" / "pki").exists()


def test_configured_ca_with_generated_server_cert(tmp_path: Path) -> None:
    ca = certs.generate_ca(NOW)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "rootCA.crt").write_bytes(certs.cert_pem(ca.cert_der))
    (etc / "rootCA.key").write_bytes(certs.key_pem(ca.key_der))
    credentials = prepare_credentials(make_config(tmp_path), tmp_path / "data", now=NOW)
    assert credentials.ca_der == ca.cert_der
    server_cert(credentials).verify_directly_issued_by(x509.load_der_x509_certificate(ca.cert_der))
    assert not (tmp_path / "data" / "pki" / "ca.crt").exists()


def test_ca_without_key_is_an_error(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "rootCA.crt").write_bytes(certs.cert_pem(certs.generate_ca(NOW).cert_der))
    with pytest.raises(CredentialsError, match="Both of ca and caKey should be specified!"):
        prepare_credentials(make_config(tmp_path), tmp_path / "data", now=NOW)


def test_corrupt_stored_ca_is_an_error_not_replaced(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare_credentials(make_config(tmp_path), data, now=NOW)
    (data / "pki" / "ca.crt").write_bytes(b"junk")
    with pytest.raises(CredentialsError, match=r"ca\.crt"):
        prepare_credentials(make_config(tmp_path), data, now=NOW)
    assert (data / "pki" / "ca.crt").read_bytes() == b"junk"


def test_ssl_contexts(tmp_path: Path) -> None:
    credentials = prepare_credentials(make_config(tmp_path), tmp_path / "data", now=NOW)
    websocket = credentials.websocket_ssl_context()
    assert websocket.verify_mode == ssl.CERT_REQUIRED
    assert websocket.minimum_version == ssl.TLSVersion.TLSv1_2
    assert websocket.get_ca_certs(binary_form=True) == [credentials.ca_der]
    # Port 10002's context is exercised by real handshakes in tests/http/test_http_server.py.


def test_current_token(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    data = tmp_path / "data"
    with pytest.raises(CredentialsError, match="start the hub once"):
        certs_store.current_token(data, config)
    credentials = prepare_credentials(config, data)
    printed = certs_store.current_token(data, config)
    ca_hash, jwt = token.split_token(printed)
    assert ca_hash == hashlib.sha256(credentials.ca_der).hexdigest()
    claims = token.verify_token(jwt, credentials.ca_key_der, datetime.now(UTC))
    assert claims["exp"] > datetime.now(UTC).timestamp() + 23 * 3600


async def test_token_refresher_persists_and_refreshes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, token_refresh_duration=2)
    credentials = prepare_credentials(config, tmp_path / "data", now=NOW)
    keeper = certs_store.new_token_keeper(credentials, config, NOW)
    token_file = tmp_path / "data" / "pki" / "token"

    def clock() -> datetime:
        return NOW + timedelta(seconds=trio.current_time())

    start = trio.current_time()
    with trio.fail_after(10 * 3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(certs_store.run_token_refresher, keeper, tmp_path / "data", clock=clock)
            )
            first = token_file.read_text().strip()
            assert first == keeper.token
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            await trio.sleep(2 * 3600 + 1)
            second = token_file.read_text().strip()
            assert second == keeper.token != first
            nursery.cancel_scope.cancel()
    assert trio.current_time() - start >= 2 * 3600
    # The refreshed token was made at the refresh time: valid 4 h from then.
    jwt = token.split_token(second)[1]
    later = NOW + timedelta(hours=2, seconds=1)
    assert token.verify_token(jwt, credentials.ca_key_der, later)["exp"] == int(
        (NOW + timedelta(hours=6)).timestamp()
    )


def test_credentials_are_frozen(tmp_path: Path) -> None:
    credentials = prepare_credentials(make_config(tmp_path), tmp_path / "data", now=NOW)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        credentials.ca_der = b""  # type: ignore[misc]
