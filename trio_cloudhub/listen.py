"""TCP listeners that several processes can share (`serve --workers N`).

With SO_REUSEPORT every worker binds its own listening socket to the same port and the
kernel spreads new connections over them by a hash of the peer's address, so no process
wakes for a connection another one takes (a shared inherited socket wakes them all).
"""

from __future__ import annotations

import socket

import trio

BACKLOG = 0xFFFF  # the kernel caps it at net.core.somaxconn


async def open_tcp_listeners(
    port: int, host: str | None, *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners`, with SO_REUSEPORT on every socket when `reuse_port`."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host or None)
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("SO_REUSEPORT is not available on this system (needed by workers > 1)")
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
