"""``manage.py pgmux_stats [pools] [clients] [servers] ... [--queries]``: the pooler's console, as tables,
and where its live dashboard is."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pgmux.django import console
from pgmux.django.config import pooled_aliases
from pgmux.django.settings import dashboard_url

#: SHOW QUERIES columns printed by --queries (the rest are in --json).
QUERY_COLUMNS = ("query", "calls", "errors", "rows", "total_query_time", "avg_query_time", "p99_query_time",
                 "total_wait_time")


def format_table(rows: list[dict[str, Any]]) -> str:
    """psql-style aligned table."""
    if not rows:
        return "(0 rows)"
    cols = list(rows[0])
    cells = [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = [" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
           "-+-".join("-" * w for w in widths)]
    out += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


class Command(BaseCommand):
    help = "Show the pooler's pools, clients and servers (SHOW ... on its admin console)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("what", nargs="*", metavar="WHAT",
                            help=f"what to show: {', '.join(console.SHOW_WHAT)} (default: pools clients servers)")
        parser.add_argument("--database", dest="alias", help="alias whose pooler to ask (default: first pooled)")
        parser.add_argument("--json", action="store_true", help="JSON output")
        parser.add_argument("--queries", action="store_true",
                            help="the statements that took the most time (SHOW QUERIES, pgmux), times in µs")
        parser.add_argument("--limit", type=int, default=20, help="statements shown by --queries (default 20)")

    def handle(self, *args: Any, **opts: Any) -> None:
        alias = opts["alias"] or next(iter(pooled_aliases(settings.DATABASES)), None)
        if alias is None or alias not in settings.DATABASES:
            raise CommandError("no pooled DATABASES alias (use --database, and pgmux.django.database())")
        entry = settings.DATABASES[alias]
        what = [w.lower() for w in opts["what"]] or ([] if opts["queries"] else ["pools", "clients", "servers"])
        if opts["queries"] and "queries" not in what:
            what.append("queries")
        unknown = [w for w in what if w not in console.SHOW_WHAT]
        if unknown:
            raise CommandError(f"unknown {unknown}; choose from {', '.join(console.SHOW_WHAT)}")
        result: dict[str, Any] = {}
        for item in what:
            try:
                result[item] = console.show(entry, item)
            except console.ConsoleError as e:
                raise CommandError(str(e)) from e
        if "queries" in result:
            result["queries"] = result["queries"][: max(0, opts["limit"])]
        url = dashboard_url(entry)
        if opts["json"]:
            self.stdout.write(json.dumps({**result, "dashboard": url}, default=str, indent=2))
            return
        for item, rows in result.items():
            self.stdout.write(f"SHOW {item.upper()}")
            if item == "queries" and not opts["what"]:
                rows = [{k: r.get(k) for k in QUERY_COLUMNS} for r in rows]
            self.stdout.write(format_table(rows))
            self.stdout.write("")
        if url:
            self.stdout.write(f"dashboard: {url}")
