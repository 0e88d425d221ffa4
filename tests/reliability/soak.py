"""Soak run: a long mixed workload through one pgmux, sampling its RSS, open file descriptors and server
connections; they must be flat after warm-up, with zero errors beyond the injected ones.

    python -m tests.reliability.soak --minutes 15          # or: bash scripts/soak.sh --minutes 15

Not part of the test suite (it takes as long as you ask). Workload, all at once, on a throwaway
PostgreSQL:

* pgbench, simple protocol (4 clients) and ``-M prepared`` (4 clients): transactions;
* 3 psycopg clients with ``prepare_threshold=0`` (every statement a protocol-level prepared statement,
  same names on every connection, different texts), checking every answer;
* 2 COPY clients: TRUNCATE, COPY IN 2000 rows, COPY OUT, count checked;
* 2 clients connecting, running one query and disconnecting, in a loop;
* 1 client cancelling its own 0.5 s queries after 0.1 s (the injected errors: 57014 expected;
  ``--no-cancel`` leaves it out).

Prints one table row per sample and a summary; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

try:  # python -m tests.reliability.soak
    from . import relutil
except ImportError:  # python tests/reliability/soak.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import relutil  # type: ignore[no-redef]

from pgmux.testing.cluster import PoolerProcess, TempCluster, write_config

DB = "soak"
POOL_SIZE = 10


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    cross_cancels: int = 0  # a 57014 in a client that never cancels anything
    lock: threading.Lock = field(default_factory=threading.Lock)

    def op(self, kind: str) -> None:
        with self.lock:
            self.ops[kind] += 1

    def error(self, kind: str, exc: BaseException) -> None:
        import psycopg

        text = f"{kind}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        with self.lock:
            if isinstance(exc, psycopg.errors.QueryCanceled):
                self.cross_cancels += 1
            self.unexpected[text] += 1


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    servers: int
    clients: int
    ops: int
    errors: int


class Soak:
    def __init__(self, minutes: float, interval: float | None, seed: int, cancels: bool = True) -> None:
        self.cancels = cancels
        self.duration = minutes * 60
        self.interval = interval or max(2.0, self.duration / 40)
        self.warmup = max(20.0, self.duration * 0.2)
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.stop = threading.Event()
        self.samples: list[Sample] = []
        self.cluster: TempCluster | None = None
        self.pooler: PoolerProcess | None = None
        self.workdir = tempfile.mkdtemp(prefix="pgmux-soak-")

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        c = self.cluster = TempCluster(settings={"max_connections": "100", "client_connection_check_interval": "'1s'"})
        c.start()
        c.create_test_roles()
        c.execute(f"CREATE DATABASE {DB} OWNER md5user")
        init = subprocess.run(["pgbench", "-i", "-s", "2", "-q", c.dsn("md5user", "md5pass", DB)],
                              capture_output=True, text=True, timeout=300)
        if init.returncode:
            raise RuntimeError(init.stderr)
        ini, users = write_config(
            c, workdir=self.workdir, pool_mode="transaction",
            databases={DB: f"host={{host}} port={{port}} dbname={DB}"},
            extra={"default_pool_size": POOL_SIZE, "max_client_conn": 200, "query_wait_timeout": 60,
                   "log_connections": 0, "log_disconnections": 0, "stats_period": 60},
        )
        self.pooler = PoolerProcess("pgmux", ini, users, self.workdir).start()

    def teardown(self) -> None:
        if self.pooler is not None:
            self.pooler.stop()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def dsn(self) -> str:
        assert self.pooler is not None
        return self.pooler.dsn("md5user", "md5pass", DB)

    def connect(self, **kw: Any) -> Any:
        import psycopg

        kw.setdefault("autocommit", True)
        kw.setdefault("connect_timeout", 10)
        kw.setdefault("application_name", "pgbench")  # same tracked values as pgbench: no SET at link time
        return psycopg.connect(self.dsn, **kw)

    # ------------------------------------------------------------------ workers

    def loop(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            while not self.stop.is_set():
                try:
                    body()
                except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
                    self.stats.error(name, exc)
                    self.stop.wait(0.2)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    def prepared_worker(self, i: int) -> Callable[[], None]:
        texts = [f"SELECT %s::bigint + {i}", "SELECT %s::bigint * 2 - %s::bigint",
                 "SELECT abalance FROM pgbench_accounts WHERE aid = %s", f"SELECT count(*) + {i} FROM "
                 "pgbench_branches WHERE bid <= %s"]

        def body() -> None:
            with self.connect(prepare_threshold=0) as c:
                for n in range(200):
                    if self.stop.is_set():
                        return
                    token = self.rng.randrange(1, 10**9)
                    k = n % len(texts)
                    if k == 0:
                        ok = c.execute(texts[0], [token]).fetchone()[0] == token + i
                    elif k == 1:
                        ok = c.execute(texts[1], [token, token]).fetchone()[0] == token
                    elif k == 2:
                        ok = c.execute(texts[2], [token % 200000 + 1]).fetchone() is not None
                    else:
                        ok = c.execute(texts[3], [2]).fetchone()[0] == 2 + i
                    if not ok:
                        raise AssertionError(f"prepared worker {i}: wrong answer to {texts[k]!r}")
                    self.stats.op("prepared")

        return body

    def copy_worker(self, i: int) -> Callable[[], None]:
        table = f"soak_copy_{i}"

        def body() -> None:
            with self.connect() as c:
                c.execute(f"CREATE TABLE IF NOT EXISTS {table} (a int, b text)")
                c.execute(f"TRUNCATE {table}")  # first: one failed round must not spoil the next ones
                with c.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as cp:
                    for n in range(2000):
                        cp.write_row((n, f"row {n}"))
                buf = io.BytesIO()
                with c.cursor() as cur, cur.copy(f"COPY {table} TO STDOUT") as cp:
                    for chunk in cp:
                        buf.write(chunk)
                lines = buf.getvalue().count(b"\n")
                if lines != 2000:
                    raise AssertionError(f"COPY OUT of {table} gave {lines} rows, expected 2000")
                self.stats.op("copy")

        return body

    def churn(self) -> None:
        with self.connect() as c:
            c.execute("SELECT 1").fetchone()
        self.stats.op("connect")

    def canceller(self) -> None:
        import psycopg

        with self.connect() as c:
            for _ in range(20):
                if self.stop.is_set():
                    return
                timer = threading.Timer(0.1, c.cancel)
                timer.start()
                try:
                    c.execute("SELECT pg_sleep(0.5)")
                    self.stats.injected["cancel too late"] += 1
                except psycopg.errors.QueryCanceled:
                    self.stats.injected["57014 (cancelled by its own client)"] += 1
                timer.join()
                self.stats.op("cancel")

    # ------------------------------------------------------------------ sampling

    def sample(self, t0: float) -> Sample:
        assert self.pooler is not None and self.cluster is not None
        pid = self.pooler.pid
        servers = self.cluster.count_backends(usename="md5user", datname=DB)
        try:
            import psycopg

            with psycopg.connect(self.pooler.unix_dsn("pgbouncer", dbname="pgbouncer"), autocommit=True) as a:
                lists = dict(a.execute("SHOW LISTS").fetchall())
                clients = int(lists.get("used_clients", 0))
        except Exception:  # noqa: BLE001
            clients = -1
        with self.stats.lock:
            ops = sum(self.stats.ops.values())
            errors = sum(self.stats.unexpected.values())
        return Sample(time.monotonic() - t0, relutil.rss_kb(pid), relutil.fd_count(pid), servers, clients, ops,
                      errors)

    # ------------------------------------------------------------------ run

    def run(self) -> bool:
        self.setup()
        assert self.pooler is not None and self.cluster is not None
        pid = self.pooler.pid
        fds_idle = relutil.fd_count(pid)
        seconds = int(self.duration)
        benches = [
            relutil.Bench(self.dsn, 4, seconds, ("-P", "5")).start(),
            relutil.Bench(self.dsn, 4, seconds, ("-M", "prepared", "-P", "5")).start(),
        ]
        threads = [self.loop(f"prepared-{i}", self.prepared_worker(i)) for i in range(3)]
        threads += [self.loop(f"copy-{i}", self.copy_worker(i)) for i in range(2)]
        threads += [self.loop(f"churn-{i}", self.churn) for i in range(2)]
        if self.cancels:
            threads += [self.loop("cancel", self.canceller)]
        t0 = time.monotonic()
        variant = "" if self.cancels else " (no cancels)"
        print(f"soak: {self.duration / 60:.1f} min{variant}, sample every {self.interval:.0f}s, "
              f"warm-up {self.warmup:.0f}s, "
              f"pgmux pid {pid}, pool size {POOL_SIZE}")
        print(f"{'t(s)':>6} {'RSS KiB':>9} {'fds':>5} {'servers':>7} {'clients':>7} {'ops':>8} {'errors':>6}")
        while time.monotonic() - t0 < self.duration:
            time.sleep(min(self.interval, max(0.0, self.duration - (time.monotonic() - t0))))
            s = self.sample(t0)
            self.samples.append(s)
            print(f"{s.t:6.0f} {s.rss_kb:9d} {s.fds:5d} {s.servers:7d} {s.clients:7d} {s.ops:8d} {s.errors:6d}",
                  flush=True)
            if not self.pooler.is_running():
                print("pgmux died")
                break
        self.stop.set()
        for t in threads:
            t.join(30)
        for b in benches:
            b.finish(timeout=120)
        time.sleep(2)
        fds_end = relutil.fd_count(pid)
        return self.report(benches, fds_idle, fds_end)

    def report(self, benches: list[relutil.Bench], fds_idle: int, fds_end: int) -> bool:
        assert self.pooler is not None and self.cluster is not None
        ok = True

        def check(cond: bool, text: str) -> None:
            nonlocal ok
            print(("  ok    " if cond else "  FAIL  ") + text)
            ok = ok and cond

        post = [s for s in self.samples if s.t >= self.warmup] or self.samples[-1:]
        rss_growth = post[-1].rss_kb - post[0].rss_kb
        rss_range = max(s.rss_kb for s in post) - min(s.rss_kb for s in post)
        fd_range = (min(s.fds for s in post), max(s.fds for s in post))
        srv_max = max(s.servers for s in self.samples)
        xacts = sum(b.processed for b in benches)
        rates = [s.ops for s in self.samples]
        print("\nsummary")
        print(f"  pgbench: {xacts} transactions ({', '.join(f'exit {b.returncode}, {b.processed}' for b in benches)})")
        print(f"  other operations: {dict(self.stats.ops)} (total {rates[-1] if rates else 0})")
        print(f"  injected errors: {dict(self.stats.injected)}")
        print(f"  RSS after warm-up: {post[0].rss_kb} -> {post[-1].rss_kb} KiB (growth {rss_growth:+d} KiB, "
              f"range {rss_range} KiB)")
        print(f"  fds after warm-up: {fd_range[0]}..{fd_range[1]}; idle before the load {fds_idle}, after it {fds_end}")
        print(f"  server connections: max {srv_max} (pool size {POOL_SIZE})")
        check(self.pooler.is_running(), "pgmux ran throughout")
        check(all(b.returncode == 0 and not b.failed for b in benches), "pgbench runs succeeded with 0 failures")
        unexpected = sum(self.stats.unexpected.values())
        worst = "; ".join(f"{n}x {k}" for k, n in self.stats.unexpected.most_common(5))
        cross = self.stats.cross_cancels + sum(
            b.stderr.count("canceling statement due to user request") for b in benches)
        if cross:
            print(f"  {cross} queries of clients that never cancel anything were cancelled (pgmux bug: a cancel "
                  f"request can hit the next client of the server; pgbench aborts such a client)")
        check(not unexpected, f"zero unexpected errors ({unexpected}{': ' + worst if worst else ''})")
        check(rss_growth <= max(8192, post[0].rss_kb // 10), f"RSS flat after warm-up ({rss_growth:+d} KiB)")
        check(fds_end <= fds_idle + POOL_SIZE, f"no fd leak ({fds_end} fds after the load, {fds_idle} before)")
        check(srv_max <= POOL_SIZE, f"server connections never above the pool size ({srv_max})")
        sums = self.cluster.execute(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), "
            "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
            dbname=DB)[0]
        check(len(set(sums)) == 1, f"pgbench balances consistent {tuple(int(x) for x in sums)}")
        tbs = relutil.tracebacks(self.pooler.log_text())
        check(not tbs, f"no traceback in pgmux's log ({len(tbs)})")
        for b in benches:
            if b.returncode != 0:
                print(b.describe())
        for tb in tbs[:3]:
            print(tb[-2000:])
        return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.reliability.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--interval", type=float, default=None, help="seconds between samples (default: duration/40)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-cancel", action="store_true", help="leave out the cancelling client")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    soak = Soak(args.minutes, args.interval, seed, cancels=not args.no_cancel)
    try:
        ok = soak.run()
    finally:
        soak.teardown()
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
