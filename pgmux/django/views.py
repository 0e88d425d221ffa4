"""Health and metrics views for the pgmux behind each pooled DATABASES alias.

``health``: for load balancers. For each alias with a ``PGMUX`` key (or those in the setting
``PGMUX_HEALTH_DATABASES``) it reads ``SHOW POOLS`` for waiting clients and ``maxwait``, then runs
``SELECT 1`` through Django's own connection (so through pgmux). 200 when every round trip worked and no
client has waited longer than ``PGMUX["health"]["max_wait"]`` seconds (default 5), 503 otherwise (a
saturated pool answers 503 at once, without queueing the health check's own query). An unreadable console
is reported but does not fail the check: the database path is what the load balancer needs.

``metrics``: ``SHOW POOLS`` and ``SHOW STATS`` of each pooler in Prometheus text format
(``?format=json`` for JSON). Route it where only your monitoring can reach it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from pgmux.django import console
from pgmux.django.settings import dashboard_url, pgmux_options

__all__ = ["health", "metrics", "health_report", "metrics_report"]


def _aliases() -> list[str]:
    chosen = getattr(settings, "PGMUX_HEALTH_DATABASES", None)
    if chosen is not None:
        return list(chosen)
    return [a for a, e in settings.DATABASES.items() if e.get("PGMUX") is not None]


def _maxwait(row: Mapping[str, Any]) -> float:
    return float(row.get("maxwait") or 0) + float(row.get("maxwait_us") or 0) / 1e6


def health_report(aliases: Iterable[str] | None = None) -> tuple[bool, dict[str, Any]]:
    """(healthy, report) for the given aliases (default: every pooled alias)."""
    report: dict[str, Any] = {"databases": {}}
    healthy = True
    for alias in aliases if aliases is not None else _aliases():
        entry = connections[alias].settings_dict
        opts = pgmux_options(entry) or {}
        limit = float((opts.get("health") or {}).get("max_wait", 5.0))
        item: dict[str, Any] = {"pooler": f"{entry.get('HOST')}:{entry.get('PORT')}", "max_wait_limit": limit}
        url = dashboard_url(entry)
        if url:
            item["dashboard"] = url
        item["ok"] = True
        # the console first: when clients already wait too long, do not queue one more behind them
        try:
            rows = console.pool_rows(entry, timeout=2.0)
        except console.ConsoleError as e:
            item["console"] = f"unavailable: {e}"
        else:
            item["console"] = "ok"
            item["cl_active"] = sum(int(r.get("cl_active") or 0) for r in rows)
            item["cl_waiting"] = sum(int(r.get("cl_waiting") or 0) for r in rows)
            item["sv_active"] = sum(int(r.get("sv_active") or 0) for r in rows)
            item["sv_idle"] = sum(int(r.get("sv_idle") or 0) for r in rows)
            item["maxwait_s"] = round(max((_maxwait(r) for r in rows), default=0.0), 6)
            if item["maxwait_s"] > limit:
                item["ok"] = False
                item["error"] = f"clients have waited {item['maxwait_s']} s for a server (limit {limit} s)"
        if item["ok"]:
            start = time.perf_counter()
            try:
                with connections[alias].cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
                item["round_trip_ms"] = round((time.perf_counter() - start) * 1000, 3)
            except Exception as e:
                item["ok"] = False
                item["error"] = f"{type(e).__name__}: {str(e).strip()}"
                # a broken persistent connection must not poison the next check
                connections[alias].close_if_unusable_or_obsolete()
        healthy = healthy and item["ok"]
        report["databases"][alias] = item
    report["status"] = "ok" if healthy else "unhealthy"
    return healthy, report


@never_cache
@require_GET
def health(request: HttpRequest) -> HttpResponse:
    healthy, report = health_report()
    return JsonResponse(report, status=200 if healthy else 503)


# ---------------------------------------------------------------------------------------------- metrics

POOL_LABELS = ("database", "user")
POOL_GAUGES = ("cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active",
               "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login")


def _poolers() -> dict[str, Mapping[str, Any]]:
    """One entry per distinct pooler address among the pooled aliases."""
    seen: dict[str, Mapping[str, Any]] = {}
    for _alias, entry in settings.DATABASES.items():
        if entry.get("PGMUX") is None:
            continue
        seen.setdefault(f"{entry.get('HOST') or '127.0.0.1'}:{entry.get('PORT') or 6432}", entry)
    return seen


def metrics_report() -> list[dict[str, Any]]:
    out = []
    for address, entry in _poolers().items():
        item: dict[str, Any] = {"pooler": address}
        try:
            item["pools"] = [r for r in console.show(entry, "pools", 2.0) if r.get("database") != "pgbouncer"]
            item["stats"] = [r for r in console.show(entry, "stats", 2.0) if r.get("database") != "pgbouncer"]
            item["up"] = True
        except console.ConsoleError as e:
            item["up"] = False
            item["error"] = str(e)
        out.append(item)
    return out


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if math.isnan(f):
        return None
    return str(int(f)) if f.is_integer() else repr(f)


def prometheus_text(report: list[dict[str, Any]]) -> str:
    series: dict[str, tuple[str, list[str]]] = {}

    def add(name: str, kind: str, labels: dict[str, object], value: object) -> None:
        num = _number(value)
        if num is None:
            return
        lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        series.setdefault(name, (kind, []))[1].append(f"{name}{{{lab}}} {num}")

    for item in report:
        add("pgmux_up", "gauge", {"pooler": item["pooler"]}, 1 if item["up"] else 0)
        for row in item.get("pools", []):
            labels = {"pooler": item["pooler"], **{k: row.get(k) for k in POOL_LABELS}}
            for col in POOL_GAUGES:
                add(f"pgmux_pool_{col}", "gauge", labels, row.get(col))
            add("pgmux_pool_maxwait_seconds", "gauge", labels, _maxwait(row))
        for row in item.get("stats", []):
            labels = {"pooler": item["pooler"], "database": row.get("database")}
            for col, value in row.items():
                if col == "database":
                    continue
                kind = "counter" if col.startswith("total_") else "gauge"
                add(f"pgmux_stats_{col}", kind, labels, value)
    lines = []
    for name, (kind, samples) in series.items():
        lines.append(f"# TYPE {name} {kind}")
        lines += samples
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    n = _number(value)
    return float(n) if n is not None and "." in n else (int(n) if n is not None else str(value))


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    report = metrics_report()
    if request.GET.get("format") == "json":
        return JsonResponse({"poolers": _jsonable(report)})
    return HttpResponse(prometheus_text(report), content_type="text/plain; version=0.0.4; charset=utf-8")
