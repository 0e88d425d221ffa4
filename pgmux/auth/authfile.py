"""PgBouncer's ``auth_file`` (``userlist.txt``): ``"user" "secret" ...`` per line.

The grammar is whatever PgBouncer's ``load_auth_file`` (``src/loader.c``) accepts, quirks included, so that a
file behaves the same under both poolers:

* leading whitespace (including blank lines) is skipped; a ``;`` there starts a comment line. ``#`` is *not* a
  comment: it breaks the file, as in PgBouncer;
* an entry is a double-quoted user name, then anything up to the next ``"``, then a double-quoted secret;
  inside quotes ``""`` stands for one ``"``; the rest of the line after the secret is ignored;
* the gap between the two quoted strings may even contain newlines (PgBouncer only looks for the next quote),
  so a line with a lone user name takes its secret from the next line. That is kept, with a warning;
* the first broken entry ends the parse: PgBouncer logs ``broken auth file`` and keeps only the users read
  before it. We do the same and record the reason in ``warnings`` instead of raising;
* a duplicate user name overrides the earlier one (``add_user`` updates in place);
* limits are in bytes of the raw (still escaped) text: user names below ``MAX_USERNAME``, secrets below
  ``MAX_PASSWORD``; going over also ends the parse;
* a NUL byte ends the file (PgBouncer reads it as a C string).

Secrets never appear in warnings, so the warnings can be logged as they are.
"""

from __future__ import annotations

import bisect

__all__ = ["MAX_PASSWORD", "MAX_USERNAME", "AuthFile", "AuthFileError", "load_auth_file", "parse_auth_file"]

# PgBouncer's buffer sizes (include/bouncer.h): a field must be shorter than these, in bytes, NUL excluded.
MAX_USERNAME = 128
MAX_PASSWORD = 65536  # 64 KiB passwords since pgbouncer#1310

# C isspace() in the "C" locale; str.isspace() would also accept Unicode spaces, which PgBouncer does not.
_C_SPACE = frozenset(" \t\n\v\f\r")
_BOM = "\ufeff"


class AuthFileError(Exception):
    """A problem at a place in an auth_file; also used, unraised, as the items of ``AuthFile.warnings``."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(file, line, message)
        self.file = file
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class AuthFile(dict[str, str]):
    """``user -> secret`` as parsed, plus the problems met on the way (``warnings``), to be logged by the caller."""

    def __init__(self, filename: str = "<auth_file>") -> None:
        super().__init__()
        self.filename = filename
        self.warnings: list[AuthFileError] = []

    def _warn(self, line: int, message: str) -> None:
        self.warnings.append(AuthFileError(self.filename, line, message))


def _byte_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _find_closing_quote(text: str, pos: int) -> int:
    """Index of the quote closing a string whose body starts at ``pos``, skipping ``""`` pairs; -1 if none."""
    while True:
        pos = text.find('"', pos)
        if pos < 0:
            return -1
        if text.startswith('""', pos):
            pos += 2
            continue
        return pos


def parse_auth_file(text: str, filename: str = "<auth_file>") -> AuthFile:
    """Parse auth_file ``text``; never raises for bad content (see ``AuthFile.warnings``)."""
    result = AuthFile(filename)
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    nul = text.find("\0")
    if nul >= 0:
        result._warn(line_of(nul), "NUL byte in auth file; ignoring the rest of the file, as PgBouncer does")
        text = text[:nul]
    pos = 0
    if text.startswith(_BOM):
        # PgBouncer would call this file broken and load nobody; accepting it is harmless and kinder.
        result._warn(1, "UTF-8 byte order mark at the start of the file ignored (PgBouncer rejects it)")
        pos = 1

    end = len(text)
    while pos < end:
        while pos < end and text[pos] in _C_SPACE:
            pos += 1
        if pos >= end:
            break
        if text[pos] == ";":
            nl = text.find("\n", pos)
            pos = end if nl < 0 else nl
            continue

        line = line_of(pos)
        if text[pos] != '"':
            result._warn(line, "broken auth file: an entry must start with '\"'; ignoring the rest of the file")
            break
        user_start = pos + 1
        user_end = _find_closing_quote(text, user_start)
        if user_end < 0:
            result._warn(line, "broken auth file: unterminated user name; ignoring the rest of the file")
            break
        raw_user = text[user_start:user_end]
        if _byte_len(raw_user) >= MAX_USERNAME:
            result._warn(line, f"username too long in auth file (limit {MAX_USERNAME - 1} bytes); "
                               "ignoring the rest of the file")
            break
        user = raw_user.replace('""', '"')

        secret_open = text.find('"', user_end + 1)
        if secret_open < 0:
            result._warn(line, f"broken auth file: no secret for user {user!r}; ignoring the rest of the file")
            break
        if "\n" in text[user_end + 1 : secret_open]:
            result._warn(line, f"user {user!r} takes its secret from line {line_of(secret_open)} "
                               "(PgBouncer does the same); is a secret missing?")
        secret_start = secret_open + 1
        secret_end = _find_closing_quote(text, secret_start)
        if secret_end < 0:
            result._warn(line_of(secret_open),
                         f"broken auth file: unterminated secret for user {user!r}; ignoring the rest of the file")
            break
        raw_secret = text[secret_start:secret_end]
        if _byte_len(raw_secret) >= MAX_PASSWORD:
            result._warn(line_of(secret_open), f"password too long in auth file for user {user!r} "
                                               f"(limit {MAX_PASSWORD - 1} bytes); ignoring the rest of the file")
            break
        if user in result:
            result._warn(line, f"user {user!r} appears again; the later entry wins")
        result[user] = raw_secret.replace('""', '"')

        nl = text.find("\n", secret_end + 1)
        pos = end if nl < 0 else nl
    return result


def load_auth_file(path: str) -> AuthFile:
    """Read and parse the auth_file at ``path``.

    Bytes that are not UTF-8 are kept as surrogate escapes, so md5/SCRAM hashing of a plaintext password sees
    the file's exact bytes, as PgBouncer does. An unreadable file raises ``AuthFileError`` (line 0): the
    caller decides whether to keep the users it already has, as PgBouncer does on reload.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AuthFileError(path, 0, f"could not open auth_file: {e.strerror or e}") from e
    return parse_auth_file(data.decode("utf-8", "surrogateescape"), path)
