"""Issue 14: plain-HTTP probes in a thread of their own answer while the HTTPS port is flooded."""

from __future__ import annotations

import socket
import threading
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.http.test_http_flood import raise_open_files, start_hub
from trio_cloudhub.config import ConfigError, parse_config
from trio_cloudhub.http import probes
from trio_cloudhub.http.probes import ProbeState, serve_probes
from trio_cloudhub.testing.flood import client_hello


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """A blocking HTTP/1.1 request, as a kubelet probe (run in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: hub\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def probe(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    return await trio.to_thread.run_sync(get, port, path, method)


async def test_probes_answer_readiness_and_liveness(nursery: trio.Nursery) -> None:
    ready = [False]
    port = await nursery.start(partial(serve_probes, "127.0.0.1:0", lambda: ready[0]))
    with trio.fail_after(20):
        assert await probe(port, "/livez") == (200, b"ok")
        assert await probe(port, "/readyz") == (503, b"not ready")
        ready[0] = True
        await trio.sleep(2 * probes.HEARTBEAT)
        assert await probe(port, "/readyz") == (200, b"ok")
        assert (await probe(port, "/ca.crt"))[0] == 404
        assert (await probe(port, "/readyz", "POST"))[0] == 405
        assert await probe(port, "/readyz", "HEAD") == (200, b"")


def test_a_stalled_loop_fails_both_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ProbeState()
    state.update(True)
    assert state.answer("/readyz") == (200, b"ok")
    monkeypatch.setattr(probes, "STALE", -1.0)  # as if the loop had not beaten for long
    assert state.answer("/readyz")[0] == 503
    assert state.answer("/livez")[0] == 503


async def test_the_thread_ends_when_cancelled() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_probes, "127.0.0.1:0", None))
            assert await probe(port, "/livez") == (200, b"ok")
            nursery.cancel_scope.cancel()
    assert not any(thread.name == "probes" for thread in threading.enumerate())
    with pytest.raises(OSError):
        get(port, "/livez")


async def test_probe_answers_while_2000_connections_flood_the_https_port(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    raise_open_files(2 * 2000 + 300)
    hub = await start_hub(nursery, tmp_path)
    port = await nursery.start(partial(serve_probes, "127.0.0.1:0", lambda: True))
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(60):
            hello = client_hello()
            for index in range(2000):  # half TCP only, half a TLS hello and nothing more
                stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
                if index % 2:
                    await stream.send_all(hello)
                idle.append(stream)
            for _ in range(5):
                assert await probe(port, "/readyz") == (200, b"ok")
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)


def test_the_probe_address_is_checked() -> None:
    text = "apiVersion: cloudcore.config.kubeedge.io/v1alpha1\nkind: CloudCore\n"
    config = parse_config(text + "trioCloudHub:\n  probeBindAddress: 0.0.0.0:10003\n")
    assert config.trio_cloud_hub.probe_bind_address == "0.0.0.0:10003"
    with pytest.raises(ConfigError, match="probeBindAddress"):
        parse_config(text + "trioCloudHub:\n  probeBindAddress: nonsense\n")
