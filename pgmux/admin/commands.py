"""The console's grammar, sans-I/O: query text in, a `Command` (or an `AdminError`) out.

PgBouncer parses console queries with three POSIX regexes (``src/admin.c``), not with SQL. We use
the same patterns so that the same texts are accepted and refused: ``WORD [WORD] [;]`` for
commands, ``SET key (=|TO) value`` with a word or a single-quoted string for SET. Keywords are
case-insensitive; a double-quoted word keeps its case and may contain anything but a lone quote.
Lengths are capped as in PgBouncer (command 15, argument 63, value 255 bytes) and refused with
``bad arguments``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# PgBouncer's regex elements. `\Z`, not `$`: a POSIX `$` does not match before a final newline.
_WS0 = r"[ \t\n\r]*"
_WS1 = r"[ \t\n\r]+"
_WORD = r'("(?:[^"]+|"")*"|[0-9a-z_]+)'
_STRING = r"('(?:[^']|'')*')"
_TAIL = _WS0 + r"(?:;" + _WS0 + r")?\Z"

_CMD_RX = re.compile(r"\A" + _WS0 + _WORD + r"(?:" + _WS1 + _WORD + r")?" + _TAIL, re.IGNORECASE)
_SET_WORD_RX = re.compile(
    r"\A" + _WS0 + r"set" + _WS1 + _WORD + _WS0 + r"(?:=|to)" + _WS0 + _WORD + _TAIL, re.IGNORECASE
)
_SET_STR_RX = re.compile(
    r"\A" + _WS0 + r"set" + _WS1 + _WORD + _WS0 + r"(?:=|to)" + _WS0 + _STRING + _TAIL, re.IGNORECASE
)

# Buffer sizes of admin_parse_query(): a group at least this long is refused.
_CMD_MAX = 16
_ARG_MAX = 64
_VAL_MAX = 256

#: Every command word, lower case (`select` is routed like `show`).
COMMANDS = (
    "disable", "enable", "kill", "kill_client", "pause", "reconnect", "reload", "reset", "resume",
    "select", "show", "shutdown", "suspend", "wait_close",
)

#: SHOW subcommands, lower case, in PgBouncer's table order.
SHOW_NAMES = (
    "clients", "config", "databases", "fds", "help", "lists", "peers", "peer_pools", "pools", "servers",
    "sockets", "active_sockets", "stats", "stats_totals", "stats_averages", "users", "version", "totals",
    "mem", "dns_hosts", "dns_zones", "state",
)

#: Parameters some drivers SHOW or SET on connect; the console fakes them (src/admin.c fake_param_list).
FAKE_PARAMS = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}


class AdminError(Exception):
    """A console error: ErrorResponse (severity ERROR) then ReadyForQuery; the session goes on."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class Command:
    """A parsed console query. `name` is lower case; `arg` is unquoted ('' when absent);
    `value` is only set for SET."""

    name: str
    arg: str = ""
    value: str | None = None
    query: str = ""

    @property
    def returns_rows(self) -> bool:
        """Whether the command answers with a result set (decides Describe's answer)."""
        if self.name not in ("show", "select"):
            return False
        return self.arg.lower() != "help"


def syntax_error(query: str) -> AdminError:
    return AdminError(f"invalid command '{query}', use SHOW HELP;")


def _unquote(raw: str | None, quote: str, limit: int) -> str:
    """PgBouncer's copy_arg(): refuse long groups, strip one level of quotes, undouble inner ones."""
    if raw is None:
        return ""
    if len(raw.encode()) >= limit:
        raise AdminError("bad arguments")
    if raw.startswith(quote):
        return raw[1:-1].replace(quote + quote, quote)
    return raw


def parse_command(query: str) -> Command:
    """Parse one console query. Raises AdminError with PgBouncer's texts."""
    m = _CMD_RX.match(query)
    if m is not None:
        name = _unquote(m.group(1), '"', _CMD_MAX)
        arg = _unquote(m.group(2), '"', _ARG_MAX)
        lowered = name.lower()
        if lowered not in COMMANDS:
            raise syntax_error(query)
        return Command(lowered, arg, None, query)
    for rx, quote in ((_SET_STR_RX, "'"), (_SET_WORD_RX, '"')):
        m = rx.match(query)
        if m is not None:
            key = _unquote(m.group(1), '"', _ARG_MAX)
            if not key:
                raise AdminError("bad arguments")
            value = _unquote(m.group(2), quote, _VAL_MAX)
            return Command("set", key, value, query)
    raise syntax_error(query)


def parse_kill_client_id(arg: str) -> int:
    """The id argument of KILL_CLIENT, read like C's sscanf("%llu"): leading digits after blanks."""
    m = re.match(r"[ \t\n\r\v\f]*([+-]?)([0-9]+)", arg)
    if m is None:
        raise AdminError("invalid client pointer supplied")
    value = int(m.group(2))
    if m.group(1) == "-":
        value = (-value) % (1 << 64)
    return value
