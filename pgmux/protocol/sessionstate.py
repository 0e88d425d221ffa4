"""Session state that cannot follow a client from server to server, and how pgmux notices it.

In transaction pooling a client's next transaction may run on another server. Some state lives
in the server session instead: WITH HOLD cursors, session advisory locks, LISTEN, temporary
tables, SQL-level prepared statements, SET of untracked parameters, SET ROLE / SESSION
AUTHORIZATION, LOAD. PgBouncer lets it leak to the next client (or vanish). pgmux instead keeps
the server linked to that client ("pinning") until the state is gone.

Detection is two-step, so that ordinary traffic pays almost nothing:
1. `hint()` looks at each query text for a statement that might create or drop such state
   (a cheap regex anchored at statement starts, plus a few function names);
2. at the end of a transaction that had a hint, `PROBE_SQL` asks the server what state really
   exists; `describe()` turns its answer into a reason, or None when the session is clean.
"""

from __future__ import annotations

import re

_STATEMENT_START = rb"(?:^|;)\s*(?:(?:/\*.*?\*/|--[^\n]*(?:\n|$))\s*)*"
_HINT = re.compile(
    _STATEMENT_START
    + rb"(set|reset|listen|unlisten|declare|prepare|deallocate|discard|load|close|drop|do|create\s+"
    rb"(?:(?:global|local)\s+)?temp(?:orary)?)\b|(advisory_(?:un)?lock|set_config)",
    re.I | re.S,
)
_DATABASE_DDL = re.compile(
    _STATEMENT_START
    + rb"(?:drop\s+database\s+(?:if\s+exists\s+)?(\"(?:[^\"]|\"\")+\"|[^\s;]+)"
    rb"|alter\s+database\s+(\"(?:[^\"]|\"\")+\"|[^\s;]+)\s+rename"
    rb"|create\s+database\s.*?\btemplate\s*=?\s*(\"(?:[^\"]|\"\")+\"|[^\s;,)]+))",
    re.I | re.S,
)


# Statements that never create session state; a query made of one of them (no `;`) and naming
# neither function skips the regex. This is the hot path of every transaction-mode query.
_PLAIN_STARTS = (b"select", b"insert", b"update", b"delete", b"with", b"begin", b"commit", b"rollback",
                 b"end", b"values", b"fetch", b"move", b"copy", b"savepoint", b"release", b"explain",
                 b"table", b"show", b"start", b"abort", b"notify", b"call", b"merge", b"lock", b"truncate")


def hint(query: bytes) -> bytes | None:
    """The keyword that makes this query worth a probe (lower-case), or None."""
    head = query[:12].lstrip().lower()
    if head.startswith(_PLAIN_STARTS) and b";" not in query.rstrip(b" \t\r\n;"):
        low = query.lower()
        if b"advisory" not in low and b"set_config" not in low:
            return None
    words = {_keyword(m) for m in _HINT.finditer(query)}
    if not words:
        return None
    return words.pop() if len(words) == 1 else b"mixed"


def _keyword(m: re.Match[bytes]) -> bytes:
    word = (m.group(1) or m.group(2)).lower()
    return b"set" if word.startswith(b"set_config") else word.split()[0]


def database_ddl_targets(query: bytes) -> list[str]:
    """Databases that DROP DATABASE / ALTER DATABASE ... RENAME / CREATE DATABASE ... TEMPLATE x
    in this query need free of pooled connections first."""
    out = []
    for m in _DATABASE_DDL.finditer(query):
        name = next(g for g in m.groups() if g)
        text = name.decode("utf-8", "replace")
        if text.startswith('"'):
            text = text[1:-1].replace('""', '"')
        else:
            text = text.lower()
        out.append(text)
    return out


def probe_sql(login_user: str, tracked: list[str]) -> str:
    """One query, one row: what session state this backend holds."""
    names = ",".join("'" + n.lower().replace("'", "''") + "'" for n in tracked)
    user = login_user.replace("'", "''")
    return (
        "SELECT (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable),"
        # protocol-level statements pgmux did not prepare count too (PGMUX_<n> are its own: clients
        # cannot Parse or Close that prefix, see net/client.py RESERVED_PREFIX)
        " (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql OR name NOT LIKE 'PGMUX\\_%'),"
        " (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
        " AND pid = pg_catalog.pg_backend_pid()),"
        " (SELECT count(*) FROM pg_catalog.pg_listening_channels()),"
        " (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
        " (SELECT pg_catalog.string_agg(name, ',') FROM pg_catalog.pg_settings WHERE source = 'session'"
        f" AND pg_catalog.lower(name) <> ALL (ARRAY[{names}]::text[])),"
        f" (current_user <> session_user OR session_user <> '{user}'),"
        + _OWN_STATEMENTS  # columns 7 and 8: see own_statements_match
    )


# How many SQL-level statements use pgmux's reserved PGMUX_ prefix (a client made them, e.g. with
# PREPARE "PGMUX_1"), and the names of the protocol-level ones, in byte order.
_OWN_STATEMENTS = (
    " (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql AND name LIKE 'PGMUX\\_%'),"
    " (SELECT pg_catalog.string_agg(name, ',' ORDER BY name COLLATE \"C\") FROM pg_catalog.pg_prepared_statements"
    " WHERE NOT from_sql AND name LIKE 'PGMUX\\_%')"
)
OWN_STATEMENTS_SQL = "SELECT" + _OWN_STATEMENTS


def own_statements_match(row: list[str | None], names: list[bytes]) -> bool:
    """Whether OWN_STATEMENTS_SQL's row (or the probe's columns 7 and 8) shows exactly pgmux's
    statements `names` on the server, none of them replaced by SQL."""
    expected = ",".join(sorted(n.decode() for n in names)) or None
    return row[0] == "0" and row[1] == expected


_LABELS = ("WITH HOLD cursor", "prepared statement", "advisory lock", "LISTEN", "temporary table")


def describe(row: list[str | None]) -> str | None:
    """Reason for pinning from the probe's row, e.g. 'LISTEN, SET work_mem'; None if clean."""
    reasons = [label for label, value in zip(_LABELS, row[:5], strict=True) if value not in (None, "0")]
    if row[5]:
        reasons.append("SET " + row[5])
    if row[6] == "t":
        reasons.append("SET ROLE/SESSION AUTHORIZATION")
    return ", ".join(reasons) or None


# After DECLARE or CLOSE, when cursors are the only possible state, a cheaper probe will do:
# the full one scans pg_settings, about 0.3 ms of server time (Django's iterator() pays it twice).
CURSOR_PROBE_SQL = "SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable"
CURSOR_REASON = _LABELS[0]


def cursor_only(word: bytes | None, pinned: str | None) -> bool:
    """Whether the cursor probe suffices for this hint and the client's current pin."""
    return word in (b"declare", b"close") and pinned in (None, CURSOR_REASON)


def describe_cursors(row: list[str | None]) -> str | None:
    return CURSOR_REASON if row and row[0] not in (None, "0") else None
