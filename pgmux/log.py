"""Logging in PgBouncer's line format, so existing log parsers and habits keep working.

    2026-11-24 15:16:41.123 UTC [1234] LOG C-0x7f3a...: db/user@127.0.0.1:5555 login attempt: ...

Per-packet debug logging is guarded by the module-level `DEBUG` flag: even a disabled
`logger.debug()` call costs more than the forwarding of a small message.
"""

from __future__ import annotations

import logging
import os
import sys
import time

logger = logging.getLogger("pgmux")
DEBUG = False

_LEVEL_NAMES = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "LOG",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "FATAL",
}


class PgBouncerFormatter(logging.Formatter):
    """`YYYY-MM-DD HH:MM:SS.mmm TZ [pid] LEVEL message`."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        ms = int(record.msecs)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", t) + f".{ms:03d} " + time.strftime("%Z", t)
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        text = f"{stamp} [{os.getpid()}] {level} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_handlers: list[logging.Handler] = []


class LogfileError(Exception):
    """The logfile cannot be opened: PgBouncer's `Cannot open logfile: '<path>': <reason>`."""

    def __init__(self, path: str, exc: OSError) -> None:
        self.path = path
        self.reason = exc.strerror or str(exc)
        super().__init__(f"Cannot open logfile: '{path}': {self.reason}")


def format_line(level: int, message: str) -> str:
    """One log line as the handlers would write it, for messages printed before logging works."""
    record = logging.LogRecord(logger.name, level, __file__, 0, message, None, None)
    return PgBouncerFormatter().format(record)


def setup_logging(*, verbose: int = 0, quiet: bool = False, logfile: str | None = None) -> None:
    """(Re)configure handlers: stderr unless quiet, plus the logfile if set (reopened on reload).

    The new handlers are made before the old ones go: if the logfile cannot be opened this raises
    LogfileError and changes nothing, so the old handlers (and the old logfile) keep logging."""
    global DEBUG
    fmt = PgBouncerFormatter()
    new: list[logging.Handler] = []
    if not quiet:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        new.append(sh)
    if logfile:
        try:
            fh = logging.FileHandler(logfile)
        except OSError as exc:
            raise LogfileError(logfile, exc) from None
        fh.setFormatter(fmt)
        new.append(fh)
    for h in _handlers:
        logger.removeHandler(h)
        h.close()
    _handlers[:] = new
    for h in _handlers:
        logger.addHandler(h)
    logger.setLevel(logging.DEBUG if verbose > 0 else logging.INFO)
    logger.propagate = False
    DEBUG = verbose > 1


def conn_prefix(kind: str, obj: object, db: str | None, user: str | None, addr: str, port: int) -> str:
    """`C-0x...: db/user@addr:port` as PgBouncer prints it."""
    return f"{kind}-{id(obj):#x}: {db or '(nodb)'}/{user or '(nouser)'}@{addr}:{port}"
