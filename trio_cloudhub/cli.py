"""The `trio-cloudhub` command: serve, token, get, config.

These names and flags are what scripts and the container call; keep them stable.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import attrs
import trio

from trio_cloudhub.cli_get import OUTPUTS, HubNotReachable, get
from trio_cloudhub.config import (
    API_VERSION,
    MAX_CONFIG_BYTES,
    MAX_WORKERS,
    Config,
    ConfigError,
    dump_config,
    evolve,
    parse_config,
)
from trio_cloudhub.http.certs_store import CredentialsError, current_token
from trio_cloudhub.http.kube_credentials import stored_kube_token
from trio_cloudhub.hub.claims import SupervisorGone, WorkerLink
from trio_cloudhub.hub.server import ServeInfo, serve
from trio_cloudhub.hub.supervisor import Supervisor
from trio_cloudhub.logs import level_for, setup_logging
from trio_cloudhub.metrics import Metrics, parse_bind_address, serve_metrics
from trio_cloudhub.store.base import StoreError

log = logging.getLogger("trio_cloudhub")


def default_data_dir() -> Path:
    """/var/lib/trio-cloudhub for root (servers, containers), else the user's state dir."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/trio-cloudhub")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "trio-cloudhub"


DEFAULT_CONFIG_PATH = "/etc/kubeedge/config/cloudcore.yaml"  # CloudCore's


def load_config(path: str | None) -> Config:
    """The file given, else CloudCore's default path when it exists, else the defaults."""
    if path is None and os.path.isfile(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is None:
        return parse_config("", "<defaults>")
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, path)


def effective_config(args: argparse.Namespace) -> Config:
    """The file's settings with the command-line flags on top."""
    config = load_config(args.config)
    data_dir = args.data_dir or config.trio_cloud_hub.data_dir or str(default_data_dir())
    manifests = getattr(args, "manifests", None) or config.trio_cloud_hub.manifests_dir
    level = getattr(args, "log_level", None) or config.trio_cloud_hub.log_level
    workers = getattr(args, "workers", None) or config.trio_cloud_hub.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be in [1, {MAX_WORKERS}], not {workers}")
    return evolve(
        config,
        data_dir=str(Path(data_dir).expanduser()),
        manifests_dir=str(Path(manifests or Path(data_dir) / "manifests").expanduser()),
        log_level=level,
        workers=workers,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-cloudhub",
        description="KubeEdge CloudHub on trio: the cloud side of an edge fleet.",
    )
    # CloudCore's flags: print a configuration `serve --config` accepts unchanged.
    parser.add_argument(
        "--minconfig", action="store_true", help="print a minimal CloudCore config and exit"
    )
    parser.add_argument(
        "--defaultconfig", action="store_true", help="print the full default config and exit"
    )
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the hub")
    _common_flags(serve)
    serve.add_argument("--manifests", metavar="DIR", help="folder of manifests (embedded store)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    serve.add_argument(
        "-v",
        "--verbosity",
        type=_verbosity,
        metavar="N",
        help="klog-style level: 0-3 INFO (quiet in steady state), 4+ every message (DEBUG)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes serving edges on the same ports (default 1; one per core)",
    )
    # A worker of `--workers N`: its index and the file descriptor of its supervisor link.
    serve.add_argument("--worker", metavar="INDEX:FD", help=argparse.SUPPRESS)

    token = commands.add_parser("token", help="print a valid join token for edges")
    _common_flags(token)

    get = commands.add_parser(
        "get", help="show the nodes the running hub knows, or the pods edges reported"
    )
    get.add_argument("what", choices=("nodes", "pods"))
    _common_flags(get)
    get.add_argument("-o", "--output", choices=OUTPUTS, help="wide, json or yaml")
    get.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="URL",
        help="a hub's admin endpoint (its metrics server, e.g. http://127.0.0.1:9091); "
        "repeatable; default: the hubs announced in the data directory",
    )

    show = commands.add_parser("config", help="print the effective configuration as YAML")
    _common_flags(show)
    return parser


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="CloudCore-format YAML file")
    parser.add_argument("--data-dir", metavar="DIR", help="certificates, database, manifests")


def _verbosity(text: str) -> int:
    """`-v 4`, `-v4`, `-v=4` (klog's spelling) or `--verbosity=4`."""
    value = text.removeprefix("=")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"verbosity must be a number, not {text!r}")
    return int(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.minconfig or args.defaultconfig:
        print(MIN_CONFIG if args.minconfig else dump_config(Config()), end="")
        return 0
    if args.command is None:
        parser.error("a command is required (serve, token, get, config)")
    try:
        config = effective_config(args)
    except ConfigError as exc:
        print(f"trio-cloudhub: {exc}", file=sys.stderr)
        return 2
    handlers = {"serve": _serve, "token": _token, "get": _get, "config": _show_config}
    try:
        return handlers[args.command](config, args)
    except (ConfigError, CredentialsError, StoreError, HubNotReachable, OSError) as exc:
        print(f"trio-cloudhub: {exc}", file=sys.stderr)
        return 1


MIN_CONFIG = f"""\
# trio-cloudhub (KubeEdge CloudHub) minimal configuration; see --defaultconfig for every key.
apiVersion: {API_VERSION}
kind: CloudCore
kubeAPIConfig:
  # Empty: the embedded store (manifests + SQLite). Set kubeConfig (or master) for a cluster.
  kubeConfig: ""
  master: ""
modules:
  cloudHub:
    advertiseAddress: []   # the addresses edges reach the hub at; empty: this host's
    https:
      port: 10002
    websocket:
      port: 10000
    quic:
      enable: false
      port: 10001
    unixsocket:
      enable: false
"""


# The cyclic collector's thresholds for a hub process. With Python's (700, 10, 10) a hub
# holding thousands of sessions runs a full collection every few seconds while edges connect,
# each taking ~170 ms at 3,000 edges (measured: 7 full collections, 1.2 s, connecting 3,000
# edges; with these thresholds none, and 0.45 s of collection in all). Almost every object
# the hub makes is freed by its reference count; cycles are rare and small.
GC_THRESHOLDS = (20_000, 50, 100)


def _serve(config: Config, args: argparse.Namespace) -> int:
    level = level_for(args.verbosity, config.trio_cloud_hub.log_level)
    gc.set_threshold(*GC_THRESHOLDS)
    if args.worker:
        index, fd, ports = _worker_flag(args.worker)
        setup_logging(level, worker=str(index))
        # Ctrl-C reaches the whole process group: the supervisor turns it into one SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            trio.run(_serve_worker, _with_ports(config, ports), index, fd)
        except BaseExceptionGroup as group:
            failure = _single_failure(group)
            if isinstance(failure, SupervisorGone):
                log.error("worker %d: %s", index, failure)
                return 1
            raise failure from None
        return 0
    setup_logging(level)
    raise_open_files_limit(config.cloud_hub.node_limit)
    if config.trio_cloud_hub.workers > 1:
        try:
            return trio.run(_supervise, config, args.argv)
        except BaseExceptionGroup as group:
            raise _single_failure(group) from None
    if config.ignored:
        log.warning(
            "accepted but not used (CloudCore modules this hub does not run): %s",
            ", ".join(config.ignored),
        )
    try:
        trio.run(_serve_until_signal, config)
    except BaseExceptionGroup as group:
        raise _single_failure(group) from None
    return 0


# File descriptors the hub needs beside one per edge: listeners, SQLite, manifests, threads.
SPARE_FILES = 256


def raise_open_files_limit(node_limit: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every edge holds a socket); logs what
    it did, and warns when even the hard limit is below `nodeLimit`. The new soft limit."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        new = soft
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            new = wanted
        except (OSError, ValueError) as exc:
            log.warning("open files limit stays %d: cannot raise it to %d: %s", soft, wanted, exc)
            new = soft
    if new != soft:
        log.info("open files limit raised from %d to %d (the hard limit)", soft, new)
    if new != resource.RLIM_INFINITY and new < node_limit + SPARE_FILES:
        log.warning(
            "open files limit %d is below nodeLimit %d plus %d: connections beyond it fail "
            "(raise the hard limit, e.g. ulimit -Hn or LimitNOFILE)",
            new,
            node_limit,
            SPARE_FILES,
        )
    return int(new)


def _single_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A start-up failure the user should read plainly, out of trio's exception groups."""
    leaves = _leaves(group)
    expected = (ConfigError, CredentialsError, StoreError, OSError, SupervisorGone)
    return next((exc for exc in leaves if isinstance(exc, expected)), group)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _worker_flag_text(index: int, fd: int, ports: dict[str, int]) -> str:
    """INDEX:FD[:WEBSOCKET:HTTPS:QUIC] (the ports the first worker bound, when known)."""
    if not ports:
        return f"{index}:{fd}"
    return f"{index}:{fd}:{ports['websocket']}:{ports['https']}:{ports.get('quic', 0)}"


def _worker_flag(text: str) -> tuple[int, int, tuple[int, ...]]:
    parts = text.split(":")
    if len(parts) not in (2, 5) or not all(part.isdigit() for part in parts):
        raise ConfigError(f"--worker must be INDEX:FD[:WS:HTTPS:QUIC], not {text!r}")
    return int(parts[0]), int(parts[1]), tuple(int(part) for part in parts[2:])


def _with_ports(config: Config, ports: tuple[int, ...]) -> Config:
    """The ports the supervisor says (a configured port 0 means one port for all workers)."""
    if not ports:
        return config
    websocket, https, quic = ports
    hub = config.cloud_hub
    hub = attrs.evolve(
        hub,
        websocket=attrs.evolve(hub.websocket, port=websocket),
        https=attrs.evolve(hub.https, port=https),
        quic=attrs.evolve(hub.quic, port=quic or hub.quic.port),
    )
    return attrs.evolve(config, modules=attrs.evolve(config.modules, cloud_hub=hub))


async def _serve_worker(config: Config, index: int, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    link = WorkerLink(index, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    started: list[ServeInfo] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_on_signal, nursery.cancel_scope, started, (signal.SIGTERM,))
        info = await nursery.start(partial(serve, config, worker=link))
        started.append(info)
        log.info("worker %d ready: websocket port %d", index, info.websocket_port)
    log.info("worker %d stopped", index)


async def _supervise(config: Config, argv: Sequence[str]) -> int:
    """`serve --workers N`: start the workers, serve the metrics port, forward signals."""
    count = config.trio_cloud_hub.workers
    command = [sys.executable, "-m", "trio_cloudhub", *argv]
    supervisor = Supervisor(
        lambda index, fd, ports: [*command, "--worker", _worker_flag_text(index, fd, ports)],
        count,
        node_limit=config.cloud_hub.node_limit,
    )
    async with trio.open_nursery() as nursery:

        async def supervise(*, task_status: trio.TaskStatus[dict[str, int]]) -> None:
            try:
                await supervisor.run(task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()  # the workers are gone: so is the hub

        nursery.start_soon(_stop_on_signal, supervisor)
        ports = await nursery.start(supervise)
        if ports:
            metrics_port = await _start_supervisor_metrics(nursery, supervisor, config)
            _log_supervisor_ready(config, ports, metrics_port, count)
    log.info("stopped")
    return 0


async def _stop_on_signal(supervisor: Supervisor) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s received: draining every worker", signal.Signals(signum).name)
            supervisor.stop()


async def _start_supervisor_metrics(
    nursery: trio.Nursery, supervisor: Supervisor, config: Config
) -> int:
    """The configured metrics port, answering every worker's series (`worker` label)."""
    address = config.common_config.monitor_server.bind_address
    try:
        host, port = parse_bind_address(address)
        serve = partial(serve_metrics, Metrics(), host, port, exposition=supervisor.exposition)
        bound: int = await nursery.start(serve)
    except (OSError, ValueError) as exc:
        log.warning("metrics server not started on %s: %s", address, exc)
        return 0
    return bound


def _log_supervisor_ready(
    config: Config, ports: dict[str, int], metrics_port: int, count: int
) -> None:
    quic = f", quic port {ports['quic']} (udp, worker 0)" if ports.get("quic") else ""
    quic += f", metrics port {metrics_port}" if metrics_port else ""
    data_dir = config.trio_cloud_hub.data_dir
    log.info(
        "serving: websocket port %d, https port %d%s, %d workers, data dir %s, manifests %s",
        ports.get("websocket", 0),
        ports.get("https", 0),
        quic,
        count,
        data_dir,
        config.trio_cloud_hub.manifests_dir,
    )
    log.info("edges join with the token printed by: trio-cloudhub token --data-dir %s", data_dir)


async def _serve_until_signal(config: Config) -> None:
    started: list[ServeInfo] = []
    async with trio.open_nursery() as nursery:
        # Watch signals from the start: one that arrives during start-up stops it cleanly.
        nursery.start_soon(_drain_on_signal, nursery.cancel_scope, started)
        info = await nursery.start(serve, config)
        started.append(info)
        _log_ready(info)
    log.info("stopped")


async def _drain_on_signal(
    scope: trio.CancelScope,
    started: list[ServeInfo],
    wanted: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    with trio.open_signal_receiver(*wanted) as signals:
        async for signum in signals:
            log.info("%s received: draining", signal.Signals(signum).name)
            if started:
                await started[0].hub.drain()
            scope.cancel()
            return


def _log_ready(info: ServeInfo) -> None:
    quic = f", quic port {info.quic_port} (udp)" if info.quic_port else ""
    quic += f", metrics port {info.metrics_port}" if info.metrics_port else ""
    log.info(
        "serving: websocket port %d, https port %d%s, data dir %s, manifests %s",
        info.websocket_port,
        info.https_port,
        quic,
        info.data_dir,
        info.manifests_dir,
    )
    log.info(
        "edges join with the token printed by: trio-cloudhub token --data-dir %s", info.data_dir
    )


def _token(config: Config, args: argparse.Namespace) -> int:
    if config.store_kind == "kube":
        print(trio.run(stored_kube_token, config))  # what `keadm gettoken` prints
    else:
        print(current_token(Path(config.trio_cloud_hub.data_dir), config))
    return 0


def _get(config: Config, args: argparse.Namespace) -> int:
    printed = get(
        args.what,
        Path(config.trio_cloud_hub.data_dir),
        store_kind=config.store_kind,
        admin_urls=args.admin,
        output=args.output,
    )
    print(printed, end="")
    return 0


def _show_config(config: Config, args: argparse.Namespace) -> int:
    print(dump_config(config), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
