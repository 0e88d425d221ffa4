"""Session state in transaction pooling: pinned, never leaked (PgBouncer leaks it; see django.md §3)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

INFO = "SELECT current_user, current_setting('statement_timeout'), pg_backend_pid()"


@pytest.fixture(scope="module")
def other_role(cluster: TempCluster) -> str:
    cluster.execute("DO $$ BEGIN CREATE ROLE pin_other; EXCEPTION WHEN duplicate_object THEN END $$")
    cluster.execute("GRANT pin_other TO md5user")
    return "pin_other"


def connect(p: PoolerProcess) -> psycopg.Connection:
    return psycopg.connect(p.dsn("md5user", "md5pass"), autocommit=True)


def test_set_role_and_settings_never_leak(pooler: Callable[..., PoolerProcess], other_role: str) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "query_wait_timeout": 10})
    with connect(p) as a, connect(p) as b:
        before = b.execute(INFO).fetchone()
        assert before is not None and before[:2] == ("md5user", "0")
        a.execute(f"SET ROLE {other_role}")
        a.execute("SET statement_timeout = '5s'")
        assert a.execute(INFO).fetchone()[:2] == (other_role, "5s")  # type: ignore[index]
        result: dict[str, tuple] = {}
        t = threading.Thread(target=lambda: result.setdefault("b", b.execute(INFO).fetchone()))
        t.start()
        time.sleep(0.5)
        assert "b" not in result, "B got the only server while A holds session state"
        a.execute("RESET ROLE")
        a.execute("RESET statement_timeout")
        t.join(10)
        assert result["b"][:2] == ("md5user", "0")
        assert result["b"][2] == before[2]  # the same backend, handed over only once clean
    assert "pinned to" in p.log_text() and "unpinned from" in p.log_text()


def test_listen_notify_in_transaction_mode(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 2})
    with connect(p) as listener, connect(p) as other:
        listener.execute("LISTEN pgmux_jobs")
        for i in range(3):
            other.execute(f"NOTIFY pgmux_jobs, 'job {i}'")
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=3)]
        assert got == ["job 0", "job 1", "job 2"]
        listener.execute("UNLISTEN *")


def test_session_advisory_locks_behave_as_direct(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 2})
    with connect(p) as a, connect(p) as b:
        assert a.execute("SELECT pg_advisory_lock(4242)").fetchone() is not None
        for _ in range(3):  # later transactions of A still hold it; B cannot take it
            a.execute("SELECT 1")
            assert b.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (False,)
        assert a.execute("SELECT pg_advisory_unlock(4242)").fetchone() == (True,)
        assert b.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
        assert b.execute("SELECT pg_advisory_unlock(4242)").fetchone() == (True,)


def test_with_hold_cursors_and_temp_tables_many_clients(pooler: Callable[..., PoolerProcess]) -> None:
    """Django's QuerySet.iterator() shape: DECLARE ... WITH HOLD in autocommit, FETCH in later
    transactions, the same cursor name in every client; 6 clients on 3 servers."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 3, "query_wait_timeout": 30})
    errors: list[str] = []

    def worker(i: int) -> None:
        try:
            with connect(p) as conn:
                for rep in range(5):
                    with conn.cursor(name="_django_curs_1", withhold=True) as cur:
                        cur.itersize = 7
                        cur.execute(f"SELECT g + {i * 1000} FROM generate_series(1, 50) g")
                        values = [r[0] for r in cur]
                    assert values == [g + i * 1000 for g in range(1, 51)], (i, rep)
                conn.execute("CREATE TEMP TABLE mine (v int)")
                conn.execute(f"INSERT INTO mine VALUES ({i})")
                assert conn.execute("SELECT v FROM mine").fetchall() == [(i,)]
                conn.execute("DROP TABLE mine")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_refuse_mode_gives_a_clear_error(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "pin_session_state": "refuse"})
    with connect(p) as a:
        a.execute("SET work_mem = '8MB'")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="pin_session_state = refuse.*work_mem"):
            a.execute("SELECT 1")
    with connect(p) as b:  # the next client gets a clean server
        assert b.execute("SELECT current_setting('work_mem')").fetchone() != ("8MB",)


def test_off_mode_is_pgbouncer_behaviour(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "pin_session_state": "off"})
    with connect(p) as a, connect(p) as b:
        a.execute("SET work_mem = '9MB'")
        # PgBouncer's documented leak, kept when asked for: B shares A's backend and setting.
        assert b.execute("SELECT current_setting('work_mem')").fetchone() == ("9MB",)


def test_drain_before_create_database_template(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    """Django's test runner clones and drops databases through the pooler; PostgreSQL refuses
    while pgmux keeps idle connections to the template or the database being dropped."""
    cluster.execute("DROP DATABASE IF EXISTS drain_src")
    cluster.execute("DROP DATABASE IF EXISTS drain_copy")
    cluster.execute("CREATE DATABASE drain_src OWNER md5user")
    p = pooler(pool_mode="transaction",
               databases={"*": "host={host} port={port}"},
               extra={"default_pool_size": 2})
    src = psycopg.connect(p.dsn("md5user", "md5pass", dbname="drain_src"), autocommit=True)
    src.execute("SELECT 1")  # pgmux now holds an idle server connection to drain_src
    src.close()
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="postgres"), autocommit=True) as admin:
        admin.execute("CREATE DATABASE drain_copy TEMPLATE drain_src")
        again = psycopg.connect(p.dsn("md5user", "md5pass", dbname="drain_copy"), autocommit=True)
        again.execute("SELECT 1")
        again.close()
        admin.execute("DROP DATABASE drain_copy")
        admin.execute("DROP DATABASE drain_src")
    assert "drained connections to drain_src" in p.log_text()


def test_show_pins_lists_pinned_clients(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 2})
    with connect(p) as a:
        a.execute("LISTEN somewhere")
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with psycopg.connect(p.unix_dsn("pgbouncer", dbname="pgbouncer"), autocommit=True) as admin:
            cur = admin.cursor(binary=False)
            cur.execute("SHOW PINS")
            cols = [d.name for d in cur.description]  # type: ignore[union-attr]
            rows = cur.fetchall()
        assert cols == ["database", "user", "type", "addr", "port", "id", "remote_pid", "pinned_seconds", "reason"]
        assert len(rows) == 1 and rows[0][0] == "testdb" and rows[0][6] == pid and rows[0][8] == "LISTEN"
