"""Server login with the secret the pooler has (PgBouncer's get_srv_psw / login_md5_psw /
login_scram_sha_256): which auth_file or auth_query secret answers which server challenge, what a
client sees when none can, and how a changed server password is picked up by new server logins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from pgwire import login_error

from pgmux.auth import md5_secret
from pgmux.auth.scram import ScramSecret
from pgmux.testing.cluster import PoolerProcess, TempCluster, userlist_text, wait_for

pytestmark = [pytest.mark.integration]

PoolerFactory = Callable[..., PoolerProcess]
ADMIN_PW = "adminpw"


def console(p: PoolerProcess) -> psycopg.Connection:
    return psycopg.connect(p.dsn("postgres", ADMIN_PW, dbname="pgbouncer"), autocommit=True, connect_timeout=10)


def current_user(dsn: str) -> str:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


# --------------------------------------------------------------------------------------------------
# forced user: a [databases] user= without password= logs in with that user's auth_file secret


@pytest.mark.parametrize("secret", ["plaintext", "md5"])
def test_forced_user_without_password_logs_in_with_its_auth_file_secret(
        pooler: PoolerFactory, secret: str) -> None:
    """PgBouncer's get_srv_psw: a forced user without a password in the connection string takes
    the auth_file entry of that user, a plaintext password or an md5 hash (the server asks md5)."""
    stored = "md5pass" if secret == "plaintext" else md5_secret("md5pass", "md5user")
    p = pooler(pool_mode="transaction",
               databases={"forced": "host={host} port={port} dbname=testdb user=md5user"},
               userlist={"alice": "alicepw", "md5user": stored})
    assert current_user(p.dsn("alice", "alicepw", dbname="forced")) == "md5user"


# --------------------------------------------------------------------------------------------------
# secrets that cannot answer the server's challenge


def test_md5_hash_cannot_answer_a_scram_server(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """An md5 hash in auth_file logs the client in (md5), but cannot do the server's SCRAM."""
    p = pooler(pool_mode="transaction", userlist={"scramuser": md5_secret("scrampass", "scramuser")})
    err, _ = login_error(p.host, p.port, "scramuser", "testdb", "scrampass")
    assert (err.severity, err.sqlstate, err.message) == ("FATAL", "08P01", "server login failed: wrong password type")


def test_scram_secret_cannot_answer_an_md5_server(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """A SCRAM secret logs the client in with SCRAM (the client's keys are recovered), but those
    keys cannot answer the server's md5 challenge."""
    p = pooler(pool_mode="transaction", userlist={"md5user": str(ScramSecret.from_password("md5pass"))})
    err, _ = login_error(p.host, p.port, "md5user", "testdb", "md5pass")
    assert (err.severity, err.sqlstate, err.message) == ("FATAL", "08P01", "server login failed: wrong password type")


def test_plaintext_answers_md5_after_a_scram_client_login(pooler: PoolerFactory) -> None:
    """auth_type = scram-sha-256 with a plaintext auth_file password: the client logs in with
    SCRAM, the server asks md5, and the plaintext answers it."""
    p = pooler(pool_mode="transaction", auth_type="scram-sha-256", userlist={"md5user": "md5pass"})
    assert current_user(p.dsn("md5user", "md5pass")) == "md5user"


# --------------------------------------------------------------------------------------------------
# the server password changes


@pytest.fixture
def changing_role(cluster: TempCluster) -> Iterator[str]:
    role = "pw_changes"
    cluster.execute(f"DROP ROLE IF EXISTS {role}")
    cluster.execute(f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {role} LOGIN PASSWORD 'first-pw'")
    try:
        yield role
    finally:
        cluster.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.parametrize("renew", ["RECONNECT", "server_lifetime"])
def test_changed_scram_password_is_used_by_new_server_logins(
        cluster: TempCluster, pooler: PoolerFactory, changing_role: str, renew: str) -> None:
    """The role's SCRAM secret changes in PostgreSQL and in auth_file (RELOAD). The next client
    logs in with the new password; its SCRAM keys replace the old ones, so the servers that
    RECONNECT or server_lifetime open log in with them."""
    role = changing_role
    extra: dict[str, object] = {"server_lifetime": 1} if renew == "server_lifetime" else {}
    users = {"postgres": ADMIN_PW, role: cluster.role_secret(role)}
    p = pooler(pool_mode="transaction", userlist=users, extra=extra)
    assert current_user(p.dsn(role, "first-pw")) == role

    cluster.execute(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD 'second-pw'")
    users[role] = cluster.role_secret(role)
    p.rewrite_config(userlist_text=userlist_text(users))
    # PgBouncer reloads auth_file only if its size or mtime (in seconds) changed: same size here.
    path = os.path.join(p.workdir, "userlist.txt")
    os.utime(path, (time.time() + 2, time.time() + 2))
    with console(p) as admin:
        admin.execute("RELOAD")
        with psycopg.connect(p.dsn(role, "second-pw"), autocommit=True, connect_timeout=10) as conn:
            if renew == "RECONNECT":
                admin.execute("RECONNECT")
            else:
                old = cluster.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s", params=[role])
                assert old, "the first server should still be there"
                wait_for(lambda: not cluster.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE usename = %s AND pid = %s",
                    params=[role, old[0][0]]), 10, what="server_lifetime to close the old server")
            row = conn.execute("SELECT current_user").fetchone()
    assert row == (role,)


def test_changed_password_of_an_auth_query_role_is_used_after_reconnect(
        cluster: TempCluster, pooler: PoolerFactory, changing_role: str) -> None:
    """The same for a role only PostgreSQL knows: auth_query finds the new secret, the client's
    new keys log the new servers in."""
    role = changing_role
    p = pooler(pool_mode="transaction", userlist={"postgres": ADMIN_PW}, extra={"auth_user": "postgres"})
    assert current_user(p.dsn(role, "first-pw")) == role
    cluster.execute(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD 'second-pw'")
    with psycopg.connect(p.dsn(role, "second-pw"), autocommit=True, connect_timeout=10) as conn:
        with console(p) as admin:
            admin.execute("RECONNECT")
        assert conn.execute("SELECT current_user").fetchone() == (role,)
