"""Replication connections through the pooler (PgBouncer 1.23+): a client with `replication=true`
or `replication=database` gets a server of its own for its whole session, in any pool mode, so the
real replication tools (pg_basebackup, pg_receivewal, pg_recvlogical) and a logical subscription work
through it.

PgBouncer 1.18 (Debian's) refuses replication connections, hence pgmux_only. The tests use a cluster
of their own with `wal_level = logical` (the session cluster runs with the default `replica`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster, make_dsn, wait_for
from pgmux.testing.faultproxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

REPLICATION_SETTINGS = {"wal_level": "logical", "max_wal_senders": "20", "max_replication_slots": "20"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    """Overrides the session cluster for this module: a publisher with wal_level = logical."""
    with TempCluster(settings=REPLICATION_SETTINGS) as c:
        hba = Path(c.datadir, "pg_hba.conf")
        hba.write_text("host replication all 127.0.0.1/32 trust\n" + hba.read_text())
        c.execute("SELECT pg_reload_conf()")
        c.create_test_roles()
        c.execute("CREATE ROLE norepl LOGIN PASSWORD 'noreplpass'")  # may log in, has no REPLICATION
        c.execute("CREATE TABLE repl_items (id int PRIMARY KEY, v text)")
        c.execute("CREATE PUBLICATION repl_pub FOR TABLE repl_items")
        yield c


def replication_pooler(pooler: Callable[..., PoolerProcess], server: str = "host={host} port={port}",
                       **extra: Any) -> PoolerProcess:
    """Transaction pooling (a replication client is never shared whatever the mode), trust auth;
    `replication` is the database name physical replication tools send. `server`: where the
    databases are (the session cluster by default)."""
    return pooler(
        pool_mode="transaction",
        auth_type="trust",
        databases={
            "postgres": f"{server} dbname=postgres",
            "replication": f"{server} dbname=postgres",
        },
        userlist={"postgres": "", "norepl": "noreplpass"},
        extra=extra,
    )


@pytest.fixture
def scratch() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pgmux-repl-")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_tool(cluster: TempCluster, p: PoolerProcess, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [cluster.bin(tool), "-h", "127.0.0.1", "-p", str(p.port), "-U", "postgres", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def flushed_lsn(cluster: TempCluster) -> str:
    return str(cluster.execute("SELECT pg_current_wal_flush_lsn()")[0][0])


def replication_conn(p: PoolerProcess, mode: str, user: str = "postgres", **params: Any) -> psycopg.Connection:
    return psycopg.connect(make_dsn(host="127.0.0.1", port=p.port, user=user, dbname="postgres",
                                    replication=mode, **params), autocommit=True)


def console_rows(p: PoolerProcess, what: str) -> list[dict[str, Any]]:
    with psycopg.connect(make_dsn(host="127.0.0.1", port=p.port, user="postgres", dbname="pgbouncer"),
                         autocommit=True) as conn:
        cur = conn.execute(f"SHOW {what}")
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def walsenders(cluster: TempCluster) -> int:
    return int(cluster.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'")[0][0])


def test_pg_basebackup_through_pooler(cluster: TempCluster, pooler: Callable[..., PoolerProcess],
                                      scratch: str) -> None:
    p = replication_pooler(pooler)
    target = os.path.join(scratch, "backup")
    res = run_tool(cluster, p, "pg_basebackup", "-D", target, "-X", "stream", "-c", "fast", "--no-sync")
    assert res.returncode == 0, res.stderr
    assert os.path.exists(os.path.join(target, "PG_VERSION"))
    assert os.path.exists(os.path.join(target, "backup_label"))


def test_pg_receivewal_streams_to_endpos(cluster: TempCluster, pooler: Callable[..., PoolerProcess],
                                        scratch: str) -> None:
    p = replication_pooler(pooler)
    cluster.execute("CHECKPOINT")
    end = flushed_lsn(cluster)
    res = run_tool(cluster, p, "pg_receivewal", "-D", scratch, f"--endpos={end}", "--no-loop", "--no-sync")
    assert res.returncode == 0, res.stderr
    assert any(name.endswith(".partial") or len(name) == 24 for name in os.listdir(scratch)), os.listdir(scratch)


def test_pg_recvlogical_decodes_changes(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    p = replication_pooler(pooler)
    res = run_tool(cluster, p, "pg_recvlogical", "-d", "postgres", "-S", "recvlogical_slot", "-P", "test_decoding",
                   "--create-slot")
    assert res.returncode == 0, res.stderr
    try:
        with cluster.connect() as conn:  # committed and flushed (the test cluster runs synchronous_commit = off)
            conn.execute("SET synchronous_commit = on")
            conn.execute("INSERT INTO repl_items VALUES (101, 'through the pooler')")
            end = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
        res = run_tool(cluster, p, "pg_recvlogical", "-d", "postgres", "-S", "recvlogical_slot", "--start",
                       "-f", "-", f"--endpos={end}", "--no-loop")
        assert res.returncode == 0, res.stderr
        assert "table public.repl_items: INSERT: id[integer]:101 v[text]:'through the pooler'" in res.stdout
    finally:
        cluster.execute("SELECT pg_drop_replication_slot('recvlogical_slot')")


def test_subscription_through_pooler(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    p = replication_pooler(pooler)
    cluster.execute("INSERT INTO repl_items VALUES (1, 'before') ON CONFLICT DO NOTHING")
    with TempCluster() as subscriber:
        subscriber.execute("CREATE TABLE repl_items (id int PRIMARY KEY, v text)")
        conninfo = f"host=127.0.0.1 port={p.port} user=postgres dbname=postgres"
        subscriber.execute(f"CREATE SUBSCRIPTION repl_sub CONNECTION '{conninfo}' PUBLICATION repl_pub")
        try:
            wait_for(lambda: subscriber.execute("SELECT v FROM repl_items WHERE id = 1") == [("before",)], 30,
                     what="initial table sync through the pooler")
            cluster.execute("INSERT INTO repl_items VALUES (2, 'streamed')")
            wait_for(lambda: subscriber.execute("SELECT v FROM repl_items WHERE id = 2") == [("streamed",)], 30,
                     what="streamed change through the pooler")
        finally:
            subscriber.execute("DROP SUBSCRIPTION repl_sub")  # drops the slot through the pooler too
    assert not cluster.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'repl_sub'")


def test_identify_system_on_own_server_shown_in_console(cluster: TempCluster,
                                                        pooler: Callable[..., PoolerProcess]) -> None:
    p = replication_pooler(pooler)
    system_id = cluster.execute("SELECT system_identifier::text FROM pg_control_system()")[0][0]
    before = walsenders(cluster)
    with replication_conn(p, "database") as conn:
        res = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
        assert res.get_value(0, 0) == system_id.encode()
        assert walsenders(cluster) == before + 1
        clients = [r for r in console_rows(p, "CLIENTS") if r["database"] == "postgres"]
        assert [r["replication"] for r in clients] == ["logical"]
        servers = [r for r in console_rows(p, "SERVERS") if r["database"] == "postgres"]
        assert [(r["replication"], r["state"]) for r in servers] == [("logical", "active")]
        assert servers[0]["ptr"] == clients[0]["link"]
    # never reused: the server closes with its client
    wait_for(lambda: walsenders(cluster) == before, 10, what="the replication server to close")
    assert not [r for r in console_rows(p, "SERVERS") if r["database"] == "postgres"]


def test_physical_replication_value_true(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    p = replication_pooler(pooler)
    with replication_conn(p, "true") as conn:
        res = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
        assert res.get_value(0, 3) is None  # dbname: a physical replication connection has none
        assert [r["replication"] for r in console_rows(p, "CLIENTS") if r["database"] == "postgres"] == ["physical"]


def test_unprivileged_user_gets_postgres_refusal(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    p = replication_pooler(pooler)
    with pytest.raises(psycopg.OperationalError, match="must be superuser or replication role to start walsender"):
        replication_conn(p, "database", user="norepl")
    with psycopg.connect(make_dsn(host="127.0.0.1", port=p.port, user="norepl", dbname="postgres")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the refusal is not a failing pool login


def test_replication_server_counts_against_max_db_connections(cluster: TempCluster,
                                                               pooler: Callable[..., PoolerProcess]) -> None:
    p = replication_pooler(pooler, max_db_connections=1, query_wait_timeout=1)
    plain = make_dsn(host="127.0.0.1", port=p.port, user="postgres", dbname="postgres")
    with replication_conn(p, "database"):
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            psycopg.connect(plain).execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            replication_conn(p, "database")
    with psycopg.connect(plain) as conn:  # the replication server is gone: room again
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("command", ["RECONNECT", "RELOAD"])
def test_marked_replication_server_is_closed_at_once(cluster: TempCluster, pooler: Callable[..., PoolerProcess],
                                                     scratch: str, command: str) -> None:
    """A streaming client never releases its server: RECONNECT, or a RELOAD that changed its
    database entry, closes that server at once (PgBouncer's pool_server_maint), and the client
    is told why."""
    p = replication_pooler(pooler)
    before = walsenders(cluster)
    receiver = subprocess.Popen(
        [cluster.bin("pg_receivewal"), "-h", "127.0.0.1", "-p", str(p.port), "-U", "postgres", "-D", scratch,
         "--no-loop", "--no-sync"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: walsenders(cluster) == before + 1, 10, what="pg_receivewal to stream")
        if command == "RELOAD":  # pg_receivewal's database is `replication`
            p.set_options({"replication": f"host=127.0.0.1 port={cluster.port} dbname=postgres "
                                          "application_name=changed"}, section="databases")
        with psycopg.connect(make_dsn(host="127.0.0.1", port=p.port, user="postgres", dbname="pgbouncer"),
                             autocommit=True) as admin:
            admin.execute(command, prepare=False)
        _, stderr = receiver.communicate(timeout=10)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    assert receiver.returncode != 0
    assert "database configuration changed" in stderr, stderr
    wait_for(lambda: walsenders(cluster) == before, 10, what="the replication server to close")
    assert not [r for r in console_rows(p, "SERVERS") if r["database"] == "replication"]


# --------------------------------------------------------------------------------------------------
# the replication client's server cannot be opened (PostgreSQL unreachable behind a proxy)
#
# PgBouncer queues a replication client like any other (find_server launches a connect for it, with
# no check_fast_fail): a connect that fails keeps it waiting for the retries, server_login_retry
# apart, until query_wait_timeout or client_login_timeout (its login is not finished).


def unreachable_replication_pooler(pooler: Callable[..., PoolerProcess], proxy: FaultProxy,
                                   **extra: Any) -> PoolerProcess:
    proxy.unreachable()
    return replication_pooler(pooler, f"host=127.0.0.1 port={proxy.port}", server_login_retry=1, **extra)


def failed_connects(p: PoolerProcess) -> int:
    return p.log_text().count("server login failed: connect failed: ")


def test_replication_client_is_served_once_postgres_comes_back(cluster: TempCluster,
                                                               pooler: Callable[..., PoolerProcess]) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = unreachable_replication_pooler(pooler, proxy, client_login_timeout=30, query_wait_timeout=30)
        with proxy.reachable_after(2.5):
            start = time.monotonic()
            with replication_conn(p, "true", connect_timeout=20) as conn:
                res = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
                assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
            assert time.monotonic() - start >= 2, "logged in before its server could"
    assert failed_connects(p) >= 2, p.log_text()  # retried, server_login_retry apart


@pytest.mark.parametrize("timeout", ["query_wait_timeout", "client_login_timeout"])
def test_replication_client_waits_for_retries_until_timeout(cluster: TempCluster,
                                                            pooler: Callable[..., PoolerProcess],
                                                            timeout: str) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = unreachable_replication_pooler(pooler, proxy, **{"client_login_timeout": 30, "query_wait_timeout": 30,
                                                             timeout: 3})
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as exc_info:
            replication_conn(p, "database", connect_timeout=15)
        elapsed = time.monotonic() - start
    assert str(exc_info.value).rstrip().endswith(f"FATAL:  {timeout}"), str(exc_info.value)
    assert elapsed >= 2, f"failed after {elapsed:.1f}s, before {timeout} = 3"
    assert failed_connects(p) >= 2, p.log_text()


def test_replication_login_ended_while_its_server_logs_in_closes_that_server(
        cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    """client_login_timeout ends the client while its server's login is not answered: that server
    goes too (it belongs to no pool yet)."""
    with FaultProxy(cluster.port) as proxy:
        proxy.blackhole_new(True)
        p = replication_pooler(pooler, f"host=127.0.0.1 port={proxy.port}", server_connect_timeout=30,
                               client_login_timeout=2)
        with pytest.raises(psycopg.OperationalError, match="client_login_timeout"):
            replication_conn(p, "true", connect_timeout=15)
        assert proxy.accepted == 1
        wait_for(lambda: proxy.open_count == 0, 5, what="the server's connection to close")
