"""Listening sockets: TCP on listen_addr:listen_port and the Unix socket .s.PGSQL.<port>.

With one process (`workers = 1`) `start_listeners` binds them on the event loop. With several,
the supervisor (pgmux/workers.py) binds them before forking with `bind_worker_sockets`: one TCP
socket per worker and address, all with SO_REUSEPORT so the kernel spreads connections over the
workers, and one Unix socket shared by all of them (SO_REUSEPORT does not balance Unix sockets).
Binding in the parent reports a taken port at start, as one process does, and lets a respawned
worker take over its predecessor's socket with the connections queued on it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgmux.net.client import ClientConnection

if TYPE_CHECKING:
    from pgmux.pooler import Pooler


def unix_socket_path(socket_dir: str, port: int) -> str:
    return os.path.join(socket_dir, f".s.PGSQL.{port}")


@dataclass
class BoundSockets:
    """Sockets bound before fork: `tcp[i]` are worker i's own, `unix` is shared by all."""

    tcp: list[list[socket.socket]] = field(default_factory=list)
    unix: socket.socket | None = None
    unix_path: str | None = None  # a filesystem path to unlink at exit (None: abstract or none)

    def keep_only(self, index: int) -> None:
        """In worker `index`: close the other workers' TCP sockets, so a socket is really closed
        (and leaves the SO_REUSEPORT group) when its own worker closes it at shutdown."""
        for i, socks in enumerate(self.tcp):
            if i != index:
                for sock in socks:
                    sock.close()

    def close_tcp(self) -> None:
        for socks in self.tcp:
            for sock in socks:
                sock.close()

    def close_all(self) -> None:
        self.close_tcp()
        if self.unix is not None:
            self.unix.close()


async def start_listeners(pooler: Pooler, bound: BoundSockets | None = None,
                          index: int = 0) -> list[asyncio.AbstractServer]:
    """Bind every configured address; raises OSError (with the address) when one cannot be bound.
    A worker passes the sockets its supervisor bound (`bound`, its `index`) instead."""
    if bound is not None:
        return await _serve_bound(pooler, bound, index)
    s = pooler.settings
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    addrs = [a.strip() for a in s.listen_addr if a.strip()]
    for addr in addrs:
        host = None if addr == "*" else addr
        try:
            srv = await loop.create_server(
                lambda: ClientConnection(pooler), host, s.listen_port,
                reuse_address=True, reuse_port=bool(s.so_reuseport) or None, backlog=s.listen_backlog,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"could not bind {addr}:{s.listen_port}: {exc.strerror}") from exc
        servers.append(srv)
    if s.unix_socket_dir:
        sock, _ = _bind_unix(s.unix_socket_dir, s)
        servers.append(await loop.create_unix_server(lambda: ClientConnection(pooler, is_unix=True),
                                                     sock=sock, backlog=s.listen_backlog))
    if not servers:
        raise OSError("nothing to listen on: set listen_addr or unix_socket_dir")
    return servers


async def _serve_bound(pooler: Pooler, bound: BoundSockets, index: int) -> list[asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    backlog = pooler.settings.listen_backlog
    servers: list[asyncio.AbstractServer] = []
    for sock in bound.tcp[index]:
        servers.append(await loop.create_server(lambda: ClientConnection(pooler), sock=sock, backlog=backlog))
    if bound.unix is not None:
        servers.append(await loop.create_unix_server(lambda: ClientConnection(pooler, is_unix=True),
                                                     sock=bound.unix, backlog=backlog))
    return servers


def bind_worker_sockets(settings: Any, workers: int) -> BoundSockets:
    """Bind the listening sockets of `workers` processes (see the module docstring); raises
    OSError naming the address, after closing what was bound."""
    bound = BoundSockets()
    try:
        addrs = [a.strip() for a in settings.listen_addr if a.strip()]
        for index in range(workers):
            socks: list[socket.socket] = []
            bound.tcp.append(socks)
            for addr in addrs:
                # Without so_reuseport a port someone else listens on is refused, as with one process.
                exclusive = index == 0 and not settings.so_reuseport
                socks.extend(_bind_tcp(addr, settings.listen_port, settings.listen_backlog, exclusive))
        socket_dir = settings.unix_socket_dir
        if socket_dir:
            bound.unix, bound.unix_path = _bind_unix(socket_dir, settings)
        if not bound.unix and not addrs:
            raise OSError("nothing to listen on: set listen_addr or unix_socket_dir")
    except BaseException:
        bound.close_all()
        raise
    return bound


def _bind_tcp(addr: str, port: int, backlog: int, exclusive: bool) -> list[socket.socket]:
    """Every address `addr` resolves to (`*`: all of them, v4 and v6), with SO_REUSEPORT;
    `exclusive`: first check that no other socket listens there (even with SO_REUSEPORT)."""
    host = None if addr == "*" else addr
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        seen = set()
        for family, type_, proto, _canon, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            if exclusive:
                with socket.socket(family, type_, proto) as probe:
                    _bind_options(probe, family, reuse_port=False)
                    probe.bind(sockaddr)
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            _bind_options(sock, family, reuse_port=True)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise OSError(exc.errno, f"could not bind {addr}:{port}: {exc.strerror}") from exc
    return socks


def _bind_options(sock: socket.socket, family: int, reuse_port: bool) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _bind_unix(socket_dir: str, settings: Any) -> tuple[socket.socket, str | None]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if socket_dir.startswith("@"):
            sock.bind("\0" + unix_socket_path(socket_dir[1:], settings.listen_port))
            path = None
        else:
            path = unix_socket_path(socket_dir, settings.listen_port)
            if os.path.exists(path):
                os.unlink(path)  # a stale socket from a previous run
            sock.bind(path)
            os.chmod(path, settings.unix_socket_mode)
        sock.listen(settings.listen_backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, path
