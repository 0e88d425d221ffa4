"""Settings pgmux used to accept and only warn about, each acting as in PgBouncer 1.25.

query_wait_notify (src/janitor.c per_loop_activate), server_fast_close (pool_server_maint),
scram_iterations (src/scram.c, ad-hoc and mock secrets), pool_idle_timeout (#1491, after 1.25.2),
login_notify_message (1.25's login NOTICE) and syslog / syslog_ident / syslog_facility (libusual
logging.c). Settings 1.18 lacks are ``pgmux_only``; syslog and server_fast_close run against
PgBouncer too.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from helpers_tx import errors_until_close, messages_of, quiet_cluster, raw_login, send_query  # noqa: F401
from pgwire import RawConn, kinds, login_error, read_until_z, startup_packet

from pgmux.protocol.messages import parse_error_fields
from pgmux.testing.cluster import PoolerProcess, TempCluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_cluster")]

PoolerFactory = Callable[..., PoolerProcess]
QUEUED = "No server connection available in postgres backend, client being queued"


def console(p: PoolerProcess) -> psycopg.Connection:
    return psycopg.connect(p.dsn("postgres", dbname="pgbouncer"), autocommit=True, connect_timeout=10)


# --------------------------------------------------------------------------------------------------
# query_wait_notify


@pytest.mark.pgmux_only(reason="query_wait_notify is PgBouncer 1.25+")
def test_query_wait_notify_tells_a_queued_client_once(pooler: PoolerFactory) -> None:
    p = pooler(pool_mode="transaction", auth_type="trust",
               extra={"default_pool_size": 1, "query_wait_notify": 1, "query_wait_timeout": 0})
    holder = raw_login(p)
    holder.simple_query("BEGIN")  # keeps the only server
    queued = raw_login(p)
    start = time.monotonic()
    send_query(queued, "SELECT 1")
    kind, body = queued.read_message()
    elapsed = time.monotonic() - start
    assert kind == b"N"
    fields = parse_error_fields(body)
    assert (fields["S"], fields["C"], fields["M"]) == ("NOTICE", "00000", QUEUED)
    # more than query_wait_notify whole seconds, as PgBouncer's integer division has it
    assert 1.9 <= elapsed <= 6.0, elapsed
    time.sleep(1.2)  # another janitor round: still one notice
    holder.simple_query("COMMIT")
    kinds = []
    while not kinds or kinds[-1] != b"Z":
        kinds.append(queued.read_message()[0])
    assert kinds == [b"T", b"D", b"C", b"Z"]


# --------------------------------------------------------------------------------------------------
# login_notify_message


def welcome(p: PoolerProcess, user: str = "md5user", dbname: str = "testdb") -> list[tuple[bytes, bytes]]:
    """A trust login's messages, from AuthenticationOk up to the first ReadyForQuery."""
    with RawConn(p.host, p.port) as conn:
        conn.send(startup_packet({"user": user, "database": dbname}))
        msgs = read_until_z(conn, timeout=10)
        conn.terminate()
    return msgs


def notice_texts(msgs: list[tuple[bytes, bytes]]) -> list[str]:
    return [parse_error_fields(body)["M"] for kind, body in msgs if kind == b"N"]


@pytest.mark.pgmux_only(reason="login_notify_message is PgBouncer 1.25+")
def test_login_notify_message_is_part_of_the_welcome(pooler: PoolerFactory) -> None:
    p = pooler(auth_type="trust", extra={"login_notify_message": "maintenance at 18:00 UTC"})
    msgs = welcome(p)
    assert re.fullmatch(r"RS+KNZ", kinds(msgs)), kinds(msgs)  # after the parameters, before ReadyForQuery
    fields = parse_error_fields(msgs[-2][1])
    assert fields == {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "maintenance at 18:00 UTC"}
    # what a client shows of it
    psql = subprocess.run(["psql", "-X", "-At", p.dsn("md5user"), "-c", "SELECT 1"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert (psql.returncode, psql.stdout) == (0, "1\n"), psql.stderr
    assert psql.stderr == "NOTICE:  maintenance at 18:00 UTC\n"
    # every login gets it, the pool's first and the next ones alike; the console does not
    assert notice_texts(welcome(p)) == ["maintenance at 18:00 UTC"]
    assert notice_texts(welcome(p, "postgres", "pgbouncer")) == []
    # RELOAD: later logins get the new text, and none once it is empty
    p.set_options({"login_notify_message": "all clear"})
    with console(p) as admin:
        admin.execute("RELOAD", prepare=False)
    assert notice_texts(welcome(p)) == ["all clear"]
    p.set_options({"login_notify_message": ""})
    with console(p) as admin:
        admin.execute("RELOAD", prepare=False)
    assert kinds(welcome(p))[-2:] == "KZ"


# --------------------------------------------------------------------------------------------------
# server_fast_close


def test_server_fast_close_ends_the_session_at_the_transaction_end(cluster: TempCluster,
                                                                   pooler: PoolerFactory) -> None:
    p = pooler(pool_mode="session", auth_type="trust", extra={"server_fast_close": 1})
    conn = raw_login(p)
    conn.simple_query("BEGIN")
    backend = conn.simple_query("SELECT pg_backend_pid()")[0][0]
    with console(p) as admin:
        admin.execute("RECONNECT", prepare=False)
    # The transaction is not cut short: RECONNECT only marks the server.
    time.sleep(1.5)
    assert conn.simple_query("SELECT 1") == [("1",)]
    conn.simple_query("COMMIT")
    # Now the server is idle and marked: the janitor closes it, and its client with it.
    errs, _ = errors_until_close(conn, 5)
    assert messages_of(errs) == ["database configuration changed"]
    assert errs[0].severity == "FATAL" and errs[0].sqlstate == "08P01"
    wait_for(lambda: not cluster.execute(f"SELECT 1 FROM pg_stat_activity WHERE pid = {backend}"), 5,
             what="the marked server's backend to go")


# --------------------------------------------------------------------------------------------------
# scram_iterations


@pytest.mark.pgmux_only(reason="scram_iterations is PgBouncer 1.25+")
def test_scram_iterations_for_secrets_built_from_plaintext(pooler: PoolerFactory) -> None:
    p = pooler(auth_type="scram-sha-256", extra={"scram_iterations": 5000})
    # md5user's auth_file entry is plaintext: the pooler builds its SCRAM secret.
    with RawConn(p.host, p.port) as conn:
        conn.login("md5user", "testdb", "md5pass")
        assert conn.simple_query("SELECT 1") == [("1",)]
        assert conn.sasl_server_first is not None and conn.sasl_server_first.endswith(",i=5000")
    # An unknown user's mock exchange looks the same.
    err, conn = login_error(p.host, p.port, "nosuchuser", "testdb", "x")
    assert err.sqlstate == "28P01"
    assert conn.sasl_server_first is not None and conn.sasl_server_first.endswith(",i=5000")


# --------------------------------------------------------------------------------------------------
# pool_idle_timeout


def _pools(p: PoolerProcess) -> set[tuple[str, str]]:
    with console(p) as admin:
        cur = admin.execute("SHOW POOLS", prepare=False)
        names = [d.name for d in cur.description or []]
        return {(row[names.index("database")], row[names.index("user")]) for row in cur}


@pytest.mark.pgmux_only(reason="pool_idle_timeout is newer than PgBouncer 1.25.2")
def test_pool_idle_timeout_frees_a_pool_without_clients_or_servers(pooler: PoolerFactory) -> None:
    p = pooler(auth_type="trust", extra={"pool_idle_timeout": 1, "server_idle_timeout": 1})
    with psycopg.connect(p.dsn("md5user", connect_timeout=10)) as conn:
        conn.execute("SELECT 1")
        time.sleep(2.5)  # a pool in use stays, whatever pool_idle_timeout says
        assert ("testdb", "md5user") in _pools(p)
    # The server goes after server_idle_timeout, then the empty pool after pool_idle_timeout.
    wait_for(lambda: ("testdb", "md5user") not in _pools(p), 10, what="the unused pool to be freed")
    # A new client gets a new pool.
    with psycopg.connect(p.dsn("md5user", connect_timeout=10)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert ("testdb", "md5user") in _pools(p)


# --------------------------------------------------------------------------------------------------
# syslog


class SyslogPooler(PoolerProcess):
    """The pooler in a mount namespace whose /dev is an overlay with ``log`` pointing at a datagram
    socket the test binds: glibc's syslog(3) (PgBouncer) and pgmux both write to /dev/log, and the
    machine's own /dev stays untouched."""

    syslog_dir = ""

    def command(self) -> list[str]:
        script = ('mount -t overlay overlay -o "lowerdir=/dev,upperdir=$1/up,workdir=$1/work" /dev'
                  ' && ln -s "$1/log.sock" /dev/log && shift && exec "$@"')
        return ["unshare", "--mount", "sh", "-c", script, "sh", self.syslog_dir, *super().command()]


@pytest.fixture
def syslog_receiver() -> Iterator[tuple[str, socket.socket]]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the pooler a /dev/log of its own")
    d = tempfile.mkdtemp(prefix="pgmux-syslog-")
    os.chmod(d, 0o755)
    for sub in ("up", "work"):
        os.mkdir(os.path.join(d, sub))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(d, "log.sock"))
    os.chmod(os.path.join(d, "log.sock"), 0o777)  # PgBouncer runs as the postgres user
    sock.settimeout(0.2)
    try:
        yield d, sock
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def received(sock: socket.socket, needle: str, timeout: float = 10) -> str:
    """The first datagram containing ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = sock.recv(65536).decode()
        except TimeoutError:
            continue
        if needle in line:
            return line
    raise AssertionError(f"no syslog line with {needle!r} within {timeout}s")


def test_syslog_lines_carry_ident_and_facility(pooler: PoolerFactory,
                                               syslog_receiver: tuple[str, socket.socket]) -> None:
    d, sock = syslog_receiver
    p = pooler(auth_type="trust", process_class=SyslogPooler, start=False,
               extra={"syslog": 1, "syslog_ident": "pooltest", "syslog_facility": "local3"})
    assert isinstance(p, SyslogPooler)
    p.syslog_dir = d
    p.start()
    with psycopg.connect(p.dsn("md5user", connect_timeout=10)) as conn:
        conn.execute("SELECT 1")
    line = received(sock, "login attempt: db=testdb user=md5user")
    m = re.fullmatch(r"<(\d+)>(\w{3} [ \d]\d \d\d:\d\d:\d\d) pooltest\[(\d+)\]: (.*)", line.rstrip("\0\n"))
    assert m is not None, line
    assert int(m.group(1)) == 19 * 8 + 6  # local3, info (LOG)
    assert int(m.group(3)) in p.log_pids("login attempt")
    # the message is the log line without the time, pid and level
    assert re.match(r"C-0x[0-9a-f]+: testdb/md5user@127\.0\.0\.1:\d+ login attempt", m.group(4)), m.group(4)
    # A warning's priority, after RELOAD changed ident and facility.
    p.set_options({"syslog_ident": "pooltest2", "syslog_facility": "user"})
    with console(p) as admin:
        admin.execute("RELOAD", prepare=False)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(p.dsn("md5user", dbname="nosuchdb", connect_timeout=10))
    line = received(sock, "pooler error: no such database: nosuchdb")
    m = re.match(r"<(\d+)>.{15} pooltest2\[\d+\]: ", line)
    assert m is not None and int(m.group(1)) == 1 * 8 + 4, line  # user, warning
