"""The engine's own link and release (PoolCore), over socketpairs: no PostgreSQL, no Pooler.

A client the engine may link by itself (`auto`) gets an idle server when its query arrives, is
queued in C when there is none (its bytes held, what it sends meanwhile added), and is handed the
server another client's transaction released; anything the engine must not decide goes to Python.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from pgmux.engine import Engine, PoolCore, PoolStats
from tests.unit.test_engine import FakeLoop, TLink, complete, query, ready, recv_all


class Params:
    def __init__(self, key: tuple[str, ...] | None = ("UTF8",)) -> None:
        self._tracked_key = key


class FakePool:
    def __init__(self) -> None:
        self.paused = False
        self.round_robin = False
        self.login_failure = None
        self.busy: set[Any] = set()
        self.connecting = 0
        self.idle: deque[Any] = deque()
        self.active: set[Any] = set()
        self.waiting: deque[Any] = deque()
        self.stats = PoolStats()
        self.core = PoolCore(self, self.idle, self.active, self.waiting, self.stats)
        self.core.pool_size = 1


class PLink(TLink):
    """A TLink with what pooling reads (params, inbox, state), and the hooks pooling calls."""

    def __init__(self, name: str, pool: FakePool) -> None:
        super().__init__(name)
        self.params = Params()
        self.inbox = bytearray()
        self.state = "idle"
        self.core = pool.core
        self.link_stats = pool.stats
        self.stmts = {}

    def engine_server_ready(self) -> None:
        self.calls.append(("server_ready",))

    def engine_queued(self) -> None:
        self.calls.append(("queued",))


class Setup:
    def __init__(self, clients: int) -> None:
        self.loop = FakeLoop()
        self.eng = Engine(self.loop)
        self.pool = FakePool()
        self.socks: list[socket.socket] = []
        self.server, self.s_app = self._adopt("server")
        self.pool.idle.append(self.server)
        self.clients = []
        self.apps = []
        for i in range(clients):
            c, app = self._adopt(f"client{i}")
            c.auto = True
            self.clients.append(c)
            self.apps.append(app)

    def _adopt(self, name: str) -> tuple[PLink, socket.socket]:
        app, mine = socket.socketpair()
        app.setblocking(False)
        mine.setblocking(False)
        link = PLink(name, self.pool)
        self.eng.adopt_fd(link, mine.detach())
        self.socks.append(app)
        return link, app

    def run(self) -> None:
        self.eng.run()
        assert not self.loop.errors, self.loop.errors

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.run()
        self.loop.drain()


@pytest.fixture
def setup2() -> Iterator[Setup]:
    s = Setup(2)
    yield s
    s.close()


def test_a_query_takes_an_idle_server_and_the_transaction_end_gives_it_back(setup2: Setup) -> None:
    st, a = setup2, setup2.clients[0]
    st.apps[0].sendall(query("select 1"))
    st.run()
    assert recv_all(st.s_app) == query("select 1")
    assert a.server is st.server and st.server.client is a and st.server.state == "active"
    assert st.server in st.pool.active and not st.pool.idle
    assert st.pool.stats.server_assignment_count == 1
    st.s_app.sendall(complete(b"SELECT 1") + ready())
    st.run()
    assert recv_all(st.apps[0]) == complete(b"SELECT 1") + ready()
    assert a.server is None and st.server.client is None and st.server.state == "idle"
    assert list(st.pool.idle) == [st.server] and not st.pool.active
    assert not st.server.forwarding  # as Pooler.release leaves it: idle bytes go to the inbox
    assert "transaction_end" not in st.server.names()  # the engine released it itself
    assert st.pool.stats.xact_count == 1 and st.pool.stats.query_count == 1


def test_a_client_without_a_server_waits_in_c_and_gets_the_next_released_one(setup2: Setup) -> None:
    st, a, b = setup2, *setup2.clients
    st.apps[0].sendall(query("select 'a'"))
    st.run()
    st.apps[1].sendall(query("select 'b1'"))
    st.run()
    assert b.waiting and list(st.pool.waiting) == [b] and b.carried[0] == len(query("select 'b1'"))
    st.apps[1].sendall(query("select 'b2'"))  # sent while waiting: joins the held bytes
    st.run()
    assert recv_all(st.s_app) == query("select 'a'")  # nothing of b's yet
    assert "queued" not in b.names()  # the pool is full: no new server asked for
    st.s_app.sendall(complete(b"SELECT 1") + ready())
    st.run()
    assert a.server is None and b.server is st.server and not b.waiting and not st.pool.waiting
    assert recv_all(st.s_app) == query("select 'b1'") + query("select 'b2'")
    assert st.pool.stats.server_assignment_count == 2 and st.pool.stats.wait_time_us >= 0
    st.s_app.sendall(complete(b"SELECT 1") + ready() + complete(b"SELECT 1") + ready())
    st.run()
    assert recv_all(st.apps[1]) == (complete(b"SELECT 1") + ready()) * 2
    assert list(st.pool.idle) == [st.server] and b.server is None


def test_a_waiting_client_that_leaves_is_closed_by_the_engine(setup2: Setup) -> None:
    st, b = setup2, setup2.clients[1]
    st.apps[0].sendall(query("select 'a'"))
    st.run()
    st.apps[1].sendall(query("select 'b'"))
    st.run()
    assert b.waiting
    st.apps[1].close()
    st.run()
    st.loop.drain()
    assert "connection_lost" in b.names()  # Pooler.client_gone takes it out of the queue


def test_what_the_engine_must_not_decide_goes_to_python(setup2: Setup) -> None:
    st, a, b = setup2, *setup2.clients
    b.auto = False  # Python's last look found something (tracking, pinning...)
    st.apps[1].sendall(query("select 'b'"))
    st.run()
    assert bytes(b.slow) == query("select 'b'") and b.server is None  # delivered to the protocol
    st.apps[0].sendall(query("select 'a'"))
    st.run()
    recv_all(st.s_app)
    st.server.close_needed = True  # e.g. RECONNECT: the release is Python's (server_ready closes it)
    st.s_app.sendall(complete(b"SELECT 1") + ready())
    st.run()
    assert st.server.names()[-1] == "transaction_end" and a.server is st.server


def test_different_tracked_parameters_are_linked_by_python(setup2: Setup) -> None:
    st, a = setup2, setup2.clients[0]
    a.params = Params(("LATIN1",))  # Pooler.link sends SET first
    st.apps[0].sendall(query("select 1"))
    st.run()
    assert bytes(a.slow) == query("select 1") and a.server is None and list(st.pool.idle) == [st.server]
