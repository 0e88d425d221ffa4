"""Command line, signals and daemonizing: `pgmux [-d] [-R] [-q] [-v] [-u user] config.ini`, as PgBouncer."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from pgmux import __version__
from pgmux import log as pglog
from pgmux.auth import AuthFileError
from pgmux.config import Config, ConfigError, load_config

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
    _setup_logging(args, s)
    if args.daemon:
        _daemonize()
    if s.pidfile:
        with open(s.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        return _run(args, config)
    finally:
        if s.pidfile:
            try:
                os.unlink(s.pidfile)
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
            _setup_logging(args, new.settings)

        def drop_privileges() -> None:
            if args.user:
                _switch_user(args.user)

        return Supervisor(config, lambda cfg, worker: _run_loop(args, cfg, worker),
                          after_bind=drop_privileges, on_reload=relog).run()
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


async def serve(args: argparse.Namespace, config: Config, worker: WorkerContext | None = None) -> int:
    from pgmux.net.listener import start_listeners
    from pgmux.pooler import Pooler

    loop = asyncio.get_running_loop()
    pooler = Pooler(config)
    share = worker.prepare(pooler) if worker is not None else None
    try:
        if worker is not None:
            pooler.listeners = await start_listeners(pooler, worker.bound, worker.index)
        else:
            pooler.listeners = await start_listeners(pooler)
    except OSError as exc:
        logger.critical("%s", exc)
        return 1
    if args.user and worker is None:  # a worker's supervisor switched before forking it
        _switch_user(args.user)
    done: asyncio.Future[None] = loop.create_future()
    pooler.shutdown_done = done
    await pooler.admin_start()
    state = {"signals": 0}

    def relog() -> None:
        _setup_logging(args, pooler.settings)

    pooler.on_reload = relog
    # Signals act on this process only (the console's RELOAD/SHUTDOWN go through
    # Pooler.console_reload/console_shutdown, which also reach the other workers).

    def shutdown(signame: str, mode: str) -> None:
        state["signals"] += 1
        if state["signals"] > 1 or mode == "immediate":
            logger.info("got %s, exiting immediately", signame)
            pooler.admin_shutdown("immediate")
            return
        logger.info("got %s, shutting down (%s)", signame, mode)
        pooler.admin_shutdown(mode)

    loop.add_signal_handler(signal.SIGHUP, pooler.admin_reload)
    loop.add_signal_handler(signal.SIGUSR1, pooler.admin_signal_pause)
    loop.add_signal_handler(signal.SIGUSR2, pooler.admin_signal_resume)
    loop.add_signal_handler(signal.SIGINT, shutdown, "SIGINT", "wait_for_servers")
    loop.add_signal_handler(signal.SIGTERM, shutdown, "SIGTERM", "wait_for_clients")
    loop.add_signal_handler(signal.SIGQUIT, shutdown, "SIGQUIT", "immediate")
    listen = ", ".join(config.settings.listen_addr) or "(unix only)"
    where = f" (worker {worker.index + 1} of {worker.count})" if worker is not None else ""
    logger.info("pgmux %s listening on %s port %s%s", __import__("pgmux").__version__, listen,
                config.settings.listen_port, where)
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
    logger.info("shutdown complete")
    return 0


async def _janitor(pooler: Any) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            pooler.janitor_tick()
        except Exception:  # noqa: BLE001 - maintenance must not stop
            logger.exception("janitor failed")


def _setup_logging(args: argparse.Namespace, settings: Any) -> None:
    """Logging as the command line and the (re)loaded settings ask: -v adds to `verbose`, -q and
    -d silence stderr, `logfile` is (re)opened."""
    pglog.setup_logging(verbose=args.verbose + int(settings.verbose), quiet=args.quiet or args.daemon,
                        logfile=settings.logfile or None)


def _switch_user(name: str) -> None:
    import pwd

    pw = pwd.getpwnam(name)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


if __name__ == "__main__":
    sys.exit(main())
