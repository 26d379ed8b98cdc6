"""CloudCore-format configuration: defaults, strictness, error paths, the shipped example."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_cloudhub.config import ConfigError, dump_config, parse_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "cloudcore.yaml"


def test_every_default_works_without_a_file() -> None:
    config = parse_config("")
    hub = config.cloud_hub
    assert (hub.keepalive_interval, hub.node_limit, hub.write_timeout) == (30, 1000, 30)
    assert (hub.websocket.port, hub.https.port, hub.quic.port) == (10000, 10002, 10001)
    assert hub.tls_ca_file == "/etc/kubeedge/ca/rootCA.crt"
    assert (hub.edge_cert_signing_duration, hub.token_refresh_duration) == (365, 12)
    assert config.store_kind == "local"
    extra = config.trio_cloud_hub
    assert (extra.reconcile_interval_seconds, extra.drain_timeout_seconds) == (5.0, 5.0)
    assert (hub.authorization.enable, hub.authorization.debug) == (False, True)


def test_shipped_example_parses_and_round_trips() -> None:
    config = parse_config(CONF.read_text(), str(CONF))
    assert parse_config(dump_config(config)) == config


def test_a_real_cloudcore_yaml_with_other_modules_loads() -> None:
    text = """
apiVersion: cloudcore.config.kubeedge.io/v1alpha1
kind: CloudCore
commonConfig: {tunnelPort: 10004}
kubeAPIConfig: {kubeConfig: /root/.kube/config, qps: 50}
modules:
  cloudHub:
    advertiseAddress: [192.0.2.10]
    nodeLimit: 500
    tlsCAFile: /etc/kubeedge/ca/rootCA.crt
    websocket: {address: 0.0.0.0, enable: true, port: 10000}
  edgeController: {enable: true, buffer: {podStatus: 1024}}
  syncController: {enable: true}
"""
    config = parse_config(text, "cloudcore.yaml")
    assert config.cloud_hub.advertise_address == ("192.0.2.10",)
    assert config.cloud_hub.node_limit == 500
    assert config.store_kind == "kube"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (
            "modules:\n  cloudHub:\n    keepaliveInterval: '30'\n",
            "$.modules.cloudHub.keepaliveInterval",
        ),
        ("modules:\n  cloudHub:\n    keepAlive: 3\n", "$.modules.cloudHub"),
        ("modules:\n  cloudHub:\n    websocket: {port: x}\n", "$.modules.cloudHub.websocket.port"),
        (
            "modules:\n  cloudHub:\n    advertiseAddress: 1.2.3.4\n",
            "$.modules.cloudHub.advertiseAddress",
        ),
        ("modules:\n  cloudHub:\n    tlsCAFile: 3\n", "$.modules.cloudHub.tlsCAFile"),
        ("modules:\n  cloudHub:\n    enable: 1\n", "$.modules.cloudHub.enable"),
        (
            "modules:\n  cloudHub:\n    websocket: {port: 70000}\n",
            "$.modules.cloudHub.websocket.port",
        ),
        (
            "modules:\n  cloudHub:\n    websocket: {address: host}\n",
            "$.modules.cloudHub.websocket.address",
        ),
        (
            "modules:\n  cloudHub:\n    tokenRefreshDuration: 0\n",
            "$.modules.cloudHub.tokenRefreshDuration",
        ),
        ("modules:\n  bogusModule: {}\n", "$.modules"),
        ("surprise: 1\n", "$"),
        ("trioCloudHub: {store: etcd}\n", "$.trioCloudHub.store"),
        ("trioCloudHub: {maxMessageSize: 1000}\n", "$.trioCloudHub.maxMessageSize"),
        (
            "trioCloudHub: {reconcileIntervalSeconds: -1}\n",
            "$.trioCloudHub.reconcileIntervalSeconds",
        ),
        ("trioCloudHub: {drainTimeoutSeconds: -2}\n", "$.trioCloudHub.drainTimeoutSeconds"),
        (
            "modules:\n  cloudHub:\n    authorization: {enable: yes please}\n",
            "$.modules.cloudHub.authorization.enable",
        ),
        ("kind: EdgeCore\n", "$.kind"),
    ],
)
def test_bad_values_name_the_file_and_key_path(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "my.yaml")
    message = str(caught.value)
    assert message.startswith("my.yaml: ")
    assert f"@ {path}" in message


@pytest.mark.parametrize("text", ["a: [unclosed", "- just\n- a list\n", "x" * (1024 * 1024 + 1)])
def test_unusable_documents_are_clear_errors(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: "):
        parse_config(text, "f.yaml")
