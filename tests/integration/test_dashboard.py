"""The live dashboard in a real browser: Debian's Chromium, driven by Playwright, reads the page the
metrics listener serves at / while clients run; what it shows must match SHOW POOLS, SHOW QUERIES
and SHOW PINS on the console."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Page, sync_playwright

from pgmux.testing.cluster import PoolerProcess, TempCluster

PoolerFactory = Callable[..., PoolerProcess]

pytestmark = pytest.mark.pgmux_only  # the dashboard is pgmux's

USERS = {"md5user": "md5pass", "postgres": "adminpass"}
CHROMIUM = os.environ.get("PGMUX_CHROMIUM", "/usr/bin/chromium")
#: Where the screenshot goes (kept for README's picture; pytest's tmp_path otherwise).
SHOT_DIR = os.environ.get("PGMUX_SCREENSHOT_DIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_rows(p: PoolerProcess, command: str) -> list[dict[str, Any]]:
    with psycopg.connect(p.dsn("postgres", "adminpass", dbname="pgbouncer"), autocommit=True) as admin:
        cur = admin.execute(command, prepare=False)
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def shown(page: Page, table: str, key: str) -> dict[str, dict[str, str]]:
    """The rows of one of the page's tables: {row key: {column: the number it shows (data-value)}}."""
    rows = page.eval_on_selector_all(
        f"#{table} tbody tr[data-{key}]",
        """(rows, key) => rows.map(r => [r.dataset[key], Object.fromEntries(
               [...r.querySelectorAll('td[data-col]')]
                   .map(td => [td.dataset.col, td.dataset.value ?? td.textContent]))])""",
        key,
    )
    return dict(rows)


def wait_for_poll_after(page: Page, when: float) -> None:
    """Until the page has drawn a poll answered after `when` (wall clock, as the JSON's time)."""
    page.wait_for_function(f"Number(document.body.dataset.updated || 0) > {when}", timeout=15_000)


def test_dashboard_shows_what_the_console_shows(cluster: TempCluster, pooler: PoolerFactory, tmp_path: Path) -> None:
    port = free_port()
    p = pooler(pool_mode="transaction", userlist=USERS,
               extra={"metrics_listen": f"127.0.0.1:{port}", "default_pool_size": 3})
    dsn = p.dsn("md5user", "md5pass", dbname="testdb")
    held = [psycopg.connect(dsn, autocommit=True) for _ in range(2)]  # idle clients, counted in cl_active
    pinned = psycopg.connect(dsn, autocommit=True)
    pinned.execute("CREATE TEMP TABLE t_dashboard (x int)")  # session state: pgmux pins this client
    stop = threading.Event()

    def traffic() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                conn.execute(f"SELECT {i} AS n, pg_sleep(0.002)", prepare=False)
                conn.execute("SELECT count(*) FROM pg_class WHERE relpages > %s", (i % 7,))
                i += 1

    worker = threading.Thread(target=traffic)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/?interval=250")
            worker.start()
            # live data: throughput and latency computed from consecutive polls while clients run
            qps = "Number((document.getElementById('t-qps').textContent || '0').replace(/,/g, ''))"
            page.wait_for_function(f"{qps} > 0", timeout=15_000)
            page.wait_for_function("document.querySelector('#chart-latency polyline')?.getAttribute('points')",
                                   timeout=15_000)
            stop.set()
            worker.join(10)
            ended = time.time()
            wait_for_poll_after(page, ended + 0.3)  # a poll after the last query: the numbers stand still
            pools = {f"{r['database']}/{r['user']}": r for r in console_rows(p, "SHOW POOLS")}
            queries = {str(r["queryid"]): r for r in console_rows(p, "SHOW QUERIES")}
            pins = console_rows(p, "SHOW PINS")
            page_pools = shown(page, "pools", "pool")
            page_queries = shown(page, "queries", "queryid")
            page_pins = page.eval_on_selector_all(
                "#pins tbody tr", "rows => rows.map(r => [...r.querySelectorAll('td')].map(td => td.textContent))")
            shot = Path(SHOT_DIR or tmp_path) / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        stop.set()
        if worker.is_alive():
            worker.join(10)
        for conn in [*held, pinned]:
            conn.close()

    mine = page_pools["testdb/md5user"]
    for column in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login"):
        assert int(mine[column]) == pools["testdb/md5user"][column], (column, mine, pools["testdb/md5user"])
    assert int(mine["cl_active"]) >= 3  # the two held clients and the pinned one

    assert len(page_queries) >= 2
    top = list(queries)[: len(page_queries)]
    assert list(page_queries) == top  # the same statements, most total time first
    for qid, row in page_queries.items():
        for column in ("calls", "errors", "rows", "total_query_time", "p50_query_time", "p99_query_time"):
            assert int(row[column]) == queries[qid][column], (column, row, queries[qid])
    texts = {queries[qid]["query"] for qid in page_queries}
    assert "SELECT $1 AS n, pg_sleep($2)" in texts
    assert "SELECT count(*) FROM pg_class WHERE relpages > $1" in texts

    assert len(pins) == 1 and len(page_pins) == 1
    assert page_pins[0][0] == str(pins[0]["id"]) and page_pins[0][-1] == pins[0]["reason"]
    assert shot.stat().st_size > 20_000
