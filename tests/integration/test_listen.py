"""Listening sockets on a real process: the Unix socket's guard against a second instance, a missing
unix_socket_dir, unix_socket_group/mode, TCP options of accepted client sockets, and the startup
warning for accepted-but-unimplemented settings.

The tests that PgBouncer passes too run against both poolers (``--pooler=pgbouncer``).
"""

from __future__ import annotations

import ctypes
import grp
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from pgmux.testing.cluster import PoolerProcess, TempCluster, ini_set, port_accepts, wait_for

pytestmark = pytest.mark.integration


def _run_to_exit(p: PoolerProcess, timeout: float = 10) -> subprocess.CompletedProcess:
    cmd = [c for c in p.command() if c != "-v"]
    try:
        return subprocess.run(cmd, cwd=p.workdir, env=p.env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # run() killed it
        pytest.fail(f"{cmd} was still running after {timeout}s: {exc.stdout!r} {exc.stderr!r}")


def _select_one(dsn: str) -> object:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT 1").fetchone()
    return row[0] if row else None


# --- 1. a second instance must not take over a live Unix socket ----------------------------------


def test_second_instance_refuses_live_unix_socket(pooler: Callable[..., PoolerProcess]) -> None:
    """A second pooler configured for the same Unix socket (here: Unix only, so no TCP clash comes
    first) exits non-zero with PgBouncer's ``unix socket is in use, cannot continue``, without a
    traceback, and leaves the first instance's socket alone."""
    first = pooler(auth_type="trust")
    path = first.unix_socket_path
    assert path is not None
    inode = os.stat(path).st_ino
    second = PoolerProcess(first.kind, ini_set(first.ini_text, "listen_addr", ""), first.userlist_text,
                           first.workdir)
    second.ini_name = "second.ini"
    second.write_files()
    proc = _run_to_exit(second)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "unix socket is in use, cannot continue" in output, output
    assert "Traceback" not in output, output
    assert os.stat(path).st_ino == inode, "the live socket was replaced"
    assert _select_one(first.unix_dsn("trustuser")) == 1
    assert first.is_running()


def test_stale_unix_socket_is_replaced(pooler: Callable[..., PoolerProcess]) -> None:
    """A socket file nobody listens on (left by a killed process) is removed and bound again."""
    p = pooler(auth_type="trust", start=False)
    path = p.unix_socket_path
    assert path is not None
    p.write_files()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, with no listener behind it
    p.start()
    assert _select_one(p.unix_dsn("trustuser")) == 1


def test_unix_socket_file_removed_at_exit(pooler: Callable[..., PoolerProcess]) -> None:
    """Stopping removes the Unix socket's file, as PgBouncer does."""
    _stop_removes_unix_socket(pooler(auth_type="trust"))


@pytest.mark.pgmux_only(reason="workers = N is pgmux's")
def test_unix_socket_file_removed_at_exit_with_workers(pooler: Callable[..., PoolerProcess]) -> None:
    """With workers, the supervisor removes it once they exited."""
    _stop_removes_unix_socket(pooler(auth_type="trust", extra={"workers": 2}))


def _stop_removes_unix_socket(p: PoolerProcess) -> None:
    path = p.unix_socket_path
    assert path is not None and os.path.exists(path)
    p.stop()
    assert not os.path.exists(path), "the Unix socket file was left behind"


# --- 2. a missing unix_socket_dir is a warning, TCP keeps working --------------------------------


class _TcpOnlyReady(PoolerProcess):
    """Ready when TCP accepts: the configured Unix socket is expected not to appear."""

    @property
    def unix_socket_path(self) -> str | None:
        return None


def test_missing_unix_socket_dir_warns_and_serves_tcp(cluster: TempCluster,
                                                      pooler: Callable[..., PoolerProcess]) -> None:
    missing = f"/nonexistent-pgmux-{os.getpid()}"
    template = pooler(auth_type="trust", start=False, extra={"unix_socket_dir": missing})
    p = _TcpOnlyReady(template.kind, template.ini_text, template.userlist_text, template.workdir)
    try:
        p.start()
        assert _select_one(p.dsn("trustuser")) == 1
        log = p.log_text()
        assert missing in log, log
        warning = next((line for line in log.splitlines() if missing in line and "WARNING" in line), "")
        assert "cannot listen on unix:" in warning, log  # PgBouncer's words too
        if p.kind == "pgmux":
            assert "unix_socket_dir" in warning, log
        assert "FATAL" not in log, log
    finally:
        p.stop()


# --- 3. unix_socket_group and unix_socket_mode ---------------------------------------------------


def test_unix_socket_group_and_mode(pooler: Callable[..., PoolerProcess]) -> None:
    try:
        group = grp.getgrnam("postgres")
    except KeyError:
        pytest.skip("no postgres group on this machine")
    p = pooler(auth_type="trust", extra={"unix_socket_group": "postgres", "unix_socket_mode": "0770"})
    assert p.unix_socket_path is not None
    st = os.stat(p.unix_socket_path)
    assert st.st_gid == group.gr_gid
    assert st.st_mode & 0o777 == 0o770
    assert _select_one(p.unix_dsn("trustuser")) == 1


@pytest.mark.pgmux_only
def test_unknown_unix_socket_group_warns(pooler: Callable[..., PoolerProcess]) -> None:
    """An unknown group: the Unix socket is not served (as a failed bind), TCP still is."""
    template = pooler(auth_type="trust", start=False, extra={"unix_socket_group": "no-such-group-pgmux"})
    p = _TcpOnlyReady(template.kind, template.ini_text, template.userlist_text, template.workdir)
    try:
        p.start()
        assert _select_one(p.dsn("trustuser")) == 1
        log = p.log_text()
        assert "no-such-group-pgmux" in log and "unix_socket_group" in log, log
        assert not os.path.exists(os.path.join(p.workdir, f".s.PGSQL.{p.port}"))
    finally:
        p.stop()


# --- 4. TCP options on accepted client sockets ---------------------------------------------------

_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438


@contextmanager
def _peer_socket_of(pid: int, client: socket.socket) -> Iterator[socket.socket]:
    """The pooler's end of ``client``'s connection, duplicated from process ``pid`` (pidfd_getfd)."""
    want = client.getsockname()
    with _tcp_socket_of(pid, lambda peer: peer == want, f"connected to {want}") as sock:
        yield sock


@contextmanager
def _tcp_socket_of(pid: int, match: Callable[[Any], bool], what: str) -> Iterator[socket.socket]:
    """A TCP socket of process ``pid`` whose peer address ``match``es, duplicated (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        pytest.skip(f"pidfd_open failed: errno {ctypes.get_errno()}")
    found: socket.socket | None = None
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                if ctypes.get_errno() == 1:  # EPERM: not allowed to look into the process
                    pytest.skip("pidfd_getfd not permitted")
                continue
            sock = socket.socket(fileno=fd)
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and match(sock.getpeername()):
                    found = sock
                    break
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    assert found is not None, f"no socket of process {pid} is {what}"
    try:
        yield found
    finally:
        found.close()


def _login_socket(p: PoolerProcess) -> socket.socket:
    """A raw TCP connection to the pooler that it has accepted (an SSLRequest answered)."""
    client = socket.create_connection((p.host, p.port), timeout=5)
    client.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest: answered 'N' once accepted
    assert client.recv(1) == b"N"
    return client


def test_client_socket_tcp_options(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(auth_type="trust", extra={"tcp_keepidle": 77, "tcp_keepintvl": 11, "tcp_keepcnt": 4,
                                         "tcp_user_timeout": 12345, "tcp_socket_buffer": 65536})
    client = _login_socket(p)
    try:
        with _peer_socket_of(p.pid, client) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 11
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12345
            # Linux doubles the requested size for its bookkeeping
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536
    finally:
        client.close()


@pytest.mark.parametrize(("extra", "keepalive"), [({}, 1), ({"tcp_keepalive": 0}, 0)], ids=["default", "off"])
def test_client_socket_keepalive_default_and_off(
    pooler: Callable[..., PoolerProcess], extra: dict[str, int], keepalive: int
) -> None:
    """tcp_keepalive is on by default (PgBouncer's default too); tcp_keepalive = 0 turns it off."""
    p = pooler(auth_type="trust", extra=extra)
    client = _login_socket(p)
    try:
        with _peer_socket_of(p.pid, client) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == keepalive
    finally:
        client.close()


@pytest.mark.pgmux_only
def test_client_socket_tcp_options_with_workers(pooler: Callable[..., PoolerProcess]) -> None:
    """Workers serve sockets their supervisor bound: the options apply there too."""
    p = pooler(auth_type="trust", extra={"workers": 2, "tcp_keepidle": 55})
    for _ in range(4):  # whichever worker accepted it
        client = _login_socket(p)
        try:
            pids = p.worker_pids()
            owner = None
            for pid in pids:
                try:
                    with _peer_socket_of(pid, client) as sock:
                        owner = pid
                        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 55
                except AssertionError as exc:
                    if "no socket of process" not in str(exc):
                        raise
            assert owner is not None
        finally:
            client.close()


# --- 6. accepted-but-ignored settings would be named once at startup ------------------------------


@pytest.mark.pgmux_only
def test_implemented_settings_do_not_warn(pooler: Callable[..., PoolerProcess]) -> None:
    # login_notify_message, server_fast_close and syslog_ident used to be accepted and ignored:
    # they act now, so no warning for them (the unit tests cover the warning itself)
    p = pooler(auth_type="trust", extra={"login_notify_message": "hello", "server_fast_close": 1,
                                         "syslog_ident": "mine"})
    wait_for(lambda: "listening on" in p.log_text(), 5, what="startup log")
    log = p.log_text()
    assert "is not supported by pgmux" not in log, log
    assert port_accepts(p.host, p.port)


def test_server_socket_tcp_options(cluster: TempCluster, pooler: Callable[..., PoolerProcess]) -> None:
    """The tcp_* settings apply to the pooler's connections to PostgreSQL too, as PgBouncer's do."""
    p = pooler(auth_type="trust", extra={"tcp_keepidle": 44})
    with psycopg.connect(p.dsn("trustuser"), autocommit=True, connect_timeout=5) as c:
        c.execute("SELECT 1")
        with _tcp_socket_of(p.pid, lambda peer: peer[1] == cluster.port, f"connected to port {cluster.port}") as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 44
