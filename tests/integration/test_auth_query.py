"""auth_query: roles that exist only in PostgreSQL log in through pgmux (SCRAM and md5)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from pgmux.auth import md5_secret
from pgmux.testing.cluster import PoolerProcess, TempCluster

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


@pytest.mark.pgmux_only
def test_wrong_password_and_unknown_role_read_the_same(aq_pooler: PoolerProcess) -> None:
    messages = []
    for user, password in (("scramuser", "wrong"), ("md5user", "wrong"), ("no_such_role", "x")):
        with pytest.raises(psycopg.OperationalError) as exc:
            psycopg.connect(aq_pooler.dsn(user, password))
        messages.append(str(exc.value).split("FATAL:")[-1].strip())
    assert messages == ["password authentication failed"] * 3


@pytest.mark.pgmux_only
def test_search_path_cannot_redirect_the_lookup(aq_pooler: PoolerProcess) -> None:
    """The default query is schema-qualified: the decoy table's password must not work."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(aq_pooler.dsn("scramuser", "hacked"))
