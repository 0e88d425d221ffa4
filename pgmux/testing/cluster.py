"""Throwaway PostgreSQL clusters and pooler subprocesses for tests, the demo and benchmarks.

Why this lives in the package: the integration tests, ``pgmux.demo`` and ``bench/`` all need the same
three things -- a private PostgreSQL cluster, a pooler started as a real subprocess from a
``pgbouncer.ini``, and a way to count server backends -- and they must work identically against pgmux
and against PgBouncer (the oracle).

Conventions:

* Everything binds to 127.0.0.1 on a random port in 20000-32000 (ports >= 32768 collide with ephemeral
  ports, see docs/spec hot-path.md section 6) and retries on EADDRINUSE, so several test runs can share a
  machine.
* initdb, pg_ctl and PgBouncer refuse to run as root, so when we are root they run as ``postgres`` through
  ``runuser -u postgres --``; their directories are chowned to ``postgres``.
* Nothing here imports psycopg at module level, so ``import pgmux.testing.cluster`` costs nothing when the
  test extras are missing.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pgmux.testing.procs import children, process_tree, start_time

__all__ = [
    "BackendSampler",
    "PoolerProcess",
    "TempCluster",
    "find_pg_bindir",
    "free_port",
    "make_dsn",
    "write_config",
    "PGBOUNCER_BIN",
    "TEST_ROLES",
]

PORT_RANGE = (20000, 32000)
PGBOUNCER_BIN = "/usr/sbin/pgbouncer"
RUN_AS = "postgres"

#: The roles create_test_roles() makes, with their passwords (None: no password, trust in pg_hba).
TEST_ROLES: dict[str, str | None] = {"md5user": "md5pass", "scramuser": "scrampass", "trustuser": None}

PG_HBA = """\
# written by pgmux.testing.cluster.TempCluster
local   all   all                      trust
host    all   postgres    127.0.0.1/32 trust
host    all   trustuser   127.0.0.1/32 trust
host    all   md5user     127.0.0.1/32 md5
host    all   all         127.0.0.1/32 scram-sha-256
"""


# --------------------------------------------------------------------------------------------------
# small helpers


def is_root() -> bool:
    """Root cannot run initdb/pg_ctl/pgbouncer; we then switch to RUN_AS."""
    return os.geteuid() == 0


def as_service_user(cmd: Sequence[str]) -> list[str]:
    """Prefix ``cmd`` with runuser when we are root, so PostgreSQL tools accept to run."""
    cmd = [str(c) for c in cmd]
    if is_root():
        return ["runuser", "-u", RUN_AS, "--", *cmd]
    return cmd


def chown_service_user(path: str | os.PathLike[str], recursive: bool = True) -> None:
    """Give ``path`` to RUN_AS when root, because the tools we start run as that user."""
    if not is_root():
        return
    shutil.chown(path, RUN_AS, RUN_AS)
    if recursive and os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    os.lchown(os.path.join(root, name), *_service_ids())


def _service_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(RUN_AS)
    return pw.pw_uid, pw.pw_gid


def find_pg_bindir() -> str:
    """Newest ``/usr/lib/postgresql/*/bin`` with initdb (Debian layout), else pg_config/PATH."""
    candidates = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        ver = os.path.basename(os.path.dirname(d))
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            with contextlib.suppress(ValueError):
                candidates.append((tuple(int(p) for p in ver.split(".")), d))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise FileNotFoundError("no PostgreSQL server binaries found (/usr/lib/postgresql/*/bin); run scripts/setup.sh")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if we can bind host:port right now (no SO_REUSEADDR, like a real listener would see it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", exclude: Iterable[int] = ()) -> int:
    """A random currently-free port in PORT_RANGE; callers must still retry on EADDRINUSE (races)."""
    excluded = set(exclude)
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        if port not in excluded and port_is_free(port, host):
            return port
    raise RuntimeError(f"no free port found in {PORT_RANGE}")


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _quote_conninfo(value: object) -> str:
    s = str(value)
    if s and not re.search(r"[\s'\\]", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def make_dsn(**params: object) -> str:
    """libpq key=value conninfo from keyword arguments (None values are left out)."""
    return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in params.items() if v is not None)


def tail(text: str, lines: int = 40) -> str:
    """Last ``lines`` lines of ``text``, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until truthy and return its value; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def _read(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


# Best-effort safety net: whatever is still running when the interpreter exits gets stopped, so an
# aborted test run does not leave postmasters or poolers behind.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for obj in list(_LIVE):
        with contextlib.suppress(Exception):
            obj.stop()


# --------------------------------------------------------------------------------------------------
# PostgreSQL


class TempCluster:
    """A private PostgreSQL cluster in a fresh temp dir, for one test session or demo run.

    ``start()`` runs initdb and pg_ctl (as ``postgres`` via runuser when root), retrying with another
    port if the chosen one is taken. ``stop()`` stops the server and deletes the directory.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        bindir: str | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        keep: bool = False,
    ) -> None:
        self.bindir = bindir or find_pg_bindir()
        self._requested_port = port
        self.port: int = port or 0
        self.extra_settings = dict(settings or {})
        self.keep = keep
        self.base_dir: str = ""
        self.running = False

    # -- paths
    @property
    def socket_dir(self) -> str:
        """Directory holding ``.s.PGSQL.<port>`` (also the cluster's base dir)."""
        return self.base_dir

    @property
    def datadir(self) -> str:
        return os.path.join(self.base_dir, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.base_dir, "postgres.log")

    def bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def log_text(self) -> str:
        return _read(self.logfile)

    def version(self) -> str:
        return subprocess.run(
            [self.bin("postgres"), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()

    # -- lifecycle
    def _run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            as_service_user(cmd),
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                f"--- server log ---\n{tail(self.log_text())}"
            )
        return proc

    def _settings(self) -> dict[str, str]:
        s = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        s.update(self.extra_settings)
        return s

    def _write_settings(self) -> None:
        lines = [f"{k} = {v}" for k, v in self._settings().items()]
        path = os.path.join(self.datadir, "pgmux_test.conf")
        Path(path).write_text("# written by pgmux.testing.cluster\n" + "\n".join(lines) + "\n")
        chown_service_user(path, recursive=False)

    def start(self) -> TempCluster:
        """initdb + start; retries other ports on EADDRINUSE. Returns self."""
        if self.running:
            return self
        self.base_dir = tempfile.mkdtemp(prefix="pgmux-pg-")
        os.chmod(self.base_dir, 0o755)
        chown_service_user(self.base_dir)
        _LIVE.add(self)
        try:
            self._run(
                [
                    self.bin("initdb"),
                    "-D",
                    self.datadir,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            )
            Path(self.datadir, "pg_hba.conf").write_text(PG_HBA)
            with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
                f.write("\ninclude_if_exists = 'pgmux_test.conf'\n")
            chown_service_user(self.datadir)
            self._start_with_port_retry()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_with_port_retry(self) -> None:
        last = ""
        for _attempt in range(8):
            self.port = self._requested_port or free_port()
            self._write_settings()
            proc = self._run(
                [self.bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60", "start"],
                check=False,
            )
            if proc.returncode == 0:
                self.running = True
                return
            last = f"{proc.stdout}\n{proc.stderr}\n{tail(self.log_text())}"
            if self._requested_port or "already in use" not in self.log_text():
                break
        raise RuntimeError(f"could not start PostgreSQL:\n{last}")

    def restart(self, mode: str = "fast") -> None:
        """pg_ctl restart (e.g. to test server-gone handling); keeps port and data."""
        self._run([self.bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-w", "-m", mode, "restart"])
        self.running = True

    def stop(self, mode: str = "immediate", *, cleanup: bool | None = None) -> None:
        """Stop the server (immediate by default: data is throwaway) and delete its dir unless ``keep``."""
        # postmaster.pid also covers a server whose "pg_ctl start" timed out but which is still coming up
        if self.running or (self.base_dir and os.path.exists(os.path.join(self.datadir, "postmaster.pid"))):
            self._run([self.bin("pg_ctl"), "-D", self.datadir, "-w", "-m", mode, "stop"], check=False)
            self.running = False
        if cleanup is None:
            cleanup = not self.keep
        if cleanup and self.base_dir and os.path.isdir(self.base_dir):
            shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> TempCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- access
    def dsn(self, user: str = "postgres", password: str | None = None, dbname: str = "postgres", **kw: object) -> str:
        """TCP conninfo for a direct (unpooled) connection."""
        return make_dsn(host=self.host, port=self.port, user=user, password=password, dbname=dbname, **kw)

    def socket_dsn(self, user: str = "postgres", dbname: str = "postgres", **kw: object) -> str:
        """Unix-socket conninfo (trust for everyone), used for superuser bookkeeping."""
        return make_dsn(host=self.socket_dir, port=self.port, user=user, dbname=dbname, **kw)

    def connect(self, dbname: str = "postgres", **kw: Any) -> Any:
        """psycopg superuser connection over the Unix socket, autocommit."""
        import psycopg

        kw.setdefault("autocommit", True)
        return psycopg.connect(self.socket_dsn(dbname=dbname), **kw)

    def execute(self, sql: str, dbname: str = "postgres", params: Sequence[Any] | None = None) -> list[tuple]:
        """Run ``sql`` as superuser (autocommit); returns the rows of the last statement (or [])."""
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def create_test_roles(self) -> None:
        """md5user/md5pass (md5), scramuser/scrampass (SCRAM), trustuser, database testdb.

        Idempotent. Default privileges make every table postgres creates in testdb usable by everyone,
        so tests can share fixtures tables across users.
        """
        existing = {r[0] for r in self.execute("SELECT rolname FROM pg_roles")}
        with self.connect() as conn:
            if "md5user" not in existing:
                conn.execute("SET password_encryption = 'md5'")
                conn.execute("CREATE ROLE md5user LOGIN CREATEDB PASSWORD 'md5pass'")
            if "scramuser" not in existing:
                conn.execute("SET password_encryption = 'scram-sha-256'")
                conn.execute("CREATE ROLE scramuser LOGIN CREATEDB PASSWORD 'scrampass'")
            if "trustuser" not in existing:
                conn.execute("CREATE ROLE trustuser LOGIN CREATEDB")
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'testdb'").fetchone():
                conn.execute("CREATE DATABASE testdb OWNER postgres")
            conn.execute("GRANT ALL PRIVILEGES ON DATABASE testdb TO md5user, scramuser, trustuser")
        with self.connect("testdb") as conn:
            conn.execute("GRANT ALL ON SCHEMA public TO PUBLIC")
            conn.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO PUBLIC")
            conn.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO PUBLIC")

    def role_secret(self, role: str) -> str:
        """pg_authid.rolpassword (md5... or SCRAM-SHA-256$...) for userlist.txt pass-through."""
        rows = self.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", params=[role])
        if not rows or rows[0][0] is None:
            raise KeyError(f"role {role!r} has no password")
        return rows[0][0]

    def sessions_started(self, dbname: str = "testdb") -> int:
        """pg_stat_database.sessions (PG14+): backends ever started for ``dbname``, to count reconnects."""
        rows = self.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", params=[dbname])
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def count_backends(self, usename: str | None = None, datname: str | None = None, state: str | None = None) -> int:
        """Number of client backends matching the filters (one-off; use BackendSampler while loading)."""
        sql, params = BackendSampler.query(usename, datname, state)
        return int(self.execute(sql, params=params)[0][0])


class BackendSampler:
    """Background thread sampling pg_stat_activity backends every ``interval`` seconds.

    Why: "the pooler never opens more than N server connections" can only be checked from the server
    side, while the load runs. ``samples`` holds the count per sample, ``pids`` every backend seen (a
    lower bound for short-lived ones).
    """

    @staticmethod
    def query(
        usename: str | None, datname: str | None, state: str | None = None, what: str = "count(*)"
    ) -> tuple[str, list[Any]]:
        sql = f"SELECT {what} FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        params: list[Any] = []
        for col, val in (("usename", usename), ("datname", datname), ("state", state)):
            if val is not None:
                sql += f" AND {col} = %s"
                params.append(val)
        return sql, params

    def __init__(
        self,
        cluster: TempCluster,
        usename: str | None = None,
        datname: str | None = None,
        interval: float = 0.05,
        state: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.sql, self.params = self.query(usename, datname, state, what="pid")
        self.interval = interval
        self.samples: list[int] = []
        self.pids: set[int] = set()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def max(self) -> int:
        return max(self.samples, default=0)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0

    def _loop(self) -> None:
        try:
            with self.cluster.connect() as conn:
                while not self._stop.is_set():
                    rows = conn.execute(self.sql, self.params).fetchall()
                    self.samples.append(len(rows))
                    self.pids.update(r[0] for r in rows)
                    self._stop.wait(self.interval)
        except BaseException as e:  # reported by stop()
            self.error = e

    def start(self) -> BackendSampler:
        self._thread = threading.Thread(target=self._loop, name="backend-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> BackendSampler:
        """Stop sampling; raises if the sampler failed (so a broken sampler cannot pass a test)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.error is not None:
            raise RuntimeError(f"backend sampler failed: {self.error!r}") from self.error
        return self

    def __enter__(self) -> BackendSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


# --------------------------------------------------------------------------------------------------
# pooler configuration


def _userlist_line(user: str, password: str) -> str:
    return '"{}" "{}"'.format(user.replace('"', '""'), password.replace('"', '""'))


def userlist_text(entries: Mapping[str, str]) -> str:
    """auth_file text with one ``"user" "secret"`` line per entry (quotes doubled)."""
    return "".join(_userlist_line(u, p) + "\n" for u, p in entries.items())


WORKDIR_MARKER = "@WORKDIR@"


def write_config(
    cluster: TempCluster,
    *,
    pool_mode: str = "session",
    auth_type: str = "md5",
    databases: Mapping[str, str] | None = None,
    users: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
    userlist: Mapping[str, str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    port: int | None = None,
) -> tuple[str, str]:
    """Build (pgbouncer.ini text, userlist.txt text) for a pooler in front of ``cluster``.

    * ``[databases]`` default: ``testdb`` and ``postgres`` on the cluster. In ``databases`` values,
      ``{host}`` and ``{port}`` are replaced by the cluster's.
    * ``[pgbouncer]``: listen on 127.0.0.1:``port`` (random free port by default; PoolerProcess moves it
      if taken), ``unix_socket_dir`` = ``workdir`` (or the marker ``@WORKDIR@`` that PoolerProcess fills
      in), auth_file=userlist.txt, admin_users=postgres, no logfile (logs go to stderr), then ``extra``
      (which may override any of these; a value of None removes the key).
    * userlist default: md5user with plaintext ``md5pass`` (pooler does md5 itself and logs in to the
      server with the plaintext), scramuser with its real SCRAM secret from pg_authid (so the server
      login needs SCRAM pass-through of the client's keys), trustuser and postgres with "" (both are
      trust on the server side). Note that PgBouncer refuses empty passwords under md5/scram/plain
      ("password authentication failed"; libpq will not even send one), so these two can only log in
      through the pooler with ``auth_type=trust`` (or hba/any). ``userlist`` replaces the default
      completely.
    """
    if databases is None:
        databases = {
            "testdb": "host={host} port={port} dbname=testdb",
            "postgres": "host={host} port={port}",
        }
    if userlist is None:
        userlist = {
            "md5user": "md5pass",
            "scramuser": cluster.role_secret("scramuser"),
            "trustuser": "",
            "postgres": "",
        }
    settings: dict[str, object] = {
        "listen_addr": "127.0.0.1",
        "listen_port": port or free_port(),
        "unix_socket_dir": str(workdir) if workdir is not None else WORKDIR_MARKER,
        "auth_type": auth_type,
        "auth_file": "userlist.txt",
        "admin_users": "postgres",
        "pool_mode": pool_mode,
    }
    for key, value in (extra or {}).items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value

    lines = ["[databases]"]
    lines += [f"{name} = {conn.format(host=cluster.host, port=cluster.port)}" for name, conn in databases.items()]
    if users:
        lines += ["", "[users]"]
        lines += [f"{name} = {value}" for name, value in users.items()]
    lines += ["", "[pgbouncer]"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    ini_text = "\n".join(lines) + "\n"
    return ini_text, userlist_text(userlist)


def ini_get(ini_text: str, key: str, section: str = "pgbouncer") -> str | None:
    """Value of ``key`` in ``[section]`` of a pgbouncer.ini text (last one wins, like PgBouncer)."""
    value = None
    current = None
    for raw in ini_text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(.+)\]", line)
        if m:
            current = m.group(1).strip().lower()
            continue
        if current == section and "=" in line:
            k, v = line.split("=", 1)
            if k.strip().lower() == key.lower():
                value = v.strip()
    return value


def ini_set(ini_text: str, key: str, value: object, section: str = "pgbouncer") -> str:
    """Return ``ini_text`` with ``key = value`` in ``[section]`` (replacing, or appended to the section)."""
    out: list[str] = []
    current = None
    done = False
    section_seen = False
    for raw in ini_text.splitlines():
        line = raw.strip()
        m = re.fullmatch(r"\[(.+)\]", line)
        if m:
            if current == section and not done:
                out.append(f"{key} = {value}")
                done = True
            current = m.group(1).strip().lower()
            section_seen = section_seen or current == section
        elif current == section and "=" in line and line.split("=", 1)[0].strip().lower() == key.lower():
            if not done:
                out.append(f"{key} = {value}")
                done = True
            continue
        out.append(raw)
    if not done:
        if not section_seen:
            out += ["", f"[{section}]"]
        out.append(f"{key} = {value}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# pooler subprocess


def _repo_root() -> str:
    import pgmux

    return str(Path(pgmux.__file__).resolve().parent.parent)


class PoolerProcess:
    """pgmux or PgBouncer as a real subprocess, configured from ini/userlist texts in ``workdir``.

    Why a subprocess: signals, reload, exit codes and error output are part of the drop-in contract and
    can only be tested on a real process. ``start()`` waits until both the TCP port and the Unix socket
    accept (15 s); if the port was taken meanwhile it moves to another one and retries. With pgmux's
    ``workers = N`` it also waits for the N workers, and ``stop()`` kills any worker left behind.

    For PgBouncer, ``runuser`` forks, so ``.pid`` is the PgBouncer process itself (its child) and signals
    go straight to it.
    """

    def __init__(
        self,
        kind: str,
        ini_text: str,
        userlist_text: str,
        workdir: str | os.PathLike[str],
        *,
        executable: str | None = None,
        verbose: bool = True,
    ) -> None:
        if kind not in ("pgmux", "pgbouncer"):
            raise ValueError(f"unknown pooler kind {kind!r}")
        self.kind = kind
        self.workdir = str(workdir)
        self.ini_text = ini_text.replace(WORKDIR_MARKER, self.workdir)
        self.userlist_text = userlist_text
        self.executable = executable or (sys.executable if kind == "pgmux" else PGBOUNCER_BIN)
        self.verbose = verbose
        self.ini_name = "pgmux.ini" if kind == "pgmux" else "pgbouncer.ini"
        self.logfile = os.path.join(self.workdir, "pooler.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int = 0
        # False when the port is not this process's own (socket activation: it shares the service
        # manager's socket), so start() must not move it when it is taken.
        self.owns_port = True
        self.returncode: int | None = None
        self._killed = False

    # -- config
    @property
    def ini_path(self) -> str:
        return os.path.join(self.workdir, self.ini_name)

    @property
    def port(self) -> int:
        return int(ini_get(self.ini_text, "listen_port") or 6432)

    @property
    def host(self) -> str:
        addr = ini_get(self.ini_text, "listen_addr") or "127.0.0.1"
        return "127.0.0.1" if addr in ("*", "0.0.0.0", "") else addr.split(",")[0].strip()

    @property
    def workers(self) -> int:
        """pgmux's ``workers`` setting: how many worker processes the supervisor forks (1: none; PgBouncer: 1)."""
        return int(ini_get(self.ini_text, "workers") or 1) if self.kind == "pgmux" else 1

    @property
    def unix_dir(self) -> str | None:
        d = ini_get(self.ini_text, "unix_socket_dir")
        if d is None:
            return "/tmp"
        return d or None

    @property
    def unix_socket_path(self) -> str | None:
        return os.path.join(self.unix_dir, f".s.PGSQL.{self.port}") if self.unix_dir else None

    def write_files(self) -> None:
        """(Re)write the ini and userlist into workdir; call reload() afterwards to apply."""
        os.makedirs(self.workdir, exist_ok=True)
        Path(self.ini_path).write_text(self.ini_text)
        Path(self.workdir, "userlist.txt").write_text(self.userlist_text)
        if self.kind == "pgbouncer":
            chown_service_user(self.workdir)

    def rewrite_config(self, ini_text: str | None = None, userlist_text: str | None = None) -> None:
        """Replace config texts on disk (without reloading)."""
        if ini_text is not None:
            self.ini_text = ini_text.replace(WORKDIR_MARKER, self.workdir)
        if userlist_text is not None:
            self.userlist_text = userlist_text
        self.write_files()

    def set_options(self, options: Mapping[str, object], section: str = "pgbouncer") -> None:
        """Change ``[section]`` keys in the ini on disk (without reloading)."""
        text = self.ini_text
        for key, value in options.items():
            text = ini_set(text, key, value, section)
        self.rewrite_config(text)

    # -- process
    def command(self) -> list[str]:
        flags = ["-v"] if self.verbose else []
        if self.kind == "pgmux":
            return [self.executable, "-m", "pgmux", *flags, self.ini_name]
        return as_service_user([self.executable, *flags, self.ini_name])

    def env(self) -> dict[str, str]:
        """Environment for the pooler: pgmux must import from this checkout even when not installed."""
        env = dict(os.environ)
        if self.kind == "pgmux":
            root = _repo_root()
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def popen_kwargs(self) -> dict[str, Any]:
        """More arguments for subprocess.Popen (a subclass passes file descriptors)."""
        return {}

    def _child_pid(self, timeout: float = 5.0) -> int:
        """The real pooler pid: runuser forks, the pooler is its only child."""
        assert self.proc is not None
        if self.command()[0] != "runuser":
            return self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = children(self.proc.pid)
            if kids:
                return int(kids[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> PoolerProcess:
        """Start and wait until it accepts connections; raise with the log tail otherwise."""
        _LIVE.add(self)
        for _attempt in range(6):
            if self.owns_port and not port_is_free(self.port, self.host):
                self.ini_text = ini_set(self.ini_text, "listen_port", free_port(exclude=[self.port]))
            self.write_files()
            with open(self.logfile, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env(),
                    start_new_session=True,
                    **self.popen_kwargs(),
                )
            self.pid = self._child_pid()
            self.returncode = None
            self._killed = False
            if self._wait_ready(timeout):
                self._wait_workers(timeout)
                return self
            self._killed = self.proc.poll() is None
            self.stop()
            if "already in use" in self.log_text():
                self.ini_text = ini_set(self.ini_text, "listen_port", free_port(exclude=[self.port]))
                with open(self.logfile, "a") as log:
                    log.write(f"\n--- test harness: port taken, retrying on {self.port} ---\n")
                continue
            break
        what = (
            f"exited with code {self.returncode} before listening"
            if self.returncode is not None and self.returncode >= 0 and not self._killed
            else f"did not start listening within {timeout}s"
        )
        raise RuntimeError(
            f"{self.kind} {what} on {self.host}:{self.port}; command {self.command()} in {self.workdir}\n"
            f"--- log tail ---\n{tail(self.log_text())}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        sock_path = self.unix_socket_path
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                return False
            # the Unix socket lives in our private dir, so it proves the listener on the port is ours
            if (sock_path is None or os.path.exists(sock_path)) and port_accepts(self.host, self.port):
                return True
            time.sleep(0.05)
        return False

    def _wait_workers(self, timeout: float) -> None:
        """With ``workers = N``, wait until N workers are forked and each has logged that it listens (the
        supervisor's socket accepts before that); stop and raise with the log tail otherwise."""
        n = self.workers
        if n <= 1:
            return
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            # each worker logs "pgmux <version> listening on <addr> port <port> (worker i of N)"
            if len(pids) >= n and set(self.log_pids(f" of {n})")) >= set(pids):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"pgmux workers={n}: {len(pids)} worker(s) after {timeout}s, not all listening\n"
            f"--- log tail ---\n{tail(self.log_text())}"
        )

    def worker_pids(self) -> list[int]:
        """The pooler's descendant processes: pgmux's workers (none for PgBouncer or ``workers = 1``)."""
        return process_tree(self.pid)[1:] if self.pid else []

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the pooler process itself (not to runuser)."""
        if self.pid and self.is_running():
            os.kill(self.pid, sig)

    def reload(self) -> None:
        """SIGHUP: PgBouncer-style config reload."""
        self.signal(signal.SIGHUP)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit and return the exit code."""
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; then SIGKILL any worker left behind (pgmux's workers
        run in process groups of their own). Safe to call repeatedly."""
        _LIVE.discard(self)
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            left = [(pid, start_time(pid)) for pid in self.worker_pids()]
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in {self.pid, self.proc.pid}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(10)
            for pid, started in left:
                if started and start_time(pid) == started:  # still the same process, not a reused pid
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
        self.returncode = self.proc.returncode
        return self.returncode

    def __enter__(self) -> PoolerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return _read(self.logfile)

    def log_pids(self, needle: str) -> list[int]:
        """Pids of the processes that logged a line containing ``needle``, in log order."""
        return [int(m.group(1)) for m in re.finditer(r"\[(\d+)\] \w+ (.*)", self.log_text()) if needle in m.group(2)]

    def dsn(self, user: str, password: str | None = None, dbname: str = "testdb", **kw: object) -> str:
        """TCP conninfo through the pooler."""
        kw.setdefault("host", self.host)
        kw.setdefault("port", self.port)
        return make_dsn(user=user, password=password, dbname=dbname, **kw)

    def unix_dsn(self, user: str, password: str | None = None, dbname: str = "testdb", **kw: object) -> str:
        """Unix-socket conninfo through the pooler."""
        return make_dsn(host=self.unix_dir, port=self.port, user=user, password=password, dbname=dbname, **kw)
