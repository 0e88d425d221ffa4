"""Server failures in transaction mode: a linked server killed, server logins failing, PostgreSQL restarted.

The pooler must tell the affected client (PgBouncer: the server's own FATAL, then ``server conn crashed?``),
keep everyone else working, never die, and come back by itself within ``server_login_retry`` once
PostgreSQL accepts connections again.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from helpers_tx import (
    BENCH_DB,
    BenchResult,
    active_query_pid,
    connect,
    dbline,
    default_dbs,
    history_count,
    idle_in_tx_count,
    parse_bench,
    pgbench_cmd,
    query_outcome,
    quiet_cluster,  # noqa: F401 - fixture
    raw_login,
    run_pgbench,
    terminate,
    truncate_history,
    txbench,  # noqa: F401 - session fixture
)

from pgmux.testing.cluster import PoolerProcess, TempCluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_cluster")]

PoolerFactory = Callable[..., PoolerProcess]

CRASH_TEXTS = ("server conn crashed?", "terminating connection due to administrator command")


def test_linked_server_killed_mid_query(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1})
    conn = raw_login(p)
    killer_errors: list[BaseException] = []

    def killer() -> None:
        try:
            pid = wait_for(lambda: active_query_pid(cluster, "pg_sleep(20)"), 10, what="pg_sleep to run")
            terminate(cluster, pid)
        except BaseException as e:
            killer_errors.append(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    start = time.monotonic()
    out = query_outcome(conn, "SELECT pg_sleep(20)")
    elapsed = time.monotonic() - start
    t.join(10)
    conn.close()
    assert not killer_errors, killer_errors
    assert elapsed < 10, "the client was not told its server died"
    assert any(text in m for m in out.messages for text in CRASH_TEXTS), out
    assert not out.ready, "a ReadyForQuery after the server died would make the client believe it is fine"
    # the pool (size 1) reconnects on demand
    with connect(p) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_linked_server_killed_in_transaction(cluster: TempCluster, pooler: PoolerFactory) -> None:
    import psycopg

    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1})
    cluster.execute("CREATE TABLE IF NOT EXISTS tx_crash_rows (n int)", dbname="testdb")
    cluster.execute("DELETE FROM tx_crash_rows", dbname="testdb")
    with connect(p) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO tx_crash_rows VALUES (1)")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        terminate(cluster, pid)
        time.sleep(0.3)
        with pytest.raises(psycopg.OperationalError) as exc_info:
            conn.execute("INSERT INTO tx_crash_rows VALUES (2)")
            conn.execute("COMMIT")
        assert any(text in str(exc_info.value) for text in CRASH_TEXTS), str(exc_info.value)
    assert cluster.execute("SELECT count(*) FROM tx_crash_rows", dbname="testdb") == [(0,)]
    assert idle_in_tx_count(cluster, "md5user") == 0
    with connect(p) as c:
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] != pid


def test_server_login_failure_then_recovery(cluster: TempCluster, pooler: PoolerFactory, pooler_kind: str) -> None:
    """Server logins start failing (CONNECT revoked, servers killed): clients fail fast with the cached
    error during server_login_retry, and the pool recovers by itself within server_login_retry."""
    import psycopg

    dbname = "tx_late_db"
    retry = 2
    cluster.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    cluster.execute(f"CREATE DATABASE {dbname}")
    p = pooler(
        pool_mode="transaction",
        databases={**default_dbs(), "late": dbline(dbname)},
        extra={"default_pool_size": 1, "server_login_retry": retry, "query_wait_timeout": 3},
    )
    try:
        a = connect(p, "md5user", "late")
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        cluster.execute(f"REVOKE CONNECT ON DATABASE {dbname} FROM PUBLIC")
        terminate(cluster, pid)
        time.sleep(0.3)

        # a logged-in client that needs a server now: the new server login fails
        start = time.monotonic()
        with pytest.raises(psycopg.Error) as exc_info:  # 42501 from the server is not an OperationalError
            a.execute("SELECT 1")
        a.close()
        if pooler_kind == "pgmux":
            # current PgBouncer: waiting clients get the server's own error, at once
            assert f'permission denied for database "{dbname}"' in str(exc_info.value)
            assert time.monotonic() - start < 1.5
        else:
            # PgBouncer 1.18 keeps the client queued (retrying the login) until query_wait_timeout
            assert "query_wait_timeout" in str(exc_info.value)

        # within server_login_retry: new clients fail fast without asking the server again
        start = time.monotonic()
        with pytest.raises(psycopg.Error) as exc_info, connect(p, "md5user", "late") as b:
            b.execute("SELECT 1")
        assert time.monotonic() - start < 1.0
        assert re.search(
            r"server login has been failing, (cached error: permission denied for database \"tx_late_db\""
            r"|try again later) \(server_login_retry\)",
            str(exc_info.value),
        ), str(exc_info.value)
        assert _can_connect(p, "testdb"), "another pool must not be affected"

        cluster.execute(f"GRANT CONNECT ON DATABASE {dbname} TO PUBLIC")
        back = time.monotonic()
        wait_for(
            lambda: _can_connect(p, "late"),
            retry + 1.5,
            interval=0.1,
            what=f"the pool to recover within server_login_retry={retry}s",
        )
        print(f"recovered {time.monotonic() - back:.2f}s after logins work again")
    finally:
        cluster.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def _can_connect(p: PoolerProcess, dbname: str) -> bool:
    import psycopg

    try:
        with connect(p, "md5user", dbname, connect_timeout=3) as c:
            return c.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:  # a server error forwarded at login may carry its own SQLSTATE class
        return False


def start_pgbench(dsn: str, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        pgbench_cmd(dsn, "-c", "10", "-j", "2", "-T", str(seconds)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(bench: subprocess.Popen[str], timeout: float = 60) -> BenchResult:
    try:
        out, err = bench.communicate(timeout=timeout)
    finally:
        if bench.poll() is None:
            bench.kill()
            out, err = bench.communicate()
    return parse_bench((bench.returncode, out, err))


def wait_for_progress(cluster: TempCluster, rows: int = 20) -> None:
    base = history_count(cluster)
    wait_for(lambda: history_count(cluster) >= base + rows, 15, what="pgbench to make progress")


@pytest.mark.slow
@pytest.mark.usefixtures("txbench")
def test_postgres_restart_under_pgbench(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """All backends killed under load, then PostgreSQL restarted under load: the pooler stays up and a
    new pgbench run succeeds once PostgreSQL is back (within server_login_retry)."""
    retry = 2
    p = pooler(
        pool_mode="transaction",
        databases={BENCH_DB: dbline(BENCH_DB)},
        extra={"default_pool_size": 5, "max_client_conn": 100, "server_login_retry": retry},
    )
    dsn = p.dsn("md5user", "md5pass", BENCH_DB)
    truncate_history(cluster)

    # 1. every server killed under load
    bench = start_pgbench(dsn, 2)
    try:
        wait_for_progress(cluster)
        killed = cluster.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE usename = 'md5user' AND datname = %s",
            params=[BENCH_DB],
        )[0][0]
        assert killed >= 1
    finally:
        first = finish(bench)
    print(f"pgbench while backends were killed: exit {first.returncode}, processed {first.processed}")
    assert p.is_running(), "the pooler died when its servers were killed"

    # 2. PostgreSQL restarted under load (the pool reconnects on demand after step 1), and back to
    # normal by itself within server_login_retry, while that load is still running
    bench = start_pgbench(dsn, 4)
    try:
        wait_for_progress(cluster)
        assert bench.poll() is None, "pgbench ended before the restart: no load"
        cluster.restart("fast")
        back = time.monotonic()
        assert p.is_running(), "the pooler died while PostgreSQL restarted"
        wait_for(
            lambda: _can_connect(p, BENCH_DB),
            retry + 2.5,
            interval=0.1,
            what=f"the pooler to serve again within server_login_retry={retry}s of PostgreSQL coming back",
        )
        print(f"pooler serving again {time.monotonic() - back:.2f}s after PostgreSQL came back")
    finally:
        second = finish(bench)
    print(f"pgbench during the restart: exit {second.returncode}, processed {second.processed}")
    assert p.is_running()
    assert "Traceback" not in p.log_text()

    # 3. a new run is clean: no failures, and every counted transaction committed exactly once
    truncate_history(cluster)
    res = run_pgbench(dsn, "-c", "10", "-j", "2", "-T", "2")
    assert res.returncode == 0, res.describe()
    assert res.failed == 0 and res.processed, res.describe()
    assert history_count(cluster) == res.processed
    assert p.is_running()


@pytest.mark.pgmux_only(reason="which backend serves after RECONNECT depends on login timing")
def test_reconnect_replaces_a_server_still_logging_in(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """RECONNECT while the pool's only server is logging in: that server is closed once logged in
    (close_needed) and the waiting client is served by a server opened after the RECONNECT."""
    import psycopg

    from pgmux.testing.faultproxy import FaultProxy

    with FaultProxy(cluster.port) as proxy:
        p = pooler(pool_mode="transaction", databases={"testdb": f"host=127.0.0.1 port={proxy.port} dbname=testdb"},
                   extra={"default_pool_size": 1, "server_connect_timeout": 10})
        with connect(p) as c, psycopg.connect(p.unix_dsn("pgbouncer", dbname="pgbouncer"), autocommit=True) as console:
            pid1 = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            proxy.delay(0.3, new_only=True)  # the next server login takes a few round trips of 0.3 s
            terminate(cluster, pid1)
            wait_for(lambda: not cluster.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", params=[pid1]),
                     5, what="the first backend to go")
            got: list[int] = []
            t = threading.Thread(target=lambda: got.append(c.execute("SELECT pg_backend_pid()").fetchone()[0]))
            t.start()
            time.sleep(0.4)  # the new server is logging in
            console.execute("RECONNECT testdb")
            t.join(10)
            proxy.delay(0)
            assert got, "the query waiting for the server logging in got no answer"
            assert c.execute("SELECT 1").fetchone() == (1,)
        log = p.log_text()
    assert got[0] != pid1
    assert "closing because: close_needed" in log, "the server that was logging in during RECONNECT was kept"
