"""Credentials in Kubernetes secrets: decisions and retries over an injected SecretOps.

The `kubernetes` client calls behind `kube_secret_ops` are covered with the fake API
server; here a small in-memory cluster stands behind the same five blocking functions.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cryptography import x509
from trio.testing import MockClock

from tests.pki.test_kube_secrets import (
    CLOUDCORE_CA,
    CLOUDCORE_CA_KEY,
    CLOUDCORE_SERVER,
    CLOUDCORE_SERVER_KEY,
    CLOUDCORE_TOKEN,
    cloudcore_secret,
)
from trio_cloudhub.config import CloudHub, Config, Modules
from trio_cloudhub.http.certs_store import CredentialsError, HubCredentials, new_token_keeper
from trio_cloudhub.http.kube_credentials import (
    KubeCallError,
    RetryPolicy,
    SecretOps,
    prepare_kube_credentials_with,
    run_kube_token_refresher,
    write_token_secret,
)
from trio_cloudhub.pki import certs, kube_secrets, token
from trio_cloudhub.pki.certs import CertAndKey

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ADDRESSES = ("127.0.0.1",)
FAST = RetryPolicy(base=0.5, cap=4.0)


def status_body(code: int, reason: str, name: str = "", kind: str = "secrets") -> bytes:
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason}
    return json.dumps({**status, "code": code, "details": {"name": name, "kind": kind}}).encode()


def api_error(code: int, reason: str = "InternalError") -> KubeCallError:
    return KubeCallError(code, status_body(code, reason))


@attrs.define
class FakeCluster:
    """Secrets and namespaces of namespace kubeedge; `fail[op]` raises queued errors first."""

    secrets: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    namespaces: set[str] = attrs.field(factory=set)
    fail: dict[str, list[KubeCallError]] = attrs.field(factory=dict)
    calls: list[tuple[str, str]] = attrs.field(factory=list)
    before: dict[str, Callable[[], Awaitable[None]]] = attrs.field(factory=dict)

    async def _enter(self, op: str, name: str) -> None:
        await trio.lowlevel.checkpoint()
        if op in self.before:
            await self.before[op]()
        self.calls.append((op, name))
        queued = self.fail.get(op)
        if queued:
            raise queued.pop(0)

    async def read_secret(self, name: str) -> bytes:
        await self._enter("read_secret", name)
        if name not in self.secrets:
            raise KubeCallError(404, status_body(404, "NotFound", name))
        return json.dumps(self.secrets[name]).encode()

    async def create_secret(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        await self._enter("create_secret", name)
        if "kubeedge" not in self.namespaces:
            raise KubeCallError(404, status_body(404, "NotFound", "kubeedge", "namespaces"))
        if name in self.secrets:
            raise KubeCallError(409, status_body(409, "AlreadyExists", name))
        self.secrets[name] = json.loads(json.dumps(body))

    async def replace_secret(self, name: str, body: dict[str, Any]) -> None:
        await self._enter("replace_secret", name)
        if name not in self.secrets:
            raise KubeCallError(404, status_body(404, "NotFound", name))
        self.secrets[name] = json.loads(json.dumps(body))

    async def read_namespace(self) -> None:
        await self._enter("read_namespace", "kubeedge")
        if "kubeedge" not in self.namespaces:
            raise KubeCallError(404, status_body(404, "NotFound", "kubeedge", "namespaces"))

    async def create_namespace(self) -> None:
        await self._enter("create_namespace", "kubeedge")
        if "kubeedge" in self.namespaces:
            raise KubeCallError(409, status_body(409, "AlreadyExists", "kubeedge"))
        self.namespaces.add("kubeedge")

    def ops(self) -> SecretOps:
        return SecretOps(
            read_secret=self.read_secret,
            create_secret=self.create_secret,
            replace_secret=self.replace_secret,
            read_namespace=self.read_namespace,
            create_namespace=self.create_namespace,
        )

    def writes(self) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0] in ("create_secret", "replace_secret")]

    def ca(self) -> CertAndKey:
        return kube_secrets.parse_ca_secret(self.secrets["casecret"])


def cloudcore_cluster() -> FakeCluster:
    cluster = FakeCluster(namespaces={"kubeedge"})
    cluster.secrets["casecret"] = cloudcore_secret(
        "casecret", {"cadata": CLOUDCORE_CA, "cakeydata": CLOUDCORE_CA_KEY}
    )
    cluster.secrets["cloudcoresecret"] = cloudcore_secret(
        "cloudcoresecret",
        {"cloudcoredata": CLOUDCORE_SERVER, "cloudcorekeydata": CLOUDCORE_SERVER_KEY},
    )
    token_data = base64.b64encode(CLOUDCORE_TOKEN.encode()).decode()
    cluster.secrets["tokensecret"] = cloudcore_secret("tokensecret", {"tokendata": token_data})
    return cluster


def make_config(tmp_path: Path, **hub: Any) -> Config:
    absent = tmp_path / "etc"
    settings: dict[str, Any] = {
        "tls_ca_file": str(absent / "rootCA.crt"),
        "tls_ca_key_file": str(absent / "rootCA.key"),
        "tls_cert_file": str(absent / "server.crt"),
        "tls_private_key_file": str(absent / "server.key"),
        "advertise_address": ADDRESSES,
        **hub,
    }
    return Config(modules=Modules(cloud_hub=CloudHub(**settings)))


async def prepare(
    cluster: FakeCluster, tmp_path: Path, retry: RetryPolicy = FAST, **hub: Any
) -> HubCredentials:
    config = make_config(tmp_path, **hub)
    return await prepare_kube_credentials_with(
        config, cluster.ops(), now=NOW, advertise_addresses=ADDRESSES, retry=retry
    )


def served_cert(credentials: HubCredentials) -> x509.Certificate:
    return x509.load_pem_x509_certificate(credentials.server_cert_pem)


async def test_empty_cluster_gets_namespace_ca_and_server_cert(tmp_path: Path) -> None:
    cluster = FakeCluster()
    credentials = await prepare(cluster, tmp_path)
    assert cluster.namespaces == {"kubeedge"}
    assert cluster.ca() == credentials.ca
    stored = kube_secrets.parse_server_secret(cluster.secrets["cloudcoresecret"])
    assert certs.cert_pem(stored.cert_der) == credentials.server_cert_pem
    assert (
        certs.server_cert_problem(stored.cert_der, credentials.ca_der, NOW, ADDRESSES, []) is None
    )
    assert cluster.writes() == [("create_secret", "casecret"), ("create_secret", "cloudcoresecret")]
    credentials.websocket_ssl_context()  # loadable


async def test_second_start_reads_and_writes_nothing(tmp_path: Path) -> None:
    cluster = FakeCluster()
    first = await prepare(cluster, tmp_path)
    cluster.calls.clear()
    second = await prepare(cluster, tmp_path)
    assert second == first
    assert cluster.calls == [("read_secret", "casecret"), ("read_secret", "cloudcoresecret")]


async def test_cloudcore_cluster_is_used_as_is_and_its_token_stays_valid(tmp_path: Path) -> None:
    cluster = cloudcore_cluster()
    before = json.loads(json.dumps(cluster.secrets))
    credentials = await prepare(cluster, tmp_path)
    assert credentials.ca_der == base64.b64decode(CLOUDCORE_CA)
    assert credentials.ca_key_der == base64.b64decode(CLOUDCORE_CA_KEY)
    assert credentials.server_cert_pem == certs.cert_pem(base64.b64decode(CLOUDCORE_SERVER))
    assert cluster.writes() == []
    assert cluster.secrets == before
    keeper = new_token_keeper(credentials, make_config(tmp_path), NOW)
    assert keeper.verify(token.split_token(CLOUDCORE_TOKEN)[1], NOW) == {"exp": 4102444800}
    assert keeper.token.split(".")[0] == CLOUDCORE_TOKEN.split(".")[0]


@pytest.mark.parametrize(
    "error",
    [
        api_error(500),
        api_error(403, "Forbidden"),
        api_error(401, "Unauthorized"),
        KubeCallError(None, b"connection refused"),
        KubeCallError(404, b"404 page not found"),
    ],
)
async def test_read_errors_retry_and_never_replace_the_ca(
    tmp_path: Path, autojump_clock: MockClock, error: KubeCallError
) -> None:
    cluster = cloudcore_cluster()
    cluster.fail["read_secret"] = [error, error, error]
    start = trio.current_time()
    credentials = await prepare(cluster, tmp_path)
    assert credentials.ca_der == base64.b64decode(CLOUDCORE_CA)
    assert cluster.writes() == []
    assert trio.current_time() - start == pytest.approx(0.5 + 1 + 2)


async def test_api_server_away_at_start_of_an_empty_cluster(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    """Errors first, then NotFound: only then a CA is made."""
    cluster = FakeCluster()
    cluster.fail["read_secret"] = [KubeCallError(None, b"refused")] * 5
    credentials = await prepare(cluster, tmp_path)
    assert cluster.ca() == credentials.ca
    assert [call for call in cluster.calls if call == ("read_secret", "casecret")] == [
        ("read_secret", "casecret")
    ] * 6


async def test_gives_up_after_max_attempts_without_writing(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    cluster = FakeCluster()
    cluster.fail["read_secret"] = [api_error(403, "Forbidden")] * 10
    with pytest.raises(CredentialsError, match="casecret: giving up after 3 attempts"):
        await prepare(cluster, tmp_path, retry=RetryPolicy(max_attempts=3))
    assert cluster.writes() == []
    assert cluster.namespaces == set()


async def test_retry_logging_is_bounded(
    tmp_path: Path, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = FakeCluster()
    cluster.fail["read_secret"] = [api_error(503, "ServiceUnavailable")] * 100
    with caplog.at_level(logging.WARNING, logger="trio_cloudhub.http"):
        await prepare(cluster, tmp_path, retry=RetryPolicy(base=0.1, cap=1.0))
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert [r.getMessage().split("attempt ")[1].split(")")[0] for r in retries] == [
        "1",
        "2",
        "4",
        "8",
        "16",
        "32",
        "64",
    ]


async def test_unusable_ca_secret_is_an_error_not_replaced(tmp_path: Path) -> None:
    cluster = cloudcore_cluster()
    del cluster.secrets["casecret"]["data"]["cakeydata"]
    with pytest.raises(
        CredentialsError, match=r"casecret key cakeydata: missing.*delete the secret"
    ):
        await prepare(cluster, tmp_path)
    assert cluster.writes() == []


async def test_two_hubs_starting_together_end_with_one_ca(tmp_path: Path) -> None:
    cluster = FakeCluster()
    arrived: list[trio.Event] = []
    both_read = trio.Event()

    async def first_reads_meet() -> None:
        # Both hubs see casecret absent before either creates it.
        if len(arrived) < 2:
            arrived.append(trio.Event())
            if len(arrived) == 2:
                both_read.set()
            await both_read.wait()

    cluster.before["read_secret"] = first_reads_meet
    results: list[HubCredentials] = []

    async def hub() -> None:
        results.append(await prepare(cluster, tmp_path))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub)
        nursery.start_soon(hub)
    assert results[0].ca == results[1].ca == cluster.ca()
    creates = [call for call in cluster.calls if call == ("create_secret", "casecret")]
    assert len(creates) == 2  # one created, the other got AlreadyExists and read it back
    assert results[0].server_cert_pem == results[1].server_cert_pem


async def test_create_failure_is_retried(tmp_path: Path, autojump_clock: MockClock) -> None:
    cluster = FakeCluster()
    cluster.fail["create_secret"] = [api_error(500)]
    credentials = await prepare(cluster, tmp_path)
    assert cluster.ca() == credentials.ca


async def test_deleted_after_already_exists_waits_then_creates(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    cluster = FakeCluster(namespaces={"kubeedge"})
    cluster.fail["create_secret"] = [KubeCallError(409, status_body(409, "AlreadyExists"))]
    start = trio.current_time()
    credentials = await prepare(cluster, tmp_path)
    assert cluster.ca() == credentials.ca
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_namespace_errors_are_retried(tmp_path: Path, autojump_clock: MockClock) -> None:
    cluster = FakeCluster()
    cluster.fail["read_namespace"] = [api_error(500)]
    start = trio.current_time()
    credentials = await prepare(cluster, tmp_path)
    assert cluster.namespaces == {"kubeedge"}
    assert cluster.ca() == credentials.ca
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_namespace_made_by_someone_else_meanwhile_is_fine(tmp_path: Path) -> None:
    cluster = FakeCluster()

    async def someone_else_creates() -> None:
        cluster.namespaces.add("kubeedge")

    cluster.before["create_namespace"] = someone_else_creates
    credentials = await prepare(cluster, tmp_path)
    assert cluster.ca() == credentials.ca


async def test_existing_namespace_is_not_created(tmp_path: Path) -> None:
    cluster = FakeCluster(namespaces={"kubeedge"})
    await prepare(cluster, tmp_path)
    assert ("create_namespace", "kubeedge") not in cluster.calls


async def test_server_secret_for_other_addresses_is_left_alone(tmp_path: Path) -> None:
    cluster = cloudcore_cluster()
    before = json.loads(json.dumps(cluster.secrets["cloudcoresecret"]))
    config = make_config(tmp_path, advertise_address=("10.1.2.3",))
    credentials = await prepare_kube_credentials_with(
        config, cluster.ops(), now=NOW, advertise_addresses=("10.1.2.3",), retry=FAST
    )
    cert = served_cert(credentials)
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in ips.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert certs.is_issued_by(cert, x509.load_der_x509_certificate(credentials.ca_der))
    assert cluster.secrets["cloudcoresecret"] == before
    assert cluster.writes() == []


async def test_broken_server_secret_gets_an_own_certificate(tmp_path: Path) -> None:
    cluster = cloudcore_cluster()
    cluster.secrets["cloudcoresecret"]["data"]["cloudcoredata"] = "!!"
    credentials = await prepare(cluster, tmp_path)
    assert credentials.ca_der == base64.b64decode(CLOUDCORE_CA)
    ca_cert = x509.load_der_x509_certificate(base64.b64decode(CLOUDCORE_CA))
    assert certs.is_issued_by(served_cert(credentials), ca_cert)
    assert cluster.writes() == []


def write_pair(folder: Path, pair: CertAndKey, names: tuple[str, str]) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / names[0], folder / names[1]
    cert_path.write_bytes(certs.cert_pem(pair.cert_der))
    key_path.write_bytes(certs.key_pem(pair.key_der))
    return str(cert_path), str(key_path)


async def test_configured_files_come_first_and_fill_an_empty_cluster(tmp_path: Path) -> None:
    ca = certs.generate_ca(NOW)
    server = certs.generate_server_cert(ca, NOW, ADDRESSES, [])
    ca_paths = write_pair(tmp_path / "ca", ca, ("rootCA.crt", "rootCA.key"))
    server_paths = write_pair(tmp_path / "certs", server, ("server.crt", "server.key"))
    cluster = FakeCluster()
    credentials = await prepare(
        cluster,
        tmp_path,
        tls_ca_file=ca_paths[0],
        tls_ca_key_file=ca_paths[1],
        tls_cert_file=server_paths[0],
        tls_private_key_file=server_paths[1],
    )
    assert credentials.ca == ca == cluster.ca()
    assert credentials.server_cert_pem == certs.cert_pem(server.cert_der)
    stored = kube_secrets.parse_server_secret(cluster.secrets["cloudcoresecret"])
    assert stored == server


async def test_configured_ca_never_overwrites_another_ca_in_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = certs.generate_ca(NOW)
    ca_paths = write_pair(tmp_path / "ca", ca, ("rootCA.crt", "rootCA.key"))
    cluster = cloudcore_cluster()
    with caplog.at_level(logging.WARNING, logger="trio_cloudhub.http"):
        credentials = await prepare(
            cluster, tmp_path, tls_ca_file=ca_paths[0], tls_ca_key_file=ca_paths[1]
        )
    assert credentials.ca == ca
    assert cluster.ca().cert_der == base64.b64decode(CLOUDCORE_CA)
    assert cluster.writes() == []
    assert any("holds another CA" in r.getMessage() for r in caplog.records)
    # CloudCore's server certificate is not signed by this CA: the hub serves its own.
    assert certs.is_issued_by(served_cert(credentials), x509.load_der_x509_certificate(ca.cert_der))


async def test_half_configured_files_are_an_error(tmp_path: Path) -> None:
    ca = certs.generate_ca(NOW)
    ca_paths = write_pair(tmp_path / "ca", ca, ("rootCA.crt", "rootCA.key"))
    with pytest.raises(CredentialsError, match="Both of ca and caKey"):
        await prepare(FakeCluster(), tmp_path, tls_ca_file=ca_paths[0])


async def test_write_token_secret_creates_then_updates() -> None:
    cluster = FakeCluster()
    await write_token_secret(cluster.ops(), CLOUDCORE_TOKEN)
    await write_token_secret(cluster.ops(), "f" * 64 + ".a.b.c")
    assert kube_secrets.parse_token_secret(cluster.secrets["tokensecret"]) == "f" * 64 + ".a.b.c"
    assert cluster.writes() == [
        ("create_secret", "tokensecret"),
        ("create_secret", "tokensecret"),
        ("replace_secret", "tokensecret"),
    ]


async def test_write_token_secret_recreates_a_secret_deleted_meanwhile() -> None:
    cluster = FakeCluster(namespaces={"kubeedge"})
    cluster.fail["create_secret"] = [KubeCallError(409, status_body(409, "AlreadyExists"))]
    await write_token_secret(cluster.ops(), CLOUDCORE_TOKEN)
    assert kube_secrets.parse_token_secret(cluster.secrets["tokensecret"]) == CLOUDCORE_TOKEN


async def test_write_token_secret_raises_other_errors() -> None:
    cluster = FakeCluster(namespaces={"kubeedge"})
    cluster.fail["create_secret"] = [api_error(500)]
    with pytest.raises(KubeCallError):
        await write_token_secret(cluster.ops(), CLOUDCORE_TOKEN)


def stored_token(cluster: FakeCluster) -> str:
    return kube_secrets.parse_token_secret(cluster.secrets["tokensecret"])


async def test_refresher_stores_every_refreshed_token(autojump_clock: MockClock) -> None:
    cluster = cloudcore_cluster()
    ca = cluster.ca()
    keeper = token.TokenKeeper(ca.cert_der, ca.key_der, 12, NOW)
    now = [NOW]
    refresher = partial(run_kube_token_refresher, clock=lambda: now[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher, keeper, cluster.ops())
        first = keeper.token
        assert stored_token(cluster) == first
        now[0] = NOW + timedelta(hours=12)
        await trio.sleep(12 * 3600 + 1)
        assert stored_token(cluster) == keeper.token != first
        nursery.cancel_scope.cancel()


async def test_refresher_retries_a_failed_write(autojump_clock: MockClock) -> None:
    cluster = FakeCluster()
    cluster.fail["read_namespace"] = [api_error(503)] * 3
    ca = certs.generate_ca(NOW)
    keeper = token.TokenKeeper(ca.cert_der, ca.key_der, 12, NOW)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_kube_token_refresher, keeper, cluster.ops())
        assert "tokensecret" not in cluster.secrets
        await trio.sleep(10)
        assert stored_token(cluster) == keeper.token
        nursery.cancel_scope.cancel()


async def test_refresher_gives_up_quietly_until_the_next_refresh(
    autojump_clock: MockClock,
) -> None:
    cluster = FakeCluster()
    cluster.fail["read_namespace"] = [api_error(503)] * 4
    ca = certs.generate_ca(NOW)
    keeper = token.TokenKeeper(ca.cert_der, ca.key_der, 1, NOW)
    refresher = partial(run_kube_token_refresher, retry=RetryPolicy(max_attempts=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher, keeper, cluster.ops())
        await trio.sleep(600)
        assert "tokensecret" not in cluster.secrets
        await trio.sleep(3600)
        assert stored_token(cluster) == keeper.token
        nursery.cancel_scope.cancel()
