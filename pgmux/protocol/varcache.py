"""Tracked session parameters (PgBouncer's varcache).

A client expects the values it asked for at startup (and any the server reported while it was
linked) to stay in force even though, in transaction mode, its next transaction may run on
another server. Each side keeps a `ParamSet`; when they differ at link time the pooler sends
one `SET` query first. Names compare case-insensitively, as in PostgreSQL.
"""

from __future__ import annotations

BUILTIN_TRACKED = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings", "application_name")


def tracked_names(extra: list[str] | tuple[str, ...]) -> dict[str, str]:
    """lower-case name -> canonical name, for the built-in five plus track_extra_parameters."""
    names = {n.lower(): n for n in BUILTIN_TRACKED}
    for n in extra:
        if n:
            names.setdefault(n.lower(), n)
    return names


class ParamSet:
    """Parameter values keyed case-insensitively, remembering the spelling first seen."""

    __slots__ = ("values", "_tracked_key", "tracked", "_shared")

    def __init__(self, tracked: dict[str, str] | None = None) -> None:
        self.values: dict[str, tuple[str, str]] = {}
        self.tracked = tracked  # when set, `same_as` can compare a cached key
        self._tracked_key: tuple[str | None, ...] | None = None
        self._shared = False  # `values` belongs to others too (share): copied before a change

    def share(self, other: ParamSet) -> None:
        """Take `other`'s values (and cached key) without copying them: the clients of a pool
        mostly hold the same set, and an idle client must stay small. Copied on the first set()."""
        self.values = other.values
        self._tracked_key = other.tracked_key()
        self._shared = other._shared = True

    def set(self, name: str, value: str) -> None:
        key = name.lower()
        if self._shared:
            self.values = dict(self.values)
            self._shared = False
        old = self.values.get(key)
        self.values[key] = (old[0] if old else name, value)
        self._tracked_key = None

    def tracked_key(self) -> tuple[str | None, ...] | None:
        """Values of the tracked names in a fixed order (cached until a value changes)."""
        if self.tracked is None:
            return None
        k = self._tracked_key
        if k is None:
            values = self.values
            k = self._tracked_key = tuple(values[n][1] if n in values else None for n in self.tracked)
        return k

    def same_as(self, other: ParamSet) -> bool:
        """Fast path of the link-time check: every tracked value equal (a cheap tuple compare;
        the cached keys are read directly, as this runs for every link)."""
        mine = self._tracked_key or self.tracked_key()
        return mine is not None and mine == (other._tracked_key or other.tracked_key())

    def get(self, name: str) -> str | None:
        item = self.values.get(name.lower())
        return item[1] if item else None

    def items(self) -> list[tuple[str, str]]:
        return list(self.values.values())

    def diff(self, other: ParamSet, tracked: dict[str, str]) -> list[tuple[str, str]]:
        """Tracked (name, value) pairs of self that `other` lacks or holds differently."""
        out = []
        for key, (name, value) in self.values.items():
            if key in tracked:
                theirs = other.values.get(key)
                if theirs is None or theirs[1] != value:
                    out.append((name, value))
        return out


def quote_literal(value: str) -> str:
    """A SQL string literal ('' doubled; E'' form when backslashes are present)."""
    v = value.replace("'", "''")
    if "\\" in v:
        return "E'" + v.replace("\\", "\\\\") + "'"
    return "'" + v + "'"


def set_statement(pairs: list[tuple[str, str]]) -> str:
    """One Query that applies every pair, as PgBouncer's varcache_apply does."""
    return "".join(f"SET {name}={quote_literal(value)};" for name, value in pairs)
