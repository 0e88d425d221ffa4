"""Listening sockets: TCP on listen_addr:listen_port and the Unix socket .s.PGSQL.<port>."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from pgmux.net.client import ClientConnection

if TYPE_CHECKING:
    from pgmux.pooler import Pooler


def unix_socket_path(socket_dir: str, port: int) -> str:
    return os.path.join(socket_dir, f".s.PGSQL.{port}")


async def start_listeners(pooler: Pooler) -> list[asyncio.AbstractServer]:
    """Bind every configured address; raises OSError (with the address) when one cannot be bound."""
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
    socket_dir = s.unix_socket_dir
    if socket_dir and not socket_dir.startswith("@"):
        path = unix_socket_path(socket_dir, s.listen_port)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a previous run
        srv = await loop.create_unix_server(
            lambda: ClientConnection(pooler, is_unix=True), path, backlog=s.listen_backlog
        )
        os.chmod(path, s.unix_socket_mode)
        servers.append(srv)
    elif socket_dir:
        path = "\0" + unix_socket_path(socket_dir[1:], s.listen_port)
        servers.append(await loop.create_unix_server(lambda: ClientConnection(pooler, is_unix=True), path))
    if not servers:
        raise OSError("nothing to listen on: set listen_addr or unix_socket_dir")
    return servers
