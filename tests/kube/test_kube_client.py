"""kubeAPIConfig → client, and the qps/burst limiter."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from trio_cloudhub.config import KubeAPIConfig
from trio_cloudhub.store.kube.client import KubeConfigError, RateLimiter, api_client

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "http://127.0.0.1:6443"}
users:
- name: u
  user: {token: secret-token}
contexts:
- name: ctx
  context: {cluster: c, user: u}
current-context: ctx
"""


def test_a_kubeconfig_file_gives_its_server_and_credentials(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    client = api_client(KubeAPIConfig(kube_config=str(path)))
    assert client.configuration.host == "http://127.0.0.1:6443"
    auth = client.configuration.auth_settings()["BearerToken"]
    assert (auth["key"], auth["value"]) == ("authorization", "Bearer secret-token")


def test_master_overrides_the_kubeconfig_server(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    api = KubeAPIConfig(kube_config=str(path), master="http://10.0.0.1:8080")
    assert api_client(api).configuration.host == "http://10.0.0.1:8080"
    assert api_client(KubeAPIConfig(master="http://10.0.0.2:8080")).configuration.host == (
        "http://10.0.0.2:8080"
    )


def test_unusable_configuration_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match=r"kubeConfig or kubeAPIConfig\.master"):
        api_client(KubeAPIConfig())
    with pytest.raises(KubeConfigError, match="kubeAPIConfig"):
        api_client(KubeAPIConfig(kube_config=str(tmp_path / "missing")))
    (tmp_path / "bad").write_text("clusters: [")
    with pytest.raises(KubeConfigError, match="kubeAPIConfig"):
        api_client(KubeAPIConfig(kube_config=str(tmp_path / "bad")))


async def test_rate_limiter_allows_a_burst_then_qps(autojump_clock: MockClock) -> None:
    limiter = RateLimiter(qps=10, burst=5)
    start = trio.current_time()
    times = []
    for _ in range(15):
        await limiter.acquire()
        times.append(trio.current_time() - start)
    assert times[:5] == [0, 0, 0, 0, 0]
    assert times[-1] == pytest.approx(1.0)  # 10 more at 10 per second


def test_rate_limiter_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RateLimiter(qps=0, burst=1)
