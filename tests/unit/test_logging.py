"""pgmux.log's (re)configuration and the console SETs that redo it (verbose, logfile)."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pgmux import cli
from pgmux import log as pglog
from pgmux.admin import control
from pgmux.admin.commands import AdminError, Command
from pgmux.config.settings import Settings
from pgmux.pool.admin_state import ConsoleSession


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    logger = pglog.logger
    saved = (list(pglog._handlers), list(logger.handlers), logger.level, logger.propagate, pglog.DEBUG,
             list(pglog._sinks))
    try:
        yield
    finally:
        for h in pglog._handlers:
            if h not in saved[0]:
                h.close()
        pglog._handlers[:] = saved[0]
        logger.handlers[:] = saved[1]
        logger.setLevel(saved[2])
        logger.propagate = saved[3]
        pglog.DEBUG = saved[4]
        pglog._sinks[:] = saved[5]


def test_unopenable_logfile_keeps_the_old_handlers(tmp_path: Path) -> None:
    first = tmp_path / "first.log"
    pglog.setup_logging(quiet=True, logfile=str(first))
    handlers = list(pglog.logger.handlers)
    bad = str(tmp_path / "no-such-dir" / "second.log")
    with pytest.raises(pglog.LogfileError) as info:
        pglog.setup_logging(verbose=2, quiet=True, logfile=bad)
    assert str(info.value).startswith(f"Cannot open logfile: '{bad}': ")
    assert pglog.logger.handlers == handlers and not pglog.DEBUG
    pglog.logger.info("still logging")
    assert "LOG still logging" in first.read_text()


def test_relog_reports_an_unopenable_logfile(tmp_path: Path) -> None:
    first = tmp_path / "first.log"
    args = argparse.Namespace(verbose=0, quiet=True, daemon=False)
    cli._relog(args, SimpleNamespace(verbose=0, logfile=str(first), syslog=False))
    cli._relog(args, SimpleNamespace(verbose=0, logfile=str(tmp_path / "nodir" / "x.log"), syslog=False))
    text = first.read_text()
    assert f"ERROR Cannot open logfile: '{tmp_path}/nodir/x.log'" in text


def test_fatal_line_format() -> None:
    line = pglog.format_line(logging.CRITICAL, "Cannot open logfile: '/x': No such file or directory")
    assert line.endswith(" FATAL Cannot open logfile: '/x': No such file or directory")


def _fake_pooler(settings: Settings, on_reload: Any) -> Any:
    return SimpleNamespace(settings=settings, on_reload=on_reload, admin_settings_changed=lambda: None)


def _set(pooler: Any, key: str, value: str) -> Any:
    session = ConsoleSession(client=None, user="postgres", is_admin=True)  # type: ignore[arg-type]
    return control._set(pooler, session, Command("set", key, value, f"SET {key} = {value}"))


def test_console_set_verbose_redoes_logging() -> None:
    settings = Settings()
    args = argparse.Namespace(verbose=0, quiet=True, daemon=False)
    pooler = _fake_pooler(settings, lambda: cli._setup_logging(args, settings))  # as cli.serve sets it
    cli._setup_logging(args, settings)
    assert pglog.logger.level == logging.INFO and not pglog.DEBUG
    _set(pooler, "verbose", "2")
    assert pglog.logger.level == logging.DEBUG and pglog.DEBUG
    _set(pooler, "verbose", "0")
    assert pglog.logger.level == logging.INFO and not pglog.DEBUG


def test_console_set_logfile_redoes_logging(tmp_path: Path) -> None:
    settings = Settings()
    args = argparse.Namespace(verbose=0, quiet=True, daemon=False)
    calls: list[str] = []

    def relog() -> None:
        calls.append(settings.logfile)
        cli._setup_logging(args, settings)

    pooler = _fake_pooler(settings, relog)
    target = tmp_path / "set.log"
    _set(pooler, "logfile", str(target))
    assert calls == [str(target)]
    pglog.logger.info("after SET")
    assert "after SET" in target.read_text()
    with pytest.raises(AdminError, match="SET failed"):
        _set(pooler, "logfile", str(tmp_path / "nodir" / "x.log"))
    assert settings.logfile == str(target) and calls == [str(target)]
    _set(pooler, "default_pool_size", "7")  # other settings leave logging alone
    assert calls == [str(target)]


def test_syslog_handler_unknown_facility_is_daemon_and_debug_stays_out(tmp_path: Path) -> None:
    """libusual's start_syslog(): a facility name it does not know means daemon; its syslog level is
    LOG, so DEBUG lines are not sent; a missing /dev/log drops lines without an error."""
    import socket

    path = str(tmp_path / "log.sock")
    handler = pglog.SyslogHandler("ident", "nonsense", path)
    log = logging.getLogger("pgmux-syslog-test")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    log.info("nobody listens yet")  # dropped quietly
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        log.debug("debug line")
        log.error("two\nlines")
        data = sock.recv(4096).decode()
    log.removeHandler(handler)
    handler.close()
    assert data.startswith(f"<{3 * 8 + 3}>") and data.endswith(f" ident[{os.getpid()}]: two\n\tlines"), data


STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+ \[\d+\] ")


def test_log_line_writes_the_line_the_logging_module_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pglog.info (log_connections' and log_disconnections' fast path) writes to stderr, a stream
    without a file descriptor and the logfile the same line as logger.info, in order with it."""
    logfile = tmp_path / "pgmux.log"
    fake_stderr = io.StringIO()  # a capture with no fileno(): written through the stream
    monkeypatch.setattr(sys, "stderr", fake_stderr)
    pglog.setup_logging(logfile=str(logfile))
    assert [fd for _h, fd in pglog._sinks] == [-1, pglog._handlers[1].stream.fileno()]  # type: ignore[attr-defined]
    text = "C-0x1: db/us\u00e9r@127.0.0.1:5 login attempt: db=db user=us\u00e9r tls=no"
    pglog.logger.info("%s", text)
    pglog.info(text)
    pglog.logger.warning("after")
    for got in (logfile.read_text(encoding="utf-8"), fake_stderr.getvalue()):
        lines = got.splitlines()
        assert [STAMP.sub("", line) for line in lines] == [f"LOG {text}", f"LOG {text}", "WARNING after"], got
        assert all(STAMP.match(line) for line in lines)


def test_log_line_goes_through_logging_when_someone_else_listens(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A handler added from outside (or propagation, as pytest's caplog needs) sees every line."""
    logfile = tmp_path / "pgmux.log"
    pglog.setup_logging(quiet=True, logfile=str(logfile))
    pglog.logger.propagate = True
    with caplog.at_level(logging.INFO, logger="pgmux"):
        pglog.info("closing because: client close request (age=0s)")
    assert "closing because: client close request (age=0s)" in caplog.text
    assert logfile.read_text().endswith(" LOG closing because: client close request (age=0s)\n")


def test_event_loop_errors_reach_pgmux_log() -> None:
    """An error the event loop hands to no one (an engine hook that raised) is an ERROR line in
    pgmux's own log, traceback included, not a line on the `asyncio` logger nobody listens to."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    pglog.logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    try:
        try:
            raise ValueError("hook failed")
        except ValueError as exc:
            cli.log_loop_error(loop, {"message": "pgmux engine: error in a link hook", "exception": exc})
    finally:
        loop.close()
        pglog.logger.removeHandler(handler)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.ERROR, "pgmux engine: error in a link hook")]
    assert records[0].exc_info is not None and records[0].exc_info[0] is ValueError
