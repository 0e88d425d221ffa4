"""`workers = 2`: two processes behind one port (SO_REUSEPORT), against a real PostgreSQL.

What a user of several workers relies on: pool_size and max_client_conn hold for pgmux as a
whole, not per process; a cancel (a new TCP connection that lands on any worker) stops the query
of the client it names; both workers take connections; the supervisor reloads, stops and respawns
its workers. Which worker served what is read from the log: each line carries its process's pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers_tx import run_threads

from pgmux.protocol.messages import cancel_request
from pgmux.testing.cluster import BackendSampler, PoolerProcess, TempCluster, free_port, wait_for

psycopg = pytest.importorskip("psycopg")
from psycopg import errors  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

PoolerFactory = Callable[..., PoolerProcess]
DB = "workersdb"  # a database of its own, so backend counts see only these tests' servers


@pytest.fixture(scope="module")
def workers_db(cluster: TempCluster) -> str:
    if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", params=[DB]):
        cluster.execute(f"CREATE DATABASE {DB} OWNER trustuser")
    return DB


def start(pooler: PoolerFactory, workers: int = 2, pool_mode: str = "transaction", **extra: object) -> PoolerProcess:
    """A pgmux with `workers` processes, returned once every worker listens (PoolerProcess.start waits)."""
    return pooler(
        pool_mode=pool_mode,
        auth_type="trust",
        databases={DB: "host={host} port={port} dbname=" + DB},
        extra={"workers": workers, **extra},
    )


def connect(p: PoolerProcess, **kw: Any) -> Any:
    kw.setdefault("autocommit", True)
    return psycopg.connect(p.dsn("trustuser", dbname=DB, connect_timeout=10), **kw)


def both_workers_logged_in(p: PoolerProcess) -> set[int]:
    """Open connections until logins were seen on two worker pids (the kernel spreads them)."""
    conns = []
    try:
        for _ in range(40):
            conns.append(connect(p))
            seen = set(p.log_pids("login attempt")) & set(p.worker_pids())
            if len(seen) == 2:
                return seen
        return set(p.log_pids("login attempt")) & set(p.worker_pids())
    finally:
        for c in conns:
            c.close()


# --------------------------------------------------------------------------------------------------
# limits across workers


def test_pool_size_holds_across_workers(pooler: PoolerFactory, cluster: TempCluster, workers_db: str) -> None:
    p = start(pooler, default_pool_size=3)
    done = [0]

    def client() -> None:
        with connect(p) as conn:
            for _ in range(4):
                conn.execute("SELECT pg_sleep(0.05)")
                done[0] += 1

    with BackendSampler(cluster, usename="trustuser", datname=DB, interval=0.01) as sampler:
        failures = run_threads([client] * 30, timeout=40)
    sampler.stop()
    assert not failures, failures[:3]
    assert done[0] == 120
    assert sampler.max == 3, f"backends seen: max {sampler.max}, samples {sampler.samples}"
    served = set(p.log_pids("login attempt")) & set(p.worker_pids())
    assert len(served) == 2, "30 clients all landed on one worker"


def test_max_db_connections_holds_across_workers_and_pools(
    pooler: PoolerFactory, cluster: TempCluster, workers_db: str
) -> None:
    p = start(pooler, default_pool_size=5, max_db_connections=2)

    def client(user: str) -> Callable[[], None]:
        def run() -> None:
            with psycopg.connect(p.dsn(user, dbname=DB, connect_timeout=10), autocommit=True) as conn:
                for _ in range(3):
                    conn.execute("SELECT pg_sleep(0.05)")

        return run

    with BackendSampler(cluster, datname=DB, interval=0.01) as sampler:
        failures = run_threads([client("trustuser"), client("md5user")] * 8, timeout=40)
    sampler.stop()
    assert not failures, failures[:3]
    assert sampler.max == 2, f"backends seen: max {sampler.max}, samples {sampler.samples}"


@pytest.mark.parametrize(("setting", "message"), [
    ("max_client_conn", "no more connections allowed (max_client_conn)"),
    ("max_db_client_connections", "client connections exceeded (max_db_client_connections)"),
    ("max_user_client_connections", "client connections exceeded (max_user_client_connections)"),
])
def test_client_limits_hold_across_workers(pooler: PoolerFactory, workers_db: str, setting: str,
                                           message: str) -> None:
    p = start(pooler, **{setting: 10})
    conns, refused = [], []
    try:
        for _ in range(15):
            try:
                conns.append(connect(p))
            except psycopg.OperationalError as exc:
                refused.append(str(exc))
        assert len(conns) == 10
        assert len(refused) == 5
        assert all(message in msg for msg in refused), refused
        assert len(set(p.log_pids("login attempt")) & set(p.worker_pids())) == 2
        # A client that leaves gives its slot back to whichever worker the next one reaches.
        conns.pop().close()
        time.sleep(0.1)
        conns.append(connect(p))
        assert conns[-1].execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in conns:
            c.close()


# --------------------------------------------------------------------------------------------------
# cancel requests


def test_cancel_requests_find_their_worker(pooler: PoolerFactory, cluster: TempCluster, workers_db: str) -> None:
    p = start(pooler, default_pool_size=20)
    n = 12
    conns = [connect(p) for _ in range(n)]
    outcomes: dict[int, tuple[str, float]] = {}

    def sleeper(i: int) -> None:
        t0 = time.monotonic()
        try:
            conns[i].execute("SELECT pg_sleep(10)")
            outcomes[i] = ("finished", time.monotonic() - t0)
        except errors.QueryCanceled:
            outcomes[i] = ("canceled", time.monotonic() - t0)

    try:
        threads = [threading.Thread(target=sleeper, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        wait_for(lambda: cluster.count_backends("trustuser", DB, "active") == n, 10, what="12 sleeping queries")
        for c in conns:
            c.cancel()  # a new TCP connection each: the kernel picks the worker
        for t in threads:
            t.join(15)
        assert {i: o[0] for i, o in outcomes.items()} == {i: "canceled" for i in range(n)}
        assert max(o[1] for o in outcomes.values()) < 5, outcomes
        assert len(set(p.log_pids("login attempt")) & set(p.worker_pids())) == 2
        # Make sure at least one cancel crossed workers (each lands on a random one).
        for _ in range(40):
            if p.log_pids("cancel request forwarded"):
                break
            t = threading.Thread(target=sleeper, args=(0,), daemon=True)
            t.start()
            wait_for(lambda: cluster.count_backends("trustuser", DB, "active") == 1, 10, what="a sleeping query")
            conns[0].cancel()
            t.join(15)
            assert outcomes[0][0] == "canceled"
        assert p.log_pids("cancel request forwarded")
    finally:
        for c in conns:
            c.close()


def test_wrong_cancel_key_cancels_nothing(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    with connect(p) as conn:
        pid = conn.info.backend_pid  # pgmux's key, which names the worker; the secret half is wrong
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(conn.execute("SELECT pg_sleep(0.8)").fetchone()))
        t.start()
        time.sleep(0.2)
        for secret in range(8):  # several connections: both workers see a wrong key
            with socket.create_connection((p.host, p.port)) as s:
                s.sendall(cancel_request(pid, secret))
                s.settimeout(5)
                assert s.recv(1) == b""
        t.join(5)
        assert result == [("",)]
    assert p.log_pids("failed cancel request")


# --------------------------------------------------------------------------------------------------
# both workers serve; the supervisor


def test_both_workers_serve_tcp_and_unix(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    pids = set(p.worker_pids())
    assert len(pids) == 2 and p.pid not in pids
    assert set(p.log_pids("listening on")) == pids
    assert both_workers_logged_in(p) == pids
    for _ in range(4):
        with psycopg.connect(p.unix_dsn("trustuser", dbname=DB), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_sighup_reloads_every_worker(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    pids = set(p.worker_pids())
    p.set_options({"default_pool_size": 7})
    p.reload()
    wait_for(lambda: set(p.log_pids("config reloaded")) == pids, 10, what="both workers to reload")
    assert p.pid not in p.log_pids("config reloaded")
    with connect(p) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_killed_worker_is_respawned(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    old = set(p.worker_pids())
    victim = min(old)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: p.log_pids(f"(pid {victim}) died"), 10, what="the supervisor to notice")

    def replaced() -> set[int] | None:
        pids = set(p.worker_pids())
        return pids if len(pids) == 2 and victim not in pids else None

    new = wait_for(replaced, 10, what="a new worker")
    assert "restarting it" in p.log_text()
    (born,) = new - old
    # Service continues, on the new worker too.
    assert born in both_workers_logged_in(p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_all_workers(pooler: PoolerFactory, workers_db: str, sig: int) -> None:
    p = start(pooler)
    pids = set(p.worker_pids())
    p.signal(sig)
    assert p.wait(10) == 0
    for pid in pids:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 5, what=f"worker {pid} to exit")
    assert "all workers exited" in p.log_text()


def test_console_shutdown_stops_every_worker(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    admin = psycopg.connect(p.dsn("postgres", dbname="pgbouncer"), autocommit=True)
    with contextlib.suppress(psycopg.OperationalError):
        admin.execute("SHUTDOWN", prepare=False)
    admin.close()
    assert p.wait(10) == 0


# --------------------------------------------------------------------------------------------------
# the admin console: statistics of pgmux as a whole


def connect_on_each_worker(p: PoolerProcess, open_one: Callable[[], Any], needle: str, per_worker: int,
                           limit: int = 60) -> dict[int, list[Any]]:
    """Open connections (`open_one`) until each worker has `per_worker` of them; the worker of each
    is the pid of the newest log line containing `needle` (connections are opened one at a time).
    Extra connections on a worker that already has enough are closed at once."""
    by_worker: dict[int, list[Any]] = {pid: [] for pid in p.worker_pids()}
    for _ in range(limit):
        if all(len(conns) >= per_worker for conns in by_worker.values()):
            return by_worker
        before = len(p.log_pids(needle))
        conn = open_one()

        def logged(before: int = before) -> list[int] | None:
            found = p.log_pids(needle)
            return found if len(found) > before else None

        pids = wait_for(logged, 5, what="the login line")
        conns = by_worker[pids[-1]]
        if len(conns) < per_worker:
            conns.append(conn)
        else:
            conn.close()
    for conns in by_worker.values():
        for c in conns:
            c.close()
    raise AssertionError(f"{limit} connections did not reach every worker {per_worker} times")


def scrape(port: int) -> dict[tuple[str, str], float]:
    """GET /metrics: (sample name, database or name label) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, s.labels.get("database") or s.labels.get("name", "")): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def console_rows(conn: Any, what: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def db_row(conn: Any, what: str, key: str = "database") -> dict[str, Any]:
    (row,) = [r for r in console_rows(conn, what) if r[key] == DB]
    return row


def clients_and_consoles(p: PoolerProcess, per_worker: int) -> tuple[list[Any], list[Any]]:
    """`per_worker` clients of DB on each worker, and one console on each worker."""
    clients = connect_on_each_worker(p, lambda: connect(p), f"login attempt: db={DB}", per_worker)
    consoles = connect_on_each_worker(
        p, lambda: psycopg.connect(p.dsn("postgres", dbname="pgbouncer"), autocommit=True),
        "login attempt: db=pgbouncer", 1)
    return [c for cs in clients.values() for c in cs], [cs[0] for cs in consoles.values()]


def test_console_stats_and_pools_cover_every_worker(pooler: PoolerFactory, cluster: TempCluster,
                                                    workers_db: str) -> None:
    metrics_port = free_port()
    p = start(pooler, default_pool_size=10, metrics_listen=f"127.0.0.1:{metrics_port}")
    conns, admins = clients_and_consoles(p, 3)  # (one console on each worker)
    try:
        queries = 0
        for i, conn in enumerate(conns):
            for _ in range(i + 1):  # a different number per connection: the sum is not a multiple
                assert conn.execute("SELECT 1").fetchone() == (1,)
                queries += 1
        assert queries == 21

        def totals() -> list[tuple[int, int]]:
            rows = [db_row(a, "STATS") for a in admins]
            return [(r["total_query_count"], r["total_xact_count"]) for r in rows]

        # Each worker served some of the 21 queries; both consoles count them all.
        wait_for(lambda: totals() == [(queries, queries)] * 2, 10, what=f"SHOW STATS to count {queries} queries")
        for admin in admins:
            assert db_row(admin, "STATS_TOTALS")["query_count"] == queries
            res = admin.pgconn.exec_(b"SHOW STATS")  # the simple query protocol too
            fields = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
            simple = [dict(zip(fields, [res.get_value(r, i) for i in range(res.nfields)], strict=True))
                      for r in range(res.ntuples)]
            assert [int(r["total_query_count"]) for r in simple if r["database"] == DB.encode()] == [queries]
            names = {r["name"]: r["value"] for r in console_rows(admin, "TOTALS")}
            assert names["total_query_count"] >= queries  # plus the consoles' own SHOWs
            assert [r["database"] for r in console_rows(admin, "STATS_AVERAGES")] == [
                r["database"] for r in console_rows(admin, "STATS")]

        # SHOW POOLS: the six idle clients of both workers, and every server either holds.
        def pools() -> list[tuple[int, int]]:
            out = []
            for admin in admins:
                r = db_row(admin, "POOLS")
                out.append((r["cl_active"] + r["cl_waiting"],
                            r["sv_active"] + r["sv_idle"] + r["sv_used"] + r["sv_login"]))
            return out

        backends = cluster.count_backends("trustuser", DB)
        assert backends >= 2  # each worker opened its own
        wait_for(lambda: pools() == [(len(conns), backends)] * 2, 10, what="SHOW POOLS to sum both workers")
        pools_row = db_row(admins[0], "POOLS")
        assert list(pools_row)[:4] == ["database", "user", "cl_active", "cl_waiting"]
        for admin in admins:
            assert db_row(admin, "DATABASES", "name")["current_connections"] == backends
            assert db_row(admin, "DATABASES", "name")["current_client_connections"] == len(conns)
            console_pool = [r for r in console_rows(admin, "POOLS") if r["database"] == "pgbouncer"]
            assert console_pool[0]["cl_active"] == len(admins)
            lists = {r["list"]: r["items"] for r in console_rows(admin, "LISTS")}
            assert lists["used_clients"] == len(conns) + len(admins)
            assert lists["used_servers"] == backends
        # Connections stay per worker: each console lists only its own worker's clients.
        assert sorted(len(console_rows(a, "CLIENTS")) for a in admins) == [4, 4]
        # The metrics endpoint (served by worker 1) counts both workers too.
        metrics = scrape(metrics_port)
        assert metrics[("pgbouncer_stats_queries_pooled_total", DB)] == queries
        assert metrics[("pgbouncer_pools_client_active_connections", DB)] == len(conns)
        assert metrics[("pgbouncer_databases_current_connections", DB)] == backends
    finally:
        for c in [*conns, *admins]:
            c.close()


def test_query_stats_cover_every_worker(pooler: PoolerFactory, workers_db: str) -> None:
    """SHOW QUERIES, the dashboard's JSON and RESET QUERIES cover both workers."""
    metrics_port = free_port()
    p = start(pooler, default_pool_size=4, metrics_listen=f"127.0.0.1:{metrics_port}")
    conns, admins = clients_and_consoles(p, 1)
    try:
        for n, conn in enumerate(conns):
            for i in range(5 + 7 * n):  # 5 on one worker, 12 on the other
                assert conn.execute(f"SELECT {i} + 1 AS workers_q").fetchone() == (i + 1,)

        def calls(admin: Any) -> int:
            rows = [r for r in console_rows(admin, "QUERIES") if r["query"] == "SELECT $1 + $2 AS workers_q"]
            assert len(rows) <= 1, rows
            return int(rows[0]["calls"]) if rows else 0

        for admin in admins:
            assert calls(admin) == 17
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/api/dashboard", timeout=10) as res:
            data = json.loads(res.read())
        shown = [q for q in data["queries"] if q["query"] == "SELECT $1 + $2 AS workers_q"]
        assert [q["calls"] for q in shown] == [17] and data["workers"] == 2
        assert admins[0].execute("RESET QUERIES").statusmessage == "RESET"
        for admin in admins:
            assert calls(admin) == 0
    finally:
        for c in [*conns, *admins]:
            c.close()


def test_console_stats_without_an_answer_from_a_stopped_worker(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    consoles = connect_on_each_worker(
        p, lambda: psycopg.connect(p.dsn("postgres", dbname="pgbouncer"), autocommit=True),
        "login attempt: db=pgbouncer", 1)
    (mine, admin), (other, other_admin) = [(pid, cs[0]) for pid, cs in consoles.items()]
    try:
        os.kill(other, signal.SIGSTOP)  # alive but deaf: the answer comes without it, after the timeout
        try:
            t0 = time.monotonic()
            rows = console_rows(admin, "STATS")
            assert 0.9 < time.monotonic() - t0 < 5
            assert "pgbouncer" in [r["database"] for r in rows]
        finally:
            os.kill(other, signal.SIGCONT)
        assert [pid for pid in p.log_pids("no answer from worker") if pid == mine]
        assert console_rows(admin, "STATS")  # the late answer is ignored; the next one is whole
    finally:
        admin.close()
        other_admin.close()


# --------------------------------------------------------------------------------------------------
# the shared table and the cancel key, without processes


def test_shared_table_reserves_within_the_sum_over_workers() -> None:
    from pgmux.workers import SharedTable

    t = SharedTable(3, slots=16)
    slot = t.slot("pool\0db\0user")
    assert t.slot("pool\0db\0user") == slot and t.slot("db\0db") != slot
    assert t.reserve(0, [(slot, 3, 0)]) and t.reserve(1, [(slot, 3, 0)]) and t.reserve(1, [(slot, 3, 1)])
    assert t.counts(slot) == [1, 2, 0]
    assert not t.reserve(2, [(slot, 3, 0)])  # 3 held across workers
    t.publish(1, [(slot, 1, None)])  # worker 2 closed one
    assert t.reserve(2, [(slot, 3, 0)])
    t.clear_worker(0)  # worker 1 died
    assert t.counts(slot) == [0, 1, 1]


def test_shared_table_fair_share_while_another_worker_waits() -> None:
    from pgmux.workers import SharedTable

    t = SharedTable(2, slots=16)
    slot = t.slot("pool\0db\0user")
    assert t.reserve(0, [(slot, 3, 0)], fair=(slot, 5))
    assert t.reserve(0, [(slot, 3, 1)], fair=(slot, 5))
    t.publish(1, [(slot, 0, 4)])  # worker 2: four clients waiting, no server
    assert t.waiting(slot) == [5, 4]
    # Worker 1 wants a third server while worker 2 waits: beyond its share (3 over 2 workers).
    assert not t.reserve(0, [(slot, 3, 2)], fair=(slot, 3))
    assert t.reserve(1, [(slot, 3, 0)], fair=(slot, 4))
    assert not t.reserve(1, [(slot, 3, 1)], fair=(slot, 3))  # the total: 3 held
    t.publish(1, [(slot, 0, 0)])
    assert t.reserve(0, [(slot, 3, 2)], fair=(slot, 3))  # nobody else waits any more


def test_shared_table_full_means_per_worker_limits() -> None:
    from pgmux.workers import SharedTable

    t = SharedTable(2, slots=2)
    assert t.slot("a") >= 0 and t.slot("b") >= 0 and t.slot("c") == -1
    assert t.reserve(0, [(-1, 1, 5)]) and t.counts(-1) == [0, 0]


def test_cancel_key_names_its_worker() -> None:
    from types import SimpleNamespace

    from pgmux.workers import WorkerShare

    for count in (2, 3, 8, 128):
        for index in {0, 1, count - 1}:
            share = SimpleNamespace(key_mask=(1 << max(1, (count - 1).bit_length())) - 1, index=index)
            for first in (0x00, 0x7F, 0xFF, 0xA5):
                stamped = WorkerShare.stamp_key(share, first)  # type: ignore[arg-type]
                assert stamped < 0x80 and stamped & share.key_mask == index


def test_merged_show_answer_larger_than_a_datagram(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sibling's part is sent in pieces, and waits for room when the asker's channel is full."""
    import asyncio

    from pgmux.admin import show
    from pgmux.workers import CHUNK, WorkerShare

    big = [[f"db{i:05d}", "x" * 60, i] for i in range(6000)]  # about 500 KB of JSON
    monkeypatch.setattr(show, "worker_part", lambda pooler, what: big)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
        for pair in channels:
            for sock in pair:
                sock.setblocking(False)
        ctx = SimpleNamespace(count=2, channels=channels)
        for i in range(2):
            share = WorkerShare.__new__(WorkerShare)  # only the channel machinery, no pooler
            share.ctx, share.index, share.receiver = ctx, i, channels[i][0]  # type: ignore[assignment]
            share.pooler = SimpleNamespace(loop=loop)  # type: ignore[assignment]
            share._gathers, share._next_request, share._replies = {}, 0, set()
            loop.add_reader(channels[i][0].fileno(), share._on_datagram)
            if i == 0:
                asker = share
        try:
            return await asker.gather("pools")
        finally:
            for pair in channels:
                loop.remove_reader(pair[0].fileno())
                for sock in pair:
                    sock.close()

    assert len(json.dumps(big)) > 5 * CHUNK
    assert asyncio.run(main()) == [big]


def test_merged_show_rows() -> None:
    from pgmux.admin import show
    from pgmux.stats import counters

    def pool_row(db: str, cl: int, sv_idle: int, wait: tuple[int, int]) -> list[Any]:
        return [db, "u", cl, 1, 0, 0, 2, 0, 0, sv_idle, 0, 0, 0, *wait, "transaction", None]

    merged = show.merged_show("pools", [[pool_row("a", 1, 2, (0, 5)), pool_row("b", 4, 0, (1, 0))],
                                        [pool_row("a", 3, 1, (0, 9))]])
    assert merged.columns == show.POOLS_COLUMNS
    # cl_* and sv_* summed, maxwait the longest, rows of one worker only kept as they are.
    assert merged.rows == [["a", "u", 4, 2, 0, 0, 4, 0, 0, 3, 0, 0, 0, 0, 9, "transaction", None],
                           pool_row("b", 4, 0, (1, 0))]
    # Averages: rates add up; mean times are total time over total count.
    cur1, old1 = list(counters.ZERO), list(counters.ZERO)
    cur1[counters.XACT], cur1[counters.XACT_TIME] = 10, 1000  # 10 xacts of 100 us in 1 s
    cur2 = list(counters.ZERO)
    cur2[counters.XACT], cur2[counters.XACT_TIME] = 30, 9000  # 30 xacts of 300 us in 2 s
    parts = [{"dur": 1_000_000, "dbs": [["d", cur1, old1]]}, {"dur": 2_000_000, "dbs": [["d", cur2, old1]]}]
    (row,) = show.merged_show("stats", parts).rows
    assert row[1 + counters.XACT] == 40
    assert row[1 + counters.N_FIELDS + counters.XACT] == 10 + 15
    assert row[1 + counters.N_FIELDS + counters.XACT_TIME] == 10000 // 40
    one = show.merged_show("stats_averages", parts[:1]).rows[0][1:]
    assert tuple(one) == counters.averages(tuple(cur1), tuple(old1), 1_000_000)
    totals: dict[Any, Any] = {r[0]: r[1] for r in show.merged_show("totals", parts).rows}
    assert totals["total_xact_count"] == 40 and totals["avg_xact_count"] == 25
