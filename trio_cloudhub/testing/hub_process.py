"""The real `python -m trio_cloudhub serve` as a subprocess, for tests that stop, kill and
restart it with the same data directory on the same ports.

    async with hub_process(tmp_path, cloud_hub={"writeTimeout": 2}) as hub:
        token = await hub.token()
        ...
        hub.kill()                      # SIGKILL: a crash
        await hub.wait()
        await hub.start()               # same config, data dir, manifests and ports
        assert await hub.terminate() == 0   # SIGTERM: drain, exit status

- The two ports are picked up front (`free_ports`) below the ephemeral port range, so no
  outgoing socket of an edge can hold one of them while the hub is down and a restarted hub
  binds them again (its listeners set SO_REUSEADDR).
- Certificates are generated under `<data dir>/pki` on the first start and reused after.
- Every lifetime's stderr (the log, level INFO unless set otherwise) is appended to
  `hub.log`, with a `=== hub_process:` marker line before each start: a test reads it with
  `log_text()` / `wait_for_log()`. A file, not a pipe, so a chatty hub never blocks on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import trio
import yaml

HOST = "127.0.0.1"
READY_LINE = "serving: websocket port"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
MARKER = "=== hub_process:"


class HubProcessError(Exception):
    """The hub did not start, or did not stop when asked."""


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct ports free on `host` now, below the ephemeral range (see above)."""
    low = 32768
    with suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    found: list[int] = []
    # Deterministic order would make parallel test runs collide; start at a pid-based offset.
    span = max(1, low - 1 - 10_000)
    start = (os.getpid() * 7919) % span
    for step in range(span):
        port = 10_000 + (start + step) % span
        if port in found:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise HubProcessError(f"no {count} free ports below {low}")


def hub_config(
    websocket_port: int,
    https_port: int,
    pki: Path,
    *,
    cloud_hub: Mapping[str, Any] | None = None,
    trio_cloud_hub: Mapping[str, Any] | None = None,
    top: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A CloudCore config on `HOST` with fixed ports; `cloud_hub` / `trio_cloud_hub` add or
    replace keys of `modules.cloudHub` / `trioCloudHub`, `top` top-level sections (such as
    `kubeAPIConfig`)."""
    hub: dict[str, Any] = {
        "advertiseAddress": [HOST],
        "tlsCAFile": str(pki / "rootCA.crt"),
        "tlsCAKeyFile": str(pki / "rootCA.key"),
        "tlsCertFile": str(pki / "server.crt"),
        "tlsPrivateKeyFile": str(pki / "server.key"),
        "websocket": {"address": HOST, "port": websocket_port},
        "https": {"address": HOST, "port": https_port},
        "unixsocket": {"enable": False},
    }
    hub.update(cloud_hub or {})
    extra: dict[str, Any] = {"manifestsPollInterval": 0.05, "logLevel": "INFO"}
    extra.update(trio_cloud_hub or {})
    return {
        "apiVersion": "cloudcore.config.kubeedge.io/v1alpha1",
        "kind": "CloudCore",
        # Any free port: several hubs (tests, benches) must not fight over 9091.
        "commonConfig": {"monitorServer": {"bindAddress": f"{HOST}:0"}},
        "modules": {"cloudHub": hub},
        "trioCloudHub": extra,
        **(top or {}),
    }


class HubProcess:
    """One hub installation in `root` (config, data dir, manifests, log), run as a subprocess
    any number of times, one at a time."""

    def __init__(
        self,
        root: Path,
        *,
        cloud_hub: Mapping[str, Any] | None = None,
        trio_cloud_hub: Mapping[str, Any] | None = None,
        top: Mapping[str, Any] | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = self.root / "cloudcore.yaml"
        self.data_dir = self.root / "data"
        self.manifests = self.root / "manifests"
        self.log_path = self.root / "hub.log"
        if ports is None:
            websocket_port, https_port = free_ports(2)
            ports = (websocket_port, https_port)
        self.websocket_port, self.https_port = ports
        self.process: trio.Process | None = None
        self.starts = 0
        self.exit_codes: list[int] = []
        self._log_offset = 0  # where the current lifetime's log begins
        self.manifests.mkdir(parents=True, exist_ok=True)
        config = hub_config(
            self.websocket_port,
            self.https_port,
            # Not KubeEdge's /etc paths: certificates come from <data dir>/pki.
            self.root / "no-pki",
            cloud_hub=cloud_hub,
            trio_cloud_hub=trio_cloud_hub,
            top=top,
        )
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "trio_cloudhub", *args, "--config", str(self.config)]

    def mark(self, text: str) -> None:
        with self.log_path.open("a") as file:
            file.write(f"{MARKER} {text}\n")

    async def start(self, within: float = START_TIMEOUT) -> None:
        """Start `serve` and wait until it logs that it serves (both ports bound)."""
        if self.running:
            raise HubProcessError("the hub is already running")
        self.starts += 1
        self.mark(f"start #{self.starts}")
        self._log_offset = self.log_path.stat().st_size
        command = [*self.command("serve"), "--data-dir", str(self.data_dir)]
        command += ["--manifests", str(self.manifests)]
        with self.log_path.open("ab") as stderr:
            self.process = await trio.lowlevel.open_process(
                command,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        with trio.move_on_after(within):
            while READY_LINE not in self.log_text():
                code = self.process.poll()
                if code is not None:
                    self.exit_codes.append(code)
                    raise HubProcessError(f"hub exited with {code}:\n{self.log_text()}")
                await trio.sleep(0.02)
            return
        self.kill()
        await self.wait()
        raise HubProcessError(f"hub not serving within {within} s:\n{self.log_text()}")

    def log_text(self, *, all_lifetimes: bool = False) -> str:
        """The current (last) lifetime's log, or all of it."""
        with self.log_path.open("rb") as file:
            if not all_lifetimes:
                file.seek(self._log_offset)
            return file.read().decode("utf-8", "replace")

    async def wait_for_log(self, text: str, within: float, *, all_lifetimes: bool = False) -> str:
        """The first line of the log containing `text`; TimeoutError after `within` s."""
        with trio.move_on_after(within):
            while True:
                for line in self.log_text(all_lifetimes=all_lifetimes).splitlines():
                    if text in line:
                        return line
                await trio.sleep(0.05)
        raise TimeoutError(f"no log line with {text!r} within {within} s")

    def kill(self) -> None:
        """SIGKILL now (a crash); `wait()` for it to be gone."""
        if self.running:
            assert self.process is not None
            self.mark(f"SIGKILL to pid {self.process.pid}")
            self.process.kill()

    def send_signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.mark(f"signal {signal.Signals(signum).name} to pid {self.process.pid}")
            self.process.send_signal(signum)

    async def wait(self) -> int:
        """The exit status of the current process (negative: killed by that signal)."""
        if self.process is None:
            raise HubProcessError("the hub was never started")
        code = await self.process.wait()
        if len(self.exit_codes) < self.starts:
            self.exit_codes.append(code)
            self.mark(f"pid {self.process.pid} exited with {code}")
        return code

    async def terminate(self, within: float = STOP_TIMEOUT) -> int:
        """SIGTERM (graceful drain) and the exit status; SIGKILL and an error after `within` s."""
        self.send_signal(signal.SIGTERM)
        with trio.move_on_after(within):
            return await self.wait()
        self.kill()
        await self.wait()
        raise HubProcessError(f"hub did not exit within {within} s of SIGTERM")

    async def aclose(self) -> None:
        """Kill the hub if it still runs (the end of a test, whatever happened)."""
        with trio.CancelScope(shield=True):
            if self.running:
                self.kill()
            if self.process is not None:
                await self.wait()

    async def cli(self, *args: str) -> str:
        """Run another command (`token`, `get nodes`) on the same config and data dir."""
        command = [*self.command(*args), "--data-dir", str(self.data_dir)]
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
        return str(result.stdout.decode())

    async def token(self) -> str:
        return (await self.cli("token")).strip()


@asynccontextmanager
async def hub_process(
    root: Path,
    *,
    cloud_hub: Mapping[str, Any] | None = None,
    trio_cloud_hub: Mapping[str, Any] | None = None,
    top: Mapping[str, Any] | None = None,
    start: bool = True,
) -> AsyncIterator[HubProcess]:
    """A `HubProcess` in `root`, started unless `start=False`, killed on exit if running."""
    hub = HubProcess(root, cloud_hub=cloud_hub, trio_cloud_hub=trio_cloud_hub, top=top)
    try:
        if start:
            await hub.start()
        yield hub
    finally:
        await hub.aclose()
