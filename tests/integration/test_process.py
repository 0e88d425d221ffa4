"""The pooler as a Unix process: logfile, pidfile, `user`/-u and stop signals, on a real process.

What an operator relies on when starting, reloading and stopping it: a logfile or user that cannot
be used stops the start with one FATAL line (no traceback, nothing bound); a reload with a bad
logfile keeps logging where it went; a second instance refuses to start while the pidfile names a
live process (and leaves the running one's pidfile alone); SIGTERM during a shutdown exits at once.
Texts are PgBouncer's (src/main.c, lib/usual/logging.c, src/system.c).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pgmux.testing.cluster import PoolerProcess, port_accepts, wait_for

psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.integration

PoolerFactory = Callable[..., PoolerProcess]
NO_DIR = "/nonexistent-pgmux-dir"


class ArgsPooler(PoolerProcess):
    """A PoolerProcess with extra command-line arguments (such as ``-u user``)."""

    extra_args: list[str] = []

    def command(self) -> list[str]:
        cmd = super().command()
        return [*cmd[:-1], *self.extra_args, cmd[-1]]


@pytest.fixture
def make(pooler: PoolerFactory) -> Callable[..., ArgsPooler]:
    """Like the ``pooler`` fixture (whose teardown stops it), but unstarted and with ``args`` for the
    command line."""

    def factory(*, args: tuple[str, ...] = (), **config_kwargs: Any) -> ArgsPooler:
        proc = pooler(start=False, process_class=ArgsPooler, **config_kwargs)
        assert isinstance(proc, ArgsPooler)
        proc.extra_args = list(args)
        return proc

    return factory


def run_once(proc: PoolerProcess, timeout: float = 15.0) -> tuple[int | None, str]:
    """Run the pooler expecting it to exit by itself: (exit code or None if it kept running, output)."""
    proc.write_files()
    child = subprocess.Popen(proc.command(), cwd=proc.workdir, env=proc.env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=timeout)
        return child.returncode, out
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        return None, out


def one_fatal_line(out: str, message: str) -> None:
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if message in line]
    assert lines and " FATAL " in lines[0], out


def status_ids(pid: int) -> tuple[int, int, set[int]]:
    """(real uid, real gid, supplementary groups) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0]), {int(g) for g in fields["Groups"].split()})


# --------------------------------------------------------------------------------------------------
# logfile


def test_unopenable_logfile_stops_the_start(make: Callable[..., ArgsPooler]) -> None:
    p = make(extra={"logfile": f"{NO_DIR}/pooler.log"})
    code, out = run_once(p)
    assert code is not None and code != 0, out
    one_fatal_line(out, f"Cannot open logfile: '{NO_DIR}/pooler.log'")


@pytest.mark.pgmux_only  # PgBouncer exits when it cannot reopen the logfile
@pytest.mark.parametrize("workers", [1, 2])
def test_reload_with_unopenable_logfile_keeps_logging(pooler: PoolerFactory, workers: int) -> None:
    p = pooler(auth_type="trust", extra={"logfile": "@WORKDIR@/first.log", "workers": workers})
    first = Path(p.workdir, "first.log")
    pids = [p.pid, *p.worker_pids()]
    p.set_options({"logfile": f"{NO_DIR}/second.log"})
    p.reload()
    wait_for(lambda: f"{NO_DIR}/second.log" in p.log_text(), 10, what="a complaint about the new logfile")
    time.sleep(0.3)
    assert p.is_running() and [p.pid, *p.worker_pids()] == pids
    # Logging goes on, to stderr and to the old logfile.
    before = first.read_text().count("login attempt")
    for _ in range(2 * workers):
        with psycopg.connect(p.dsn("trustuser", connect_timeout=10)) as conn:
            conn.execute("SELECT 1")
    wait_for(lambda: first.read_text().count("login attempt") >= before + 2 * workers, 10,
             what="login lines in the old logfile")
    assert "Traceback" not in p.log_text()
    assert f"ERROR Cannot open logfile: '{NO_DIR}/second.log': No such file or directory" in p.log_text()


@pytest.mark.pgmux_only
def test_console_set_logfile_reopens_the_log(pooler: PoolerFactory) -> None:
    p = pooler(auth_type="trust")
    second = Path(p.workdir, "second.log")
    with psycopg.connect(p.dsn("postgres", dbname="pgbouncer"), autocommit=True) as admin:
        admin.execute(f"SET logfile = '{second}'", prepare=False)
        with psycopg.connect(p.dsn("trustuser", connect_timeout=10)) as conn:
            conn.execute("SELECT 1")
        wait_for(lambda: second.exists() and "login attempt" in second.read_text(), 10,
                 what="the login line in the logfile set on the console")
        admin.execute("SET verbose = 2", prepare=False)
        # A logfile that cannot be opened is refused; logging stays where it was.
        with pytest.raises(psycopg.Error, match="SET failed"):
            admin.execute(f"SET logfile = '{NO_DIR}/x.log'", prepare=False)
        assert [r[1] for r in admin.execute("SHOW CONFIG", prepare=False) if r[0] == "logfile"] == [str(second)]
    assert p.is_running()
    assert f"Cannot open logfile: '{NO_DIR}/x.log'" in p.log_text()


class HupOnFirstListen(PoolerProcess):
    """Changes the logfile on disk and sends SIGHUP the moment the Unix socket file appears, that is
    while the pooler is still between binding and serving (the window a loaded machine widens)."""

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None and self.unix_socket_path is not None
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.unix_socket_path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return super()._wait_ready(0)
        self.set_options({"logfile": "@WORKDIR@/after.log"})
        os.kill(self.pid, signal.SIGHUP)
        return super()._wait_ready(timeout)


def test_sighup_as_soon_as_the_socket_exists_reloads(pooler: PoolerFactory) -> None:
    # Why test_reload_with_unopenable_logfile_keeps_logging[1] timed out under load: a SIGHUP that
    # came after the socket accepted but before the handlers were set killed the process.
    p = pooler(auth_type="trust", process_class=HupOnFirstListen)
    after = Path(p.workdir, "after.log")

    def login_logged_after() -> bool:
        # The reload and a login ready at the same time may be served in either order (PgBouncer's
        # event loop too): a login that came first is logged to the old file, so log in again.
        with psycopg.connect(p.dsn("trustuser", connect_timeout=10)) as conn:
            conn.execute("SELECT 1")
        return after.exists() and "login attempt" in after.read_text()

    wait_for(login_logged_after, 10, what="a login line in the logfile the early SIGHUP switched to")
    assert p.is_running()


# --------------------------------------------------------------------------------------------------
# pidfile


def test_second_instance_is_refused_while_the_pidfile_is_live(make: Callable[..., ArgsPooler]) -> None:
    first = make(auth_type="trust", extra={"pidfile": "@WORKDIR@/pooler.pid"})
    pidfile = Path(first.workdir, "pooler.pid")
    first.start()
    wait_for(pidfile.exists, 5, what="the pidfile")
    assert int(pidfile.read_text()) == first.pid
    # Another port and socket directory: only the pidfile is shared.
    second = make(auth_type="trust", extra={"pidfile": str(pidfile)})
    code, out = run_once(second)
    assert code is not None and code != 0, out
    one_fatal_line(out, "pidfile exists, another instance running?")
    assert not port_accepts(second.host, second.port)
    assert second.unix_socket_path is not None and not os.path.exists(second.unix_socket_path)
    # The running one is untouched: its pidfile names it, it still serves.
    assert int(pidfile.read_text()) == first.pid
    with psycopg.connect(first.dsn("trustuser", connect_timeout=10)) as conn:
        conn.execute("SELECT 1")
    first.stop()  # PgBouncer 1.18 exits 1 on SIGTERM
    assert not pidfile.exists()


def test_stale_pidfile_is_replaced(make: Callable[..., ArgsPooler]) -> None:
    p = make(auth_type="trust", extra={"pidfile": "@WORKDIR@/pooler.pid"})
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = Path(p.workdir, "pooler.pid")
    pidfile.write_text(f"{dead.pid}\n")
    p.start()
    wait_for(lambda: pidfile.read_text().strip() == str(p.pid), 5, what="our pid in the pidfile")
    p.stop()
    assert not pidfile.exists()


@pytest.mark.pgmux_only
def test_pidfile_is_written_only_once_listening(make: Callable[..., ArgsPooler]) -> None:
    """A start that cannot bind never touches the pidfile (PgBouncer writes it after binding too)."""
    first = make(auth_type="trust")
    first.start()
    second = make(auth_type="trust", port=first.port, extra={"pidfile": "@WORKDIR@/pooler.pid"})
    code, out = run_once(second)
    assert code is not None and code != 0, out
    assert "could not bind" in out and "Traceback" not in out
    assert not Path(second.workdir, "pooler.pid").exists()


# --------------------------------------------------------------------------------------------------
# user / -u


@pytest.mark.pgmux_only  # PgBouncer runs as postgres here, so it could not switch anyway
@pytest.mark.parametrize("how", ["-u", "setting"])
def test_unknown_user_stops_the_start_before_binding(make: Callable[..., ArgsPooler], how: str) -> None:
    name = "nosuchuser-pgmux"
    if how == "-u":
        p = make(auth_type="trust", args=("-u", name), extra={"pidfile": "@WORKDIR@/pooler.pid"})
    else:
        p = make(auth_type="trust", extra={"user": name, "pidfile": "@WORKDIR@/pooler.pid"})
    code, out = run_once(p)
    assert code is not None and code != 0, out
    one_fatal_line(out, f"could not find user '{name}' to switch to")
    assert p.unix_socket_path is not None and not os.path.exists(p.unix_socket_path)
    assert not port_accepts(p.host, p.port)
    assert not Path(p.workdir, "pooler.pid").exists()


@pytest.mark.pgmux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
@pytest.mark.parametrize(("how", "workers"), [("setting", 1), ("setting", 2), ("-u", 1)])
def test_user_switch_takes_the_users_groups(make: Callable[..., ArgsPooler], how: str, workers: int) -> None:
    user = "postgres"  # the service user pgmux.testing.cluster runs PostgreSQL as
    pw = pwd.getpwnam(user)
    if how == "-u":  # -u wins over the setting
        p = make(auth_type="trust", args=("-u", user), extra={"user": "nosuchuser-pgmux", "workers": workers})
    else:
        p = make(auth_type="trust", extra={"user": user, "workers": workers})
    p.start()
    # p.start() returns once the port accepts; the switch comes after the bind and before the
    # "listening on" line (cli.serve), so wait for that line before looking at the process
    wait_for(lambda: "listening on" in p.log_text(), 10, what="the listening line")
    expected = (pw.pw_uid, pw.pw_gid, set(os.getgrouplist(user, pw.pw_gid)))
    for pid in [p.pid, *p.worker_pids()]:
        assert status_ids(pid) == expected, pid
    with psycopg.connect(p.dsn("trustuser", connect_timeout=10)) as conn:
        conn.execute("SELECT 1")


# --------------------------------------------------------------------------------------------------
# stop signals


@pytest.mark.pgmux_only  # SHUTDOWN WAIT_FOR_CLIENTS and the fast exit are PgBouncer 1.23's, not 1.18's
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_console_shutdown_exits_at_once(pooler: PoolerFactory, workers: int) -> None:
    extra = {"workers": workers} if workers > 1 else {}
    p = pooler(auth_type="trust", extra=extra)
    clients = [psycopg.connect(p.dsn("trustuser", connect_timeout=10), autocommit=True) for _ in range(4 * workers)]
    try:
        for conn in clients:
            conn.execute("SELECT 1")
        with psycopg.connect(p.dsn("postgres", dbname="pgbouncer"), autocommit=True) as admin:
            admin.execute("SHUTDOWN WAIT_FOR_CLIENTS", prepare=False)
        time.sleep(0.5)
        assert p.is_running()  # the clients keep it up
        p.signal(signal.SIGTERM)
        assert p.wait(5) == 0
    finally:
        for conn in clients:
            conn.close()
    assert "got SIGTERM while shutting down, fast exit" in p.log_text()
