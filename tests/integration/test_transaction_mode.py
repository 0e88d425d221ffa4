"""Transaction and statement pooling through real clients (pgbench, psycopg 3 pipelines, asyncpg, COPY).

Transaction mode is where a pooler corrupts data if it gets a boundary wrong, so every test here runs
several clients over fewer servers and checks results value by value: a server released too early hands
the rest of one client's replies to another client, which shows up as a wrong row, not just a slow test.
Every test runs unchanged against PgBouncer 1.18 (``--pooler=pgbouncer``) unless marked ``pgmux_only``.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable

import pytest
from helpers_tx import (
    BENCH_DB,
    BIG_N,
    BIG_SQL,
    EXPECTED_BIG,
    big_digest,
    connect,
    history_count,
    idle_in_tx_count,
    quiet_cluster,  # noqa: F401 - fixture
    raw_login,
    run_pgbench,
    run_threads,
    send_query,
    sigkill_mid_transaction,
    truncate_history,
    txbench,  # noqa: F401 - session fixture
)
from pgwire import PgError, parse_error_fields

from pgmux.testing.cluster import BackendSampler, PoolerProcess, TempCluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_cluster")]

PoolerFactory = Callable[..., PoolerProcess]

STATEMENT_MODE_ERROR = "transaction blocks not allowed in statement pooling mode"


def tx_pooler(pooler: PoolerFactory, pool_size: int, **extra: object) -> PoolerProcess:
    return pooler(pool_mode="transaction", extra={"default_pool_size": pool_size, **extra})


def fresh_table(cluster: TempCluster, name: str, columns: str) -> str:
    cluster.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns})", dbname="testdb")
    return name


# ---------------------------------------------------------------------------------------------------
# 1. pgbench: 100 clients over 10 servers


@pytest.mark.slow
@pytest.mark.usefixtures("txbench")
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_pgbench_100_clients_pool_10(cluster: TempCluster, pooler: PoolerFactory, protocol: str) -> None:
    bench_db = BENCH_DB
    p = pooler(
        pool_mode="transaction",
        databases={bench_db: f"host={{host}} port={{port}} dbname={bench_db}"},
        extra={"default_pool_size": 10, "max_client_conn": 200},
    )
    truncate_history(cluster)
    with BackendSampler(cluster, usename="md5user", datname=bench_db, interval=0.05) as sampler:
        res = run_pgbench(
            p.dsn("md5user", "md5pass", bench_db), "-c", "100", "-j", "2", "-T", "3", "-M", protocol, timeout=90
        )
    sampler.stop()
    assert res.returncode == 0, res.describe()
    assert res.failed == 0, res.describe()
    assert res.processed and res.processed > 0, res.describe()
    assert len(sampler.samples) > 20, "backend sampler did not run"
    assert sampler.max >= 2, f"never saw concurrent backends (max {sampler.max}): sampling is broken"
    assert sampler.max <= 10, f"pool exceeded default_pool_size=10: saw {sampler.max} backends"
    # every transaction pgbench counted committed exactly one history row, and no other row exists
    assert history_count(cluster) == res.processed, res.describe()
    print(f"pgbench {protocol}: {res.processed} xacts, max {sampler.max} backends")


# ---------------------------------------------------------------------------------------------------
# 2. drivers that pipeline, COPY, big results -- several clients over a small pool


def pipeline_worker(p: PoolerProcess, table: str, wid: int, rounds: int) -> None:
    """psycopg 3 pipeline mode: several queries and Syncs in flight at once, every result checked."""
    import psycopg

    with connect(p, autocommit=True) as conn:
        for r in range(rounds):
            with conn.pipeline() as pipe:
                c1 = conn.execute("SELECT %s::int, %s::text", [wid, f"w{wid}r{r}"])
                c2 = conn.execute(f"INSERT INTO {table} (w, r) VALUES (%s, %s) RETURNING w, r", [wid, r])
                pipe.sync()
                c3 = conn.execute(f"SELECT count(*) FROM {table} WHERE w = %s", [wid])
                c4 = conn.execute(
                    "SELECT string_agg(x::text, ',') FROM generate_series(%s::int, %s::int) x", [wid, wid + 3]
                )
                pipe.sync()
                with conn.transaction():
                    c5 = conn.execute(f"INSERT INTO {table} (w, r) VALUES (%s, %s) RETURNING r", [wid, -r - 1])
                    c6 = conn.execute("SELECT %s::text || '-in-tx'", [f"w{wid}"])
            assert c1.fetchone() == (wid, f"w{wid}r{r}")
            assert c2.fetchone() == (wid, r)
            assert c3.fetchone() == (2 * r + 1,)
            assert c4.fetchone() == (",".join(str(x) for x in range(wid, wid + 4)),)
            assert c5.fetchone() == (-r - 1,)
            assert c6.fetchone() == (f"w{wid}-in-tx",)

        # an error inside a pipeline: the statements up to the Sync are skipped, the next Sync works
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline() as pipe:
            conn.execute("SELECT 1/0")
            conn.execute(f"INSERT INTO {table} (w, r) VALUES (%s, 999999)", [wid])
            pipe.sync()
        with conn.pipeline():
            after = conn.execute("SELECT %s::int * 2", [wid])
        assert after.fetchone() == (wid * 2,)
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE w = %s AND r = 999999", [wid]).fetchone() == (0,)


def test_psycopg_pipeline_shared_pool(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 2)
    table = fresh_table(cluster, "tx_pipe", "w int, r int")
    rounds = 15
    workers = 6
    with BackendSampler(cluster, usename="md5user", datname="testdb") as sampler:
        errors = run_threads([lambda w=w: pipeline_worker(p, table, w, rounds) for w in range(1, workers + 1)])
    sampler.stop()
    assert not errors, errors
    rows = cluster.execute(f"SELECT w, count(*) FROM {table} GROUP BY w ORDER BY w", dbname="testdb")
    assert rows == [(w, 2 * rounds) for w in range(1, workers + 1)]
    assert sampler.max <= 2, f"pool_size=2 exceeded: {sampler.max} backends"


async def test_asyncpg_no_statement_cache_shared_pool(cluster: TempCluster, pooler: PoolerFactory) -> None:
    import asyncio

    import asyncpg

    p = tx_pooler(pooler, 2)
    table = fresh_table(cluster, "tx_asyncpg", "w int, r int, t text")

    async def worker(wid: int) -> None:
        conn = await asyncpg.connect(
            host=p.host,
            port=p.port,
            user="md5user",
            password="md5pass",
            database="testdb",
            ssl=False,
            statement_cache_size=0,
        )
        try:
            for r in range(10):
                row = await conn.fetchrow("SELECT $1::int AS w, $2::text AS t, $3::int + 1 AS n", wid, f"x{r}", r)
                assert tuple(row) == (wid, f"x{r}", r + 1)
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES ($1, $2, $3)", wid, r, f"w{wid}")
                    n = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE w = $1", wid)
                    assert n == r + 1
            many = [(wid, 100 + i, "many") for i in range(20)]
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)", many)
            # a cursor fetches with Execute(max_rows) inside a transaction: PortalSuspended keeps the link
            async with conn.transaction():
                got = [r[0] async for r in conn.cursor("SELECT g FROM generate_series(1, 2000) g", prefetch=150)]
            assert got == list(range(1, 2001))
            rolled = conn.transaction()
            await rolled.start()
            await conn.execute(f"INSERT INTO {table} VALUES ($1, -1, 'rolled back')", wid)
            await rolled.rollback()
        finally:
            await conn.close()

    with BackendSampler(cluster, usename="md5user", datname="testdb") as sampler:
        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(1, 6))), 60)
    sampler.stop()
    rows = cluster.execute(f"SELECT w, count(*), min(r) FROM {table} GROUP BY w ORDER BY w", dbname="testdb")
    assert rows == [(w, 30, 0) for w in range(1, 6)]
    assert sampler.max <= 2


COPY_ROWS: list[tuple[int, str | None]] = [
    (i, None if i % 17 == 0 else f"row {i}\t\\ \"q\", 'x'\nline2 é€ {'z' * (i % 50)}") for i in range(1, 1501)
]


def copy_worker(p: PoolerProcess, table: str, wid: int, in_transaction: bool) -> None:
    rows = [(wid * 100_000 + a, b) for a, b in COPY_ROWS]
    with connect(p, autocommit=not in_transaction) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {table} (a, b) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
        if in_transaction:
            # still in the same transaction, on the same server: our rows are visible before commit
            assert cur.execute(f"SELECT count(*) FROM {table} WHERE a / 100000 = %s", [wid]).fetchone() == (len(rows),)
            conn.commit()
        with cur.copy(
            f"COPY (SELECT a, b FROM {table} WHERE a / 100000 = %s ORDER BY a) TO STDOUT", params=[wid]
        ) as cp:
            cp.set_types(["int4", "text"])
            assert list(cp.rows()) == rows
        if in_transaction:
            conn.commit()


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "in-transaction"])
def test_copy_in_out_shared_pool(cluster: TempCluster, pooler: PoolerFactory, in_transaction: bool) -> None:
    p = tx_pooler(pooler, 2)
    table = fresh_table(cluster, "tx_copy", "a int PRIMARY KEY, b text")
    errors = run_threads([lambda w=w: copy_worker(p, table, w, in_transaction) for w in range(1, 6)])
    assert not errors, errors
    assert cluster.execute(f"SELECT count(*) FROM {table}", dbname="testdb") == [(5 * len(COPY_ROWS),)]


def test_big_result_shared_pool(pooler: PoolerFactory) -> None:
    import psycopg

    p = tx_pooler(pooler, 1)

    def simple() -> None:
        # simple protocol (Query, through a ClientCursor): the whole result streams before ReadyForQuery
        with connect(p) as conn, psycopg.ClientCursor(conn) as cur:
            assert big_digest(cur.execute(BIG_SQL).fetchall()) == EXPECTED_BIG

    def extended_with_param() -> None:
        with connect(p) as conn:
            rows = conn.execute("SELECT i, md5(i::text) FROM generate_series(1, %s) AS i", [BIG_N]).fetchall()
            assert big_digest(rows) == EXPECTED_BIG

    def server_cursor() -> None:
        with connect(p, autocommit=False) as conn, conn.cursor(name="bigcur") as cur:
            cur.itersize = 7000
            cur.execute(BIG_SQL)
            assert big_digest(cur) == EXPECTED_BIG
            conn.commit()

    errors = run_threads([simple, extended_with_param, server_cursor, simple])
    assert not errors, errors


def test_big_queries_held_while_others_run(pooler: PoolerFactory) -> None:
    """Clients read into one shared buffer and own one only while bytes wait (a message cut across
    reads, a client queued for a server): queries of 200 KB to 1 MB, simple and extended, queued
    behind a held server and then served one by one while small queries of other clients are read
    into the shared buffer, arrive intact."""
    p = tx_pooler(pooler, 1)
    holder = connect(p, autocommit=False)
    holder.execute("SELECT 1")  # the pool's only server stays with this transaction for now

    def big(n: int, extended: bool) -> Callable[[], None]:
        def run() -> None:
            literal = "".join(chr(97 + (i * 7 + n) % 26) for i in range(n))
            with connect(p) as conn:
                if extended:
                    got = conn.execute("SELECT md5(%s), length(%s)", [literal, literal]).fetchone()
                else:
                    got = conn.execute(f"SELECT md5('{literal}'), length('{literal}')").fetchone()
            assert got == (hashlib.md5(literal.encode()).hexdigest(), n), f"{n} bytes, extended={extended}"
        return run

    def small() -> None:
        with connect(p) as conn:
            for i in range(30):
                assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)

    results: list[list[BaseException]] = []
    runner = threading.Thread(target=lambda: results.append(run_threads(
        [big(200_000, False), big(1_000_000, True), big(300_001, True), small, small])))
    runner.start()
    time.sleep(0.5)  # everyone is queued behind `holder` by now, the big ones with their bytes held
    holder.commit()
    runner.join(60)
    holder.close()
    assert results == [[]], results


def test_failed_transaction_keeps_its_server(pooler: PoolerFactory) -> None:
    """ReadyForQuery 'E' (failed transaction block) keeps the link: with pool_size=1 another client waits
    until the ROLLBACK, and never receives the aborted transaction."""
    import psycopg

    p = tx_pooler(pooler, 1)
    a = connect(p)
    try:
        a.execute("BEGIN")
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        with pytest.raises(psycopg.errors.DivisionByZero):
            a.execute("SELECT 1/0")
        result: list[object] = []

        def other() -> None:
            start = time.monotonic()
            with connect(p) as b:
                result.append(b.execute("SELECT 'b', pg_backend_pid()").fetchone())
            result.append(time.monotonic() - start)

        errors_box: list[BaseException] = []
        t = threading.Thread(target=lambda: _catch(other, errors_box), daemon=True)
        t.start()
        time.sleep(0.6)
        assert not result, f"another client got the server of a failed, open transaction: {result} {errors_box}"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            a.execute("SELECT 1")
        assert a.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        a.execute("ROLLBACK")
        t.join(10)
        assert not errors_box, errors_box
        assert result[0] == ("b", pid)
        assert result[1] >= 0.5
        assert a.execute("SELECT 2").fetchone() == (2,)
    finally:
        a.close()


def _catch(fn: Callable[[], object], box: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # reported by the test
        box.append(e)


# ---------------------------------------------------------------------------------------------------
# 3. a client killed mid-transaction

def test_client_sigkill_mid_transaction(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 1)
    cluster.execute("CREATE TABLE IF NOT EXISTS tx_kill_rows (marker text, n int)", dbname="testdb")
    marker = f"txkill-{os.getpid()}-{time.monotonic_ns()}"
    server_pid = sigkill_mid_transaction(cluster, p.dsn("md5user", "md5pass"), "tx_kill_rows", marker)

    wait_for(
        lambda: idle_in_tx_count(cluster, "md5user") == 0,
        5,
        what="the killed client's transaction to end on the server",
    )
    # the server is closed, not rolled back and reused: it was mid-transaction
    wait_for(
        lambda: not cluster.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", params=[server_pid]),
        5,
        what=f"the killed client's server (pid {server_pid}) to be closed",
    )
    rows = cluster.execute("SELECT count(*) FROM tx_kill_rows WHERE marker = %s", dbname="testdb", params=[marker])
    assert rows == [(0,)], "rows of a killed (uncommitted) transaction became visible"

    # pool_size=1: the next client gets the (only) pool slot back and a clean transaction state
    with connect(p) as conn:
        assert conn.execute("SELECT count(*) FROM tx_kill_rows WHERE marker = %s", [marker]).fetchone() == (0,)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != server_pid
        conn.execute("INSERT INTO tx_kill_rows VALUES (%s, -1)", [marker + "-next"])
        with conn.transaction():
            conn.execute("INSERT INTO tx_kill_rows VALUES (%s, -2)", [marker + "-next"])
    got = cluster.execute(
        "SELECT count(*) FROM tx_kill_rows WHERE marker = %s", dbname="testdb", params=[marker + "-next"]
    )
    assert got == [(2,)]
    assert cluster.count_backends(usename="md5user", datname="testdb") <= 1

    # and the log says why (PgBouncer's texts; checked last so the behaviour above is reported first)
    log = p.log_text()
    assert re.search(r"C-\S+ testdb/md5user@\S+ closing because: client unexpected eof", log), log
    assert re.search(r"S-\S+ testdb/md5user@\S+ closing because: client disconnect while server was not ready", log), (
        log
    )


# ---------------------------------------------------------------------------------------------------
# 4. parameter tracking: two clients with different TimeZone/DateStyle on one server

FIXED_TS = "'2024-01-15 12:00:00+00'::timestamptz::text"
READBACK = (
    "BEGIN; SELECT current_setting('TimeZone'), current_setting('DateStyle'), current_setting('application_name'), "
    f"{FIXED_TS}, now()::text, pg_backend_pid(); COMMIT"
)


def test_timezone_datestyle_alternate_on_one_server(pooler: PoolerFactory) -> None:
    """Client A sets them in its startup packet, client B with SET; pool_size=1 forces one shared server."""
    p = tx_pooler(pooler, 1)
    a = raw_login(p, TimeZone="America/New_York", DateStyle="SQL, DMY", application_name="client-a")
    b = raw_login(p)
    try:
        b.simple_query("SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'German, DMY'; SET application_name = 'client-b'")
        expect = {
            "a": (
                "America/New_York",
                "SQL, DMY",
                "client-a",
                "15/01/2024 07:00:00 EST",
                r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d(\.\d+)? E[SD]T",
            ),
            "b": (
                "Asia/Tokyo",
                "German, DMY",
                "client-b",
                "15.01.2024 21:00:00 JST",
                r"\d\d\.\d\d\.\d{4} \d\d:\d\d:\d\d(\.\d+)? JST",
            ),
        }
        pids = set()
        for _round in range(4):
            for name, conn in (("a", a), ("b", b), ("b", b), ("a", a)):
                rows = conn.simple_query(READBACK)
                assert len(rows) == 1, rows
                tz, ds, app, fixed, now, pid = rows[0]
                exp = expect[name]
                assert (tz, ds, app, fixed) == exp[:4], f"client {name} read back another client's settings"
                assert now is not None and re.fullmatch(exp[4], now), f"client {name}: now()::text = {now!r}"
                pids.add(pid)
        assert len(pids) == 1, f"pool_size=1 but clients ran on several servers: {pids}"
    finally:
        a.terminate()
        b.terminate()


@pytest.mark.pgmux_only(reason="`options=-c ...` and IntervalStyle tracking are PgBouncer 1.20+ (1.18 refuses them)")
def test_params_from_options_alternate_on_one_server(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 1)
    opts = "-c TimeZone=Europe/Berlin -c DateStyle=Postgres,DMY -c IntervalStyle=iso_8601"
    a = connect(p, options=opts)
    b = connect(p)
    try:
        b.execute("SET TimeZone = 'America/Sao_Paulo'")
        b.execute("SET DateStyle = 'ISO, YMD'")
        b.execute("SET IntervalStyle = 'sql_standard'")
        sql = (
            "SELECT current_setting('TimeZone'), current_setting('DateStyle'), current_setting('IntervalStyle'), "
            f"{FIXED_TS}, '1 day 2 hours'::interval::text, pg_backend_pid()"
        )
        pids = set()
        for _ in range(4):
            for conn, exp in (
                (a, ("Europe/Berlin", "Postgres, DMY", "iso_8601", "Mon 15 Jan 13:00:00 2024 CET", "P1DT2H")),
                (b, ("America/Sao_Paulo", "ISO, YMD", "sql_standard", "2024-01-15 09:00:00-03", "1 2:00:00")),
            ):
                row = conn.execute(sql).fetchone()
                assert row[:5] == exp
                pids.add(row[5])
        assert len(pids) == 1
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------------
# 5. statement mode


def test_statement_mode_single_statements(cluster: TempCluster, pooler: PoolerFactory) -> None:
    import psycopg

    p = pooler(pool_mode="statement", extra={"default_pool_size": 1})
    table = fresh_table(cluster, "stmt_rows", "w int, i int")

    def worker(wid: int) -> None:
        with connect(p) as conn:
            for i in range(15):
                assert conn.execute("SELECT %s::int, %s::int", [wid, i]).fetchone() == (wid, i)
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", [wid, i])
            # several statements in one Query are one implicit transaction: allowed
            with psycopg.ClientCursor(conn) as cur:
                cur.execute(f"SELECT {wid}; SELECT {wid} + 1")
                assert cur.fetchone() == (wid,)
                assert cur.nextset() and cur.fetchone() == (wid + 1,)

    with BackendSampler(cluster, usename="md5user", datname="testdb") as sampler:
        errors = run_threads([lambda w=w: worker(w) for w in range(1, 5)])
    sampler.stop()
    assert not errors, errors
    assert cluster.execute(f"SELECT count(*) FROM {table}", dbname="testdb") == [(60,)]
    assert sampler.max <= 1


def test_statement_mode_rejects_transaction_block(cluster: TempCluster, pooler: PoolerFactory) -> None:
    import psycopg

    p = pooler(pool_mode="statement", extra={"default_pool_size": 2})
    conn = raw_login(p)
    send_query(conn, "BEGIN")
    msgs = conn.read_until_close(5)
    errs = [PgError(parse_error_fields(body)) for kind, body in msgs if kind == b"E"]
    assert [(e.severity, e.sqlstate, e.message) for e in errs] == [("FATAL", "08P01", STATEMENT_MODE_ERROR)]
    # PgBouncer sends the error instead of BEGIN's reply: a client must never see ReadyForQuery 'T'
    # (an open transaction block), or drivers believe BEGIN worked and only fail on their next query
    assert [kind for kind, _ in msgs] == [b"E"], f"the client got {msgs}"

    with connect(p) as c, pytest.raises(psycopg.OperationalError, match=STATEMENT_MODE_ERROR):
        c.execute("BEGIN")
    # psycopg's default (non-autocommit) mode opens a transaction block implicitly
    with connect(p, autocommit=False) as c, pytest.raises(psycopg.OperationalError, match=STATEMENT_MODE_ERROR):
        c.execute("SELECT 1")

    wait_for(lambda: idle_in_tx_count(cluster, "md5user") == 0, 5, what="the BEGIN's server to be closed")
    with connect(p) as c:
        assert c.execute("SELECT 41 + 1").fetchone() == (42,)
