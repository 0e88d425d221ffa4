"""Reading pgmux's admin console (virtual database ``pgbouncer``) for a DATABASES entry.

The console speaks only the simple query protocol, so queries go through psycopg's ``ClientCursor``
(psycopg2 works too). Column names are PgBouncer's, so this also reads a real PgBouncer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pgmux.django.settings import pgmux_options

__all__ = ["ConsoleError", "console_params", "show", "pool_rows"]

SHOW_WHAT = ("pools", "clients", "servers", "stats", "databases", "config", "lists", "version", "users",
             "totals", "mem", "state", "queries", "pins")  # (queries, pins: pgmux's)


#: libpq connection keys copied from the entry's OPTIONS to the console connection
SSL_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl", "gssencmode")


class ConsoleError(Exception):
    """The console could not be reached or refused the command."""


def console_params(entry: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """libpq parameters for the console of the pooler an entry goes through."""
    opts = pgmux_options(entry) or {}
    user = opts.get("admin_user") or entry.get("USER") or ""
    password = opts.get("admin_password") if opts.get("admin_user") else entry.get("PASSWORD")
    params: dict[str, Any] = {
        "host": entry.get("HOST") or "127.0.0.1",
        "port": int(entry.get("PORT") or 6432),
        "dbname": "pgbouncer",
        "user": user,
        "connect_timeout": max(1, int(timeout)),
    }
    if password:
        params["password"] = password
    options = entry.get("OPTIONS") or {}
    for key in SSL_KEYS:  # reach the console the way the application reaches the pooler
        if key in options:
            params[key] = options[key]
    return params


def show(entry: Mapping[str, Any], what: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Rows of ``SHOW <what>`` as dicts keyed by PgBouncer's column names."""
    what = what.lower()
    if what not in SHOW_WHAT:
        raise ConsoleError(f"unknown SHOW {what!r}; one of {', '.join(SHOW_WHAT)}")
    return query(entry, f"SHOW {what.upper()}", timeout)


def query(entry: Mapping[str, Any], sql: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    params = console_params(entry, timeout)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg2 only
        return _query_psycopg2(params, sql)
    try:
        with psycopg.connect(**params, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute(sql)
            if cur.description is None:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    except psycopg.Error as e:
        raise ConsoleError(f"{params['host']}:{params['port']} console: {str(e).strip()}") from e


def _query_psycopg2(params: dict[str, Any], sql: str) -> list[dict[str, Any]]:  # pragma: no cover
    import psycopg2

    try:
        conn = psycopg2.connect(**params)
    except psycopg2.Error as e:
        raise ConsoleError(f"{params['host']}:{params['port']} console: {str(e).strip()}") from e
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            if cur.description is None:
                return []
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    except psycopg2.Error as e:
        raise ConsoleError(f"{params['host']}:{params['port']} console: {str(e).strip()}") from e
    finally:
        conn.close()


def pool_rows(entry: Mapping[str, Any], timeout: float = 5.0) -> list[dict[str, Any]]:
    """SHOW POOLS rows of this entry's database (every user), excluding the console's own pool."""
    name = entry.get("NAME")
    return [r for r in show(entry, "pools", timeout) if r.get("database") == name]


def pool_mode(entry: Mapping[str, Any], timeout: float = 5.0) -> str | None:
    """The pool mode the pooler runs for this entry's database (SHOW DATABASES, else SHOW CONFIG)."""
    name = entry.get("NAME")
    rows = show(entry, "databases", timeout)
    row = next((r for r in rows if r.get("name") == name), None)
    if row is None:
        row = next((r for r in rows if r.get("name") == "*"), None)
    if row is not None and row.get("pool_mode"):
        return str(row["pool_mode"])
    config = {r["key"]: r["value"] for r in show(entry, "config", timeout)}
    return config.get("pool_mode")
