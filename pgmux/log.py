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
    seconds = ""  # "YYYY-MM-DD HH:MM:SS."
    tail = ""  # " TZ [pid]"
    zone = ""
    pid = os.getpid()

    @classmethod
    def forked(cls) -> None:
        cls.pid = os.getpid()
        cls.second = -1  # (the tail holds the pid)


_MILLIS = [f"{ms:03d}" for ms in range(1000)]  # a stamp's milliseconds, formatted once


os.register_at_fork(after_in_child=_Clock.forked)


def _stamp(created: float, msecs: float) -> str:
    """`YYYY-MM-DD HH:MM:SS.mmm TZ [pid]` of a time.time() value."""
    second = int(created)
    clock = _Clock
    if second != clock.second:
        t = time.localtime(second)
        clock.seconds = time.strftime("%Y-%m-%d %H:%M:%S.", t)
        clock.zone = time.strftime("%Z", t)
        clock.tail = f" {clock.zone} [{clock.pid}]"
        clock.second = second
    return clock.seconds + _MILLIS[int(msecs)] + clock.tail


class PgBouncerFormatter(logging.Formatter):
    """`YYYY-MM-DD HH:MM:SS.mmm TZ [pid] LEVEL message`."""

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        text = f"{_stamp(record.created, record.msecs)} {level} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_handlers: list[logging.Handler] = []
# The handlers as log_line writes to them: (handler, its stream's file descriptor or -1 when the
# stream has none, e.g. a test's capture) for stderr and the logfile, (handler, None) for syslog.
_sinks: list[tuple[logging.Handler, int | None]] = []


def log_line(level: int, text: str) -> None:
    """A line at `level` (INFO: LOG) for the paths that log once per connection (log_connections,
    log_disconnections): the same line the handlers write, without what the logging module does
    per record (a LogRecord, filters, the line formatted again for each handler, a text layer per
    stream), which cost a -C login more than the rest of its Python. Anything unusual (a handler
    or propagation added from outside, a level that filters it) goes through `logger`."""
    if (len(logger.handlers) != len(_sinks) or logger.propagate or not _sinks
            or level < logger.level):
        logger.log(level, "%s", text)
        return
    created = time.time()
    line = f"{_stamp(created, (created - int(created)) * 1000)} {_LEVEL_NAMES[level]} {text}\n"
    data = b""
    for handler, fd in _sinks:
        if fd is None:
            handler.emit_text(level, text, created)  # type: ignore[attr-defined]
            continue
        handler.acquire()
        try:
            if fd < 0:
                stream = handler.stream  # type: ignore[attr-defined]
                stream.write(line)
                stream.flush()
                continue
            if not data:
                data = line.encode("utf-8", "backslashreplace")
            written = os.write(fd, data)
            if written < len(data):  # (a pipe that is almost full)
                view = memoryview(data)[written:]
                while view:
                    view = view[os.write(fd, view):]
        except Exception:  # noqa: BLE001 - as logging.Handler.handleError: a log line never stops the pooler
            pass
        finally:
            handler.release()


def info(text: str) -> None:
    """A LOG line through log_line."""
    log_line(logging.INFO, text)


def _sink_of(handler: logging.Handler) -> tuple[logging.Handler, int | None]:
    if isinstance(handler, SyslogHandler):
        return handler, None
    stream = getattr(handler, "stream", None)
    try:
        if stream is not None:
            stream.flush()
        return handler, stream.fileno() if stream is not None else -1
    except (OSError, ValueError, AttributeError):
        return handler, -1


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
        self.emit_text(record.levelno, record.getMessage(), record.created)

    def emit_text(self, level: int, message: str, created: float) -> None:
        """One line (the fast path, log_line, calls this directly)."""
        severity = _SYSLOG_SEVERITY.get(level, 6)
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(created))  # glibc's "%h %e %T"
        text = message.replace("\n", "\n\t")
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
    _sinks[:] = [_sink_of(h) for h in new]
    logger.setLevel(logging.DEBUG if verbose > 0 else logging.INFO)
    logger.propagate = False
    DEBUG = verbose > 1


def conn_prefix(kind: str, obj: object, db: str | None, user: str | None, addr: str, port: int) -> str:
    """`C-0x...: db/user@addr:port` as PgBouncer prints it."""
    return f"{kind}-{hex(id(obj))}: {db or '(nodb)'}/{user or '(nouser)'}@{addr}:{port}"
