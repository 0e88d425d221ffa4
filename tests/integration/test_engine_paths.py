"""The compiled data path (pgmux/engine) with real clients: the fast path is taken, on uvloop and on
the standard asyncio loop, for simple, extended and prepared queries, and for TLS clients."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster
from pgmux.testing.tls import make_ca

PoolerFactory = Callable[..., PoolerProcess]

pytestmark = pytest.mark.pgmux_only  # SHOW ENGINE is pgmux's


class StandardLoopPooler(PoolerProcess):
    """pgmux on the standard asyncio event loop (`--no-uvloop`)."""

    def command(self) -> list[str]:
        cmd = super().command()
        return [*cmd[:-1], "--no-uvloop", cmd[-1]]


def engine_counters(p: PoolerProcess) -> dict[str, int]:
    with psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer"), autocommit=True) as admin:
        return {name: int(value) for name, value in admin.execute("SHOW ENGINE", prepare=False).fetchall()}


def admin_userlist(cluster: TempCluster) -> dict[str, str]:
    return {"md5user": "md5pass", "postgres": "adminpass"}


def run_clients(p: PoolerProcess, **kw: Any) -> None:
    """Simple, extended and prepared queries, each in transactions of their own, from two clients."""
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb", **kw), autocommit=True) as a, \
            psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb", **kw), autocommit=True) as b:
        for i in range(200):
            conn = a if i % 2 else b
            assert conn.execute("SELECT 1", prepare=False).fetchone() == (1,)  # simple protocol (no params)
            assert conn.execute("SELECT %s::int + 1", (i,), prepare=False).fetchone() == (i + 1,)  # unnamed
            assert conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone() == (i * 2,)  # named
        with a.transaction():
            a.execute("CREATE TEMP TABLE IF NOT EXISTS t_engine (x int)")  # pinning: escapes to Python
        assert a.execute("SELECT 40 + 2").fetchone() == (42,)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_fast_path_serves_simple_extended_and_prepared(cluster: TempCluster, pooler: PoolerFactory,
                                                        loop: str) -> None:
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster), extra={"default_pool_size": 1},
               process_class=StandardLoopPooler if loop == "asyncio" else PoolerProcess)
    before = engine_counters(p)
    run_clients(p)
    after = engine_counters(p)
    fast = after["fast_reads"] - before["fast_reads"]
    escapes = after["escapes"] - before["escapes"]
    # 600 round trips each way went through the engine; almost all of them natively
    assert fast >= 1000, after
    assert escapes < 60, after


def test_tls_clients_take_the_fast_path(cluster: TempCluster, pooler: PoolerFactory, tmp_path: Any) -> None:
    cert, key = make_ca(tmp_path).issue_server(tmp_path)
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster),
               extra={"default_pool_size": 1, "client_tls_sslmode": "require", "client_tls_cert_file": str(cert),
                      "client_tls_key_file": str(key)})
    before = engine_counters_tls(p)
    run_clients(p, sslmode="require")
    after = engine_counters_tls(p)
    assert after["fast_reads"] - before["fast_reads"] >= 1000, after
    # the records of those TLS links were read and written by OpenSSL from C (pgmux/engine/_tls.pyx)
    assert after["tls_native"] - before["tls_native"] >= 2 and after["tls_python"] == 0, after


def engine_counters_tls(p: PoolerProcess) -> dict[str, int]:
    with psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer", sslmode="require"),
                         autocommit=True) as admin:
        return {name: int(value) for name, value in admin.execute("SHOW ENGINE", prepare=False).fetchall()}


def test_pgbench_through_the_engine(cluster: TempCluster, pooler: PoolerFactory, pgbench_tables: None) -> None:
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster), extra={"default_pool_size": 2})
    env = dict(os.environ, PGPASSWORD="md5pass")
    for mode in ("simple", "extended", "prepared"):
        out = subprocess.run(["pgbench", "-S", "-M", mode, "-c", "8", "-t", "200", "-h", p.host, "-p", str(p.port),
                              "-U", "md5user", "testdb"], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "number of failed transactions: 0" in out.stdout, out.stdout
    counters = engine_counters(p)
    assert counters["fast_reads"] >= 3 * 8 * 200, counters
