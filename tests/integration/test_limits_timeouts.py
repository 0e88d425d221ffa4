"""One test per pool limit and per timeout, each failing if the setting is ignored.

Timeouts are 1 s and every bound has room for the janitor's period and a loaded 2-core machine, but a
pooler that ignores the setting (so falls back to the default of 0, or minutes) fails. Texts are
PgBouncer's (spec pgbouncer.md section 3); settings 1.18 lacks are ``pgmux_only``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from helpers_tx import (
    Blackhole,
    backend_pids,
    connect,
    dbline,
    default_dbs,
    errors_until_close,
    idle_in_tx_count,
    messages_of,
    query_outcome,
    quiet_cluster,  # noqa: F401 - fixture
    raw_login,
    run_threads,
    send_query,
    sleepers,
    terminate,
)
from pgwire import RawConn, login_error, startup_packet

from pgmux.testing.cluster import BackendSampler, PoolerProcess, TempCluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_cluster")]

PoolerFactory = Callable[..., PoolerProcess]


def tx_pooler(pooler: PoolerFactory, pool_size: int = 5, **kw: object) -> PoolerProcess:
    extra = {"default_pool_size": pool_size, **kw.pop("extra", {})}
    return pooler(pool_mode="transaction", extra=extra, **kw)


def hold_transaction(
    p: PoolerProcess, seconds: float, user: str = "md5user", started: threading.Event | None = None
) -> Callable[[], None]:
    """A client that opens a transaction (so keeps its server in transaction mode) for ``seconds``."""

    def run() -> None:
        with connect(p, user) as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
            if started is not None:
                started.set()
            time.sleep(seconds)
            conn.execute("COMMIT")

    return run


# ---------------------------------------------------------------------------------------------------
# client-side limits


def test_max_client_conn(pooler: PoolerFactory) -> None:
    """Counts clients, not servers: 4 idle clients over one server fill max_client_conn=4. The
    admin console is not limited (PgBouncer's client.c: "dont limit admin db")."""
    import psycopg

    p = tx_pooler(pooler, 1, extra={"max_client_conn": 4, "admin_users": "md5user"})
    held = [connect(p) for _ in range(4)]
    try:
        for c in held:
            assert c.execute("SELECT 1").fetchone() == (1,)
        err, _ = login_error(p.host, p.port, "md5user", "testdb", "md5pass")
        assert (err.severity, err.sqlstate, err.message) == (
            "FATAL",
            "08P01",
            "no more connections allowed (max_client_conn)",
        )
        with psycopg.connect(p.dsn("md5user", "md5pass", dbname="pgbouncer"), autocommit=True) as console:
            rows = console.execute("SHOW CLIENTS").fetchall()
            assert sum(1 for r in rows if r[2] == "testdb") == 4
        held.pop().close()
        wait_for(lambda: _can_connect(p), 5, what="a freed max_client_conn slot")
    finally:
        for c in held:
            c.close()


def _can_connect(p: PoolerProcess, user: str = "md5user", dbname: str = "testdb") -> bool:
    import psycopg

    try:
        with connect(p, user, dbname) as c:
            return c.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:  # a server error forwarded at login may carry its own SQLSTATE class
        return False


@pytest.mark.pgmux_only(reason="max_db_client_connections / max_user_client_connections are PgBouncer 1.24+")
@pytest.mark.parametrize("setting", ["max_db_client_connections", "max_user_client_connections"])
def test_client_connection_caps(pooler: PoolerFactory, setting: str) -> None:
    p = tx_pooler(pooler, 1, extra={setting: 2})
    held = [connect(p, "md5user", "testdb") for _ in range(2)]
    try:
        err, _ = login_error(p.host, p.port, "md5user", "testdb", "md5pass")
        assert (err.severity, err.message) == ("FATAL", f"client connections exceeded ({setting})")
        # the cap is per database / per user: the other one still gets in
        other = ("md5user", "postgres") if setting == "max_db_client_connections" else ("scramuser", "testdb")
        assert _can_connect(p, *other)
    finally:
        for c in held:
            c.close()
    wait_for(lambda: _can_connect(p), 5, what="a freed client slot")


# ---------------------------------------------------------------------------------------------------
# server-side limits (sampled on the server while clients wait)


def run_sampled(cluster: TempCluster, fns: list[Callable[[], object]], **filters: str) -> tuple[BackendSampler, float]:
    start = time.monotonic()
    with BackendSampler(cluster, interval=0.03, **filters) as sampler:
        errors = run_threads(fns)
    sampler.stop()
    assert not errors, errors
    return sampler, time.monotonic() - start


def run_staged(
    cluster: TempCluster, p: PoolerProcess, first: list[tuple[str, str]], then: list[tuple[str, str]], **filters: str
) -> tuple[BackendSampler, float]:
    """Clients ``first`` take the capped servers (pg_sleep 1 s); once they run, clients ``then`` (other
    pools, not yet created) arrive: their pools may not open servers beyond the cap, even for login."""

    def staged() -> None:
        first_errors: list[BaseException] = []
        t = threading.Thread(target=lambda: first_errors.extend(run_threads(sleepers(p, first, 1.0))), daemon=True)
        t.start()
        wait_for(lambda: cluster.count_backends(**filters) >= 2, 5, what="the first clients' servers")
        then_errors = run_threads(sleepers(p, then, 1.0))
        t.join(30)
        assert not first_errors and not then_errors, first_errors + then_errors

    return run_sampled(cluster, [staged], **filters)


def test_max_db_connections(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """Two users' pools of one database share max_db_connections=2; clients wait, none fails."""
    p = tx_pooler(pooler, 5, extra={"max_db_connections": 2})
    first = [("md5user", "testdb")] * 2
    then = [("scramuser", "testdb")] * 2
    sampler, elapsed = run_staged(cluster, p, first, then, datname="testdb")
    assert sampler.max == 2, f"max_db_connections=2: saw {sampler.max} backends on testdb"
    assert elapsed >= 1.8, "4 x 1 s over 2 servers cannot finish in under 2 s"


@pytest.mark.parametrize("where", ["global", "users-section"])
def test_max_user_connections(cluster: TempCluster, pooler: PoolerFactory, where: str) -> None:
    """One user's pools on two databases share max_user_connections=2 (global or from [users])."""
    if where == "global":
        p = tx_pooler(pooler, 5, extra={"max_user_connections": 2})
    else:
        p = tx_pooler(pooler, 5, users={"md5user": "max_user_connections=2"})
    first = [("md5user", "testdb")] * 2
    then = [("md5user", "postgres")] * 2
    sampler, elapsed = run_staged(cluster, p, first, then, usename="md5user")
    assert sampler.max == 2, f"max_user_connections=2: saw {sampler.max} md5user backends"
    assert elapsed >= 1.8


def test_per_database_pool_size(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 10, databases=default_dbs(pool_size=2))
    sampler, _ = run_sampled(
        cluster, sleepers(p, [("md5user", "testdb")] * 5, 0.6), usename="md5user", datname="testdb"
    )
    assert sampler.max == 2, f"[databases] pool_size=2: saw {sampler.max} backends"
    # the other database keeps default_pool_size
    sampler, _ = run_sampled(
        cluster, sleepers(p, [("md5user", "postgres")] * 4, 1.0), usename="md5user", datname="postgres"
    )
    assert sampler.max >= 3, f"default_pool_size=10 on the other database: saw only {sampler.max} backends"


@pytest.mark.pgmux_only(reason="1.18's [users] has only pool_mode and max_user_connections")
def test_per_user_pool_size(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 10, users={"md5user": "pool_size=2"})
    sampler, _ = run_sampled(cluster, sleepers(p, [("md5user", "testdb")] * 5, 0.6), usename="md5user")
    assert sampler.max == 2, f"[users] pool_size=2: saw {sampler.max} backends"
    sampler, _ = run_sampled(cluster, sleepers(p, [("scramuser", "testdb")] * 4, 1.0), usename="scramuser")
    assert sampler.max >= 3, f"default_pool_size=10 for another user: saw only {sampler.max} backends"


def test_min_pool_size(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """Once the pool is in use, min_pool_size servers are opened with no demand for them."""
    p = tx_pooler(pooler, 5, extra={"min_pool_size": 3})
    with connect(p) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        wait_for(
            lambda: cluster.count_backends(usename="md5user", datname="testdb") == 3, 5, what="min_pool_size=3 servers"
        )
        time.sleep(0.5)
        assert cluster.count_backends(usename="md5user", datname="testdb") == 3, "more than min_pool_size opened"


def test_reserve_pool(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """pool_size=1 + reserve_pool_size=2: the 2 extra servers come only after reserve_pool_timeout=1."""
    p = tx_pooler(pooler, 1, extra={"reserve_pool_size": 2, "reserve_pool_timeout": 1})
    with connect(p) as c:  # the pool exists and its one server is idle
        c.execute("SELECT 1")
    counts: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            counts.append((time.monotonic() - t0, cluster.count_backends(usename="md5user", datname="testdb")))
            time.sleep(0.03)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        errors = run_threads(sleepers(p, [("md5user", "testdb")] * 3, 2.5))
    finally:
        stop.set()
        sampler.join(5)
    assert not errors, errors
    early = [n for t, n in counts if t < 0.7]
    assert early and max(early) == 1, f"reserve pool used before reserve_pool_timeout: {counts[:30]}"
    assert max(n for _, n in counts) == 3, f"reserve pool never used: max {max(n for _, n in counts)}"
    first3 = min(t for t, n in counts if n == 3)
    assert 0.9 <= first3 <= 3.0, f"third server after {first3:.2f}s"
    assert "taking connection from reserve_pool" in p.log_text()


def test_waiting_clients_served_in_arrival_order(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """pool_size=1 held by a transaction: queued clients get the server in the order they asked."""
    table = "tx_fifo"
    cluster.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (seq serial, i int)", dbname="testdb")
    p = tx_pooler(pooler, 1)
    holder = connect(p)
    clients = [connect(p) for _ in range(5)]  # logged in before the queue forms
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        threads = []
        for i, c in enumerate(clients):
            t = threading.Thread(target=c.execute, args=(f"INSERT INTO {table} (i) VALUES (%s)", [i]), daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.15)
        assert cluster.execute(f"SELECT count(*) FROM {table}", dbname="testdb") == [(0,)], "pool_size=1 exceeded"
        holder.execute("COMMIT")
        for t in threads:
            t.join(10)
        order = [r[0] for r in cluster.execute(f"SELECT i FROM {table} ORDER BY seq", dbname="testdb")]
        assert order == list(range(5)), f"served out of arrival order: {order}"
    finally:
        holder.close()
        for c in clients:
            c.close()


# ---------------------------------------------------------------------------------------------------
# timeouts seen by clients


def test_query_wait_timeout(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 1, extra={"query_wait_timeout": 1})
    started = threading.Event()
    holder = threading.Thread(target=hold_transaction(p, 3, started=started), daemon=True)
    holder.start()
    assert started.wait(10)
    conn = raw_login(p)
    send_query(conn, "SELECT 1")
    errs, elapsed = errors_until_close(conn, 3.5)
    assert messages_of(errs) == ["query_wait_timeout"]
    assert errs[0].severity == "FATAL" and errs[0].sqlstate == "08P01"
    assert 0.8 <= elapsed <= 3.0, elapsed
    holder.join(10)


def test_query_timeout(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 1, extra={"query_timeout": 1})
    conn = raw_login(p)
    # a query that finishes in time is untouched
    assert conn.simple_query("SELECT pg_sleep(0.3), 1") == [("", "1")]
    send_query(conn, "SELECT pg_sleep(4)")
    errs, elapsed = errors_until_close(conn, 4)
    assert "query timeout" in messages_of(errs), messages_of(errs)
    assert 0.8 <= elapsed <= 3.0, elapsed
    # the pool (size 1) serves the next client on a new server
    assert _can_connect(p)


def test_client_idle_timeout(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 1, extra={"client_idle_timeout": 1})
    busy = raw_login(p)
    idle = raw_login(p)
    idle.simple_query("SELECT 1")
    # a client that keeps sending stays connected past the timeout
    for _ in range(6):
        assert busy.simple_query("SELECT 2") == [("2",)]
        time.sleep(0.3)
    errs, _ = errors_until_close(idle, 3)
    assert messages_of(errs) == ["client_idle_timeout"]
    assert busy.simple_query("SELECT 3") == [("3",)]
    busy.terminate()


def test_idle_transaction_timeout(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 1, extra={"idle_transaction_timeout": 1})
    conn = raw_login(p)
    conn.simple_query("BEGIN")
    start = time.monotonic()
    conn.simple_query("SELECT 1")
    errs, _ = errors_until_close(conn, 4)
    elapsed = time.monotonic() - start
    assert "idle transaction timeout" in messages_of(errs), messages_of(errs)
    assert 0.8 <= elapsed <= 3.5, elapsed
    wait_for(lambda: idle_in_tx_count(cluster, "md5user") == 0, 5, what="the idle transaction's server to close")
    assert _can_connect(p)


@pytest.mark.pgmux_only(reason="transaction_timeout is PgBouncer 1.25+")
def test_transaction_timeout(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """Busy all along (never idle, no query longer than 0.2 s), the transaction still ends after 1 s."""
    p = tx_pooler(pooler, 1, extra={"transaction_timeout": 1})
    conn = raw_login(p)
    conn.simple_query("BEGIN")
    start = time.monotonic()
    while True:
        out = query_outcome(conn, "SELECT pg_sleep(0.2)")
        elapsed = time.monotonic() - start
        if out.errors or out.closed or elapsed > 5:
            break
    assert out.messages == ["transaction timeout"] and out.closed, out
    assert 0.8 <= elapsed <= 3.5, elapsed
    wait_for(lambda: idle_in_tx_count(cluster, "md5user") == 0, 5, what="the transaction's server to close")


@pytest.mark.pgmux_only(reason="1.18's [users] has only pool_mode and max_user_connections")
@pytest.mark.parametrize("setting", ["query_timeout", "idle_transaction_timeout", "client_idle_timeout"])
def test_per_user_timeout_override(pooler: PoolerFactory, setting: str) -> None:
    """[users] md5user = <setting>=1 applies to md5user only; scramuser (global 0) does the same and survives."""
    p = tx_pooler(pooler, 2, users={"md5user": f"{setting}=1"})
    expected = {
        "query_timeout": "query timeout",
        "idle_transaction_timeout": "idle transaction timeout",
        "client_idle_timeout": "client_idle_timeout",
    }[setting]
    results: dict[str, list[str] | str] = {}

    def scenario(user: str) -> None:
        conn = raw_login(p, user)
        try:
            if setting == "query_timeout":
                steps = [("SELECT pg_sleep(2.2)", 0.0)]
            elif setting == "idle_transaction_timeout":
                steps = [("BEGIN", 2.2), ("COMMIT", 0.0)]
            else:
                steps = [("SELECT 1", 2.2), ("SELECT 1", 0.0)]
            for sql, pause in steps:
                out = query_outcome(conn, sql)
                if out.errors or out.closed:
                    results[user] = out.messages or "closed without an error"
                    return
                time.sleep(pause)
            results[user] = "ok"
        finally:
            conn.close()

    errors = run_threads([lambda: scenario("md5user"), lambda: scenario("scramuser")])
    assert not errors, errors
    assert results["scramuser"] == "ok", results
    assert results["md5user"] == [expected], results


def test_pool_mode_overrides(pooler: PoolerFactory) -> None:
    """pool_mode from [users] and from [databases] beats the global one (both exist in 1.18)."""
    import psycopg

    p = tx_pooler(
        pooler,
        2,
        users={"scramuser": "pool_mode=statement"},
        databases={**default_dbs(), "stmtdb": dbline("testdb", pool_mode="statement")},
    )
    with connect(p, "md5user") as c:
        c.execute("BEGIN")
        c.execute("COMMIT")
    for user, db in (("scramuser", "testdb"), ("md5user", "stmtdb")):
        with connect(p, user, db) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.OperationalError, match="transaction blocks not allowed in statement pooling"):
                c.execute("BEGIN")


def test_client_login_timeout(pooler: PoolerFactory) -> None:
    """A socket that sends nothing, and one that stops after the startup packet, are closed after 1 s."""
    p = tx_pooler(pooler, 1, extra={"client_login_timeout": 1, "tcp_defer_accept": 0})

    silent = socket.create_connection((p.host, p.port), timeout=5)
    stalled = RawConn(p.host, p.port, timeout=5)
    start = time.monotonic()
    stalled.send(startup_packet({"user": "md5user", "database": "testdb"}))
    kind, _body = stalled.read_message()
    assert kind == b"R", "expected an authentication request"
    try:
        silent.settimeout(4)
        while silent.recv(1024):  # an ErrorResponse may come before the close
            pass
        silent_elapsed = time.monotonic() - start
        errs, _ = errors_until_close(stalled, 4)
        stalled_elapsed = time.monotonic() - start
    except TimeoutError:
        pytest.fail("client_login_timeout=1 ignored: connection still open after 4 s")
    finally:
        silent.close()
        stalled.close()
    assert 0.8 <= silent_elapsed <= 3.5, silent_elapsed
    assert 0.8 <= stalled_elapsed <= 3.5, stalled_elapsed
    assert messages_of(errs) == ["client_login_timeout"]
    # regular logins are unaffected
    assert _can_connect(p)


# ---------------------------------------------------------------------------------------------------
# server-side timeouts


def test_server_lifetime(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 1, extra={"server_lifetime": 1})
    with connect(p) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first, "pool did not reuse the server"
        # PgBouncer's janitor closes idle servers past their lifetime every 1/3 s; 2.3 s leaves room
        # for a janitor running once a second
        time.sleep(2.3)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != first, "server_lifetime=1 ignored"


def test_server_idle_timeout(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, 3, extra={"server_idle_timeout": 1})
    errors = run_threads(sleepers(p, [("md5user", "testdb")] * 3, 0.8))
    assert not errors, errors
    with connect(p) as conn:  # a client stays connected; only the servers go
        assert cluster.count_backends(usename="md5user", datname="testdb") == 3
        wait_for(
            lambda: cluster.count_backends(usename="md5user", datname="testdb") == 0,
            4,
            what="idle servers to be closed by server_idle_timeout=1",
        )
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_connect_timeout(pooler: PoolerFactory) -> None:
    """A server address that accepts TCP but never answers the startup packet: given up after 1 s."""
    import psycopg

    with Blackhole() as hole:
        p = tx_pooler(
            pooler,
            1,
            databases={**default_dbs(), "blackhole": f"host=127.0.0.1 port={hole.port} dbname=testdb"},
            extra={"server_connect_timeout": 1, "client_login_timeout": 3, "server_login_retry": 1},
        )
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            connect(p, "md5user", "blackhole", connect_timeout=8)
        wait_for(lambda: any(closed for _, closed, _ in hole.snapshot()), 1, what="the pooler to give up")
        events = hole.snapshot()
        accepted, closed, nbytes = events[0]
        assert nbytes > 0, "the pooler should have sent a startup packet"
        assert closed is not None and 0.7 <= closed - accepted <= 2.5, (accepted - start, closed and closed - start)
        # the other databases are unaffected
        assert _can_connect(p)


def test_server_check_query(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """server_check_query runs on a server idle longer than server_check_delay, and only then."""
    seq = "tx_check_seq"
    cluster.execute(f"DROP SEQUENCE IF EXISTS {seq}; CREATE SEQUENCE {seq}", dbname="testdb")

    def checks() -> int:
        last, called = cluster.execute(f"SELECT last_value, is_called FROM {seq}", dbname="testdb")[0]
        return int(last) if called else 0

    p = tx_pooler(pooler, 1, extra={"server_check_delay": 1, "server_check_query": f"select nextval('{seq}')"})
    with connect(p) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("SELECT 1")
        assert checks() == 0, "checked a server used again within server_check_delay"
        time.sleep(1.6)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert checks() == 1, "server idle > server_check_delay was not checked"
        conn.execute("SELECT 1")
        assert checks() == 1


def test_server_killed_while_idle_is_replaced(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """An idle server killed on the PostgreSQL side is not handed to the next query."""
    p = tx_pooler(pooler, 1, extra={"server_check_delay": 0, "server_check_query": "select 1"})
    with connect(p) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        terminate(cluster, pid)
        time.sleep(0.3)
        # no error for the client: the dead server is detected and a new one opened
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.skip(
    reason="cancel_wait_timeout is not observable: the cancel goes to the same (healthy) server "
    "address as the query, so it cannot be made to hang; 1.18 lacks the setting"
)
def test_cancel_wait_timeout() -> None:
    raise AssertionError("not observable")


# ---------------------------------------------------------------------------------------------------
# databases: connect_query, *, forced user, round robin, host lists


def test_connect_query(cluster: TempCluster, pooler: PoolerFactory) -> None:
    default = cluster.execute("SHOW work_mem", dbname="testdb")[0][0]
    assert default != "7777kB"
    p = tx_pooler(pooler, 2, databases=default_dbs(connect_query="'SET work_mem TO 7777'"))
    errors = run_threads(sleepers(p, [("md5user", "testdb")] * 2, 0.3))  # two servers, both logged in
    assert not errors, errors
    with connect(p) as conn:
        for _ in range(4):
            assert conn.execute("SHOW work_mem").fetchone() == ("7777kB",)
    with connect(p, "md5user", "postgres") as conn:
        assert conn.execute("SHOW work_mem").fetchone() == (default,), "connect_query leaked to another database"


def test_fallback_database(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """``*`` makes a pool for any database name, with dbname = the client's."""
    import psycopg

    if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = 'tx_autodb'"):
        cluster.execute("CREATE DATABASE tx_autodb")
    p = tx_pooler(pooler, 2, databases={"testdb": dbline("testdb"), "*": "host={host} port={port}"})
    for db in ("tx_autodb", "postgres", "testdb"):
        with connect(p, "md5user", db) as conn:
            assert conn.execute("SELECT current_database(), current_user").fetchone() == (db, "md5user")
    with pytest.raises(psycopg.OperationalError, match='database "tx_nosuchdb" does not exist'):
        connect(p, "md5user", "tx_nosuchdb")
    assert "registered new auto-database" in p.log_text()


def test_forced_user(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """user= in [databases]: every client runs as that user, over one pool for the database."""
    p = tx_pooler(pooler, 1, databases={**default_dbs(), "forced": dbline("testdb", user="trustuser")})
    pids = set()
    for user in ("md5user", "scramuser", "md5user"):
        with connect(p, user, "forced") as conn:
            row = conn.execute("SELECT current_user, session_user, pg_backend_pid()").fetchone()
            assert row[:2] == ("trustuser", "trustuser")
            pids.add(row[2])
    assert len(pids) == 1, "forced user: one pool (pool_size=1) for all client users"
    assert backend_pids(cluster, "md5user") == set()
    with connect(p, "md5user", "testdb") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)


@pytest.mark.parametrize("round_robin", [0, 1], ids=["lifo", "round-robin"])
def test_server_round_robin(cluster: TempCluster, pooler: PoolerFactory, round_robin: int) -> None:
    p = tx_pooler(pooler, 3, extra={"server_round_robin": round_robin})
    errors = run_threads(sleepers(p, [("md5user", "testdb")] * 3, 0.8))  # open 3 servers
    assert not errors, errors
    assert len(backend_pids(cluster, "md5user")) == 3
    with connect(p) as conn:
        seen = [conn.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(9)]
    if round_robin:
        assert len(set(seen)) == 3, f"server_round_robin=1 should cycle over the 3 servers: {seen}"
    else:
        assert len(set(seen)) == 1, f"default LIFO reuse should keep using the same server: {seen}"


@pytest.mark.parametrize(
    "load_balance",
    [None, pytest.param("disable", marks=pytest.mark.pgmux_only(reason="load_balance_hosts is PgBouncer 1.24+"))],
    ids=["round-robin", "disable"],
)
def test_host_list(cluster: TempCluster, pooler: PoolerFactory, load_balance: str | None) -> None:
    """host=A,B: server connections are spread over both hosts (TCP and the Unix socket of one cluster);
    with load_balance_hosts=disable they stay on the first one while it works."""
    lb = f" load_balance_hosts={load_balance}" if load_balance else ""
    p = tx_pooler(
        pooler, 4, databases={"testdb": f"host={{host}},{cluster.socket_dir} port={{port}} dbname=testdb{lb}"}
    )
    errors = run_threads(sleepers(p, [("md5user", "testdb")] * 4, 1.0))
    assert not errors, errors
    rows = cluster.execute("SELECT coalesce(host(client_addr), 'unix') FROM pg_stat_activity WHERE usename = 'md5user'")
    hosts = sorted(r[0] for r in rows)
    assert len(hosts) == 4
    if load_balance == "disable":
        assert set(hosts) == {"127.0.0.1"}, f"load_balance_hosts=disable should stick to the first host: {hosts}"
    else:
        assert set(hosts) == {"127.0.0.1", "unix"}, f"servers not spread over both hosts: {hosts}"


def test_autodb_idle_timeout(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """A ``*`` pool with no clients and no servers is dropped after autodb_idle_timeout, then re-created."""
    if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = 'tx_autodb'"):
        cluster.execute("CREATE DATABASE tx_autodb")
    p = tx_pooler(
        pooler,
        1,
        databases={"*": "host={host} port={port}"},
        extra={"autodb_idle_timeout": 1, "server_idle_timeout": 1},
    )

    def registrations() -> int:
        return p.log_text().count("registered new auto-database")

    with connect(p, "md5user", "tx_autodb") as conn:
        conn.execute("SELECT 1")
    assert registrations() == 1
    wait_for(
        lambda: cluster.count_backends(usename="md5user", datname="tx_autodb") == 0,
        5,
        what="the autodb's server to close (server_idle_timeout=1)",
    )
    time.sleep(2.5)  # autodb_idle_timeout=1 plus janitor periods
    with connect(p, "md5user", "tx_autodb") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("tx_autodb",)
    assert registrations() == 2, "the idle auto-database was not dropped (autodb_idle_timeout=1 ignored)"


def test_application_name_add_host(pooler: PoolerFactory) -> None:
    import re

    p = tx_pooler(pooler, 1, extra={"application_name_add_host": 1})
    with connect(p, application_name="myapp") as conn:
        name = conn.execute("SELECT current_setting('application_name')").fetchone()[0]
    assert re.fullmatch(r"myapp - 127\.0\.0\.1:\d+", name), name
