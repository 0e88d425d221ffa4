"""TLS on both sides, HBA rules and certificate login, with certificates made in the test run."""

from __future__ import annotations

import asyncio
import os
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


def _server_tls_pooler(pooler: Any, tls_cluster: TempCluster, certs: dict[str, Any], ca: CA,
                       mode: str) -> PoolerProcess:
    return pooler(databases={"testdb": f"host=localhost port={tls_cluster.port} dbname=testdb"},
                  userlist={"md5user": "md5pass"},
                  extra={"server_tls_sslmode": mode, "server_tls_ca_file": str(ca.cert_path)})


@pytest.mark.pgmux_only
def test_server_tls_verify_full(pooler: Any, tls_cluster: TempCluster, certs: dict[str, Any]) -> None:
    p = _server_tls_pooler(pooler, tls_cluster, certs, certs["ca"], "verify-full")
    with psycopg.connect(p.dsn("md5user", "md5pass")) as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


@pytest.mark.pgmux_only
def test_server_tls_wrong_ca_fails_clearly(pooler: Any, tls_cluster: TempCluster, certs: dict[str, Any]) -> None:
    p = _server_tls_pooler(pooler, tls_cluster, certs, certs["other_ca"], "verify-full")
    with pytest.raises(psycopg.OperationalError, match="server TLS handshake failed.*certificate verify failed"):
        psycopg.connect(p.dsn("md5user", "md5pass"))


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
