"""Management commands of the example project: ``pgmux``, ``pgmux_config``, ``pgmux_stats``, and ``test``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import psycopg
import pytest
from djhelpers import SHOP, ManagedPooler, example_env, start_managed_pooler

from pgmux.testing.cluster import PGBOUNCER_BIN, PoolerProcess, TempCluster, free_port, ini_get, ini_set
from pgmux.testing.djangoapp import manage

pytestmark = pytest.mark.pgmux_only


def connect(port: int, dbname: str = "shop") -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, dbname=dbname, user=SHOP["user"], password=SHOP["password"],
                           autocommit=True, sslmode="disable")


def test_manage_py_pgmux_serves_the_settings_database(shop_pooler: ManagedPooler) -> None:
    with connect(shop_pooler.port) as conn:
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("shop", "shop")
        assert conn.info.parameter_status("TimeZone") == "UTC"
    # the '*' entry: any other database of the server, as Django's test runner needs
    with connect(shop_pooler.port, "postgres") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)
    # the application user reads the console (stats_users)
    with psycopg.connect(host="127.0.0.1", port=shop_pooler.port, dbname="pgbouncer", user="shop", password="shop",
                         autocommit=True, cursor_factory=psycopg.ClientCursor, sslmode="disable") as conn:
        modes = {r[0]: r[-2] for r in conn.execute("SHOW POOLS").fetchall()}
    assert modes["shop"] == "transaction"
    assert "listening on 127.0.0.1" in shop_pooler.log_text()


def test_pgmux_stats_prints_pools_clients_servers(shop_pooler: ManagedPooler) -> None:
    proc = manage(shop_pooler.env, "pgmux_stats")
    assert proc.returncode == 0, proc.stderr
    for title in ("SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS"):
        assert title in proc.stdout
    assert "cl_waiting" in proc.stdout and "maxwait" in proc.stdout
    proc = manage(shop_pooler.env, "pgmux_stats", "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"total_xact_count"' in proc.stdout
    proc = manage(shop_pooler.env, "pgmux_stats", "nonsense")
    assert proc.returncode != 0 and "unknown" in proc.stderr


def test_pgmux_stats_queries_lists_the_statements(shop_pooler: ManagedPooler) -> None:
    with connect(shop_pooler.port) as conn:
        for i in range(3):
            conn.execute(f"SELECT {i} AS pgmux_stats_probe", prepare=False)
    proc = manage(shop_pooler.env, "pgmux_stats", "--queries")
    assert proc.returncode == 0, proc.stderr
    assert "SHOW QUERIES" in proc.stdout and "SHOW POOLS" not in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "SELECT $1 AS pgmux_stats_probe" in ln)
    assert [c.strip() for c in line.split("|")][1] == "3"  # calls
    proc = manage(shop_pooler.env, "pgmux_stats", "--queries", "--json", "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["queries"]) == 1 and data["dashboard"] is None


def test_manage_py_pgmux_stops_cleanly_and_prints_config(shop_db: TempCluster, tmp_path: Path) -> None:
    mp = start_managed_pooler(shop_db, tmp_path)
    with connect(mp.port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    first_line = mp.log_text().splitlines()[0]
    workdir = Path(first_line.split("config in ")[1].rstrip(")")).parent
    assert workdir.is_dir()
    assert mp.stop() == 0
    assert not workdir.exists(), "the temporary config directory is removed"

    proc = manage(example_env(shop_db, 6543), "pgmux", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "listen_port = 6543" in proc.stdout
    assert "* = host=127.0.0.1" in proc.stdout and "pool_mode = transaction" in proc.stdout


def test_pgmux_config_is_runnable_by_pgmux(shop_db: TempCluster, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "deploy"
    proc = manage(example_env(shop_db, port), "pgmux_config", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    ini, users = out / "pgbouncer.ini", out / "userlist.txt"
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    assert users.read_text() == '"shop" "shop"\n'
    ini_text = ini.read_text()
    assert ini_get(ini_text, "auth_file") == str(users)
    assert ini_get(ini_text, "pin_session_state") == "auto"
    workdir = tmp_path / "run"
    workdir.mkdir()
    ini_text = ini_set(ini_set(ini_text, "auth_file", "userlist.txt"), "unix_socket_dir", str(workdir))
    p = PoolerProcess("pgmux", ini_text, users.read_text(), workdir).start()
    try:
        with connect(p.port) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("shop",)
    finally:
        p.stop()


def test_pgmux_config_for_pgbouncer(shop_db: TempCluster) -> None:
    port = free_port()
    proc = manage(example_env(shop_db, port), "pgmux_config", "--flavor", "pgbouncer")
    assert proc.returncode == 0, proc.stderr
    ini_text, userlist = proc.stdout.split("; ---- userlist.txt ----\n")
    assert "pin_session_state" not in ini_text and "max_prepared_statements" not in ini_text
    if not os.access(PGBOUNCER_BIN, os.X_OK):
        pytest.skip("PgBouncer is not installed")
    workdir = tempfile.mkdtemp(prefix="pgmux-django-pgb-")  # not under pytest's 0700 tmp: PgBouncer runs as postgres
    os.chmod(workdir, 0o755)
    ini_text = ini_set(ini_text, "unix_socket_dir", workdir)
    p = PoolerProcess("pgbouncer", ini_text, userlist, workdir)
    try:
        p.start()
        with connect(p.port) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("shop",)
    finally:
        p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_manage_py_test_passes_through_pgmux(shop_pooler: ManagedPooler) -> None:
    """The example's own test suite, test database and parallel clones included, through the pooler."""
    proc = manage(shop_pooler.env, "test", "--noinput", "--parallel", "2", "-v", "2", timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Creating test database for alias 'default' ('test_shop')" in output
    assert "OK" in output
    log = shop_pooler.log_text()
    assert "test_shop/shop@" in log and "test_shop_1/shop@" in log, "test databases went through pgmux"
