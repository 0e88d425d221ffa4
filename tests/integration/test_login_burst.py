"""A login burst (issue "Logins at PgBouncer's cost"), small: 300 clients connect at once, 50 logins in
flight, each a raw-protocol md5 login (bench/burst.py, the code of the benchmark's ``login-burst``) and one
``SELECT 1``, all held until the last is in.

Nothing is refused under max_client_conn, every client reaches ReadyForQuery, SHOW CLIENTS lists them all
while held, and once they are closed it lists the console alone. No timing is asserted: the client's
timeouts are generous (30 s per step) and the wait for the closes is 20 s, for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from helpers_tx import quiet_cluster  # noqa: F401 - fixture

from bench.burst import BurstResult, login_burst
from pgmux.testing.cluster import PoolerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_cluster")]

CLIENTS = 300
IN_FLIGHT = 50
USERS = {"md5user": "md5pass", "postgres": "adminpass"}


def show_clients(p: PoolerProcess) -> list[dict[str, Any]]:
    """SHOW CLIENTS on a fresh console connection (which lists itself too)."""
    with psycopg.connect(
        p.dsn("postgres", USERS["postgres"], dbname="pgbouncer"), autocommit=True, connect_timeout=20
    ) as admin:
        cur = admin.execute("SHOW CLIENTS", prepare=False)
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def burst_clients(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["database"] == "testdb"]


def test_login_burst_all_in_and_listed(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(
        pool_mode="transaction",
        userlist=USERS,
        extra={"max_client_conn": CLIENTS + 100, "default_pool_size": 10},
    )
    held_rows: list[dict[str, Any]] = []

    def while_held(res: BurstResult) -> None:
        held_rows.extend(show_clients(p))

    res = asyncio.run(
        login_burst(
            p.host, p.port, "md5user", USERS["md5user"], "testdb", CLIENTS,
            concurrency=IN_FLIGHT, timeout=30.0, query="SELECT 1", on_all_in=while_held,
        )
    )
    assert (res.failed, res.first_error) == (0, ""), res.error_counts
    assert res.logged_in == len(res.login_ms) == CLIENTS
    assert res.queried == CLIENTS and res.query_failed == 0
    assert res.alive == CLIENTS  # none was dropped while the others logged in

    listed = burst_clients(held_rows)
    assert len(listed) == CLIENTS, f"SHOW CLIENTS listed {len(listed)} of {CLIENTS} held clients"
    assert {r["user"] for r in listed} == {"md5user"}
    consoles = [r for r in held_rows if r["database"] == "pgbouncer"]
    assert len(consoles) == 1 and len(held_rows) == CLIENTS + 1

    # closed (RST): the pooler notices each close on its own time; then only the console asking is left
    last: list[dict[str, Any]] = []

    def console_alone() -> bool:
        last[:] = show_clients(p)
        return len(last) == 1 and last[0]["database"] == "pgbouncer"

    try:
        wait_for(console_alone, 20, interval=0.2, what="SHOW CLIENTS to list the console alone")
    except AssertionError as e:
        raise AssertionError(f"{e}; still listed: {len(burst_clients(last))} burst clients, {len(last)} rows") from e
