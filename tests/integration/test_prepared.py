"""Prepared statements in transaction mode: every client gets its own statements' results.

Through PgBouncer 1.18 these clients fail ("prepared statement ... already exists") or, worse,
run another client's statement under the same name. pgmux renames statements per server, so
each test checks every single result, not just the absence of errors.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]


@pytest.fixture
def tx_pooler(pooler: Callable[..., PoolerProcess]) -> PoolerProcess:
    return pooler(pool_mode="transaction", extra={"default_pool_size": 2, "max_prepared_statements": 3})


def test_psycopg_auto_prepare_many_clients_small_pool(tx_pooler: PoolerProcess) -> None:
    """psycopg prepares every query (prepare_threshold=0) under the same names `_pg3_N` in each
    client; with 8 clients on 2 servers and an LRU of 3, statements are evicted and re-prepared."""
    errors: list[str] = []

    def worker(i: int) -> None:
        try:
            with psycopg.connect(tx_pooler.dsn("md5user", "md5pass"), prepare_threshold=0) as conn:
                for j in range(150):
                    kind = (i + j) % 5  # five different statements per client: more than the LRU holds
                    row = conn.execute(f"SELECT %s::int * {kind + 1} + {i * 1000}", (j,)).fetchone()
                    assert row is not None and row[0] == j * (kind + 1) + i * 1000, (i, j, row)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_asyncpg_default_statement_cache(tx_pooler: PoolerProcess) -> None:
    async def main() -> None:
        conns = [
            await asyncpg.connect(host="127.0.0.1", port=tx_pooler.port, user="md5user", password="md5pass",
                                  database="testdb")
            for _ in range(6)
        ]

        async def run(k: int, conn: asyncpg.Connection) -> None:
            for j in range(80):
                assert await conn.fetchval(f"SELECT $1::int + {k % 4}", j) == j + k % 4
                async with conn.transaction():
                    rows = await conn.fetch("SELECT g FROM generate_series(1, $1::int) g", k + 1)
                    assert [r[0] for r in rows] == list(range(1, k + 2))

        await asyncio.gather(*(run(k, c) for k, c in enumerate(conns)))
        for c in conns:
            await c.close()

    asyncio.run(main())


def test_close_and_sql_deallocate(tx_pooler: PoolerProcess) -> None:
    with psycopg.connect(tx_pooler.dsn("md5user", "md5pass"), autocommit=True) as conn:
        pg = conn.pgconn
        res = pg.prepare(b"s1", b"SELECT 41 + $1::int")
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK
        res = pg.exec_prepared(b"s1", [b"1"])
        assert res.get_value(0, 0) == b"42"
        # the name is taken: PostgreSQL refuses a second Parse under it; so do we (PgBouncer's text)
        conn.execute("DEALLOCATE s1")  # SQL DEALLOCATE of a protocol-level statement
        res = pg.prepare(b"s1", b"SELECT 'again'")
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pg.exec_prepared(b"s1", []).get_value(0, 0) == b"again"
        res = pg.close_prepared(b"s1")  # protocol Close
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK
        res = pg.exec_prepared(b"s1", [])
        assert res.status == psycopg.pq.ExecStatus.FATAL_ERROR  # PgBouncer: prepared statement did not exist


def test_failed_parse_leaves_no_statement(tx_pooler: PoolerProcess) -> None:
    with psycopg.connect(tx_pooler.dsn("md5user", "md5pass"), autocommit=True) as conn:
        pg = conn.pgconn
        bad = pg.exec_params(b"SELECT 1", [])  # warm the link
        assert bad.status == psycopg.pq.ExecStatus.TUPLES_OK
        conn.execute("BEGIN")  # keep the server so the Parse goes to it
        res = pg.prepare(b"s2", b"SELEC broken")
        assert res.status == psycopg.pq.ExecStatus.FATAL_ERROR
        conn.execute("ROLLBACK")
        res = pg.prepare(b"s2", b"SELECT 'fixed'")
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pg.exec_prepared(b"s2", []).get_value(0, 0) == b"fixed"


def test_pgbench_prepared_more_clients_than_servers(cluster: TempCluster, pooler: Callable[..., PoolerProcess],
                                                   pgbench_tables: None) -> None:
    proc = pooler(pool_mode="transaction", extra={"default_pool_size": 5, "max_client_conn": 200})
    env = dict(os.environ, PGPASSWORD="md5pass")
    r = subprocess.run(
        ["pgbench", "-n", "-M", "prepared", "-c", "50", "-j", "2", "-T", "3", "-h", "127.0.0.1",
         "-p", str(proc.port), "-U", "md5user", "testdb"],
        env=env, capture_output=True, text=True, timeout=90,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "number of failed transactions: 0 (0.000%)" in out, out


def test_bind_of_a_statement_never_prepared_closes_the_client(tx_pooler: PoolerProcess) -> None:
    """A Bind (or Describe) of a statement name the client never prepared through pgmux, before
    any named Parse: PgBouncer 1.25 closes the client with `prepared statement did not exist`
    (the name could only be another client's). A client pinned by SQL PREPARE keeps its server,
    where its statement is: its Bind goes through."""
    for send in (lambda pg: pg.send_query_prepared(b"never_prepared", []),
                 lambda pg: pg.send_describe_prepared(b"never_prepared")):
        conn = psycopg.connect(tx_pooler.dsn("md5user", "md5pass"), autocommit=True)
        try:
            send(conn.pgconn)
            res = conn.pgconn.get_result()
            assert res is not None and res.status == psycopg.pq.ExecStatus.FATAL_ERROR
            assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"08P01"
            assert res.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY) == b"prepared statement did not exist"
            while conn.pgconn.get_result() is not None:
                pass
            assert conn.pgconn.status == psycopg.pq.ConnStatus.BAD  # closed by pgmux
        finally:
            conn.close()
    with psycopg.connect(tx_pooler.dsn("md5user", "md5pass"), autocommit=True) as conn:
        conn.execute("PREPARE by_sql AS SELECT 41 + 1")  # session state: the client is pinned
        conn.pgconn.send_query_prepared(b"by_sql", [])
        res = conn.pgconn.get_result()
        assert res is not None and res.status == psycopg.pq.ExecStatus.TUPLES_OK and res.get_value(0, 0) == b"42"
        while conn.pgconn.get_result() is not None:
            pass
        assert conn.execute("SELECT 1").fetchone() == (1,)
