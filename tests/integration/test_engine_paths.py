"""The compiled data path (pgmux/engine) with real clients: the fast path is taken, on uvloop and on
the standard asyncio loop, for simple, extended and prepared queries, and for TLS clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster, userlist_text, wait_for
from pgmux.testing.tls import make_ca
from tests.integration.pgwire import PgError, RawConn, parse_error_fields, startup_packet

PoolerFactory = Callable[..., PoolerProcess]

pytestmark = pytest.mark.pgmux_only  # SHOW ENGINE is pgmux's


class StandardLoopPooler(PoolerProcess):
    """pgmux on the standard asyncio event loop (`--no-uvloop`)."""

    def command(self) -> list[str]:
        cmd = super().command()
        return [*cmd[:-1], "--no-uvloop", cmd[-1]]


def engine_counters(p: PoolerProcess) -> dict[str, int]:
    with psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer"), autocommit=True) as admin:
        return {name: int(value) for name, value in admin.execute("SHOW ENGINE", prepare=False).fetchall()}


def admin_userlist(cluster: TempCluster) -> dict[str, str]:
    return {"md5user": "md5pass", "postgres": "adminpass"}


def run_clients(p: PoolerProcess, **kw: Any) -> None:
    """Simple, extended and prepared queries, each in transactions of their own, from two clients."""
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb", **kw), autocommit=True) as a, \
            psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb", **kw), autocommit=True) as b:
        for i in range(200):
            conn = a if i % 2 else b
            assert conn.execute("SELECT 1", prepare=False).fetchone() == (1,)  # simple protocol (no params)
            assert conn.execute("SELECT %s::int + 1", (i,), prepare=False).fetchone() == (i + 1,)  # unnamed
            assert conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone() == (i * 2,)  # named
        with a.transaction():
            a.execute("CREATE TEMP TABLE IF NOT EXISTS t_engine (x int)")  # pinning: escapes to Python
        assert a.execute("SELECT 40 + 2").fetchone() == (42,)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_fast_path_serves_simple_extended_and_prepared(cluster: TempCluster, pooler: PoolerFactory,
                                                        loop: str) -> None:
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster), extra={"default_pool_size": 1},
               process_class=StandardLoopPooler if loop == "asyncio" else PoolerProcess)
    before = engine_counters(p)
    run_clients(p)
    after = engine_counters(p)
    fast = after["fast_reads"] - before["fast_reads"]
    escapes = after["escapes"] - before["escapes"]
    # 600 round trips each way went through the engine; almost all of them natively
    assert fast >= 1000, after
    assert escapes < 60, after
    # under uvloop the engine holds the loop while it is busy (Engine.enable_hold); asyncio: never
    assert after["loop_held"] == (loop == "uvloop"), after
    if loop == "asyncio":
        assert after["holds"] == 0, after


def test_tls_clients_take_the_fast_path(cluster: TempCluster, pooler: PoolerFactory, tmp_path: Any) -> None:
    cert, key = make_ca(tmp_path).issue_server(tmp_path)
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster),
               extra={"default_pool_size": 1, "client_tls_sslmode": "require", "client_tls_cert_file": str(cert),
                      "client_tls_key_file": str(key)})
    before = engine_counters_tls(p)
    run_clients(p, sslmode="require")
    after = engine_counters_tls(p)
    assert after["fast_reads"] - before["fast_reads"] >= 1000, after
    # the records of those TLS links were read and written by OpenSSL from C (pgmux/engine/_ossl.pyx)
    assert after["tls_native"] - before["tls_native"] >= 2 and after["tls_python"] == 0, after


def engine_counters_tls(p: PoolerProcess) -> dict[str, int]:
    with psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer", sslmode="require"),
                         autocommit=True) as admin:
        return {name: int(value) for name, value in admin.execute("SHOW ENGINE", prepare=False).fetchall()}


def test_pgbench_through_the_engine(cluster: TempCluster, pooler: PoolerFactory, pgbench_tables: None) -> None:
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster), extra={"default_pool_size": 2})
    env = dict(os.environ, PGPASSWORD="md5pass")
    for mode in ("simple", "extended", "prepared"):
        out = subprocess.run(["pgbench", "-S", "-M", mode, "-c", "8", "-t", "200", "-h", p.host, "-p", str(p.port),
                              "-U", "md5user", "testdb"], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "number of failed transactions: 0" in out.stdout, out.stdout
    counters = engine_counters(p)
    assert counters["fast_reads"] >= 3 * 8 * 200, counters


def test_md5_logins_are_read_in_c(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """A plain client's StartupMessage and md5 answer are read by the engine (Engine._login_read):
    right and wrong passwords get what Python's login says; SCRAM, a GSSENC/SSL request answered N,
    and bytes beyond what the login waits for go on in Python's login."""
    # scramuser's auth_file secret is a SCRAM one: its md5-method login is a SCRAM exchange (Python)
    p = pooler(pool_mode="transaction",
               userlist={**admin_userlist(cluster), "scramuser": cluster.role_secret("scramuser")})
    before = engine_counters(p)
    for _ in range(5):
        with psycopg.connect(p.dsn("md5user", "md5pass", dbname="testdb"), sslmode="disable") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(p.dsn("md5user", "wrong", dbname="testdb"), sslmode="disable")
    after = engine_counters(p)
    assert after["c_logins"] - before["c_logins"] == 6, after
    assert after["login_escapes"] == before["login_escapes"], after

    with psycopg.connect(p.dsn("scramuser", "scrampass", dbname="testdb"), sslmode="prefer") as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)  # SSLRequest answered N in C, SCRAM in Python
    for request in (80877104, 80877103):  # GSSENCRequest, SSLRequest: N, then the login in C
        with RawConn(p.host, p.port) as raw:
            raw.send(struct.pack("!II", 8, request))
            assert raw._recv_exact(1) == b"N"
            raw.login("md5user", "testdb", "md5pass")
            assert raw.simple_query("SELECT 3") == [("3",)]
    with RawConn(p.host, p.port) as raw:  # a Terminate glued to the StartupMessage: Python's login reads it
        raw.send(startup_packet({"user": "md5user", "database": "testdb"}) + b"X\0\0\0\x04")
        kinds = [kind for kind, _ in raw.read_until_close()]
        assert kinds == [b"R", b"E"], kinds
    last = engine_counters(p)
    assert last["c_logins"] - after["c_logins"] == 2, last
    assert last["login_escapes"] - after["login_escapes"] == 1, last


def test_login_routes_repeat_a_login_and_its_checks(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """A StartupMessage byte for byte like an earlier md5 or SCRAM login's goes straight to the
    exchange (Engine.login_routes): the password is still checked, and so is everything that may
    change between two logins (max_client_conn, DISABLE); a RELOAD forgets the routes, so a user
    taken out of auth_file is refused even though its packet is the same."""
    p = pooler(pool_mode="transaction", extra={"max_client_conn": 2},
               userlist={**admin_userlist(cluster), "scramuser": cluster.role_secret("scramuser")})

    def login(password: str, raw: RawConn | None = None, user: str = "md5user") -> RawConn:
        raw = raw or RawConn(p.host, p.port)
        raw.login(user, "testdb", password, application_name="routes")
        return raw

    def refused(password: str, user: str = "md5user") -> str:
        """The error the login gets ("" when it succeeds)."""
        with RawConn(p.host, p.port) as raw:
            try:
                login(password, raw, user)
            except PgError as err:
                return err.fields["M"]
        return ""

    before = engine_counters(p)
    for user, password in (("md5user", "md5pass"), ("scramuser", "scrampass")):
        for _ in range(3):
            with login(password, user=user) as raw:
                assert raw.simple_query("SELECT 1") == [("1",)]
        assert refused("wrong", user) == "password authentication failed"
    after = engine_counters(p)
    assert after["route_logins"] - before["route_logins"] == 6, after  # the first of each made the route
    with login("md5pass"), login("md5pass"):  # max_client_conn = 2
        assert refused("md5pass") == "no more connections allowed (max_client_conn)"
    with psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer"), autocommit=True) as admin:
        admin.execute("DISABLE testdb", prepare=False)
        assert refused("md5pass") == 'database "testdb" is disabled'
        admin.execute("ENABLE testdb", prepare=False)
    with login("md5pass") as raw:
        assert raw.simple_query("SELECT 2") == [("2",)]
    # Only a login whose password was right makes a route: after a wrong one, the first right one
    # with the same packet still goes the whole way.
    for password, routed in (("wrong", 0), ("md5pass", 0), ("md5pass", 1)):
        before = engine_counters(p)["route_logins"]
        with RawConn(p.host, p.port) as raw:
            try:
                raw.login("md5user", "testdb", password, application_name="unrouted")
            except PgError:
                pass
        assert engine_counters(p)["route_logins"] - before == routed, password
    p.rewrite_config(userlist_text=userlist_text({"postgres": "adminpass"}))
    p.reload()  # (a route that outlived it would let md5user in with its old secret: timeout here)
    wait_for(lambda: refused("md5pass") == "password authentication failed", 10, what="the RELOAD")
    routed = engine_counters(p)["route_logins"]
    assert refused("md5pass") == "password authentication failed"
    assert engine_counters(p)["route_logins"] == routed, "a route outlived the RELOAD"


def scram_final(password: str, first: bytes, server_first: bytes, extra: bytes = b"", nonce: bytes = b"") -> bytes:
    """A client-final-message (RFC 5802) after `first` (gs2 header included), with `extra`
    attributes before the proof, for the server's nonce or `nonce` instead."""
    attrs = dict(item.split(b"=", 1) for item in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=" + base64.b64encode(first[:3]) + b",r=" + (nonce or attrs[b"r"]) + extra
    signature = hmac.digest(hashlib.sha256(client_key).digest(), first[3:] + b"," + server_first + b"," + without_proof,
                            "sha256")
    return without_proof + b",p=" + base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))


def scram_login(raw: RawConn, first: bytes, final: Callable[[bytes], bytes]) -> tuple[bytes, str]:
    """A SCRAM login of scramuser with the client-first-message `first` and the final message
    `final` makes of the server-first-message: how it ends (b"Z" ReadyForQuery, b"E" an error)
    and the error's message."""
    raw.send(startup_packet({"user": "scramuser", "database": "testdb"}))
    kind, body = raw.read_message()
    assert kind == b"R" and body[:4] == struct.pack("!i", 10), (kind, body)
    raw.send(b"p" + struct.pack("!i", 4 + 14 + 4 + len(first)) + b"SCRAM-SHA-256\0" + struct.pack("!i", len(first))
             + first)
    kind, body = raw.read_message()
    if kind == b"E":
        return kind, parse_error_fields(body)["M"]
    assert kind == b"R" and body[:4] == struct.pack("!i", 11), (kind, body)
    raw.send(b"p" + struct.pack("!i", 4 + len(final(body[4:]))) + final(body[4:]))
    while True:
        kind, body = raw.read_message()
        if kind == b"Z":
            return kind, ""
        if kind == b"E":
            return kind, parse_error_fields(body)["M"]


def test_scram_exchange_in_c_hands_unusual_messages_to_python(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """The engine runs the plain SCRAM exchange against a stored secret in C; a message in another
    form (an extension, a nonce that does not match) goes to Python's exchange, which answers it
    as always: the login goes on, or fails with Python's words."""
    p = pooler(pool_mode="transaction",
               userlist={**admin_userlist(cluster), "scramuser": cluster.role_secret("scramuser")})
    nonce = base64.b64encode(os.urandom(18))
    plain, with_extension = b"n,,n=,r=" + nonce, b"n,,n=,r=" + nonce + b",x=1"
    cases = [  # client-first, final, what the client gets, (C exchanges, hand-overs) it makes
        (plain, lambda sf: scram_final("scrampass", plain, sf), b"Z", (1, 0)),
        (with_extension, lambda sf: scram_final("scrampass", with_extension, sf), b"Z", (0, 1)),
        (plain, lambda sf: scram_final("scrampass", plain, sf, extra=b",x=2"), b"Z", (0, 1)),
        (plain, lambda sf: scram_final("scrampass", plain, sf, nonce=nonce + b"x"), b"E", (0, 1)),
        (plain, lambda sf: scram_final("wrong", plain, sf), b"E", (1, 0)),
    ]
    for first, final, last, (in_c, handed) in cases:
        before = engine_counters(p)
        with RawConn(p.host, p.port) as raw:
            end, error = scram_login(raw, first, final)
            assert end == last, error
            if last == b"Z":
                assert raw.simple_query("SELECT 1") == [("1",)]
            else:
                assert error == ("SASL authentication failed" if handed else "password authentication failed"), error
        after = engine_counters(p)
        assert (after["c_scram_logins"] - before["c_scram_logins"],
                after["login_escapes"] - before["login_escapes"]) == (in_c, handed), (first, after)


def test_login_routes_follow_a_console_set_that_fails_to_apply(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """A console SET keeps the new setting even when applying it fails (here auth_type = hba with
    no auth_hba_file): no route made before may then skip what the new setting decides."""
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster))

    def login() -> str:
        with RawConn(p.host, p.port) as raw:
            try:
                raw.login("md5user", "testdb", "md5pass", application_name="set")
            except PgError as err:
                return err.fields["M"]
        return ""

    assert login() == login() == ""  # the second one took the route
    with psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer"), autocommit=True) as admin:
        admin.execute("SET auth_type = 'hba'", prepare=False)
    assert login() == "login rejected"


def test_no_login_route_under_hba(cluster: TempCluster, pooler: PoolerFactory) -> None:
    """Under auth_type = hba a rule depends on where a login comes from: an md5 login over the
    Unix socket makes no route that a byte-identical login over TCP, which a rule rejects, could
    take."""
    p = pooler(pool_mode="transaction", userlist=admin_userlist(cluster),
               extra={"auth_type": "hba", "auth_hba_file": "hba.conf"}, start=False)
    Path(p.workdir, "hba.conf").write_text("local all all md5\nhost all all 127.0.0.1/32 reject\n")
    p.start()
    assert p.unix_socket_path is not None

    def login() -> str:
        """Over the Unix socket, then over TCP: the error of each login ("" when it succeeds)."""
        errors = []
        for unix in (True, False):
            with RawConn(p.host, p.port) as raw:
                if unix:
                    raw.sock.close()
                    raw.sock = socket.socket(socket.AF_UNIX)
                    raw.sock.connect(p.unix_socket_path)
                try:
                    raw.login("md5user", "testdb", "md5pass")
                    errors.append("")
                except PgError as err:
                    errors.append(err.fields["M"])
        return " / ".join(errors)

    for _ in range(3):
        assert login() == " / login rejected"
