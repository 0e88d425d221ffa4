"""The admin console (virtual database ``pgbouncer``): access rules, login, and the query loop.

Login (`run_console`, called by ``ClientConnection.login``) follows PgBouncer's admin_pre_login /
admin_post_login: the pooler's own Unix user may log in over the Unix socket as ``pgbouncer``
without a password (SO_PEERCRED); everybody else authenticates as usual and must be listed in
``admin_users`` (every command) or ``stats_users`` (read-only), else gets ``not allowed``. With
``auth_type = any`` nobody is refused and only ``admin_users`` get control commands, as in PgBouncer.

The session then runs in its own task (`_serve`), outside the login timeout. It answers the simple
Query protocol exactly as PgBouncer does and, beyond PgBouncer, the extended protocol
(Parse/Bind/Describe/Execute/Sync), so drivers that always prepare (psycopg with server-side
binding, asyncpg, JDBC, pgx) can read SHOW results; binary result formats are honoured.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgmux import log as pglog
from pgmux.admin import control
from pgmux.admin.commands import AdminError, Command, parse_command
from pgmux.admin.result import Result, data_row, row_description
from pgmux.admin.show import MERGED_SHOWS, SERVER_VERSION
from pgmux.errors import ClientError, ConnectionLost
from pgmux.net.peercred import peer_credentials
from pgmux.pool.admin_state import ADMIN_USER, P_SUSPEND, ConsoleSession
from pgmux.protocol import messages as m

if TYPE_CHECKING:
    from pgmux.net.client import ClientConnection

logger = pglog.logger

WELCOME_PARAMS = (
    ("server_version", SERVER_VERSION),
    ("client_encoding", "UTF8"),
    ("server_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "GMT"),
    ("standard_conforming_strings", "on"),
    ("is_superuser", "on"),
)

_EMPTY = Command("")  # an empty query string: EmptyQueryResponse
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


# ------------------------------------------------------------------ login


async def run_console(client: ClientConnection) -> None:
    """Authenticate a console user, send the welcome, and start serving commands.

    Raises ClientError (FATAL + close) for refusals. Returns once the session task is started, so
    that the session is not bounded by client_login_timeout."""
    pooler = client.pooler
    s = pooler.settings
    user = client.user or ""
    if _same_uid_unix_login(client, user):
        if s.log_connections:
            logger.info("%s pgbouncer access from unix socket", client.log_prefix)
        client.write(m.auth_ok())
        client.authed = True
        is_admin = True
    else:
        # PgBouncer's console database has a (fake) forced user, so auth_type=any lets anyone in here
        login = client.login_state
        assert login is not None and login.console
        await client.authenticate(login)
        client.authed = True
        if user in s.admin_users:
            is_admin = True
        elif user in s.stats_users or s.auth_type == "any":
            is_admin = False
        else:
            raise ClientError("not allowed")
    state = pooler.admin_state()
    session = ConsoleSession(client, user, is_admin)
    out = [m.parameter_status(k, v) for k, v in WELCOME_PARAMS]
    client.cancel_key = pooler.register_cancel_key(client)
    out.append(m.message(b"K", client.cancel_key))
    out.append(m.ready_for_query(b"I"))
    client.write(b"".join(out))
    client.logged_in = True
    state.sessions[client.id] = session
    state.stats.client_login_count += 1
    await pooler.admin_start()  # no-op once started (normally at process start)
    pooler.spawn(_serve(session))


def _same_uid_unix_login(client: ClientConnection, user: str) -> bool:
    if not client.is_unix or user != ADMIN_USER:
        return False
    cred = peer_credentials(client.transport)
    return cred is not None and cred[1] == os.getuid()


# ------------------------------------------------------------------ the session


@dataclass
class _Portal:
    command: Command
    formats: list[int]
    result: Result | None = None
    sent: int = 0  # rows already sent (Execute with a row limit)


@dataclass
class _Session:
    """Per-connection protocol state around a ConsoleSession."""

    console: ConsoleSession
    statements: dict[str, Command] = field(default_factory=dict)
    portals: dict[str, _Portal] = field(default_factory=dict)
    failed: bool = False  # an extended-protocol error: skip until Sync

    @property
    def client(self) -> ClientConnection:
        return self.console.client


async def _serve(console: ConsoleSession) -> None:
    client = console.client
    pooler = client.pooler
    sess = _Session(console)
    try:
        while True:
            typ, body = await client.read_message()
            if typ == m.QUERY:
                await _simple_query(sess, body)
            elif typ == m.TERMINATE:
                client.close("client close request")
                return
            elif typ in _EXTENDED:
                await _EXTENDED[typ](sess, body)
            else:
                client.fail(f"unsupported packet type for admin console: {typ}")
                return
    except ConnectionLost:
        pass
    except m.ProtocolError as exc:
        client.fail(str(exc))
    except Exception:  # one console session must never take the process down
        logger.exception("%s admin console failure", client.log_prefix)
        client.fail("internal error in admin console", "XX000")
    finally:
        state = pooler.admin_state()
        state.sessions.pop(client.id, None)
        if state.pause_mode == P_SUSPEND and not any(s.is_admin for s in state.sessions.values()):
            logger.info("admin disappeared when suspended, doing RESUME")
            pooler.admin_resume(None)


def _log_error(message: str) -> None:
    logger.error("%s", message)


def _error(exc: AdminError) -> bytes:
    _log_error(exc.message)
    return m.error_response(exc.message, exc.sqlstate, severity="ERROR")


def _begin(sess: _Session) -> None:
    now = time.monotonic()
    sess.console.query_start = now
    sess.client.request_time = now


def _finish(sess: _Session) -> None:
    sess.console.query_start = 0.0
    stats = sess.client.pooler.admin_state().stats
    stats.query_count += 1
    stats.xact_count += 1


def _alive(sess: _Session) -> bool:
    return not sess.client.closed and sess.client.close_reason is None


def _merged(client: ClientConnection, cmd: Command) -> bool:
    """Whether the command's answer covers every worker (workers > 1: statistics, pools, lists)."""
    return client.pooler.shared is not None and cmd.name == "show" and cmd.arg.lower() in MERGED_SHOWS


async def _run(sess: _Session, cmd: Command) -> Result:
    pooler = sess.client.pooler
    if _merged(sess.client, cmd) and pooler.shared is not None:
        return await pooler.shared.merged_show(cmd.arg.lower())
    return await control.execute(pooler, sess.console, cmd, lambda: _alive(sess))


async def _simple_query(sess: _Session, body: bytes) -> None:
    client = sess.client
    end = body.find(b"\0")
    if end < 0:
        client.fail("incomplete query")
        return
    query = body[:end].decode("utf-8", "replace")
    _begin(sess)
    try:
        result = await _run(sess, parse_command(query))
    except AdminError as exc:
        client.write(_error(exc) + m.ready_for_query(b"I"))
        return
    finally:
        _finish(sess)
    if result.tag is None:  # SHUTDOWN: the process exits, no answer
        return
    out = list(result.notices)
    if result.columns is not None:
        cols = result.columns
        out.append(row_description(cols))
        out.extend(data_row(cols, row) for row in result.rows)
    out.append(m.command_complete(result.tag))
    out.append(m.ready_for_query(b"I"))
    client.write(b"".join(out))


# ------------------------------------------------------------------ extended protocol


def _cstr(body: bytes, pos: int) -> tuple[str, int]:
    return m.parse_cstring(body, pos)


def _int16s(body: bytes, pos: int) -> tuple[list[int], int]:
    (n,) = _I16.unpack_from(body, pos)
    pos += 2
    values = list(struct.unpack_from(f"!{n}h", body, pos))
    return values, pos + 2 * n


def _ext_fail(sess: _Session, exc: AdminError) -> None:
    sess.failed = True
    sess.client.write(_error(exc))


async def _on_parse(sess: _Session, body: bytes) -> None:
    if sess.failed:
        return
    name, pos = _cstr(body, 0)
    query, pos = _cstr(body, pos)
    if name and name in sess.statements:
        _ext_fail(sess, AdminError(f'prepared statement "{name}" already exists', "42P05"))
        return
    try:
        cmd = parse_command(query) if query.strip() else _EMPTY
    except AdminError as exc:
        _ext_fail(sess, exc)
        return
    sess.statements[name] = cmd
    sess.client.write(m.message(b"1"))


async def _on_bind(sess: _Session, body: bytes) -> None:
    if sess.failed:
        return
    portal, pos = _cstr(body, 0)
    stmt, pos = _cstr(body, pos)
    _, pos = _int16s(body, pos)  # parameter formats
    (nparams,) = _I16.unpack_from(body, pos)
    pos += 2
    for _ in range(nparams):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4 + max(length, 0)
    formats, pos = _int16s(body, pos)
    cmd = sess.statements.get(stmt)
    if cmd is None:
        _ext_fail(sess, AdminError(f'prepared statement "{stmt}" does not exist', "26000"))
        return
    if nparams:
        _ext_fail(sess, AdminError(
            f'bind message supplies {nparams} parameters, but prepared statement "{stmt}" requires 0'))
        return
    sess.portals[portal] = _Portal(cmd, formats)
    sess.client.write(m.message(b"2"))


async def _on_describe(sess: _Session, body: bytes) -> None:
    if sess.failed:
        return
    kind = body[:1]
    name, _ = _cstr(body, 1)
    pooler = sess.client.pooler
    try:
        if kind == b"S":
            cmd = sess.statements.get(name)
            if cmd is None:
                raise AdminError(f'prepared statement "{name}" does not exist', "26000")
            result = control.describe(pooler, sess.console, cmd)
            out = m.message(b"t", _I16.pack(0))
            out += row_description(result.columns) if result and result.columns else m.message(b"n")
        elif kind == b"P":
            portal = sess.portals.get(name)
            if portal is None:
                raise AdminError(f'portal "{name}" does not exist', "34000")
            result = portal.result
            if result is None:
                result = control.describe(pooler, sess.console, portal.command)
                if not _merged(sess.client, portal.command):
                    portal.result = result  # a merged one is gathered by Execute; same columns
            out = row_description(result.columns, portal.formats) if result and result.columns else m.message(b"n")
        else:
            raise m.ProtocolError("invalid DESCRIBE message subtype")
    except AdminError as exc:
        _ext_fail(sess, exc)
        return
    sess.client.write(out)


async def _on_execute(sess: _Session, body: bytes) -> None:
    if sess.failed:
        return
    name, pos = _cstr(body, 0)
    (max_rows,) = _I32.unpack_from(body, pos)
    portal = sess.portals.get(name)
    client = sess.client
    if portal is None:
        _ext_fail(sess, AdminError(f'portal "{name}" does not exist', "34000"))
        return
    if portal.command is _EMPTY:
        client.write(m.message(b"I"))
        return
    _begin(sess)
    try:
        if portal.result is None or not portal.command.returns_rows:
            portal.result = await _run(sess, portal.command)
    except AdminError as exc:
        _ext_fail(sess, exc)
        return
    finally:
        _finish(sess)
    result = portal.result
    if result.tag is None:
        return
    out = list(result.notices) if portal.sent == 0 else []
    if result.columns is not None:
        rows = result.rows[portal.sent:]
        suspended = 0 < max_rows < len(rows)
        if suspended:
            rows = rows[:max_rows]
        out.extend(data_row(result.columns, row, portal.formats) for row in rows)
        portal.sent += len(rows)
        if suspended:
            out.append(m.message(b"s"))  # PortalSuspended: the next Execute sends the rest
            client.write(b"".join(out))
            return
    out.append(m.command_complete(result.tag))
    client.write(b"".join(out))


async def _on_sync(sess: _Session, body: bytes) -> None:
    sess.failed = False
    sess.portals.pop("", None)
    sess.client.write(m.ready_for_query(b"I"))


async def _on_close(sess: _Session, body: bytes) -> None:
    if sess.failed:
        return
    kind = body[:1]
    name, _ = _cstr(body, 1)
    if kind == b"S":
        sess.statements.pop(name, None)
    else:
        sess.portals.pop(name, None)
    sess.client.write(m.message(b"3"))


async def _on_flush(sess: _Session, body: bytes) -> None:
    return None  # every answer is written as soon as it is ready


_EXTENDED = {
    m.PARSE: _on_parse,
    m.BIND: _on_bind,
    m.DESCRIBE: _on_describe,
    m.EXECUTE: _on_execute,
    m.SYNC: _on_sync,
    m.CLOSE: _on_close,
    m.FLUSH: _on_flush,
}
