"""Host lists in [databases] (PgBouncer 1.17+, load_balance_hosts 1.24+): a host that cannot be
reached, here one whose name does not resolve, does not stop the database being served from the
other hosts of its list."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess

pytestmark = [pytest.mark.integration]

PoolerFactory = Callable[..., PoolerProcess]


@pytest.mark.parametrize("mode", [
    None,
    pytest.param("round-robin", marks=pytest.mark.pgmux_only(reason="load_balance_hosts is PgBouncer 1.24+")),
    pytest.param("disable", marks=pytest.mark.pgmux_only(reason="load_balance_hosts is PgBouncer 1.24+")),
])
def test_unresolvable_first_host_serves_from_the_next(pooler: PoolerFactory, mode: str | None) -> None:
    line = "host=no-such-host.invalid,{host} port={port} dbname=testdb"
    if mode:
        line += f" load_balance_hosts={mode}"
    p = pooler(pool_mode="session", databases={"testdb": line}, extra={"server_login_retry": 1})
    # Session mode, every connection held: each one needs a server connection of its own.
    conns = [psycopg.connect(p.dsn("md5user", "md5pass"), connect_timeout=10) for _ in range(3)]
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()
