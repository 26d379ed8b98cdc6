"""Preparing the hub's certificates and join token on disk (spec 7.1-7.3).

Order, as KubeEdge's `PrepareAllCerts` with the Kubernetes secrets replaced by a data
directory: the configured files (`tlsCAFile`, ...) when present, else `<data_dir>/pki/`,
else generate and write there. A stored server certificate that no longer fits (other CA,
expired, an advertise address or DNS name missing) is regenerated. The CA is never
replaced once stored: that would invalidate every edge certificate and token.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import attrs
import trio
from OpenSSL import SSL

from trio_cloudhub.config import CloudHub, Config
from trio_cloudhub.http.tls import request_client_cert_context
from trio_cloudhub.pki import certs
from trio_cloudhub.pki.certs import CertAndKey, PkiError
from trio_cloudhub.pki.token import TokenKeeper, make_token

logger = logging.getLogger("trio_cloudhub.http")

__all__ = [
    "CredentialsError",
    "HubCredentials",
    "TokenKeeper",
    "current_token",
    "new_token_keeper",
    "prepare_credentials",
    "resolve_advertise_addresses",
    "run_token_refresher",
    "write_token",
]

PKI_DIR = "pki"
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
TOKEN_FILE = "token"
MAX_FILE_BYTES = 1024 * 1024
# An address outside any real network: connecting a UDP socket to it sends nothing but
# makes the kernel pick the outbound interface, i.e. "this host's address".
_ROUTE_PROBE = ("192.0.2.1", 9)


class CredentialsError(PkiError):
    """Certificates that cannot be loaded or written; the message names the file."""


def utc_now() -> datetime:
    return datetime.now(UTC)


@attrs.frozen
class HubCredentials:
    """The CA (DER) and the server certificate/key (PEM) every listener serves."""

    ca_der: bytes
    ca_key_der: bytes = attrs.field(repr=False)
    server_cert_pem: bytes
    server_key_pem: bytes = attrs.field(repr=False)

    @property
    def ca(self) -> CertAndKey:
        return CertAndKey(self.ca_der, self.ca_key_der)

    def websocket_ssl_context(self) -> ssl.SSLContext:
        """Port 10000: a client certificate signed by the CA is required."""
        return self._server_context(ssl.CERT_REQUIRED)

    def https_tls_context(self) -> SSL.Context:
        """Port 10002: a client certificate is requested, never verified by TLS (bootstrap
        has none; a foreign one gets HTTP 401 from the handler, as Go's RequestClientCert)."""
        return request_client_cert_context(self.server_cert_pem, self.server_key_pem)

    def _server_context(self, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = verify_mode
        context.load_verify_locations(cadata=self.ca_der)
        _load_cert_chain(context, self.server_cert_pem, self.server_key_pem)
        return context


def _load_cert_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`ssl` only loads a certificate chain from files: use a private temporary one."""
    with tempfile.TemporaryDirectory(prefix="trio-cloudhub-") as folder:
        path = Path(folder) / "server.pem"
        _write_private(path, cert_pem + key_pem)
        context.load_cert_chain(path)


def _write_private(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Write atomically (temp file + rename) with `mode`, whatever the umask."""
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
            file.flush()
            if durable:
                os.fsync(file.fileno())
    finally:
        os.close(fd)
    os.replace(temp, path)


def _read_optional(path_text: str | Path) -> bytes | None:
    """A file's bytes, or None when it does not exist (KubeEdge treats that as absent)."""
    if not str(path_text):
        return None
    path = Path(path_text)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return data


def _load_pair(
    cert_path: str | Path,
    key_path: str | Path,
    loader: Callable[[bytes, bytes], CertAndKey],
    names: tuple[str, str],
) -> CertAndKey | None:
    cert_pem, key_pem = _read_optional(cert_path), _read_optional(key_path)
    try:
        if not certs.check_pair(*names, has_cert=cert_pem is not None, has_key=key_pem is not None):
            return None
        assert cert_pem is not None and key_pem is not None
        return loader(cert_pem, key_pem)
    except CredentialsError:
        raise
    except PkiError as exc:
        raise CredentialsError(f"{cert_path} / {key_path}: {exc}") from None


def pki_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / PKI_DIR


def _load_ca(hub: CloudHub, folder: Path) -> tuple[CertAndKey | None, str]:
    configured = _load_pair(
        hub.tls_ca_file, hub.tls_ca_key_file, certs.load_ca_pem, ("ca", "caKey")
    )
    if configured is not None:
        return configured, hub.tls_ca_file
    stored = _load_pair(
        folder / CA_CERT_FILE, folder / CA_KEY_FILE, certs.load_ca_pem, ("ca", "caKey")
    )
    return stored, str(folder / CA_CERT_FILE)


def _store_pair(folder: Path, names: tuple[str, str], pair: CertAndKey) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Key first: a crash in between leaves a key without a cert, which is reported.
        _write_private(folder / names[1], certs.key_pem(pair.key_der))
        _write_private(folder / names[0], certs.cert_pem(pair.cert_der), 0o644)
    except OSError as exc:
        raise CredentialsError(f"{folder}: cannot write {names[0]}: {exc}") from None


def _prepare_ca(hub: CloudHub, folder: Path, now: datetime) -> CertAndKey:
    ca, source = _load_ca(hub, folder)
    if ca is not None:
        logger.info("using CA from %s", source)
        return ca
    ca = certs.generate_ca(now)
    _store_pair(folder, (CA_CERT_FILE, CA_KEY_FILE), ca)
    logger.info("generated a new CA in %s", folder)
    return ca


def _prepare_server(
    hub: CloudHub, folder: Path, ca: CertAndKey, now: datetime, addresses: tuple[str, ...]
) -> CertAndKey:
    names = ("cert", "key")
    configured = _load_pair(
        hub.tls_cert_file, hub.tls_private_key_file, certs.load_server_pem, names
    )
    if configured is not None:
        logger.info("using server certificate from %s", hub.tls_cert_file)
        return configured
    stored = _load_pair(
        folder / SERVER_CERT_FILE, folder / SERVER_KEY_FILE, certs.load_server_pem, names
    )
    if stored is not None:
        problem = certs.server_cert_problem(
            stored.cert_der, ca.cert_der, now, addresses, hub.dns_names
        )
        if problem is None:
            return stored
        logger.info("regenerating the stored server certificate: %s", problem)
    try:
        server = certs.generate_server_cert(ca, now, addresses, hub.dns_names)
    except PkiError as exc:
        raise CredentialsError(str(exc)) from None
    _store_pair(folder, (SERVER_CERT_FILE, SERVER_KEY_FILE), server)
    return server


def resolve_advertise_addresses(config: Config) -> tuple[str, ...]:
    """`advertiseAddress`, or this host's first non-loopback address when it is empty."""
    if config.cloud_hub.advertise_address:
        return config.cloud_hub.advertise_address
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(_ROUTE_PROBE)
        address = str(probe.getsockname()[0])
    except OSError:
        address = "127.0.0.1"
    finally:
        probe.close()
    return (address,)


def prepare_credentials(
    config: Config,
    data_dir: str | os.PathLike[str],
    *,
    now: datetime | None = None,
    advertise_addresses: tuple[str, ...] | None = None,
) -> HubCredentials:
    """Load or create the CA and server certificate; blocking file I/O (use a thread)."""
    hub = config.cloud_hub
    now = now or utc_now()
    addresses = advertise_addresses or resolve_advertise_addresses(config)
    folder = pki_dir(data_dir)
    ca = _prepare_ca(hub, folder, now)
    server = _prepare_server(hub, folder, ca, now, addresses)
    return credentials_from(ca, server)


def credentials_from(ca: CertAndKey, server: CertAndKey) -> HubCredentials:
    """What the listeners need from a CA and a server certificate, however they were found."""
    try:
        server_key_pem = certs.key_pem(server.key_der)
    except PkiError as exc:
        raise CredentialsError(f"server key: {exc}") from None
    return HubCredentials(
        ca_der=ca.cert_der,
        ca_key_der=ca.key_der,
        server_cert_pem=certs.cert_pem(server.cert_der),
        server_key_pem=server_key_pem,
    )


def new_token_keeper(
    credentials: HubCredentials, config: Config, now: datetime | None = None
) -> TokenKeeper:
    """The token keeper for these credentials, refreshed every `tokenRefreshDuration` hours."""
    return TokenKeeper(
        credentials.ca_der,
        credentials.ca_key_der,
        config.cloud_hub.token_refresh_duration,
        now or utc_now(),
    )


def write_token(data_dir: str | os.PathLike[str], token: str) -> None:
    folder = pki_dir(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(folder / TOKEN_FILE, token.encode("ascii") + b"\n", durable=False)


def current_token(
    data_dir: str | os.PathLike[str], config: Config, *, now: datetime | None = None
) -> str:
    """A fresh valid join token from the stored or configured CA (`trio-cloudhub token`).

    Raises CredentialsError when there is no CA yet: it is created by the hub's first start.
    """
    folder = pki_dir(data_dir)
    ca, _ = _load_ca(config.cloud_hub, folder)
    if ca is None:
        raise CredentialsError(
            f"no CA in {config.cloud_hub.tls_ca_file} or {folder}: start the hub once first"
        )
    return make_token(
        ca.cert_der, ca.key_der, now or utc_now(), config.cloud_hub.token_refresh_duration
    )


def _save_token(data_dir: str | os.PathLike[str] | None, token: str) -> None:
    """Write the token file in place: ~200 bytes, no fsync, so blocking is negligible.

    (Not in a worker thread: that would also hide the wait from trio's mock clock in tests.)
    """
    if data_dir is None:
        return
    try:
        write_token(data_dir, token)
    except OSError as exc:
        # Stale file only; the hub keeps serving with the in-memory token (KubeEdge NEW: warn).
        logger.warning("cannot write the join token to %s: %s", pki_dir(data_dir), exc)


async def run_token_refresher(
    keeper: TokenKeeper,
    data_dir: str | os.PathLike[str] | None,
    *,
    clock: Callable[[], datetime] = utc_now,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Persist the current token, then refresh and persist it every refresh interval.

    Old tokens stay valid until their own expiry (they are stateless), so a refresh never
    breaks an edge that is bootstrapping with the previous one.
    """
    _save_token(data_dir, keeper.token)
    task_status.started()
    while True:
        await trio.sleep(keeper.refresh_interval.total_seconds())
        _save_token(data_dir, keeper.refresh(clock()))
        logger.info("join token refreshed")
