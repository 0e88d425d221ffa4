"""Helpers shared by the session-mode, transaction-mode, limits/timeouts and server-failure tests.

Kept out of conftest.py (owned by the harness) on purpose: these are plain functions plus one
session fixture (``txbench``) that the test modules import by name.
"""

from __future__ import annotations

import hashlib
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pgwire import PgError, RawConn, message, parse_error_fields

from pgmux.testing.cluster import PoolerProcess, TempCluster

PASSWORDS = {"md5user": "md5pass", "scramuser": "scrampass"}
BENCH_DB = "txbench"
BIG_N = 100_000
BIG_SQL = f"SELECT i, md5(i::text) FROM generate_series(1, {BIG_N}) AS i"


def big_digest(rows: Iterable[Sequence[Any]]) -> tuple[int, int, str]:
    """(count, sum of i, sha256 over 'i:md5' lines): a result read incompletely or out of order fails."""
    h = hashlib.sha256()
    count = total = 0
    for i, md in rows:
        count += 1
        total += int(i)
        h.update(f"{i}:{md}\n".encode())
    return count, total, h.hexdigest()


EXPECTED_BIG = big_digest((i, hashlib.md5(str(i).encode()).hexdigest()) for i in range(1, BIG_N + 1))


def dbline(dbname: str = "testdb", **params: object) -> str:
    """A [databases] value on the test cluster, with extra ``key=value`` params."""
    extra = "".join(f" {k}={v}" for k, v in params.items())
    return f"host={{host}} port={{port}} dbname={dbname}{extra}"


def default_dbs(**testdb_params: object) -> dict[str, str]:
    """The harness's default [databases] (testdb, postgres) with extra params on testdb."""
    return {"testdb": dbline("testdb", **testdb_params), "postgres": dbline("postgres")}


def connect(p: PoolerProcess, user: str = "md5user", dbname: str = "testdb", **kw: Any) -> Any:
    """psycopg 3 connection through the pooler (autocommit unless told otherwise).

    psycopg's automatic server-side prepares (after 5 runs of a query) are off: named prepared
    statements do not survive transaction pooling in PgBouncer 1.18, the oracle.
    """
    import psycopg

    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", None)
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(p.dsn(user, PASSWORDS.get(user), dbname), **kw)


def raw_login(
    p: PoolerProcess, user: str = "md5user", dbname: str = "testdb", timeout: float = 10.0, **params: str
) -> RawConn:
    conn = RawConn(p.host, p.port, timeout=timeout)
    conn.login(user, dbname, PASSWORDS.get(user), **params)
    return conn


def send_query(conn: RawConn, sql: str) -> None:
    conn.send(message(b"Q", sql.encode() + b"\0"))


def errors_until_close(conn: RawConn, timeout: float) -> tuple[list[PgError], float]:
    """Read until the pooler closes the socket: (ErrorResponses received, seconds it took).

    Raises TimeoutError if the connection is still open after ``timeout`` s (the timeout under test
    was ignored).
    """
    start = time.monotonic()
    msgs = conn.read_until_close(timeout)
    errs = [PgError(parse_error_fields(body)) for kind, body in msgs if kind == b"E"]
    return errs, time.monotonic() - start


@dataclass
class Outcome:
    """What one Query got: ErrorResponses, whether ReadyForQuery came, whether the pooler closed."""

    errors: list[PgError]
    ready: bool
    closed: bool

    @property
    def messages(self) -> list[str]:
        return [e.message for e in self.errors]


def query_outcome(conn: RawConn, sql: str) -> Outcome:
    """Send a Query and read until ReadyForQuery or the close, keeping errors sent right before a close
    (RawConn.simple_query loses those)."""
    send_query(conn, sql)
    errs: list[PgError] = []
    while True:
        try:
            kind, body = conn.read_message()
        except ConnectionError:
            return Outcome(errs, ready=False, closed=True)
        if kind == b"E":
            errs.append(PgError(parse_error_fields(body)))
        elif kind == b"Z":
            return Outcome(errs, ready=True, closed=False)


def messages_of(errs: Iterable[PgError]) -> list[str]:
    return [e.message for e in errs]


def run_threads(fns: list[Callable[[], Any]], timeout: float = 60) -> list[BaseException]:
    """Run callables concurrently in threads; return the exceptions they raised."""
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrap(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as e:  # reported to the test
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        errors.append(TimeoutError(f"threads still running after {timeout}s"))
    return errors


def sleepers(p: PoolerProcess, pairs: Iterable[tuple[str, str]], seconds: float) -> list[Callable[[], Any]]:
    """One callable per (user, dbname): connect through the pooler and run pg_sleep(seconds)."""

    def one(user: str, dbname: str) -> Callable[[], Any]:
        def run() -> None:
            with connect(p, user, dbname) as conn:
                conn.execute("SELECT pg_sleep(%s)", [seconds])

        return run

    return [one(u, d) for u, d in pairs]


def backend_pids(cluster: TempCluster, usename: str, datname: str = "testdb") -> set[int]:
    rows = cluster.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = %s AND datname = %s",
        params=[usename, datname],
    )
    return {r[0] for r in rows}


def active_query_pid(cluster: TempCluster, needle: str, usename: str = "md5user") -> int | None:
    """Server pid running a query containing ``needle`` (to act exactly while it runs)."""
    rows = cluster.execute(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND usename = %s AND position(%s in query) > 0 "
        "AND pid <> pg_backend_pid()",
        params=[usename, needle],
    )
    return rows[0][0] if rows else None


def idle_in_tx_count(cluster: TempCluster, usename: str) -> int:
    rows = cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state LIKE 'idle in transaction%%'",
        params=[usename],
    )
    return int(rows[0][0])


def terminate(cluster: TempCluster, pid: int) -> None:
    assert cluster.execute("SELECT pg_terminate_backend(%s)", params=[pid]) == [(True,)]


@pytest.fixture
def quiet_cluster(cluster: TempCluster) -> None:
    """Wait (up to 5 s) until the test roles have no backends left, e.g. from the previous test's pooler,
    so counts of backends in a test see only its own pooler's servers."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = cluster.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('md5user', 'scramuser', 'trustuser')"
        )
        if rows[0][0] == 0:
            return
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# a client killed mid-transaction

# argv: dsn, marker, table, statements to run before BEGIN (session state the next client must not see)
KILL_SCRIPT = r"""
import sys, time, psycopg
dsn, marker, table, *setup = sys.argv[1:]
conn = psycopg.connect(dsn, autocommit=True)
for sql in setup:
    conn.execute(sql)
conn.execute("BEGIN")
conn.execute(f"INSERT INTO {table} SELECT %s, g FROM generate_series(1, 100) g", [marker])
pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
print(pid, flush=True)
time.sleep(600)
"""


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line from a child, failing (with its stderr) instead of hanging."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        pytest.fail(f"child printed nothing within {timeout}s; stderr: {proc.communicate()[1]}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"child exited ({proc.wait()}): {proc.communicate()[1]}")
    return line.strip()


def sigkill_mid_transaction(cluster: TempCluster, dsn: str, table: str, marker: str, *setup: str) -> int:
    """Have a child client run ``setup``, open a transaction inserting ``marker`` rows into ``table``,
    then SIGKILL it; the pid of the server its transaction is open on."""
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, dsn, marker, table, *setup],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        server_pid = int(read_line(child, 30))
        state = cluster.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", params=[server_pid])
        assert state == [("idle in transaction",)], "setup: the child's transaction should be open"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.communicate()
    return server_pid


# --------------------------------------------------------------------------------------------------
# pgbench


@dataclass
class BenchResult:
    returncode: int
    stdout: str
    stderr: str
    processed: int | None = None
    failed: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"pgbench exit {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr[-3000:]}"


def parse_bench(proc: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> BenchResult:
    if isinstance(proc, tuple):
        rc, out, err = proc
    else:
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    res = BenchResult(rc, out, err)
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    res.processed = int(m.group(1)) if m else None
    m = re.search(r"number of failed transactions: (\d+)", out)
    res.failed = int(m.group(1)) if m else None
    return res


def pgbench_cmd(dsn: str, *args: str) -> list[str]:
    return ["pgbench", "-n", *args, dsn]


def run_pgbench(dsn: str, *args: str, timeout: float = 90) -> BenchResult:
    proc = subprocess.run(pgbench_cmd(dsn, *args), capture_output=True, text=True, timeout=timeout)
    return parse_bench(proc)


@pytest.fixture(scope="session")
def txbench(cluster: TempCluster) -> str:
    """Database ``txbench`` owned by md5user with pgbench tables (scale 1), initialised on the cluster.

    Tests truncate pgbench_history themselves, so counts compare against one run only.
    """
    if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", params=[BENCH_DB]):
        cluster.execute(f"CREATE DATABASE {BENCH_DB} OWNER md5user")
    proc = subprocess.run(
        ["pgbench", "-i", "-s", "1", "-q", cluster.dsn("md5user", "md5pass", BENCH_DB)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return BENCH_DB


def history_count(cluster: TempCluster) -> int:
    return int(cluster.execute("SELECT count(*) FROM pgbench_history", dbname=BENCH_DB)[0][0])


def truncate_history(cluster: TempCluster) -> None:
    cluster.execute("TRUNCATE pgbench_history", dbname=BENCH_DB)


# --------------------------------------------------------------------------------------------------
# a TCP server that accepts and then never answers (for server_connect_timeout)


class Blackhole:
    """Listens on 127.0.0.1:<port>, accepts, reads and never replies; records when each peer gave up."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.events: list[tuple[float, float | None, int]] = []  # (accepted, closed by peer, bytes read)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    def __enter__(self) -> Blackhole:
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for c in self._conns:
            c.close()
        self.sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            with self._lock:
                idx = len(self.events)
                self.events.append((time.monotonic(), None, 0))
            t = threading.Thread(target=self._drain, args=(conn, idx), daemon=True)
            t.start()
            self._threads.append(t)

    def _drain(self, conn: socket.socket, idx: int) -> None:
        conn.settimeout(0.2)
        total = 0
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    self.events[idx] = (self.events[idx][0], time.monotonic(), total)
                return
            total += len(data)
            with self._lock:
                self.events[idx] = (self.events[idx][0], None, total)

    def snapshot(self) -> list[tuple[float, float | None, int]]:
        with self._lock:
            return list(self.events)
