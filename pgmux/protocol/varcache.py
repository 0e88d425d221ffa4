"""Tracked session parameters (PgBouncer's varcache).

A client expects the values it asked for at startup (and any the server reported while it was
linked) to stay in force even though, in transaction mode, its next transaction may run on
another server. Each side keeps a `ParamSet`; when they differ at link time the pooler sends
one `SET` query first. Names compare case-insensitively, as in PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator

BUILTIN_TRACKED = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings", "application_name")


def tracked_names(extra: list[str] | tuple[str, ...]) -> dict[str, str]:
    """lower-case name -> canonical name, for the built-in five plus track_extra_parameters."""
    names = {n.lower(): n for n in BUILTIN_TRACKED}
    for n in extra:
        if n:
            names.setdefault(n.lower(), n)
    return names


#: Tracked-parameter keys by value: equal keys are one object, so the engine's link check is
#: mostly a pointer compare. Bounded (clients choose the values): emptied when it grows past this.
_KEYS: dict[tuple[str | None, ...], tuple[str | None, ...]] = {}
_KEYS_MAX = 4096


def _intern_key(k: tuple[str | None, ...]) -> tuple[str | None, ...]:
    found = _KEYS.get(k)
    if found is not None:
        return found
    if len(_KEYS) >= _KEYS_MAX:
        _KEYS.clear()
    _KEYS[k] = k
    return k


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
            k = tuple(values[n][1] if n in values else None for n in self.tracked)
            k = self._tracked_key = _intern_key(k)
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
        """Tracked (name, value) pairs of self that `other` lacks or holds differently.

        Values that differ only in case are equal, as PgBouncer's apply_var has it (``iso, mdy``
        is the server's ``ISO, MDY``), and so are two spellings of one boolean (``true`` is the
        server's ``on``): self takes other's spelling, so that the next link compares equal
        without coming here."""
        out = []
        for key, (name, value) in list(self.values.items()):
            if key in tracked:
                theirs = other.values.get(key)
                if theirs is None:
                    out.append((name, value))
                elif theirs[1] != value:
                    if equivalent(key, theirs[1], value):
                        self.set(name, theirs[1])
                    else:
                        out.append((name, value))
        return out

    def adopt(self, other: ParamSet, names: list[str]) -> None:
        """Take other's values of `names` (those it holds): after a SET the server reports the
        value in its own form (``on`` for ``true``), and PgBouncer's client then holds that one,
        so the same SET is not sent again at every link."""
        for name in names:
            value = other.get(name)
            if value is not None:
                self.set(name, value)


#: Boolean parameters PostgreSQL reports (GUC_REPORT), lower-case: any of PostgreSQL's spellings
#: of a boolean means the same there.
BOOLEAN_REPORTED = frozenset({"standard_conforming_strings", "default_transaction_read_only", "in_hot_standby",
                              "integer_datetimes", "is_superuser"})


def parse_pg_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool(): on/off, true/false, yes/no, 1/0 and prefixes of the words long
    enough to be unique (``t``, ``fa``, ``ye``, ``of``), any case; None for anything else."""
    v = value.lower()
    if v in ("1", "0"):
        return v == "1"
    if len(v) >= 2 and "on".startswith(v):
        return True
    if len(v) >= 2 and "off".startswith(v):
        return False
    for word, meaning in (("true", True), ("false", False), ("yes", True), ("no", False)):
        if v and word.startswith(v):
            return meaning
    return None


def equivalent(key: str, a: str, b: str) -> bool:
    """Whether two values of the tracked parameter `key` (lower-case) mean the same to the server."""
    if a.lower() == b.lower():
        return True
    if key in BOOLEAN_REPORTED:
        x = parse_pg_bool(a)
        return x is not None and x == parse_pg_bool(b)
    return False


def quote_literal(value: str) -> str:
    """A SQL string literal ('' doubled; E'' form when backslashes are present)."""
    v = value.replace("'", "''")
    if "\\" in v:
        return "E'" + v.replace("\\", "\\\\") + "'"
    return "'" + v + "'"


def set_statement(pairs: list[tuple[str, str]]) -> str:
    """One Query that applies every pair, as PgBouncer's varcache_apply does."""
    return "".join(f"SET {name}={quote_literal(value)};" for name, value in pairs)


class StartupOptionsError(ValueError):
    """An ``options`` startup parameter with something else than ``-c name=value`` or ``--name=value``."""


_C_SPACE = " \t\n\v\f\r"  # C isspace()


def iter_startup_options(options: str) -> Iterator[tuple[str, str]]:
    """The (name, value) items of an ``options`` startup parameter, as PgBouncer's
    set_startup_options() reads them: ``-c name=value`` (blanks allowed after ``-c``) or
    ``--name=value``, separated by blanks, a backslash taking the next character literally
    (``-c DateStyle=German,\\ YMD``). Raises StartupOptionsError where an item is malformed, after
    yielding the ones before it (PgBouncer stops at the first problem, whichever it is)."""
    pos, end = 0, len(options)
    while pos < end:
        while pos < end and options[pos] in _C_SPACE:
            pos += 1
        if options.startswith("-c", pos):
            pos += 2
            while pos < end and options[pos] in _C_SPACE:
                pos += 1
        elif options.startswith("--", pos):
            pos += 2
        else:
            raise StartupOptionsError(options)  # also trailing blanks, as in PgBouncer
        token: list[str] = []
        while pos < end and options[pos] not in _C_SPACE:
            if options[pos] == "\\":
                pos += 1
                if pos == end:
                    break
            token.append(options[pos])
            pos += 1
        name, eq, value = "".join(token).partition("=")
        if not eq:
            raise StartupOptionsError(options)
        yield name, value
