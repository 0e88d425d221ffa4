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


class RecordingTransport(hotpath.CountingTransport):
    """Keeps every byte written, to check what a client received."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: bytes | memoryview | bytearray) -> None:
        super().write(data)
        self.data += data


@pytest.mark.parametrize("cut", [3, 20])  # inside the notice's header / inside its body
def test_an_async_message_cut_after_ready_for_query_stays_with_its_client(cut: int) -> None:
    """A notice (or ParameterStatus) can follow a ReadyForQuery; when a read cuts it, its start has
    already gone to the client: the server must not pass to the next client before its last byte."""
    from pgmux.protocol import messages as m

    async def go() -> None:
        _, (a, b), (s,) = hotpath.build(2, 1, "transaction")
        a.transport = ta = RecordingTransport()  # type: ignore[assignment]
        b.transport = tb = RecordingTransport()  # type: ignore[assignment]
        hotpath.feed(a, hotpath.QUERY)
        hotpath.feed(b, hotpath.QUERY)  # b waits for the only server
        assert a.server is s and b.server is None
        notice = m.message(b"N", b"SNOTICE\0C00000\0M" + b"x" * 100 + b"\0\0")
        hotpath.feed(s, hotpath.ANSWER + notice[:cut])
        assert s.client is a and b.server is None  # the transaction is over, the notice is not
        hotpath.feed(s, notice[cut:])
        assert a.server is None and s.client is b  # now s serves b
        assert bytes(ta.data) == hotpath.ANSWER + notice
        assert notice[cut:] not in bytes(tb.data)

    asyncio.run(go())
