"""Side-by-side demo: PostgreSQL direct vs through pgmux, on a throwaway cluster.

Run ``python3 -m pgmux.demo`` (or ``scripts/demo.sh``). It starts its own PostgreSQL cluster and pgmux
(session pool mode, default_pool_size 10) as a subprocess, then measures

* average connect+close time with psycopg (200 times),
* pgbench ``-C -S`` (a new connection per transaction) and plain ``pgbench -S``, 8 clients, 5 s,
* how many PostgreSQL backends each variant used (max concurrent, sampled from pg_stat_activity every
  50 ms, and backends started, from pg_stat_database.sessions),

and prints the table with ratios. When PgBouncer is installed (``/usr/sbin/pgbouncer``) it is measured too,
with the same ini and the same pgbench runs, as a third column (``--no-pgbouncer`` leaves it out; the output
says when it is not installed). Everything it starts is stopped and deleted at the end, also on error or
Ctrl-C. ``--pooler pgbouncer`` runs the harness against PgBouncer alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from pgmux import __version__
from pgmux.testing.cluster import PGBOUNCER_BIN, BackendSampler, PoolerProcess, TempCluster, write_config

USER, PASSWORD, DB = "md5user", "md5pass", "testdb"
POOL_SIZE = 10
LABEL = {"direct": "direct", "pgmux": "pgmux", "pgbouncer": "PgBouncer"}


@dataclass
class Column:
    """One target (direct or a pooler) and its measurements."""

    name: str
    dsn: str
    results: dict[str, float] = field(default_factory=dict)


def measure_connect(dsn: str, n: int) -> float:
    """Average ms for psycopg connect + close (includes md5 authentication)."""
    import psycopg

    with psycopg.connect(dsn) as conn:  # warm-up: a pooler opens its first server connection here
        conn.execute("SELECT 1")
    start = time.perf_counter()
    for _ in range(n):
        psycopg.connect(dsn).close()
    return (time.perf_counter() - start) / n * 1000.0


def run_pgbench(cluster: TempCluster, dsn: str, args: list[str], duration: int) -> tuple[float, int, int, str]:
    """(tps, max concurrent backends, backends started, raw output) for one pgbench run."""
    cmd = ["pgbench", "-n", "-S", "-c", "8", "-j", "2", "-T", str(duration), *args, dsn]
    sessions_before = cluster.sessions_started(DB)
    pids_before = {r[0] for r in cluster.execute(BackendSampler.query(USER, DB, what="pid")[0], params=[USER, DB])}
    with BackendSampler(cluster, usename=USER, datname=DB, interval=0.05) as sampler:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=False)
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:-1])} failed:\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"^tps = ([\d.]+)", proc.stdout, re.M)
    if not m:
        raise RuntimeError(f"cannot parse pgbench output:\n{proc.stdout}")
    time.sleep(0.2)  # let the last backends report their exit to the stats system
    # both are lower bounds: the sampler misses short-lived backends, and a backend may not have
    # flushed its session count to the stats system yet
    started = max(cluster.sessions_started(DB) - sessions_before, len(sampler.pids - pids_before))
    return float(m.group(1)), sampler.max, started, proc.stdout


def measure_all(cluster: TempCluster, col: Column, args: argparse.Namespace) -> None:
    """All measurements for one target, filling ``col.results``."""
    print(f"measuring {col.name}: connect+close x{args.connects} ...", flush=True)
    col.results["connect"] = measure_connect(col.dsn, args.connects)
    print(f"measuring {col.name}: pgbench -C -S ...", flush=True)
    tps, mx, started, _ = run_pgbench(cluster, col.dsn, ["-C"], args.duration)
    col.results.update(tps_C=tps, max_C=mx, started_C=started)
    print(f"measuring {col.name}: pgbench -S ...", flush=True)
    tps, mx, started, _ = run_pgbench(cluster, col.dsn, [], args.duration)
    col.results.update(tps=tps, max=mx, started=started)


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return "not installed"
    return out.splitlines()[0].strip() if out else "unknown"


def fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "tps":
        return f"{value:,.0f}"
    return f"{value:.0f}"


ROWS = [
    ("connect", "connect+close, avg", "ms"),
    ("tps_C", "pgbench -C -S tps", "tps"),
    ("max_C", "  backends, max concurrent", "n"),
    ("started_C", "  new backends in run", "n"),
    ("tps", "pgbench -S tps", "tps"),
    ("max", "  backends, max concurrent", "n"),
    ("started", "  new backends in run", "n"),
]


def print_table(columns: list[Column]) -> None:
    """One row per measurement, one column per target, then each pooler against direct (and pgmux against
    PgBouncer when both ran)."""
    direct = columns[0]
    by_name = {c.name: c for c in columns}
    pairs = [(c, direct) for c in columns[1:]]
    if "pgmux" in by_name and "PgBouncer" in by_name:
        pairs.append((by_name["pgmux"], by_name["PgBouncer"]))
    headers = ["", *[c.name for c in columns], *[f"{a.name}/{b.name}" for a, b in pairs]]
    table = [headers]
    for key, label, unit in ROWS:
        row = [label, *[fmt(c.results[key], unit) for c in columns]]
        for a, b in pairs:
            base = b.results[key]
            row.append(f"{a.results[key] / base:.2f}x" if base else "-")
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgmux.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pooler", choices=["pgmux", "pgbouncer"], default="pgmux", help="pooler to demo")
    ap.add_argument(
        "--no-pgbouncer", action="store_true", help="leave PgBouncer out (by default it is shown when installed)"
    )
    ap.add_argument(
        "--compare-pgbouncer", action="store_true", help="require PgBouncer as a third column (fail if not installed)"
    )
    ap.add_argument("--connects", type=int, default=200, help="connect+close repetitions (200)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per pgbench run (5)")
    args = ap.parse_args(argv)

    have_pgbouncer = os.access(PGBOUNCER_BIN, os.X_OK)
    if (args.compare_pgbouncer or args.pooler == "pgbouncer") and not have_pgbouncer:
        print(f"{PGBOUNCER_BIN} not found; install pgbouncer or drop the option", file=sys.stderr)
        return 2
    kinds = [args.pooler]
    pgbouncer_note = ""
    if args.pooler != "pgbouncer":
        if args.no_pgbouncer:
            pgbouncer_note = "PgBouncer: left out (--no-pgbouncer)"
        elif have_pgbouncer:
            kinds.insert(0, "pgbouncer")  # columns: direct, PgBouncer, pgmux
        else:
            pgbouncer_note = (
                f"PgBouncer: not installed ({PGBOUNCER_BIN} not found), so not shown; "
                "scripts/setup.sh installs it (apt-get install pgbouncer)"
            )
    if pgbouncer_note:
        print(pgbouncer_note, flush=True)

    cluster = TempCluster()
    poolers: list[PoolerProcess] = []
    try:
        print("starting a throwaway PostgreSQL cluster ...", flush=True)
        cluster.start()
        cluster.create_test_roles()
        init = subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", cluster.dsn(USER, PASSWORD, DB)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{init.stderr}")
        cluster.execute("VACUUM ANALYZE", dbname=DB)

        # One target at a time, so that idle pooled server connections of one pooler are not counted
        # as backends of the next target.
        direct = Column("direct", cluster.dsn(USER, PASSWORD, DB))
        measure_all(cluster, direct, args)
        columns = [direct]
        for kind in kinds:
            workdir = tempfile.mkdtemp(prefix=f"pgmux-demo-{kind}-")
            os.chmod(workdir, 0o755)
            ini, userlist = write_config(
                cluster,
                workdir=workdir,
                pool_mode="session",
                extra={"default_pool_size": POOL_SIZE, "max_client_conn": 200},
            )
            proc = PoolerProcess(kind, ini, userlist, workdir, verbose=False)
            poolers.append(proc)
            print(f"starting {LABEL[kind]} on 127.0.0.1:{proc.port} ...", flush=True)
            proc.start()
            col = Column(LABEL[kind], proc.dsn(USER, PASSWORD, DB))
            measure_all(cluster, col, args)
            columns.append(col)
            proc.stop()

        print()
        print("How it was run")
        print(f"  pgmux {__version__}, Python {platform.python_version()} ({sys.executable})")
        print(f"  {cluster.version()}; {tool_version(['pgbench', '--version'])}")
        if "pgbouncer" in kinds:
            print(f"  {tool_version([PGBOUNCER_BIN, '-V'])}")
        if pgbouncer_note:
            print(f"  {pgbouncer_note}")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"  {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, load average {load}")
        print(f"  PostgreSQL on 127.0.0.1:{cluster.port}: fsync=off, max_connections=300")
        print(
            f"  poolers: pool_mode=session, default_pool_size={POOL_SIZE}, auth_type=md5, max_client_conn=200, "
            "logging at default level"
        )
        print(
            f"  user {USER} (md5 auth on every path), pgbench scale 1, select-only (-S), "
            f"8 clients, 2 threads, {args.duration} s per run; connect test: {args.connects} x psycopg "
            "connect+close over TCP"
        )
        print(
            "  targets measured one after the other (a pooler is stopped before the next starts), "
            "every pooler with the same settings"
        )
        print(
            "  backends: max concurrent sampled from pg_stat_activity every 50 ms; new = the larger of "
            "the pg_stat_database.sessions delta and new pids seen"
        )
        print()
        print_table(columns)
        print()
        print("-C opens a new connection per transaction: direct, every transaction forks a PostgreSQL backend;")
        print("through a pooler the client connection is cheap and the server connections are reused.")
        return 0
    finally:
        for proc in poolers:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
