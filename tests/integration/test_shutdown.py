"""Stopping the pooler as PgBouncer 1.25 stops: SHUTDOWN WAIT_FOR_SERVERS (SIGINT) and
WAIT_FOR_CLIENTS (SIGTERM), a second stop signal during a shutdown, SIGUSR2 and RESUME during one,
a stop signal during SUSPEND, and what clients see meanwhile.

PgBouncer's behaviour (src/main.c handle_sigint/handle_sigterm/handle_sigusr2, src/admin.c
admin_cmd_shutdown/admin_cmd_resume, src/objects.c pause_client, src/janitor.c pool_client_maint
and do_full_maint; its own tests test_admin.py::test_repeated_sigint and
test_newly_paused_client_during_wait_for_servers_shutdown):

- WAIT_FOR_SERVERS pauses: a transaction under way finishes; a client that would wait for a server
  (a new transaction, or one already queued) is closed with FATAL 08P01 `server shutting down`;
  once no server is left the process logs `server connections dropped, exiting` and exits 0.
- WAIT_FOR_CLIENTS: the process exits 0 once the last client left, logging
  `client connections dropped, exiting`.
- Both stop listening on TCP at once: a new connection is refused.
- A second SIGINT or SIGTERM during any shutdown: `got SIG... while shutting down, fast exit`, exit 0.
- SIGUSR2 during a shutdown: `got SIGUSR2 while shutting down, ignoring` (the pause stays);
  RESUME: `pooler is shutting down`.
- SIGINT or SIGTERM while SUSPENDed: FATAL `suspend was in progress, going down immediately`, exit 1.

PgBouncer 1.18 (Debian) predates all of this (its SIGTERM exits at once, a second SIGINT does
nothing, its SIGUSR2 cancels a shutdown), so the tests are pgmux_only but SIGUSR1/SIGUSR2 and SIGINT
during SUSPEND.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster, wait_for
from pgmux.testing.faultproxy import FaultProxy

psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.integration

PoolerFactory = Callable[..., PoolerProcess]


def start(pooler: PoolerFactory, **extra: Any) -> PoolerProcess:
    return pooler(auth_type="trust", pool_mode="transaction", extra=extra)


def connect(p: PoolerProcess) -> Any:
    return psycopg.connect(p.dsn("trustuser", connect_timeout=10), autocommit=True)


@contextmanager
def console(p: PoolerProcess) -> Iterator[Any]:
    with psycopg.connect(p.dsn("postgres", dbname="pgbouncer", connect_timeout=10), autocommit=True) as admin:
        yield admin


def admin(p: PoolerProcess, command: str) -> list[tuple[Any, ...]]:
    with console(p) as a:
        cur = a.execute(command, prepare=False)
        return cur.fetchall() if cur.description else []


def pool_row(p: PoolerProcess, db: str = "testdb") -> dict[str, Any]:
    with console(p) as a:
        cur = a.execute("SHOW POOLS", prepare=False)
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return next(r for r in rows if r["database"] == db)


def refused(p: PoolerProcess) -> bool:
    """True when nothing accepts on the pooler's TCP port any more."""
    try:
        with socket.create_connection((p.host, p.port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def shutdown(p: PoolerProcess, how: str, mode: str = "WAIT_FOR_SERVERS") -> None:
    """SHUTDOWN `mode` on the console, or its signal; returns once the listener is closed."""
    if how == "console":
        assert admin(p, f"SHUTDOWN {mode}") == []
    else:
        p.signal(signal.SIGINT if mode == "WAIT_FOR_SERVERS" else signal.SIGTERM)
    wait_for(lambda: refused(p), 5, what="the listener to close")


@contextmanager
def busy_and_idle(p: PoolerProcess) -> Iterator[tuple[Any, Any]]:
    """Two clients: one in a transaction (it holds a server), one between transactions."""
    busy, idle = connect(p), connect(p)
    try:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        idle.execute("SELECT 1")
        yield busy, idle
    finally:
        busy.close()
        idle.close()


def assert_server_shutting_down(exc: BaseException) -> None:
    assert "server shutting down" in str(exc), exc
    diag = getattr(exc, "diag", None)
    if diag is not None and diag.sqlstate is not None:
        assert diag.sqlstate == "08P01" and diag.severity_nonlocalized == "FATAL"


# --------------------------------------------------------------------------------------------------
# SHUTDOWN WAIT_FOR_SERVERS / SIGINT


@pytest.mark.pgmux_only  # PgBouncer 1.23+ (1.18's SIGINT keeps the paused client waiting)
@pytest.mark.parametrize("how", ["console", "SIGINT"])
def test_wait_for_servers_refuses_a_new_transaction(pooler: PoolerFactory, how: str) -> None:
    p = start(pooler)
    with busy_and_idle(p) as (busy, idle):
        shutdown(p, how)
        # The transaction under way goes on ...
        assert busy.execute("SELECT 2").fetchone() == (2,)
        # ... a new one would wait for a server: the client is told and closed.
        with pytest.raises(psycopg.OperationalError) as info:
            idle.execute("SELECT 3")
        assert_server_shutting_down(info.value)
        wait_for(lambda: "closing because: server shutting down" in p.log_text(), 5, what="the close line")
        assert "pooler error: server shutting down" in p.log_text()
        assert p.is_running()
        busy.execute("COMMIT")  # the last server is released: the process exits
        assert p.wait(10) == 0
    assert "server connections dropped, exiting" in p.log_text()


@pytest.mark.pgmux_only  # PgBouncer 1.23+ (1.18 keeps the queued client waiting)
@pytest.mark.parametrize("why", ["pool_size", "PAUSE"])
def test_wait_for_servers_closes_a_client_already_waiting(pooler: PoolerFactory, why: str) -> None:
    """A client queued because the pool is full, or because the pooler was paused (SIGUSR1)
    before the shutdown."""
    p = start(pooler, default_pool_size=1 if why == "pool_size" else 20)
    busy = connect(p)

    async def queued() -> None:
        conn = await psycopg.AsyncConnection.connect(p.dsn("trustuser", connect_timeout=10), autocommit=True)
        try:
            await conn.execute("SELECT 4")
        finally:
            await conn.close()

    async def scenario() -> BaseException | None:
        if why == "PAUSE":
            p.signal(signal.SIGUSR1)
            await asyncio.to_thread(wait_for, lambda: "got SIGUSR1, pausing all activity" in p.log_text(), 5)
        task = asyncio.ensure_future(queued())
        # (pool_size: the one server is in busy's transaction)
        await asyncio.to_thread(wait_for, lambda: pool_row(p)["cl_waiting"] == 1, 10, what="a waiting client")
        await asyncio.to_thread(shutdown, p, "console")
        try:
            await asyncio.wait_for(task, 5)
        except psycopg.OperationalError as exc:
            return exc
        return None

    try:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        exc = asyncio.run(scenario())
        assert exc is not None, "the queued client was served during WAIT_FOR_SERVERS"
        assert_server_shutting_down(exc)
        assert busy.execute("SELECT 5").fetchone() == (5,)
        busy.execute("COMMIT")
    finally:
        busy.close()
    assert p.wait(10) == 0


@pytest.mark.pgmux_only  # PgBouncer 1.23+
def test_wait_for_servers_closes_a_login_waiting_for_the_first_server(pooler: PoolerFactory,
                                                                      cluster: TempCluster) -> None:
    """A client logging in to a pool that has no server yet waits for the first one's login (its
    ParameterStatus set): PgBouncer queues it too, and closes it the same way."""
    with FaultProxy(cluster.port) as proxy:
        proxy.blackhole_new(True)  # the first server connection never answers
        p = pooler(auth_type="trust", pool_mode="transaction",
                   databases={"testdb": f"host=127.0.0.1 port={proxy.port} dbname=testdb"})

        async def login() -> BaseException | None:
            task = asyncio.ensure_future(psycopg.AsyncConnection.connect(p.dsn("trustuser", connect_timeout=10)))
            await asyncio.to_thread(wait_for, lambda: proxy.accepted >= 1, 10, what="the server connection")
            await asyncio.to_thread(shutdown, p, "console")
            try:
                conn = await asyncio.wait_for(task, 5)
            except psycopg.OperationalError as exc:
                return exc
            await conn.close()
            return None

        exc = asyncio.run(login())
        assert exc is not None, "the login finished during WAIT_FOR_SERVERS"
        assert_server_shutting_down(exc)


@pytest.mark.pgmux_only  # 1.18 has no SHUTDOWN WAIT_FOR_CLIENTS
def test_wait_for_clients_exits_when_the_last_client_leaves(pooler: PoolerFactory) -> None:
    p = start(pooler)
    conn = connect(p)
    try:
        conn.execute("SELECT 1")
        shutdown(p, "console", "WAIT_FOR_CLIENTS")
        # A client already in serves on, new transactions included.
        conn.execute("BEGIN")
        assert conn.execute("SELECT 6").fetchone() == (6,)
        conn.execute("COMMIT")
        assert p.is_running()
    finally:
        conn.close()
    assert p.wait(10) == 0
    assert "client connections dropped, exiting" in p.log_text()


# --------------------------------------------------------------------------------------------------
# a second stop signal


@pytest.mark.pgmux_only  # PgBouncer 1.23+ (1.18 logs "got SIGINT, shutting down" again; its SIGTERM exits)
@pytest.mark.parametrize(("first", "second"), [
    pytest.param(signal.SIGINT, signal.SIGINT, id="SIGINT-SIGINT"),
    pytest.param(signal.SIGTERM, signal.SIGTERM, id="SIGTERM-SIGTERM"),
    pytest.param(signal.SIGINT, signal.SIGTERM, id="SIGINT-SIGTERM"),
    pytest.param(signal.SIGTERM, signal.SIGINT, id="SIGTERM-SIGINT"),
])
def test_second_stop_signal_exits_at_once(pooler: PoolerFactory, first: int, second: int) -> None:
    """The first signal waits (a session-mode client holds its server, so neither kind of shutdown
    can finish); the second exits at once, exit code 0."""
    p = pooler(auth_type="trust", pool_mode="session")
    conn = connect(p)
    try:
        conn.execute("SELECT 1")
        p.signal(first)
        wait_for(lambda: f"got {signal.Signals(first).name}, shutting down" in p.log_text(), 5,
                 what="the first signal to be taken")
        assert conn.execute("SELECT 7").fetchone() == (7,)
        assert p.is_running()
        p.signal(second)
        assert p.wait(5) == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 8")
    finally:
        conn.close()
    assert f"got {signal.Signals(second).name} while shutting down, fast exit" in p.log_text()


# --------------------------------------------------------------------------------------------------
# SIGUSR1 / SIGUSR2, and SIGUSR2 and RESUME during a shutdown


def test_sigusr1_pauses_and_sigusr2_resumes(pooler: PoolerFactory) -> None:
    p = start(pooler)

    async def scenario() -> Any:
        aconn = await psycopg.AsyncConnection.connect(p.dsn("trustuser", connect_timeout=10), autocommit=True)
        try:
            p.signal(signal.SIGUSR1)
            await asyncio.to_thread(wait_for, lambda: "got SIGUSR1, pausing all activity" in p.log_text(), 5)
            task = asyncio.ensure_future(aconn.execute("SELECT 11"))
            await asyncio.to_thread(wait_for, lambda: pool_row(p)["cl_waiting"] == 1, 10, what="a waiting client")
            p.signal(signal.SIGUSR2)
            cur = await asyncio.wait_for(task, 5)
            return await cur.fetchone()
        finally:
            await aconn.close()

    assert asyncio.run(scenario()) == (11,)
    assert "got SIGUSR2, continuing from PAUSE" in p.log_text()



@pytest.mark.pgmux_only  # 1.18's SIGUSR2 resumes and cancels the shutdown ("canceling shutdown")
@pytest.mark.parametrize("mode", ["WAIT_FOR_SERVERS", "WAIT_FOR_CLIENTS"])
def test_sigusr2_during_shutdown_is_ignored(pooler: PoolerFactory, mode: str) -> None:
    p = start(pooler)
    with busy_and_idle(p) as (busy, idle):
        shutdown(p, "console", mode)
        p.signal(signal.SIGUSR2)
        wait_for(lambda: "got SIGUSR2 while shutting down, ignoring" in p.log_text(), 5, what="the SIGUSR2 line")
        if mode == "WAIT_FOR_SERVERS":  # still paused: a new transaction is refused
            with pytest.raises(psycopg.OperationalError) as info:
                idle.execute("SELECT 9")
            assert_server_shutting_down(info.value)
        else:
            assert idle.execute("SELECT 9").fetchone() == (9,)
        assert refused(p) and p.is_running()
        busy.execute("COMMIT")
    assert p.wait(10) == 0
    assert "continuing" not in p.log_text()


@pytest.mark.pgmux_only  # 1.18 has no SHUTDOWN WAIT_FOR_CLIENTS
@pytest.mark.parametrize("mode", ["WAIT_FOR_SERVERS", "WAIT_FOR_CLIENTS"])
def test_resume_during_shutdown_is_refused(pooler: PoolerFactory, mode: str) -> None:
    p = start(pooler)
    with busy_and_idle(p) as (busy, _idle), console(p) as a:
        a.execute(f"SHUTDOWN {mode}", prepare=False)
        with pytest.raises(psycopg.errors.ProtocolViolation, match="pooler is shutting down"):
            a.execute("RESUME", prepare=False)
        assert p.is_running()
        busy.execute("COMMIT")
    assert p.wait(10) == 0


# --------------------------------------------------------------------------------------------------
# a stop signal during SUSPEND


@pytest.mark.parametrize("sig", [
    pytest.param(signal.SIGINT, id="SIGINT"),
    pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.pgmux_only),  # 1.18's SIGTERM: fast exit
])
def test_stop_signal_during_suspend_goes_down_at_once(pooler: PoolerFactory, sig: int) -> None:
    p = start(pooler)
    conn = connect(p)
    try:
        conn.execute("SELECT 1")
        with console(p) as a:
            assert a.execute("SUSPEND", prepare=False).statusmessage == "SUSPEND"
            p.signal(sig)
            assert p.wait(5) == 1
    finally:
        conn.close()
    log = p.log_text()
    lines = [line for line in log.splitlines() if "suspend was in progress, going down immediately" in line]
    assert lines and " FATAL " in lines[0], log
    assert f"got {signal.Signals(sig).name}, shutting down" in log


# --------------------------------------------------------------------------------------------------
# workers = 2


@pytest.mark.pgmux_only  # workers are pgmux's
def test_second_console_shutdown_does_not_stop_the_other_workers_at_once(pooler: PoolerFactory) -> None:
    """With workers, a console SHUTDOWN reaches the other workers as a stop signal: a second
    SHUTDOWN WAIT_FOR_... only changes the mode (as in one PgBouncer process) and must not reach
    them as the second signal that means exit now."""
    p = start(pooler, workers=2)
    conns: list[Any] = []
    try:
        while set(p.log_pids("login attempt")) & set(p.worker_pids()) != set(p.worker_pids()):
            assert len(conns) < 40, "the kernel never gave a connection to the second worker"
            conns.append(connect(p))
        with console(p) as a:
            a.execute("SHUTDOWN WAIT_FOR_CLIENTS", prepare=False)
            # The first one reaches the other worker through the supervisor (as SIGTERM).
            wait_for(lambda: len(set(p.log_pids("SHUTDOWN WAIT_FOR_CLIENTS command issued")) |
                                 set(p.log_pids("got SIGTERM, shutting down"))) == 2, 5,
                     what="both workers to shut down")
            a.execute("SHUTDOWN WAIT_FOR_CLIENTS", prepare=False)
        # Both workers shut down already, so both ignore SIGUSR2; before the fix the second
        # SHUTDOWN's SIGTERM would follow it through the supervisor and stop the other worker.
        p.signal(signal.SIGUSR2)
        wait_for(lambda: len(set(p.log_pids("got SIGUSR2 while shutting down, ignoring"))) == 2, 5,
                 what="both workers to take SIGUSR2")
        for conn in conns:
            assert conn.execute("SELECT 10").fetchone() == (10,)
    finally:
        for conn in conns:
            conn.close()
    assert p.wait(10) == 0
    assert "fast exit" not in p.log_text()
    assert len(set(p.log_pids("client connections dropped, exiting"))) == 2
