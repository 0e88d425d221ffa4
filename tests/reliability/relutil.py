"""Shared pieces of the reliability tests and the soak run: process sampling, load, integrity checks.

Kept importable without pytest (the soak command imports it as ``tests.reliability.relutil``; the tests,
collected in pytest's default "prepend" import mode, as ``relutil``).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------------
# the pooler process, seen from /proc


def rss_kb(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.M)
_TRACE = re.compile(r"Traceback \(most recent call last\)|Task exception was never retrieved|Exception in callback|"
                    r"Fatal error on transport|Fatal error: protocol")


def tracebacks(log: str) -> list[str]:
    """Log records (a timestamped line and what follows it up to the next one) holding a Python
    traceback or an asyncio error report: never expected from pgmux."""
    starts = [mt.start() for mt in _RECORD_START.finditer(log)] + [len(log)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    records = [log[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return [r for r in records if _TRACE.search(r)]


# --------------------------------------------------------------------------------------------------
# pgbench


@dataclass
class Bench:
    """A pgbench run in the background (``-T`` seconds), finished with ``finish()``."""

    dsn: str
    clients: int = 8
    seconds: float = 5
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    elapsed: float = 0.0

    def start(self) -> Bench:
        cmd = ["pgbench", "-n", "-c", str(self.clients), "-j", "2", "-T", str(int(self.seconds)), *self.args, self.dsn]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def finish(self, timeout: float = 60) -> Bench:
        assert self.proc is not None
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
            self.stderr += f"\n[test] pgbench killed after {timeout}s: a client hung"
        self.returncode = self.proc.returncode
        self.elapsed = time.monotonic() - self.started
        return self

    @property
    def processed(self) -> int:
        m = re.search(r"number of transactions actually processed: (\d+)", self.stdout)
        return int(m.group(1)) if m else 0

    @property
    def failed(self) -> int | None:
        m = re.search(r"number of failed transactions: (\d+)", self.stdout)
        return int(m.group(1)) if m else None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.processed > 0 and not self.failed

    def describe(self) -> str:
        return (f"pgbench exit {self.returncode} after {self.elapsed:.1f}s, processed {self.processed}\n"
                f"--- stdout ---\n{self.stdout[-1500:]}\n--- stderr ---\n{self.stderr[-2500:]}")


def run_bench(dsn: str, clients: int = 8, seconds: float = 2, *args: str, timeout: float = 60) -> Bench:
    return Bench(dsn, clients, seconds, args).start().finish(timeout)


# --------------------------------------------------------------------------------------------------
# the ledger: committed data intact, uncommitted data never visible


LEDGER_DDL = "CREATE TABLE IF NOT EXISTS ledger (id bigint PRIMARY KEY, kind text NOT NULL, pad text)"


@dataclass
class Ledger:
    """Writers that record what PostgreSQL acknowledged, so a fault can be judged afterwards.

    Each transaction inserts a pair of rows (``id`` and ``-id``) and then either COMMITs ("c": the id is
    *acked* once COMMIT returns, *in doubt* while COMMIT is in flight) or ROLLBACKs ("r": must never be
    visible). Connections die with the faults: the writer then reconnects and carries on.

    ``check()`` then asserts: every acked pair is there; nothing is there that was not acked or in doubt
    (a transaction cut before COMMIT left nothing); no rolled-back row; pairs are whole (atomicity); and
    no single statement took longer than ``max_op`` (nobody hung past the pooler's timeouts).
    """

    connect: Callable[[], Any]  # -> psycopg.Connection (autocommit)
    workers: int = 3
    acked: set[int] = field(default_factory=set)
    in_doubt: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    committed: int = 0
    rolled_back: int = 0
    max_op: float = 0.0
    slowest: str = ""
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Ledger:
        for i in range(self.workers):
            t = threading.Thread(target=self._run, args=(i,), name=f"ledger-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 30) -> Ledger:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        hung = [t.name for t in self._threads if t.is_alive()]
        if hung:
            self.errors.append(f"HUNG: ledger threads still running after {timeout}s: {hung}")
        return self

    def _timed(self, conn: Any, sql: str, params: Any = None) -> None:
        t0 = time.monotonic()
        try:
            conn.execute(sql, params)
        finally:
            dt = time.monotonic() - t0
            if dt > self.max_op:
                self.max_op, self.slowest = dt, sql.split()[0]

    def _run(self, worker: int) -> None:
        import psycopg

        conn = None
        n = 0
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    t0 = time.monotonic()
                    conn = self.connect()
                    dt = time.monotonic() - t0
                    if dt > self.max_op:
                        self.max_op, self.slowest = dt, "connect"
                with self._lock:
                    ident = next(self._ids)
                n += 1
                kind = "r" if n % 4 == 0 else "c"
                self._timed(conn, "BEGIN")
                self._timed(conn, "INSERT INTO ledger VALUES (%s, %s, repeat('x', 200))", (ident, kind))
                self._timed(conn, "INSERT INTO ledger VALUES (%s, %s, NULL)", (-ident, kind))
                if kind == "c":
                    with self._lock:
                        self.in_doubt.add(ident)
                    self._timed(conn, "COMMIT")
                    with self._lock:
                        self.in_doubt.discard(ident)
                        self.acked.add(ident)
                        self.committed += 1
                else:
                    self._timed(conn, "ROLLBACK")
                    self.rolled_back += 1
            except psycopg.Error as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001 - already broken
                        pass
                conn = None
                self._stop.wait(0.05)
        if conn is not None:
            conn.close()

    def check(self, rows: list[tuple[int, str]], max_op: float | None = None) -> str:
        """Assert integrity against the table's rows (id, kind); returns a one-line summary."""
        ids = {i for i, _ in rows if i > 0}
        negs = {-i for i, _ in rows if i < 0}
        rolled = [i for i, k in rows if k == "r"]
        assert not rolled, f"rolled-back rows are visible: {sorted(rolled)[:10]}"
        assert ids == negs, f"half transactions: {sorted(ids ^ negs)[:10]}"
        lost = self.acked - ids
        assert not lost, f"{len(lost)} acknowledged commits are missing: {sorted(lost)[:10]}"
        phantom = ids - self.acked - self.in_doubt
        assert not phantom, f"{len(phantom)} transactions never committed are visible: {sorted(phantom)[:10]}"
        assert not any(e.startswith("HUNG") for e in self.errors), self.errors
        if max_op is not None:
            assert self.max_op <= max_op, f"a ledger {self.slowest} took {self.max_op:.1f}s (limit {max_op}s)"
        return (f"ledger: {self.committed} commits acked, {len(self.in_doubt)} in doubt, {self.rolled_back} "
                f"rollbacks, {len(self.errors)} client errors, slowest op {self.max_op:.2f}s ({self.slowest})")


# --------------------------------------------------------------------------------------------------
# good clients: must never see an error while hostile ones run


@dataclass
class GoodClients:
    """Threads running `SELECT <token>` through the pooler and checking they get their own token back;
    half of them reconnect for every query, so logins run alongside the hostile input too."""

    connect: Callable[[], Any]
    threads: int = 4
    queries: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> GoodClients:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i, i % 2 == 1), daemon=True, name=f"good-{i}")
            t.start()
            self._threads.append(t)
        return self

    def _run(self, worker: int, reconnect: bool) -> None:
        conn = None
        n = 0
        while not self._stop.is_set():
            n += 1
            token = worker * 1_000_000 + n
            try:
                if conn is None:
                    conn = self.connect()
                got = conn.execute(f"SELECT {token}::bigint, repeat('y', {n % 3000})").fetchone()
                if got is None or got[0] != token or len(got[1]) != n % 3000:
                    self.errors.append(f"worker {worker} sent {token}, got {got and got[0]!r}")
                self.queries += 1
                if reconnect:
                    conn.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                stamp = time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"
                self.errors.append(f"{type(exc).__name__}: {exc} (at {stamp} UTC)")
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def stop(self) -> GoodClients:
        self._stop.set()
        for t in self._threads:
            t.join(30)
            if t.is_alive():
                self.errors.append(f"{t.name} hung")
        return self
