"""The admin console (``psql -p 6432 pgbouncer``): access, every SHOW, control commands, metrics.

Column lists are current PgBouncer's (shared/spec/pgbouncer.md section 2); Debian's PgBouncer 1.18 has
older ones, so the column tests are pgmux-only, while the behaviour tests (PAUSE, KILL, RECONNECT,
RELOAD, error texts) also run against PgBouncer with ``--pooler=pgbouncer``.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from pgwire import RawConn

from pgmux.protocol.messages import message, parse_data_row
from pgmux.testing.cluster import PoolerProcess, TempCluster, free_port, tail, wait_for, write_config

pytestmark = pytest.mark.integration

ADMIN_PW = "adminpass"
STATS_PW = "statspass"

# ---------------------------------------------------------------------------------------------------
# the spec's column lists (current PgBouncer), in order

SOCKET_COLS = [
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr", "local_port",
    "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls",
    "application_name", "prepared_statements", "id",
]
SPEC_COLUMNS: dict[str, list[str]] = {
    "pools": ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
              "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested",
              "sv_login", "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts"],
    "stats": ["database", "total_server_assignment_count", "total_xact_count", "total_query_count",
              "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
              "total_client_parse_count", "total_server_parse_count", "total_bind_count",
              "total_client_login_count", "avg_server_assignment_count", "avg_xact_count", "avg_query_count",
              "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time",
              "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count", "avg_client_login_count"],
    "stats_totals": ["database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
                     "bytes_sent", "xact_time", "query_time", "wait_time", "client_parse_count",
                     "server_parse_count", "bind_count", "client_login_count"],
    "stats_averages": ["database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
                       "bytes_sent", "xact_time", "query_time", "wait_time", "avg_client_parse_count",
                       "avg_server_parse_count", "avg_bind_count", "avg_client_login_count"],
    "totals": ["name", "value"],
    "servers": SOCKET_COLS,
    "clients": SOCKET_COLS,
    "sockets": SOCKET_COLS + ["recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail",
                              "send_avail"],
    "active_sockets": SOCKET_COLS + ["recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain",
                                     "pkt_avail", "send_avail"],
    "databases": ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
                  "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections",
                  "current_connections", "max_client_connections", "current_client_connections", "paused",
                  "disabled"],
    "users": ["name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
              "current_connections", "max_user_client_connections", "current_client_connections"],
    "config": ["key", "value", "default", "changeable"],
    "lists": ["list", "items"],
    "mem": ["name", "size", "used", "free", "memtotal"],
    "state": ["key", "value"],
    "version": ["version"],
    "peers": ["peer_id", "host", "port", "pool_size"],
    "peer_pools": ["peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"],
    "dns_hosts": ["hostname", "ttl", "addrs"],
    "dns_zones": ["zonename", "serial", "count"],
}
LISTS_ROWS = ["databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients",
              "login_clients", "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending"]
TOTALS_NAMES = ["server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
                "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
                "ps_bind_count", "client_login_count"]


# ---------------------------------------------------------------------------------------------------
# helpers


def userlist(cluster: TempCluster) -> dict[str, str]:
    return {
        "md5user": "md5pass",
        "scramuser": cluster.role_secret("scramuser"),
        "trustuser": "",
        "postgres": ADMIN_PW,
        "statsuser": STATS_PW,
        "nobody": "nobodypass",
    }


def admin_config(cluster: TempCluster, pool_mode: str = "transaction", **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"admin_users": "postgres", "stats_users": "statsuser", "stats_period": 1}
    settings.update(extra)
    return {"pool_mode": pool_mode, "userlist": userlist(cluster), "extra": settings}


def console(p: PoolerProcess, user: str = "postgres", password: str = ADMIN_PW, **kw: Any) -> psycopg.Connection:
    return psycopg.connect(p.dsn(user, password, dbname="pgbouncer"), autocommit=True, **kw)


def app(p: PoolerProcess, user: str = "md5user", password: str = "md5pass", dbname: str = "testdb",
        **kw: Any) -> psycopg.Connection:
    return psycopg.connect(p.dsn(user, password, dbname=dbname), autocommit=True, **kw)


def show(conn: psycopg.Connection, what: str) -> tuple[list[str], list[dict[str, Any]]]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description or []]
    return names, [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def rows_by(conn: psycopg.Connection, what: str, key: str) -> dict[Any, dict[str, Any]]:
    return {r[key]: r for r in show(conn, what)[1]}


class Background:
    """Run a blocking call in a thread; `.done`, `.result`, `.error`."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._t.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    @property
    def done(self) -> bool:
        return not self._t.is_alive()

    def join(self, timeout: float = 10.0) -> Any:
        self._t.join(timeout)
        assert not self._t.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def admin_pooler(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> PoolerProcess:
    return pooler(**admin_config(cluster))


@pytest.fixture(scope="module")
def shared_pooler(request: pytest.FixtureRequest, cluster: TempCluster, pooler_kind: str) -> Iterator[PoolerProcess]:
    """One pooler for the read-only column checks (starting one per SHOW would be slow)."""
    workdir = tempfile.mkdtemp(prefix="pgmux-admin-")
    os.chmod(workdir, 0o755)
    ini, users = write_config(cluster, workdir=workdir, **admin_config(cluster))
    proc = PoolerProcess(pooler_kind, ini, users, workdir).start()
    try:
        yield proc
    finally:
        proc.stop()
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(tail(proc.log_text(), 60))
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# access


def test_admin_and_stats_users(admin_pooler: PoolerProcess) -> None:
    with console(admin_pooler) as a:
        params = a.info.parameter_status
        assert a.info.parameter_status("server_version").endswith("/bouncer")
        assert params("client_encoding") == "UTF8" and params("is_superuser") == "on"
        assert params("TimeZone") == "GMT" and params("DateStyle") == "ISO"
        assert params("standard_conforming_strings") == "on" and params("server_encoding") == "UTF8"
    with console(admin_pooler, "statsuser", STATS_PW) as s:
        assert show(s, "pools")[1]
        for command in ("PAUSE", "RESUME", "RELOAD", "KILL testdb", "SET default_pool_size = 5", "SHOW FDS",
                        "SHUTDOWN", "DISABLE testdb", "RECONNECT"):
            with pytest.raises(psycopg.errors.ProtocolViolation, match="^admin access needed$") as exc:
                s.execute(command)
            assert exc.value.sqlstate == "08P01"
        assert show(s, "version")[1]  # the session goes on after an error
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        console(admin_pooler, "nobody", "nobodypass")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        console(admin_pooler, "postgres", "wrong")


@pytest.mark.pgmux_only  # PgBouncer runs as user postgres here: not the test's own UID
def test_same_uid_unix_socket_login(admin_pooler: PoolerProcess) -> None:
    dsn = admin_pooler.unix_dsn("pgbouncer", dbname="pgbouncer")
    with psycopg.connect(dsn, autocommit=True) as a:
        clients = show(a, "clients")[1]
        mine = [c for c in clients if c["database"] == "pgbouncer"]
        assert len(mine) == 1
        assert mine[0]["addr"] == "unix" and mine[0]["remote_pid"] == os.getpid()
        a.execute("PAUSE")  # admin rights
        a.execute("RESUME")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(admin_pooler.dsn("pgbouncer", "", dbname="pgbouncer"))  # TCP: no such privilege


# ---------------------------------------------------------------------------------------------------
# every SHOW: column names and order


@pytest.mark.pgmux_only  # PgBouncer 1.18 has the older column lists
@pytest.mark.parametrize("what", sorted(SPEC_COLUMNS))
def test_show_columns(shared_pooler: PoolerProcess, what: str) -> None:
    with app(shared_pooler) as c, console(shared_pooler) as a:
        c.execute("select 1")
        names, rows = show(a, what)
        assert names == SPEC_COLUMNS[what]
        # SELECT is routed like SHOW; keywords are case-insensitive; a trailing ; is fine
        cur = a.execute(f"select {what.upper()};")
        assert [d.name for d in cur.description or []] == SPEC_COLUMNS[what]
    if what == "lists":
        assert [r["list"] for r in rows] == LISTS_ROWS
    if what == "totals":
        assert [r["name"] for r in rows] == [f"total_{n}" for n in TOTALS_NAMES] + [f"avg_{n}" for n in TOTALS_NAMES]
    if what == "state":
        assert rows == [{"key": "active", "value": "yes"}, {"key": "paused", "value": "no"},
                        {"key": "suspended", "value": "no"}]
    if what == "config":
        keys = [r["key"] for r in rows]
        assert "max_client_conn" in keys and "stats_users" in keys
        assert {r["changeable"] for r in rows} == {"yes", "no"}
    if what in ("pools", "databases", "stats"):
        assert "pgbouncer" in [r.get("database", r.get("name")) for r in rows]


@pytest.mark.pgmux_only
def test_show_version_help_and_fake_params(shared_pooler: PoolerProcess) -> None:
    import subprocess
    import sys

    with console(shared_pooler) as a:
        cur = a.execute("SHOW VERSION")
        assert [d.name for d in cur.description or []] == ["version"]
        version = cur.fetchall()
        cli = subprocess.run([sys.executable, "-m", "pgmux", "--version"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True)
        assert version == [(cli.stdout.splitlines()[0],)]
        notices: list[tuple[str | None, str | None]] = []
        a.add_notice_handler(lambda d: notices.append((d.message_primary, d.message_detail)))
        cur = a.execute("SHOW HELP")
        assert cur.statusmessage == "SHOW" and cur.description is None
        assert notices[0][0] == "Console usage"
        assert "SHOW HELP|CONFIG|DATABASES" in (notices[0][1] or "")
        assert a.execute("SHOW client_encoding").fetchall() == [("UTF-8",)]
        assert a.execute("show TimeZone").fetchall() == [("GMT",)]
        cur = a.execute("SET client_encoding = 'LATIN1'")
        assert cur.statusmessage == "SET" and notices[-1][0] == "SET ignored"


def test_error_texts(admin_pooler: PoolerProcess) -> None:
    cases = {
        "select 1": "invalid command 'select 1', use SHOW HELP;",
        "show nosuch": "invalid command 'show nosuch', use SHOW HELP;",
        "show pools;;": "invalid command 'show pools;;', use SHOW HELP;",
        "frobnicate": "invalid command 'frobnicate', use SHOW HELP;",
        "reload now": "invalid command 'reload now', use SHOW HELP;",
        "shutdown later": "invalid command 'shutdown later', use SHOW HELP;",
        "pause nosuch": "no such database: nosuch",
        "pause pgbouncer": "cannot pause admin db: pgbouncer",
        "kill pgbouncer": "cannot kill admin db: pgbouncer",
        "disable": "a database is required",
        "disable pgbouncer": "cannot disable admin db: pgbouncer",
        "resume": "pooler is not paused/suspended",
        "resume testdb": "database testdb is not paused",
        "set nosuch_setting = 1": "SET failed",
        "set listen_port = 7000": "SET failed",  # not reloadable
    }
    with console(admin_pooler) as a:
        for query, message in cases.items():
            if query == "set listen_port = 7000" and admin_pooler.kind == "pgbouncer":
                continue  # PgBouncer 1.18 accepts it and keeps the old value
            with pytest.raises(psycopg.errors.ProtocolViolation) as exc:
                a.execute(query)
            assert exc.value.diag.message_primary == message, query
            assert exc.value.diag.severity == "ERROR" and exc.value.sqlstate == "08P01"
        assert show(a, "version")[1]


# ---------------------------------------------------------------------------------------------------
# real values after known traffic


@pytest.mark.pgmux_only  # current column names
def test_stats_count_transactions(admin_pooler: PoolerProcess) -> None:
    n = 7
    with app(admin_pooler) as c:
        for i in range(n):
            c.execute("select %s::int", (i,), prepare=False)
        with c.transaction():  # one more transaction of two statements
            c.execute("select 1")
            c.execute("select 2")
        with console(admin_pooler) as a:
            stats = rows_by(a, "stats", "database")["testdb"]
            assert stats["total_xact_count"] == n + 1
            assert stats["total_query_count"] == n + 4  # BEGIN, 2 selects, COMMIT
            assert stats["total_client_login_count"] == 1
            assert stats["total_received"] > 0 and stats["total_sent"] > stats["total_received"]
            assert stats["total_xact_time"] >= stats["total_query_time"] > 0
            assert stats["total_server_assignment_count"] >= n + 1
            assert all(isinstance(v, Decimal) for k, v in stats.items() if k != "database")
            totals = rows_by(a, "stats_totals", "database")["testdb"]
            assert totals["xact_count"] == n + 1 and totals["bytes_received"] == stats["total_received"]
            by_name = {r["name"]: r["value"] for r in show(a, "totals")[1]}
            all_xacts = sum(r["total_xact_count"] for r in show(a, "stats")[1])
            assert by_name["total_xact_count"] >= all_xacts - 1  # the console counts its own SHOWs too

            # the averages cover the last one or two stats_period (1 s here): keep some traffic going
            def recent_averages() -> dict[str, Any] | None:
                c.execute("select 1")
                row = rows_by(a, "stats", "database")["testdb"]
                return row if row["avg_xact_count"] > 0 and row["avg_xact_time"] > 0 else None

            avg = wait_for(recent_averages, 3, what="non-zero averages")
            assert avg["avg_query_count"] >= avg["avg_xact_count"]
            assert rows_by(a, "stats_averages", "database")["testdb"]["xact_count"] >= 0
    wait_for(lambda: "stats: " in admin_pooler.log_text(), 3, what="the periodic stats log line")


def test_waiting_client_in_pools(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(**admin_config(cluster, default_pool_size=1))
    with app(p) as holder, app(p) as waiter, console(p) as a:
        holder.execute("begin")
        holder.execute("select 1")
        blocked = Background(lambda: waiter.execute("select 2").fetchall())
        pool = wait_for(lambda: (r := rows_by(a, "pools", "database")["testdb"])["cl_waiting"] == 1 and r,
                        5, what="cl_waiting = 1")
        assert pool["sv_active"] == 1 and pool["cl_active"] >= 1
        time.sleep(1.05)
        pool = rows_by(a, "pools", "database")["testdb"]
        assert pool["maxwait"] >= 1 and 0 <= pool["maxwait_us"] < 1_000_000
        states = {r["state"] for r in show(a, "clients")[1] if r["database"] == "testdb"}
        assert states == {"active", "waiting"}
        assert not blocked.done
        holder.execute("commit")
        assert blocked.join() == [(2,)]
        pool = rows_by(a, "pools", "database")["testdb"]
        assert pool["cl_waiting"] == 0 and pool["maxwait"] == 0


def test_clients_and_servers_rows(admin_pooler: PoolerProcess) -> None:
    with app(admin_pooler, application_name="probe-app") as c, console(admin_pooler) as a:
        c.execute("begin")
        pid = c.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        servers = [s for s in show(a, "servers")[1] if s["database"] == "testdb"]
        assert [s["remote_pid"] for s in servers] == [pid]
        server = servers[0]
        assert server["type"] == "S" and server["user"] == "md5user" and server["state"] == "active"
        clients = [r for r in show(a, "clients")[1] if r["database"] == "testdb"]
        assert len(clients) == 1
        client = clients[0]
        assert client["type"] == "C" and client["user"] == "md5user" and client["state"] == "active"
        assert client["application_name"] == "probe-app"
        assert client["link"] == server["ptr"] and server["link"] == client["ptr"]
        assert client["addr"] == "127.0.0.1" and client["local_port"] == admin_pooler.port
        assert time.strptime(client["connect_time"][:19], "%Y-%m-%d %H:%M:%S")
        if admin_pooler.kind == "pgmux":
            assert client["replication"] == "none" and isinstance(client["id"], int)
        c.execute("commit")


# ---------------------------------------------------------------------------------------------------
# pgbouncer_exporter


def test_pgbouncer_exporter_queries(shared_pooler: PoolerProcess) -> None:
    """What prometheus-community/pgbouncer_exporter (collector.go) sends and reads, by column name."""
    with console(shared_pooler) as a:
        a.execute("SHOW STATS").fetchall()  # the exporter's ping
        cur = a.execute("SHOW VERSION;")
        assert [d.name for d in cur.description or []] == ["version"] and len(cur.fetchall()) == 1
        cur = a.execute("SHOW LISTS;")
        assert len(cur.description or []) == 2
        for _name, items in cur.fetchall():
            float(items)
        cur = a.execute("SHOW CONFIG;")
        assert len(cur.description or []) in (3, 4)
        config = {row[0]: row[1] for row in cur.fetchall()}
        float(config["max_client_conn"]), float(config["max_user_connections"])
        wanted = {
            "databases": {"name", "host", "port", "database", "force_user", "pool_size", "pool_mode",
                          "max_connections", "current_connections", "paused", "disabled"},
            "stats_totals": {"database", "query_count", "query_time", "bytes_received", "bytes_sent",
                             "wait_time", "xact_count", "xact_time"},
            "pools": {"database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
                      "sv_tested", "sv_login", "maxwait"},
        }
        if shared_pooler.kind == "pgmux":
            wanted["stats_totals"] |= {"client_parse_count", "server_parse_count", "bind_count"}
            wanted["pools"] |= {"cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel",
                                "sv_being_canceled"}
        for namespace, columns in wanted.items():
            cur = a.execute(f"SHOW {namespace};")
            names = [d.name for d in cur.description or []]
            assert columns <= set(names), namespace
            for row in cur.fetchall():
                for name, value in zip(names, row, strict=True):
                    if name in columns and name not in ("name", "host", "database", "force_user", "pool_mode",
                                                        "user") and value is not None:
                        float(value)


# ---------------------------------------------------------------------------------------------------
# extended protocol (beyond PgBouncer)


@pytest.mark.pgmux_only
def test_extended_protocol_psycopg(admin_pooler: PoolerProcess) -> None:
    with app(admin_pooler) as c:
        c.execute("select 1")
    with console(admin_pooler) as a:
        cur = a.execute("SHOW POOLS", prepare=True)
        assert [d.name for d in cur.description or []] == SPEC_COLUMNS["pools"]
        rows = cur.fetchall()
        assert ("testdb", "md5user") in [(r[0], r[1]) for r in rows]
        again = a.execute("SHOW POOLS", prepare=True).fetchall()  # re-executes the prepared statement
        assert len(again) == len(rows)
        binary = a.cursor(binary=True)
        stats = {r[0]: r for r in binary.execute("SHOW STATS", prepare=True).fetchall()}
        assert stats["testdb"][2] == 1 and isinstance(stats["testdb"][2], Decimal)
        with a.cursor(binary=True) as cur2:
            cur2.execute("SHOW CLIENTS", prepare=True)
            ids = [r[-1] for r in cur2.fetchall()]
            assert all(isinstance(i, int) for i in ids)
        with psycopg.ClientCursor(a) as cc:
            cc.execute("SHOW DATABASES")
            assert [d.name for d in cc.description or []] == SPEC_COLUMNS["databases"]
        with pytest.raises(psycopg.errors.ProtocolViolation, match="invalid command"):
            a.execute("SHOW NOTHING", prepare=True)
        assert a.execute("SHOW STATE", prepare=True).fetchall()[0] == ("active", "yes")  # recovered after Sync
        cur = a.execute("RECONNECT", prepare=True)
        assert cur.statusmessage == "RECONNECT" and cur.description is None
        with pytest.raises(psycopg.errors.ProtocolViolation, match="not paused"):
            a.execute("RESUME testdb", prepare=True)


@pytest.mark.pgmux_only
async def test_extended_protocol_asyncpg(admin_pooler: PoolerProcess) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=admin_pooler.host, port=admin_pooler.port, user="postgres",
                                 password=ADMIN_PW, database="pgbouncer", statement_cache_size=0)
    try:
        rows = await conn.fetch("SHOW STATS")  # binary results, numeric included
        assert list(rows[0].keys()) == SPEC_COLUMNS["stats"]
        admin_row = [r for r in rows if r["database"] == "pgbouncer"][0]
        assert admin_row["total_client_login_count"] == Decimal(1)
        lists = await conn.fetch("SHOW LISTS")
        assert [r["list"] for r in lists] == LISTS_ROWS
        assert await conn.fetchval("SHOW VERSION") == f"pgmux {__import__('pgmux').__version__}"
        await conn.execute("RECONNECT")
        with pytest.raises(asyncpg.PostgresError, match="invalid command"):
            await conn.fetch("SHOW NOTHING")
        assert (await conn.fetch("SHOW STATE"))[0]["value"] == "yes"
    finally:
        await conn.close()


@pytest.mark.pgmux_only
def test_extended_protocol_row_limit(admin_pooler: PoolerProcess) -> None:
    """Execute with a row limit suspends the portal (PortalSuspended); the next Execute sends the rest
    and CommandComplete. No driver here asks for a limit on the console, so the messages are raw."""
    with RawConn(admin_pooler.host, admin_pooler.port) as raw:
        raw.login("postgres", "pgbouncer", ADMIN_PW)
        raw.send(message(b"P", b"\0SHOW LISTS\0" + struct.pack("!h", 0))
                 + message(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
                 + message(b"E", b"\0" + struct.pack("!i", 2))
                 + message(b"E", b"\0" + struct.pack("!i", 0))
                 + message(b"S"))
        answer = []
        while (msg := raw.read_message())[0] != b"Z":
            answer.append(msg)
    kinds = [k for k, _ in answer]
    assert kinds[:5] == [b"1", b"2", b"D", b"D", b"s"], kinds
    assert kinds[5:] == [b"D"] * (len(LISTS_ROWS) - 2) + [b"C"], kinds
    assert [parse_data_row(body)[0] for k, body in answer if k == b"D"] == LISTS_ROWS
    assert answer[-1][1] == b"SHOW\0"


# ---------------------------------------------------------------------------------------------------
# process control


def test_pause_waits_for_transactions_and_holds_new_ones(cluster: TempCluster,
                                                         pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(**admin_config(cluster))
    with app(p) as running, app(p) as newcomer, console(p) as a, console(p) as watcher:
        newcomer.execute("select 1")
        running.execute("begin")
        running.execute("select 1")
        pause = Background(lambda: a.execute("PAUSE testdb").statusmessage)
        time.sleep(0.4)
        assert not pause.done, "PAUSE must wait for the running transaction"
        assert rows_by(watcher, "databases", "name")["testdb"]["paused"] == 1
        held = Background(lambda: newcomer.execute("select 2").fetchall())
        time.sleep(0.3)
        assert not held.done
        running.execute("commit")  # the transaction ends: its server is released and closed
        assert pause.join(5) == "PAUSE"
        wait_for(lambda: rows_by(watcher, "pools", "database")["testdb"]["cl_waiting"] == 1, 3, what="held client")
        assert rows_by(watcher, "pools", "database")["testdb"]["sv_idle"] == 0
        time.sleep(0.3)
        assert not held.done, "PAUSE holds new transactions until RESUME"
        assert watcher.execute("RESUME testdb").statusmessage == "RESUME"
        assert held.join(5) == [(2,)]
        assert running.execute("select 3").fetchall() == [(3,)]


def assert_held_until_resume(c: psycopg.Connection, a: psycopg.Connection, n: int) -> None:
    """``select n`` on ``c`` waits (paused or suspended) until RESUME on console ``a``, then answers."""
    held = Background(lambda: c.execute(f"select {n}").fetchall())
    time.sleep(0.3)
    assert not held.done
    a.execute("RESUME")
    assert held.join(5) == [(n,)]


def test_global_pause_and_resume(admin_pooler: PoolerProcess) -> None:
    with app(admin_pooler) as c, console(admin_pooler) as a:
        c.execute("select 1")
        assert a.execute("PAUSE").statusmessage == "PAUSE"  # nothing running: returns at once
        if admin_pooler.kind == "pgmux":
            assert {r["key"]: r["value"] for r in show(a, "state")[1]}["paused"] == "yes"
        with pytest.raises(psycopg.errors.ProtocolViolation, match="^already suspended/paused$"):
            a.execute("PAUSE")
        assert_held_until_resume(c, a, 5)


def test_kill_drops_the_database_clients(admin_pooler: PoolerProcess) -> None:
    with app(admin_pooler) as c1, app(admin_pooler) as c2, app(admin_pooler, dbname="postgres",
                                                                user="postgres", password=ADMIN_PW) as other, \
            console(admin_pooler) as a:
        c1.execute("begin")
        c1.execute("select 1")
        c2.execute("select 1")
        other.execute("select 1")
        assert a.execute("KILL testdb").statusmessage == "KILL"
        for c in (c1, c2):
            with pytest.raises(psycopg.OperationalError):
                c.execute("select 1")
        assert other.execute("select 7").fetchall() == [(7,)]  # other databases are untouched
        pools = rows_by(a, "pools", "database")
        if "testdb" in pools:  # PgBouncer drops the pool, pgmux keeps it (and its counters)
            assert pools["testdb"]["cl_active"] == 0 and pools["testdb"]["sv_active"] == 0
        assert rows_by(a, "databases", "name")["testdb"]["paused"] == 1
        a.execute("RESUME testdb")
    with app(admin_pooler) as again:
        assert again.execute("select 8").fetchall() == [(8,)]


def test_reconnect_replaces_servers_when_released(admin_pooler: PoolerProcess) -> None:
    with app(admin_pooler) as c, console(admin_pooler) as a:
        c.execute("begin")
        old_pid = c.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert a.execute("RECONNECT testdb").statusmessage == "RECONNECT"
        servers = [s for s in show(a, "servers")[1] if s["database"] == "testdb"]
        assert [(s["remote_pid"], s["close_needed"]) for s in servers] == [(old_pid, 1)]
        assert c.execute("select pg_backend_pid()").fetchone()[0] == old_pid  # type: ignore[index]
        c.execute("commit")  # released: closed, not reused
        a.execute("WAIT_CLOSE testdb")
        new_pid = c.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert new_pid != old_pid
        assert [s["close_needed"] for s in show(a, "servers")[1] if s["database"] == "testdb"] == [0]


def test_reload_applies_pool_size_and_new_database(cluster: TempCluster,
                                                   pooler: Callable[..., PoolerProcess]) -> None:
    cfg = admin_config(cluster, default_pool_size=1)
    p = pooler(**cfg)
    with app(p) as holder, app(p) as waiter, console(p) as a:
        holder.execute("begin")
        holder.execute("select 1")
        blocked = Background(lambda: waiter.execute("select 2").fetchall())
        wait_for(lambda: rows_by(a, "pools", "database")["testdb"]["cl_waiting"] == 1, 5, what="a waiting client")
        databases = {"testdb": "host={host} port={port} dbname=testdb",
                     "postgres": "host={host} port={port}",
                     "newdb": "host={host} port={port} dbname=testdb pool_size=3"}
        ini, _ = write_config(cluster, databases=databases, port=p.port, workdir=p.workdir, **{
            **cfg, "extra": {**cfg["extra"], "default_pool_size": 2}})
        p.rewrite_config(ini)
        assert a.execute("RELOAD").statusmessage == "RELOAD"
        assert blocked.join(5) == [(2,)]  # the second server slot is used at once
        assert holder.execute("select 3").fetchall() == [(3,)]  # nobody was dropped
        holder.execute("commit")
        config = {r["key"]: r["value"] for r in show(a, "config")[1]}
        assert config["default_pool_size"] == "2"
        assert rows_by(a, "databases", "name")["newdb"]["pool_size"] == 3
        with app(p, dbname="newdb") as n:
            assert n.execute("select current_database()").fetchall() == [("testdb",)]


@pytest.mark.pgmux_only  # PgBouncer 1.18 logs the failure but answers RELOAD; current ones send F0000
def test_reload_failure(admin_pooler: PoolerProcess) -> None:
    with console(admin_pooler) as a:
        admin_pooler.rewrite_config(admin_pooler.ini_text + "\n[nonsense_section]\nx = 1\n")
        with pytest.raises(psycopg.Error) as exc:
            a.execute("RELOAD")
        assert exc.value.sqlstate == "F0000"
        assert exc.value.diag.message_primary == "RELOAD failed, see logs for additional details"
        assert show(a, "pools")[1]
    with app(admin_pooler) as c:
        assert c.execute("select 1").fetchall() == [(1,)]


@pytest.mark.pgmux_only  # KILL_CLIENT is 1.24+
def test_kill_client(admin_pooler: PoolerProcess) -> None:
    with app(admin_pooler) as victim, app(admin_pooler) as bystander, console(admin_pooler) as a:
        victim.execute("select 1")
        bystander.execute("select 1")
        ids = [r["id"] for r in show(a, "clients")[1] if r["database"] == "testdb"]
        assert len(ids) == 2
        target = min(ids)  # the victim connected first
        assert a.execute(f"KILL_CLIENT {target}").statusmessage == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError, match="admin forced disconnect"):
            victim.execute("select 1")
        assert bystander.execute("select 2").fetchall() == [(2,)]
        with pytest.raises(psycopg.errors.ProtocolViolation, match="^client not found$"):
            a.execute(f"KILL_CLIENT {target}")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="^invalid client pointer supplied$"):
            a.execute("KILL_CLIENT abc")


@pytest.mark.pgmux_only(reason="KILL_CLIENT is PgBouncer 1.24+, refused to stats_users since 1.25.2")
def test_kill_client_needs_an_admin_user(admin_pooler: PoolerProcess) -> None:
    # CVE-2026-6667: before 1.25.2 any console user (stats_users, or anyone with auth_type=any)
    # could disconnect any client.
    with app(admin_pooler) as victim, console(admin_pooler, "statsuser", STATS_PW) as stats:
        victim.execute("select 1")
        [target] = [r["id"] for r in show(stats, "clients")[1] if r["database"] == "testdb"]
        with pytest.raises(psycopg.errors.ProtocolViolation, match="^admin access needed$"):
            stats.execute(f"KILL_CLIENT {target}")
        assert victim.execute("select 2").fetchall() == [(2,)]
        assert show(stats, "version")[1]  # the stats session goes on
    assert "KILL_CLIENT" not in admin_pooler.log_text()


@pytest.mark.pgmux_only(reason="the id columns are PgBouncer 1.24+")
def test_socket_ids_are_drawn_when_each_socket_is_made(cluster: TempCluster,
                                                        pooler: Callable[..., PoolerProcess]) -> None:
    # PgBouncer numbers every client and server socket from one counter as it makes the object
    # (objects.c: id = ++last_pgsocket_id): a client at accept, a server when its connect is
    # launched, whether or not anyone looks at SHOW SERVERS.
    p = pooler(**admin_config(cluster, pool_mode="session"))
    with console(p) as a:
        [base] = [r["id"] for r in show(a, "clients")[1] if r["database"] == "pgbouncer"]
        with app(p) as first:
            first.execute("select 1")  # client base+1, then its server base+2
            with app(p) as second:
                second.execute("select 1")  # client base+3, then its server base+4 (session pool)
                clients = sorted(r["id"] for r in show(a, "clients")[1] if r["database"] == "testdb")
                servers = sorted(r["id"] for r in show(a, "servers")[1])
                sockets = sorted(r["id"] for r in show(a, "sockets")[1] if r["database"] == "testdb")
        assert clients == [base + 1, base + 3]
        assert servers == [base + 2, base + 4]
        assert sockets == [base + 1, base + 2, base + 3, base + 4]
        # a later client still counts after the two servers
        with app(p) as third:
            third.execute("select 1")
            [later] = [r["id"] for r in show(a, "clients")[1] if r["database"] == "testdb"]
        assert later > base + 4


def test_set_changes_a_setting(admin_pooler: PoolerProcess) -> None:
    with console(admin_pooler) as a:
        cur = a.execute("SET default_pool_size = 3")
        assert cur.statusmessage == "SET default_pool_size=3"
        cur = a.execute("set server_reset_query to 'DISCARD ALL; SELECT 1'")
        config = {r["key"]: r["value"] for r in show(a, "config")[1]}
        assert config["default_pool_size"] == "3" and config["server_reset_query"] == "DISCARD ALL; SELECT 1"
        assert rows_by(a, "databases", "name")["testdb"]["pool_size"] == 3


def test_disable_enable_and_wait_close(admin_pooler: PoolerProcess) -> None:
    with console(admin_pooler) as a:
        assert a.execute("DISABLE testdb").statusmessage == "DISABLE"
        assert rows_by(a, "databases", "name")["testdb"]["disabled"] == 1
        assert a.execute("ENABLE testdb").statusmessage == "ENABLE"
        assert rows_by(a, "databases", "name")["testdb"]["disabled"] == 0
        assert a.execute("WAIT_CLOSE").statusmessage == "WAIT_CLOSE"


@pytest.mark.pgmux_only  # SHOW STATE is 1.19+
def test_suspend_and_resume(admin_pooler: PoolerProcess) -> None:
    with app(admin_pooler) as c, console(admin_pooler) as a:
        c.execute("select 1")
        assert a.execute("SUSPEND").statusmessage == "SUSPEND"
        assert {r["key"]: r["value"] for r in show(a, "state")[1]}["suspended"] == "yes"
        with pytest.raises(psycopg.errors.ProtocolViolation, match="already suspended/paused"):
            a.execute("KILL")
        assert_held_until_resume(c, a, 4)


def test_new_client_waits_while_suspended(admin_pooler: PoolerProcess) -> None:
    """PgBouncer: new client connections to a suspended pooler wait until RESUME."""
    with console(admin_pooler) as a:
        assert a.execute("SUSPEND").statusmessage == "SUSPEND"

        def connect_and_query() -> list[Any]:
            with app(admin_pooler, connect_timeout=10) as c:
                return c.execute("select 6").fetchall()

        late = Background(connect_and_query)
        time.sleep(0.5)
        assert not late.done, "a new client logged in while pgmux was suspended"
        a.execute("RESUME")
        assert late.join(5) == [(6,)]


def test_shutdown_immediate(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(**admin_config(cluster))
    a = console(p)
    try:
        with pytest.raises(psycopg.OperationalError):
            a.execute("SHUTDOWN")  # no answer: the connection just goes away with the process
    finally:
        a.close()
    assert p.wait(10) == 0 if p.kind == "pgmux" else p.wait(10) is not None


# ---------------------------------------------------------------------------------------------------
# metrics endpoint (beyond PgBouncer)


@pytest.mark.pgmux_only
def test_metrics_endpoint_agrees_with_show_stats(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    p = pooler(**admin_config(cluster, metrics_listen=f"127.0.0.1:{port}"))
    with app(p) as c, console(p) as a:  # (the listener starts at the latest with the first console login)
        for i in range(5):
            c.execute("select %s::int", (i,), prepare=False)
        wait_for(lambda: _port_open(port), 3, what="metrics listener")
        stats = rows_by(a, "stats_totals", "database")["testdb"]
        pools = rows_by(a, "pools", "database")["testdb"]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}

    def sample(family: str, **labels: str) -> float:
        for s in families[family].samples:
            if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"):
                return s.value
        raise KeyError((family, labels))

    assert sample("pgbouncer_up") == 1
    assert sample("pgbouncer_stats_sql_transactions_pooled", database="testdb") == stats["xact_count"] == 5
    assert sample("pgbouncer_stats_queries_pooled", database="testdb") == stats["query_count"]
    assert sample("pgbouncer_stats_received_bytes", database="testdb") == stats["bytes_received"]
    assert sample("pgbouncer_stats_sent_bytes", database="testdb") == stats["bytes_sent"]
    assert sample("pgbouncer_stats_queries_duration_seconds", database="testdb") == pytest.approx(
        float(stats["query_time"]) / 1e6)
    assert sample("pgbouncer_pools_client_active_connections", database="testdb", user="md5user") == \
        pools["cl_active"]
    assert sample("pgbouncer_pools_server_idle_connections", database="testdb", user="md5user") == pools["sv_idle"]
    assert sample("pgbouncer_config_max_client_connections") == 100
    assert "pgbouncer_databases_current_connections" in families
    for name in ("pgmux_client_wait_seconds", "pgmux_query_duration_seconds", "pgmux_transaction_duration_seconds"):
        if name in families:  # present once PoolStats keeps the int-bucket histograms
            assert families[name].type == "histogram"
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
