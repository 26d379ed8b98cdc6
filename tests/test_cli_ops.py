"""CloudCore's command-line conventions: --minconfig, --defaultconfig, -v, ignored modules."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_cloudhub.cli import _verbosity
from trio_cloudhub.config import Config, parse_config


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trio_cloudhub", *args]


async def printed(*args: str) -> str:
    result = await trio.run_process(cli(*args), capture_stdout=True, capture_stderr=True)
    return str(result.stdout.decode())


async def test_defaultconfig_is_every_default_and_parses_back() -> None:
    text = await printed("--defaultconfig")
    assert parse_config(text, "defaultconfig") == Config()
    assert "monitorServer" in text and "bindAddress: 127.0.0.1:9091" in text


async def test_minconfig_parses_and_uses_the_embedded_store() -> None:
    config = parse_config(await printed("--minconfig"), "minconfig")
    assert config.store_kind == "local"
    assert config.cloud_hub.websocket.port == 10000


async def test_serve_accepts_the_defaultconfig_unchanged(tmp_path: Path) -> None:
    config = tmp_path / "cloudcore.yaml"
    config.write_text(await printed("--defaultconfig"))
    command = cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stderr is not None
    log = b""
    try:
        with trio.fail_after(30):
            while b"serving:" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, log.decode()
                log += chunk
        assert re.search(rb"websocket port 10000, https port 10002", log), log
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sections_of_other_cloudcore_modules_are_named_once(tmp_path: Path) -> None:
    config = tmp_path / "cloudcore.yaml"
    config.write_text(
        "apiVersion: cloudcore.config.kubeedge.io/v1alpha2\n"
        "kind: CloudCore\n"
        "commonConfig: {tunnelPort: 10350}\n"
        "modules:\n"
        "  edgeController: {enable: true, buffer: {updatePodStatus: 1024}}\n"
        "  cloudStream: {enable: false}\n"
        "  cloudHub: {websocket: {port: 0}, https: {port: 0}, unixsocket: {enable: false}}\n"
    )
    command = cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    assert process.stderr is not None
    log = b""
    try:
        with trio.fail_after(30):
            while b"serving:" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, log.decode()
                log += chunk
    finally:
        process.kill()
        await process.wait()
    warnings = [line for line in log.decode().splitlines() if "accepted but not used" in line]
    assert len(warnings) == 1
    for path in ("$.commonConfig.tunnelPort", "$.modules.edgeController", "$.modules.cloudStream"):
        assert path in warnings[0]


@pytest.mark.parametrize(("text", "value"), [("4", 4), ("=2", 2), ("10", 10)])
def test_klog_verbosity_spellings(text: str, value: int) -> None:
    assert _verbosity(text) == value


def test_a_bad_verbosity_is_refused() -> None:
    with pytest.raises(Exception, match="verbosity must be a number"):
        _verbosity("loud")


def test_serve_raises_its_open_files_limit_to_the_hard_limit() -> None:
    """Each edge holds a socket: the hub takes the soft limit up to the hard one, and says so
    (and warns when the hard limit cannot hold nodeLimit edges)."""
    import subprocess
    import sys

    script = (
        "import logging, resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from trio_cloudhub.cli import raise_open_files_limit\n"
        "new = raise_open_files_limit(10)\n"
        "assert new == resource.getrlimit(resource.RLIMIT_NOFILE)[0], new\n"
        "print('soft', new, 'hard', hard)\n"
        "raise_open_files_limit(new + 1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    soft, hard = (int(word) for word in result.stdout.split()[1::2])
    assert soft == hard or hard == -1  # RLIM_INFINITY: raised to a large finite value
    assert f"open files limit raised from 64 to {soft}" in result.stderr
    assert "is below nodeLimit" in result.stderr
