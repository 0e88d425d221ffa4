"""Django's own test suite through pgmux, in one command (docs/django.md, "Django's own test suite through pgmux").

    python -m bench.django_suite                               # backends transactions queries select_for_update
    python -m bench.django_suite --apps backends basic --parallel 2
    python -m bench.django_suite --pooler pgbouncer            # the contrast: PgBouncer 1.18 fails at the clone
    python -m bench.django_suite --pooler direct               # baseline, no pooler

What it does:

1. Fetches the Django sdist matching the installed Django (``pip download django==<version> --no-binary :all:
   --no-deps``) into ``~/.cache/pgmux/django/`` once and unpacks it there: its ``tests/`` holds
   ``runtests.py`` and the suite.
2. Starts a throwaway PostgreSQL (``TempCluster``) with a role ``django`` (password ``django``, SUPERUSER
   CREATEDB LOGIN: ``postgres_tests`` creates extensions) and the databases ``django`` and ``django_other``.
3. Starts the pooler in transaction mode (``write_config`` + ``PoolerProcess``) with a single ``*``
   database entry pointing at the cluster, so ``test_django``, its parallel clones ``test_django_N`` and
   ``postgres`` are all reached through it, and a userlist with the role's plaintext password.
   ``--pooler pgbouncer`` runs Debian's PgBouncer from the same configuration; ``--pooler direct`` none.
4. Writes a settings module like the guide's ``test_pgmux.py`` (``pgmux.django.database(...)``,
   ``conn_max_age=0``, aliases ``default`` and ``other``) and runs
   ``tests/runtests.py --noinput --settings=test_pgmux --parallel=N <apps>`` against the pooler's port.
5. Prints how it ran, the runner's summary lines and exit code, the pooler's warning/error lines, and
   stops everything (also on errors and Ctrl-C). The pooler and server logs are copied to
   ``~/.cache/pgmux/django-suite-logs/``. Exit status: the runner's (non-zero if the suite fails), or 1
   if the pooler died during the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python bench/django_suite.py
    sys.path.insert(0, str(ROOT))

import pgmux  # noqa: E402
from pgmux.testing.cluster import PGBOUNCER_BIN, PoolerProcess, TempCluster, write_config  # noqa: E402

DEFAULT_APPS = ["backends", "transactions", "queries", "select_for_update"]
ROLE = PASSWORD = "django"
DATABASES = ("django", "django_other")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgmux"

SETTINGS = '''\
# written by bench/django_suite.py: the settings of docs/django.md ("Django's own test suite through pgmux")
import os

import pgmux.django

common = {"conn_max_age": 0, "port": int(os.environ["PGMUX_PORT"]), "server_port": int(os.environ["PG_PORT"])}
if os.environ.get("DJANGO_SUITE_POOLER") == "pgbouncer":
    common["pooler"] = "pgbouncer"  # PgBouncer cannot pin: server-side cursors off
DATABASES = {
    "default": pgmux.django.database("django", "django", "django", **common),
    "other": pgmux.django.database("django_other", "django", "django", **common),
}
if os.environ.get("DJANGO_SUITE_POOLER") == "direct":
    DATABASES = {alias: pgmux.django.direct(entry) for alias, entry in DATABASES.items()}
INSTALLED_APPS = ["pgmux.django"]   # for `django-admin pgmux`; runtests.py installs its own apps
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
'''

#: the runner's closing lines (unittest's "Ran ..." and "OK"/"FAILED (...)", and the crashes before that)
SUMMARY = re.compile(r"^(Found \d+ test.*|Ran \d+ tests? in [\d.]+s|OK\b.*|FAILED\b.*|Got an error .*|DETAIL: .*)$")
#: exception lines, shown when the runner stops before its summary
CRASH = re.compile(r"^\S*(Error|Exception|Interrupt): .*$")
#: pooler log lines the suite causes on purpose
EXPECTED = {"password authentication failed": "expected: backends.tests test_unicode_password sends a wrong password"}
POOLER_PROBLEM = re.compile(r"\b(WARNING|ERROR|FATAL|CRITICAL|Traceback)\b|\bwarning:|\berror:", re.I)


def log(msg: str) -> None:
    print(f"[django_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Interrupted(Exception):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so everything started gets stopped."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------------------------------
# the Django sdist


def django_tests(version: str, cache: Path) -> Path:
    """``tests/`` of the Django sdist ``version``, downloaded and unpacked into ``cache`` once."""
    cache.mkdir(parents=True, exist_ok=True)
    tree = cache / f"django-{version}"
    if (tree / "tests" / "runtests.py").exists():
        return tree / "tests"
    sdists = [p for p in cache.glob("*.tar.gz") if p.name.lower() == f"django-{version}.tar.gz"]
    if not sdists:
        log(f"downloading the Django {version} sdist into {cache}")
        cmd = [sys.executable, "-m", "pip", "download", f"django=={version}", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        sdists = [p for p in cache.glob("*.tar.gz") if p.name.lower() == f"django-{version}.tar.gz"]
        if proc.returncode or not sdists:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache))
    try:
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = [p for p in tmp.iterdir() if p.is_dir()]
        if len(unpacked) != 1 or not (unpacked[0] / "tests" / "runtests.py").exists():
            raise RuntimeError(f"{sdists[0]} has no tests/runtests.py")
        shutil.rmtree(tree, ignore_errors=True)
        unpacked[0].rename(tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree / "tests"


# --------------------------------------------------------------------------------------------------
# server and pooler


def setup_cluster(cluster: TempCluster) -> None:
    with cluster.connect() as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(f"CREATE ROLE {ROLE} SUPERUSER CREATEDB LOGIN PASSWORD '{PASSWORD}'")
        for name in DATABASES:
            conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")


def start_pooler(cluster: TempCluster, kind: str, workdir: str, verbose: bool) -> PoolerProcess:
    """pgmux or PgBouncer in transaction mode; ``*`` reaches every database of the cluster."""
    ini, userlist = write_config(
        cluster,
        pool_mode="transaction",
        auth_type="scram-sha-256",
        databases={"*": "host={host} port={port}"},
        userlist={ROLE: PASSWORD},
        extra={"admin_users": None, "stats_users": ROLE, "max_client_conn": 200},
    )
    pooler = PoolerProcess(kind, ini, userlist, workdir, verbose=verbose)
    return pooler.start()


def pooler_version(kind: str) -> str:
    if kind == "pgmux":
        return f"pgmux {pgmux.__version__}"
    if kind == "pgbouncer":
        out = subprocess.run([PGBOUNCER_BIN, "--version"], capture_output=True, text=True, check=False).stdout
        return out.splitlines()[0].strip() if out else "PgBouncer (unknown version)"
    return "none (direct)"


def problem_lines(text: str, limit: int) -> tuple[int, list[str]]:
    """(count, the first ``limit``) of the log's warning/error lines."""
    lines = [line for line in text.splitlines() if POOLER_PROBLEM.search(line)]
    return len(lines), lines[:limit]


# --------------------------------------------------------------------------------------------------
# the runner


def run_suite(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, quiet: bool) -> tuple[int, list[str]]:
    """Run runtests.py in its own process group, echo its output, return (exit code, summary lines)."""
    summary: list[str] = []
    crash: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, start_new_session=True)

    def kill(sig: int = signal.SIGTERM) -> None:  # the runner and its parallel workers
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        kill()

    watchdog = threading.Timer(timeout, on_timeout)
    watchdog.daemon = True
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not quiet:
                sys.stdout.write(line)
                sys.stdout.flush()
            stripped = line.rstrip("\n")
            if SUMMARY.match(stripped):
                summary.append(stripped)
            elif CRASH.match(stripped):
                crash = (crash + [stripped])[-3:]
        rc = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # interrupted
            kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                kill(signal.SIGKILL)
                proc.wait(10)
    if not any(line.startswith("Ran ") for line in summary):
        summary += crash
    if timed_out.is_set():
        summary.append(f"(killed after {timeout:g} s)")
    return rc, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apps", nargs="+", default=DEFAULT_APPS, help=f"test labels (default: {' '.join(DEFAULT_APPS)})")
    ap.add_argument("--parallel", type=int, default=2, help="runtests.py --parallel (default 2)")
    ap.add_argument("--pooler", choices=("pgmux", "pgbouncer", "direct"), default="pgmux")
    ap.add_argument("--verbosity", type=int, default=1, help="runtests.py --verbosity (default 1)")
    ap.add_argument("--timeout", type=float, default=3600, help="give up on the runner after this many seconds")
    ap.add_argument("--cache-dir", type=Path, default=CACHE / "django", help="where the Django sdist is kept")
    ap.add_argument("--log-dir", type=Path, default=CACHE / "django-suite-logs",
                    help="where the pooler and PostgreSQL logs are copied at the end")
    ap.add_argument("--pooler-verbose", action="store_true", help="start the pooler with -v (debug log)")
    ap.add_argument("--quiet", action="store_true", help="do not echo the runner's output, only the summary")
    args = ap.parse_args(argv)

    import django

    version = django.__version__
    if args.pooler == "pgbouncer" and not os.access(PGBOUNCER_BIN, os.X_OK):
        log(f"{PGBOUNCER_BIN} missing (apt-get install pgbouncer)")
        return 2

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    cluster = TempCluster()
    pooler: PoolerProcess | None = None
    workdir = tempfile.mkdtemp(prefix="pgmux-django-suite-")
    os.chmod(workdir, 0o755)
    rc: int = 1
    summary: list[str] = []
    started = time.monotonic()
    elapsed = 0.0
    pooler_died = False
    try:
        tests_dir = django_tests(version, args.cache_dir)
        cluster.start()
        setup_cluster(cluster)
        if args.pooler != "direct":
            pooler = start_pooler(cluster, args.pooler, os.path.join(workdir, "pooler"), args.pooler_verbose)
        port = pooler.port if pooler else cluster.port

        settings_dir = Path(workdir, "settings")
        settings_dir.mkdir()
        (settings_dir / "test_pgmux.py").write_text(SETTINGS)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(settings_dir), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.update({"PGMUX_PORT": str(port), "PG_PORT": str(cluster.port), "DJANGO_SUITE_POOLER": args.pooler,
                    "PYTHONUNBUFFERED": "1"})
        env.pop("DJANGO_SETTINGS_MODULE", None)
        cmd = [sys.executable, "runtests.py", "--noinput", "--settings=test_pgmux", f"--parallel={args.parallel}",
               f"--verbosity={args.verbosity}", *args.apps]

        import psycopg

        mode = "transaction mode, `*` entry" if pooler else "no pooler"
        log(f"Django {version} (sdist tests in {tests_dir}), Python {platform.python_version()}, "
            f"psycopg {psycopg.__version__}")
        log(f"{cluster.version()} on 127.0.0.1:{cluster.port}")
        log(f"pooler: {pooler_version(args.pooler)}, {mode}" + (f", on 127.0.0.1:{port}" if pooler else ""))
        log(f"apps: {' '.join(args.apps)}; --parallel={args.parallel}")
        log(f"running (cwd {tests_dir}): {' '.join(cmd[1:])}")
        started = time.monotonic()
        rc, summary = run_suite(cmd, tests_dir, env, args.timeout, args.quiet)
        elapsed = time.monotonic() - started
        if pooler is not None and not pooler.is_running():
            pooler_died = True
            log(f"the pooler exited during the run (code {pooler.proc.poll() if pooler.proc else '?'})")
    except (KeyboardInterrupt, Interrupted) as e:
        name = e.args[0] if isinstance(e, Interrupted) else "SIGINT"
        log(f"interrupted ({name}): stopping")
        rc = 128 + int(getattr(signal, name, signal.SIGINT))
        elapsed = time.monotonic() - started
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # do not abandon the cleanup halfway
        pooler_log = ""
        if pooler is not None:
            pooler.stop()
            pooler_log = pooler.log_text()
        server_log = cluster.log_text() if cluster.base_dir else ""
        cluster.stop()
        with contextlib.suppress(OSError):
            args.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name, text in ((f"{args.pooler}-{stamp}-pooler.log", pooler_log),
                               (f"{args.pooler}-{stamp}-postgres.log", server_log)):
                if text:
                    (args.log_dir / name).write_text(text)
                    log(f"kept {args.log_dir / name}")
        shutil.rmtree(workdir, ignore_errors=True)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    if pooler_log and args.pooler == "pgmux":
        drains = len(re.findall(r"drained connections to ", pooler_log))
        log(f"pgmux drained its server connections before {drains} DROP DATABASE / CREATE DATABASE ... TEMPLATE")
    if pooler_log:
        count, lines = problem_lines(pooler_log, 15)
        log(f"pooler log: {count} warning/error line(s)" + (":" if lines else ""))
        for line in lines:
            notes = [note for text, note in EXPECTED.items() if text in line]
            print("    " + line + (f"  ({notes[0]})" if notes else ""))
    print()
    how = f"through {pooler_version(args.pooler)} (transaction mode)" if args.pooler != "direct" else "direct"
    print(f"Django {version} runtests.py {how}, --parallel={args.parallel}, apps: {' '.join(args.apps)}")
    for line in summary:
        print(f"  {line}")
    if not summary:
        print("  (no summary line from the runner)")
    print(f"  exit code {rc}, {elapsed:.1f} s")
    if pooler_died and rc == 0:
        rc = 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
