"""Micro-benchmark of the server-side WebSocket receive path: CPU µs per keepalive frame.

    python -m bench.ws_receive [--frames N] [--rate R] [--decode] [--only tls|memory]

Cases (one JSON line each, `us_per_frame` = CPU time of this process / frames):
- `tls-paced`: the real `serve_websocket` on loopback over TLS; a client in a child process
  sends N EdgeCore keepalives, each its own TLS record, R per second (default 2,000: every frame
  is a wake-up of its own, as with an idle fleet). The CPU is this (server) process's only.
- `tls-burst`: the same, frames sent back to back (many frames per TLS record and read).
- `memory-single` / `memory-burst`: no TLS and no socket: a fake stream hands
  `WebSocketConnection.receive()` one frame per read, or 64 KiB of frames per read; this is the
  framing alone, plus one trio checkpoint per read.
`--decode` also runs `codec.decode` and `classify_upstream` on each message, as the session does.
Only the package's public classes are used, so the same script measures an older checkout
(`PYTHONPATH=<checkout> python -m bench.ws_receive`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from trio_cloudhub.core import codec
from trio_cloudhub.core.rules import classify_upstream
from trio_cloudhub.edge.base import EdgeConnection, EdgeDisconnected
from trio_cloudhub.edge.websocket import WebSocketConnection, connect_websocket, serve_websocket
from trio_cloudhub.pki.certs import cert_pem, generate_ca, generate_server_cert, key_pem
from trio_cloudhub.testing.edge_sim import keepalive_message

MAX_MESSAGE = 64 * 1024 * 1024
BURST_CHUNK = 64 * 1024


def keepalive_frames(count: int) -> list[bytes]:
    """Masked client frames of distinct keepalives, as gorilla sends them (one frame each)."""
    framer = Connection(ConnectionType.CLIENT)
    return [framer.send(TextMessage(data=codec.encode(keepalive_message()))) for _ in range(count)]


def chunks_of(frames: list[bytes], size: int) -> Iterator[bytes]:
    joined = b"".join(frames)
    for start in range(0, len(joined), size):
        yield joined[start : start + size]


def consume(message: str | bytes, decode: bool) -> None:
    if decode:
        classify_upstream(codec.decode(message, MAX_MESSAGE))


def result(case: str, frames: int, cpu: float, wall: float, decode: bool) -> dict[str, object]:
    return {
        "case": case,
        "frames": frames,
        "decode": decode,
        "us_per_frame": round(cpu / frames * 1e6, 2),
        "frames_per_s": round(frames / wall),
    }


# --- no TLS: a fake stream --------------------------------------------------------------------


class FeedStream(trio.abc.Stream):
    """Hands out prepared chunks, one per read (with a checkpoint, as a real read has)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return next(self._chunks, b"")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def run_memory(frames: list[bytes], burst: bool, decode: bool) -> dict[str, object]:
    chunks = chunks_of(frames, BURST_CHUNK) if burst else iter(frames)
    connection = WebSocketConnection(
        FeedStream(chunks),
        Connection(ConnectionType.SERVER),
        node_id="bench",
        project_id="bench",
        remote="memory",
        max_message_size=MAX_MESSAGE,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(len(frames)):
        consume(await connection.receive(), decode)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    case = "memory-burst" if burst else "memory-single"
    return result(case, len(frames), cpu, wall, decode)


# --- real TLS on loopback, the client in another process ---------------------------------------


def server_context(folder: Path) -> ssl.SSLContext:
    now = datetime.datetime.now(datetime.UTC)
    ca = generate_ca(now)
    server = generate_server_cert(ca, now, ["127.0.0.1"], [])
    (folder / "server.crt").write_bytes(cert_pem(server.cert_der))
    (folder / "server.key").write_bytes(key_pem(server.key_der))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.crt", folder / "server.key")
    return context


async def run_tls(frames: int, rate: float, decode: bool) -> dict[str, object]:
    done = trio.Event()
    figures: dict[str, float] = {}

    async def handler(connection: EdgeConnection) -> None:
        await connection.receive()  # "start": the handshake and the first read are behind us
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(frames):
            consume(await connection.receive(), decode)
        figures["cpu"] = time.process_time() - cpu
        figures["wall"] = time.perf_counter() - wall
        done.set()
        with trio.move_on_after(5):
            with contextlib.suppress(EdgeDisconnected):
                await connection.receive()  # the client's close

    with tempfile.TemporaryDirectory(prefix="ws-receive-") as folder:
        context = server_context(Path(folder))
        async with trio.open_nursery() as nursery:
            serve = partial(
                serve_websocket,
                handler,
                ssl_context=context,
                host="127.0.0.1",
                port=0,
                max_message_size=MAX_MESSAGE,
            )
            port: int = await nursery.start(serve)
            command = [sys.executable, "-m", "bench.ws_receive", "--client", str(port)]
            command += ["--frames", str(frames), "--rate", str(rate)]
            client = await trio.lowlevel.open_process(command)
            try:
                with trio.fail_after(60 + (frames / rate if rate else 0)):
                    await done.wait()
                    await client.wait()
            finally:
                if client.returncode is None:
                    client.kill()
            nursery.cancel_scope.cancel()
    case = "tls-paced" if rate else "tls-burst"
    return {**result(case, frames, figures["cpu"], figures["wall"], decode), "rate": rate}


async def client_main(port: int, frames: int, rate: float) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    prepared = keepalive_frames(frames)
    connection = await connect_websocket(
        "127.0.0.1",
        port,
        ssl_context=context,
        path="/e632aba927ea4ac2b575ec1603d56f10/bench/events",
        headers=[("Node_id", "bench"), ("Project_id", "bench")],
    )
    await connection.send("start")
    await trio.sleep(0.2)
    if rate:
        start = trio.current_time()
        for index, frame in enumerate(prepared):
            await trio.sleep_until(start + index / rate)
            await connection.send_raw(frame)
    else:
        for chunk in chunks_of(prepared, BURST_CHUNK):
            await connection.send_raw(chunk)
    await trio.sleep(0.5)
    await connection.aclose()


async def main(args: argparse.Namespace) -> None:
    if args.only in ("", "memory"):
        frames = keepalive_frames(args.frames)
        for burst in (False, True):
            print(json.dumps(await run_memory(frames, burst, args.decode)), flush=True)
    if args.only in ("", "tls"):
        for rate in (args.rate, 0.0):
            print(json.dumps(await run_tls(args.frames, rate, args.decode)), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="paced frames per second")
    parser.add_argument("--decode", action="store_true", help="also codec.decode + classify")
    parser.add_argument("--only", choices=["", "tls", "memory"], default="")
    parser.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.client:
        trio.run(client_main, arguments.client, arguments.frames, arguments.rate)
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        trio.run(main, arguments)
