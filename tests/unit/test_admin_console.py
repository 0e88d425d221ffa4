"""SHOW results, command rules and the Pooler's admin hooks on an in-process Pooler with fake sockets.

The integration tests check the same things over the wire; these pin the rules (who counts as
waiting, what PAUSE closes, what a stats user may do) quickly and without PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from pgmux.admin import control, show
from pgmux.admin.commands import AdminError, parse_command
from pgmux.config import load_config_text
from pgmux.pool.admin_state import ConsoleSession
from pgmux.pooler import Pooler
from pgmux.protocol.varcache import ParamSet

INI = """\
[databases]
testdb = host=127.0.0.1 port=5432 dbname=realdb pool_size=5
multi = host=h1,h2 port=5432 load_balance_hosts=disable
forced = host=127.0.0.1 user=forcer password=x

[users]
alice = pool_mode=statement pool_size=7 max_user_connections=9

[pgbouncer]
listen_port = 6432
pool_mode = transaction
admin_users = admin
stats_users = watcher
max_db_connections = 11
"""


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closing = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class FakeClient:
    def __init__(self, pooler: Pooler, pool: Any, user: str = "bob", logged_in: bool = True) -> None:
        self.pooler = pooler
        self.pool = pool
        self.user = user
        self.dbname = pool.database if pool is not None else None
        self.id = pooler.next_client_id()
        self.logged_in = logged_in
        self.replication: str | None = None
        self.closed = False
        self.close_reason: str | None = None
        self.waiting = False
        self.wait_started = 0.0
        self.linking = False
        self.write_paused = False
        self.server: Any = None
        self.is_unix = False
        self.addr, self.port, self.local_addr, self.local_port = "10.0.0.1", 5555, "127.0.0.1", 6432
        now = time.monotonic()
        self.connect_time = self.request_time = now
        self.connect_wall = time.time()
        self.params = ParamSet()
        self.startup_params: dict[str, str] = {"application_name": "app"}
        self.transport = FakeTransport()
        self.keep = self.skip = 0
        self.fast = False  # (pgmux.engine.Link: never on the engine's fast path here)
        self.carried = (0, 0)
        self.inbox = bytearray()
        self.buf = bytearray(16)
        self.failed: str | None = None
        pooler.clients.add(self)  # type: ignore[arg-type]
        if pool is not None and logged_in:
            pool.clients.add(self)

    def fail(self, message: str, sqlstate: str = "08P01", log: bool = True) -> None:
        self.failed = message
        self.close(message)

    def close(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self.transport.close()


class FakeServer:
    def __init__(self, pool: Any, pid: int) -> None:
        self.pool = pool
        self.client: Any = None
        self.backend_pid = pid
        self.replication: str | None = None
        self.id = 1000 + pid  # (a real server draws it from Pooler.next_client_id when launched)
        self.addr, self.port, self.local_addr, self.local_port = "127.0.0.1", 5432, "127.0.0.1", 40000 + pid
        self.connect_wall = time.time()
        self.connect_time = self.request_time = self.last_used = time.monotonic()
        self.query_start = 0.0
        self.close_needed = False
        self.closed_because: str | None = None
        self.closed = False
        self.params = ParamSet()
        self.transport = FakeTransport()
        self.keep = self.skip = 0
        self.fast = False
        self.carried = (0, 0)
        self.inbox = bytearray()
        self.buf = bytearray(16)
        self.state = "idle"

    def close(self, reason: str) -> None:
        self.closed_because = reason
        self.closed = True

    def stop_forwarding(self) -> None:
        pass

    def start_forwarding(self) -> None:
        pass


def rows(result: Any) -> list[dict[str, Any]]:
    names = [c.name for c in result.columns]
    return [dict(zip(names, r, strict=True)) for r in result.rows]


@pytest.fixture
async def pooler() -> Pooler:
    return Pooler(load_config_text(INI, "/nonexistent/pgmux.ini"))


def pool_of(pooler: Pooler, db: str = "testdb", user: str = "bob") -> Any:
    entry = pooler.config.find_database(db)
    assert entry is not None
    return pooler.get_pool(entry, user)


def linked(pooler: Pooler, pool: Any, pid: int) -> tuple[FakeClient, FakeServer]:
    client, server = FakeClient(pooler, pool), FakeServer(pool, pid)
    pool.active.add(server)
    client.server, server.client = server, client
    return client, server


def idle_server(pool: Any, pid: int) -> FakeServer:
    server = FakeServer(pool, pid)
    pool.idle.append(server)
    return server


async def test_show_pools_counts_and_console_row(pooler: Pooler) -> None:
    pool = pool_of(pooler)
    _, busy = linked(pooler, pool, 1)
    idle_server(pool, 2)
    FakeClient(pooler, pool)  # logged in, no server: active (shown idle in SHOW CLIENTS)
    waiter = FakeClient(pooler, pool)
    waiter.waiting = True
    pool.enqueue(waiter, now=time.monotonic() - 2.5)
    FakeClient(pooler, pool, logged_in=False)  # still waiting for the pool's first server
    pool.connecting = 1
    result = {r["database"]: r for r in rows(show.show_pools(pooler))}
    row = result["testdb"]
    assert (row["cl_active"], row["cl_waiting"], row["sv_active"], row["sv_idle"], row["sv_login"]) == (2, 2, 1, 1, 1)
    assert row["maxwait"] == 2 and row["pool_mode"] == "transaction" and row["load_balance_hosts"] is None
    assert result["pgbouncer"]["pool_mode"] == "statement" and result["pgbouncer"]["user"] == "pgbouncer"
    clients = rows(show.show_clients(pooler))
    assert [c["state"] for c in clients] == ["active", "idle", "waiting", "waiting"]
    assert clients[0]["link"] == f"{id(busy):#x}" and clients[0]["application_name"] == "app"
    servers = rows(show.show_servers(pooler))
    assert [(s["state"], s["remote_pid"]) for s in servers] == [("active", 1), ("idle", 2)]
    assert servers[0]["id"] != servers[1]["id"] and servers[0]["id"] == rows(show.show_servers(pooler))[0]["id"]
    sockets = rows(show.show_sockets(pooler))
    assert {s["state"] for s in sockets} == {"cl_active", "cl_waiting", "sv_active", "sv_idle"}


async def test_show_databases_and_users(pooler: Pooler) -> None:
    pool = pool_of(pooler)
    idle_server(pool, 1)
    FakeClient(pooler, pool)
    pooler.admin_state().paused_dbs.add("testdb")
    dbs = {r["name"]: r for r in rows(show.show_databases(pooler))}
    assert list(dbs) == ["forced", "multi", "pgbouncer", "testdb"]
    t = dbs["testdb"]
    assert (t["database"], t["pool_size"], t["current_connections"], t["current_client_connections"]) == (
        "realdb", 5, 1, 1)
    assert t["paused"] == 1 and t["disabled"] == 0 and t["max_connections"] == 11 and t["server_lifetime"] == 3600
    assert dbs["multi"]["load_balance_hosts"] == "disable" and dbs["forced"]["force_user"] == "forcer"
    assert dbs["pgbouncer"]["pool_size"] == 2 and dbs["pgbouncer"]["port"] == 6432
    users = {r["name"]: r for r in rows(show.show_users(pooler))}
    assert users["alice"]["pool_size"] == "        7" and users["alice"]["reserve_pool_size"] == ""
    assert users["alice"]["pool_mode"] == "statement" and users["alice"]["max_user_connections"] == 9
    assert users["bob"]["current_connections"] == 1 and "pgbouncer" in users


async def test_show_stats_groups_databases_and_counts_the_console(pooler: Pooler) -> None:
    pool_of(pooler, user="u1").stats.xact_count = 3
    pool_of(pooler, user="u2").stats.xact_count = 4
    pool_of(pooler, db="multi").stats.query_count = 9
    pooler.admin_state().stats.query_count = 1
    stats = {r["database"]: r for r in rows(show.show_stats(pooler))}
    assert list(stats) == ["multi", "pgbouncer", "testdb"]
    assert stats["testdb"]["total_xact_count"] == 7 and stats["multi"]["total_query_count"] == 9
    totals = {r["name"]: r["value"] for r in rows(show.show_totals(pooler))}
    assert totals["total_xact_count"] == 7 and totals["total_query_count"] == 10


def session(pooler: Pooler, admin: bool) -> ConsoleSession:
    return ConsoleSession(FakeClient(pooler, None), "admin" if admin else "watcher", admin)  # type: ignore[arg-type]


async def run(pooler: Pooler, sess: ConsoleSession, query: str) -> Any:
    return await control.execute(pooler, sess, parse_command(query))


async def test_stats_user_may_only_read(pooler: Pooler) -> None:
    watcher = session(pooler, admin=False)
    assert (await run(pooler, watcher, "show pools")).tag == "SHOW"
    assert (await run(pooler, watcher, "set client_encoding = 'x'")).tag == "SET"
    for query in ("pause", "resume", "kill", "reload", "set default_pool_size = 3", "show fds", "shutdown",
                  "suspend", "wait_close", "kill_client 1", "enable testdb"):
        with pytest.raises(AdminError, match="^admin access needed$"):
            await run(pooler, watcher, query)
    with pytest.raises(AdminError, match="^invalid command 'reload x', use SHOW HELP;$"):
        await run(pooler, watcher, "reload x")  # syntax before rights, as in PgBouncer


async def test_pause_closes_idle_marks_active_and_resume_undoes(pooler: Pooler) -> None:
    admin = session(pooler, admin=True)
    pool = pool_of(pooler)
    client, active = linked(pooler, pool, 1)
    idle = idle_server(pool, 2)
    pause = asyncio.ensure_future(run(pooler, admin, "pause testdb"))
    await asyncio.sleep(0.1)
    assert not pause.done()
    assert pool.paused and idle.closed_because == "pause mode" and active.close_needed and not active.closed
    assert rows(show.show_databases(pooler))[-1]["paused"] == 1
    pool.active.discard(active)  # the transaction ended and the server was closed on release
    assert (await asyncio.wait_for(pause, 2)).tag == "PAUSE"
    with pytest.raises(AdminError, match="^database multi is not paused$"):
        await run(pooler, admin, "resume multi")
    pool.active.add(active)
    await run(pooler, admin, "resume testdb")
    assert not pool.paused and not active.close_needed  # PAUSE's close request is withdrawn
    assert client.failed is None


async def test_global_pause_holds_new_pools_state(pooler: Pooler) -> None:
    admin = session(pooler, admin=True)
    await run(pooler, admin, "pause")
    assert pooler.admin_pool_paused("anything")
    assert rows(show.show_state(pooler))[1] == {"key": "paused", "value": "yes"}
    with pytest.raises(AdminError, match="^already suspended/paused$"):
        await run(pooler, admin, "kill testdb")
    await run(pooler, admin, "resume")
    assert not pooler.admin_pool_paused("anything")


async def test_kill_drops_clients_and_servers_of_one_database(pooler: Pooler) -> None:
    admin = session(pooler, admin=True)
    pool = pool_of(pooler)
    other = pool_of(pooler, db="multi")
    client, server = linked(pooler, pool, 1)
    bystander, _ = linked(pooler, other, 2)
    assert (await run(pooler, admin, "kill testdb")).tag == "KILL"
    assert client.failed == "database removed" and server.closed_because == "database removed"
    assert bystander.failed is None and pool.paused and not other.paused
    assert not pool.active and pooler.pools[("testdb", "bob")] is pool  # the pool (and its counters) stays
    await run(pooler, admin, "resume testdb")
    assert not pool.paused


async def test_reconnect_and_wait_close(pooler: Pooler) -> None:
    admin = session(pooler, admin=True)
    pool = pool_of(pooler)
    _, active = linked(pooler, pool, 1)
    idle = idle_server(pool, 2)
    await run(pooler, admin, "reconnect")
    assert idle.closed_because == "database configuration changed" and active.close_needed
    waiter = asyncio.ensure_future(run(pooler, admin, "wait_close testdb"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    pool.active.discard(active)
    assert (await asyncio.wait_for(waiter, 2)).tag == "WAIT_CLOSE"


async def test_kill_client_disable_and_set(pooler: Pooler) -> None:
    admin = session(pooler, admin=True)
    pool = pool_of(pooler)
    victim = FakeClient(pooler, pool)
    assert (await run(pooler, admin, f"kill_client {victim.id}")).tag == "KILL_CLIENT"
    assert victim.failed == "admin forced disconnect"
    with pytest.raises(AdminError, match="^client not found$"):
        await run(pooler, admin, "kill_client 999999")
    await run(pooler, admin, "disable testdb")
    assert pooler.admin_db_disabled("testdb")
    with pytest.raises(AdminError, match="^no such database: nope$"):
        await run(pooler, admin, "disable nope")
    await run(pooler, admin, "enable testdb")
    assert not pooler.admin_db_disabled("testdb")
    result = await run(pooler, admin, "set default_pool_size = 4")
    assert result.tag == "SET default_pool_size=4" and pool_of(pooler, "multi").limits.pool_size == 4
    with pytest.raises(AdminError, match="^SET failed$"):
        await run(pooler, admin, "set listen_port = 1")
    with pytest.raises(AdminError) as exc:
        await run(pooler, admin, "reload")  # the ini path does not exist
    assert (exc.value.message, exc.value.sqlstate) == ("RELOAD failed, see logs for additional details", "F0000")


async def test_show_fds_is_refused_even_for_admins(pooler: Pooler) -> None:
    with pytest.raises(AdminError, match="SHOW FDS is not supported"):
        await run(pooler, session(pooler, admin=True), "show fds")


async def test_metrics_collector(pooler: Pooler) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pgmux.stats.histogram import new_histogram, observe
    from pgmux.stats.metrics import render_metrics

    pool = pool_of(pooler)
    pool.stats.xact_count = 5
    pool.stats.query_time_us = 2_000_000
    hist = new_histogram()
    for us in (10, 200, 3_000):
        observe(hist, us)
    pool.stats.query_hist = hist
    body, content_type = render_metrics(pooler)
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    xacts = {s.labels["database"]: s.value for s in families["pgbouncer_stats_sql_transactions_pooled"].samples
             if s.name.endswith("_total")}
    assert xacts["testdb"] == 5 and "pgbouncer" in xacts
    hist_family = families["pgmux_query_duration_seconds"]
    assert hist_family.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in hist_family.samples}
    assert samples[("pgmux_query_duration_seconds_count", None)] == 3
    assert samples[("pgmux_query_duration_seconds_sum", None)] == 2.0
    assert samples[("pgmux_query_duration_seconds_bucket", "+Inf")] == 3
    waits = {(s.name, s.labels.get("le")): s.value for s in families["pgmux_client_wait_seconds"].samples}
    assert waits[("pgmux_client_wait_seconds_count", None)] == 0  # no client has waited yet
    assert families["pgbouncer_databases_paused"].samples


async def test_signals_and_console_cancel(pooler: Pooler) -> None:
    pool = pool_of(pooler)
    pooler.admin_signal_pause()  # SIGUSR1
    await asyncio.sleep(0)
    assert pool.paused and pooler.admin_state().pause_mode == "pause"
    pooler.admin_signal_pause()  # a second one changes nothing
    pooler.admin_signal_resume()  # SIGUSR2
    assert not pool.paused and pooler.admin_state().pause_mode == "none"
    pooler.admin_signal_resume()
    await run(pooler, session(pooler, admin=True), "pause")
    pooler.admin_console_cancel()  # ^C on the console resumes
    assert not pool.paused


async def test_suspend_stops_reading_and_resume_restarts(pooler: Pooler) -> None:
    admin = session(pooler, admin=True)
    pooler.admin_state().sessions[admin.client.id] = admin
    pool = pool_of(pooler)
    client, server = linked(pooler, pool, 1)
    assert (await run(pooler, admin, "suspend")).tag == "SUSPEND"
    assert not client.transport.reading and not server.transport.reading
    assert admin.client.transport.reading  # the console itself keeps talking
    with pytest.raises(AdminError, match="^already suspended/paused$"):
        await run(pooler, admin, "suspend")
    await run(pooler, admin, "resume")
    assert client.transport.reading and server.transport.reading and not pool.paused


async def test_metrics_listener_serves_and_refuses(pooler: Pooler, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import sys

    from pgmux.stats.service import parse_listen, start_metrics_listener
    from pgmux.testing.cluster import free_port

    assert parse_listen("127.0.0.1:9127") == ("127.0.0.1", 9127)
    assert parse_listen("*:9127") == (None, 9127) and parse_listen("[::1]:9127") == ("::1", 9127)
    with pytest.raises(ValueError):
        parse_listen("9127")
    port = free_port()
    pooler.settings.set("metrics_listen", f"127.0.0.1:{port}", source="file")
    server = await start_metrics_listener(pooler)
    assert server is not None
    try:
        async def get(path: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return data

        ok = await get("/metrics")
        assert ok.startswith(b"HTTP/1.1 200 OK") and b"\npgbouncer_up 1.0\n" in ok
        assert (await get("/other")).startswith(b"HTTP/1.1 404")
        page = await get("/")
        assert page.startswith(b"HTTP/1.1 200 OK") and b"text/html" in page and b"api/dashboard" in page
        assert b"http://" not in page.split(b"\r\n\r\n", 1)[1] and b"https://" not in page  # no CDN
        data = await get("/api/dashboard")
        assert data.startswith(b"HTTP/1.1 200 OK") and b"application/json" in data
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert set(body) >= {"time", "pools", "totals", "queries", "pins", "query_hist"}
        assert body["totals"]["total_xact_count"] == 0 and len(body["query_hist"]) == 64
        assert (await get("/health")).startswith(b"HTTP/1.1 200 OK")
        pooler.shutting_down = True  # readiness fails from the start of a shutdown, liveness does not
        assert (await get("/health")).startswith(b"HTTP/1.1 503")
        assert (await get("/live")).startswith(b"HTTP/1.1 200 OK")
        pooler.shutting_down = False
    finally:
        server.close()
    monkeypatch.setattr(logging.getLogger("pgmux"), "propagate", True)
    monkeypatch.setitem(sys.modules, "pgmux.stats.metrics", None)  # as if prometheus_client were missing
    port = free_port()
    pooler.settings.set("metrics_listen", f"127.0.0.1:{port}", source="file")
    with caplog.at_level(logging.ERROR, logger="pgmux"):
        server = await start_metrics_listener(pooler)
    assert server is not None
    try:
        assert (await get("/metrics")).startswith(b"HTTP/1.1 503")
        assert (await get("/")).startswith(b"HTTP/1.1 200 OK")  # the dashboard needs no prometheus_client
    finally:
        server.close()
    assert "prometheus_client is not installed" in caplog.text and "/metrics disabled" in caplog.text


async def test_show_mem_counts_a_shared_receive_buffer_once(pooler: Pooler) -> None:
    from pgmux.net.base import SharedReadBuffer

    pool = pool_of(pooler)
    idle = [FakeClient(pooler, pool) for _ in range(3)]
    for c in idle:
        c.buf = SharedReadBuffer.buf  # idle clients read into the one shared buffer
    holding = FakeClient(pooler, pool)
    holding.buf = bytearray(4096)  # a client with bytes kept owns its buffer
    mem = {r["name"]: r for r in rows(show.show_mem(pooler))}
    assert mem["client_cache"]["used"] == 4
    assert mem["client_cache"]["memtotal"] == len(SharedReadBuffer.buf) + 4096


async def test_show_peer_pools_counts_forwarded_cancels() -> None:
    from pgmux.admin.show import show_peer_pools
    from pgmux.net.peers import PeerPool

    pooler = Pooler(load_config_text(INI + "\n[peers]\n1 = host=/tmp/p1\n2 = host=10.0.0.2 port=6433\n",
                                     "/nonexistent/pgmux.ini"))
    pooler.peers.pools[2] = PeerPool(2, 5, waiting=3, login=1, active=2)
    assert show_peer_pools(pooler).rows == [[1, 0, 0, 0, 0], [2, 2, 3, 2, 1]]
