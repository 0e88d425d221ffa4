"""Server connections that cannot be opened: PostgreSQL down (connect refused), a connect that is
never answered (server_connect_timeout on the TCP connect), a login that is never answered
(server_connect_timeout on the login), a TLS negotiation that fails (src/server.c handle_sslchar:
`server refused SSL` is a disconnect_server without kill_pool_logins, as a failed connect).

PgBouncer (src/objects.c disconnect_server, launch_new_connection, check_fast_fail; src/janitor.c
pool_client_maint): no ErrorResponse came, so nobody is told at once. The clients already waiting
for a server stay queued while the pool retries, one connect at a time, server_login_retry apart;
they are served if PostgreSQL comes back, else they get ``query_wait_timeout`` (a logged-in client)
or ``client_login_timeout (server down)`` (a client logging in to a pool that never had a server).
A client that needs a server while the pool's last connect failed and it has none gets
``server login has been failing, cached error: <reason> (server_login_retry)`` (PgBouncer 1.18:
``server login has been failing, try again later (server_login_retry)``), the reason being
``connect failed`` or ``connect timeout``.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers_tx import connect, default_dbs

from pgmux.testing.cluster import PoolerProcess, TempCluster, wait_for
from pgmux.testing.faultproxy import FaultProxy

pytestmark = [pytest.mark.integration]

PoolerFactory = Callable[..., PoolerProcess]


def cached_error(reason: str) -> str:
    """The fast-fail text: PgBouncer 1.25 quotes the cached reason, 1.17-1.18 did not."""
    return rf"server login has been failing, (cached error: {re.escape(reason)}|try again later) \(server_login_retry\)"


def tx_pooler(pooler: PoolerFactory, proxy: FaultProxy, **extra: Any) -> PoolerProcess:
    settings = {"default_pool_size": 1, "server_login_retry": 1, "server_connect_timeout": 1,
                "admin_users": "md5user", **extra}
    return pooler(
        pool_mode="transaction",
        databases={**default_dbs(), "flaky": f"host=127.0.0.1 port={proxy.port} dbname=testdb"},
        extra=settings,
    )


def serving(p: PoolerProcess, dbname: str = "flaky") -> bool:
    import psycopg

    try:
        with connect(p, "md5user", dbname, connect_timeout=5) as c:
            return bool(c.execute("SELECT 1").fetchone() == (1,))
    except psycopg.Error:
        return False


def server_count(p: PoolerProcess, dbname: str = "flaky") -> int:
    import psycopg

    with psycopg.connect(p.dsn("md5user", "md5pass", "pgbouncer"), autocommit=True) as console:
        cur = console.execute("SHOW SERVERS")
        cols = [d.name for d in cur.description or []]
        return sum(1 for row in cur.fetchall() if dict(zip(cols, row, strict=False)).get("database") == dbname)


def warm_then_lose_server(p: PoolerProcess, proxy: FaultProxy, fault: Callable[[], None]) -> Any:
    """A logged-in client whose pool knows its server parameters, then every server lost and `fault`
    in force for new connects. Returns the client (its next query needs a new server)."""
    a = connect(p, "md5user", "flaky")
    assert a.execute("SELECT 1").fetchone() == (1,)
    fault()
    proxy.cut()
    wait_for(lambda: server_count(p) == 0, 5, interval=0.1, what="the pooler to notice its server is gone")
    return a


@contextmanager
def syn_blackhole(port: int) -> Iterator[None]:
    """127.0.0.1:`port` listening with its accept queue full and nobody accepting: a new connect's
    SYN is dropped, so the TCP connect is never answered (as an unreachable host), on a machine
    with no network."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(0)
    fill = []
    try:
        for _ in range(3):  # one completes into the queue (backlog 0), the others stay pending
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fill.append(s)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.1", port))
            raise AssertionError("the accept queue is not full: connects are answered")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield
    finally:
        for s in fill:
            s.close()
        ls.close()


class Outcome:
    """A query run in a thread: its result or error, and how long it took."""

    def __init__(self, conn: Any, sql: str = "SELECT 1") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self._start = time.monotonic()
        self._thread.start()

    def _run(self, conn: Any, sql: str) -> None:
        try:
            self.result = conn.execute(sql).fetchone()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        self.elapsed = time.monotonic() - self._start

    def wait(self, timeout: float) -> Outcome:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the query still hangs after {timeout} s"
        return self


def assert_cached_error(p: PoolerProcess, pooler_kind: str, reason: str, within: float | None = None) -> None:
    """A new client that needs a server while the pool's connects fail gets the cached error (at
    once: within `within` seconds, when given), with 1.25's wording through pgmux."""
    import psycopg

    with connect(p, "md5user", "flaky") as b:
        start = time.monotonic()
        with pytest.raises(psycopg.Error) as exc_info:
            b.execute("SELECT 1")
        if within is not None:
            assert time.monotonic() - start < within, "the new client was queued instead of failed fast"
    assert re.search(cached_error(reason), str(exc_info.value)), str(exc_info.value)
    if pooler_kind == "pgmux":
        assert f"cached error: {reason} (server_login_retry)" in str(exc_info.value)


# --------------------------------------------------------------------------------------------------
# PostgreSQL down: connect refused


def test_refused_keeps_the_queued_client_until_query_wait_timeout(cluster: TempCluster, pooler: PoolerFactory,
                                                                   pooler_kind: str) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = tx_pooler(pooler, proxy, query_wait_timeout=4)
        a = warm_then_lose_server(p, proxy, proxy.unreachable)
        waiting = Outcome(a)  # queued: the connect is refused, retried every second
        time.sleep(2)
        assert waiting.error is None and waiting.result is None, "the queued client was not kept waiting"

        # a client that needs a server while the pool's connects fail: the cached error, at once
        assert_cached_error(p, pooler_kind, "connect failed", within=2)

        waiting.wait(15)
        a.close()
        assert waiting.error is not None and "query_wait_timeout" in str(waiting.error), waiting.error
        assert waiting.elapsed >= 3, f"failed after {waiting.elapsed:.1f}s, before query_wait_timeout = 4"

        # PostgreSQL back: the pool recovers by itself (a retry every server_login_retry)
        assert serving(p, "testdb"), "another pool must not be affected"
        proxy.reachable()
        wait_for(lambda: serving(p), 10, interval=0.2, what="the pool to recover once connects work")
        if pooler_kind == "pgmux":
            assert "server login failed: connect failed: " in p.log_text()


def test_refused_then_back_serves_the_queued_client(cluster: TempCluster, pooler: PoolerFactory) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = tx_pooler(pooler, proxy, query_wait_timeout=30)
        a = warm_then_lose_server(p, proxy, proxy.unreachable)
        waiting = Outcome(a)
        time.sleep(2.5)  # a few refused connects
        assert waiting.error is None and waiting.result is None, "the queued client was not kept waiting"
        proxy.reachable()
        waiting.wait(15)
        a.close()
        assert waiting.error is None, waiting.error
        assert waiting.result == (1,)


def test_first_client_of_a_pool_waits_until_client_login_timeout(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """A pool that never had a server: its first clients wait for one (their login is not
    finished) and get `client_login_timeout (server down)`, not the connect error."""
    import psycopg

    with FaultProxy(cluster.port) as proxy:
        proxy.unreachable()
        p = tx_pooler(pooler, proxy, client_login_timeout=3, query_wait_timeout=30)
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as exc_info:
            connect(p, "md5user", "flaky", connect_timeout=15)
        elapsed = time.monotonic() - start
        assert "client_login_timeout (server down)" in str(exc_info.value), str(exc_info.value)
        assert elapsed >= 2, f"failed after {elapsed:.1f}s, before client_login_timeout = 3"


def test_first_client_of_a_pool_is_served_when_postgres_comes_back(cluster: TempCluster,
                                                                     pooler: PoolerFactory) -> None:
    with FaultProxy(cluster.port) as proxy:
        proxy.unreachable()
        p = tx_pooler(pooler, proxy, client_login_timeout=30, query_wait_timeout=30)
        with proxy.reachable_after(2.5):
            start = time.monotonic()
            with connect(p, "md5user", "flaky", connect_timeout=20) as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
            assert time.monotonic() - start >= 2, "logged in before any server could"


# --------------------------------------------------------------------------------------------------
# connects that are never answered (server_connect_timeout = 1)


def test_tcp_connect_never_answered(cluster: TempCluster, pooler: PoolerFactory, pooler_kind: str) -> None:
    """The TCP connect gets no answer: given up after server_connect_timeout as `connect failed`
    (PgBouncer's sbuf_connect timer), retried; the queued client gets query_wait_timeout."""
    with FaultProxy(cluster.port) as proxy:
        p = tx_pooler(pooler, proxy, query_wait_timeout=5)
        port = proxy.port
        a = warm_then_lose_server(p, proxy, proxy.unreachable)
        with syn_blackhole(port):
            waiting = Outcome(a)
            time.sleep(2.5)  # the first connect has timed out (1 s), the next one is on its way
            assert waiting.error is None and waiting.result is None, "the queued client was not kept waiting"
            assert_cached_error(p, pooler_kind, "connect failed")
            waiting.wait(15)
            a.close()
        assert waiting.error is not None and "query_wait_timeout" in str(waiting.error), waiting.error
        assert waiting.elapsed >= 4, f"failed after {waiting.elapsed:.1f}s, before query_wait_timeout = 5"
        assert serving(p, "testdb"), "another pool must not be affected"


def test_login_never_answered(cluster: TempCluster, pooler: PoolerFactory, pooler_kind: str) -> None:
    """The TCP connect works but the startup packet gets no answer: `connect timeout` after
    server_connect_timeout (PgBouncer's janitor), retried; then PostgreSQL answers again."""
    with FaultProxy(cluster.port) as proxy:
        p = tx_pooler(pooler, proxy, query_wait_timeout=30)
        a = warm_then_lose_server(p, proxy, lambda: proxy.blackhole_new(True))
        waiting = Outcome(a)
        time.sleep(2.5)
        assert waiting.error is None and waiting.result is None, "the queued client was not kept waiting"
        assert_cached_error(p, pooler_kind, "connect timeout")
        proxy.heal()
        waiting.wait(15)
        a.close()
        assert waiting.error is None, waiting.error
        assert waiting.result == (1,)
        assert proxy.accepted >= 3, "the login was not retried"


# --------------------------------------------------------------------------------------------------
# TLS negotiation that fails (server_tls_sslmode = require, the test cluster has ssl = off)


def test_server_refusing_tls_keeps_the_first_clients_waiting(pooler: PoolerFactory, pooler_kind: str) -> None:
    """Not a refused login: the pool's first clients are not sent the TLS error at once but wait
    for the retries (server_login_retry apart) until client_login_timeout (server down)."""
    import psycopg

    p = pooler(extra={"server_tls_sslmode": "require", "server_login_retry": 1, "client_login_timeout": 3,
                      "query_wait_timeout": 30})
    outcomes: list[tuple[str, float]] = []

    def attempt() -> None:
        start = time.monotonic()
        try:
            connect(p, "md5user", "testdb", connect_timeout=15).close()
            outcomes.append(("logged in", time.monotonic() - start))
        except psycopg.OperationalError as exc:
            outcomes.append((str(exc), time.monotonic() - start))

    second = threading.Thread(target=attempt, daemon=True)
    second.start()
    attempt()
    second.join(15)
    assert len(outcomes) == 2
    for message, elapsed in outcomes:
        assert "client_login_timeout (server down)" in message, message
        assert elapsed >= 2, f"failed after {elapsed:.1f}s, before client_login_timeout = 3"
    if pooler_kind == "pgmux":
        failures = p.log_text().count("server login failed: server refused SSL: server_tls_sslmode = require")
        assert failures >= 2, p.log_text()  # retried, one connect at a time
