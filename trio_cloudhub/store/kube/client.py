"""The `kubernetes` client for CloudCore's `kubeAPIConfig`, and the request rate it may use.

`kubeAPIConfig` keys (spec 2): `kubeConfig` (a kubeconfig file), `master` (the API server URL,
overriding the kubeconfig's), `qps` and `burst` (the client-go rate limit for our requests),
`contentType` (CloudCore asks for protobuf; the Python client speaks JSON only, so it is
accepted and ignored). Neither `kubeConfig` nor `master` set, inside a pod: the in-cluster
service account.

The `kubernetes` package is an optional dependency (`pip install 'trio-cloudhub[kube]'`),
imported here only when a Kubernetes store is configured.
"""

from __future__ import annotations

import os
from typing import Any

import trio
import yaml

from trio_cloudhub.config import KubeAPIConfig

CONNECTION_POOL_SIZE = 32


class KubeConfigError(Exception):
    """The cluster cannot be reached with this configuration (file, URL, missing package)."""


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def api_client(api: KubeAPIConfig) -> Any:
    """A `kubernetes.client.ApiClient` for `api`; KubeConfigError when that is impossible."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise KubeConfigError(
            "the Kubernetes store needs the kubernetes package: pip install 'trio-cloudhub[kube]'"
        ) from None
    configuration = client.Configuration()
    try:
        if api.kube_config:
            path = os.path.expanduser(api.kube_config)
            if not os.path.isfile(path):
                raise KubeConfigError(f"kubeAPIConfig.kubeConfig: {path}: no such file")
            config.load_kube_config(path, client_configuration=configuration)  # type: ignore[no-untyped-call]
        elif not api.master and in_cluster():
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        elif not api.master:
            raise KubeConfigError("set kubeAPIConfig.kubeConfig or kubeAPIConfig.master")
    except (OSError, ValueError, yaml.YAMLError, config.ConfigException) as exc:
        raise KubeConfigError(f"kubeAPIConfig: {exc}") from None
    if api.master:
        configuration.host = api.master
    # Our callers retry with back-off and log once; urllib3's own retries would log a warning
    # for every attempt while the API server is away.
    configuration.retries = False
    # Informer watches hold connections for minutes; writes need their own (the default,
    # 5 per core, makes urllib3 drop and reopen connections under load).
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return client.ApiClient(configuration)


class RateLimiter:
    """A token bucket: `qps` requests a second on average, bursts of up to `burst`."""

    def __init__(self, qps: float, burst: int) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("qps must be > 0 and burst >= 1")
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None
        self._lock = trio.Lock()  # first come, first served

    async def acquire(self) -> None:
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                await trio.sleep((1 - self._tokens) / self.qps)
                self._refill()
            self._tokens -= 1

    def _refill(self) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
        self._stamp = now
