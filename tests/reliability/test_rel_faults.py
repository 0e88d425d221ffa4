"""Faults under load: pgbench and a ledger of acknowledged commits run through ONE pgmux process for the
whole module while backends are killed, PostgreSQL restarts or disappears, the network stalls, and
clients storm, flood, dribble and queue.

After every fault: pgmux is still the same process, no statement took longer than the configured
timeouts allow, every acknowledged commit is there, nothing uncommitted is visible (the ledger, and
pgbench's balance invariant), no session is left idle in transaction, the pool refills to its size, and
a new pgbench run succeeds with zero failures.

The module runs its own PostgreSQL (restarted and stopped here; the session cluster is never touched),
with synchronous_commit on so that an immediate shutdown cannot lose an acknowledged commit, and a
FaultProxy between pgmux and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from relutil import LEDGER_DDL, Bench, Ledger, fd_count, run_bench, tracebacks

from bench.measure import cpu_ns
from pgmux.auth.secrets import md5_client_response
from pgmux.protocol import messages as m
from pgmux.testing.cluster import PoolerProcess, TempCluster, wait_for, write_config
from pgmux.testing.faultproxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

DB = "bench"
POOL_SIZE = 6
QUERY_TIMEOUT = 3
QUERY_WAIT_TIMEOUT = 5
LOGIN_TIMEOUT = 2
LOGIN_RETRY = 1
MAX_CLIENTS = 120
# the longest any single statement may take: the longest pgmux timeout, plus its 1 s janitor tick and slack
MAX_OP = max(QUERY_TIMEOUT, QUERY_WAIT_TIMEOUT) + 2.5
BENCH_SECONDS = 3


@dataclass
class Rig:
    cluster: TempCluster
    proxy: FaultProxy
    pooler: PoolerProcess
    pid: int
    log_mark: int = 0

    @property
    def dsn(self) -> str:
        return self.pooler.dsn("md5user", "md5pass", DB)

    def connect(self, **kw: Any) -> psycopg.Connection:
        # not pgbench's application_name: links between the ledger and pgbench start with a SET, which the
        # faults must not hang either
        kw.setdefault("autocommit", True)
        kw.setdefault("prepare_threshold", None)
        kw.setdefault("connect_timeout", 5)
        return psycopg.connect(self.dsn, **kw)

    def sql(self, query: str, params: Any = None) -> list[tuple]:
        return self.cluster.execute(query, dbname=DB, params=params)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    # client_connection_check_interval: a backend whose pooler connection closed mid-query (a storm client
    # left during pg_sleep) ends at once instead of at the end of its query
    cluster = TempCluster(settings={"synchronous_commit": "on", "max_connections": "200",
                                    "client_connection_check_interval": "'100ms'"})
    cluster.start()
    proxy = FaultProxy(0)
    pooler = None
    workdir = tempfile.mkdtemp(prefix="pgmux-faults-")
    try:
        cluster.create_test_roles()
        cluster.execute(f"CREATE DATABASE {DB} OWNER md5user")
        init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", cluster.dsn("md5user", "md5pass", DB)],
                              capture_output=True, text=True, timeout=120)
        assert init.returncode == 0, init.stderr
        with psycopg.connect(cluster.dsn("md5user", "md5pass", DB), autocommit=True) as c:
            c.execute(LEDGER_DDL)
        proxy.target_port = cluster.port
        proxy.start()
        ini, users = write_config(
            cluster, workdir=workdir, pool_mode="transaction",
            databases={DB: f"host=127.0.0.1 port={proxy.port} dbname={DB}"},
            extra={
                "default_pool_size": POOL_SIZE,
                "max_client_conn": MAX_CLIENTS,
                "query_timeout": QUERY_TIMEOUT,
                "query_wait_timeout": QUERY_WAIT_TIMEOUT,
                "client_login_timeout": LOGIN_TIMEOUT,
                "server_login_retry": LOGIN_RETRY,
                "server_connect_timeout": 2,
                "cancel_wait_timeout": 2,
                "tcp_defer_accept": 0,
                "listen_backlog": 512,
            },
        )
        pooler = PoolerProcess("pgmux", ini, users, workdir).start()
        yield Rig(cluster, proxy, pooler, pooler.pid)
    finally:
        if pooler is not None:
            pooler.stop()
        proxy.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# the load, and what must hold afterwards


def reset_data(rig: Rig) -> None:
    rig.sql("TRUNCATE ledger")


def balances(rig: Rig) -> tuple[int, int, int, int]:
    """pgbench's invariant: every committed transaction adds the same delta to an account, a teller, a
    branch and the history, so the four sums are equal unless a transaction was half applied."""
    row = rig.sql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), "
                  "(SELECT sum(bbalance) FROM pgbench_branches), "
                  "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
    return tuple(int(v) for v in row[0])  # type: ignore[return-value]


def wait_serving(rig: Rig, timeout: float) -> float:
    start = time.monotonic()

    def ok() -> bool:
        try:
            with rig.connect(connect_timeout=3) as c:
                return c.execute("SELECT 1").fetchone() == (1,)
        except psycopg.Error:
            return False

    wait_for(ok, timeout, interval=0.1, what="pgmux to serve again")
    return time.monotonic() - start


def check_after(rig: Rig, ledger: Ledger | None, bench: Bench | None, label: str, *,
                bench_must_succeed: bool = False, ledger_errors_allowed: bool = True) -> str:
    """Everything that must hold after a fault; returns the summary line printed for docs/reliability.md."""
    p = rig.pooler
    assert p.is_running() and p.pid == rig.pid, f"pgmux died or was restarted during: {label}"
    lines = [f"[{label}]"]
    if bench is not None:
        assert bench.elapsed <= BENCH_SECONDS + MAX_OP + 3, f"pgbench hung: {bench.describe()}"
        lines.append(f"pgbench under fault: exit {bench.returncode}, {bench.processed} xacts, {bench.elapsed:.1f}s")
        if bench_must_succeed:
            assert bench.ok, bench.describe()
    if ledger is not None:
        rows = rig.sql("SELECT id, kind FROM ledger")
        lines.append(ledger.check(rows, max_op=MAX_OP))
        if not ledger_errors_allowed:
            assert not ledger.errors, ledger.errors[:5]
    back = wait_serving(rig, LOGIN_RETRY + 8)
    sums = balances(rig)
    assert len(set(sums)) == 1, f"half-applied pgbench transactions: account/teller/branch/history sums {sums}"
    stuck = rig.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
                    [DB])[0][0]
    assert stuck == 0, f"{stuck} sessions left idle in transaction"
    after = run_bench(rig.dsn, 8, 1)
    assert after.ok, "pgbench after the fault: " + after.describe()
    try:
        servers = wait_for(lambda: (n := rig.cluster.count_backends(usename="md5user", datname=DB)) == POOL_SIZE
                           and n, 5, what="the pool back at its size")
    except AssertionError:
        servers = rig.cluster.count_backends(usename="md5user", datname=DB)
        raise AssertionError(f"pool did not refill to {POOL_SIZE} servers: {servers}") from None
    unknown = tracebacks(p.log_text()[rig.log_mark:])
    assert not unknown, "traceback in pgmux's log:\n" + unknown[0][-3000:]
    rig.log_mark = len(p.log_text())
    if ledger is not None and ledger.errors:
        lines.append("client errors: " + "; ".join(f"{n}x {e}" for e, n in Counter(ledger.errors).most_common(4)))
    lines.append(f"serving again after {back:.1f}s; pgbench afterwards: {after.processed} xacts, 0 failed; "
                 f"pool back to {servers} servers; balances consistent")
    summary = "\n  ".join(lines)
    print("\n" + summary)
    return summary


def under_load(rig: Rig, fault: Callable[[], None], label: str, *, after_fault: float = 1.0,
               bench_must_succeed: bool = False, ledger_errors_allowed: bool = True) -> str:
    reset_data(rig)
    ledger = Ledger(rig.connect, workers=3).start()
    bench = Bench(rig.dsn, clients=8, seconds=BENCH_SECONDS).start()
    try:
        history0 = rig.sql("SELECT count(*) FROM pgbench_history")[0][0]
        wait_for(lambda: ledger.committed >= 5, 15, what="the ledger to make progress")
        # pgbench connects all its clients before its first transaction: once it commits, they are in
        wait_for(lambda: rig.sql("SELECT count(*) FROM pgbench_history")[0][0] > history0 + 20, 15,
                 what="pgbench to make progress")
        fault()
        time.sleep(after_fault)
    finally:
        bench.finish(timeout=BENCH_SECONDS + MAX_OP + 30)
        ledger.stop()
    return check_after(rig, ledger, bench, label, bench_must_succeed=bench_must_succeed,
                       ledger_errors_allowed=ledger_errors_allowed)


def terminate_all(rig: Rig) -> int:
    return int(rig.cluster.execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE usename = 'md5user' AND datname = %s", params=[DB])[0][0])


# --------------------------------------------------------------------------------------------------
# server-side faults


def test_backends_terminated(rig: Rig) -> None:
    killed = []

    def fault() -> None:
        killed.append(terminate_all(rig))
        time.sleep(0.7)
        killed.append(terminate_all(rig))

    under_load(rig, fault, "pg_terminate_backend of every server, twice")
    print(f"  backends terminated: {killed}")
    assert killed and killed[0] > 0


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart(rig: Rig, mode: str) -> None:
    under_load(rig, lambda: rig.cluster.restart(mode), f"PostgreSQL restart -m {mode}")


def test_postgres_down_and_back(rig: Rig) -> None:
    def fault() -> None:
        rig.cluster.stop("immediate", cleanup=False)
        time.sleep(2)
        rig.cluster.restart()  # pg_ctl restart starts a stopped server

    try:
        under_load(rig, fault, "PostgreSQL stopped (immediate) for 2 s, then started")
    finally:
        if not rig.cluster.running:
            rig.cluster.restart()


def test_network_unreachable_and_back(rig: Rig) -> None:
    def fault() -> None:
        rig.proxy.unreachable()  # connection refused, open connections reset
        time.sleep(2)
        rig.proxy.reachable()

    under_load(rig, fault, "PostgreSQL unreachable (connections reset, connects refused) for 2 s")


def test_network_connections_reset(rig: Rig) -> None:
    cut = []

    def fault() -> None:
        cut.append(rig.proxy.cut())
        time.sleep(0.5)
        cut.append(rig.proxy.cut())

    under_load(rig, fault, "every server connection reset (RST) by the network, twice")
    print(f"  connections reset: {cut}")
    assert cut and cut[0] > 0


def test_server_stops_answering_mid_query(rig: Rig) -> None:
    """Every open server connection goes silent (bytes dropped, sockets open) and new ones are accepted but
    never answered, for 4 s: in-flight queries must end with query_timeout, logins with
    server_connect_timeout, and nobody may wait longer than that."""
    frozen = []

    def fault() -> None:
        rig.proxy.blackhole_new(True)
        frozen.append(rig.proxy.freeze())
        time.sleep(4)
        rig.proxy.heal()

    summary = under_load(rig, fault, "server stops answering mid-query (open connections frozen, new ones "
                                     "blackholed) for 4 s")
    assert frozen and frozen[0] > 0
    assert "query timeout" in rig.pooler.log_text(), "no query was ended by query_timeout"
    print(summary.splitlines()[0], f"frozen connections: {frozen[0]}")


def test_slow_network(rig: Rig) -> None:
    """50 ms more per chunk in each direction for 2 s: slower, but no error at all."""

    def fault() -> None:
        rig.proxy.delay(0.05)
        time.sleep(2)
        rig.proxy.delay(0)

    under_load(rig, fault, "50 ms network delay for 2 s", bench_must_succeed=True, ledger_errors_allowed=False)


def test_cancel_requests_under_load(rig: Rig) -> None:
    """Clients cancel their own long queries while pgbench runs: they get 57014, nobody else is hurt."""
    results: Counter[str] = Counter()

    def canceller() -> None:
        with rig.connect() as c:
            for _ in range(5):
                t = threading.Timer(0.3, c.cancel)
                t.start()
                start = time.monotonic()
                try:
                    c.execute("SELECT pg_sleep(3)")
                    results["not cancelled"] += 1
                except psycopg.errors.QueryCanceled:
                    results["cancelled"] += 1
                    results["max_s"] = max(results["max_s"], int((time.monotonic() - start) * 10))
                t.join()

    def fault() -> None:
        threads = [threading.Thread(target=canceller) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    under_load(rig, fault, "15 queries cancelled by their clients", bench_must_succeed=True,
               ledger_errors_allowed=False)
    assert results["cancelled"] == 15, results
    assert results["max_s"] <= 20, f"a cancel took {results['max_s'] / 10}s"


# --------------------------------------------------------------------------------------------------
# client-side storms and resource exhaustion (pgbench must not notice)


PASSWORD = ("md5user", "md5pass")


def md5_response(salt: bytes) -> bytes:
    user, password = PASSWORD
    return md5_client_response(password, user, salt).encode() + b"\0"


def startup_packet(db: str = DB) -> bytes:
    return m.startup_message({"user": "md5user", "database": db})


async def read_msg(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readexactly(5)
    return head[:1], await r.readexactly(struct.unpack("!i", head[1:])[0] - 4)


async def raw_login(host: str, port: int, db: str = DB) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Log in; returns the streams and the BackendKeyData body. Raises RuntimeError(message) on an error."""
    r, w = await asyncio.open_connection(host, port)
    w.write(startup_packet(db))
    key = b""
    while True:
        kind, body = await read_msg(r)
        if kind == b"R" and struct.unpack("!i", body[:4])[0] == 5:
            w.write(m.message(b"p", md5_response(body[4:8])))
        elif kind == b"K":
            key = body
        elif kind == b"E":
            w.close()
            raise RuntimeError(m.parse_error_fields(body).get("M", "?"))
        elif kind == b"Z":
            return r, w, key


async def until_ready(r: asyncio.StreamReader) -> list[bytes]:
    kinds = []
    while True:
        kind, _ = await read_msg(r)
        kinds.append(kind)
        if kind == b"Z":
            return kinds


async def storm_client(host: str, port: int, style: str, ident: int) -> str:
    try:
        if style == "login-abort":
            r, w = await asyncio.open_connection(host, port)
            w.write(startup_packet()[:ident % 20 + 1])
            await asyncio.sleep(0.01)
            w.transport.abort()
            return style
        if style == "auth-abort":
            r, w = await asyncio.open_connection(host, port)
            w.write(startup_packet())
            await read_msg(r)
            w.transport.abort()
            return style
        r, w, key = await raw_login(host, port)
        if style == "idle-abort":
            pass
        elif style == "query-abort":
            w.write(m.message(b"Q", b"SELECT pg_sleep(5)\0"))
            await asyncio.sleep(0.1)
        elif style == "tx-abort":
            w.write(m.query(f"BEGIN; INSERT INTO ledger VALUES ({-10_000_000 - ident}, 'r', 'storm')"))
            await until_ready(r)
        elif style == "copy-abort":
            w.write(m.message(b"Q", b"COPY ledger (id, kind) FROM STDIN\0"))
            kind, _ = await read_msg(r)
            assert kind == b"G", kind
            w.write(m.message(b"d", f"{-20_000_000 - ident}\tr\n".encode()) + b"d\0\0\0\x40" + b"123")
            await asyncio.sleep(0.05)
        elif style == "cancel-abort":
            w.write(m.message(b"Q", b"SELECT pg_sleep(5)\0"))
            await asyncio.sleep(0.05)
            cr, cw = await asyncio.open_connection(host, port)
            cw.write(struct.pack("!ii", 16, 80877102) + key)
            await cr.read()
            cw.close()
            await asyncio.sleep(0.05)
        w.transport.abort()
        return style
    except RuntimeError as exc:
        return f"refused: {exc}"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"{style} failed: {type(exc).__name__}"


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def test_client_disconnect_storm(rig: Rig) -> None:
    """300 clients vanish in every state (mid-login, mid-auth, idle, mid-query, mid-transaction, mid-COPY,
    right after a cancel) while pgbench runs: pgbench and the ledger see no error at all, no storm write
    survives, nothing is left idle in transaction, and pgmux's file descriptors come back."""
    styles = ["login-abort", "auth-abort", "idle-abort", "query-abort", "tx-abort", "copy-abort", "cancel-abort"]
    fds0 = fd_count(rig.pid)
    outcomes: Counter[str] = Counter()

    async def storm() -> None:
        sem = asyncio.Semaphore(40)

        async def one(i: int) -> None:
            async with sem:
                outcomes[await storm_client(rig.pooler.host, rig.pooler.port, styles[i % len(styles)], i)] += 1

        await asyncio.gather(*(one(i) for i in range(300)))

    under_load(rig, lambda: run_async(storm()), "disconnect storm: 300 clients vanish in every state",
               bench_must_succeed=True, ledger_errors_allowed=False)
    print("  storm outcomes:", dict(outcomes))
    assert sum(v for k, v in outcomes.items() if k in styles) == 300, outcomes
    assert rig.sql("SELECT count(*) FROM ledger WHERE id < -1000000") == [(0,)], "a storm write survived"
    wait_for(lambda: fd_count(rig.pid) <= fds0 + 2, 10, what=f"pgmux's fds back to {fds0}")


def test_max_client_conn_flood(rig: Rig) -> None:
    """250 logins at once against max_client_conn=120 while pgbench holds 8 and the ledger 3: the excess
    gets 'no more connections allowed (max_client_conn)', the connected clients see nothing, and logins
    work again once the flood is gone."""
    outcomes: Counter[str] = Counter()
    held: list[asyncio.StreamWriter] = []

    async def flood() -> None:
        async def one() -> None:
            try:
                _r, w, _k = await raw_login(rig.pooler.host, rig.pooler.port)
                held.append(w)
                outcomes["logged in"] += 1
            except RuntimeError as exc:
                outcomes[str(exc)] += 1
            except OSError as exc:
                outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(one() for _ in range(250)))
        await asyncio.sleep(1.0)
        for w in held:
            w.transport.abort()

    under_load(rig, lambda: run_async(flood()), "max_client_conn flood: 250 logins against 120 slots",
               bench_must_succeed=True, ledger_errors_allowed=False)
    print("  flood outcomes:", dict(outcomes))
    assert outcomes["no more connections allowed (max_client_conn)"] > 0, outcomes
    assert set(outcomes) <= {"logged in", "no more connections allowed (max_client_conn)"}, outcomes
    assert outcomes["logged in"] <= MAX_CLIENTS, outcomes


def test_burst_fills_the_free_client_slots(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(pool_mode="transaction", extra={"max_client_conn": 20, "tcp_defer_accept": 0})
    outcomes: Counter[str] = Counter()
    held: list[asyncio.StreamWriter] = []

    async def one() -> None:
        try:
            _r, w, _k = await raw_login(p.host, p.port, "testdb")
            held.append(w)
            outcomes["logged in"] += 1
        except RuntimeError as exc:
            outcomes[str(exc)] += 1

    async def burst() -> None:
        await asyncio.gather(*(one() for _ in range(60)))
        for w in held:
            w.transport.abort()

    run_async(burst())
    print(f"\n  60 simultaneous logins, max_client_conn = 20: {dict(outcomes)}")
    assert outcomes["logged in"] >= 15, outcomes


def test_slow_loris_logins(rig: Rig) -> None:
    """60 clients dribble a startup packet a byte every 0.4 s: each is cut off by client_login_timeout
    (within LOGIN_TIMEOUT + 1.5 s), with the error text; pgbench and the ledger are not disturbed."""
    ends: list[tuple[float, str]] = []

    async def loris(i: int) -> None:
        r, w = await asyncio.open_connection(rig.pooler.host, rig.pooler.port)
        start = time.monotonic()
        reader = asyncio.ensure_future(r.read())  # everything pgmux sends, up to its close
        try:
            for b in startup_packet():
                if reader.done():
                    break
                w.write(bytes([b]))
                await asyncio.wait([reader], timeout=0.4)
            data = await asyncio.wait_for(reader, 5)
        except (OSError, TimeoutError):
            data = b""
        text = "client_login_timeout" if b"client_login_timeout" in data else repr(data[:60])
        ends.append((time.monotonic() - start, text))
        w.transport.abort()

    async def swarm() -> None:
        await asyncio.gather(*(loris(i) for i in range(60)))

    under_load(rig, lambda: run_async(swarm()), "slow-loris: 60 logins dribbling a byte every 0.4 s",
               bench_must_succeed=True, ledger_errors_allowed=False)
    texts = Counter(t for _, t in ends)
    longest = max(d for d, _ in ends)
    print(f"  slow-loris: {dict(texts)}, longest {longest:.1f}s")
    assert texts == {"client_login_timeout": 60}, texts
    assert longest <= LOGIN_TIMEOUT + 1.5, longest


def test_many_waiting_clients(rig: Rig) -> None:
    """100 clients want a server at once (pool of 6, pgbench running too): all are served, none waits past
    query_wait_timeout, PostgreSQL never sees more than the pool size."""
    waits: list[float] = []
    errors: list[str] = []

    async def client(i: int) -> None:
        try:
            r, w, _ = await raw_login(rig.pooler.host, rig.pooler.port)
            start = time.monotonic()
            w.write(m.message(b"Q", f"SELECT pg_sleep(0.02), {i}\0".encode()))
            kinds = await until_ready(r)
            waits.append(time.monotonic() - start)
            if b"E" in kinds:
                errors.append(f"client {i} got an error")
            w.write(m.message(b"X", b""))
            w.close()
        except (RuntimeError, OSError, asyncio.IncompleteReadError) as exc:
            errors.append(repr(exc))

    async def crowd() -> None:
        await asyncio.gather(*(client(i) for i in range(100)))

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with rig.cluster.connect(DB) as c:
            while not stop.is_set():
                samples.append(c.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'md5user' "
                                         "AND datname = %s", [DB]).fetchone()[0])
                stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        under_load(rig, lambda: run_async(crowd()), "100 clients waiting for a pool of 6 at once",
                   bench_must_succeed=True, ledger_errors_allowed=False)
    finally:
        stop.set()
        sampler.join(5)
    waits.sort()
    print(f"  waiting clients: {len(waits)} served, median {waits[len(waits) // 2]:.2f}s, "
          f"max {waits[-1]:.2f}s; at most {max(samples)} server connections")
    assert not errors, errors[:5]
    assert len(waits) == 100
    assert waits[-1] < QUERY_WAIT_TIMEOUT
    assert max(samples) <= POOL_SIZE


def test_file_descriptor_exhaustion(rig: Rig) -> None:
    """pgmux's RLIMIT_NOFILE is cut to what it uses now + 40, then 120 clients try to connect: pgmux
    must neither crash nor spin, and must serve normally again (pgbench succeeds) once the clients leave
    and the limit is restored."""
    soft, hard = resource.prlimit(rig.pid, resource.RLIMIT_NOFILE)
    base = fd_count(rig.pid)
    resource.prlimit(rig.pid, resource.RLIMIT_NOFILE, (base + 40, hard))
    cpu0 = cpu_ns(rig.pid) / 1e9
    socks: list[socket.socket] = []
    outcomes: Counter[str] = Counter()
    try:
        for _ in range(120):
            try:
                s = socket.create_connection((rig.pooler.host, rig.pooler.port), timeout=2)
                s.sendall(startup_packet())
                socks.append(s)
            except OSError as exc:
                outcomes[f"connect: {type(exc).__name__}"] += 1
        time.sleep(2)
        for s in socks:
            s.settimeout(0.05)
            try:
                data = s.recv(1)
                outcomes["answered" if data else "closed"] += 1
            except TimeoutError:
                outcomes["no answer yet"] += 1
            except OSError as exc:
                outcomes[type(exc).__name__] += 1
        cpu = cpu_ns(rig.pid) / 1e9 - cpu0
        assert rig.pooler.is_running(), "pgmux died when it ran out of file descriptors"
    finally:
        for s in socks:
            s.close()
        resource.prlimit(rig.pid, resource.RLIMIT_NOFILE, (soft, hard))
    emfile = rig.pooler.log_text()[rig.log_mark:].count("Too many open files")
    print(f"\n  fd limit {base + 40}: {dict(outcomes)}; pgmux used {cpu:.1f}s CPU in those ~2.5 s; "
          f"{emfile} log lines mention 'Too many open files'")
    assert cpu < 2.0, f"pgmux spun the CPU while out of fds ({cpu:.1f}s)"
    assert emfile >= 1, "pgmux said nothing in its log about running out of file descriptors"
    wait_for(lambda: fd_count(rig.pid) <= base + 2, 10, what="fds back to the baseline")
    check_after(rig, None, None, f"file descriptors exhausted (limit {base + 40}, 120 connection attempts)")



def test_server_closing_during_login_gives_a_clear_error(cluster: TempCluster, pooler: Callable[..., PoolerProcess],
                                                          ) -> None:
    with FaultProxy(cluster.port) as proxy:
        p = pooler(pool_mode="transaction", databases={"testdb": f"host=127.0.0.1 port={proxy.port} dbname=testdb"},
                   extra={"server_login_retry": 1, "client_login_timeout": 2})
        proxy.refuse_new(True)  # accepted, then reset: PostgreSQL going down mid-login looks the same
        with pytest.raises(psycopg.OperationalError) as exc_info:
            psycopg.connect(p.dsn("md5user", "md5pass"), connect_timeout=10)
        message = str(exc_info.value)
        log = p.log_text()
        proxy.refuse_new(False)
    assert not message.rstrip().endswith("FATAL:"), f"empty error text: {message!r}"
    # PgBouncer: no ErrorResponse from the server, so the client waits for the pool's first server
    # (retried server_login_retry apart) until client_login_timeout
    assert "client_login_timeout (server down)" in message, message
    assert "server login failed: server conn crashed?" in log, "the reason a login failed belongs in the log"
    assert not tracebacks(log), tracebacks(log)[0]


def test_server_silent_during_parameter_sync(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    from pgwire import RawConn

    with FaultProxy(cluster.port) as proxy:
        p = pooler(pool_mode="transaction", databases={"testdb": f"host=127.0.0.1 port={proxy.port} dbname=testdb"},
                   extra={"query_timeout": 1, "default_pool_size": 1})
        x = RawConn(p.host, p.port, timeout=5)
        x.login("md5user", "testdb", "md5pass", application_name="x")
        assert x.simple_query("SELECT 1") == [("1",)]
        proxy.freeze()  # the pool's only server goes silent while idle
        y = RawConn(p.host, p.port, timeout=4)
        y.login("md5user", "testdb", "md5pass", application_name="y")  # differs: the link starts with a SET
        start = time.monotonic()
        try:
            y.simple_query("SELECT 2")
            outcome = "answered"
        except TimeoutError:
            outcome = "no answer after 4 s"
        except Exception as exc:  # noqa: BLE001 - an error is the expected outcome
            outcome = f"error: {exc}"
        elapsed = time.monotonic() - start
        x.close()
        y.close()
    assert outcome.startswith("error") and elapsed < 3, f"{outcome} ({elapsed:.1f}s, query_timeout = 1)"
