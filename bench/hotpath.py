"""pgmux's own Python cost per transaction, without sockets: ``python -m bench.hotpath``.

Why: on a 2-core VM the end-to-end benchmark swings by tens of percent and mixes pgmux's bytecode
with the kernel's TCP work. This drives the real data path (ClientConnection.buffer_updated ->
forward -> link, ServerConnection.buffer_updated -> data_path -> release) in one process with
transports that only count writes, so a change to the hot path shows up as microseconds per
transaction within a few percent. It is a microbenchmark: the end-to-end figures stay in
``bench/run.py``. Workloads: N clients in transaction mode sharing a pool of 20 servers, one
``pgbench -S``-shaped query and answer per transaction (with N > 20, clients queue for servers
as they do under pgbench -c 50); ``--mode session`` links each client to its own server.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import functools
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from pgmux.auth.secrets import md5_client_response
from pgmux.config import load_config_text
from pgmux.net.client import ClientConnection
from pgmux.net.server import ServerConnection
from pgmux.pooler import Pooler
from pgmux.protocol import messages as m

QUERY = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 52736;")
ANSWER = (
    m.row_description([("abalance", 23)])
    + m.data_row(["0"])
    + m.command_complete("SELECT 1")
    + m.ready_for_query(b"I")
)
# pgbench -M extended: Parse, Bind, Describe portal, Execute, Sync with the unnamed statement
_PB = m.extended_query("SELECT abalance FROM pgbench_accounts WHERE aid = $1", ["52736"])
_ES = m.message(b"E", b"\0\0\0\0\0") + m.message(b"S")
EXT_QUERY = _PB.removesuffix(_ES) + m.message(b"D", b"P\0") + _ES
EXT_ANSWER = b"1\0\0\0\x042\0\0\0\x04" + ANSWER
WORKLOADS = {"simple": (QUERY, ANSWER), "extended": (EXT_QUERY, EXT_ANSWER)}


@functools.cache
def userlist() -> str:
    """A userlist.txt with the bench user, written once per process and deleted at exit."""
    tmp = tempfile.mkdtemp(prefix="pgmux-hotpath-")
    atexit.register(shutil.rmtree, tmp, True)
    path = os.path.join(tmp, "userlist.txt")
    with open(path, "w") as f:
        f.write('"bench" "benchpass"\n')
    return path


class CountingTransport:
    """Just enough of an asyncio transport for the data path: writes are counted, not sent (the
    last one is kept for the login workload, which answers the md5 challenge)."""

    def __init__(self, protocol: ClientConnection | None = None) -> None:
        self.writes = 0
        self.last: bytes | memoryview | bytearray = b""
        self.protocol = protocol

    def write(self, data: bytes | memoryview | bytearray) -> None:
        self.writes += 1
        self.last = data

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return PEER.get(name, default)

    def close(self) -> None:
        if self.protocol is not None:  # as uvloop does: connection_lost from the loop, soon
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
            self.protocol = None


PEER = {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 6432)}


def feed(conn: ClientConnection | ServerConnection, data: bytes) -> None:
    """One read: what uvloop does for a BufferedProtocol."""
    buf = conn.get_buffer(-1)
    n = len(data)
    buf[:n] = data
    conn.buffer_updated(n)


def build(clients: int, servers: int, mode: str) -> tuple[Pooler, list[ClientConnection], list[ServerConnection]]:
    ini = f"""
[databases]
testdb = host=127.0.0.1 port=5432 dbname=testdb
[pgbouncer]
pool_mode = {mode}
default_pool_size = {servers}
max_client_conn = {clients + 10}
auth_type = md5
auth_file = {userlist()}
log_connections = 0
log_disconnections = 0
"""
    pooler = Pooler(load_config_text(ini))
    db = pooler.config.find_database("testdb")
    assert db is not None
    pool = pooler.get_pool(db, "bench")
    pool.params = {}
    server_list = []
    for _ in range(servers):
        s = ServerConnection(pooler, pool, "127.0.0.1", 5432, pooler.next_client_id())
        s.connection_made(CountingTransport())  # type: ignore[arg-type]
        s.state = "idle"
        server_list.append(s)
        pooler.server_ready(s)
    client_list = []
    for _ in range(clients):
        c = ClientConnection(pooler)
        c.transport = CountingTransport()  # type: ignore[assignment]
        c.user, c.dbname, c.db, c.pool = "bench", "testdb", db, pool
        c.pool_mode = mode
        c.lazy_prepare = mode != "session" and pooler.settings.max_prepared_statements > 0
        c.pin_mode = pooler.settings.pin_session_state if mode != "session" else "off"
        c.logged_in = True
        pool.clients.add(c)
        pooler.clients.add(c)
        c.start_forwarding()
        client_list.append(c)
    return pooler, client_list, server_list


async def until(done: Callable[[], object], what: str) -> None:
    """Let the event loop run until `done()`; a login that never gets there is an error."""
    for _ in range(1000):
        if done():
            return
        await asyncio.sleep(0)
    raise RuntimeError(f"hotpath: {what} did not happen")


async def run_logins(logins: int, pooler: Pooler | None = None) -> float:
    """Seconds per `pgbench -C` shaped connection: startup packet, md5 login, one query, Terminate.
    The event loop runs between the client's messages, as it does between real reads. The time
    includes the harness's side: its md5 answer and the loop turns it waits for."""
    if pooler is None:
        pooler = build(0, 20, "transaction")[0]
    pool = next(iter(pooler.pools.values()))
    server_list = [*pool.idle]
    startup = m.startup_message({"user": "bench", "database": "testdb"})
    gc.collect()
    start = time.perf_counter()
    for _ in range(logins):
        c = ClientConnection(pooler)
        t = CountingTransport(c)
        c.connection_made(t)  # type: ignore[arg-type]
        feed(c, startup)
        await until(lambda: t.writes >= 1, "the md5 challenge")  # noqa: B023 - awaited at once
        salt = bytes(t.last)[-4:]
        feed(c, m.password_message(md5_client_response("benchpass", "bench", salt).encode() + b"\0"))
        await until(lambda: c.forwarding, "the login")  # noqa: B023
        feed(c, QUERY)
        s = c.server
        assert s is not None
        feed(s, ANSWER)
        feed(c, m.terminate())
        await until(lambda: c not in pooler.clients, "the logout")  # noqa: B023
    elapsed = time.perf_counter() - start
    assert all(s.client is None for s in server_list)
    return elapsed / logins


def run(clients: int, servers: int, mode: str, txns: int, protocol: str = "simple") -> float:
    """Seconds per transaction for `txns` closed-loop transactions."""
    return drive(*build(clients, servers, mode)[1:], txns, *WORKLOADS[protocol])


def drive(client_list: list[ClientConnection], server_list: list[ServerConnection], txns: int,
          query: bytes = QUERY, answer: bytes = ANSWER) -> float:
    """Run `txns` transactions: each answered client asks again at once."""
    in_flight: collections.deque[ServerConnection] = collections.deque()
    for first in client_list:  # every client sends its first query; some wait for a server
        feed(first, query)
        if first.server is not None:
            in_flight.append(first.server)
    gc.collect()
    start = time.perf_counter()
    for _ in range(txns):
        s = in_flight.popleft()
        c = s.client
        assert c is not None
        feed(s, answer)  # the answer ends the transaction: s goes to the next waiting client
        feed(c, query)  # the answered client asks again
        if s.client is not None:
            in_flight.append(s)
        if c.server is not None and c.server is not s:
            in_flight.append(c.server)
    elapsed = time.perf_counter() - start
    return elapsed / txns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 50, 500])
    ap.add_argument("--servers", type=int, default=20)
    ap.add_argument("--mode", default="transaction", choices=["transaction", "session"])
    ap.add_argument("--protocol", default="simple", choices=list(WORKLOADS),
                    help="simple: pgbench -S's Query; extended: pgbench -M extended's Parse/Bind/Describe/Execute/Sync")
    ap.add_argument("--txns", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--logins", type=int, default=20_000, help="connections for the -C shaped workload (0: skip)")
    args = ap.parse_args(argv)

    async def go() -> None:
        if args.logins:
            best = min([await run_logins(args.logins) for _ in range(args.reps)])
            print(f"# {args.logins} logins (md5, one query, Terminate), best of {args.reps}")
            print(f"-C shaped   : {best * 1e6:6.2f} µs per connection (pgmux's Python, with the harness's md5 "
                  "answer and loop turns)")
        print(f"# bench.hotpath: {args.mode} mode, pool of {args.servers}, {args.txns} transactions, "
              f"best of {args.reps}; pgbench -S shaped query and answer ({args.protocol} protocol), no sockets")
        for n in args.clients:
            servers = n if args.mode == "session" else args.servers
            best = min(run(n, servers, args.mode, args.txns, args.protocol) for _ in range(args.reps))
            print(f"clients {n:5d}: {best * 1e6:6.2f} µs per transaction (pgmux's Python only)")

    try:
        import uvloop

        uvloop.run(go())
    except ImportError:
        asyncio.run(go())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
