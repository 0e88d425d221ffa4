"""Per-query statistics (SHOW QUERIES, RESET QUERIES, /metrics): statements normalized as
pg_stat_statements does, one row per (database, user, statement), counted by the engine."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster
from tests.integration.helpers_tx import run_pgbench

PoolerFactory = Callable[..., PoolerProcess]

pytestmark = pytest.mark.pgmux_only  # SHOW QUERIES is pgmux's

USERS = {"md5user": "md5pass", "postgres": "adminpass"}
PGBENCH_SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


def console(p: PoolerProcess) -> psycopg.Connection[Any]:
    return psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer"), autocommit=True)


def show_queries(p: PoolerProcess) -> dict[str, dict[str, Any]]:
    """SHOW QUERIES as {query: row}, for testdb/md5user (every test here uses only those)."""
    with console(p) as admin:
        cur = admin.execute("SHOW QUERIES", prepare=False)
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    assert names[:4] == ["database", "user", "query", "calls"]
    out = {}
    for row in rows:
        assert (row["database"], row["user"]) == ("testdb", "md5user"), row
        assert row["query"] not in out, f"two rows for one statement: {row}"
        out[row["query"]] = row
    return out


def plausible(row: dict[str, Any]) -> None:
    """Times in microseconds: all > 0, mean <= p99 <= max, p50 <= p95 <= p99."""
    assert row["total_query_time"] > 0 and row["avg_query_time"] > 0, row
    assert 0 < row["p50_query_time"] <= row["p95_query_time"] <= row["p99_query_time"] <= row["max_query_time"], row
    assert row["avg_query_time"] <= row["p99_query_time"], row
    assert row["avg_query_time"] * row["calls"] <= row["total_query_time"] < (row["avg_query_time"] + 1) * row["calls"]


def test_pgbench_and_constants_give_one_row_each(cluster: TempCluster, pooler: PoolerFactory,
                                                 pgbench_tables: None) -> None:
    p = pooler(pool_mode="transaction", userlist=USERS, extra={"default_pool_size": 4})
    res = run_pgbench(p.dsn("md5user", "md5pass", dbname="testdb"), "-S", "-c", "4", "-t", "100")
    assert res.returncode == 0 and res.processed == 400, res.describe()
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"), autocommit=True) as conn:
        for i in range(50):  # constants in the text: the simple protocol, one statement
            sql = f"SELECT aid, {i} * 2 FROM  pgbench_accounts\n WHERE aid = {i + 1} AND aid > -{i}.5 -- run {i}"
            assert conn.execute(sql.encode(), prepare=False).fetchone() == (i + 1, i * 2)
    rows = show_queries(p)
    assert rows[PGBENCH_SELECT]["calls"] == 400, rows
    assert rows[PGBENCH_SELECT]["rows"] == 400 and rows[PGBENCH_SELECT]["errors"] == 0
    mine = rows["SELECT aid, $1 * $2 FROM pgbench_accounts WHERE aid = $3 AND aid > $4"]
    assert mine["calls"] == 50 and mine["rows"] == 50 and mine["errors"] == 0, mine
    for row in (rows[PGBENCH_SELECT], mine):
        plausible(row)
        assert row["queryid"] != 0
    # the most total time first
    totals = [r["total_query_time"] for r in rows.values()]
    assert totals == sorted(totals, reverse=True)


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_extended_and_prepared_count_under_their_text(cluster: TempCluster, pooler: PoolerFactory,
                                                      pool_mode: str) -> None:
    p = pooler(pool_mode=pool_mode, userlist=USERS, extra={"default_pool_size": 2})
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"), autocommit=True) as conn:
        for i in range(30):
            assert conn.execute("SELECT %s::int + 1", (i,), prepare=False).fetchone() == (i + 1,)  # unnamed
        for i in range(30):
            assert conn.execute("SELECT %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)  # named
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / %s::int", (0,))
        assert len(conn.execute("SELECT generate_series(1, %s::int)", (7,)).fetchall()) == 7
    rows = show_queries(p)
    plus = rows["SELECT $1::int + $2"]
    assert plus["calls"] == 60 and plus["rows"] == 60 and plus["errors"] == 0, rows
    plausible(plus)
    assert rows["SELECT $1 / $2::int"]["errors"] == 3 and rows["SELECT $1 / $2::int"]["calls"] == 3
    assert rows["SELECT generate_series($1, $2::int)"]["rows"] == 7


def test_wait_time_and_reset(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = pooler(pool_mode="transaction", userlist=USERS, extra={"default_pool_size": 1})
    holder = psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"))
    holder.execute("SELECT 'holding the only server'")
    done = threading.Event()

    def release() -> None:
        time.sleep(0.4)
        holder.commit()
        done.set()

    threading.Thread(target=release).start()
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"), autocommit=True) as waiter:
        waiter.execute("SELECT 'waited'", prepare=False)
    assert done.wait(5)
    holder.close()
    rows = show_queries(p)
    assert rows["SELECT $1"]["calls"] == 2
    assert rows["SELECT $1"]["total_wait_time"] >= 300_000, rows  # the waiter's ~0.4 s
    with console(p) as admin:
        assert admin.execute("RESET QUERIES").statusmessage == "RESET"
        with pytest.raises(psycopg.errors.ProtocolViolation):
            admin.execute("RESET SOMETHING")
    assert show_queries(p) == {}
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"), autocommit=True) as conn:
        conn.execute("SELECT 2", prepare=False)
    assert show_queries(p)["SELECT $1"]["calls"] == 1


def test_bounded_with_an_other_row_and_off(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = pooler(pool_mode="transaction", userlist=USERS, extra={"query_stats_max": 3})
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"), autocommit=True) as conn:
        for i in range(10):
            conn.execute(f"SELECT 1 AS c{i}", prepare=False)
        conn.execute("SELECT 1 AS c9", prepare=False)
    rows = show_queries(p)
    assert len(rows) == 4, rows  # 3 statements and the other row
    assert rows["(other)"]["calls"] == 7 and rows["(other)"]["queryid"] == 0
    assert rows["SELECT $1 AS c9"]["calls"] == 2
    assert sum(r["calls"] for r in rows.values()) == 11

    off = pooler(pool_mode="transaction", userlist=USERS, extra={"query_stats": 0})
    with psycopg.connect(off.dsn("md5user", "md5pass", dbname="testdb"), autocommit=True) as conn:
        conn.execute("SELECT 1", prepare=False)
    assert show_queries(off) == {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_has_the_top_statements(cluster: TempCluster, pooler: PoolerFactory) -> None:
    port = free_port()
    p = pooler(pool_mode="transaction", userlist=USERS,
               extra={"metrics_listen": f"127.0.0.1:{port}", "query_stats_metrics": 2})
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"), autocommit=True) as conn:
        for i in range(5):
            conn.execute("SELECT pg_sleep(0.01)", prepare=False)
            conn.execute(f"SELECT {i}", prepare=False)
            conn.execute(f"SELECT {i}, {i}", prepare=False)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    calls = [line for line in body.splitlines() if line.startswith("pgmux_query_calls_total{")]
    assert len(calls) == 2, calls  # capped at query_stats_metrics, the most total time first
    assert any('query="SELECT pg_sleep($1)"' in line and line.endswith(" 5.0") for line in calls), calls
    assert 'pgmux_query_latency_seconds{' in body and 'quantile="0.99"' in body
