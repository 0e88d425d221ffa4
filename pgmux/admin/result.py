"""Console result sets and their wire encoding (text and, for extended-protocol clients, binary).

PgBouncer sends every column in text format with its own type letters (i=int4, q=int8, N=numeric,
s/T=text, b=bytea). Drivers that use the extended protocol may ask for binary results (asyncpg
always does for types it knows), so each type here also has a binary encoder.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from pgmux.admin.commands import AdminError

INT4 = 23
INT8 = 20
NUMERIC = 1700
TEXT = 25
BYTEA = 17

_TYPE_LEN = {INT4: 4, INT8: 8, NUMERIC: -1, TEXT: -1, BYTEA: -1}
# PgBouncer's type letters (pktbuf_write_RowDescription) -> type oid.
LETTERS = {"i": INT4, "q": INT8, "N": NUMERIC, "s": TEXT, "T": TEXT, "b": BYTEA}

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")

Value = int | str | bytes | None


@dataclass(frozen=True)
class Column:
    name: str
    oid: int


def columns(letters: str, *names: str) -> list[Column]:
    """Columns from PgBouncer's notation, e.g. ``columns("si", "list", "items")``."""
    if len(letters) != len(names):
        raise ValueError(f"{len(letters)} type letters for {len(names)} columns")
    return [Column(n, LETTERS[t]) for t, n in zip(letters, names, strict=True)]


@dataclass
class Result:
    """What one console command answers: optional result set, notices, and the command tag.

    `tag` None means "send nothing" (SHUTDOWN: the connection just closes with the process)."""

    tag: str | None
    columns: list[Column] | None = None
    rows: list[Sequence[Value]] = field(default_factory=list)
    notices: list[bytes] = field(default_factory=list)


# ------------------------------------------------------------------ encoding


def _message(typ: bytes, payload: bytes) -> bytes:
    return typ + _I32.pack(len(payload) + 4) + payload


def text_value(value: Value, oid: int) -> bytes | None:
    """A value in PostgreSQL's text format (bytea as ``\\x`` hex, as the server prints it)."""
    if value is None:
        return None
    if oid == BYTEA:
        assert isinstance(value, bytes)
        return b"\\x" + value.hex().encode()
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _numeric_binary(n: int) -> bytes:
    """An integer as PostgreSQL's binary numeric: base-10000 digits, weight, sign, dscale 0."""
    sign = 0x4000 if n < 0 else 0
    n = abs(n)
    digits: list[int] = []
    while n:
        n, d = divmod(n, 10000)
        digits.append(d)
    digits.reverse()
    weight = len(digits) - 1 if digits else 0
    while digits and digits[-1] == 0:  # trailing zero groups are implied by the weight
        digits.pop()
    return struct.pack(f"!hhHH{len(digits)}H", len(digits), weight, sign, 0, *digits)


def binary_value(value: Value, oid: int) -> bytes | None:
    """A value in PostgreSQL's binary format for the column's type."""
    if value is None:
        return None
    if oid == INT4:
        return struct.pack("!i", int(value))  # type: ignore[arg-type]
    if oid == INT8:
        return struct.pack("!q", int(value))  # type: ignore[arg-type]
    if oid == NUMERIC:
        return _numeric_binary(int(value))  # type: ignore[arg-type]
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def row_description(cols: Sequence[Column], formats: Sequence[int] = ()) -> bytes:
    """RowDescription with per-column format codes (Bind's result-format rules)."""
    fmts = expand_formats(formats, len(cols))
    parts = [_I16.pack(len(cols))]
    for col, fmt in zip(cols, fmts, strict=True):
        parts.append(col.name.encode() + b"\0" + _FIELD.pack(0, 0, col.oid, _TYPE_LEN.get(col.oid, -1), -1, fmt))
    return _message(b"T", b"".join(parts))


def data_row(cols: Sequence[Column], row: Sequence[Value], formats: Sequence[int] = ()) -> bytes:
    fmts = expand_formats(formats, len(cols))
    parts = [_I16.pack(len(cols))]
    for col, value, fmt in zip(cols, row, fmts, strict=True):
        data = binary_value(value, col.oid) if fmt == 1 else text_value(value, col.oid)
        if data is None:
            parts.append(_I32.pack(-1))
        else:
            parts.append(_I32.pack(len(data)) + data)
    return _message(b"D", b"".join(parts))


def expand_formats(formats: Sequence[int], n: int) -> list[int]:
    """Bind's result formats: none = all text, one = applies to all, else one per column."""
    if not formats:
        return [0] * n
    if len(formats) == 1:
        return [formats[0]] * n
    if len(formats) != n:
        raise AdminError(f"bind message has {len(formats)} result formats but query has {n} columns")
    return list(formats)
