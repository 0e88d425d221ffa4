"""A picture of pgmux's live dashboard under a real load, for README (docs/images/dashboard.png).

    python -m bench.dashboard_shot [--seconds 40] [--out docs/images/dashboard.png]

A throwaway PostgreSQL cluster, pgbench tables, one pgmux (transaction mode, pool 8, metrics_listen),
and while Debian's Chromium (driven by Playwright) shows http://<metrics_listen>/: pgbench -S with 16
clients, a TPC-B-like pgbench with 8, psql's extended protocol with prepared statements (-M prepared)
with 4, and one client that created a temporary table (so it is pinned). Every number in the picture
is what pgmux measured during that run; the script prints how it was run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from playwright.sync_api import sync_playwright

from pgmux.testing.cluster import PoolerProcess, TempCluster, free_port, write_config

USERS = {"md5user": "md5pass", "postgres": "adminpass"}
CHROMIUM = os.environ.get("PGMUX_CHROMIUM", "/usr/bin/chromium")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=40, help="how long the load runs before the picture")
    ap.add_argument("--out", default="docs/images/dashboard.png")
    args = ap.parse_args()
    with TempCluster() as cluster:
        cluster.create_test_roles()
        init = subprocess.run(["pgbench", "-i", "-s", "2", "-q", cluster.dsn("md5user", "md5pass", "testdb")],
                              capture_output=True, text=True)
        if init.returncode:
            raise SystemExit(init.stderr)
        workdir = tempfile.mkdtemp(prefix="pgmux-shot-")
        os.chmod(workdir, 0o755)
        port = free_port()
        ini, userlist = write_config(cluster, workdir=workdir, pool_mode="transaction", userlist=USERS,
                                     extra={"metrics_listen": f"127.0.0.1:{port}", "default_pool_size": 8})
        p = PoolerProcess("pgmux", ini, userlist, workdir)
        p.start()
        dsn = p.dsn("md5user", "md5pass", dbname="testdb")
        loads = [
            ["pgbench", "-n", "-S", "-c", "16", "-j", "2", "-T", str(args.seconds + 5), "-R", "3000", dsn],
            ["pgbench", "-n", "-c", "8", "-j", "2", "-T", str(args.seconds + 5), "-R", "300", dsn],
            ["pgbench", "-n", "-S", "-M", "prepared", "-c", "4", "-T", str(args.seconds + 5), "-R", "500", dsn],
        ]
        print("how it was run:", f"pgmux {p.kind} pool_mode=transaction default_pool_size=8; loads:",
              *(" ".join(cmd[:-1]) for cmd in loads), sep="\n  ")
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for cmd in loads]
        pinned = psycopg.connect(dsn, autocommit=True)
        pinned.execute("CREATE TEMP TABLE shot (x int)")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync"])
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.goto(f"http://127.0.0.1:{port}/")
                time.sleep(args.seconds)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
            print(f"wrote {args.out}")
        finally:
            pinned.close()
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            p.stop()


if __name__ == "__main__":
    main()
