"""auth_query: roles that exist only in PostgreSQL log in through pgmux (SCRAM and md5)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgwire import RawConn, login_error, parse_error_fields, startup_packet

from pgmux.auth import md5_secret
from pgmux.testing.cluster import PoolerProcess, TempCluster, wait_for
from pgmux.testing.faultproxy import FaultProxy

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def auth_roles(cluster: TempCluster) -> None:
    """`aq_lookup` may read pg_authid; its search_path puts a decoy pg_authid first (CVE-2025-12819)."""
    cluster.execute("DROP SCHEMA IF EXISTS decoy CASCADE")
    cluster.execute("DO $$ BEGIN CREATE ROLE aq_lookup LOGIN SUPERUSER PASSWORD 'lookpass'; "
                    "EXCEPTION WHEN duplicate_object THEN END $$")
    cluster.execute("CREATE SCHEMA decoy")
    cluster.execute("CREATE TABLE decoy.pg_authid (rolname name, rolpassword text, rolvaliduntil timestamptz, "
                    "rolcanlogin bool)")
    cluster.execute(f"INSERT INTO decoy.pg_authid VALUES ('scramuser', '{md5_secret('hacked', 'scramuser')}', "
                    "NULL, true)")
    cluster.execute("ALTER ROLE aq_lookup SET search_path = decoy, pg_catalog")


@pytest.fixture
def aq_pooler(pooler: Callable[..., PoolerProcess], auth_roles: None, pooler_kind: str) -> PoolerProcess:
    # Only the lookup role is in the auth_file; md5user (md5 secret) and scramuser (SCRAM) are not.
    return pooler(pool_mode="transaction", extra={"auth_user": "aq_lookup"}, userlist={"aq_lookup": "lookpass"})


@pytest.mark.parametrize(("user", "password"), [("scramuser", "scrampass"), ("md5user", "md5pass")])
def test_role_known_only_to_postgres_logs_in(aq_pooler: PoolerProcess, user: str, password: str) -> None:
    with psycopg.connect(aq_pooler.dsn(user, password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


@pytest.mark.pgmux_only(reason="PgBouncer says SASL authentication failed for a wrong SCRAM proof")
def test_wrong_password_of_a_looked_up_role_fails_as_a_password(aq_pooler: PoolerProcess) -> None:
    for user in ("scramuser", "md5user"):
        err, _ = login_error(aq_pooler.host, aq_pooler.port, user, "testdb", "wrong")
        assert (err.sqlstate, err.message) == ("28P01", "password authentication failed")


def test_role_unknown_to_auth_query_gets_no_such_user(aq_pooler: PoolerProcess) -> None:
    """PgBouncer tells it before any password exchange (its handle_auth_query_response)."""
    err, conn = login_error(aq_pooler.host, aq_pooler.port, "no_such_role", "testdb", "x")
    assert (err.severity, err.sqlstate, err.message) == ("FATAL", "08P01", "no such user")
    assert conn.auth_methods == []


def test_role_without_password_is_found_and_never_matches(aq_pooler: PoolerProcess) -> None:
    """auth_query returns NULL for trustuser's password: the user exists, no password matches."""
    err, conn = login_error(aq_pooler.host, aq_pooler.port, "trustuser", "testdb", "anything")
    assert err.message == "password authentication failed"
    assert conn.auth_methods, "the client was asked for a password"


def test_per_database_auth_user_without_a_global_one(pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    p = pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass"},
               databases={"testdb": "host={host} port={port} dbname=testdb auth_user=aq_lookup",
                          "other": "host={host} port={port} dbname=testdb"})
    with psycopg.connect(p.dsn("scramuser", "scrampass")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("scramuser",)
    # "other" has no auth_user and there is no global one: an unknown user, as without auth_query
    err, _ = login_error(p.host, p.port, "scramuser", "other", "scrampass")
    assert err.message == "password authentication failed"


@pytest.mark.pgmux_only(reason="PgBouncer 1.18 fails such a user without auth_query (its issue #59; 1.25 looks it up)")
def test_users_section_entry_without_auth_file_entry_is_looked_up(
        pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    p = pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass"}, users={"md5user": "pool_mode=session"},
               extra={"auth_user": "aq_lookup"})
    with psycopg.connect(p.dsn("md5user", "md5pass")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)


def test_trust_with_auth_user_and_no_auth_file(pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    """auth_type = trust: auth_query only decides whether the user exists; the server login uses
    the secret it found (md5user's md5 hash answers the server's md5)."""
    p = pooler(pool_mode="transaction", auth_type="trust", extra={"auth_user": "postgres", "auth_file": None})
    with psycopg.connect(p.dsn("md5user")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)
    err, _ = login_error(p.host, p.port, "no_such_role", "testdb", None)
    assert err.message == "no such user"


def test_forced_user_with_auth_user(pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    """The client is checked with the secret auth_query finds for it; the pool logs in as the
    forced user with that user's auth_file entry."""
    p = pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass", "md5user": "md5pass"},
               databases={"forced": "host={host} port={port} dbname=testdb user=md5user auth_user=aq_lookup"})
    with psycopg.connect(p.dsn("scramuser", "scrampass", dbname="forced")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)
    err, _ = login_error(p.host, p.port, "no_such_role", "forced", "x")
    assert err.message == "no such user"


# --------------------------------------------------------------------------------------------------
# auth_dbname (PgBouncer 1.19+: Debian's 1.18 refuses the key)


def aq_dbname_pooler(pooler: Callable[..., PoolerProcess], global_dbname: str, db_dbname: str = "") -> PoolerProcess:
    line = "host={host} port={port} dbname=testdb" + (f" auth_dbname={db_dbname}" if db_dbname else "")
    return pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass", "postgres": "adminpw"},
                  databases={"testdb": line, "authdb": "host={host} port={port} dbname=postgres"},
                  extra={"auth_user": "aq_lookup", "auth_dbname": global_dbname})


def pool_names(p: PoolerProcess) -> set[tuple[str, str]]:
    with psycopg.connect(p.dsn("postgres", "adminpw", dbname="pgbouncer"), autocommit=True) as admin:
        return {(r[0], r[1]) for r in admin.execute("SHOW POOLS").fetchall()}


@pytest.mark.pgmux_only(reason="auth_dbname is PgBouncer 1.19+")
@pytest.mark.parametrize("where", ["global", "per-database"])
def test_auth_query_runs_in_auth_dbname(pooler: Callable[..., PoolerProcess], auth_roles: None, where: str) -> None:
    """The per-database auth_dbname wins over the global one (here not configured at all)."""
    p = (aq_dbname_pooler(pooler, "authdb") if where == "global"
         else aq_dbname_pooler(pooler, "nowhere", "authdb"))
    with psycopg.connect(p.dsn("scramuser", "scrampass")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("testdb",)
    assert ("authdb", "aq_lookup") in pool_names(p)
    assert ("testdb", "aq_lookup") not in pool_names(p)


@pytest.mark.pgmux_only(reason="auth_dbname is PgBouncer 1.19+")
def test_unconfigured_auth_dbname_is_a_config_error(pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    p = aq_dbname_pooler(pooler, "nowhere")
    err, _ = login_error(p.host, p.port, "scramuser", "testdb", "scrampass")
    assert (err.severity, err.sqlstate, err.message) == ("FATAL", "08P01", "bouncer config error")
    assert 'authentication database "nowhere" is not configured.' in p.log_text()
    err, _ = login_error(p.host, p.port, "scramuser", "testdb", "scrampass")
    assert err.message == "bouncer config error"


@pytest.mark.pgmux_only(reason="auth_dbname is PgBouncer 1.19+")
def test_disabled_auth_dbname_refuses_looked_up_users(pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    p = aq_dbname_pooler(pooler, "authdb")
    with psycopg.connect(p.dsn("postgres", "adminpw", dbname="pgbouncer"), autocommit=True) as admin:
        admin.execute("DISABLE authdb")
    err, _ = login_error(p.host, p.port, "scramuser", "testdb", "scrampass")
    assert (err.sqlstate, err.message) == ("08P01", 'authentication database "authdb" is disabled')


def test_failing_auth_query_is_a_config_error(pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    p = pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass"},
               extra={"auth_user": "aq_lookup", "auth_query": "SELECT no_such_column FROM pg_catalog.pg_authid"})
    err, _ = login_error(p.host, p.port, "scramuser", "testdb", "scrampass")
    assert (err.sqlstate, err.message) == ("08P01", "bouncer config error")


@pytest.mark.pgmux_only
def test_search_path_cannot_redirect_the_lookup(aq_pooler: PoolerProcess) -> None:
    """The default query is schema-qualified: the decoy table's password must not work."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(aq_pooler.dsn("scramuser", "hacked"))
# --------------------------------------------------------------------------------------------------
# pools of looked-up users


def test_min_pool_size_is_kept_for_a_looked_up_user(
        cluster: TempCluster, pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    """While a client of an auth_query user is connected (idle), its pool opens min_pool_size
    servers, logged in with the secret auth_query found (SCRAM pass-through here)."""
    p = pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass"},
               extra={"auth_user": "aq_lookup", "min_pool_size": 3, "default_pool_size": 5})
    with psycopg.connect(p.dsn("scramuser", "scrampass")) as conn:
        conn.execute("SELECT 1")
        wait_for(lambda: cluster.count_backends(usename="scramuser", datname="testdb") == 3, 5,
                 what="min_pool_size servers for the looked-up user")


def test_auto_database_with_auth_user(pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    """`* = ... auth_user=` : a database not listed is registered on first use and its users
    are looked up with that auth_user."""
    p = pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass"},
               databases={"*": "host={host} port={port} auth_user=aq_lookup"})
    with psycopg.connect(p.dsn("scramuser", "scrampass", dbname="testdb")) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("scramuser", "testdb")
    err, _ = login_error(p.host, p.port, "no_such_role", "testdb", "x")
    assert err.message == "no such user"


# --------------------------------------------------------------------------------------------------
# the auth_user's server cannot be opened (PostgreSQL unreachable behind a proxy)
#
# PgBouncer's start_auth_query puts the client in the auth_user's pool's queue (find_server): a
# connect that fails there keeps it waiting for the retries, server_login_retry apart, until
# query_wait_timeout; a client that comes while that pool has no server gets the cached error.


def unreachable_aq_pooler(pooler: Callable[..., PoolerProcess], proxy: FaultProxy, **extra: Any) -> PoolerProcess:
    proxy.unreachable()
    return pooler(pool_mode="transaction", userlist={"aq_lookup": "lookpass"},
                  databases={"flaky": f"host=127.0.0.1 port={proxy.port} dbname=testdb"},
                  extra={"auth_user": "aq_lookup", "server_login_retry": 1, "client_login_timeout": 60, **extra})


def test_login_waits_for_the_auth_server_until_query_wait_timeout(
        cluster: TempCluster, pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = unreachable_aq_pooler(pooler, proxy, query_wait_timeout=4)
        first: list[tuple[str, float]] = []

        def log_in() -> None:
            start = time.monotonic()
            err, _ = login_error(p.host, p.port, "md5user", "flaky", "md5pass")
            first.append((err.message, time.monotonic() - start))

        waiting = threading.Thread(target=log_in, daemon=True)
        waiting.start()
        time.sleep(1.5)
        assert not first, f"the login was not kept waiting: {first}"
        # a login that needs that pool's server while its connects fail: the cached error, at once
        start = time.monotonic()
        err, _ = login_error(p.host, p.port, "scramuser", "flaky", "scrampass")
        assert time.monotonic() - start < 1.5, "the second login was queued instead of failed fast"
        assert re.fullmatch(r"server login has been failing, (cached error: connect failed|try again later) "
                            r"\(server_login_retry\)", err.message), err.message
        waiting.join(15)
        assert len(first) == 1
        message, elapsed = first[0]
        assert message == "query_wait_timeout"
        assert elapsed >= 3, f"failed after {elapsed:.1f}s, before query_wait_timeout = 4"


def test_login_is_served_once_the_auth_server_comes_back(
        cluster: TempCluster, pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = unreachable_aq_pooler(pooler, proxy, query_wait_timeout=30)
        with proxy.reachable_after(2.5):
            start = time.monotonic()
            with psycopg.connect(p.dsn("md5user", "md5pass", dbname="flaky"), connect_timeout=20) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("md5user",)
            assert time.monotonic() - start >= 2, "logged in before the auth_user's server could"


# PgBouncer's janitor applies client_login_timeout to the logins in its login list only: a login
# queued for its auth_user's server (CL_WAITING_LOGIN) is bounded by query_wait_timeout instead, and
# the time since its connect counts again once it is no longer queued.


def test_waiting_for_the_auth_server_is_not_bounded_by_client_login_timeout(
        cluster: TempCluster, pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = unreachable_aq_pooler(pooler, proxy, client_login_timeout=2, query_wait_timeout=5)
        start = time.monotonic()
        err, _ = login_error(p.host, p.port, "md5user", "flaky", "md5pass")
        elapsed = time.monotonic() - start
        assert err.message == "query_wait_timeout"
        assert elapsed >= 4, f"failed after {elapsed:.1f}s, before query_wait_timeout = 5"


def test_login_queued_past_client_login_timeout_is_served_once_the_auth_server_comes_back(
        cluster: TempCluster, pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    """Its client_login_timeout is over, but the janitor's next pass comes after the rest of the
    login (the auth_query, the password exchange)."""
    with FaultProxy(cluster.port) as proxy:
        p = unreachable_aq_pooler(pooler, proxy, client_login_timeout=2, query_wait_timeout=30)
        with proxy.reachable_after(3):
            start = time.monotonic()
            with psycopg.connect(p.dsn("md5user", "md5pass", dbname="flaky"), connect_timeout=20) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("md5user",)
            assert time.monotonic() - start >= 2.5, "logged in before the auth_user's server could"


def test_login_queued_past_client_login_timeout_ends_if_it_dawdles(
        cluster: TempCluster, pooler: Callable[..., PoolerProcess], auth_roles: None) -> None:
    """Once the auth_user's server came and the login is no longer queued, its client_login_timeout
    (over by then) applies again: a client that does not answer the password request is ended."""
    with FaultProxy(cluster.port) as proxy:
        p = unreachable_aq_pooler(pooler, proxy, client_login_timeout=2, query_wait_timeout=30)
        with proxy.reachable_after(3), RawConn(p.host, p.port, timeout=15) as conn:
            conn.send(startup_packet({"user": "md5user", "database": "flaky"}))
            kind, _ = conn.read_message()  # the password request, once the auth_query ran
            asked = time.monotonic()
            assert kind == b"R"
            kind, body = conn.read_message()  # not answered
            waited = time.monotonic() - asked
        assert kind == b"E" and parse_error_fields(body)["M"] == "client_login_timeout", (kind, body)
        assert waited < 1.5, f"ended {waited:.1f}s after the password request, not at the janitor's next pass"
