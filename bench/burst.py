"""A login burst: N clients connect at once, at most ``concurrency`` logins in flight, and all stay connected
until the last one is in (so N are held at the same time), then close.

"At most ``concurrency`` in flight" is done with ``concurrency`` slots that each log in clients one after the
other until none is left: the same as a semaphore over N tasks, without N - concurrency tasks parked on it
(at 2,000 clients those cost the client enough CPU to show in the first logins' times).

Each client is a raw asyncio socket doing a real md5 login, as in bench/idle.py (StartupMessage,
PasswordMessage, until ReadyForQuery); by default it runs nothing after logging in (``query`` runs one
simple query per client, e.g. ``SELECT 1``). Login time is measured per client from ``connect()`` (after
the client got its slot) to ReadyForQuery, so waiting for a slot does not count.

Used by ``bench.run``'s ``login-burst`` workload and by tests/integration/test_login_burst.py.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.idle import close_with_rst, login
from bench.measure import percentile

T = TypeVar("T")


def client_loop() -> str:
    """The event loop the burst's client runs on: uvloop when installed (half the client's CPU per login
    of the stdlib loop, so the client is less of a bottleneck on a small machine), else asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on :func:`client_loop`'s loop."""
    if client_loop() == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@dataclass
class BurstResult:
    clients: int  # clients started
    logged_in: int = 0  # reached ReadyForQuery
    failed: int = 0  # refused or errored before ReadyForQuery
    query_failed: int = 0  # logged in, but the query failed (``query`` only)
    error_counts: dict[str, int] = field(default_factory=dict)  # error text -> how many clients got it
    first_error: str = ""  # the first error seen, in time
    login_ms: list[float] = field(default_factory=list)  # sorted, one per client that logged in
    burst_seconds: float = 0.0  # first connect() to the last client's outcome
    alive: int = 0  # connections still open after every client had its outcome (the pooler dropped none)
    queried: int = 0  # clients whose query completed (``query`` only)

    def pct(self, q: float) -> float | None:
        return percentile(self.login_ms, q) if self.login_ms else None

    @property
    def max_ms(self) -> float | None:
        return self.login_ms[-1] if self.login_ms else None


def _error_text(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return "TimeoutError: no answer within the client's timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed by the pooler before ReadyForQuery"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _query(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sql: str, timeout: float) -> None:
    """One simple-protocol query; raises on an ErrorResponse."""
    payload = sql.encode() + b"\0"
    writer.write(b"Q" + struct.pack("!I", len(payload) + 4) + payload)
    error = None
    async with asyncio.timeout(timeout):
        while True:
            header = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack("!I", header[1:])[0] - 4)
            if header[:1] == b"E" and error is None:
                fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
                error = fields.get(b"M", body).decode(errors="replace")
            elif header[:1] == b"Z":
                if error is not None:
                    raise RuntimeError(error)
                return

async def login_burst(
    host: str,
    port: int,
    user: str,
    password: str,
    database: str,
    n: int,
    *,
    concurrency: int = 100,
    timeout: float = 30.0,
    query: str | None = None,
    on_all_in: Callable[[BurstResult], None] | None = None,
    settle: float = 0.2,
) -> BurstResult:
    """Start ``n`` clients at once (``concurrency`` logins in flight); each logs in (and runs ``query``, if
    given) and stays connected. When every client has its outcome: ``settle`` seconds for the pooler's
    closes to arrive, count the connections still open, call ``on_all_in(result)`` (still holding them:
    e.g. read the pooler's CPU, or SHOW CLIENTS), then close them all with RST."""
    res = BurstResult(clients=n)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: collections.Counter[str] = collections.Counter()
    todo = n

    async def one() -> None:
        t0 = time.monotonic()
        try:
            reader, writer = await login(host, port, user, password, database, timeout)
        except Exception as e:  # noqa: BLE001 - a refusal: counted and reported, not fatal
            text = _error_text(e)
            errors[text] += 1
            res.first_error = res.first_error or text
            return
        res.login_ms.append((time.monotonic() - t0) * 1000.0)
        conns.append((reader, writer))
        if query is not None:
            try:
                await _query(reader, writer, query, timeout)
                res.queried += 1
            except Exception as e:  # noqa: BLE001
                text = "query: " + _error_text(e)
                errors[text] += 1
                res.first_error = res.first_error or text

    async def slot() -> None:
        # one of ``concurrency`` slots: logs in clients one after the other while any are left (the same as a
        # semaphore of ``concurrency`` over n tasks, without n - concurrency tasks parked on it)
        nonlocal todo
        while todo > 0:
            todo -= 1
            await one()

    t_start = time.monotonic()
    try:
        await asyncio.gather(*(slot() for _ in range(min(concurrency, n))))
        res.burst_seconds = time.monotonic() - t_start
        await asyncio.sleep(settle)
        res.alive = sum(1 for r, _w in conns if not r.at_eof() and not _w.is_closing())
        res.logged_in = len(res.login_ms)
        res.failed = n - res.logged_in
        res.query_failed = sum(c for text, c in errors.items() if text.startswith("query: "))
        res.error_counts = dict(errors.most_common())
        res.login_ms.sort()
        if on_all_in is not None:
            on_all_in(res)
    finally:
        await close_with_rst(conns)
    return res
