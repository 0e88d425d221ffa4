"""Session-mode behaviour through real clients (psql, psycopg 3 sync/async, asyncpg, psycopg2, pgbench).

Every test runs unchanged against pgmux and PgBouncer (``--pooler=pgbouncer``), so a failure against
PgBouncer means the test is wrong, and a failure against pgmux means pgmux is not a drop-in replacement.
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_tx import (
    BIG_SQL,
    EXPECTED_BIG,
    PASSWORDS,
    active_query_pid,
    big_digest,
    idle_in_tx_count,
    sigkill_mid_transaction,
)

from pgmux.testing.cluster import BackendSampler, PoolerProcess, TempCluster, make_dsn, wait_for

pytestmark = pytest.mark.integration

# Rows for COPY: tabs, newlines, backslashes, quotes, commas, non-ASCII and NULLs must survive.
COPY_ROWS: list[tuple[int, str | None]] = [
    (i, None if i % 17 == 0 else f"row {i}\t\\ \"q\", 'x'\nline2 é€ {'z' * (i % 50)}") for i in range(1, 1001)
]


@pytest.fixture(params=["md5user", "scramuser"])
def cred(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(user, password): md5user exercises md5 both sides; scramuser SCRAM to the client and pass-through."""
    return request.param, PASSWORDS[request.param]


@pytest.fixture
def session_pooler(pooler: Callable[..., PoolerProcess]) -> PoolerProcess:
    return pooler(pool_mode="session", extra={"default_pool_size": 10})


def check_table(cluster: TempCluster, table: str) -> list[tuple[int, str | None]]:
    """Rows of ``table`` read directly from the cluster, bypassing the pooler."""
    return [(r[0], r[1]) for r in cluster.execute(f"SELECT a, b FROM {table} ORDER BY a", dbname="testdb")]


def committed_marker_count(cluster: TempCluster, table: str) -> int:
    return cluster.execute(f"SELECT count(*) FROM {table} WHERE a < 0", dbname="testdb")[0][0]


def rollback_then_commit(cluster: TempCluster, conn: Any, execute: Callable[[str], object], table: str) -> None:
    """Through a sync driver's ``conn`` (SQL run by ``execute``): create ``table`` afresh, check that a
    rolled-back INSERT left nothing and a committed one is there, then empty the table."""
    execute(f"DROP TABLE IF EXISTS {table}")
    execute(f"CREATE TABLE {table} (a int PRIMARY KEY, b text)")
    conn.commit()

    execute(f"INSERT INTO {table} VALUES (-1, 'rolled back')")
    conn.rollback()
    assert committed_marker_count(cluster, table) == 0
    execute(f"INSERT INTO {table} VALUES (-2, 'committed')")
    conn.commit()
    assert check_table(cluster, table) == [(-2, "committed")]
    execute(f"DELETE FROM {table}")
    conn.commit()


# ---------------------------------------------------------------------------------------------------
# 1. clients


def test_psycopg_sync(cluster: TempCluster, session_pooler: PoolerProcess, cred: tuple[str, str]) -> None:
    import psycopg

    user, password = cred
    table = f"t_psycopg_{user}"
    with psycopg.connect(session_pooler.dsn(user, password)) as conn:
        assert conn.execute("SELECT current_user, %s::int + 1", [41]).fetchone() == (user, 42)
        rollback_then_commit(cluster, conn, conn.execute, table)

        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (a, b) FROM STDIN") as cp:
                for row in COPY_ROWS:
                    cp.write_row(row)
            conn.commit()
            assert check_table(cluster, table) == COPY_ROWS
            with cur.copy(f"COPY (SELECT a, b FROM {table} ORDER BY a) TO STDOUT") as cp:
                cp.set_types(["int4", "text"])
                assert list(cp.rows()) == COPY_ROWS

            cur.execute(BIG_SQL)
            assert big_digest(cur) == EXPECTED_BIG
        conn.commit()


async def test_psycopg_async(cluster: TempCluster, session_pooler: PoolerProcess, cred: tuple[str, str]) -> None:
    import psycopg

    user, password = cred
    table = f"t_apsycopg_{user}"
    async with await psycopg.AsyncConnection.connect(session_pooler.dsn(user, password)) as conn:
        cur = await conn.execute("SELECT current_user, %s::int + 1", [41])
        assert await cur.fetchone() == (user, 42)
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (a int PRIMARY KEY, b text)")
        await conn.commit()

        await conn.execute(f"INSERT INTO {table} VALUES (-1, 'rolled back')")
        await conn.rollback()
        assert committed_marker_count(cluster, table) == 0
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (-2, 'committed')")
        assert check_table(cluster, table) == [(-2, "committed")]
        await conn.execute(f"DELETE FROM {table}")
        await conn.commit()

        async with conn.cursor() as acur:
            async with acur.copy(f"COPY {table} (a, b) FROM STDIN") as cp:
                for row in COPY_ROWS:
                    await cp.write_row(row)
            await conn.commit()
            assert check_table(cluster, table) == COPY_ROWS
            async with acur.copy(f"COPY (SELECT a, b FROM {table} ORDER BY a) TO STDOUT") as cp:
                cp.set_types(["int4", "text"])
                assert [row async for row in cp.rows()] == COPY_ROWS

            await acur.execute(BIG_SQL)
            assert big_digest(await acur.fetchall()) == EXPECTED_BIG
        await conn.commit()


async def test_asyncpg(cluster: TempCluster, session_pooler: PoolerProcess, cred: tuple[str, str]) -> None:
    import asyncpg

    user, password = cred
    table = f"t_asyncpg_{user}"
    conn = await asyncpg.connect(
        host=session_pooler.host, port=session_pooler.port, user=user, password=password, database="testdb", ssl=False
    )
    try:
        # asyncpg prepares every statement (extended protocol, named statements)
        assert tuple(await conn.fetchrow("SELECT current_user, $1::int + 1", 41)) == (user, 42)
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (a int PRIMARY KEY, b text)")

        tr = conn.transaction()
        await tr.start()
        await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", -1, "rolled back")
        await tr.rollback()
        assert committed_marker_count(cluster, table) == 0
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", -2, "committed")
        assert check_table(cluster, table) == [(-2, "committed")]
        await conn.execute(f"DELETE FROM {table}")

        await conn.copy_records_to_table(table, records=COPY_ROWS, columns=["a", "b"])
        assert check_table(cluster, table) == COPY_ROWS
        out = io.BytesIO()
        await conn.copy_from_query(f"SELECT a, b FROM {table} ORDER BY a", output=out, format="csv")
        parsed = list(csv.reader(io.StringIO(out.getvalue().decode()), strict=True))
        assert [(int(a), b) for a, b in parsed] == [(a, "" if b is None else b) for a, b in COPY_ROWS]

        rows = await conn.fetch(BIG_SQL)
        assert big_digest((r[0], r[1]) for r in rows) == EXPECTED_BIG
        # and a cursor, which fetches in batches with Execute(max_rows)
        async with conn.transaction():
            got = [(r[0], r[1]) async for r in conn.cursor(BIG_SQL, prefetch=5000)]
        assert big_digest(got) == EXPECTED_BIG
    finally:
        await conn.close()


def test_psycopg2(cluster: TempCluster, session_pooler: PoolerProcess, cred: tuple[str, str]) -> None:
    import psycopg2

    user, password = cred
    table = f"t_psycopg2_{user}"
    conn = psycopg2.connect(session_pooler.dsn(user, password))
    try:
        cur = conn.cursor()
        cur.execute("SELECT current_user, %s + 1", (41,))
        assert cur.fetchone() == (user, 42)
        rollback_then_commit(cluster, conn, cur.execute, table)

        buf = io.StringIO()
        csv.writer(buf).writerows(COPY_ROWS)  # None -> unquoted empty field -> NULL
        buf.seek(0)
        cur.copy_expert(f"COPY {table} (a, b) FROM STDIN WITH (FORMAT csv)", buf)
        conn.commit()
        assert check_table(cluster, table) == COPY_ROWS
        out = io.StringIO()
        cur.copy_expert(f"COPY (SELECT a, b FROM {table} ORDER BY a) TO STDOUT WITH (FORMAT csv, FORCE_QUOTE (b))", out)
        parsed = list(csv.reader(io.StringIO(out.getvalue()), strict=True))
        assert [(int(a), b) for a, b in parsed] == [(a, "" if b is None else b) for a, b in COPY_ROWS]

        # named (server-side) cursor: DECLARE + FETCH in batches
        named = conn.cursor(name="bigcur")
        named.itersize = 7000
        named.execute(BIG_SQL)
        assert big_digest(named) == EXPECTED_BIG
        named.close()
        cur.execute(BIG_SQL)
        assert big_digest(cur.fetchall()) == EXPECTED_BIG
        conn.commit()
    finally:
        conn.close()


def run_psql(dsn: str, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """psql with no psqlrc, stop on first error; returns the completed process (checked)."""
    proc = subprocess.run(
        ["psql", dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"psql failed ({proc.returncode}): {proc.stderr}"
    return proc


def test_psql(cluster: TempCluster, session_pooler: PoolerProcess, cred: tuple[str, str], tmp_path: Path) -> None:
    user, password = cred
    table = f"t_psql_{user}"
    dsn = session_pooler.dsn(user, password)

    out = run_psql(dsn, "-A", "-t", "-c", "SELECT current_user, 41 + 1")
    assert out.stdout.strip() == f"{user}|42"

    in_csv = tmp_path / "in.csv"
    out_csv = tmp_path / "out.csv"
    with open(in_csv, "w", newline="") as f:
        csv.writer(f).writerows(COPY_ROWS)
    script = f"""
DROP TABLE IF EXISTS {table};
CREATE TABLE {table} (a int PRIMARY KEY, b text);
BEGIN;
INSERT INTO {table} VALUES (-1, 'rolled back');
ROLLBACK;
SELECT count(*) AS after_rollback FROM {table} \\gset
BEGIN;
INSERT INTO {table} VALUES (-2, 'committed');
COMMIT;
DELETE FROM {table} WHERE a = -2;
\\copy {table} (a, b) from '{in_csv}' with (format csv)
\\copy (SELECT a, b FROM {table} ORDER BY a) to '{out_csv}' with (format csv, force_quote (b))
\\echo rollback_count=:after_rollback
"""
    out = run_psql(dsn, input=script)
    assert "rollback_count=0" in out.stdout
    assert check_table(cluster, table) == COPY_ROWS
    with open(out_csv, newline="") as f:
        parsed = list(csv.reader(f, strict=True))
    assert [(int(a), b) for a, b in parsed] == [(a, "" if b is None else b) for a, b in COPY_ROWS]

    big_out = tmp_path / "big.txt"
    run_psql(dsn, "-A", "-t", "-F", ":", "-o", str(big_out), "-c", BIG_SQL)
    lines = big_out.read_text().splitlines()
    assert big_digest(line.split(":", 1) for line in lines) == EXPECTED_BIG


def test_auth_methods_offered(session_pooler: PoolerProcess) -> None:
    """md5user is challenged with MD5, scramuser (SCRAM secret in auth_file) with SASL SCRAM-SHA-256."""
    from pgwire import AUTH_MD5, AUTH_SASL, RawConn

    for user, method in (("md5user", AUTH_MD5), ("scramuser", AUTH_SASL)):
        with RawConn(session_pooler.host, session_pooler.port) as conn:
            conn.login(user, "testdb", PASSWORDS[user])
            assert conn.auth_methods == [method], user
            assert conn.simple_query("SELECT current_user") == [(user,)]
            conn.terminate()


def test_unix_socket(session_pooler: PoolerProcess) -> None:
    """The pooler also listens on <unix_socket_dir>/.s.PGSQL.<port>."""
    import psycopg

    assert session_pooler.unix_socket_path and os.path.exists(session_pooler.unix_socket_path)
    with psycopg.connect(session_pooler.unix_dsn("md5user", "md5pass")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_trust_auth(pooler: Callable[..., PoolerProcess]) -> None:
    """auth_type=trust: users with "" in the auth_file log in without a password (server side: trust)."""
    import psycopg

    p = pooler(auth_type="trust", extra={"default_pool_size": 2})
    for user in ("trustuser", "postgres"):
        with psycopg.connect(p.dsn(user)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)


# ---------------------------------------------------------------------------------------------------
# 2. pgbench with more clients than servers


@pytest.mark.slow
def test_pgbench_pool_limit(cluster: TempCluster, pooler: Callable[..., PoolerProcess], pgbench_tables: None) -> None:
    p = pooler(pool_mode="session", extra={"default_pool_size": 10, "max_client_conn": 100})
    with BackendSampler(cluster, usename="md5user", datname="testdb", interval=0.05) as sampler:
        proc = subprocess.run(
            ["pgbench", "-n", "-c", "50", "-j", "2", "-T", "5", p.dsn("md5user", "md5pass")],
            capture_output=True,
            text=True,
            timeout=90,
        )
    sampler.stop()
    assert proc.returncode == 0, f"pgbench failed:\n{proc.stdout}\n{proc.stderr}"
    failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    assert failed and int(failed.group(1)) == 0, proc.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", proc.stdout)
    assert processed and int(processed.group(1)) > 0, proc.stdout
    assert len(sampler.samples) > 20, "sampler did not run"
    assert sampler.max >= 2, f"never saw concurrent backends (max {sampler.max}): sampling is broken"
    print(f"pgbench: max {sampler.max} backends over {len(sampler.samples)} samples")
    assert sampler.max <= 10, f"pool exceeded default_pool_size: saw {sampler.max} backends"


# ---------------------------------------------------------------------------------------------------
# 4. client killed mid-transaction

def test_client_sigkill_mid_transaction(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    import psycopg

    p = pooler(pool_mode="session", extra={"default_pool_size": 1})
    cluster.execute("CREATE TABLE IF NOT EXISTS kill_rows (marker text, n int)", dbname="testdb")
    default_work_mem = cluster.execute("SHOW work_mem", dbname="testdb")[0][0]
    assert default_work_mem != "77MB"
    marker = f"kill-{os.getpid()}-{time.monotonic_ns()}"
    server_pid = sigkill_mid_transaction(cluster, p.dsn("md5user", "md5pass"), "kill_rows", marker,
                                         "SET work_mem = '77MB'", "CREATE TEMP TABLE kill_tmp (x int)")
    wait_for(lambda: idle_in_tx_count(cluster, "md5user") == 0, 5,
             what="the killed client's transaction to end on the server")
    rows = cluster.execute("SELECT count(*) FROM kill_rows WHERE marker = %s", dbname="testdb", params=[marker])
    assert rows == [(0,)], "rows of a killed (uncommitted) transaction became visible"

    with psycopg.connect(p.dsn("md5user", "md5pass"), autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert conn.execute("SHOW work_mem").fetchone() == (default_work_mem,)
        assert conn.execute("SELECT to_regclass('pg_temp.kill_tmp')").fetchone() == (None,)
        # a clean session: not inside the dead client's transaction
        assert conn.execute("SELECT count(*) FROM kill_rows WHERE marker = %s", [marker]).fetchone() == (0,)
        conn.execute("INSERT INTO kill_rows VALUES (%s, -1)", [marker + "-next"])
    # with pool size 1 this also shows that the pool slot was given back
    assert cluster.count_backends(usename="md5user", datname="testdb") <= 1
    print(f"killed client's server pid {server_pid}, next client's {pid}")


# ---------------------------------------------------------------------------------------------------
# 5. cancel


def test_cancel_psycopg(cluster: TempCluster, session_pooler: PoolerProcess) -> None:
    import psycopg

    with psycopg.connect(session_pooler.dsn("md5user", "md5pass")) as conn:
        errors: list[BaseException] = []

        def canceller() -> None:
            try:
                wait_for(lambda: active_query_pid(cluster, "pg_sleep(30)", "md5user"), 15, what="pg_sleep to run")
                conn.cancel()  # protocol CancelRequest on a new connection with the BackendKeyData
            except BaseException as e:  # surfaced below
                errors.append(e)

        t = threading.Thread(target=canceller, daemon=True)
        t.start()
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled) as exc_info:
            conn.execute("SELECT pg_sleep(30)")
        elapsed = time.monotonic() - start
        t.join(5)
        assert not errors, errors
        assert exc_info.value.sqlstate == "57014"
        assert elapsed < 10, f"cancel took {elapsed:.1f}s"
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,), "connection unusable after cancel"
    assert active_query_pid(cluster, "pg_sleep(30)", "md5user") is None


def test_cancel_psql_sigint(cluster: TempCluster, session_pooler: PoolerProcess) -> None:
    proc = subprocess.Popen(
        ["psql", session_pooler.dsn("md5user", "md5pass"), "-X", "-c", "SELECT pg_sleep(30)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: active_query_pid(cluster, "pg_sleep(30)", "md5user"), 15, what="pg_sleep to run")
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "canceling statement due to user request" in err, err
    assert elapsed < 10
    assert active_query_pid(cluster, "pg_sleep(30)", "md5user") is None


# ---------------------------------------------------------------------------------------------------
# 7. reload


def hold_sessions(dsns: list[str], sql: str) -> list[BaseException]:
    """Run ``sql`` on a new connection per dsn concurrently; return the exceptions raised."""
    import psycopg

    errors: list[BaseException] = []

    def one(dsn: str) -> None:
        try:
            with psycopg.connect(dsn) as conn:
                conn.execute(sql)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(d,), daemon=True) for d in dsns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_sighup_reload_pool_size(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    import psycopg

    p = pooler(pool_mode="session", extra={"default_pool_size": 2})
    dsn = p.dsn("md5user", "md5pass")

    # A session that stays connected (and, in session mode, keeps its server) across the reload.
    keeper = psycopg.connect(dsn, autocommit=True)
    try:
        keeper_pid = keeper.execute("SELECT pg_backend_pid()").fetchone()[0]

        with BackendSampler(cluster, usename="md5user", datname="testdb") as before:
            errors = hold_sessions([dsn] * 3, "SELECT pg_sleep(0.7)")
        before.stop()
        assert not errors, errors
        assert before.max == 2, f"with default_pool_size=2 expected exactly 2 backends, saw {before.max}"

        p.set_options({"default_pool_size": 4})
        p.reload()
        time.sleep(1.0)  # reload is asynchronous; both poolers apply it within their next loop
        assert p.is_running()
        assert keeper.execute("SELECT pg_backend_pid()").fetchone()[0] == keeper_pid, "kept session changed server"

        with BackendSampler(cluster, usename="md5user", datname="testdb") as after:
            errors = hold_sessions([dsn] * 3, "SELECT pg_sleep(2)")
        after.stop()
        assert not errors, errors
        assert after.max == 4, f"after reload to default_pool_size=4 expected 4 backends, saw {after.max}"
        assert keeper.execute("SELECT pg_backend_pid()").fetchone()[0] == keeper_pid
    finally:
        keeper.close()


def test_dsn_helper_quotes() -> None:
    """make_dsn must quote values libpq would otherwise split (guards every test above)."""
    assert make_dsn(user="a b", password="it's", dbname=None) == "user='a b' password='it\\'s'"
