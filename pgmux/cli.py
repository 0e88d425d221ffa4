"""Command line, signals and daemonizing: `pgmux [-d] [-R] [-q] [-v] [-u user] config.ini`, as PgBouncer."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from pgmux import __version__
from pgmux import log as pglog
from pgmux.auth import AuthFileError
from pgmux.config import Config, ConfigError, load_config
from pgmux.net import systemd

if TYPE_CHECKING:
    from pgmux.workers import WorkerContext

logger = pglog.logger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgmux",
        description="PostgreSQL connection pooler, compatible with PgBouncer's configuration.",
        add_help=False,
    )
    p.add_argument("-d", "--daemon", action="store_true", help="run in the background (needs pidfile and logfile)")
    p.add_argument("-R", "--reboot", action="store_true", help="online restart (not supported; use so_reuseport)")
    p.add_argument("-q", "--quiet", action="store_true", help="no logging to stderr")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; repeat for more")
    p.add_argument("-u", "--user", help="switch to this Unix user after start")
    p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    p.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio event loop")
    p.add_argument("config", nargs="?", help="pgbouncer.ini-style configuration file")
    return p


def load(path: str) -> Config:
    """Load the config and check the auth file parses, so errors stop the start, not a login."""
    from pgmux.pooler import check_config

    config = load_config(path)
    check_config(config)
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"pgmux {__version__}")
        return 0
    if not args.config:
        build_parser().print_usage(sys.stderr)
        print("pgmux: error: a config file is required", file=sys.stderr)
        return 1
    if args.reboot:
        print("pgmux: -R (online restart) is not supported; use so_reuseport with SHUTDOWN WAIT_FOR_CLIENTS",
              file=sys.stderr)
        return 1
    try:
        config = load(args.config)
    except (ConfigError, AuthFileError) as exc:
        print(f"pgmux: config error: {exc}", file=sys.stderr)
        return 1
    s = config.settings
    if args.daemon and not (s.pidfile and s.logfile):
        print("pgmux: -d needs pidfile and logfile in the config", file=sys.stderr)
        return 1
    try:
        _setup_logging(args, s)
    except pglog.LogfileError as exc:
        # PgBouncer writes this one to stderr whatever -q says, then exits 1.
        print(pglog.format_line(logging.CRITICAL, str(exc)), file=sys.stderr)
        return 1
    # -u wins over the `user` setting; an unknown user stops the start before anything is bound.
    args.user = args.user or s.user or None
    if args.user and not _known_user(args.user):
        return 1
    if not _check_pidfile(s.pidfile):
        return 1
    if args.daemon:
        _daemonize()
    try:
        return _run(args, config)
    finally:
        _remove_pidfile()


_pidfile_written: tuple[str, int] | None = None  # (path, pid): the pidfile this process wrote


def _check_pidfile(path: str) -> bool:
    """PgBouncer's check_pidfile(): refuse to start when the pidfile names a live process; a stale
    one (no such process) is removed. Logs and returns False to stop the start."""
    if not path:
        return True
    try:
        with open(path, "rb") as f:
            text = f.read(128)
    except FileNotFoundError:
        return True
    except OSError as exc:
        logger.critical("could not open pidfile '%s': %s", path, exc.strerror)
        return False
    if not text:
        logger.critical("could not read pidfile '%s': %s", path, "empty file")
        return False
    digits = text.strip()[:20]
    n = len(digits) - len(digits.lstrip(b"0123456789"))
    pid = int(digits[:n]) if n else 0
    if pid > 0:
        try:
            if pid == os.getpid():  # e.g. a container restarted with the same pid: not another instance
                raise ProcessLookupError
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("stale pidfile, removing")
            try:
                os.unlink(path)
            except OSError as exc:
                logger.critical("could not remove stale pidfile: %s", exc.strerror)
                return False
            return True
        except OSError:  # EPERM: alive, someone else's
            pass
    logger.critical("pidfile exists, another instance running?")
    return False


def _write_pidfile(path: str) -> bool:
    """Once listening: write our pid (O_EXCL, as PgBouncer), remembered for removal at exit."""
    global _pidfile_written
    if not path:
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        logger.critical("could not open pidfile '%s': %s", path, exc.strerror)
        return False
    pid = os.getpid()
    _pidfile_written = (path, pid)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid}\n")
    except OSError as exc:
        logger.critical("could not write pidfile '%s': %s", path, exc.strerror)
        return False
    return True


def _remove_pidfile() -> None:
    """Remove the pidfile only if this very process wrote it and it still names us."""
    global _pidfile_written
    if _pidfile_written is None or _pidfile_written[1] != os.getpid():
        return
    path, pid = _pidfile_written
    _pidfile_written = None
    try:
        with open(path) as f:
            if f.read(64).strip() not in ("", str(pid)):
                return
        os.unlink(path)
    except OSError:
        pass


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def _run(args: argparse.Namespace, config: Config) -> int:
    if config.settings.workers > 1:
        from pgmux.workers import Supervisor

        def relog(new: Config) -> None:
            _relog(args, new.settings)

        def after_bind() -> bool:
            """The supervisor is bound: write the pidfile, then give up root."""
            if not _write_pidfile(config.settings.pidfile):
                return False
            return not args.user or _switch_user(args.user)

        return Supervisor(config, lambda cfg, worker: _run_loop(args, cfg, worker),
                          after_bind=after_bind, on_reload=relog).run()
    return _run_loop(args, config, None)


def _run_loop(args: argparse.Namespace, config: Config, worker: WorkerContext | None) -> int:
    """One process's event loop: the whole pooler, or one worker of several."""
    use_uvloop = not args.no_uvloop
    loop_factory: Any = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(args, config, worker))


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What the event loop could hand to no one (a callback, or an engine hook, that raised): an
    ERROR in pgmux's own log, so that it reaches the logfile and syslog too; asyncio's default
    handler writes to the `asyncio` logger, which no handler of ours listens to."""
    exc = context.get("exception")
    logger.error("%s", context.get("message") or "unexpected error in the event loop",
                 exc_info=(type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None)


#: The signals serve() handles (as PgBouncer's signal_setup()).
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


async def serve(args: argparse.Namespace, config: Config, worker: WorkerContext | None = None) -> int:
    from pgmux.admin.console import run_console
    from pgmux.pooler import Pooler

    asyncio.get_running_loop().set_exception_handler(log_loop_error)
    pooler = Pooler(config)
    pooler.console_entry = run_console
    share = worker.prepare(pooler) if worker is not None else None
    # PgBouncer sets its signal handlers before it listens: once a client can connect, SIGHUP
    # reloads rather than killing the process. Ours are set once the pooler is ready, so the
    # signals stay blocked until then and pending ones are delivered at that point. (A worker's
    # are blocked since the fork; WorkerShare.start() restores its mask.)
    saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS) if worker is None else None
    try:
        return await _serve(args, config, worker, pooler, share)
    finally:
        if saved_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)


async def _serve(args: argparse.Namespace, config: Config, worker: WorkerContext | None, pooler: Any,
                 share: Any) -> int:
    from pgmux.net.listener import start_listeners

    loop = asyncio.get_running_loop()
    try:
        if worker is not None:
            pooler.listeners = await start_listeners(pooler, worker.bound, worker.index)
        else:
            pooler.listeners = await start_listeners(pooler)
    except OSError as exc:
        logger.critical("%s", exc)
        return 1
    # A worker's supervisor wrote the pidfile and switched user before forking it.
    if worker is None and not (_write_pidfile(config.settings.pidfile)
                               and (not args.user or _switch_user(args.user))):
        for srv in pooler.listeners:
            srv.close()
        return 1
    done: asyncio.Future[None] = loop.create_future()
    pooler.shutdown_done = done
    await pooler.admin_start()

    def relog() -> None:
        _relog(args, pooler.settings)

    pooler.on_reload = relog
    # Signals act on this process only (the console's RELOAD/SHUTDOWN go through
    # Pooler.console_reload/console_shutdown, which also reach the other workers).

    exit_code = 0

    def shutdown(signame: str, mode: str) -> None:
        # PgBouncer: SIGINT or SIGTERM while a shutdown (signal or console SHUTDOWN) is already
        # under way means exit now; SIGQUIT always does; SIGINT or SIGTERM during SUSPEND dies.
        nonlocal exit_code
        if mode == "immediate":
            logger.info("got %s, fast exit", signame)
        elif pooler.shutting_down or pooler.admin_state().shutdown_mode is not None:
            logger.info("got %s while shutting down, fast exit", signame)
        else:
            logger.info("got %s, shutting down, %s", signame, _SHUTDOWN_WORDS[mode])
            if pooler.admin_state().pause_mode != "suspend":
                pooler.admin_shutdown(mode)
                return
            logger.critical("suspend was in progress, going down immediately")
            exit_code = 1
        pooler.admin_shutdown("immediate")

    loop.add_signal_handler(signal.SIGHUP, pooler.admin_reload)
    loop.add_signal_handler(signal.SIGUSR1, pooler.admin_signal_pause)
    loop.add_signal_handler(signal.SIGUSR2, pooler.admin_signal_resume)
    loop.add_signal_handler(signal.SIGINT, shutdown, "SIGINT", "wait_for_servers")
    loop.add_signal_handler(signal.SIGTERM, shutdown, "SIGTERM", "wait_for_clients")
    loop.add_signal_handler(signal.SIGQUIT, shutdown, "SIGQUIT", "immediate")
    if worker is None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    listen = f"{', '.join(config.settings.listen_addr) or '(unix only)'} port {config.settings.listen_port}"
    if systemd.listen_fds():
        listen = ", ".join(systemd.describe(sock) for sock in systemd.listen_fds()) + " (from service manager)"
    where = f" (worker {worker.index + 1} of {worker.count})" if worker is not None else ""
    logger.info("pgmux %s listening on %s%s", __import__("pgmux").__version__, listen, where)
    if worker is None:
        systemd.notify_ready()  # with workers, the supervisor says it once all are started
    if share is not None:
        share.start()
    janitor = loop.create_task(_janitor(pooler))
    try:
        await done
    finally:
        janitor.cancel()
        if share is not None:
            share.stop()
        pooler.close_all()
        await asyncio.sleep(0.05)  # let the FATAL messages and Terminates go out
        if pooler.own_sockets is not None:
            pooler.own_sockets.remove_unix_file()
    logger.info("shutdown complete")
    return exit_code


async def _janitor(pooler: Any) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            pooler.janitor_tick()
        except Exception:  # noqa: BLE001 - maintenance must not stop
            logger.exception("janitor failed")


_SHUTDOWN_WORDS = {"wait_for_clients": "waiting for all clients disconnect",
                   "wait_for_servers": "waiting for all servers connections to be released"}


def _setup_logging(args: argparse.Namespace, settings: Any) -> None:
    """Logging as the command line and the (re)loaded settings ask: -v adds to `verbose`, -q and
    -d silence stderr, `logfile` is (re)opened, `syslog` (re)connects with syslog_ident and
    syslog_facility."""
    pglog.setup_logging(verbose=args.verbose + int(settings.verbose), quiet=args.quiet or args.daemon,
                        logfile=settings.logfile or None,
                        syslog=(settings.syslog_ident, settings.syslog_facility) if settings.syslog else None)


def _relog(args: argparse.Namespace, settings: Any) -> None:
    """Logging again after RELOAD/SIGHUP or a console SET: a logfile that cannot be opened keeps
    the old handlers (so logging goes on where it went) and is reported."""
    try:
        _setup_logging(args, settings)
    except pglog.LogfileError as exc:
        logger.error("%s", exc)


def _known_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        logger.critical("could not find user '%s' to switch to", name)
        return False
    return True


def _switch_user(name: str) -> bool:
    """-u / `user`: become this Unix user, with its own supplementary groups instead of root's
    (PgBouncer's change_user(); texts as there). Logs and returns False on failure."""
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        logger.critical("could not find user '%s' to switch to", name)
        return False
    if os.getuid() == 0:
        try:
            os.initgroups(pw.pw_name, pw.pw_gid)
        except OSError as exc:
            logger.critical("failed to reset groups: %s", exc.strerror)
            return False
    try:
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except OSError as exc:
        logger.critical("failed to assume identity of user '%s': %s", name, exc.strerror)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
