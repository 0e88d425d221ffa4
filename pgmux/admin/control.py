"""Console commands: who may run what, PgBouncer's argument checks and error texts, then the
action itself through the Pooler's admin hooks (``pgmux/pooler.py``, section "admin console hooks").

The order of checks copies ``src/admin.c`` (e.g. RELOAD with an argument is a syntax error even
for a stats user, PAUSE checks rights first), because scripts match the resulting messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pgmux import log as pglog
from pgmux.admin import show
from pgmux.admin.commands import FAKE_PARAMS, AdminError, Command, parse_kill_client_id, syntax_error
from pgmux.admin.result import Result
from pgmux.config import ConfigError
from pgmux.pool.admin_state import ADMIN_DB, P_NONE, ConsoleSession
from pgmux.protocol import messages as m

if TYPE_CHECKING:
    from pgmux.pooler import Pooler

logger = pglog.logger


def _need_admin(session: ConsoleSession) -> None:
    if not session.is_admin:
        raise AdminError("admin access needed")


def _find_db(pooler: Pooler, name: str) -> str:
    """PgBouncer's find_or_register_database(): a [databases] entry or an auto-database from `*`."""
    db = pooler.config.find_database(name)
    if db is None:
        raise AdminError(f"no such database: {name}")
    return db.name


def _not_admin_db(name: str, what: str) -> None:
    if name == ADMIN_DB:
        raise AdminError(f"cannot {what} admin db: {name}")


def _target_db(pooler: Pooler, what: str, arg: str) -> str | None:
    """The database PAUSE, RECONNECT or KILL names (None: all of them), the command logged as PgBouncer does."""
    if not arg:
        logger.info("%s command issued", what.upper())
        return None
    logger.info("%s '%s' command issued", what.upper(), arg)
    _not_admin_db(arg, what)
    return _find_db(pooler, arg)


def describe(pooler: Pooler, session: ConsoleSession, cmd: Command) -> Result | None:
    """The result a row-returning command would give now (Describe needs its columns before
    Execute); None for commands without rows. Only SHOW qualifies, and SHOW has no side effects."""
    if not cmd.returns_rows:
        return None
    return run_show(pooler, session, cmd)


def run_show(pooler: Pooler, session: ConsoleSession, cmd: Command) -> Result:
    name = cmd.arg.lower()
    if name in FAKE_PARAMS:
        return show.fake_show(name)
    fn = show.SHOW_FUNCTIONS.get(name)
    if fn is None:
        raise syntax_error(cmd.query)
    if name == "fds":
        _need_admin(session)
    return fn(pooler)


async def execute(pooler: Pooler, session: ConsoleSession, cmd: Command,
                  alive: Callable[[], bool] = lambda: True) -> Result:
    """Run one parsed command. `alive` tells long waits (PAUSE, WAIT_CLOSE) whether the asking
    console client is still connected. Raises AdminError for the client to see."""
    name, arg = cmd.name, cmd.arg
    if name in ("show", "select"):
        return run_show(pooler, session, cmd)
    if name == "set":
        return _set(pooler, session, cmd)
    if name in ("reload", "suspend") and arg:
        raise syntax_error(cmd.query)
    if name == "shutdown":
        mode = arg.lower()
        if mode not in ("", "wait_for_clients", "wait_for_servers"):
            raise syntax_error(cmd.query)
        _need_admin(session)
        if mode:
            logger.info("SHUTDOWN %s command issued", mode.upper())
            pooler.console_shutdown(mode)
            return Result("SHUTDOWN")
        logger.info("SHUTDOWN command issued")
        pooler.console_shutdown("immediate")
        return Result(None)
    _need_admin(session)
    state = pooler.admin_state()
    if name == "reload":
        logger.info("RELOAD command issued")
        if not pooler.console_reload():
            raise AdminError("RELOAD failed, see logs for additional details", "F0000")
        return Result("RELOAD")
    if name == "resume":
        return _resume(pooler, arg)
    if name == "reset":  # pgmux: RESET QUERIES
        if arg.lower() != "queries":
            raise syntax_error(cmd.query)
        logger.info("RESET QUERIES command issued")
        pooler.engine.qstats.reset()
        if pooler.shared is not None:
            await pooler.shared.gather(show.RESET_QUERIES)
        return Result("RESET")
    if name == "suspend":
        if state.pause_mode != P_NONE:
            raise AdminError("already suspended/paused")
        if state.paused_dbs:
            raise AdminError("cannot suspend with paused databases")
        logger.info("SUSPEND command issued")
        await pooler.admin_suspend()
        return Result("SUSPEND")
    if name == "pause":
        if state.pause_mode != P_NONE:
            raise AdminError("already suspended/paused")
        await pooler.admin_pause(_target_db(pooler, name, arg), alive)
        return Result("PAUSE")
    if name == "reconnect":
        pooler.admin_reconnect(_target_db(pooler, name, arg))
        return Result("RECONNECT")
    if name in ("disable", "enable"):
        if not arg:
            raise AdminError("a database is required")
        logger.info("%s '%s' command issued", name.upper(), arg)
        _not_admin_db(arg, name)
        db = _find_db(pooler, arg)
        if name == "disable":
            state.disabled_dbs.add(db)
        else:
            state.disabled_dbs.discard(db)
        return Result(name.upper())
    if name == "kill_client":
        client_id = parse_kill_client_id(arg)
        logger.info("KILL_CLIENT %s command issued", client_id)
        if not pooler.admin_kill_client(client_id):
            raise AdminError("client not found")
        return Result("KILL_CLIENT")
    if name == "kill":
        if state.pause_mode != P_NONE:
            raise AdminError("already suspended/paused")
        pooler.admin_kill(_target_db(pooler, name, arg))
        return Result("KILL")
    if name == "wait_close":
        if not arg:
            logger.info("WAIT_CLOSE command issued")
            await pooler.admin_wait_close(None, alive)
        else:
            logger.info("WAIT_CLOSE '%s' command issued", arg)
            if arg == ADMIN_DB:
                raise AdminError(f"cannot wait in admin db: {arg}")
            await pooler.admin_wait_close(_find_db(pooler, arg), alive)
        return Result("WAIT_CLOSE")
    raise syntax_error(cmd.query)  # pragma: no cover - parse_command only yields known names


def _resume(pooler: Pooler, arg: str) -> Result:
    state = pooler.admin_state()
    if not arg:
        logger.info("RESUME command issued")
        if pooler.shutting_down:
            raise AdminError("pooler is shutting down")
        if state.pause_mode == P_NONE:
            raise AdminError("pooler is not paused/suspended")
        pooler.admin_resume(None)
        return Result("RESUME")
    logger.info("RESUME '%s' command issued", arg)
    db = _find_db(pooler, arg)
    if db not in state.paused_dbs:
        raise AdminError(f"database {arg} is not paused")
    pooler.admin_resume(db)
    return Result("RESUME")


def _set(pooler: Pooler, session: ConsoleSession, cmd: Command) -> Result:
    key, value = cmd.arg, cmd.value or ""
    if key.lower() in FAKE_PARAMS:
        return Result("SET", notices=[m.notice_response("SET ignored")])
    _need_admin(session)
    relog = key.lower() in _LOGGING_SETTINGS
    if relog and key.lower() == "logfile" and value:
        # Refuse a logfile that cannot be opened, rather than report success and keep the old one.
        try:
            with open(value, "a"):
                pass
        except OSError as exc:
            logger.error("SET failed: %s", pglog.LogfileError(value, exc))
            raise AdminError("SET failed") from None
    try:
        pooler.settings.set(key, value, source="SET")
    except ConfigError as exc:
        logger.error("SET failed: %s", exc)
        raise AdminError("SET failed") from None
    logger.info("SET %s = %s", key, value)
    pooler.admin_settings_changed()
    if relog and pooler.on_reload is not None:
        pooler.on_reload()  # cli.py: logging again with the changed verbose/logfile
    return Result(f"SET {key}={value}")


_LOGGING_SETTINGS = ("verbose", "logfile")
