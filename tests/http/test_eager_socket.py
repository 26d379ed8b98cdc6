"""`EagerSocketStream`: the HTTPS port's socket, yielding only when it must wait."""

from __future__ import annotations

import socket

import pytest
import trio

from trio_cloudhub.http.tls import FAIRNESS_CALLS, EagerSocketStream


def socket_pair() -> tuple[EagerSocketStream, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    return EagerSocketStream(ours), theirs


async def rounds_taken(*, calls: int) -> int:
    """Scheduler rounds a competing task saw while `calls` sends ran that never wait."""
    stream, peer = socket_pair()
    seen = 0

    async def competitor() -> None:
        nonlocal seen
        while True:
            await trio.lowlevel.checkpoint()
            seen += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(competitor)
        await trio.lowlevel.checkpoint()  # the competitor runs once
        seen = 0
        for _ in range(calls):
            await stream.send_all(b"x")
        nursery.cancel_scope.cancel()
    peer.close()
    await stream.aclose()
    return seen


async def test_calls_that_need_not_wait_yield_once_per_fairness_window() -> None:
    calls = FAIRNESS_CALLS * 4
    assert await rounds_taken(calls=calls) <= calls // FAIRNESS_CALLS + 1


async def test_a_cancelled_call_raises_although_it_need_not_wait() -> None:
    stream, peer = socket_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.send_all(b"never")
        raise AssertionError("not cancelled")
    with pytest.raises(BlockingIOError):  # nothing to read: the send did not happen
        peer.recv(16)
    await stream.aclose()
    peer.close()


async def test_receive_waits_for_data_and_reports_eof() -> None:
    stream, peer = socket_pair()
    async with trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.sleep(0.05)
            peer.send(b"hello")
            await trio.sleep(0.05)
            peer.close()

        nursery.start_soon(later)
        with trio.fail_after(5):
            assert await stream.receive_some() == b"hello"
            assert await stream.receive_some() == b""
    await stream.aclose()


async def test_a_send_larger_than_the_kernel_takes_waits_until_all_is_read() -> None:
    stream, peer = socket_pair()
    data = bytes(range(256)) * 16_384  # 4 MiB, far above the socket buffers
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(data):
            await trio.lowlevel.wait_readable(peer)
            received.extend(peer.recv(1 << 20))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await stream.send_all(data)
    assert bytes(received) == data
    await stream.aclose()
    peer.close()


async def test_after_aclose_calls_raise_closed() -> None:
    stream, peer = socket_pair()
    await stream.aclose()
    await stream.aclose()  # twice is fine
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    peer.close()


async def test_a_reset_connection_is_broken_not_an_os_error() -> None:
    stream, peer = socket_pair()
    peer.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first sends may still be taken by the kernel
            await stream.send_all(b"x" * 65536)
    await stream.aclose()
