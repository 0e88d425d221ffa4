"""The in-process data path (bench/hotpath.py) without a network: what the microbenchmark times
must be the real thing, so its accounting is checked here, and it doubles as a test of linking,
queueing and release in transaction mode."""

from __future__ import annotations

import asyncio

import pytest

from bench import hotpath


@pytest.mark.parametrize(("clients", "servers", "mode"), [(7, 3, "transaction"), (4, 4, "session")])
def test_every_transaction_is_forwarded_answered_and_counted(clients: int, servers: int, mode: str) -> None:
    async def go() -> None:
        pooler, client_list, server_list = hotpath.build(clients, servers, mode)
        pool = client_list[0].pool
        assert pool is not None
        txns = 300
        hotpath.drive(client_list, server_list, txns)
        linked = [c for c in client_list if c.server is not None]
        # every answered transaction reached its client, and one query per transaction (plus
        # the one each linked client has outstanding now) reached a server
        assert sum(c.transport.writes for c in client_list) == txns  # type: ignore[union-attr]
        assert sum(s.transport.writes for s in server_list) == txns + len(linked)  # type: ignore[union-attr]
        assert pool.stats.xact_count == txns
        assert pool.stats.query_count == txns
        assert pool.stats.bytes_sent == txns * len(hotpath.ANSWER)
        if mode == "transaction":
            # the servers are all busy with a query; the other clients wait in line, in order
            assert len(linked) == servers
            assert len(pool.waiting) == clients - servers
            assert {c.server for c in linked} == set(server_list)
            assert pool.stats.server_assignment_count == txns + servers
        else:
            assert len(linked) == clients
            assert pool.stats.server_assignment_count == clients
        assert all(s.outstanding == 1 for s in server_list)

    asyncio.run(go())


def test_login_workload_logs_in_queries_and_leaves_nothing_behind() -> None:
    async def go() -> None:
        pooler, _, server_list = hotpath.build(0, 3, "transaction")
        pool = next(iter(pooler.pools.values()))
        assert await hotpath.run_logins(50, pooler) > 0
        assert pool.stats.client_login_count == 50
        assert pool.stats.xact_count == 50
        # every client is gone and forgotten, every server is back in the pool
        assert not pooler.clients and not pool.clients and not pooler.cancel_keys
        assert pooler.admitted_clients == 0
        assert sorted(map(id, pool.idle)) == sorted(map(id, server_list))

    asyncio.run(go())
