"""Logging in PgBouncer's line format, so existing log parsers and habits keep working.

    2026-11-24 15:16:41.123 UTC [1234] LOG C-0x7f3a...: db/user@127.0.0.1:5555 login attempt: ...

Per-packet debug logging is guarded by the module-level `DEBUG` flag: even a disabled
`logger.debug()` call costs more than the forwarding of a small message.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

logger = logging.getLogger("pgmux")
DEBUG = False

# A login and its logout each write a line (log_connections, log_disconnections): what the logging
# module gathers per record and nobody prints (the caller's file and line found by walking the
# stack, the thread, the process name) cost more than the rest of a login's Python.
logging._srcfile = None  # type: ignore[attr-defined]
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False
logging.logAsyncioTasks = False  # type: ignore[attr-defined]

_LEVEL_NAMES = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "LOG",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "FATAL",
}


class _Clock:
    """The second's part of the stamp, formatted once per second, and the pid, read once per
    process (workers fork)."""

    second = -1
    seconds = ""  # "YYYY-MM-DD HH:MM:SS"
    zone = ""
    pid = os.getpid()

    @classmethod
    def forked(cls) -> None:
        cls.pid = os.getpid()


os.register_at_fork(after_in_child=_Clock.forked)


class PgBouncerFormatter(logging.Formatter):
    """`YYYY-MM-DD HH:MM:SS.mmm TZ [pid] LEVEL message`."""

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        second = int(created)
        clock = _Clock
        if second != clock.second:
            t = time.localtime(second)
            clock.seconds = time.strftime("%Y-%m-%d %H:%M:%S", t)
            clock.zone = time.strftime("%Z", t)
            clock.second = second
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        text = f"{clock.seconds}.{int(record.msecs):03d} {clock.zone} [{clock.pid}] {level} {record.getMessage()}"
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


#: syslog_facility names PgBouncer knows (libusual's facility_names); any other name means daemon.
SYSLOG_FACILITIES = {"auth": 4, "authpriv": 10, "daemon": 3, "user": 1,
                     **{f"local{i}": 16 + i for i in range(8)}}
#: syslog severities of our levels, as libusual maps them (FATAL is LOG_CRIT, LOG is LOG_INFO).
_SYSLOG_SEVERITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}
SYSLOG_PATH = "/dev/log"


class SyslogHandler(logging.Handler):
    """What PgBouncer's ``syslog = 1`` does through glibc: ``openlog(ident, LOG_PID, facility)``
    and ``syslog(prio, "%s", msg)``, that is one datagram per line to /dev/log reading
    ``<PRI>Mmm dd HH:MM:SS ident[pid]: message``. The message is the line without the time, pid
    and level (syslog has its own); DEBUG lines stay out, as PgBouncer's syslog level is LOG.
    Nothing listening on /dev/log is not an error: the line is dropped, as glibc drops it."""

    def __init__(self, ident: str, facility: str, path: str = SYSLOG_PATH) -> None:
        super().__init__(logging.INFO)
        self.ident = ident
        self.facility = SYSLOG_FACILITIES.get(facility, SYSLOG_FACILITIES["daemon"])
        self.path = path
        self.sock: socket.socket | None = None

    def _send(self, data: bytes) -> None:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)  # a full syslog queue drops lines rather than stalling the pooler
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self.sock = sock
        self.sock.send(data)

    def emit(self, record: logging.LogRecord) -> None:
        severity = _SYSLOG_SEVERITY.get(record.levelno, 6)
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(record.created))  # glibc's "%h %e %T"
        text = record.getMessage().replace("\n", "\n\t")
        data = f"<{self.facility * 8 + severity}>{stamp} {self.ident}[{os.getpid()}]: {text}".encode()
        for _attempt in range(2):  # once more on a fresh socket: syslogd may have restarted
            try:
                self._send(data)
                return
            except OSError:
                self.close_socket()

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.close_socket()
        super().close()


def format_line(level: int, message: str) -> str:
    """One log line as the handlers would write it, for messages printed before logging works."""
    record = logging.LogRecord(logger.name, level, __file__, 0, message, None, None)
    return PgBouncerFormatter().format(record)


def setup_logging(*, verbose: int = 0, quiet: bool = False, logfile: str | None = None,
                  syslog: tuple[str, str] | None = None) -> None:
    """(Re)configure handlers: stderr unless quiet, plus the logfile if set (reopened on reload),
    plus syslog if ``syslog`` is (ident, facility).

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
    if syslog is not None:
        new.append(SyslogHandler(*syslog))
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
