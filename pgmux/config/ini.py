"""The pgbouncer.ini dialect at the INI level: sections, raw key/value pairs and %include.

PgBouncer reads its file with libusual's ``cfparser.c``, which is not what ``configparser`` does
(see hot-path.md §4). This module mirrors that parser character by character, so that a file
PgBouncer accepts yields the same (section, key, value) stream here:

* leading whitespace (C ``isspace``) is skipped, blank lines included;
* ``%include <file>`` (followed by a blank) is recognised at the start of a line, before comments;
* a line starting with ``;`` or ``#`` is a comment; ``;``/``#`` anywhere else are data;
* ``[name]`` opens a section; the name is taken verbatim (case-sensitive, no trimming);
* a key is ``[A-Za-z0-9_.*-]+`` or a double-quoted string (libusual PR #50, for database names
  with spaces), then optional blanks, ``=``, optional blanks, and the value up to the end of the
  line with trailing whitespace removed; no quoting, interpolation or continuation lines;
* anything else is a syntax error at that line.

Values stay raw strings here; typing them is the job of ``settings.py`` and ``connstr.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pgmux.config.errors import ConfigError

#: libusual's MAX_INCLUDE: a file may be included at most this many levels deep.
MAX_INCLUDE_DEPTH = 10

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale
_BLANK = " \t"  # C isblank()
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-*")


@dataclass(frozen=True, slots=True)
class IniItem:
    """One meaningful line: a section header (value is None) or a key/value pair."""

    section: str | None  # the section this item belongs to (for a header: its own name)
    key: str | None  # None for a section header
    value: str | None  # None for a section header
    file: str
    line: int

    @property
    def is_section(self) -> bool:
        return self.key is None


def read_ini_file(path: str, files: list[str] | None = None) -> list[IniItem]:
    """Read ``path`` and every file it %includes, in order; raise ConfigError on any problem.

    ``files``, if given, receives the path of every file read (main file first).
    """
    text = _read_text(path, include_site=None)
    return parse_ini_text(text, path, files)


def parse_ini_text(text: str, path: str = "<string>", files: list[str] | None = None) -> list[IniItem]:
    """Parse already-loaded text (for tests and tools); %include still reads files."""
    items: list[IniItem] = []
    parser = _Parser(items, files if files is not None else [])
    parser.files.append(path)
    parser.parse(text, path, depth=0, section=None)
    return items


def _read_text(path: str, include_site: tuple[str, int] | None) -> str:
    """Read a file as UTF-8, turning every OS or decoding failure into a located ConfigError."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if include_site is None:
            raise ConfigError(f"could not read config file: {reason}", file=path) from None
        site_file, site_line = include_site
        raise ConfigError(
            f"could not read include file '{path}': {reason}",
            file=site_file,
            line=site_line,
            key="%include",
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"invalid UTF-8 byte 0x{data[exc.start]:02x} (config files must be UTF-8)", file=path, line=line
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        raise ConfigError("NUL byte in config file", file=path, line=text.count("\n", 0, nul) + 1)
    return text


def _resolve_include(target: str, including_file: str) -> str:
    """PgBouncer resolves %include against the cwd; we also try the including file's directory.

    The fallback makes ``%include local.ini`` work when pgmux is started from another directory,
    which is what people expect and never changes the meaning of a file PgBouncer could read.
    """
    if os.path.isabs(target) or os.path.exists(target):
        return target
    beside = os.path.join(os.path.dirname(including_file), target)
    if os.path.exists(beside):
        return beside
    return target


class _Parser:
    """Character-level port of libusual's parse_ini_file_internal(), one instance per load."""

    def __init__(self, items: list[IniItem], files: list[str]) -> None:
        self.items = items
        self.files = files

    def parse(self, text: str, path: str, *, depth: int, section: str | None) -> str | None:
        """Append the items of ``text``; return the section that is current at its end.

        The current section carries into and out of included files, as in libusual, where the
        include is parsed with the same handler state.
        """
        n = len(text)
        p = 0
        counted_to = 0  # line numbers are counted incrementally: p only moves forward
        counted_line = 1

        def line_at(pos: int) -> int:
            nonlocal counted_to, counted_line
            counted_line += text.count("\n", counted_to, pos)
            counted_to = pos
            return counted_line

        while p < n:
            while p < n and text[p] in _C_SPACE:
                p += 1
            if p >= n:
                break
            ch = text[p]

            if text.startswith("%include", p) and p + 8 < n and text[p + 8] in _BLANK:
                line = line_at(p)
                if depth >= MAX_INCLUDE_DEPTH:
                    raise ConfigError(
                        f"include nesting level too deep (max {MAX_INCLUDE_DEPTH})",
                        file=path,
                        line=line,
                        key="%include",
                    )
                p += 8
                while p < n and text[p] in _BLANK:
                    p += 1
                end = text.find("\n", p)
                end = n if end < 0 else end
                target = text[p:end].rstrip(_C_SPACE)
                p = end
                if not target:
                    raise ConfigError("missing file name", file=path, line=line, key="%include")
                resolved = _resolve_include(target, path)
                sub = _read_text(resolved, include_site=(path, line))
                self.files.append(resolved)
                section = self.parse(sub, resolved, depth=depth + 1, section=section)
                continue

            if ch == "#" or ch == ";":
                end = text.find("\n", p)
                p = n if end < 0 else end
                continue

            if ch == "[":
                line = line_at(p)
                q = p + 1
                while q < n and text[q] != "]" and text[q] != "\n":
                    q += 1
                if q >= n or text[q] != "]":
                    raise ConfigError("syntax error: unterminated section header", file=path, line=line)
                section = text[p + 1 : q]
                self.items.append(IniItem(section, None, None, path, line))
                p = q + 1
                continue

            line = line_at(p)
            if ch == '"':
                key, p = self._quoted_key(text, p, path, line)
            else:
                q = p
                while q < n and text[q] in _KEY_CHARS:
                    q += 1
                key = text[p:q]
                p = q
            while p < n and text[p] in _BLANK:
                p += 1
            if p >= n or text[p] != "=" or not key:
                raise ConfigError(
                    f"syntax error: expected 'key = value', got {_snippet(text, line)!r}", file=path, line=line
                )
            p += 1
            while p < n and text[p] in _BLANK:
                p += 1
            end = text.find("\n", p)
            end = n if end < 0 else end
            value = text[p:end].rstrip(_C_SPACE)
            p = end
            if section is None:
                raise ConfigError("value outside of any section", file=path, line=line, key=key)
            self.items.append(IniItem(section, key, value, path, line))
        return section

    @staticmethod
    def _quoted_key(text: str, p: int, path: str, line: int) -> tuple[str, int]:
        """Read ``"name"`` (``""`` stands for one quote, as in SQL identifiers)."""
        out: list[str] = []
        q = p + 1
        n = len(text)
        while True:
            if q >= n or text[q] == "\n":
                raise ConfigError("syntax error: unterminated quoted name", file=path, line=line)
            if text[q] == '"':
                if q + 1 < n and text[q + 1] == '"':
                    out.append('"')
                    q += 2
                    continue
                return "".join(out), q + 1
            out.append(text[q])
            q += 1


def _snippet(text: str, line: int) -> str:
    """The offending line, shortened, for syntax error messages."""
    lines = text.split("\n")
    src = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return src if len(src) <= 60 else src[:57] + "..."
