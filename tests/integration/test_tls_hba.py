"""TLS on both sides, HBA rules and certificate login, with certificates made in the test run."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from pgwire import RawConn

from pgmux.testing.cluster import PoolerProcess, TempCluster, chown_service_user
from pgmux.testing.tls import CA, make_ca, make_other_ca

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def certs() -> Iterator[dict[str, Any]]:
    d = tempfile.mkdtemp(prefix="pgmux-tls-")
    os.chmod(d, 0o755)
    ca = make_ca(d)
    cert, key = ca.issue_server(d)
    alice = ca.issue_client(d, "alice")
    md5c = ca.issue_client(d, "md5user")
    other = make_other_ca(d)
    chown_service_user(d)  # PgBouncer (the oracle) runs as postgres
    yield {"dir": d, "ca": ca, "cert": str(cert), "key": str(key), "alice": alice, "md5user": md5c,
           "other_ca": other}


def tls_extra(certs: dict[str, Any], mode: str = "require") -> dict[str, str]:
    return {"client_tls_sslmode": mode, "client_tls_cert_file": certs["cert"], "client_tls_key_file": certs["key"],
            "client_tls_ca_file": str(certs["ca"].cert_path)}


def test_verify_full_clients(certs: dict[str, Any], pooler: Any) -> None:
    p = pooler(extra=tls_extra(certs))
    ca = str(certs["ca"].cert_path)
    with psycopg.connect(p.dsn("md5user", "md5pass", host="localhost", sslmode="verify-full", sslrootcert=ca)) as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("SELECT 1").fetchone() == (1,)
    out = subprocess.run(["psql", p.dsn("md5user", "md5pass", host="localhost", sslmode="verify-full",
                                        sslrootcert=ca), "-Atc", "SELECT 42"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr

    async def via_asyncpg() -> int:
        ctx = ssl.create_default_context(cafile=ca)
        conn = await asyncpg.connect(host="localhost", port=p.port, user="md5user", password="md5pass",
                                     database="testdb", ssl=ctx)
        try:
            return await conn.fetchval("SELECT 7")
        finally:
            await conn.close()

    assert asyncio.run(via_asyncpg()) == 7


def test_require_refuses_plain_clients(certs: dict[str, Any], pooler: Any) -> None:
    p = pooler(extra=tls_extra(certs))
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(p.dsn("md5user", "md5pass", sslmode="disable"))


def test_bytes_glued_after_ssl_request_are_refused(certs: dict[str, Any], pooler: Any,
                                                   cluster: TempCluster) -> None:
    """CVE-2021-23214 class: a StartupMessage sent in the clear right after SSLRequest must not be
    read as if it had come through TLS; the connection is closed and nothing reaches PostgreSQL."""
    p = pooler(extra=tls_extra(certs, "prefer"))
    before = cluster.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'md5user'")[0][0]
    params = b"user\0md5user\0database\0testdb\0\0"
    startup = struct.pack("!ii", 8 + len(params), 196608) + params
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(struct.pack("!ii", 8, 80877103) + startup)
        data = b""
        try:
            while chunk := s.recv(1024):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"S" not in data[:1]  # never answered with a TLS go-ahead
    after = cluster.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'md5user'")[0][0]
    assert after <= before


@pytest.fixture(scope="module")
def tls_cluster(certs: dict[str, Any]) -> Iterator[TempCluster]:
    """A second PostgreSQL with ssl = on and the test CA's server certificate."""
    d = Path(tempfile.mkdtemp(prefix="pgmux-pgtls-"))
    for name in ("cert", "key"):
        target = d / f"server.{name}"
        target.write_bytes(Path(certs[name]).read_bytes())
        os.chmod(target, 0o600)
    chown_service_user(d)
    settings = {"ssl": "on", "ssl_cert_file": f"'{d / 'server.cert'}'", "ssl_key_file": f"'{d / 'server.key'}'"}
    with TempCluster(settings=settings) as c:  # started, stopped at the end
        c.create_test_roles()
        yield c


def _server_tls_pooler(pooler: Any, tls_cluster: TempCluster, certs: dict[str, Any], ca: CA | Path,
                       mode: str, **extra: Any) -> PoolerProcess:
    ca_file = ca if isinstance(ca, Path) else ca.cert_path
    return pooler(databases={"testdb": f"host=localhost port={tls_cluster.port} dbname=testdb"},
                  userlist={"md5user": "md5pass"},
                  extra={"server_tls_sslmode": mode, "server_tls_ca_file": str(ca_file), "admin_users": "md5user",
                         **extra})


@pytest.mark.pgmux_only
def test_server_tls_verify_full(pooler: Any, tls_cluster: TempCluster, certs: dict[str, Any]) -> None:
    p = _server_tls_pooler(pooler, tls_cluster, certs, certs["ca"], "verify-full")
    with psycopg.connect(p.dsn("md5user", "md5pass")) as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        # a result of many TLS records from the server, read by OpenSSL from C (pgmux/engine/_ossl.pyx)
        rows = c.execute("SELECT repeat('x', 1000) FROM generate_series(1, 2000)").fetchall()
        assert len(rows) == 2000 and rows[-1][0] == "x" * 1000
    with psycopg.connect(p.dsn("md5user", "md5pass", dbname="pgbouncer"), autocommit=True) as admin:
        engine = dict(admin.execute("SHOW ENGINE", prepare=False).fetchall())
    assert int(engine["tls_native"]) >= 1 and int(engine["tls_python"]) == 0, engine


@pytest.mark.pgmux_only
def test_server_tls_wrong_ca_fails_clearly(pooler: Any, tls_cluster: TempCluster, certs: dict[str, Any]) -> None:
    """A failed handshake is a failed connect, as in PgBouncer: the pool's first client waits for
    the retries until client_login_timeout (server down); the log says why."""
    p = _server_tls_pooler(pooler, tls_cluster, certs, certs["other_ca"], "verify-full",
                           client_login_timeout=2, server_login_retry=1)
    with pytest.raises(psycopg.OperationalError, match=r"client_login_timeout \(server down\)"):
        psycopg.connect(p.dsn("md5user", "md5pass"), connect_timeout=10)
    assert re.search("server login failed: server TLS handshake failed.*certificate verify failed", p.log_text())


HBA = """\
# type  database  user       address        method
host    testdb    md5user    127.0.0.1/32   md5
host    postgres  md5user    127.0.0.1/32   reject
host    all       scramuser  127.0.0.0/8    scram-sha-256
hostssl all       alice      127.0.0.1/32   cert map=certmap
hostssl all       md5user    ::1/128        cert
"""
IDENT = "certmap alice md5user\n"


@pytest.mark.pgmux_only
@pytest.mark.parametrize(
    ("user", "password", "dbname", "allowed"),
    [
        ("md5user", "md5pass", "testdb", True),
        ("md5user", "md5pass", "postgres", False),   # explicit reject
        ("scramuser", "scrampass", "postgres", True),
        ("scramuser", "wrong", "postgres", False),   # rule allows, password does not
        ("trustuser", "", "testdb", False),          # no rule at all
    ],
)
def test_hba_rules_as_written(pooler: Any, user: str, password: str, dbname: str, allowed: bool) -> None:
    workdir_files = {"hba.conf": HBA, "ident.conf": IDENT}
    p = pooler(extra={"auth_type": "hba", "auth_hba_file": "hba.conf", "auth_ident_file": "ident.conf"},
               start=False)
    for name, text in workdir_files.items():
        Path(p.workdir, name).write_text(text)
    p.start()
    dsn = p.dsn(user, password or None, dbname=dbname)
    if allowed:
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT current_user").fetchone() == (user,)
    else:
        with pytest.raises(psycopg.OperationalError, match="login rejected|authentication failed|password"):
            psycopg.connect(dsn)


@pytest.mark.pgmux_only
def test_certificate_login_maps_names(pooler: Any, certs: dict[str, Any]) -> None:
    p = pooler(extra={**tls_extra(certs, "verify-ca"), "auth_type": "hba", "auth_hba_file": "hba.conf",
                      "auth_ident_file": "ident.conf"}, start=False)
    Path(p.workdir, "hba.conf").write_text("hostnossl all all 127.0.0.1/32 reject\n"
                                           "hostssl   all md5user 127.0.0.1/32 cert map=certmap\n")
    Path(p.workdir, "ident.conf").write_text(IDENT)
    p.start()
    ca = str(certs["ca"].cert_path)
    cert, key = certs["alice"]
    with psycopg.connect(p.dsn("md5user", None, dbname="postgres", host="localhost", sslmode="verify-full",
                               sslrootcert=ca, sslcert=str(cert), sslkey=str(key))) as c:
        assert c.execute("SELECT current_user").fetchone() == ("md5user",)
    other_cert, other_key = certs["md5user"]  # CN md5user is not mapped to md5user by certmap
    with pytest.raises(psycopg.OperationalError, match="certificate authentication failed"):
        psycopg.connect(p.dsn("md5user", None, dbname="postgres", host="localhost", sslmode="verify-full",
                              sslrootcert=ca, sslcert=str(other_cert), sslkey=str(other_key)))


# --------------------------------------------------------------------------------------------------
# TLS settings on RELOAD (PgBouncer's sbuf_tls_setup tags every pool dirty when server TLS is set up
# again): server connections made with other settings or files are replaced.


def _console(p: PoolerProcess) -> psycopg.Connection:
    """The console as md5user (ADMIN: the tests below list it in admin_users)."""
    return psycopg.connect(p.dsn("md5user", "md5pass", dbname="pgbouncer"), autocommit=True, connect_timeout=10)


def _backend_pid(p: PoolerProcess) -> int:
    with psycopg.connect(p.dsn("md5user", "md5pass")) as c:
        return c.execute("SELECT pg_backend_pid()").fetchone()[0]


def _reload(p: PoolerProcess, options: dict[str, str]) -> None:
    p.set_options(options)
    with _console(p) as admin:
        admin.execute("RELOAD", prepare=False)


@pytest.mark.pgmux_only
def test_server_tls_setting_change_on_reload_replaces_servers(pooler: Any, tls_cluster: TempCluster,
                                                              certs: dict[str, Any]) -> None:
    """A changed server_tls_* setting (the mode staying the same): the idle server is closed at
    once, a server in use finishes its client's session and is closed when released; a RELOAD
    that changes nothing keeps the servers."""
    p = _server_tls_pooler(pooler, tls_cluster, certs, certs["ca"], "verify-ca")
    first = _backend_pid(p)
    _reload(p, {})
    assert _backend_pid(p) == first  # nothing changed: the pooled server stays
    with psycopg.connect(p.dsn("md5user", "md5pass")) as held:
        held_pid = held.execute("SELECT pg_backend_pid()").fetchone()[0]
        _reload(p, {"server_tls_protocols": "tlsv1.3"})
        assert held.execute("SELECT pg_backend_pid()").fetchone()[0] == held_pid  # not cut mid-session
        other = _backend_pid(p)
        assert other not in (first, held_pid)
    assert _backend_pid(p) not in (first, held_pid)  # the held one was closed when released
    with psycopg.connect(p.dsn("md5user", "md5pass")) as c:
        assert c.execute("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == ("TLSv1.3",)


@pytest.mark.pgmux_only
def test_server_tls_file_contents_change_on_reload_replaces_servers(pooler: Any, tls_cluster: TempCluster,
                                                                    certs: dict[str, Any]) -> None:
    """Same path, new contents (a CA bundle that gained a certificate): servers reconnect."""
    d = tempfile.mkdtemp(prefix="pgmux-tls-reload-")
    bundle = Path(d, "bundle.pem")
    bundle.write_bytes(certs["ca"].cert_path.read_bytes())
    p = _server_tls_pooler(pooler, tls_cluster, certs, bundle, "verify-full")
    first = _backend_pid(p)
    _reload(p, {})
    assert _backend_pid(p) == first
    bundle.write_bytes(certs["ca"].cert_path.read_bytes() + certs["other_ca"].cert_path.read_bytes())
    _reload(p, {})
    assert _backend_pid(p) != first


@pytest.mark.pgmux_only
def test_client_tls_cert_file_contents_change_on_reload(pooler: Any, certs: dict[str, Any]) -> None:
    """New client_tls_cert_file/key_file contents serve the clients that connect after RELOAD."""
    d = tempfile.mkdtemp(prefix="pgmux-tls-reload-")
    os.chmod(d, 0o755)
    cert, key = Path(d, "server.crt"), Path(d, "server.key")
    cert.write_bytes(Path(certs["cert"]).read_bytes())
    key.write_bytes(Path(certs["key"]).read_bytes())
    p = pooler(extra={"client_tls_sslmode": "require", "client_tls_cert_file": str(cert),
                      "client_tls_key_file": str(key), "admin_users": "md5user"})
    new_ca = certs["other_ca"]
    dsn_new_ca = p.dsn("md5user", "md5pass", host="localhost", sslmode="verify-full", sslrootcert=str(new_ca.cert_path))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn_new_ca)
    new_cert, new_key = new_ca.issue_server(d, stem="renewed")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    _reload(p, {})
    with psycopg.connect(dsn_new_ca) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------------------------------
# client_tls13_ciphers / server_tls13_ciphers (PgBouncer 1.25)


@pytest.mark.pgmux_only
@pytest.mark.parametrize("key", ["client_tls13_ciphers", "server_tls13_ciphers"])
def test_tls13_ciphers_restriction_refused_with_location(pooler: Any, certs: dict[str, Any], key: str) -> None:
    """Python's ssl cannot set TLS 1.3 suites: a restricting value stops the start, naming file,
    line and key, rather than being ignored."""
    p = pooler(start=False, extra={**tls_extra(certs), key: "TLS_AES_128_GCM_SHA256"})
    lineno = next(i for i, line in enumerate(p.ini_text.splitlines(), 1) if line.startswith(key))
    p.write_files()
    proc = subprocess.run([c for c in p.command() if c != "-v"], cwd=p.workdir, env=p.env(),
                          capture_output=True, text=True, timeout=30)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert f"{p.ini_name}:{lineno}: {key}: " in output and "TLS 1.3 cipher suites" in output, output


@pytest.mark.pgmux_only
def test_tls13_ciphers_default_suites_accepted_and_bad_reload_refused(pooler: Any, certs: dict[str, Any]) -> None:
    """The suites OpenSSL enables anyway are accepted (in any order); an unknown suite on RELOAD is
    refused and the running settings stay."""
    suites = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
    p = pooler(extra={**tls_extra(certs), "client_tls13_ciphers": suites, "server_tls13_ciphers": suites,
                      "admin_users": "md5user"})
    with psycopg.connect(p.dsn("md5user", "md5pass", host="localhost", sslmode="require")) as c:
        assert c.pgconn.ssl_in_use
    p.set_options({"client_tls13_ciphers": "TLS_NO_SUCH_SUITE"})
    with _console(p) as admin, pytest.raises(psycopg.Error, match="RELOAD failed"):
        admin.execute("RELOAD", prepare=False)
    assert "client_tls13_ciphers: unknown TLS 1.3 cipher suite 'TLS_NO_SUCH_SUITE'" in p.log_text()
    with _console(p) as admin:
        row = [r for r in admin.execute("SHOW CONFIG", prepare=False).fetchall() if r[0] == "client_tls13_ciphers"]
    assert row and row[0][1] == suites


# --------------------------------------------------------------------------------------------------
# Direct TLS (PostgreSQL 17's sslnegotiation=direct; PgBouncer 1.25): the client starts with a
# ClientHello, no SSLRequest, and must negotiate ALPN "postgresql".


def _direct_tls(port: int, ca: CA, alpn: list[str] | None) -> RawConn:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    conn = RawConn("127.0.0.1", port)
    conn.sock = ctx.wrap_socket(conn.sock, server_hostname="localhost")
    return conn


@pytest.mark.pgmux_only
def test_direct_tls_client_logs_in(pooler: Any, certs: dict[str, Any]) -> None:
    p = pooler(extra={**tls_extra(certs, "require"), "admin_users": "md5user"})
    with _direct_tls(p.port, certs["ca"], ["postgresql"]) as conn:
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.selected_alpn_protocol() == "postgresql"
        conn.login("md5user", "testdb", "md5pass")
        assert conn.simple_query("SELECT 41 + 1") == [("42",)]
    with _console(p) as admin:  # the SSLRequest path still works beside it
        assert admin.execute("SHOW VERSION", prepare=False).fetchone()


@pytest.mark.pgmux_only
@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "other-alpn"])
def test_direct_tls_without_postgresql_alpn_is_closed(pooler: Any, certs: dict[str, Any],
                                                      alpn: list[str] | None) -> None:
    """As PostgreSQL 17 does for a client without ALPN: the handshake completes, then the
    connection is closed without a message. (PostgreSQL answers an ALPN list without `postgresql`
    with a no_application_protocol alert; Python's ssl cannot send that alert, so pgmux closes
    after the handshake in that case too.)"""
    p = pooler(extra=tls_extra(certs, "require"))
    with _direct_tls(p.port, certs["ca"], alpn) as conn, pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        conn.login("md5user", "testdb", "md5pass")
    assert "without ALPN protocol negotiation extension" in p.log_text()


def test_direct_tls_refused_when_client_tls_is_off(pooler: Any, certs: dict[str, Any]) -> None:
    """client_tls_sslmode = disable: a ClientHello is not a startup packet; no TLS is spoken."""
    p = pooler()
    with pytest.raises((ssl.SSLError, OSError)):
        _direct_tls(p.port, certs["ca"], ["postgresql"]).close()


@pytest.mark.pgmux_only  # (PgBouncer 1.18 sends TLS 1.3 tickets: checked with --pooler=pgbouncer)
def test_no_session_tickets(pooler: Any, certs: dict[str, Any]) -> None:
    """No TLS session ticket after the handshake, as PostgreSQL's server: clients never resume,
    so a ticket is work for nothing. A client that read the whole welcome has seen any ticket."""
    p = pooler(extra=tls_extra(certs, "require"))
    with RawConn("127.0.0.1", p.port) as conn:
        conn.send(struct.pack("!II", 8, 80877103))
        assert conn.sock.recv(1) == b"S"
        ctx = ssl.create_default_context(cafile=str(certs["ca"].cert_path))
        conn.sock = ctx.wrap_socket(conn.sock, server_hostname="localhost")
        conn.login("md5user", "testdb", "md5pass")
        assert conn.simple_query("SELECT 1") == [("1",)]
        assert conn.sock.version() == "TLSv1.3"
        session = conn.sock.session
        assert session is None or not session.has_ticket, "the pooler sent a session ticket"
