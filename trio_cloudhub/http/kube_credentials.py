"""The hub's CA, server certificate and join token kept in Kubernetes like CloudCore (spec 7).

Order (spec 7.1/7.2): the configured files (`tlsCAFile`, ...) when they exist, else the
secrets `kubeedge/casecret` and `kubeedge/cloudcoresecret`, else generate. The secret
formats are CloudCore's (`trio_cloudhub.pki.kube_secrets`), so a cluster that ran CloudCore
keeps its CA, its edges' certificates and its join tokens.

Where we differ from CloudCore, on purpose:
- only a NotFound secret leads to generating; any other failure waits with back-off and
  reads again (REF generated on any error and could replace the CA, spec 12);
- generated material is created only if absent; on AlreadyExists the secret is read back
  and used, so hubs starting together end with one CA (CloudCore's create-or-update lets
  the last writer win);
- an existing `casecret` is never overwritten, not even by a CA from files (CloudCore
  overwrites it): a warning says that the two differ;
- an existing `cloudcoresecret` that does not fit this hub (other CA, expired, an address
  missing) is left alone and this hub serves a certificate of its own, kept in memory:
  hubs behind different addresses would otherwise keep rewriting it;
- `tokensecret` is created or updated with every refreshed token (as CloudCore); a failed
  write is retried until the next refresh and never stops the hub.

The logic runs over `SecretOps`, five async functions; `kube_secret_ops` makes them from the
blocking `kubernetes` calls in the small `_*_call` functions, run in worker threads, at most
`DEFAULT_THREADS` at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import attrs
import trio

from trio_cloudhub.config import CloudHub, Config
from trio_cloudhub.http.certs_store import (
    CredentialsError,
    HubCredentials,
    _load_pair,
    credentials_from,
    resolve_advertise_addresses,
    utc_now,
)
from trio_cloudhub.pki import certs
from trio_cloudhub.pki.certs import CertAndKey, PkiError
from trio_cloudhub.pki.kube_secrets import (
    CA_SECRET,
    MAX_SECRET_JSON_BYTES,
    NAMESPACE,
    SERVER_SECRET,
    TOKEN_SECRET,
    ReadOutcome,
    SecretError,
    StartupAction,
    ca_secret,
    classify_read,
    is_already_exists,
    load_secret_json,
    namespace_body,
    parse_ca_secret,
    parse_server_secret,
    parse_token_secret,
    server_secret,
    startup_action,
    token_secret,
)
from trio_cloudhub.pki.token import TokenKeeper
from trio_cloudhub.store.kube.calls import KubeCallError, call_raw, read_body
from trio_cloudhub.store.kube.client import KubeConfigError, api_client

logger = logging.getLogger("trio_cloudhub.http")

__all__ = [
    "KubeCallError",
    "RetryPolicy",
    "SecretOps",
    "kube_secret_ops",
    "prepare_kube_credentials",
    "prepare_kube_credentials_with",
    "run_kube_token_refresher",
    "write_token_secret",
]

DEFAULT_THREADS = 2

T = TypeVar("T")


@attrs.frozen
class SecretOps:
    """The API calls this module needs, all in namespace `kubeedge`; failures raise
    KubeCallError. `read_secret` returns the raw JSON (at most MAX_SECRET_JSON_BYTES + 1
    bytes); the others return nothing.
    """

    read_secret: Callable[[str], Awaitable[bytes]]
    create_secret: Callable[[dict[str, Any]], Awaitable[None]]
    replace_secret: Callable[[str, dict[str, Any]], Awaitable[None]]
    read_namespace: Callable[[], Awaitable[None]]
    create_namespace: Callable[[], Awaitable[None]]


@attrs.frozen
class RetryPolicy:
    """Back-off for failed calls: `base` doubling to `cap` seconds; None: until cancelled."""

    base: float = 0.5
    cap: float = 30.0
    max_attempts: int | None = None


# ---- the thin `kubernetes` client calls (covered by the fake API server tests) ----


def kube_secret_ops(api_client: Any, limiter: trio.CapacityLimiter | None = None) -> SecretOps:
    """SecretOps over a `kubernetes.client.ApiClient`, the calls in worker threads."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    in_thread = partial(_in_thread, limiter or trio.CapacityLimiter(DEFAULT_THREADS), core)
    return SecretOps(
        read_secret=in_thread(_read_secret_call),
        create_secret=in_thread(_create_secret_call),
        replace_secret=in_thread(_replace_secret_call),
        read_namespace=in_thread(_read_namespace_call),
        create_namespace=in_thread(_create_namespace_call),
    )


def _in_thread(
    limiter: trio.CapacityLimiter, core: Any, function: Callable[..., T]
) -> Callable[..., Awaitable[T]]:
    async def call(*args: Any) -> T:
        return await trio.to_thread.run_sync(
            partial(function, core, *args), limiter=limiter, abandon_on_cancel=True
        )

    return call


def _read_secret_call(core: Any, name: str) -> bytes:
    response = call_raw(core.read_namespaced_secret, name, NAMESPACE)
    return read_body(response, MAX_SECRET_JSON_BYTES)


def _create_secret_call(core: Any, body: dict[str, Any]) -> None:
    read_body(call_raw(core.create_namespaced_secret, NAMESPACE, body), MAX_SECRET_JSON_BYTES)


def _replace_secret_call(core: Any, name: str, body: dict[str, Any]) -> None:
    response = call_raw(core.replace_namespaced_secret, name, NAMESPACE, body)
    read_body(response, MAX_SECRET_JSON_BYTES)


def _read_namespace_call(core: Any) -> None:
    read_body(call_raw(core.read_namespace, NAMESPACE), MAX_SECRET_JSON_BYTES)


def _create_namespace_call(core: Any) -> None:
    read_body(call_raw(core.create_namespace, namespace_body()), MAX_SECRET_JSON_BYTES)


# ---- the logic, over SecretOps ----


class _Retry:
    """Waits between attempts; logs attempts 1, 2, 4, 8, ... only, so a long outage is quiet."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self._policy = policy
        self._what = what
        self.failures = 0

    async def wait(self, reason: str) -> None:
        self.failures += 1
        policy = self._policy
        if policy.max_attempts is not None and self.failures >= policy.max_attempts:
            raise CredentialsError(
                f"{self._what}: giving up after {self.failures} attempts: {reason}"
            )
        delay = min(policy.base * 2 ** min(self.failures - 1, 30), policy.cap)
        if self.failures & (self.failures - 1) == 0:
            logger.warning(
                "%s failed (attempt %d), retrying in %.1f s: %s",
                self._what,
                self.failures,
                delay,
                reason,
            )
        await trio.sleep(delay)


@attrs.frozen
class _Stored:
    """A secret as read (`raw`), or the material this hub generated and created."""

    raw: bytes = b""
    created: CertAndKey | None = None


class _Api:
    """SecretOps with namespace `kubeedge` made once, before the first create."""

    def __init__(self, ops: SecretOps) -> None:
        self._ops = ops
        self._namespace_ready = False

    async def read(self, name: str) -> tuple[ReadOutcome, bytes, str]:
        """(outcome, raw JSON when found, error text when not)."""
        try:
            raw = await self._ops.read_secret(name)
        except KubeCallError as exc:
            return classify_read(exc.status, exc.body, name), b"", str(exc)
        return ReadOutcome.FOUND, raw, ""

    async def ensure_namespace(self) -> None:
        if self._namespace_ready:
            return
        try:
            await self._ops.read_namespace()
        except KubeCallError as exc:
            if exc.status != 404:
                raise
            await self._create_namespace()
        self._namespace_ready = True

    async def _create_namespace(self) -> None:
        try:
            await self._ops.create_namespace()
            logger.info("created namespace %s", NAMESPACE)
        except KubeCallError as exc:
            if not is_already_exists(exc.status, exc.body):
                raise

    async def create_if_absent(self, body: dict[str, Any]) -> bool:
        """True when created; False when it already existed; KubeCallError otherwise."""
        await self.ensure_namespace()
        try:
            await self._ops.create_secret(body)
        except KubeCallError as exc:
            if is_already_exists(exc.status, exc.body):
                return False
            raise
        return True

    async def save(self, body: dict[str, Any]) -> None:
        """Create, or replace when it exists (CloudCore's SaveSecret)."""
        name = body["metadata"]["name"]
        if await self.create_if_absent(body):
            return
        try:
            await self._ops.replace_secret(name, body)
        except KubeCallError as exc:
            # Deleted between our create and replace: create it once more.
            if exc.status != 404 or not await self.create_if_absent(body):
                raise


async def _read_or_create(
    api: _Api,
    name: str,
    generate: Callable[[], CertAndKey],
    to_body: Callable[[CertAndKey], dict[str, Any]],
    policy: RetryPolicy,
) -> _Stored:
    """Read secret `name`; only when it is NotFound generate and create it if absent.

    On AlreadyExists (another hub was quicker) the secret is read again and returned.
    """
    retry = _Retry(policy, f"secret {NAMESPACE}/{name}")
    generated: CertAndKey | None = None
    contended = False
    while True:
        outcome, raw, error = await api.read(name)
        action = startup_action(outcome)
        if action is StartupAction.USE:
            return _Stored(raw=raw)
        if action is StartupAction.RETRY or contended:
            # Absent right after AlreadyExists means someone deleted it: do not spin.
            await retry.wait(error or "deleted while being created")
            contended = False
            continue
        generated = generated or generate()
        try:
            if await api.create_if_absent(to_body(generated)):
                return _Stored(created=generated)
        except KubeCallError as exc:
            await retry.wait(f"create: {exc}")
            continue
        logger.info("secret %s/%s was created by another hub first: reading it", NAMESPACE, name)
        contended = True


def _parse_stored(raw: bytes, name: str, parse: Callable[[Any], CertAndKey]) -> CertAndKey:
    return parse(load_secret_json(raw, name))


async def _configured(
    paths: tuple[str, str],
    loader: Callable[[bytes, bytes], CertAndKey],
    names: tuple[str, str],
) -> CertAndKey | None:
    """The pair from the configured files when they exist (files come first, spec 7.1/7.2)."""
    return await trio.to_thread.run_sync(_load_pair, *paths, loader, names)


async def _prepare_ca(api: _Api, hub: CloudHub, now: datetime, policy: RetryPolicy) -> CertAndKey:
    paths = (hub.tls_ca_file, hub.tls_ca_key_file)
    configured = await _configured(paths, certs.load_ca_pem, ("ca", "caKey"))
    if configured is not None:
        logger.info("using CA from %s", hub.tls_ca_file)
        await _publish_configured_ca(api, configured, policy)
        return configured
    stored = await _read_or_create(
        api, CA_SECRET, partial(certs.generate_ca, now), ca_secret, policy
    )
    if stored.created is not None:
        logger.info("generated a new CA in secret %s/%s", NAMESPACE, CA_SECRET)
        return stored.created
    try:
        ca = _parse_stored(stored.raw, CA_SECRET, parse_ca_secret)
    except SecretError as exc:
        # Never replaced: every edge certificate and token depends on it.
        raise CredentialsError(
            f"{exc}; fix or delete the secret (deleting it makes a new CA: edges must re-join)"
        ) from None
    logger.info("using CA from secret %s/%s", NAMESPACE, CA_SECRET)
    return ca


async def _publish_configured_ca(api: _Api, ca: CertAndKey, policy: RetryPolicy) -> None:
    """Store a CA from files in `casecret` if absent; an existing different one is kept."""
    stored = await _read_or_create(api, CA_SECRET, lambda: ca, ca_secret, policy)
    if stored.created is not None:
        logger.info("stored the configured CA in secret %s/%s", NAMESPACE, CA_SECRET)
        return
    try:
        same = _parse_stored(stored.raw, CA_SECRET, parse_ca_secret) == ca
    except SecretError:
        same = False
    if not same:
        logger.warning(
            "secret %s/%s holds another CA (or other key bytes) than the configured files; "
            "left unchanged: hubs reading it issue certificates and tokens this hub refuses",
            NAMESPACE,
            CA_SECRET,
        )


def _generate_server(
    ca: CertAndKey, now: datetime, addresses: tuple[str, ...], hub: CloudHub
) -> CertAndKey:
    try:
        return certs.generate_server_cert(ca, now, addresses, hub.dns_names)
    except PkiError as exc:
        raise CredentialsError(str(exc)) from None


def _server_problem(
    raw: bytes, ca: CertAndKey, now: datetime, addresses: tuple[str, ...], hub: CloudHub
) -> tuple[CertAndKey | None, str | None]:
    """The stored server pair and None, or None and why this hub cannot serve it."""
    try:
        pair = _parse_stored(raw, SERVER_SECRET, parse_server_secret)
    except SecretError as exc:
        return None, str(exc)
    problem = certs.server_cert_problem(pair.cert_der, ca.cert_der, now, addresses, hub.dns_names)
    return (None, problem) if problem else (pair, None)


async def _prepare_server(
    api: _Api,
    hub: CloudHub,
    ca: CertAndKey,
    now: datetime,
    addresses: tuple[str, ...],
    policy: RetryPolicy,
) -> CertAndKey:
    paths = (hub.tls_cert_file, hub.tls_private_key_file)
    configured = await _configured(paths, certs.load_server_pem, ("cert", "key"))
    if configured is not None:
        logger.info("using server certificate from %s", hub.tls_cert_file)
        await _read_or_create(api, SERVER_SECRET, lambda: configured, server_secret, policy)
        return configured
    generate = partial(_generate_server, ca, now, addresses, hub)
    stored = await _read_or_create(api, SERVER_SECRET, generate, server_secret, policy)
    if stored.created is not None:
        logger.info("generated a server certificate in secret %s/%s", NAMESPACE, SERVER_SECRET)
        return stored.created
    pair, problem = _server_problem(stored.raw, ca, now, addresses, hub)
    if pair is not None:
        logger.info("using server certificate from secret %s/%s", NAMESPACE, SERVER_SECRET)
        return pair
    logger.warning(
        "secret %s/%s does not fit this hub (%s): serving a certificate of its own, "
        "the secret is left unchanged",
        NAMESPACE,
        SERVER_SECRET,
        problem,
    )
    return generate()


async def prepare_kube_credentials_with(
    config: Config,
    ops: SecretOps,
    *,
    now: datetime | None = None,
    advertise_addresses: tuple[str, ...] | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> HubCredentials:
    """`prepare_kube_credentials` over any SecretOps (tests inject their own)."""
    hub = config.cloud_hub
    now = now or utc_now()
    api = _Api(ops)
    addresses = advertise_addresses or resolve_advertise_addresses(config)
    ca = await _prepare_ca(api, hub, now, retry)
    server = await _prepare_server(api, hub, ca, now, addresses, retry)
    return credentials_from(ca, server)


async def prepare_kube_credentials(
    config: Config,
    api_client: Any,
    *,
    now: datetime | None = None,
    advertise_addresses: tuple[str, ...] | None = None,
    retry: RetryPolicy = RetryPolicy(),
    limiter: trio.CapacityLimiter | None = None,
) -> HubCredentials:
    """Load or create the CA and server certificate in the cluster (see the module doc).

    Waits (with back-off) while the API server fails; CredentialsError when a secret or a
    configured file is unusable, or after `retry.max_attempts`.
    """
    return await prepare_kube_credentials_with(
        config,
        kube_secret_ops(api_client, limiter),
        now=now,
        advertise_addresses=advertise_addresses,
        retry=retry,
    )


async def write_token_secret(ops: SecretOps, token: str) -> None:
    """Store `token` in `kubeedge/tokensecret`: create, or update it (CloudCore's way)."""
    await _Api(ops).save(token_secret(token))


async def _save_token(api: _Api, token: str) -> str | None:
    """None when stored, else the error text."""
    try:
        await api.save(token_secret(token))
    except KubeCallError as exc:
        return str(exc)
    return None


async def _retry_token(api: _Api, token: str, policy: RetryPolicy, error: str) -> None:
    retry = _Retry(policy, f"writing secret {NAMESPACE}/{TOKEN_SECRET}")
    next_error: str | None = error
    while next_error is not None:
        try:
            await retry.wait(next_error)
        except CredentialsError as exc:
            logger.warning("%s; trying again after the next refresh", exc)
            return
        next_error = await _save_token(api, token)
    logger.info("join token stored in secret %s/%s", NAMESPACE, TOKEN_SECRET)


async def run_kube_token_refresher(
    keeper: TokenKeeper,
    ops: SecretOps,
    *,
    clock: Callable[[], datetime] = utc_now,
    retry: RetryPolicy = RetryPolicy(),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Store the current token, then refresh and store it every refresh interval.

    `started` comes after the first write attempt. A failed write is retried (back-off)
    until the next refresh; the hub keeps its in-memory token either way.
    """
    api = _Api(ops)
    interval = keeper.refresh_interval.total_seconds()
    token = keeper.token
    deadline = trio.current_time() + interval
    error = await _save_token(api, token)
    task_status.started()
    while True:
        if error is not None:
            with trio.move_on_at(deadline):
                await _retry_token(api, token, retry, error)
        await trio.sleep_until(deadline)
        token = keeper.refresh(clock())
        deadline = trio.current_time() + interval
        logger.info("join token refreshed")
        error = await _save_token(api, token)


async def stored_kube_token(config: Config) -> str:
    """The join token in `kubeedge/tokensecret` (`trio-cloudhub token`, `keadm gettoken`)."""
    try:
        client = api_client(config.kube_api_config)
    except KubeConfigError as exc:
        raise CredentialsError(str(exc)) from None
    try:
        raw = await kube_secret_ops(client).read_secret(TOKEN_SECRET)
    except KubeCallError as exc:
        where = f"secret {NAMESPACE}/{TOKEN_SECRET}"
        raise CredentialsError(f"cannot read {where} (start the hub once first): {exc}") from None
    finally:
        client.close()
    try:
        return parse_token_secret(load_secret_json(raw, TOKEN_SECRET))
    except SecretError as exc:
        raise CredentialsError(str(exc)) from None
