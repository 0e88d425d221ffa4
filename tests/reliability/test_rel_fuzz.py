"""Hostile input against a running pgmux while good clients work.

The fuzzer sends random and mutated startup packets and messages (bad lengths, truncated messages, huge
length fields, messages out of order, garbage after SSLRequest, broken authentication exchanges) over
many concurrent connections. Checks: the process never dies and logs no unexpected traceback, every bad
client gets an ErrorResponse or a close before logging in (client_login_timeout bounds the rest), memory
and file descriptors come back to where they were, and the good clients running meanwhile see no error.

Hostile clients that log in use their own pool (database alias ``fuzzdb``): the good clients share the
process, the event loop and every global structure with them, but not servers, so that a good client's
error points at pgmux's shared state. What the next client of a server a hostile client left gets is
tested on its own below (test_client_leaving_leaves_no_poison_for_the_next_client).

Then one test per pgmux bug the fuzzer and the property tests found, reduced to a deterministic
reproducer (they were xfail(strict=True) until fixed; docs/reliability.md, section 6).

``PGMUX_FUZZ_CASES`` (default 1000) and ``PGMUX_FUZZ_SEED`` (default: random, printed) tune the run.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from helpers_tx import raw_login
from pgwire import RawConn, message, parse_error_fields, startup_packet
from relutil import GoodClients, fd_count, rss_kb, tracebacks

from pgmux.auth.secrets import md5_client_response
from pgmux.protocol import messages as m
from pgmux.testing.cluster import PoolerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

PoolerFactory = Callable[..., PoolerProcess]

LOGIN_TIMEOUT = 2
MAX_PACKET = 16384

FUZZ_DB = "fuzzdb"  # the hostile clients' own pool (same PostgreSQL database as the good clients' testdb)


def fuzz_pooler(pooler: PoolerFactory, **extra: Any) -> PoolerProcess:
    settings = {
        "default_pool_size": 4,
        "max_client_conn": 500,
        "client_login_timeout": LOGIN_TIMEOUT,
        "max_packet_size": MAX_PACKET,
        "tcp_defer_accept": 0,
        "query_wait_timeout": 20,
    }
    settings.update(extra)
    dbs = {"testdb": "host={host} port={port} dbname=testdb", FUZZ_DB: "host={host} port={port} dbname=testdb",
           "postgres": "host={host} port={port}"}
    return pooler(pool_mode="transaction", databases=dbs, extra=settings)


# --------------------------------------------------------------------------------------------------
# the fuzz cases


@dataclass
class Case:
    """A scripted hostile client. steps: ("send", bytes) | ("ssl",) read the 1-byte SSL answer |
    ("auth",) read up to the authentication request | ("login",) log in properly | ("sleep", s)."""

    family: str
    steps: list[tuple[Any, ...]]
    post_login: bool = False


@dataclass
class Outcome:
    family: str
    result: str  # error | close | waiting | refused
    detail: str = ""
    post_login: bool = False


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    return md5_client_response(password, user, salt).encode() + b"\0"


GOOD_PARAMS = {"user": "md5user", "database": "testdb"}


def startup(params: dict[str, str] | None = None, code: int = m.PROTOCOL_V3) -> bytes:
    return startup_packet(params or GOOD_PARAMS, code)


def mutate(rng: random.Random, data: bytes, rounds: int = 3) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, rounds)):
        if not b:
            b += rng.randbytes(rng.randint(1, 8))
            continue
        op = rng.randrange(6)
        i = rng.randrange(len(b))
        if op == 0:
            b[i] = rng.randrange(256)
        elif op == 1:
            del b[i:]
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            del b[i : i + rng.randint(1, 8)]
        elif op == 4:
            b[i] ^= 1 << rng.randrange(8)
        else:
            b[i:i] = b[i : i + rng.randint(1, 12)]  # duplicate a run
    return bytes(b)


def lying_length(rng: random.Random) -> int:
    return rng.choice([-1, -(2**31), 0, 3, 4, 7, 8, 9, 10000, 10001, 65536, 0x7FFFFFFF, rng.randint(0, 20000)])


def pre_login_case(rng: random.Random) -> Case:
    kind = rng.randrange(12)
    if kind == 0:
        return Case("random bytes", [("send", rng.randbytes(rng.randint(1, 80)))])
    if kind == 1:
        return Case("mutated startup", [("send", mutate(rng, startup()))])
    if kind == 2:
        pkt = startup()
        return Case("startup length lie", [("send", struct.pack("!i", lying_length(rng)) + pkt[4:])])
    if kind == 3:
        code = rng.choice([0x00020000, 0x00030001, 0x00040000, 0x0003FFFF, 1234, 0, rng.getrandbits(31),
                           m.CANCEL_REQUEST_CODE, m.SSL_REQUEST_CODE])
        return Case("protocol version", [("send", startup(code=code))])
    if kind == 4:
        garbage = rng.choice([startup(), rng.randbytes(rng.randint(1, 40)), b"\x16\x03\x01\x02\x00\x01"])
        return Case("data after SSLRequest", [("send", m.ssl_request() + garbage)])
    if kind == 5:
        steps: list[tuple[Any, ...]] = []
        for _ in range(rng.randint(1, 3)):
            steps += [("send", rng.choice([m.ssl_request(), struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE)])), ("ssl",)]
        steps.append(("send", rng.choice([mutate(rng, startup()), rng.randbytes(rng.randint(1, 30)),
                                          m.ssl_request()[:rng.randint(1, 7)]])))
        return Case("garbage after SSL answer", steps)
    if kind == 6:
        pkt = rng.choice([
            m.cancel_request(rng.getrandbits(31), rng.getrandbits(31)),
            struct.pack("!ii", 12, m.CANCEL_REQUEST_CODE) + rng.randbytes(4),
            struct.pack("!ii", 20, m.CANCEL_REQUEST_CODE) + rng.randbytes(12),
        ])
        return Case("cancel request", [("send", pkt)])
    if kind == 7:
        params = rng.choice([
            {"user": "md5user", "database": "testdb", "foo": "bar"},
            {"user": "md5user", "database": "testdb", "options": "-c work_mem=64kB"},
            {"user": "md5user", "database": "testdb", "options": "--search_path=x -x"},
            {"database": "testdb"},
            {"user": "", "database": "testdb"},
            {"user": "md5user", "database": "no_such_db_" + str(rng.randrange(100))},
            {"user": "nobody_" + str(rng.randrange(100)), "database": "testdb"},
            {"user": "md5user", "database": "testdb", **{f"k{i}": "v" for i in range(rng.randint(50, 700))}},
            {"user": "md5user", "database": "testdb", "application_name": "x" * rng.randint(100, 9000)},
            {"user": "md5user", "database": "pgbouncer"},
        ])
        pkt = startup(params)
        if rng.random() < 0.3:
            pkt = pkt.replace(b"md5user", b"md5\xff\xfeer")  # invalid UTF-8
        return Case("startup parameters", [("send", pkt)])
    if kind == 8:
        # a real startup, then a broken md5 password exchange
        answer = rng.choice([
            message(b"p", b"md5" + b"0" * 32 + b"\0"),  # wrong password
            message(b"Q", b"SELECT 1\0"),  # not a password message
            b"p" + struct.pack("!i", rng.choice([0, 1, 3])),  # bad length
            b"p" + struct.pack("!i", rng.choice([0x7FFFFFFF, 1 << 20, 50])) + b"x" * 10,  # truncated / huge
            rng.randbytes(rng.randint(1, 40)),
            message(b"p", b""),
            message(b"p", rng.randbytes(rng.randint(1, 60))),
        ])
        return Case("broken md5 exchange", [("send", startup()), ("auth",), ("send", answer)])
    if kind == 9:
        # SCRAM: scramuser's stored secret is SCRAM, so md5 auth_type switches to SCRAM
        first = rng.choice([
            message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"n,,n="),
            message(b"p", b"SCRAM-SHA-1\0" + struct.pack("!i", -1)),
            message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 100) + b"n,,n=x,r=abc"),
            message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 12) + b"n,,n=x,r=\xff\xfe\xfd"),
            message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 18) + b"p=x,,n=x,r=abcdef"),
            message(b"p", b"SCRAM-SHA-256"),
            message(b"p", mutate(rng, b"SCRAM-SHA-256\0\0\0\0\x10n,,n=,r=abcdefgh")),
        ])
        steps = [("send", startup({"user": "scramuser", "database": "testdb"})), ("auth",), ("send", first)]
        if rng.random() < 0.5:
            steps.append(("send", message(b"p", b"c=biws,r=abc,p=" + rng.randbytes(8).hex().encode())))
        return Case("broken SCRAM exchange", steps)
    if kind == 10:
        # a startup packet cut short, or dribbled in pieces (the login timeout must end it)
        pkt = startup()
        cut = rng.randint(1, len(pkt) - 1)
        return Case("truncated startup", [("send", pkt[:cut]), ("sleep", rng.random() * 0.3),
                                          ("send", pkt[cut : cut + rng.randint(0, 3)])])
    return Case("startup then garbage", [("send", startup() + rng.randbytes(rng.randint(1, 30)))])


def typed(rng: random.Random, types: bytes = b"QPBDECSFXHdcf") -> bytes:
    t = rng.choice(types + bytes([rng.randrange(256)]))
    body = rng.choice([
        b"",
        rng.randbytes(rng.randint(1, 40)),
        b"SELECT 1\0",
        b"\0SELECT 1\0\0\0",
        b"stmt\0SELECT $1\0\0\x01\0\0\0\x17",
        b"\0\0\0\0\0\0\0\0",
        b"S\0",
        b"Pportal\0",
    ])
    if t in b"PB" and rng.random() < 0.5:
        body = body.replace(b"\0", b"")  # names without terminator
    return message(bytes([t]), body)


def post_login_case(rng: random.Random) -> Case:
    kind = rng.randrange(7)
    steps: list[tuple[Any, ...]] = [("login",)]
    if kind == 0:
        data = b"".join(typed(rng) for _ in range(rng.randint(1, 8))) + message(b"S", b"")
        return Case("random messages", [*steps, ("send", data)], True)
    if kind == 1:
        t = rng.choice(b"QPBDECSFHdcf")
        return Case("bad length", [*steps, ("send", bytes([t]) + struct.pack("!i", rng.choice([-5, 0, 1, 2, 3])))],
                    True)
    if kind == 2:
        # out of order: the extended protocol without its preamble, COPY messages outside COPY, Sync storms
        data = rng.choice([
            message(b"B", b"\0nostmt\0\0\0\0\0\0\0") + message(b"E", b"\0\0\0\0\0") + message(b"S", b""),
            message(b"E", b"noportal\0\0\0\0\0") + message(b"S", b""),
            message(b"d", b"1\t2\n") + message(b"c", b"") + message(b"S", b""),
            message(b"f", b"abort\0") + message(b"Q", b"SELECT 1\0"),
            message(b"S", b"") * rng.randint(2, 60),
            message(b"D", b"Xfoo\0") + message(b"C", b"Zbar\0") + message(b"S", b""),
            message(b"F", rng.randbytes(12)) + message(b"S", b""),
            message(b"P", b"dup\0SELECT 1\0\0\0") * 2 + message(b"S", b""),
            message(b"Q", b"SELECT 1\0") + message(b"B", b"\0\0\0\0\0\0\0\0") + message(b"Q", b"SELECT 2\0"),
        ])
        return Case("out of order", [*steps, ("send", data)], True)
    if kind == 3:
        # a message cut short, then the client leaves
        whole = typed(rng)
        cut = rng.randint(1, max(1, len(whole) - 1))
        return Case("truncated message", [*steps, ("send", whole[:cut])], True)
    if kind == 4:
        # COPY FROM STDIN, then anything but CopyData
        data = message(b"Q", b"COPY (SELECT 1) TO STDOUT\0") if rng.random() < 0.3 else (
            message(b"Q", b"CREATE TEMP TABLE IF NOT EXISTS fz (a int); COPY fz FROM STDIN\0"))
        tail = rng.choice([message(b"Q", b"SELECT 1\0"), message(b"d", rng.randbytes(20)), message(b"S", b""),
                           message(b"d", b"1\n") + message(b"c", b""), rng.randbytes(10)])
        return Case("COPY misuse", [*steps, ("send", data), ("sleep", 0.05), ("send", tail)], True)
    if kind == 5:
        t = rng.choice(b"BDEdHF")  # streamed (not buffered) types: PostgreSQL sees the lie
        return Case("huge length", [*steps, ("send", bytes([t]) + struct.pack("!i", rng.choice(
            [0x7FFFFFFF, 0x40000001, 1 << 20])) + rng.randbytes(rng.randint(0, 50)))], True)
    return Case("mutated messages", [*steps, ("send", mutate(rng, message(b"P", b"s1\0SELECT $1::int\0\0\x01\0\0\0\x17")
                                                            + message(b"B", b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0")
                                                            + message(b"E", b"\0\0\0\0\0") + message(b"S", b"")))],
                True)


# --------------------------------------------------------------------------------------------------
# the async hostile client


class Closed(Exception):
    pass


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    try:
        head = await reader.readexactly(5)
        n = struct.unpack("!i", head[1:])[0]
        if n < 4 or n > 1 << 20:
            raise Closed(f"bad length {n} from pgmux")
        return head[:1], await reader.readexactly(n - 4)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise Closed() from exc


async def login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(startup({"user": "md5user", "database": FUZZ_DB}))
    while True:
        kind, body = await read_message(reader)
        if kind == b"R":
            code = struct.unpack("!i", body[:4])[0]
            if code == m.AUTH_MD5:
                writer.write(message(b"p", md5_password("md5user", "md5pass", body[4:8])))
        elif kind == b"E":
            raise AssertionError(f"good login refused: {parse_error_fields(body)}")
        elif kind == b"Z":
            return


def _out(case: Case, result: str, detail: str = "") -> Outcome:
    return Outcome(case.family, result, detail, case.post_login)


async def run_case(host: str, port: int, case: Case) -> Outcome:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError) as exc:
        return _out(case, "refused", repr(exc))
    got_error = ""
    try:
        for step in case.steps:
            if step[0] == "send":
                writer.write(step[1])
                await writer.drain()
            elif step[0] == "sleep":
                await asyncio.sleep(step[1])
            elif step[0] == "ssl":
                answer = await asyncio.wait_for(reader.read(1), 5)
                if answer == b"E":  # an error instead of N: read the rest of it
                    got_error = "error instead of SSL answer"
                if answer != b"N":
                    break
            elif step[0] == "auth":
                kind, body = await asyncio.wait_for(read_message(reader), 5)
                if kind != b"R":
                    got_error = parse_error_fields(body).get("M", "") if kind == b"E" else kind.decode()
                    break
            elif step[0] == "login":
                await asyncio.wait_for(login(reader, writer), 10)
        # read whatever comes until the close (or until the deadline)
        deadline = LOGIN_TIMEOUT + 1.5 if not case.post_login else 1.0
        try:
            async with asyncio.timeout(deadline):
                while True:
                    kind, body = await read_message(reader)
                    if kind == b"E" and not got_error:
                        got_error = parse_error_fields(body).get("M", "?")
        except TimeoutError:
            return _out(case, "error" if got_error else "waiting", got_error)
        except Closed:
            return _out(case, "error" if got_error else "close", got_error)
    except (Closed, ConnectionError, OSError):
        return _out(case, "error" if got_error else "close", got_error)
    except TimeoutError:
        return _out(case, "error" if got_error else "waiting", got_error or "step timed out")
    finally:
        writer.transport.abort()
    return _out(case, "close", got_error)


async def fuzz(host: str, port: int, cases: list[Case], concurrency: int) -> list[Outcome]:
    sem = asyncio.Semaphore(concurrency)

    async def one(case: Case) -> Outcome:
        async with sem:
            return await run_case(host, port, case)

    return await asyncio.gather(*(one(c) for c in cases))


# --------------------------------------------------------------------------------------------------
# the live fuzz run


def test_live_fuzzer(pooler: PoolerFactory) -> None:
    seed = int(os.environ.get("PGMUX_FUZZ_SEED", random.randrange(1 << 30)))
    n_cases = int(os.environ.get("PGMUX_FUZZ_CASES", "1000"))
    rng = random.Random(seed)
    p = fuzz_pooler(pooler)
    dsn = p.dsn("md5user", "md5pass")
    good = GoodClients(lambda: psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10),
                       threads=4).start()
    try:
        time.sleep(0.5)  # warm up: pools open, buffers grown
        rss0, fds0 = rss_kb(p.pid), fd_count(p.pid)
        cases = [post_login_case(rng) if rng.random() < 0.35 else pre_login_case(rng) for _ in range(n_cases)]
        t0 = time.monotonic()
        outcomes = asyncio.run(fuzz(p.host, p.port, cases, concurrency=60))
        elapsed = time.monotonic() - t0
        assert p.is_running(), "pgmux died under fuzzing"
        rss1 = rss_kb(p.pid)
    finally:
        good.stop()
    fds_after = wait_for(lambda: fd_count(p.pid) <= fds0 + 4 and fd_count(p.pid), 10,
                         what="fds back to the baseline")

    by_family: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_family.setdefault(o.family, Counter())[o.result] += 1
    print(f"\nfuzz seed {seed}: {len(cases)} hostile inputs in {elapsed:.1f}s "
          f"({sum(len(c.steps) for c in cases)} packets), {good.queries} good queries meanwhile")
    for fam, counts in sorted(by_family.items()):
        print(f"  {fam:28s} {dict(counts)}")
    errors = Counter(o.detail for o in outcomes if o.result == "error")
    print("  most frequent error texts:", errors.most_common(8))
    print(f"  RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds_after}")

    unknown = tracebacks(p.log_text())
    assert not unknown, "unexpected traceback in pgmux's log:\n" + unknown[0]
    assert not good.errors, f"good clients saw errors: {good.errors[:5]}"
    assert good.queries > 50, "good clients made no progress"
    stuck = [o for o in outcomes if o.result in ("waiting", "refused") and not o.post_login]
    assert not stuck, f"pre-login hostile clients neither refused nor closed: {stuck[:5]}"
    assert rss1 - rss0 < 40_000, f"RSS grew by {rss1 - rss0} KiB during the fuzz run"
    # pgmux still works for everyone
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------------------------------
# pgmux bugs found by the fuzzer and the property tests, as deterministic reproducers


def P(name: bytes, query: bytes) -> bytes:
    return message(b"P", name + b"\0" + query + b"\0\0\0")


def B(stmt: bytes) -> bytes:
    return message(b"B", b"\0" + stmt + b"\0\0\0\0\0\0\0")


EXEC = message(b"E", b"\0\0\0\0\0")
SYNC = message(b"S", b"")
FLUSH = message(b"H", b"")


def read_types(c: RawConn, until: bytes = b"Z") -> str:
    out = []
    while True:
        kind, _ = c.read_message()
        out.append(kind.decode())
        if kind == until:
            return "".join(out)


def can_query(p: PoolerProcess, timeout: float = 4.0) -> str:
    """'ok', or what went wrong for a fresh client running SELECT 42."""
    try:
        c = raw_login(p, timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        return f"login: {exc!r}"
    try:
        rows = c.simple_query("SELECT 42")
        return "ok" if rows == [("42",)] else f"wrong rows {rows}"
    except Exception as exc:  # noqa: BLE001
        return repr(exc)
    finally:
        c.close()


@pytest.mark.parametrize("last_words", ["CopyData cut short", "unknown type, Terminate"])
def test_client_leaving_leaves_no_poison_for_the_next_client(pooler: PoolerFactory, last_words: str) -> None:
    p = fuzz_pooler(pooler, default_pool_size=1, query_timeout=2)
    if last_words == "CopyData cut short":
        a = raw_login(p, timeout=4)
        assert a.simple_query("SELECT 1") == [("1",)]
        a.send(b"d" + struct.pack("!i", 100) + b"x" * 20)  # CopyData announcing 96 bytes, 20 sent
        time.sleep(0.2)
        a.close()
        time.sleep(0.2)
        outcome = can_query(p)
    else:
        holder, a, b = raw_login(p, timeout=4), raw_login(p, timeout=4), raw_login(p, timeout=4)
        holder.simple_query("BEGIN")  # the pool's only server is busy: a, then b, queue up for it
        a.send(message(b"?", b"") + message(b"X", b""))  # PostgreSQL: FATAL invalid frontend message type 63
        time.sleep(0.1)
        b.send(message(b"Q", b"SELECT 42\0"))
        time.sleep(0.1)
        holder.simple_query("COMMIT")  # the server goes to a, which leaves at once, then to b
        got = []
        try:
            while not got or got[-1] != "Z":
                kind, body = b.read_message()
                got.append(parse_error_fields(body).get("M", "E") if kind == b"E" else kind.decode())
            outcome = "ok" if got == list("TDCZ") else f"got {got}"
        except Exception as exc:  # noqa: BLE001
            outcome = f"got {got}, then {exc!r}"
        for c in (holder, a, b):
            c.close()
    assert outcome == "ok", f"next client on that server: {outcome}"


def test_max_packet_size_bounds_memory(pooler: PoolerFactory) -> None:
    """Two clients announce 2 GB messages and stream 24 MiB each: one a password message during login,
    one a Query after login. With max_packet_size = 16 KiB both must be refused early, and pgmux's RSS
    must not grow by the data streamed."""
    p = fuzz_pooler(pooler)
    rss0 = rss_kb(p.pid)
    results = {}

    def stream(name: str, conn: RawConn, head: bytes) -> None:
        conn.sock.settimeout(5)
        sent = 0
        try:
            conn.send(head)
            chunk = b"x" * (1 << 20)
            for _ in range(24):
                conn.send(chunk)
                sent += 1
            results[name] = f"accepted {sent} MiB"
        except OSError as exc:
            results[name] = f"refused after {sent} MiB ({type(exc).__name__})"
        finally:
            conn.close()

    login = RawConn(p.host, p.port, timeout=5)
    login.send(startup())
    assert login.read_message()[0] == b"R"
    stream("password message", login, b"p" + struct.pack("!i", 0x7FFFFFF0))
    stream("query", raw_login(p, timeout=4), b"Q" + struct.pack("!i", 0x7FFFFFF0))
    growth = rss_kb(p.pid) - rss0
    print(f"\nRSS growth {growth} KiB; {results}")
    assert all(r.startswith("refused") for r in results.values()), results
    assert growth < 16_000, f"RSS grew by {growth} KiB"


def test_malformed_parse_gets_an_error_and_frees_the_server(cluster: Any, pooler: PoolerFactory) -> None:
    p = fuzz_pooler(pooler, default_pool_size=1)
    a = raw_login(p, timeout=2)
    a.send(P(b"n1", b"SELECT 1") + B(b"n1") + EXEC + SYNC)  # a named statement: tracking on
    assert read_types(a) == "12DCZ"
    # the pool's only server goes away, so the next link happens when a new server has logged in
    with psycopg.connect(p.unix_dsn("pgbouncer", dbname="pgbouncer"), autocommit=True) as console:
        cur = console.execute("SHOW SERVERS")
        col = [d.name for d in cur.description or []].index("remote_pid")
        pids = [row[col] for row in cur.fetchall()]
    assert pids
    for pid in pids:
        cluster.execute("SELECT pg_terminate_backend(%s)", params=[pid])
    time.sleep(0.3)
    a.send(message(b"P", b"abc") + SYNC)  # no NUL anywhere in the Parse body
    try:
        got = read_types(a, b"E")
    except TimeoutError:
        got = "nothing (timed out)"
    except ConnectionError:
        got = "close"
    other = can_query(p, timeout=2)
    a.close()
    assert got in ("E", "close"), f"the malformed client got {got}"
    assert other == "ok", f"another client of the pool: {other}"


def test_error_before_a_faked_parse_complete(pooler: PoolerFactory) -> None:
    p = fuzz_pooler(pooler, default_pool_size=1)
    a = raw_login(p, timeout=4)
    a.send(P(b"s1", b"SELECT 1") + B(b"s1") + EXEC + SYNC)  # 'SELECT 1' is now prepared on the server
    assert read_types(a) == "12DCZ"
    b = raw_login(p, timeout=2)
    # unnamed Parse/Bind/Execute failing at Execute (random(): no constant folding at Bind), then a Parse of
    # the already prepared text (b has no named statement yet, so pgmux forwards it and pins b while it
    # exists), then Sync
    b.send(P(b"", b"SELECT 1/(random()*0)::int") + B(b"") + EXEC + P(b"x", b"SELECT 1") + SYNC)
    try:
        got = read_types(b)
    except (TimeoutError, ConnectionError) as exc:
        got = repr(exc)
    other = can_query(p, timeout=2)
    a.close()
    b.close()
    assert got == "12EZ", f"the client got {got}"
    assert other == "ok", f"another client of the pool: {other}"


def test_untrackable_named_parse_is_refused_without_pinning(pooler: PoolerFactory) -> None:
    """pin_session_state = off: a first named Parse after unsynced messages can be neither tracked
    (messages are in flight) nor pinned; it is refused, and the server goes to the next client clean."""
    p = fuzz_pooler(pooler, default_pool_size=1, pin_session_state="off")
    a = raw_login(p, timeout=4)
    a.send(P(b"", b"SELECT 1") + B(b"") + EXEC + P(b"_pg3_0", b"SELECT 'a''s statement'") + SYNC)
    kind, body = a.read_message()
    while kind != b"E":
        kind, body = a.read_message()
    fields = parse_error_fields(body)
    a.close()
    assert fields.get("C") == "0A000" and "cannot be tracked" in fields.get("M", ""), fields
    b = raw_login(p, timeout=4)
    b.send(P(b"_pg3_0", b"SELECT 'b''s statement'") + B(b"_pg3_0") + EXEC + SYNC)
    assert read_types(b) == "12DCZ"  # no "already exists": a's statement never reached the server
    b.close()


def test_messages_between_an_error_and_sync_do_not_pin_the_server(pooler: PoolerFactory) -> None:
    p = fuzz_pooler(pooler, default_pool_size=1, query_wait_timeout=3)
    a = raw_login(p, timeout=6)
    a.send(P(b"n1", b"SELECT 2") + B(b"n1") + EXEC + SYNC)  # a named statement: tracking on
    assert read_types(a) == "12DCZ"
    a.send(P(b"", b"SELEC 1") + FLUSH)  # libpq pipeline mode: PQsendFlushRequest
    assert read_types(a, b"E") == "E"
    a.send(B(b"") + EXEC + SYNC)  # the aborted pipeline's next query, then the Sync
    assert read_types(a) == "Z"
    assert a.simple_query("SELECT 5") == [("5",)]
    other = can_query(p, timeout=6)  # a is idle: its server must be free for others
    a.close()
    assert other == "ok", f"another client of the pool while the first one idles: {other}"
