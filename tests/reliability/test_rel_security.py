"""Security: secrets never leak, clients cannot touch each other, the console obeys its access rules.

* passwords, md5 hashes and SCRAM secrets appear neither in the log (run at -v -v, i.e. with debug
  logging) nor in any SHOW output of the admin console, after good and bad md5 and SCRAM logins and a
  server login with a [databases] password;
* secret comparisons are constant-time (hmac.compare_digest, checked in the source);
* cancel keys are random, unique, and never PostgreSQL's own; a CancelRequest with a wrong key does
  nothing; a cancel can only hit the query of the client that sent it;
* many clients sharing few servers (transaction mode, protocol-level prepared statements with the same
  names) each get exactly their own results;
* users outside admin_users cannot run console control commands, and the refused commands have no effect.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import inspect
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from helpers_tx import raw_login
from pgwire import RawConn, message, parse_error_fields, startup_packet

from pgmux.protocol.messages import cancel_request
from pgmux.testing.cluster import PoolerProcess, TempCluster
from pgmux.testing.faultproxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

PoolerFactory = Callable[..., PoolerProcess]

WRONG_MD5 = "Wr0ngSecret-md5-7d1f"
WRONG_SCRAM = "Wr0ngSecret-scram-9c2e"


def console(p: PoolerProcess) -> psycopg.Connection:
    return psycopg.connect(p.unix_dsn("pgbouncer", dbname="pgbouncer"), autocommit=True)


def every_show(p: PoolerProcess) -> str:
    """The text of every SHOW the console has (SHOW FDS is refused by pgmux)."""
    out = []
    with console(p) as c:
        for what in ("config", "users", "databases", "pools", "clients", "servers", "sockets", "active_sockets",
                     "stats", "stats_totals", "stats_averages", "totals", "lists", "peers", "peer_pools", "mem",
                     "dns_hosts", "dns_zones", "state", "version", "pins"):
            try:
                cur = c.execute(f"SHOW {what}")
                out.append(f"{what}: {[d.name for d in cur.description or []]} {cur.fetchall()}")
            except psycopg.Error as exc:
                out.append(f"{what}: error {exc}")
    return "\n".join(out)


def secret_forms(cluster: TempCluster) -> dict[str, str]:
    """Every spelling of a secret that must never be shown: passwords, md5 hashes, SCRAM secret parts."""
    forms = {
        "md5user password": "md5pass",
        "scramuser password": "scrampass",
        "wrong md5 password": WRONG_MD5,
        "wrong SCRAM password": WRONG_SCRAM,
        "md5 hash of md5pass": "md5" + hashlib.md5(b"md5passmd5user").hexdigest(),
    }
    scram = cluster.role_secret("scramuser")  # SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>
    forms["SCRAM secret"] = scram
    _, rest = scram.split("$", 1)
    salt_part, keys = rest.split("$")
    stored, server = keys.split(":")
    forms["SCRAM salt"] = salt_part.split(":")[1]
    forms["SCRAM StoredKey"] = stored
    forms["SCRAM ServerKey"] = server
    for name in ("SCRAM StoredKey", "SCRAM ServerKey"):
        forms[name + " (hex)"] = base64.b64decode(forms[name]).hex()
    return forms


def test_secrets_never_in_log_or_console(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = pooler(
        pool_mode="transaction",
        databases={"testdb": "host={host} port={port} dbname=testdb",
                   "forced": "host={host} port={port} dbname=testdb user=md5user password=md5pass"},
        extra={"verbose": 1, "log_connections": 1, "log_disconnections": 1, "log_pooler_errors": 1},
    )
    attempts = [
        ("md5user", "md5pass", "testdb", True),
        ("md5user", WRONG_MD5, "testdb", False),
        ("scramuser", "scrampass", "testdb", True),  # server login by SCRAM pass-through
        ("scramuser", WRONG_SCRAM, "testdb", False),
        ("md5user", "md5pass", "forced", True),  # server login with the [databases] password
        ("nosuchuser", WRONG_MD5, "testdb", False),
    ]
    for user, password, db, ok in attempts:
        try:
            with psycopg.connect(p.dsn(user, password, db), autocommit=True, connect_timeout=5) as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
            assert ok, f"{user} logged in with a wrong password"
        except psycopg.OperationalError as exc:
            assert not ok, f"{user}: {exc}"
            assert "password authentication failed" in str(exc) or "SASL authentication failed" in str(exc), exc
    shown = every_show(p)
    log = p.log_text()
    assert "DEBUG" in log or "LOG" in log
    leaks = {name: where for name, form in secret_forms(cluster).items()
             for where, text in (("log", log), ("console", shown)) if form in text}
    assert not leaks, f"secrets leaked: {leaks}"
    print(f"\n  checked {len(secret_forms(cluster))} secret forms against {len(log)} bytes of -v -v log and "
          f"{len(shown)} bytes of SHOW output: none found")


def test_secret_comparisons_are_constant_time() -> None:
    """No == / != between secret-looking values in pgmux/auth (only hmac.compare_digest), and every
    verifier uses compare_digest."""
    secretish = re.compile(r"proof|digest|key|secret|password|signature|response|nonce|stored|hash", re.I)
    harmless = re.compile(r"\.iterations\b|\.method\b|\bkind\b|\bcode\b|\bmechanism")
    root = Path(__file__).resolve().parents[2] / "pgmux" / "auth"
    offenders = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops)):
                continue
            parts = [node.left, *node.comparators]
            if any(isinstance(x, ast.Constant) for x in parts):
                continue  # compared with a literal: a type tag, not secret material
            if any(isinstance(x, ast.Call) and getattr(x.func, "id", "") == "len" for x in parts):
                continue
            src = ast.get_source_segment(text, node) or ""
            if secretish.search(src) and not harmless.search(src):
                offenders.append(f"{path.name}:{node.lineno}: {src}")
    assert not offenders, offenders
    from pgmux.auth import md5_verify, plain_verify
    from pgmux.auth import scram as scram_mod

    for fn in (md5_verify, plain_verify):
        assert "compare_digest" in inspect.getsource(fn), fn.__name__
    assert inspect.getsource(scram_mod).count("compare_digest") >= 3


# --------------------------------------------------------------------------------------------------
# cancel requests


def send_cancel(host: str, port: int, pid: int, key: int) -> None:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(cancel_request(pid, key))
        s.settimeout(5)
        try:
            s.recv(16)  # pgmux closes without answering
        except OSError:
            pass


def outcome_of(c: RawConn) -> str:
    kinds, err = [], None
    while True:
        kind, body = c.read_message()
        kinds.append(kind)
        if kind == b"E":
            err = body
        if kind == b"Z":
            break
    if err is not None:
        fields = parse_error_fields(err)
        return f"error {fields.get('C')}: {fields.get('M')}"
    return "ok"


def test_cancel_keys_are_random_unique_and_not_postgres(cluster: TempCluster, pooler: PoolerFactory) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 2, "max_client_conn": 300})
    conns = [raw_login(p) for _ in range(200)]
    try:
        keys = [struct.pack("!ii", *c.backend_key) for c in conns]
        conns[0].simple_query("SELECT 1")
        real = {r[0] for r in cluster.execute("SELECT pid FROM pg_stat_activity WHERE usename = 'md5user'")}
    finally:
        for c in conns:
            c.close()
    assert len(set(keys)) == len(keys), "duplicate cancel keys"
    assert all(k[0] < 0x80 for k in keys), "the first byte's sign bit must be clear"
    pids = {struct.unpack("!i", k[:4])[0] for k in keys}
    assert not pids & real, "a client was given a real backend pid"
    ints = [int.from_bytes(k, "big") for k in keys]
    for bit in range(63):
        share = sum(1 for v in ints if v >> bit & 1) / len(ints)
        assert 0.3 < share < 0.7, f"bit {bit} of the cancel keys is set in {share:.0%} of them: not random"
    diffs = {b - a for a, b in zip(sorted(ints), sorted(ints)[1:], strict=False)}
    assert len(diffs) > 190, "cancel keys look sequential"


def test_cancel_with_a_wrong_key_does_nothing(pooler: PoolerFactory) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 2})
    victim, other = raw_login(p), raw_login(p)
    try:
        pid, key = victim.backend_key
        victim.send(message(b"Q", b"SELECT pg_sleep(1.5)\0"))
        time.sleep(0.1)
        rng = random.Random()
        start = time.monotonic()
        tries = 0
        while time.monotonic() - start < 1.0:
            guess = rng.getrandbits(31) * rng.choice((1, -1))
            if guess != key:
                send_cancel(p.host, p.port, pid, guess)  # the right pid, a wrong key
                send_cancel(p.host, p.port, rng.getrandbits(31), rng.getrandbits(31))
                tries += 2
        send_cancel(p.host, p.port, *other.backend_key)  # a real key, of an idle client
        assert outcome_of(victim) == "ok", "a wrong-key cancel cancelled the query"
        # and the right key does cancel
        victim.send(message(b"Q", b"SELECT pg_sleep(5)\0"))
        time.sleep(0.2)
        t0 = time.monotonic()
        send_cancel(p.host, p.port, pid, key)
        got = outcome_of(victim)
        assert got.startswith("error 57014"), got
        assert time.monotonic() - t0 < 2
        print(f"\n  {tries} wrong-key cancel requests in 1 s: no effect; the right key cancels")
    finally:
        victim.close()
        other.close()


def test_cancel_cannot_hit_the_next_client_of_the_server(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """Deterministic through the fault proxy: cancel connections to PostgreSQL are slowed down by 0.6 s,
    so A's cancel arrives after A's query ended and the server went to B."""
    with FaultProxy(cluster.port) as proxy:
        p = pooler(pool_mode="transaction", databases={"testdb": f"host=127.0.0.1 port={proxy.port} dbname=testdb"},
                   extra={"default_pool_size": 1, "cancel_wait_timeout": 5})
        a, b = raw_login(p), raw_login(p)
        try:
            assert a.simple_query("SELECT 1") == [("1",)]  # the pool's one server is open
            proxy.delay(0.6, new_only=True)  # only new connections: the cancel request's
            a.send(message(b"Q", b"SELECT pg_sleep(0.3)\0"))
            time.sleep(0.05)
            b.send(message(b"Q", b"SELECT pg_sleep(1.5)\0"))  # waits for the server A holds
            time.sleep(0.1)
            send_cancel(p.host, p.port, *a.backend_key)  # A cancels its own query
            held = []  # the console while the cancel is on its way: the server is held, not given to B
            with psycopg.connect(p.unix_dsn("pgbouncer", dbname="pgbouncer"), autocommit=True) as console:
                deadline = time.monotonic() + 0.8
                while time.monotonic() < deadline:
                    cur = console.execute("SHOW POOLS")
                    cols = [d.name for d in cur.description or []]
                    held += [row[cols.index("sv_being_canceled")] for row in cur.fetchall()
                             if row[cols.index("database")] == "testdb"]
                    time.sleep(0.02)
            a_got, b_got = outcome_of(a), outcome_of(b)
        finally:
            a.close()
            b.close()
    print(f"\n  A (cancelled its own query): {a_got}; B (never cancelled anything): {b_got}; "
          f"SHOW POOLS sv_being_canceled seen: {max(held, default=0)}")
    assert b_got == "ok", f"B's query was cancelled by A's cancel request: {b_got}"
    assert max(held, default=0) == 1, "SHOW POOLS never showed the server held for the cancel"


# --------------------------------------------------------------------------------------------------
# isolation of results


def test_clients_only_ever_see_their_own_results(pooler: PoolerFactory) -> None:
    """12 clients over 3 servers for 3 s, mixing simple and extended queries, explicit transactions and
    protocol-level prepared statements that every client names alike (psycopg's _pg3_0, ...) but with
    different texts: every answer carries the client's own token."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 3})
    dsn = p.dsn("md5user", "md5pass")
    errors: list[str] = []
    counts = [0] * 12
    stop = time.monotonic() + 3

    def worker(i: int) -> None:
        rng = random.Random(i)
        prepare = 0 if i % 2 else None  # half of them prepare every statement, with the same names
        try:
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=prepare) as c:
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    token = i * 10_000_000 + n
                    kind = rng.randrange(4)
                    if kind == 0:
                        got = c.execute(f"SELECT {token}::bigint").fetchone()[0]
                    elif kind == 1:
                        got = c.execute("SELECT %s::bigint", [token]).fetchone()[0]
                    elif kind == 2:
                        got = c.execute(f"SELECT %s::bigint + {i}", [token]).fetchone()[0] - i
                    else:
                        with c.transaction():
                            c.execute("SELECT %s::bigint", [0]).fetchone()
                            got = c.execute("SELECT %s::bigint", [token]).fetchone()[0]
                    if got != token:
                        errors.append(f"client {i} expected {token}, got {got}")
                    counts[i] += 1
        except psycopg.Error as exc:
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    print(f"\n  {sum(counts)} queries by 12 clients over 3 servers, all answered with their own token")
    assert not errors, errors[:5]
    assert min(counts) > 10


# --------------------------------------------------------------------------------------------------
# the console


CONTROL_COMMANDS = ["PAUSE", "PAUSE testdb", "RESUME", "SUSPEND", "DISABLE testdb", "ENABLE testdb", "KILL testdb",
                    "KILL_CLIENT 1", "RECONNECT", "RELOAD", "WAIT_CLOSE", "SET default_pool_size = 1",
                    "SHOW FDS", "SHUTDOWN"]


@pytest.mark.parametrize("auth_type", ["any", "md5"])
def test_non_admins_cannot_control_the_console(pooler: PoolerFactory, auth_type: str) -> None:
    """With auth_type=any everybody reaches the console, but only admin_users may change anything; with md5 a
    user in stats_users only reads, and a plain user is not let in at all. Refused commands have no effect."""
    p = pooler(pool_mode="transaction", auth_type=auth_type,
               extra={"admin_users": "postgres", "stats_users": "scramuser" if auth_type == "md5" else ""})
    user, password = ("md5user", "md5pass") if auth_type == "any" else ("scramuser", "scrampass")
    if auth_type == "md5":
        with pytest.raises(psycopg.OperationalError, match="not allowed"):
            psycopg.connect(p.dsn("md5user", "md5pass", "pgbouncer"), connect_timeout=5)
    refused = []
    with psycopg.connect(p.dsn(user, password, "pgbouncer"), autocommit=True, connect_timeout=5) as c:
        for command in CONTROL_COMMANDS:
            with pytest.raises(psycopg.Error) as exc_info:
                c.execute(command)
            assert "admin access needed" in str(exc_info.value) or "not supported" in str(exc_info.value), (
                command, str(exc_info.value))
            refused.append(command)
        assert c.execute("SHOW VERSION").fetchone()  # reading is allowed, the session goes on
    # nothing happened: not paused, not disabled, not killed, not shut down, setting unchanged
    assert p.is_running()
    if auth_type == "md5":  # (auth_type=any lets clients in only to databases with a forced user)
        with psycopg.connect(p.dsn("md5user", "md5pass"), autocommit=True, connect_timeout=5) as app:
            assert app.execute("SELECT 1").fetchone() == (1,)
    with console(p) as admin:
        cfg = {r[0]: r[1] for r in admin.execute("SHOW CONFIG").fetchall()}
        assert cfg["default_pool_size"] == "20"
        dbs = {r[0]: r for r in admin.execute("SHOW DATABASES").fetchall()}
        cols = [d.name for d in admin.execute("SHOW DATABASES").description]
        row = dict(zip(cols, dbs["testdb"], strict=True))
        assert not row["paused"] and not row["disabled"], row
    print(f"\n  {auth_type}: {len(refused)} control commands refused to {user}, none took effect")


def test_auth_type_any_needs_a_forced_user(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """auth_type=any takes any user name without a password, so PgBouncer allows it only for databases
    with a forced user: elsewhere a client (even one calling itself postgres) gets 'bouncer config error'."""
    p = pooler(pool_mode="transaction", auth_type="any", databases={
        "testdb": "host={host} port={port} dbname=testdb",
        "forced": "host={host} port={port} dbname=testdb user=md5user password=md5pass",
    })
    for user in ("postgres", "md5user", "nosuchuser"):
        with pytest.raises(psycopg.OperationalError, match="bouncer config error"):
            psycopg.connect(p.dsn(user, None, "testdb"), connect_timeout=5)
    with psycopg.connect(p.dsn("postgres", None, "forced"), autocommit=True, connect_timeout=5) as c:
        assert c.execute("SELECT current_user").fetchone() == ("md5user",)
    assert "auth_type=any requires forced user" in p.log_text()


def test_unauthenticated_client_cannot_make_pgmux_buffer_a_huge_message(pooler: PoolerFactory) -> None:
    """A password message that claims 1 GB is refused from its header (PostgreSQL's limit for an
    auth message is 64 KiB), not buffered while the client streams it; other clients carry on."""
    p = pooler(pool_mode="transaction")
    with RawConn(p.host, p.port) as raw:
        raw.send(startup_packet({"user": "md5user", "database": "testdb"}))
        kind, _ = raw.read_message()
        assert kind == b"R"  # the md5 challenge
        raw.send(b"p" + struct.pack("!i", 1_000_000_000))
        with contextlib.suppress(OSError):  # pgmux may close while we still send
            for _ in range(8):
                raw.send(b"x" * (1 << 20))
        answer = raw.read_until_close()
    errors = [parse_error_fields(body) for kind, body in answer if kind == b"E"]
    assert errors and errors[0]["C"] == "08P01" and "bad packet header" in errors[0]["M"], answer
    with psycopg.connect(p.dsn("md5user", "md5pass"), autocommit=True, connect_timeout=5) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
