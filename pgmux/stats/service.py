"""Background services of the stats package: the stats_period timer and the metrics HTTP listener.

The metrics listener is a small asyncio HTTP/1.x server on ``metrics_listen = host:port``: it runs
the collector on the event loop thread (the pools and client sets are never read from another
thread, unlike prometheus_client's threaded start_http_server) and only at scrape time.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from pgmux import log as pglog
from pgmux.stats import counters, dashboard

if TYPE_CHECKING:
    from pgmux.pooler import Pooler

logger = pglog.logger

MAX_REQUEST_HEAD = 16384


async def run_stats_timer(pooler: Pooler) -> None:
    """Every stats_period seconds: shift the snapshots behind the averages, log the stats line."""
    from pgmux.admin.show import stat_sources

    while True:
        period = max(1, int(pooler.settings.stats_period))
        await asyncio.sleep(period)
        try:
            state = pooler.admin_state()
            current = {(db, user): counters.snapshot(stats) for db, user, stats in stat_sources(pooler)}
            now = counters.now_us()
            cur_total, old_total = state.tracker.refresh(current, now)
            if pooler.settings.log_stats:
                avg = counters.averages(cur_total, old_total, now - state.tracker.old_stamp)
                logger.info("%s", counters.stats_log_line(avg))
        except Exception:  # noqa: BLE001 - the timer must survive a bad round
            logger.exception("stats refresh failed")


def parse_listen(value: str) -> tuple[str | None, int]:
    """``host:port``, ``[v6]:port``, ``*:port`` or ``:port`` -> (host or None for all, port)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics_listen must be host:port, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (None if host in ("", "*") else host), int(port)


async def start_metrics_listener(pooler: Pooler) -> asyncio.AbstractServer | None:
    """Serve /metrics and the dashboard (/, /api/dashboard) on metrics_listen, if set. /metrics
    needs prometheus_client, the optional `metrics` extra: without it the dashboard is served and
    /metrics answers 503, with a log line at start. A bad address is logged, not a crash."""
    listen = pooler.settings.metrics_listen
    if not listen:
        return None
    try:
        from pgmux.stats.metrics import render_metrics
    except ImportError:
        logger.error("metrics_listen = %s is set but prometheus_client is not installed "
                     "(pip install 'pgmux[metrics]'); /metrics disabled, dashboard served", listen)
        render_metrics = None  # type: ignore[assignment]
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        logger.error("%s; metrics endpoint disabled", exc)
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_http(pooler, reader, writer, render_metrics)
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, host, port, reuse_address=True)
    except OSError as exc:
        logger.error("could not bind metrics_listen %s: %s; metrics endpoint disabled", listen, exc)
        return None
    logger.info("metrics listening on %s", listen)
    return server


async def _serve_http(pooler: Pooler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      render: Any) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        return
    if len(head) > MAX_REQUEST_HEAD:
        return
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        _respond(writer, 400, "text/plain", b"bad request\n")
        return
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        _respond(writer, 405, "text/plain", b"method not allowed\n")
        return
    if target == "/health":  # readiness: 200 while serving, 503 once shutting down (send no one here)
        down = pooler.shutting_down
        _respond(writer, 503 if down else 200, "text/plain", b"shutting down\n" if down else b"ok\n")
        return
    if target == "/live":  # liveness: the event loop answers (also while draining its clients)
        _respond(writer, 200, "text/plain", b"ok\n")
        return
    if target not in ("/metrics", dashboard.PAGE_PATH, dashboard.DATA_PATH):
        _respond(writer, 404, "text/plain", b"not found\n")
        return
    if target == "/metrics" and render is None:
        _respond(writer, 503, "text/plain", b"prometheus_client is not installed (pip install 'pgmux[metrics]')\n")
        return
    try:
        if target == dashboard.PAGE_PATH:
            body, content_type = dashboard.page(), "text/html; charset=utf-8"
        elif target == dashboard.DATA_PATH:
            body = json.dumps(await dashboard.data(pooler), separators=(",", ":")).encode()
            content_type = "application/json"
        else:
            merged = None
            if pooler.shared is not None:  # workers > 1: figures for pgmux as a whole
                from pgmux.stats.metrics import gather_workers

                merged = await gather_workers(pooler)
            body, content_type = render(pooler, merged)
    except Exception:  # noqa: BLE001 - a failing scrape must not take the listener down
        logger.exception("metrics collection failed")
        _respond(writer, 500, "text/plain", b"collection failed\n")
        return
    _respond(writer, 200, content_type, b"" if method == "HEAD" else body, len(body))
    try:
        await writer.drain()
    except ConnectionError:
        pass


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _respond(writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes,
             length: int | None = None) -> None:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    writer.write(head.encode("latin-1") + body)
