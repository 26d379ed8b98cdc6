"""Configuration in KubeEdge's CloudCore format (spec section 2), plus our own section.

The file is the YAML a CloudCore reads (`apiVersion: cloudcore.config.kubeedge.io/v1alpha1`,
`kind: CloudCore`). `modules.cloudHub` and `kubeAPIConfig` are read strictly: unknown keys and
wrong types are errors that name the key path and the file. Other CloudCore modules are
accepted and ignored so an existing cloudcore.yaml loads. What KubeEdge has no key for lives
under the top-level `trioCloudHub` section. This module does no I/O: the caller reads the file.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import cattrs
import yaml
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

API_VERSION = "cloudcore.config.kubeedge.io/v1alpha1"
API_VERSIONS = (API_VERSION, "cloudcore.config.kubeedge.io/v1alpha2")
KIND = "CloudCore"
MAX_CONFIG_BYTES = 1024 * 1024
MAX_WORKERS = 256
DEFAULT_PROJECT_ID = "e632aba927ea4ac2b575ec1603d56f10"
# CloudCore modules we do not implement; their sections are accepted and ignored.
OTHER_CLOUDCORE_MODULES = frozenset(
    {
        "edgeController",
        "deviceController",
        "syncController",
        "dynamicController",
        "cloudStream",
        "router",
        "iptablesManager",
        "taskManager",
        "nodeUpgradeJobController",
        "imagePrePullController",
        "policyController",
        "cloudHubConfig",
    }
)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and key path."""


@attrs.frozen
class Quic:
    enable: bool = False
    address: str = "0.0.0.0"
    port: int = 10001
    max_incoming_streams: int = 10000


@attrs.frozen
class UnixSocket:
    enable: bool = True
    address: str = "unix:///var/lib/kubeedge/kubeedge.sock"


@attrs.frozen
class WebSocket:
    enable: bool = True
    address: str = "0.0.0.0"
    port: int = 10000


@attrs.frozen
class Https:
    enable: bool = True
    address: str = "0.0.0.0"
    port: int = 10002


@attrs.frozen
class NodeAuthorizationMode:
    enable: bool = True


@attrs.frozen
class AuthorizationMode:
    node: NodeAuthorizationMode = attrs.field(factory=NodeAuthorizationMode)


@attrs.frozen
class Authorization:
    enable: bool = False
    debug: bool = True
    modes: tuple[AuthorizationMode, ...] = (AuthorizationMode(),)


@attrs.frozen
class CloudHub:
    enable: bool = True
    keepalive_interval: int = 30
    node_limit: int = 1000
    tls_ca_file: str = "/etc/kubeedge/ca/rootCA.crt"
    tls_ca_key_file: str = "/etc/kubeedge/ca/rootCA.key"
    tls_cert_file: str = "/etc/kubeedge/certs/server.crt"
    tls_private_key_file: str = "/etc/kubeedge/certs/server.key"
    write_timeout: int = 30
    quic: Quic = attrs.field(factory=Quic)
    unixsocket: UnixSocket = attrs.field(factory=UnixSocket)
    websocket: WebSocket = attrs.field(factory=WebSocket)
    https: Https = attrs.field(factory=Https)
    # Empty means "the first non-loopback address of this host", resolved at start-up.
    advertise_address: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    edge_cert_signing_duration: int = 365
    token_refresh_duration: int = 12
    authorization: Authorization = attrs.field(factory=Authorization)


@attrs.frozen
class KubeAPIConfig:
    master: str = ""
    kube_config: str = ""
    content_type: str = "application/vnd.kubernetes.protobuf"
    qps: int = 100
    burst: int = 200


@attrs.frozen
class Modules:
    cloud_hub: CloudHub = attrs.field(factory=CloudHub)


@attrs.frozen
class TrioCloudHub:
    """Our own settings, which KubeEdge's schema has no key for."""

    # Empty means the platform default chosen by the command line.
    data_dir: str = ""
    # Empty means `<dataDir>/manifests`.
    manifests_dir: str = ""
    # "local" (embedded SQLite + manifests) or "kube" (a Kubernetes API server).
    store: str = ""
    # Seconds between scans of the manifests folder when inotify is unavailable; with inotify
    # the store wakes on each change and polls only as a fallback (every 20x this, >= 5 s).
    manifests_poll_interval: float = 0.25
    max_message_size: int = 64 * 1024 * 1024
    ack_timeout_seconds: float = 5.0
    ack_max_sends: int = 5
    # Seconds between comparisons of every connected node's ack points with the desired
    # state (KubeEdge's sync controller period); 0 = only when a node connects.
    reconcile_interval_seconds: float = 5.0
    # On SIGTERM/SIGINT: how long in-flight ACK waits may finish before sessions are closed.
    drain_timeout_seconds: float = 5.0
    log_level: str = "INFO"
    # Per session, what an edge may send up: messages per second with a burst, and bytes per
    # second with a burst (one message of maxMessageSize passes at once). An edge over them
    # is read more slowly (nothing is dropped). EdgeCore limits itself to 30 qps, burst 60;
    # 0 turns a limit off.
    upstream_qps: float = 300.0
    upstream_burst: int = 600
    upstream_bytes_per_second: float = 8.0 * 1024 * 1024
    upstream_bytes_burst: int = 64 * 1024 * 1024
    # Warnings about a misbehaving edge (rate limited, no ACK, another node's certificate):
    # at most one line per node and kind per this many seconds, with the count held back.
    warning_period_seconds: float = 60.0
    # Processes serving edges on the same ports (`serve --workers N`); 1: one process.
    workers: int = 1
    # host:port of a plain-HTTP listener for /readyz and /livez only, served by a thread
    # that never waits behind TLS handshakes (floods); empty: off (HTTPS probes only).
    probe_bind_address: str = ""


@attrs.frozen
class MonitorServer:
    # Prometheus /metrics (KubeEdge's CloudCore monitor address); port 0: any free port.
    bind_address: str = "127.0.0.1:9091"
    enable_profiling: bool = False


@attrs.frozen
class CommonConfig:
    monitor_server: MonitorServer = attrs.field(factory=MonitorServer)


@attrs.frozen
class Config:
    api_version: str = API_VERSION
    kind: str = KIND
    common_config: CommonConfig = attrs.field(factory=CommonConfig)
    kube_api_config: KubeAPIConfig = attrs.field(factory=KubeAPIConfig)
    modules: Modules = attrs.field(factory=Modules)
    trio_cloud_hub: TrioCloudHub = attrs.field(factory=TrioCloudHub)
    # Key paths of CloudCore settings that were accepted but are not used (warned once).
    ignored: tuple[str, ...] = attrs.field(default=(), eq=False)

    @property
    def cloud_hub(self) -> CloudHub:
        return self.modules.cloud_hub

    @property
    def store_kind(self) -> str:
        """The cloud side in use: explicit setting, else Kubernetes when configured."""
        if self.trio_cloud_hub.store:
            return self.trio_cloud_hub.store
        api = self.kube_api_config
        return "kube" if api.master or api.kube_config else "local"


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


_RENAMES = {
    "kube_api_config": "kubeAPIConfig",
    "trio_cloud_hub": "trioCloudHub",
    "tls_ca_file": "tlsCAFile",
    "tls_ca_key_file": "tlsCAKeyFile",
}
_CONFIG_CLASSES = (
    Quic,
    UnixSocket,
    WebSocket,
    Https,
    NodeAuthorizationMode,
    AuthorizationMode,
    Authorization,
    CloudHub,
    KubeAPIConfig,
    TrioCloudHub,
    Modules,
    MonitorServer,
    CommonConfig,
    Config,
)


_INT64 = range(-(2**63), 2**63)


def _strict_scalar(kind: type) -> Any:
    def structure(value: Any, _: type) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got a boolean")
        if kind is float and isinstance(value, int):
            value = float(value) if value in _INT64 else math.inf
        if not isinstance(value, kind):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        # Go's int is 64 bits; infinities and NaN would slip through every range check.
        if kind is int and value not in _INT64:
            raise ValueError("integer out of range")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value

    return structure


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    for kind in (int, float, str, bool):
        converter.register_structure_hook(kind, _strict_scalar(kind))
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _strict_string_list)
    for cls in _CONFIG_CLASSES:
        renames: dict[str, Any] = {
            field.name: override(rename=_RENAMES.get(field.name, _camel(field.name)))
            for field in attrs.fields(cls)
        }
        if cls is Config:
            renames["ignored"] = override(omit=True)  # filled by parse_config, not the file
        converter.register_structure_hook(
            cls,
            make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True, **renames),
        )
        converter.register_unstructure_hook(
            cls, make_dict_unstructure_fn(cls, converter, **renames)
        )
    return converter


def _strict_string_list(value: Any, _: type) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("expected a list of strings")
    return tuple(value)


# CloudCore's own keys of sections we read, which we accept and do not use.
_IGNORED_COMMON = frozenset({"tunnelPort", "dnsPolicy", "clusterDNS", "clusterDomain"})


def _drop_other_modules(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """CloudCore sections we do not run are accepted and ignored; returns them by key path."""
    ignored = [f"$.{key}" for key in ("leaderElection",) if key in raw]
    raw = {key: value for key, value in raw.items() if key != "leaderElection"}
    common = raw.get("commonConfig")
    if isinstance(common, dict):
        ignored += [f"$.commonConfig.{key}" for key in common if key in _IGNORED_COMMON]
        kept_common = {k: v for k, v in common.items() if k not in _IGNORED_COMMON}
        raw = {**raw, "commonConfig": kept_common}
    modules = raw.get("modules")
    if not isinstance(modules, dict):
        return raw, ignored
    ignored += [f"$.modules.{key}" for key in modules if key in OTHER_CLOUDCORE_MODULES]
    kept = {key: value for key, value in modules.items() if key not in OTHER_CLOUDCORE_MODULES}
    return {**raw, "modules": kept}, ignored


_converter = _make_converter()


def _describe(exc: cattrs.BaseValidationError) -> str:
    """cattrs names attributes; the user wrote YAML keys, so the path is spelled in those."""
    lines = []
    for line in cattrs.transform_error(exc, path="$"):
        message, _, path = line.rpartition(" @ ")
        keys = [_RENAMES.get(part, _camel(part)) for part in path.split(".")]
        lines.append(f"{message} @ {'.'.join(keys)}")
    return "; ".join(lines)


def parse_config(text: str | bytes, source: str = "<config>") -> Config:
    """Structure and validate a CloudCore YAML document; errors name `source` and the key."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: file larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the document is nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        # A scalar the YAML resolver accepts but cannot build, e.g. the date 2026-13-45.
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the document must be a mapping")
    raw, ignored = _drop_other_modules(raw)
    problem = _key_problem(raw)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    try:
        config = _converter.structure(raw, Config)
    except cattrs.BaseValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    problems = validate(config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return attrs.evolve(config, ignored=tuple(ignored))


# Deeper or larger than any CloudCore configuration; the sections we do not read are dropped
# before the check. The node bound stops a YAML alias bomb, which is small as text.
_MAX_DEPTH = 16
_MAX_NODES = 100_000


def _key_problem(raw: dict[str, Any]) -> str:
    """Why the sections we read cannot be structured ("" when they can): YAML allows any
    scalar (or a list) as a mapping key, CloudCore's Go structs only strings."""
    stack: list[tuple[Any, str, int]] = [(raw, "$", 0)]
    nodes = 0
    while stack:
        value, path, depth = stack.pop()
        nodes += 1
        if nodes > _MAX_NODES:
            return f"the document has more than {_MAX_NODES} values (YAML aliases?)"
        if depth > _MAX_DEPTH:
            return f"nested too deeply @ {path}"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"mapping key {key!r} is not a string @ {path}"
                stack.append((item, f"{path}.{key}", depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))
    return ""


def validate(config: Config) -> list[str]:
    """The checks of KubeEdge's ValidateModuleCloudHub, plus ours; empty when valid."""
    problems: list[str] = []
    if config.api_version not in API_VERSIONS:
        problems.append(f"apiVersion must be one of {', '.join(API_VERSIONS)} @ $.apiVersion")
    if not _is_host_port(config.common_config.monitor_server.bind_address):
        problems.append("must be host:port @ $.commonConfig.monitorServer.bindAddress")
    probes = config.trio_cloud_hub.probe_bind_address
    if probes and not _is_host_port(probes):
        problems.append("must be host:port @ $.trioCloudHub.probeBindAddress")
    if config.kind != KIND:
        problems.append(f"kind must be {KIND!r} @ $.kind")
    hub = config.cloud_hub
    base = "$.modules.cloudHub"
    for name, port in (
        ("websocket", hub.websocket.port),
        ("quic", hub.quic.port),
        ("https", hub.https.port),
    ):
        # Port 0 (any free port) is our extension, used by tests and the fleet simulator.
        if not 0 <= port <= 65535:
            problems.append(f"port must be 0-65535 @ {base}.{name}.port")
    for name, address in (("websocket", hub.websocket.address), ("quic", hub.quic.address)):
        if not _is_ip(address):
            problems.append(f"address must be an IP address @ {base}.{name}.address")
    if not hub.unixsocket.address.startswith(("unix://", "tcp://")):
        problems.append(f"address must start with unix:// @ {base}.unixsocket.address")
    if hub.token_refresh_duration <= 0:
        problems.append(f"must be > 0 @ {base}.tokenRefreshDuration")
    if hub.edge_cert_signing_duration <= 0:
        problems.append(f"must be > 0 @ {base}.edgeCertSigningDuration")
    if hub.keepalive_interval <= 0:
        problems.append(f"must be > 0 @ {base}.keepaliveInterval")
    if hub.node_limit <= 0:
        problems.append(f"must be > 0 @ {base}.nodeLimit")
    extra = config.trio_cloud_hub
    if extra.store not in ("", "local", "kube"):
        problems.append("must be 'local' or 'kube' @ $.trioCloudHub.store")
    if extra.max_message_size < 1024 * 1024:
        problems.append("must be at least 1048576 @ $.trioCloudHub.maxMessageSize")
    if not 0 < extra.manifests_poll_interval <= 3600:
        problems.append("must be in (0, 3600] @ $.trioCloudHub.manifestsPollInterval")
    if extra.ack_timeout_seconds <= 0 or extra.ack_max_sends <= 0:
        problems.append("must be > 0 @ $.trioCloudHub.ackTimeoutSeconds/ackMaxSends")
    if not 0 <= extra.reconcile_interval_seconds <= 86400:
        problems.append("must be in [0, 86400] @ $.trioCloudHub.reconcileIntervalSeconds")
    if min(extra.upstream_qps, extra.upstream_burst) < 0:
        problems.append("must be >= 0 @ $.trioCloudHub.upstreamQps/upstreamBurst")
    if min(extra.upstream_bytes_per_second, extra.upstream_bytes_burst) < 0:
        problems.append("must be >= 0 @ $.trioCloudHub.upstreamBytesPerSecond/upstreamBytesBurst")
    if extra.warning_period_seconds < 0:
        problems.append("must be >= 0 @ $.trioCloudHub.warningPeriodSeconds")
    if not 0 <= extra.drain_timeout_seconds <= 3600:
        problems.append("must be in [0, 3600] @ $.trioCloudHub.drainTimeoutSeconds")
    if not 1 <= extra.workers <= MAX_WORKERS:
        problems.append(f"must be in [1, {MAX_WORKERS}] @ $.trioCloudHub.workers")
    return problems


def _is_host_port(text: str) -> bool:
    host, colon, port = text.rpartition(":")
    # isdigit() alone accepts "²" and 5,000 digits, which int() refuses.
    digits = port.isascii() and port.isdigit() and len(port) <= 5
    return bool(colon and host) and digits and int(port) <= 65535


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def dump_config(config: Config) -> str:
    """The effective configuration as CloudCore YAML (used by `config --defaults`)."""
    data = _converter.unstructure(config)
    return str(yaml.safe_dump(data, sort_keys=False))


def evolve(config: Config, **changes: Any) -> Config:
    """Override our own section's fields (command-line flags win over the file)."""
    extra = attrs.evolve(config.trio_cloud_hub, **changes)
    return attrs.evolve(config, trio_cloud_hub=extra)
