"""pgmux against PgBouncer and direct PostgreSQL, side by side, interleaved and repeated.

Run ``python -m bench.run`` (or ``python bench/run.py``, or ``bash scripts/bench.sh`` on a fresh machine).
It starts a throwaway PostgreSQL cluster (pgbench scale 10), Debian's PgBouncer, pgmux and pgmux with
``workers = 2`` ("pgmux ×2") with the same configuration (transaction mode, pool 20, max_client_conn 11000,
no connection logging), runs every workload against every target, repetition after repetition, and
writes ``docs/benchmarks.md`` and ``docs/benchmarks.png``. Everything it starts is stopped and deleted at
the end, also on error or Ctrl-C.

The stable metric is the pooler's own CPU time per transaction (``/proc/PID/task/*/schedstat``); TPS on a
small shared machine swings between runs, so every pooler figure comes with its ratio pgmux/PgBouncer from
the same repetition. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"  # noqa: A001

from bench import burst, report  # noqa: E402
from bench.idle import hold_idle_clients  # noqa: E402
from bench.measure import (  # noqa: E402
    RunResult,
    cpu_ns,
    maps_contain,
    nofile_limit,
    rss_kb,
    run_pgbench,
    tree_cpu_ns,
    tree_rss_kb,
)
from bench.workloads import (  # noqa: E402
    POOLER_EXTRA,
    POOLER_KIND,
    POOLERS,
    TARGET_LABEL,
    TARGETS,
    Workload,
    all_workloads,
)
from pgmux import __version__ as PGMUX_VERSION  # noqa: E402
from pgmux.testing.cluster import (  # noqa: E402
    PGBOUNCER_BIN,
    PoolerProcess,
    TempCluster,
    chown_service_user,
    write_config,
)
from pgmux.testing.tls import make_ca  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DB = "testdb"
PASSWORDS = {"md5user": "md5pass", "scramuser": "scrampass"}
RAMP_500 = 4  # extra seconds for pgbench -c 500 to connect its clients (direct: 500 forks)
PG_SETTINGS = {
    # 500 direct clients + 3 poolers x 2 users x 20 servers (pgmux ×2's pools are shared by its workers)
    # + 3 TLS poolers x 20 servers (select-tls) + a fresh pooler for the idle-clients test + the harness's own
    "max_connections": "800",
    "shared_buffers": "256MB",
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# environment


def raise_nofile(need: int) -> tuple[int, int]:
    """Raise our RLIMIT_NOFILE soft limit to ``need`` (the hard limit too when root); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft, hard
    if hard < need and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need, need
    new = min(need, hard) if hard != resource.RLIM_INFINITY else need
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new, hard


def ensure_pooler_nofile(pid: int, need: int) -> int:
    """Make sure a running pooler may open ``need`` files (prlimit on the pooler itself; PgBouncer runs as
    postgres through runuser/pam_limits, so its limit is not necessarily ours). Returns the limit."""
    cur = nofile_limit(pid)
    if cur and cur < need:
        with contextlib.suppress(OSError, ValueError, PermissionError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (need, max(need, cur)))
        cur = nofile_limit(pid)
    return cur


class BenchPooler(PoolerProcess):
    """PoolerProcess whose PgBouncer starts with a raised open-files limit.

    Why here and not in pgmux/testing/cluster.py: only the benchmark needs 10,000+ client sockets. As root,
    PgBouncer runs through ``runuser -u postgres`` whose PAM session (pam_limits) leaves it a soft limit of
    1024, and ``prlimit()`` on another user's process needs CAP_SYS_RESOURCE, which containers often lack.
    So ``prlimit(1)`` goes between runuser and PgBouncer; it execs PgBouncer, which stays runuser's only
    child (what ``PoolerProcess.pid`` relies on). pgmux inherits our own raised limit.
    """

    nofile = 0

    def command(self) -> list[str]:
        cmd = super().command()
        if self.kind == "pgbouncer" and self.nofile and cmd[:1] == ["runuser"] and shutil.which("prlimit"):
            i = cmd.index("--") + 1
            cmd[i:i] = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--"]
        return cmd


def pgmux_default(name: str) -> str:
    """pgmux's default for a setting PgBouncer 1.18 does not have (so it cannot go into the shared ini)."""
    try:
        from pgmux.config.settings import lookup_setting

        d = lookup_setting(name)
        return "unknown" if d is None else str(d.default_text if d.default_text is not None else d.default)
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "pgmux"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        return "unknown"
    if not rev:
        return "unknown"
    return rev + (" + uncommitted changes in pgmux/" if dirty else "")


def loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, workloads: list[Workload]) -> None:
        self.args = args
        self.workloads = workloads
        self.targets = [t for t in TARGETS if t in args.targets]
        self.tmp = ""
        self.cluster: TempCluster | None = None
        self.poolers: dict[str, PoolerProcess] = {}
        # select-tls: separate instances (own ini with client_tls_sslmode = require, own port), since `require`
        # refuses the plain clients of every other workload
        self.tls_poolers: dict[str, PoolerProcess] = {}
        self.tls_files: dict[str, str] = {}  # cert, key: throwaway, made in setup()
        self.extra_poolers: list[PoolerProcess] = []
        self.results: list[RunResult] = []
        self.notes: list[str] = []
        self.info: dict[str, str] = {}
        self.started_at = dt.datetime.now().astimezone()
        self.env = dict(os.environ, PGSSLMODE="disable", PGGSSENCMODE="disable")
        self.env.pop("PGSERVICE", None)
        self.tls_env = dict(self.env, PGSSLMODE="require")
        self.nofile_need = args.max_client_conn + 500

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def tls_targets(self) -> list[str]:
        """The targets of this run that a TLS workload runs against."""
        return [t for t in self.targets if any(w.tls and t in w.targets for w in self.workloads)]

    def make_tls_files(self) -> None:
        """A throwaway CA and a server certificate for localhost/127.0.0.1 (pgmux.testing.tls), in a directory
        given to postgres when root: PostgreSQL and PgBouncer run as postgres, and PostgreSQL wants its key
        0600 and its own."""
        d = os.path.join(self.tmp, "tls")
        os.makedirs(d)
        os.chmod(d, 0o755)
        cert, key = make_ca(d, name="pgmux bench CA").issue_server(d)
        chown_service_user(d)
        self.tls_files = {"cert": str(cert), "key": str(key)}

    # -- setup / teardown
    def setup(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pgmux-bench-")
        os.chmod(self.tmp, 0o755)
        soft, _hard = raise_nofile(self.nofile_need + 200)
        self.info["bench_nofile"] = str(soft)
        settings = dict(PG_SETTINGS)
        if self.tls_targets():
            self.make_tls_files()
            if "direct" in self.tls_targets():
                settings.update(
                    ssl="on", ssl_cert_file=f"'{self.tls_files['cert']}'", ssl_key_file=f"'{self.tls_files['key']}'"
                )
        log("starting a throwaway PostgreSQL cluster" + (" (ssl = on)" if "ssl" in settings else "") + " ...")
        self.cluster = TempCluster(settings=settings)
        self.cluster.start()
        self.cluster.create_test_roles()
        log(f"  PostgreSQL on 127.0.0.1:{self.cluster.port}; pgbench -i -s {self.args.scale} ...")
        init = subprocess.run(
            ["pgbench", "-i", "-s", str(self.args.scale), "-q", self.cluster.socket_dsn(dbname=DB)],
            capture_output=True,
            text=True,
            timeout=1800,
            env=self.env,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{init.stdout}\n{init.stderr}")
        self.cluster.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO md5user, scramuser", dbname=DB)
        self.cluster.execute("VACUUM ANALYZE", dbname=DB)
        self.cluster.execute("CHECKPOINT")
        self.scripts = {}
        for w in self.workloads:
            if w.script:
                path = os.path.join(self.tmp, f"{w.key}.sql")
                Path(path).write_text(w.script)
                self.scripts[w.key] = path
        for target in POOLERS:
            if target in self.targets:
                self.poolers[target] = self.start_pooler(target, target)
        for target in POOLERS:
            if target in self.tls_targets():
                self.tls_poolers[target] = self.start_pooler(target, target + "-tls", tls=True)
        self.collect_info()

    @property
    def server_tls_off(self) -> bool:
        """PostgreSQL has ssl = on (for direct's TLS run): the poolers are told to talk to it in the clear,
        as they do when it has no TLS (their default server_tls_sslmode is prefer)."""
        return "direct" in self.tls_targets()

    def pooler_settings(self, target: str, tls: bool = False) -> dict[str, object]:
        """The shared ini's settings, plus the target's own (``workers = 2`` for pgmux ×2), plus client TLS
        for the TLS instances."""
        settings: dict[str, object] = {
            "default_pool_size": self.args.pool_size,
            "max_client_conn": self.args.max_client_conn,
            "log_connections": 0,
            "log_disconnections": 0,
            **POOLER_EXTRA.get(target, {}),
        }
        if self.server_tls_off:
            settings["server_tls_sslmode"] = "disable"
        if tls:
            settings.update(
                client_tls_sslmode="require",
                client_tls_cert_file=self.tls_files["cert"],
                client_tls_key_file=self.tls_files["key"],
            )
        return settings

    def start_pooler(self, target: str, name: str, tls: bool = False) -> BenchPooler:
        """Start the pooler of ``target`` (pgbouncer, pgmux, pgmux2) in its own workdir and port (``tls``: the
        instance with client_tls_sslmode = require)."""
        assert self.cluster is not None
        workdir = os.path.join(self.tmp, name)
        os.makedirs(workdir, exist_ok=True)
        os.chmod(workdir, 0o755)
        settings = self.pooler_settings(target, tls)
        ini, userlist = write_config(self.cluster, pool_mode="transaction", extra=settings, workdir=workdir)
        proc = BenchPooler(POOLER_KIND[target], ini, userlist, workdir, verbose=False)
        proc.nofile = min(self.nofile_need, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        proc.start()
        limit = ensure_pooler_nofile(proc.pid, self.nofile_need)
        # workers were forked before any prlimit: they have what the supervisor inherited from us
        worker_pids = proc.worker_pids()
        limit = min([x for x in (limit, *(nofile_limit(p) for p in worker_pids)) if x] or [0])
        workers = f", workers {worker_pids}" if proc.workers > 1 else ""
        log(f"  {TARGET_LABEL[target]} ({name}) on 127.0.0.1:{proc.port}, pid {proc.pid}{workers}, "
            f"open files limit {limit}")
        if limit and limit < self.nofile_need:
            self.note(
                f"{TARGET_LABEL[target]}: open files limit {limit} < {self.nofile_need}; "
                "idle-client and login-burst counts may be capped"
            )
        return proc

    def ensure_running(self, target: str, tls: bool = False) -> PoolerProcess:
        """Restart a pooler that died (and say so in the notes), so one crash does not end the run."""
        poolers = self.tls_poolers if tls else self.poolers
        proc = poolers[target]
        if proc.is_running():
            return proc
        tail_text = proc.log_text().strip().splitlines()[-3:]
        label = TARGET_LABEL[target] + (" (TLS instance)" if tls else "")
        self.note(
            f"{label} exited (code {proc.proc.returncode if proc.proc else '?'}) and was restarted; "
            f"log tail: {' / '.join(tail_text)}"
        )
        log(f"  !! {label} is not running; restarting it")
        proc.stop()
        name = target + ("-tls" if tls else "") + f"-restart{len(self.notes)}"
        poolers[target] = self.start_pooler(target, name, tls=tls)
        return poolers[target]

    def close(self) -> None:
        for proc in [*self.poolers.values(), *self.tls_poolers.values(), *self.extra_poolers]:
            with contextlib.suppress(Exception):
                proc.stop()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- info
    def collect_info(self) -> None:
        assert self.cluster is not None
        aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        pgmux_proc = self.poolers.get("pgmux")
        uvloop_used = "unknown"
        if pgmux_proc is not None:
            uvloop_used = "yes" if maps_contain(pgmux_proc.pid, "uvloop") else "no (stdlib asyncio)"
        pgmux2 = self.poolers.get("pgmux2")
        if pgmux2 is not None:
            pids = pgmux2.worker_pids()
            used = ", ".join("yes" if maps_contain(p, "uvloop") else "no" for p in pids)
            self.info["pgmux2_workers"] = f"{len(pids)} worker processes at start (uvloop loaded: {used or '?'})"
        self.info.update(
            date=self.started_at.strftime("%Y-%m-%d %H:%M %Z"),
            machine=f"{os.cpu_count()} CPUs ({aff} usable), {cpu_model()}, {mem_total()} RAM",
            kernel=f"{platform.system()} {platform.release()} ({platform.machine()})",
            load_start=loadavg(),
            postgresql=self.cluster.version(),
            pgbench=first_line(["pgbench", "--version"]),
            pgbouncer=first_line([PGBOUNCER_BIN, "-V"]) if "pgbouncer" in self.targets else "not run",
            pgmux=f"{PGMUX_VERSION} (git {git_revision()})",
            python=f"{platform.python_version()} ({sys.executable})",
            uvloop=f"{dist_version('uvloop')}; loaded by the pgmux process: {uvloop_used}",
            matplotlib=dist_version("matplotlib"),
        )
        if self.tls_targets():
            self.info["tls"] = self.tls_handshakes()

    def tls_handshakes(self) -> str:
        """What each TLS target negotiates (SSLRequest, then a handshake by Python's ssl, no login), e.g.
        'PgBouncer TLSv1.3 TLS_AES_256_GCM_SHA384'."""
        out = []
        for target in self.tls_targets():
            if target == "direct":
                assert self.cluster is not None
                host, port = self.cluster.host, self.cluster.port
            else:
                host, port = self.tls_poolers[target].host, self.tls_poolers[target].port
            try:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                with socket.create_connection((host, port), timeout=5) as sock:
                    sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
                    if sock.recv(1) != b"S":
                        raise RuntimeError("SSLRequest refused")
                    with ctx.wrap_socket(sock) as tls:
                        cipher = tls.cipher()
                        out.append(f"{TARGET_LABEL[target]} {tls.version()} {cipher[0] if cipher else '?'}")
            except Exception as e:  # noqa: BLE001 - informational only
                out.append(f"{TARGET_LABEL[target]} ? ({type(e).__name__}: {str(e).strip()[:80]})")
        return "; ".join(out)

    def how_it_was_run(self) -> list[str]:
        a, i = self.args, self.info
        cpus = os.cpu_count() or 0
        lines = [
            f"- Date: {i['date']}; command: `{a.command_line}`",
            f"- Machine: {i['machine']}; {i['kernel']}; load average at start {i['load_start']}"
            + (f", at end {i['load_end']}" if "load_end" in i else ""),
        ]
        if cpus <= 4:
            lines.append(
                f"- **Only {cpus} CPU cores, shared** by PostgreSQL, pgbench, the pooler under test and other work on "
                "this host: TPS moves by tens of percent between runs; the pooler's CPU per transaction is the "
                "stable metric. Read ratios, not absolute numbers."
            )
        lines += [
            f"- Versions: {i['postgresql']}; {i['pgbench']}; {i['pgbouncer']}; pgmux {i['pgmux']}; "
            f"Python {i['python']}; uvloop {i['uvloop']}; matplotlib {i['matplotlib']}",
            f"- PostgreSQL: throwaway cluster on 127.0.0.1 (TCP for every target), fsync=off, synchronous_commit=off, "
            f"full_page_writes=off, shared_buffers={PG_SETTINGS['shared_buffers']}, "
            f"max_connections={PG_SETTINGS['max_connections']}; pgbench -i -s {a.scale}",
            f"- Poolers (same ini for all): pool_mode=transaction, default_pool_size={a.pool_size}, "
            f"max_client_conn={a.max_client_conn}, auth_type=md5 (SCRAM for scramuser, whose stored secret is "
            "SCRAM), log_connections=0, log_disconnections=0, listen on 127.0.0.1; each started once, on its own "
            "port, and kept running (the idle-clients test and the login burst use fresh instances); "
            f"open files limit ≥ {self.nofile_need}; "
            "pgmux uses its defaults for settings PgBouncer 1.18 lacks "
            f"(max_prepared_statements={pgmux_default('max_prepared_statements')})",
            *(
                [
                    "- **pgmux ×2**: the same pgmux with `workers = 2` added to its ini: a supervisor that forks 2 "
                    "worker processes sharing the port (SO_REUSEPORT) and the pool limits (pool 20 in total, not "
                    f"per worker); {i.get('pgmux2_workers', 'workers not seen')}. Its CPU per transaction is the "
                    "sum over the supervisor and all its workers (the process tree, re-read at every sample; "
                    "\"Every run\" also shows the supervisor's own part), "
                    "its RSS the sum of their VmRSS (pages shared after fork count once per process, so this "
                    "overstates memory). Not in the idle-clients test"
                ]
                if "pgmux2" in self.targets
                else []
            ),
            f"- Runs: {a.reps} repetition(s) × {a.duration} s per pgbench run, `pgbench -n -j 2` "
            "(-j 1 for 1 client), PGSSLMODE=disable (require for the TLS rows); targets interleaved within each "
            "workload and their order rotated every repetition; users md5user (md5) unless stated. pgbench "
            "connects its clients inside -T, so the 500-client runs get -T duration + "
            f"{RAMP_500} s (for every target; reported TPS excludes the connection time)",
            "- TPS: pgbench's `tps =` line (without initial connection time; with -C including reconnection). "
            "Mean and p99 latency: from pgbench's per-transaction log (`-l`), all transactions. "
            "Pooler CPU µs/txn: sum of the first field of `/proc/PID/task/*/schedstat` over the pooler process "
            "(and its child processes, if any), "
            "sampled every 100 ms; the delta over the steady part of the run (10% after the first transaction to "
            "2% before the last) divided by the transactions completed in that window (the raw table also shows the "
            "whole-run figure). RSS: VmRSS of the pooler from /proc/PID/status (summed over its processes)",
            *(
                [
                    "- TLS (`-S TLS`, `-C -S TLS` rows): pgbench with PGSSLMODE=require; the poolers run as separate "
                    "instances (own ini and port, the shared settings plus `client_tls_sslmode = require`, "
                    "`client_tls_cert_file`/`client_tls_key_file`: a throwaway ECDSA P-256 certificate from "
                    "pgmux.testing.tls, started once like the others)"
                    + (
                        "; PostgreSQL runs with `ssl = on` and the same certificate for direct's TLS run, so the "
                        "poolers get `server_tls_sslmode = disable`: their server side stays in the clear, as in "
                        "every other workload"
                        if self.server_tls_off
                        else "; the poolers' server side is in the clear"
                    )
                    + f". Negotiated with Python's ssl as the client: {i.get('tls', '?')}"
                ]
                if self.tls_targets()
                else []
            ),
            f"- Idle clients: {a.idle_clients:,} raw asyncio sockets doing a real md5 login (StartupMessage, "
            "PasswordMessage, wait for ReadyForQuery), 100 logins in flight, held 2 s, then closed; KiB per idle "
            "client = (VmRSS holding − VmRSS before) / clients held, on a fresh pooler process after one warm-up login",
            f"- Login burst: {a.burst_clients:,} raw asyncio sockets ({burst.client_loop()} loop) started at "
            f"once, {a.burst_in_flight} logins in flight, each a real md5 login that runs nothing and stays "
            "connected until the last is in; login time from connect() to ReadyForQuery; pooler CPU (process "
            "tree) over the burst; a fresh pooler process per repetition after one warm-up login (PgBouncer, "
            "pgmux, pgmux ×2)",
            "- Figures are medians over repetitions; every pgmux/PgBouncer (and pgmux/direct, pgmux ×2/PgBouncer) "
            "ratio is the median of per-repetition ratios (the runs of a repetition ran back to back)",
        ]
        return lines

    # -- runs
    def dsn(self, target: str, user: str, tls: bool = False) -> str:
        password = PASSWORDS[user]
        if target == "direct":
            assert self.cluster is not None
            return self.cluster.dsn(user, password, DB)
        return (self.tls_poolers if tls else self.poolers)[target].dsn(user, password, DB)

    def warmup(self) -> None:
        """Fill each pooler's pools (md5 and SCRAM) and PostgreSQL's caches before measuring."""
        log("warm-up ...")
        for target in self.targets:
            for user, extra in (("md5user", ["-c", "20", "-j", "2"]), ("scramuser", ["-c", "20", "-j", "2"])):
                if target != "direct":
                    self.ensure_running(target)
                subprocess.run(
                    ["pgbench", "-n", "-S", "-T", "1", *extra, self.dsn(target, user)],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env=self.env,
                    check=False,
                )
        for target in self.tls_targets():  # the TLS instances: md5user's pool (select-tls runs as md5user)
            if target != "direct":
                self.ensure_running(target, tls=True)
            subprocess.run(
                ["pgbench", "-n", "-S", "-T", "1", "-c", "20", "-j", "2", self.dsn(target, "md5user", tls=True)],
                capture_output=True,
                text=True,
                timeout=120,
                env=self.tls_env,
                check=False,
            )

    def console(self, target: str, commands: tuple[str, ...], tls: bool = False) -> None:
        """Run console commands on a pooler (as its own Unix user, admin by peer credentials)."""
        import psycopg

        proc = (self.tls_poolers if tls else self.poolers)[target]
        with psycopg.connect(proc.unix_dsn("pgbouncer", dbname="pgbouncer"), autocommit=True) as conn:
            for command in commands:
                conn.execute(command.encode(), prepare=False)

    def run_one(self, w: Workload, target: str, rep: int) -> RunResult:
        if w.console and target != "direct":
            self.ensure_running(target, tls=w.tls)
            self.console(target, w.console, w.tls)
        try:
            return self._run_pgbench(w, target, rep)
        finally:
            if w.console_after and target != "direct":
                self.console(target, w.console_after, w.tls)

    def _run_pgbench(self, w: Workload, target: str, rep: int) -> RunResult:
        pid = None
        if target != "direct":
            pid = self.ensure_running(target, tls=w.tls).pid
        args = list(w.args)
        if w.key in self.scripts:
            args += ["-f", self.scripts[w.key]]
        prefix = os.path.join(self.tmp, f"log-{w.key}-{target}-{rep}")
        res = run_pgbench(
            workload=w.key,
            target=target,
            rep=rep,
            pgbench_args=args,
            dsn=self.dsn(target, w.user, tls=w.tls),
            duration=self.args.duration + (RAMP_500 if w.clients >= 500 else 0),
            log_prefix=prefix,
            pooler_pid=pid,
            env=self.tls_env if w.tls else self.env,
            cwd=self.tmp,
            timeout=self.args.duration + 90 + w.clients * 0.2 + (RAMP_500 if w.clients >= 500 else 0),
        )
        proc = (self.tls_poolers if w.tls else self.poolers).get(target)
        if proc is not None and not proc.is_running():
            tail_text = " / ".join(proc.log_text().strip().splitlines()[-2:])
            res.error = (res.error + "; " if res.error else "") + f"{target} exited: {tail_text}"
        return res

    @contextlib.contextmanager
    def _fresh_pooler(self, target: str, name: str, res: RunResult) -> Iterator[BenchPooler]:
        """A pooler process of its own for one run (idle clients, a login burst), stopped and
        removed after it; an exception in the run becomes the run's error ("fails: ...")."""
        proc = self.start_pooler(target, name)
        self.extra_poolers.append(proc)
        try:
            yield proc
        except Exception as e:  # noqa: BLE001 - recorded as "fails: ..."
            res.error = f"{type(e).__name__}: {e}"
        finally:
            proc.stop()
            self.extra_poolers.remove(proc)
            shutil.rmtree(proc.workdir, ignore_errors=True)

    def run_idle(self, target: str, rep: int) -> RunResult:
        """A fresh pooler process, one warm-up login, then N idle clients held."""
        res = RunResult("idle", target, rep)
        with self._fresh_pooler(target, f"{target}-idle-{rep}", res) as proc:
            n = self.args.idle_clients
            warm = asyncio.run(
                hold_idle_clients(proc.host, proc.port, "md5user", PASSWORDS["md5user"], DB, 1, hold=0.2)
            )
            if warm["opened"] != 1:
                res.error = f"warm-up login failed: {warm['first_error']}"
                return res
            time.sleep(0.5)
            before, cpu0 = rss_kb(proc.pid), cpu_ns(proc.pid)
            held: dict[str, int] = {}

            def on_held(opened: int) -> None:
                held.update(rss=rss_kb(proc.pid), cpu=cpu_ns(proc.pid), opened=opened)

            t0 = time.monotonic()
            out = asyncio.run(
                hold_idle_clients(
                    proc.host, proc.port, "md5user", PASSWORDS["md5user"], DB, n, hold=2.0, on_held=on_held
                )
            )
            res.seconds = time.monotonic() - t0
            opened = out["opened"]
            res.rss_kb = held.get("rss")
            if opened == 0:
                res.error = f"no client could log in: {out['first_error']}"
                return res
            res.extra.update(
                held=opened,
                alive=out["alive"],
                failed=out["failed"],
                login_seconds=out["login_seconds"],
                rss_before_kb=before,
                rss_held_kb=held["rss"],
                kib_per_client=(held["rss"] - before) / opened,
                cpu_us_per_login=(held["cpu"] - cpu0) / opened / 1000.0,
            )
            if out["failed"]:
                self.note(
                    f"idle clients via {TARGET_LABEL[target]} (rep {rep + 1}): {out['failed']} of {n} logins failed, "
                    f"first error: {out['first_error']}"
                )
            if out["alive"] != opened:
                self.note(
                    f"idle clients via {TARGET_LABEL[target]} (rep {rep + 1}): {opened - out['alive']} "
                    "connections were closed by the pooler while held"
                )
        return res

    def run_burst(self, target: str, rep: int) -> RunResult:
        """A fresh pooler process, one warm-up login, then the burst: ``--burst-clients`` raw md5 logins
        started at once, ``--burst-in-flight`` in flight, all held until the last is in. The pooler's CPU
        (process tree) from the first connect() to the last client's outcome."""
        res = RunResult("login-burst", target, rep)
        n, in_flight = self.args.burst_clients, self.args.burst_in_flight
        with self._fresh_pooler(target, f"{target}-burst-{rep}", res) as proc:
            warm = burst.run(burst.login_burst(proc.host, proc.port, "md5user", PASSWORDS["md5user"], DB, 1))
            if warm.logged_in != 1:
                res.error = f"warm-up login failed: {warm.first_error}"
                return res
            time.sleep(0.5)
            cpu: dict[str, int] = {"before": tree_cpu_ns(proc.pid)}

            def on_all_in(_res: object) -> None:
                cpu["all_in"] = tree_cpu_ns(proc.pid)

            out = burst.run(
                burst.login_burst(
                    proc.host, proc.port, "md5user", PASSWORDS["md5user"], DB, n,
                    concurrency=in_flight, settle=0.0, on_all_in=on_all_in,
                )
            )
            res.seconds = out.burst_seconds
            if out.logged_in == 0:
                res.error = f"no client could log in: {out.first_error}"
                return res
            cpu_ns_burst = cpu["all_in"] - cpu["before"]
            res.extra.update(
                clients=n,
                in_flight=in_flight,
                logged_in=out.logged_in,
                failed=out.failed,
                first_error=out.first_error,
                error_counts=out.error_counts,
                alive=out.alive,
                burst_s=out.burst_seconds,
                p50_ms=out.pct(50),
                p95_ms=out.pct(95),
                p99_ms=out.pct(99),
                max_ms=out.max_ms,
                cpu_s=cpu_ns_burst / 1e9,
                cpu_us_per_login=cpu_ns_burst / out.logged_in / 1000.0,
            )
            res.p99_ms = out.pct(99)
            res.rss_kb = tree_rss_kb(proc.pid) or None
            if out.failed:
                kinds = "; ".join(f"{c} × {text}" for text, c in list(out.error_counts.items())[:3])
                self.note(
                    f"login burst via {TARGET_LABEL[target]} (rep {rep + 1}): {out.failed} of {n} clients refused "
                    f"or failed: {kinds}"
                )
            if out.alive != out.logged_in:
                self.note(
                    f"login burst via {TARGET_LABEL[target]} (rep {rep + 1}): {out.logged_in - out.alive} of "
                    f"{out.logged_in} logged-in clients were closed by the pooler before the burst ended"
                )
        return res

    # workloads that are not a pgbench run: how each runs, and its log line
    SPECIAL_KINDS: dict[str, tuple[Any, Any]] = {
        "idle": (run_idle, lambda e: (
            f"{e['held']:,} idle clients: RSS {e['rss_before_kb'] / 1024:.1f} -> "
            f"{e['rss_held_kb'] / 1024:.1f} MiB = {e['kib_per_client']:.2f} KiB/client, "
            f"{e['cpu_us_per_login']:.0f} µs CPU/login")),
        "burst": (run_burst, lambda e: (
            f"{e['logged_in']:,}/{e['clients']:,} in, {e['failed']} refused, "
            f"{e['burst_s']:.2f} s; login ms p50 {report.f_ms(e['p50_ms'])} "
            f"p95 {report.f_ms(e['p95_ms'])} p99 {report.f_ms(e['p99_ms'])} "
            f"max {report.f_ms(e['max_ms'])}; CPU {e['cpu_s']:.2f} s "
            f"({e['cpu_us_per_login']:.0f} µs/login)"
            + (f"; first error: {e['first_error']}" if e["failed"] else ""))),
    }

    def run(self) -> None:
        reps = self.args.reps
        for rep in range(reps):
            order = self.targets[rep % len(self.targets) :] + self.targets[: rep % len(self.targets)]
            for w in self.workloads:
                for target in order:
                    if target not in w.targets:
                        continue
                    log_label = f"[rep {rep + 1}/{reps}] {w.key:<14} {TARGET_LABEL[target]:<9}"
                    special = self.SPECIAL_KINDS.get(w.kind)
                    if special is not None:
                        runner, line = special
                        res = runner(self, target, rep)
                        self.results.append(res)
                        log(f"{log_label} {line(res.extra)}" if res.ok else f"{log_label} fails: {res.error}")
                        continue
                    res = self.run_one(w, target, rep)
                    self.results.append(res)
                    if res.ok:
                        cpu = f"  cpu {res.cpu_us:8.1f} µs/txn" if res.cpu_us is not None else ""
                        if "cpu_us_supervisor" in res.extra:
                            cpu += f" ({res.extra['processes']} processes, supervisor "
                            cpu += f"{res.extra['cpu_us_supervisor']:.2f})"
                        rss = f"  rss {res.rss_kb / 1024:.0f} MiB" if res.rss_kb else ""
                        log(
                            f"{log_label} tps {res.tps:9.1f}  mean {report.f_ms(res.mean_ms):>7} ms  "
                            f"p99 {report.f_ms(res.p99_ms):>7} ms{cpu}{rss}"
                        )
                    else:
                        log(f"{log_label} fails: {res.error}")
                    time.sleep(0.5)

    # -- output
    def render(self, interrupted: bool = False) -> str:
        self.info["load_end"] = loadavg()
        s = report.Summary(self.workloads, self.results, self.targets)
        out = ["# pgmux benchmarks: against PgBouncer and direct PostgreSQL", ""]
        out.append(
            "Generated by `bash scripts/bench.sh` / `python -m bench.run` (bench/README.md explains the method). "
            "Do not edit by hand: rerun the benchmark."
        )
        if interrupted:
            out += ["", "**Interrupted run: partial results.**"]
        out += ["", "## How it was run", "", *self.how_it_was_run(), ""]
        out += ["## Throughput and pooler CPU", "", report.throughput_table(s), ""]
        if any(w.key == "prepared" for w in self.workloads):
            out.append(
                "¹ PgBouncer 1.18 cannot run `-M prepared` in transaction mode (protocol-level prepared statements "
                "arrived in 1.21), so that row compares pgmux with direct only."
            )
            out.append("")
        if any(w.tls for w in self.workloads):
            direct = ", and against PostgreSQL with `ssl = on`" if self.server_tls_off else ""
            out.append(
                "TLS rows (`-S TLS`; `-C -S TLS`, a TLS handshake in every transaction): pgbench with PGSSLMODE=require"
                " against each pooler's TLS instance (its own ini and port, "
                f"`client_tls_sslmode = require`){direct}; the poolers' server connections are in the clear. "
                "Pooler CPU per transaction includes the TLS work."
            )
            out.append("")
        prepared = report.prepared_table(s)
        if prepared:
            out += ["## Prepared statements in transaction mode: `-M prepared` against `-M extended`", "",
                    "pgbench -S, 50 clients, pool 20: the same queries with the statement parsed each time "
                    "(extended) or prepared once per client connection (prepared); pgmux prepares each "
                    "statement on whichever server a client lands on.", "", prepared, ""]
            goal = report.prepared_goal(s)
            if goal:
                out += [goal, ""]
        stats_cost = report.query_stats_cost(s)
        if stats_cost:
            out += ["## What per-query statistics cost", "", stats_cost, ""]
        out += ["## Latency", "", report.latency_table(s), ""]
        if any(w.kind == "idle" for w in self.workloads):
            out += [f"## {self.args.idle_clients:,} idle clients", "", report.idle_table(s), ""]
        if any(w.kind == "burst" for w in self.workloads):
            a = self.args
            out += [
                f"## Login burst: {a.burst_clients:,} clients at once, {a.burst_in_flight} in flight",
                "",
                f"{a.burst_clients:,} raw asyncio sockets ({burst.client_loop()} loop) start together, at most "
                f"{a.burst_in_flight} logins in flight; each does a real md5 login (StartupMessage, "
                "PasswordMessage, until ReadyForQuery), runs nothing, and stays connected until the last is in, "
                f"so {a.burst_clients:,} are held at once (max_client_conn={a.max_client_conn}); a fresh pooler "
                "process per repetition after one warm-up login. Login time: connect() to ReadyForQuery (waiting "
                "for a slot not counted). Pooler CPU: its process tree, first connect() to the last login.",
                "",
                report.burst_table(s),
                "",
            ]
        out += ["## Goals of issue 8, this run", "", report.goals_table(s), ""]
        glance = report.glance(s)
        if glance:
            out += ["## At a glance", "", *[f"- {g}" for g in glance], ""]
        if self.notes:
            out += ["## Notes from the run", "", *[f"- {n}" for n in self.notes], ""]
        out += ["![TPS, pooler CPU per transaction and RSS per idle client](benchmarks.png)", ""]
        out += ["## Every run", "", report.raw_table(s), ""]
        return "\n".join(out)

    def write_outputs(self, text: str) -> None:
        outdir = Path(self.args.output_dir)
        outdir.mkdir(parents=True, exist_ok=True)
        md = outdir / "benchmarks.md"
        md.write_text(text)
        log(f"wrote {md}")
        s = report.Summary(self.workloads, self.results, self.targets)
        pgb = (self.info.get("pgbouncer") or "PgBouncer ?").replace("not run", "PgBouncer (not run)")
        pg = self.info.get("postgresql", "").replace("postgres (PostgreSQL)", "PostgreSQL")
        title = (
            f"pgmux {PGMUX_VERSION}{' (and x2: workers = 2)' if 'pgmux2' in self.targets else ''} vs {pgb} "
            f"vs direct {pg}; {os.cpu_count()} shared CPUs; "
            f"{self.args.reps} rep(s) x {self.args.duration} s; {self.info.get('date', '')}"
        )
        why = report.chart(s, str(outdir / "benchmarks.png"), title)
        if why:
            log(f"no chart: {why}")
        else:
            log(f"wrote {outdir / 'benchmarks.png'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [w.key for w in all_workloads()]
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads: " + ", ".join(keys),
    )
    ap.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (10)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, interleaved (3)")
    ap.add_argument("--only", default="", help="comma-separated workloads to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated workloads to leave out")
    ap.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of " + ",".join(TARGETS) + " (pgmux2: pgmux with workers = 2; default: all)",
    )
    ap.add_argument("--idle-clients", type=int, default=10_000, help="idle client connections to hold (10000)")
    ap.add_argument("--burst-clients", type=int, default=2_000, help="clients of the login burst (2000)")
    ap.add_argument("--burst-in-flight", type=int, default=100, help="logins in flight in the login burst (100)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale factor (10)")
    ap.add_argument("--pool-size", type=int, default=20, help="default_pool_size of both poolers (20)")
    ap.add_argument("--max-client-conn", type=int, default=11_000, help="max_client_conn of both poolers (11000)")
    ap.add_argument("--output-dir", default=str(ROOT / "docs"), help="where benchmarks.md/.png go (docs/)")
    ap.add_argument("--no-docs", action="store_true", help="print the report only, write nothing")
    args = ap.parse_args(argv)
    args.command_line = "python -m bench.run" + ("" if not argv else " " + shlex.join(argv))
    for name in ("only", "skip", "targets"):
        setattr(args, name, [x.strip() for x in getattr(args, name).split(",") if x.strip()])
    bad = [k for k in args.only + args.skip if k not in keys] + [t for t in args.targets if t not in TARGETS]
    if bad:
        ap.error(
            f"unknown workload/target: {', '.join(bad)} (workloads: {', '.join(keys)}; targets: {', '.join(TARGETS)})"
        )
    if args.duration < 1 or args.reps < 1:
        ap.error("--duration and --reps must be at least 1")
    if args.idle_clients > args.max_client_conn - 10:
        ap.error("--idle-clients must stay below --max-client-conn")
    if args.burst_clients > args.max_client_conn - 10:
        ap.error("--burst-clients must stay below --max-client-conn")
    if args.burst_clients < 1 or args.burst_in_flight < 1:
        ap.error("--burst-clients and --burst-in-flight must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    workloads = [w for w in all_workloads() if (not args.only or w.key in args.only) and w.key not in args.skip]
    if "pgbouncer" in args.targets and not os.access(PGBOUNCER_BIN, os.X_OK):
        print(f"{PGBOUNCER_BIN} not found: run scripts/setup.sh, or --targets direct,pgmux,pgmux2", file=sys.stderr)
        return 2
    if not shutil.which("pgbench"):
        print("pgbench not found: run scripts/setup.sh", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP act like Ctrl-C: re-raised as SIGINT, so that inside asyncio.run() the runner's own
    # SIGINT handler cancels the idle-client task cleanly, and elsewhere KeyboardInterrupt unwinds to the
    # cleanup. SIGINT is (re)installed because shells start background jobs with SIGINT ignored.
    def on_signal(_signum: int, _frame: object) -> None:
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    bench = Bench(args, workloads)
    interrupted = False
    try:
        bench.setup()
        log("")
        log("How it was run")
        for line in bench.how_it_was_run():
            log("  " + line)
        log("")
        bench.warmup()
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: stopping everything")
    finally:
        bench.close()
    text = bench.render(interrupted)
    log("")
    log(text)
    if interrupted:
        log("(interrupted: docs/ not written)")
        return 130
    if not args.no_docs:
        bench.write_outputs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
