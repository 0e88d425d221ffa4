"""The engine's accept loop (Engine.listen): real listening sockets, no PostgreSQL, no Pooler.

Each connection is accepted in C, gets the socket options it was given, and reaches `on_accept`
with its addresses; out of descriptors, the engine accepts and closes one connection with its
spare descriptor (as libuv does) and says so once per batch, rather than spinning on a listening
socket that stays ready.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pgmux.engine import Engine
from tests.unit.test_engine import FakeLoop


class Accepted:
    def __init__(self) -> None:
        self.conns: list[tuple[int, Any, Any]] = []
        self.errors: list[int] = []

    def on_accept(self, fd: int, peer: Any, local: Any) -> None:
        self.conns.append((fd, peer, local))

    def on_error(self, err: int) -> None:
        self.errors.append(err)


def wait_readable(sock: socket.socket) -> None:
    """Until a connection waits in the accept queue (a loaded machine may take a moment)."""
    readable, _, _ = select.select([sock], [], [], 5)
    assert readable, "no connection reached the accept queue"


@pytest.fixture
def listening() -> Iterator[tuple[Engine, socket.socket, Accepted]]:
    eng = Engine(FakeLoop())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    got = Accepted()
    acceptor = eng.listen(sock.fileno(), got.on_accept, got.on_error,
                          [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)])
    try:
        yield eng, sock, got
    finally:
        eng.unlisten(acceptor)
        for fd, _peer, _local in got.conns:
            os.close(fd)
        sock.close()
        eng.close()


def test_accepts_with_addresses_and_options(listening: tuple[Engine, socket.socket, Accepted]) -> None:
    eng, sock, got = listening
    clients = [socket.create_connection(sock.getsockname()) for _ in range(3)]
    try:
        deadline = time.monotonic() + 5
        while len(got.conns) < 3 and time.monotonic() < deadline:
            wait_readable(sock)
            eng.run()
        assert len(got.conns) == 3 and not got.errors
        for (fd, peer, local), client in zip(got.conns, clients, strict=True):
            assert peer == client.getsockname()
            assert local == sock.getsockname()
            assert not os.get_blocking(fd)
            with socket.socket(fileno=os.dup(fd)) as s:
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                s.sendall(b"hi")
            assert client.recv(2) == b"hi"
    finally:
        for c in clients:
            c.close()


def test_peer_addresses_from_many_hosts(listening: tuple[Engine, socket.socket, Accepted]) -> None:
    """IPv4 addresses are formatted once and kept in a small cache (64 slots): 300 connections from
    150 loopback addresses, each twice, more hosts than slots, get their own address every time."""
    eng, sock, got = listening
    hosts = [f"127.0.{i // 100}.{i % 100 + 1}" for i in range(150)] * 2
    for start in range(0, len(hosts), 10):
        clients = []
        for host in hosts[start:start + 10]:
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.bind((host, 0))
            c.connect(sock.getsockname())
            clients.append(c)
        try:
            deadline = time.monotonic() + 5
            while len(got.conns) < start + len(clients) and time.monotonic() < deadline:
                wait_readable(sock)
                eng.run()
            assert [peer for _fd, peer, _local in got.conns[start:]] == [c.getsockname() for c in clients]
        finally:
            for c in clients:
                c.close()
    assert not got.errors


def test_out_of_descriptors_resets_instead_of_spinning(listening: tuple[Engine, socket.socket, Accepted]) -> None:
    eng, sock, got = listening
    client = socket.create_connection(sock.getsockname())
    wait_readable(sock)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # no descriptor left: the lowest free number is at the limit
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        eng.run()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert got.errors == [errno.EMFILE] and not got.conns
        client.settimeout(5)
        try:
            assert client.recv(1) == b""  # accepted with the spare descriptor and closed
        except ConnectionResetError:
            pass
        eng.run()  # nothing queued any more: no new error
        assert got.errors == [errno.EMFILE]
        # and the spare descriptor is back: the next connection is accepted as usual
        with socket.create_connection(sock.getsockname()):
            wait_readable(sock)
            eng.run()
            assert len(got.conns) == 1
    finally:
        client.close()
