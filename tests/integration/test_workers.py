"""`workers = 2`: two processes behind one port (SO_REUSEPORT), against a real PostgreSQL.

What a user of several workers relies on: pool_size and max_client_conn hold for pgmux as a
whole, not per process; a cancel (a new TCP connection that lands on any worker) stops the query
of the client it names; both workers take connections; the supervisor reloads, stops and respawns
its workers. Which worker served what is read from the log: each line carries its process's pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pgmux.testing.cluster import BackendSampler, PoolerProcess, TempCluster

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
    """A pgmux with `workers` processes, returned once every worker listens (the supervisor binds
    the port before forking, so the port accepts before the workers are ready)."""
    p = pooler(
        pool_mode=pool_mode,
        auth_type="trust",
        databases={DB: "host={host} port={port} dbname=" + DB},
        extra={"workers": workers, **extra},
    )

    def ready() -> bool:
        pids = worker_pids(p)
        return len(pids) == workers and set(log_pids(p, "listening on")) >= pids

    wait_until(ready, 15, "every worker to listen")
    return p


def connect(p: PoolerProcess, **kw: Any) -> Any:
    kw.setdefault("autocommit", True)
    return psycopg.connect(p.dsn("trustuser", dbname=DB, connect_timeout=10), **kw)


def worker_pids(p: PoolerProcess) -> set[int]:
    """The supervisor's children (the workers)."""
    path = Path(f"/proc/{p.pid}/task/{p.pid}/children")
    try:
        return {int(pid) for pid in path.read_text().split()}
    except FileNotFoundError:
        return set()


def log_pids(p: PoolerProcess, needle: str) -> list[int]:
    """Pids of the processes that logged a line containing `needle`, in log order."""
    return [int(m.group(1)) for m in re.finditer(r"\[(\d+)\] \w+ (.*)", p.log_text()) if needle in m.group(2)]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def run_threads(targets: list[Callable[[], None]], timeout: float = 30) -> list[BaseException]:
    errors_seen: list[BaseException] = []

    def wrap(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors_seen.append(exc)

    threads = [threading.Thread(target=wrap, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "client threads hung"
    return errors_seen


def both_workers_logged_in(p: PoolerProcess) -> set[int]:
    """Open connections until logins were seen on two worker pids (the kernel spreads them)."""
    conns = []
    try:
        for _ in range(40):
            conns.append(connect(p))
            seen = set(log_pids(p, "login attempt")) & worker_pids(p)
            if len(seen) == 2:
                return seen
        return set(log_pids(p, "login attempt")) & worker_pids(p)
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
    served = set(log_pids(p, "login attempt")) & worker_pids(p)
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
        assert len(set(log_pids(p, "login attempt")) & worker_pids(p)) == 2
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
        wait_until(lambda: cluster.count_backends("trustuser", DB, "active") == n, 10, "12 sleeping queries")
        for c in conns:
            c.cancel()  # a new TCP connection each: the kernel picks the worker
        for t in threads:
            t.join(15)
        assert {i: o[0] for i, o in outcomes.items()} == {i: "canceled" for i in range(n)}
        assert max(o[1] for o in outcomes.values()) < 5, outcomes
        assert len(set(log_pids(p, "login attempt")) & worker_pids(p)) == 2
        # Make sure at least one cancel crossed workers (each lands on a random one).
        for _ in range(40):
            if log_pids(p, "cancel request forwarded"):
                break
            t = threading.Thread(target=sleeper, args=(0,), daemon=True)
            t.start()
            wait_until(lambda: cluster.count_backends("trustuser", DB, "active") == 1, 10, "a sleeping query")
            conns[0].cancel()
            t.join(15)
            assert outcomes[0][0] == "canceled"
        assert log_pids(p, "cancel request forwarded")
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
                s.sendall(struct.pack("!iiii", 16, 80877102, pid, secret))
                s.settimeout(5)
                assert s.recv(1) == b""
        t.join(5)
        assert result == [("",)]
    assert log_pids(p, "failed cancel request")


# --------------------------------------------------------------------------------------------------
# both workers serve; the supervisor


def test_both_workers_serve_tcp_and_unix(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    pids = worker_pids(p)
    assert len(pids) == 2 and p.pid not in pids
    assert set(log_pids(p, "listening on")) == pids
    assert both_workers_logged_in(p) == pids
    for _ in range(4):
        with psycopg.connect(p.unix_dsn("trustuser", dbname=DB), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_sighup_reloads_every_worker(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    pids = worker_pids(p)
    p.set_options({"default_pool_size": 7})
    p.reload()
    wait_until(lambda: set(log_pids(p, "config reloaded")) == pids, 10, "both workers to reload")
    assert p.pid not in log_pids(p, "config reloaded")
    with connect(p) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_killed_worker_is_respawned(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    old = worker_pids(p)
    victim = min(old)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: log_pids(p, f"(pid {victim}) died"), 10, "the supervisor to notice")

    def replaced() -> set[int] | None:
        pids = worker_pids(p)
        return pids if len(pids) == 2 and victim not in pids else None

    new = wait_until(replaced, 10, "a new worker")
    assert "restarting it" in p.log_text()
    (born,) = new - old
    # Service continues, on the new worker too.
    assert born in both_workers_logged_in(p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_all_workers(pooler: PoolerFactory, workers_db: str, sig: int) -> None:
    p = start(pooler)
    pids = worker_pids(p)
    p.signal(sig)
    assert p.wait(10) == 0
    for pid in pids:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 5, f"worker {pid} to exit")
    assert "all workers exited" in p.log_text()


def test_console_shutdown_stops_every_worker(pooler: PoolerFactory, workers_db: str) -> None:
    p = start(pooler)
    admin = psycopg.connect(p.dsn("postgres", dbname="pgbouncer"), autocommit=True)
    with contextlib.suppress(psycopg.OperationalError):
        admin.execute("SHUTDOWN", prepare=False)
    admin.close()
    assert p.wait(10) == 0


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
