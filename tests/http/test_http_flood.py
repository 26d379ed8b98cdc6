"""Issue 14: idle and slow clients on the HTTPS port never make a probe or an edge wait.

Before: 256 connection slots, each held up to the 10 s handshake timeout, so 2,000 sockets
that never sent a TLS hello kept `/readyz` from answering for over a minute.
"""

from __future__ import annotations

import resource
import ssl
from functools import partial
from pathlib import Path

import trio

from tests.http.test_http_server import Hub, fetch
from trio_cloudhub.config import CloudHub, Config, Https, Modules
from trio_cloudhub.http.certs_store import new_token_keeper, prepare_credentials
from trio_cloudhub.http.server import serve_https
from trio_cloudhub.netlimits import MAX_WAITING_PER_SOURCE
from trio_cloudhub.testing.edge_sim import https_get

IDLE = 1500  # above the per-source bound, so the oldest get closed


def raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def start_hub(nursery: trio.Nursery, tmp_path: Path) -> Hub:
    absent = tmp_path / "etc"
    config = Config(
        modules=Modules(
            cloud_hub=CloudHub(
                tls_ca_file=str(absent / "ca.crt"),
                tls_ca_key_file=str(absent / "ca.key"),
                tls_cert_file=str(absent / "server.crt"),
                tls_private_key_file=str(absent / "server.key"),
                advertise_address=("127.0.0.1",),
                https=Https(address="127.0.0.1", port=0),
            )
        )
    )
    credentials = prepare_credentials(config, tmp_path / "data")
    keeper = new_token_keeper(credentials, config)
    hub = Hub(0, credentials, keeper, tmp_path)
    hub.port = await nursery.start(partial(serve_https, credentials, keeper, config))
    return hub


async def test_idle_connections_never_delay_a_probe(nursery: trio.Nursery, tmp_path: Path) -> None:
    raise_open_files(2 * IDLE + 200)
    hub = await start_hub(nursery, tmp_path)
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(60):
            for _ in range(IDLE):  # TCP only, never a TLS hello
                idle.append(await trio.open_tcp_stream("127.0.0.1", hub.port))
            await trio.sleep(0.5)
        # Far inside the 10 s handshake timeout of those idle sockets, and with the oldest
        # of them past the per-source bound: a new client is served at once.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with trio.fail_after(5):
            status, body = await https_get("127.0.0.1", hub.port, "/readyz", context)
        assert (status, body) == (200, b"ok")
        with trio.fail_after(5):
            assert (await fetch(hub, "/ca.crt")).body == hub.credentials.ca_der
        # The oldest idle ones were closed to make room (EOF at once), the newest still wait.
        with trio.fail_after(10):
            assert await idle[0].receive_some(1) == b""
        with trio.move_on_after(0.2) as still_waiting:
            await idle[-1].receive_some(1)
        assert still_waiting.cancelled_caught
        assert IDLE > MAX_WAITING_PER_SOURCE
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)


async def test_a_crowd_gets_shorter_handshake_deadlines(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    raise_open_files(800)
    hub = await start_hub(nursery, tmp_path)
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(30):
            for _ in range(300):
                idle.append(await trio.open_tcp_stream("127.0.0.1", hub.port))
            began = trio.current_time()
            # 300 waiting: the newest get about 10 s * 64 / 300 ≈ 2 s, not 10 s.
            assert await idle[-1].receive_some(1) == b""
            assert trio.current_time() - began < 8
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)
