"""The ``key=value ...`` strings of the [databases], [users] and [peers] sections.

PgBouncer parses these with its own small routine (``cstr_get_pair`` in ``src/loader.c``), not
with libpq, and the difference matters for compatibility:

* only the space character separates pairs (a tab is part of a value);
* ``key = value`` is allowed (spaces around ``=``);
* a value may be single-quoted; inside quotes ``''`` stands for one quote and every backslash
  is kept literally, as PgBouncer does, so that passwords containing backslashes (even a
  trailing one, ``password='secret\\'``) mean the same thing to both programs;
* an empty value (``host=`` or ``host=''``) is an error.

PgBouncer silently swallows the character after a closing quote (``host='x'port=1`` is read as
``host=x`` and ``ort=1``); we report that as an error instead.
"""

from __future__ import annotations

from pgmux.config.errors import ConfigError


def parse_connstr(text: str) -> list[tuple[str, str]]:
    """Split a connection string into (key, value) pairs, in order; raise ConfigError if malformed.

    The error carries no location: the caller knows the file, line and entry name.
    """
    pairs: list[tuple[str, str]] = []
    n = len(text)
    p = 0
    while True:
        while p < n and text[p] == " ":
            p += 1
        if p >= n:
            return pairs
        start = p
        while p < n and text[p] != "=" and text[p] != " ":
            p += 1
        key = text[start:p]
        while p < n and text[p] == " ":
            p += 1
        if p >= n or text[p] != "=" or not key:
            raise ConfigError(f"syntax error in connection string near {text[start : start + 30]!r}")
        p += 1
        while p < n and text[p] == " ":
            p += 1
        if p < n and text[p] == "'":
            value, p = _quoted_value(text, p + 1, key)
            if p < n and text[p] != " ":
                raise ConfigError(f"syntax error in connection string: text right after the closing quote of {key}")
        else:
            vstart = p
            while p < n and text[p] != " ":
                p += 1
            value = text[vstart:p]
        if not value:
            raise ConfigError(f"syntax error in connection string: empty value for {key}")
        pairs.append((key, value))


def _quoted_value(text: str, p: int, key: str) -> tuple[str, int]:
    """Read a single-quoted value starting after its opening quote; return it and the index after."""
    out: list[str] = []
    n = len(text)
    while p < n:
        ch = text[p]
        if ch == "'":
            if p + 1 < n and text[p + 1] == "'":
                out.append("'")
                p += 2
                continue
            return "".join(out), p + 1
        out.append(ch)
        p += 1
    raise ConfigError(f"syntax error in connection string: unterminated quoted value for {key}")
