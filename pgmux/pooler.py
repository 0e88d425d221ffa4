"""The pooler: pools by (database, user), linking clients to servers, opening server connections,
cancel requests, reload and shutdown.

`pgmux.pool.Pool` holds the rules (who waits, how many servers); this module acts on them with
sockets and tasks. A client asks for a server in `request_server`; a server comes back in
`transaction_boundary` (transaction/statement mode) or `client_gone` (session mode).
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pgmux import log as pglog
from pgmux.auth import load_auth_file
from pgmux.auth.hba import HbaError, HbaRule, HbaRules, IdentMap
from pgmux.auth.secrets import forget_secret_classifications, random_bytes
from pgmux.config import Config, ConfigError, DatabaseEntry
from pgmux.engine import LAZY_PREPARE, PIN_HINTS, SESSION, TRACKED, Engine
from pgmux.errors import ClientError, ConnectionLost, ServerLoginError
from pgmux.net import peers, systemd
from pgmux.net.client import LOGIN_RECHECK, ClientConnection
from pgmux.net.listener import BoundSockets, EngineServer, log_unsupported_settings, stop_listening
from pgmux.net.server import ServerConnection
from pgmux.net.sockopts import apply_tcp_options
from pgmux.net.tls import TlsConfigError, build_contexts
from pgmux.pool.admin_state import AdminState
from pgmux.pool.pool import Pool, PoolLimits
from pgmux.protocol import messages as m
from pgmux.protocol.prepared import StatementRegistry
from pgmux.protocol.sessionstate import (
    CURSOR_PROBE_SQL,
    OWN_STATEMENTS_SQL,
    cursor_only,
    describe,
    describe_cursors,
    own_statements_match,
    probe_sql,
)
from pgmux.protocol.varcache import StartupOptionsError, iter_startup_options, set_statement, tracked_names
from pgmux.stats.service import run_stats_timer, start_metrics_listener  # (before `user` drops privileges)

if TYPE_CHECKING:
    from pgmux.workers import WorkerShare

QUERY_TIMEOUT = "query timeout"
logger = pglog.logger

DEFAULT_AUTH_QUERY_PGBOUNCER = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword END "
    "FROM pg_catalog.pg_authid WHERE rolname OPERATOR(pg_catalog.=) $1 AND rolcanlogin"
)

def load_hba(settings: Any) -> tuple[HbaRules | None, IdentMap | None]:
    """auth_hba_file and auth_ident_file, when set; errors name the file and line."""
    ident = IdentMap.load(settings.auth_ident_file) if settings.auth_ident_file else None
    if not settings.auth_hba_file:
        if settings.auth_type == "hba":
            raise ConfigError("auth_type = hba needs auth_hba_file", key="auth_hba_file")
        return None, ident
    rules = HbaRules.load(settings.auth_hba_file, ident=ident)
    rules.validate_maps(ident)
    for warning in rules.warnings:
        logger.warning("%s", warning)
    return rules, ident


def check_config(config: Config) -> None:
    """Everything a start or RELOAD must refuse before applying a config: the auth file, the
    HBA and ident files, TLS files. Raises ConfigError/AuthFileError naming file and line."""
    s = config.settings
    if s.auth_file:
        load_auth_file(s.auth_file)
    try:
        load_hba(s)
    except HbaError as exc:
        raise ConfigError(exc.message, file=exc.file, line=exc.line) from exc
    try:
        build_contexts(s)
    except TlsConfigError as exc:
        raise ConfigError(str(exc), file=config.path) from exc


# Startup parameters a client may send besides the tracked ones (PgBouncer's list).
_ALWAYS_ALLOWED = {"user", "database", "application_name", "replication", "options"}
_IDLE = ord("I")
QUERY_WAIT_NOTICE = m.notice_response("No server connection available in postgres backend, client being queued")
#: SHUTDOWN WAIT_FOR_SERVERS (SIGINT): what a client that would wait for a server is told.
SERVER_SHUTTING_DOWN = "server shutting down"
#: The line the process exits with once a graceful shutdown is done, per mode (PgBouncer's janitor).
_CONNECTIONS_DROPPED = {"wait_for_servers": "server connections dropped, exiting",
                        "wait_for_clients": "client connections dropped, exiting"}


def _fatal(message: str) -> dict[str, str]:
    """ErrorResponse fields of a server login that failed without one from PostgreSQL."""
    return {"S": "FATAL", "C": "08P01", "M": message}


class Pooler:
    """Process-wide state: configuration, pools, clients, and the actions that join them."""

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        # The console's protocol loop (pgmux.admin.console.run_console), given by the cli: the
        # console sits above the pools, which never import it. None: no console (in-process tests).
        self.console_entry: Callable[[ClientConnection], Coroutine[Any, Any, None]] | None = None
        self._admin = AdminState()  # what the console adds: pause mode, paused/disabled databases, sessions
        self.auth_users: dict[str, str] = {}
        # Passwords that ldap/pam logins proved, for those users' server logins (PgBouncer keeps them too).
        self.external_passwords: dict[str, str] = {}
        self.pools: dict[tuple[str, str], Pool[ServerConnection, ClientConnection]] = {}
        self.clients: set[ClientConnection] = set()
        self.admitted_clients = 0  # clients past the max_client_conn check
        # clients past check_client_limits, per client-side database name and per user
        self.db_clients: dict[str, int] = {}
        self.user_clients: dict[str, int] = {}
        self.fd_limit = 0
        self.fd_warn_at = 0
        self._fd_warned = -10.0
        self._read_fd_limit()
        self.cancel_keys: dict[bytes, ClientConnection] = {}
        # Logins under client_login_timeout, and when it ends each: checked every LOGIN_RECHECK
        # seconds while there are any, as PgBouncer's janitor checks its login list (a timer per
        # login would start and close a libuv timer per connection).
        self.login_deadlines: dict[ClientConnection, float] = {}
        self._login_sweep: asyncio.TimerHandle | None = None
        self.shutting_down = False
        self.listeners: list[EngineServer | asyncio.AbstractServer] = []
        self.own_sockets: BoundSockets | None = None  # one process: what start_listeners bound
        self._client_ids = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        # Clients logging in to a pool that has no ParameterStatus set yet: (future, since when).
        self._params_waiters: dict[int, list[tuple[asyncio.Future[dict[str, str]], float]]] = {}
        self._params_room_wait: set[int] = set()  # pools whose first connect waits for db/user room
        self._rr_counter = 0
        self._sticky_hosts: dict[str, int] = {}  # load_balance_hosts = disable: the host in use
        self.statements = StatementRegistry()
        self.looked_up_secrets: dict[str, str] = {}
        # workers > 1 (pgmux/workers.py): the limits and statistics this process shares.
        self.shared: WorkerShare | None = None
        self.on_reload: Callable[[], None] | None = None  # cli.py: reopen the log file with the new settings
        self.shutdown_done: asyncio.Future[None] | None = None  # cli.py: resolved when the process may exit
        # The data path (pgmux/engine): one epoll set per process, registered once in this loop.
        self.engine = Engine(self.loop)
        self.engine.start()
        # Under uvloop the engine waits in its own epoll_wait while its sockets keep it busy (one
        # system call per wake-up instead of two). PGMUX_ENGINE_HOLD=0 turns it off (a debugging aid).
        if os.environ.get("PGMUX_ENGINE_HOLD", "1") != "0":
            self.engine.enable_hold()
        self.peers = peers.PeerForwarder(self)  # cancel requests for other pooler processes
        self.apply_config(config)

    # ------------------------------------------------------------ configuration

    def apply_config(self, config: Config) -> None:
        """Take a (re)loaded config: auth file, tracked parameters, pool limits."""
        # First of all, before anything here may fail (a console SET keeps the new settings even
        # then): the login routes were made from the old auth_file, settings and databases.
        self.engine.login_routes.clear()
        self.config = config
        # A plain attribute, not a property: the data path reads it on every release.
        self.settings: Any = config.settings
        s = config.settings
        forget_secret_classifications()
        self.auth_users = load_auth_file(s.auth_file) if s.auth_file else {}
        self.hba, self.ident = load_hba(s)
        old_tls = self.__dict__.get("tls")
        try:
            self.tls = build_contexts(s)
        except TlsConfigError as exc:
            if old_tls is None:
                raise
            logger.error("TLS settings not applied: %s", exc)
        else:
            if old_tls is not None and (old_tls.server_key, old_tls.client_mode) != (
                    self.tls.server_key, self.tls.client_mode):
                # Changed server TLS settings or files (or the client TLS mode): reconnect, as
                # PgBouncer does when it sets up TLS again (every pool tagged dirty).
                for pool in self.pools.values():
                    for server in list(pool.idle):
                        pool.server_gone(server)
                        server.close("TLS settings changed")
                    for server in pool.active | pool.busy:
                        server.close_needed = True
        self.engine.offer_tls = self.tls.client is not None  # (its C login hands an SSLRequest to Python then)
        self.engine.qstats.enabled = bool(s.query_stats)
        self.engine.qstats.configure(int(s.query_stats_max))
        self.tracked: dict[str, str] = tracked_names(list(s.track_extra_parameters))
        # login_notify_message: the NOTICE each client's welcome carries (b"" when unset); a
        # RELOAD changes it for the logins that follow.
        self.login_notice = m.notice_response(s.login_notify_message) if s.login_notify_message else b""
        self.ignored_params = {p.lower() for p in s.ignore_startup_parameters}
        for pool in self.pools.values():
            db = config.find_database(pool.database)
            if db is not None:
                pool.limits = self.limits_for(db, pool.user)
                pool.round_robin = bool(s.server_round_robin)
                self._configure_core(pool)
                self.launch_connects(pool)

    def hba_rule(self, client: ClientConnection, user: str) -> HbaRule | None:
        """The first auth_hba_file rule for this connection (None: no rule, so rejected)."""
        if self.hba is None:
            return None
        return self.hba.match(conn_type="local" if client.is_unix else "host", tls=client.tls,
                              database=client.dbname or "", user=user,
                              address=None if client.is_unix else client.addr,
                              replication=client.replication == "physical")

    def ident_allows(self, map_name: str, system_user: str, db_user: str) -> bool:
        return self.ident is not None and self.ident.allows(map_name, system_user, db_user)

    def auth_secret(self, user: str) -> str | None:
        """The secret to check a client's password with and to log in to the server: auth_file
        first, then what auth_query last returned for the user."""
        secret = self.auth_users.get(user)
        return secret if secret is not None else self.looked_up_secrets.get(user)

    def server_secret(self, db: DatabaseEntry, user: str) -> str | None:
        """The secret a server login of `user` in `db` answers with (PgBouncer's get_srv_psw): a
        forced user's password= from [databases]; otherwise, and for a forced user without one,
        the user's own secret (auth_file, or what auth_query found). `user` differs from the
        forced one in the auth_user's pool that runs auth_query."""
        if db.password and user == db.user:
            return db.password
        external = self.external_passwords.get(user)
        return external if external is not None else self.auth_secret(user)

    def limits_for(self, db: DatabaseEntry, user: str) -> PoolLimits:
        s = self.settings
        u = self.config.users.get(user)

        def pick(*vals: Any) -> Any:
            for v in vals:
                if v is not None:
                    return v
            return None

        return PoolLimits(
            pool_size=pick(u.pool_size if u else None, db.pool_size, s.default_pool_size),
            min_pool_size=pick(db.min_pool_size, s.min_pool_size),
            reserve_pool_size=pick(u.reserve_pool_size if u else None, db.reserve_pool_size, s.reserve_pool_size),
            reserve_pool_timeout=s.reserve_pool_timeout,
            max_db_connections=pick(db.max_db_connections, s.max_db_connections),
            max_user_connections=pick(u.max_user_connections if u else None, s.max_user_connections),
            pool_mode=self.pool_mode_for(db, user),
            server_lifetime=pick(db.server_lifetime, s.server_lifetime),
        )

    def pool_mode_for(self, db: DatabaseEntry, user: str) -> str:
        u = self.config.users.get(user)
        return (u.pool_mode if u and u.pool_mode else None) or db.pool_mode or self.settings.pool_mode

    def check_startup_params(self, params: dict[str, str]) -> dict[str, str]:
        """Tracked parameters the client asked for; refuses the ones PgBouncer refuses."""
        out: dict[str, str] = {}
        for key, value in params.items():
            low = key.lower()
            if low in self.tracked:
                out[self.tracked[low]] = value
            elif low == "options":
                out.update(self._parse_options(value))
            elif low in _ALWAYS_ALLOWED or low in self.ignored_params:
                continue
            else:
                raise ClientError(f"unsupported startup parameter: {key}")
        if "application_name" in params:
            out["application_name"] = params["application_name"]
        return out

    def _parse_options(self, value: str) -> dict[str, str]:
        """Tracked parameters set in the ``options`` startup parameter (PgBouncer's
        set_startup_options): others are refused, unless ignore_startup_parameters names them
        or ``options`` itself, in which case only they are dropped."""
        out: dict[str, str] = {}
        try:
            for name, val in iter_startup_options(value):
                canonical = self.tracked.get(name.lower())
                if canonical is not None:
                    out[canonical] = val
                elif name.lower() not in self.ignored_params and "options" not in self.ignored_params:
                    raise ClientError(f"unsupported startup parameter in options: {name}")
        except StartupOptionsError:
            raise ClientError("unsupported options startup parameter: "
                              "only '-c config=val' and '--config=val' are allowed") from None
        return out

    def check_client_limits(self, client: ClientConnection, db: DatabaseEntry, user: str) -> None:
        """max_db_client_connections / max_user_client_connections (across workers when there are
        several); a client that passes is counted until it goes (client_gone)."""
        s = self.settings
        max_db = db.max_db_client_connections if db.max_db_client_connections is not None else (
            s.max_db_client_connections
        )
        u = self.config.users.get(user)
        max_user = u.max_user_client_connections if u and u.max_user_client_connections is not None else (
            s.max_user_client_connections
        )
        dbname = client.dbname or ""
        n_db = self.db_clients.get(dbname, 0)
        n_user = self.user_clients.get(user, 0)
        refused = None
        if max_db and n_db >= max_db:
            refused = "max_db_client_connections"
        elif max_user and n_user >= max_user:
            refused = "max_user_client_connections"
        elif self.shared is not None:
            refused = self.shared.admit_login(dbname, max_db, n_db, user, max_user, n_user)
        if refused is not None:
            raise ClientError(f"client connections exceeded ({refused})")
        self.db_clients[dbname] = n_db + 1
        self.user_clients[user] = n_user + 1
        client.limits_counted = (dbname, user, bool(max_db or max_user))

    def _uncount_client(self, client: ClientConnection) -> None:
        dbname, user, limited = client.limits_counted  # type: ignore[misc]
        client.limits_counted = None
        n_db = self.db_clients[dbname] - 1
        n_user = self.user_clients[user] - 1
        for counts, key, n in ((self.db_clients, dbname, n_db), (self.user_clients, user, n_user)):
            if n:
                counts[key] = n
            else:
                del counts[key]
        if limited and self.shared is not None:  # only limited names are counted across workers
            self.shared.logins_changed(dbname, n_db, user, n_user)

    # ------------------------------------------------------------ clients

    def next_client_id(self) -> int:
        """The next socket id: clients and servers draw from one counter, each when its object is
        made (a client at accept, a server when its connect is launched), as PgBouncer's
        last_pgsocket_id. SHOW CLIENTS/SERVERS/SOCKETS show it; KILL_CLIENT takes it."""
        self._client_ids += 1
        return self._client_ids

    @property
    def client_count(self) -> int:
        return len(self.clients)

    def admit_client(self, client: ClientConnection) -> bool:
        """Count a client that sent its startup packet against max_client_conn. Sockets that are
        being refused do not count, so a burst fills the free slots and only the excess is refused."""
        if self.admitted_clients >= self.settings.max_client_conn:
            return False
        if self.shared is not None and not self.shared.admit_client(self.admitted_clients,
                                                                    self.settings.max_client_conn):
            return False
        self.admitted_clients += 1
        client.admitted = True
        return True

    def client_connected(self, client: ClientConnection) -> None:
        self.clients.add(client)
        admin = self._admin
        if admin.pause_mode == "suspend" and client.transport is not None:
            # SUSPEND: new clients wait, unread, until RESUME (PgBouncer's behaviour)
            client.transport.pause_reading()
            admin.suspended.append(client.transport)

    def _read_fd_limit(self) -> None:
        """The open files limit (it can change under a running process: prlimit), and the number of
        client and server connections beyond which fewer than ~5% of the descriptors are left (at
        least 32: listeners, the log, the event loop's own descriptors use some)."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY or limit <= 0:
            limit = 1 << 30
        if limit != self.fd_limit:
            self.fd_limit = limit
            self.fd_warn_at = max(0, limit - max(32, limit // 20))

    def _warn_fd_limit(self) -> None:
        """Near the open files limit the kernel resets new connections without a word (libuv
        closes them for us): say so in the log, at most every 10 s."""
        now = time.monotonic()
        if now - self._fd_warned < 10:
            return
        self._fd_warned = now
        logger.warning("%d client and %d server connections, close to the open files limit (%d): new "
                       "connections will be reset (Too many open files) without an error message; raise the "
                       "limit (ulimit -n)", len(self.clients), self.server_total(), self.fd_limit)

    def server_total(self) -> int:
        return sum(pool.server_count for pool in self.pools.values())

    def login_deadline(self, client: ClientConnection, deadline: float) -> None:
        """client_login_timeout ends `client`'s login at `deadline` (time.monotonic()) unless the
        login is over first (it leaves login_deadlines then)."""
        self.login_deadlines[client] = deadline
        if self._login_sweep is None:
            self._login_sweep = self.loop.call_later(LOGIN_RECHECK, self._sweep_logins)

    def _sweep_logins(self) -> None:
        self._login_sweep = None
        now = time.monotonic()
        deadlines = self.login_deadlines
        for client in [c for c, deadline in deadlines.items() if deadline <= now]:
            del deadlines[client]
            try:
                client.login_timed_out()
            except Exception:  # noqa: BLE001 - one client must not stop the others' timeouts
                logger.exception("%s client_login_timeout failed", client.log_prefix)
        if deadlines:
            self._login_sweep = self.loop.call_later(LOGIN_RECHECK, self._sweep_logins)

    def register_cancel_key(self, client: ClientConnection) -> bytes:
        while True:
            key = bytearray(random_bytes(8))
            key[0] &= 0x7F  # PgBouncer clears the sign bit of the first byte
            if self.shared is not None:
                key[0] = self.shared.stamp_key(key[0])  # which worker a CancelRequest goes to
            if self.settings.peer_id:
                peers.stamp_peer(key, self.settings.peer_id)  # which process (pgmux/net/peers.py)
            k = bytes(key)
            if k not in self.cancel_keys:
                self.cancel_keys[k] = client
                return k

    def client_gone(self, client: ClientConnection, reason: str) -> None:
        """A client socket closed: give back or close its server, forget the client."""
        self.clients.discard(client)
        if client.limits_counted is not None:
            self._uncount_client(client)
        if client.admitted:
            client.admitted = False
            self.admitted_clients -= 1
            if self.shared is not None:
                self.shared.clients_changed(self.admitted_clients)
        if client.cancel_key:
            self.cancel_keys.pop(client.cancel_key, None)
        if client.login_task is not None and not client.login_task.done():
            client.login_task.cancel()
        pool = client.pool
        if pool is not None:
            pool.clients.discard(client)
            if client.waiting:
                pool.remove_waiter(client)
                client.waiting = False
        if self.settings.log_disconnections and client.user is not None:
            age = time.monotonic() - client.connect_time
            pglog.info(f"{client.log_prefix} closing because: {reason} (age={int(age)}s)")
        server = client.server
        if server is not None:
            self.unlink(client, server)
            if client.replication is not None:  # its own server: never reused
                server.pool.server_gone(server)
                server.close("replication client was closed")
            # skip: the client left in the middle of a message the server has half of
            elif server.is_clean and not client.linking and not client.skip:
                self.release(server, reset=True)
            else:
                server.close("client disconnect while server was not ready")
        self._check_shutdown()

    # ------------------------------------------------------------ pools and servers

    def get_pool(self, db: DatabaseEntry, user: str) -> Pool[ServerConnection, ClientConnection]:
        key = (db.name, user)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(database=db.name, user=user, limits=self.limits_for(db, user),
                        round_robin=bool(self.settings.server_round_robin))
            pool.set_paused(self.admin_pool_paused(db.name))
            pool.stats.histograms = bool(self.settings.metrics_listen)  # not reloadable
            self._configure_core(pool)
            self.pools[key] = pool
            if db.is_autodb:
                logger.info("registered new auto-database: db=%s", db.name)
        return pool

    async def pool_params(self, pool: Pool[ServerConnection, ClientConnection]) -> dict[str, str]:
        """The pool's ParameterStatus set; the first clients of a pool wait for a server login
        (PgBouncer's finish_client_login: wait_for_welcome). They are not failed fast while the
        pool's logins fail: they wait for the retries (server_login_retry apart) until
        client_login_timeout ("client_login_timeout (server down)") or query_wait_timeout, unless
        PostgreSQL refuses a login with an error, which they are sent (_connect_failed)."""
        if pool.params is not None:
            return pool.params
        fut: asyncio.Future[dict[str, str]] = self.loop.create_future()
        self._params_waiters.setdefault(id(pool), []).append((fut, time.monotonic()))
        self._launch_for_params(pool)
        return await fut

    def _launch_for_params(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        """Open a new pool's first server for the clients waiting for its ParameterStatus set:
        one at a time, and server_login_retry after the last one began while logins fail."""
        if (pool.params is not None or pool.connecting or id(pool) in self._params_room_wait
                or not self.params_waiter_count(pool) or not self._connect_allowed(pool)):
            return
        self._params_room_wait.add(id(pool))
        self.spawn(self._connect_for_params(pool))

    async def _connect_for_params(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        """A new pool's first server, opened for its ParameterStatus set, within the database and
        user caps: wait for room (evicting idle servers of other pools) up to query_wait_timeout."""
        try:
            deadline = time.monotonic() + (self.settings.query_wait_timeout or 3600.0)
            while True:
                room = self._room_outside_pool(pool)
                if room is None or room > 0 or self._evict_for(pool):
                    break
                if time.monotonic() >= deadline:
                    self.fail_params_waiters(pool, ClientError("query_wait_timeout"))
                    return
                await asyncio.sleep(0.05)
            if pool.params is None and pool.connecting == 0:
                self._spawn_connect(pool)
        finally:
            self._params_room_wait.discard(id(pool))

    def params_waiter_count(self, pool: Pool[ServerConnection, ClientConnection]) -> int:
        """Clients logging in to a new pool that still wait for its first server."""
        return sum(1 for fut, _ in self._params_waiters.get(id(pool), ()) if not fut.done())

    def fail_params_waiters(self, pool: Pool[ServerConnection, ClientConnection], error: ClientError) -> None:
        """Clients logging in to a new pool wait for its first server's ParameterStatus set; they
        get `error` instead."""
        for fut, _ in self._params_waiters.pop(id(pool), []):
            if not fut.done():
                fut.set_exception(error)

    def _check_params_waiters(self, pool: Pool[ServerConnection, ClientConnection], now: float,
                              wait_timeout: float) -> None:
        """Janitor: query_wait_timeout for clients waiting for a new pool's first server (their
        client_login_timeout is the login's own timer), and the next connect for them."""
        waiters = self._params_waiters.get(id(pool))
        if not waiters:
            return
        for fut, since in waiters:
            if wait_timeout and not fut.done() and now - since >= wait_timeout:
                fut.set_exception(ClientError("query_wait_timeout"))
        waiters[:] = [w for w in waiters if not w[0].done()]
        if not waiters:
            del self._params_waiters[id(pool)]
            return
        self._launch_for_params(pool)

    def _connect_allowed(self, pool: Pool[ServerConnection, ClientConnection]) -> bool:
        """PgBouncer's launch_new_connection while the pool's last server login failed: no new
        connect while one is on its way, nor before server_login_retry after the last one began."""
        if pool.login_failure is None:
            return True
        return (pool.connecting == 0
                and time.monotonic() - pool.last_connect_time >= self.settings.server_login_retry)

    def _login_failing_error(self, pool: Pool[ServerConnection, ClientConnection]) -> ClientError | None:
        """PgBouncer's check_fast_fail, for a client that needs a server and finds none idle: while
        the pool's last server login failed and it has no server but ones logging in, the client
        gets the cached error, and a retry is launched (server_login_retry apart); the clients
        already queued stay queued."""
        failure = pool.login_failure
        if failure is None or pool.active or pool.busy or pool.idle:
            return None
        self._retry_login(pool)
        return ClientError(
            f"server login has been failing, cached error: {failure[1].get('M', '')} (server_login_retry)")

    def _fail_fast_if_login_failing(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        error = self._login_failing_error(pool)
        if error is not None:
            raise error

    def _retry_for_waiters(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        """server_login_retry after a failed connect: the next one for the clients still waiting."""
        if self.pools.get((pool.database, pool.user)) is not pool:
            return  # the pool went (RELOAD removed its database)
        if pool.params is None:
            self._launch_for_params(pool)
        elif pool.waiting:
            self.launch_connects(pool)

    def _retry_login(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        """One connect for a pool whose logins fail, when it has room for it; nobody needs to wait
        for it (the janitor only retries for waiting clients)."""
        if pool.paused or (self.shutting_down and not self.draining()) or not self._connect_allowed(pool):
            return
        if pool.server_count >= pool.capacity():
            return
        room = self._room_outside_pool(pool)
        if room is not None and room <= 0:
            return
        self._spawn_connect(pool)

    def request_server(self, client: ClientConnection) -> None:
        """A client has something to send and no server: link an idle one or wait in line."""
        pool = client.pool
        if pool is None:
            return
        if pool.paused and self.admin_state().shutdown_mode == "wait_for_servers":
            # PgBouncer's pause_client: a client that would wait for a server now never gets one.
            client.fail(SERVER_SHUTTING_DOWN)
            return
        server = pool.take_idle() if not pool.paused else None
        if server is not None:
            if self._needs_check(server):
                client.linking = True
                client.server = server
                server.client = client
                self.spawn(self._check_then_link(client, server))
                return
            self.link(client, server)
            return
        if pool.login_failure is not None and not pool.paused:
            error = self._login_failing_error(pool)
            if error is not None:
                client.fail(str(error), error.sqlstate)
                return
        client.waiting = True
        pool.enqueue(client)
        self.launch_connects(pool)

    def launch_connects(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        if pool.paused or (self.shutting_down and not self.draining()):
            return
        lim = pool.limits
        if not lim.reserve_pool_size and pool.server_count >= lim.pool_size:
            return  # the usual case under load: a full pool opens nothing
        room = self._room_outside_pool(pool)
        if room is not None and room <= 0 and pool.live_waiters() > pool.connecting and self._evict_for(pool):
            room = self._room_outside_pool(pool)
        if self.shared is not None:
            room = self.shared.pool_room(pool, room)
        wanted = pool.connects_wanted(room)
        if pool.login_failure is not None and wanted:
            # the last login failed: one connect at a time, server_login_retry apart
            if not self._connect_allowed(pool):
                return
            wanted = 1
        for _ in range(wanted):
            self._spawn_connect(pool)

    def _evict_for(self, pool: Pool[ServerConnection, ClientConnection]) -> bool:
        """max_db_connections/max_user_connections reached: close an idle server of another pool
        of the same database or user, as PgBouncer does (`closing because: evicted`)."""
        for other in self.pools.values():
            if other is pool or not other.idle:
                continue
            if other.database == pool.database or other.user == pool.user:
                victim = other.idle.popleft()
                other.server_gone(victim)
                victim.close("evicted")
                return True
        return False

    def _room_outside_pool(self, pool: Pool[ServerConnection, ClientConnection]) -> int | None:
        """Servers still allowed by max_db_connections / max_user_connections."""
        room: int | None = None
        lim = pool.limits
        for cap, by_database in ((lim.max_db_connections, True), (lim.max_user_connections, False)):
            if cap:
                r = cap - self._servers_sharing(pool, by_database)
                room = r if room is None else min(room, r)
        return room

    def _servers_sharing(self, pool: Pool[ServerConnection, ClientConnection], by_database: bool) -> int:
        """Servers of every pool of this pool's database (or user), across workers when there are
        several."""
        if self.shared is not None:
            return self.shared.servers_sharing(pool, by_database)
        if by_database:
            return sum(p.server_count for p in self.pools.values() if p.database == pool.database)
        return sum(p.server_count for p in self.pools.values() if p.user == pool.user)

    def _spawn_connect(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        if self.shared is not None and not self.shared.reserve_server(pool):
            return  # no room across workers: the worker tick retries while clients wait
        if pool.limits.reserve_pool_size and pool.server_count >= pool.limits.pool_size:
            logger.info("%s/%s taking connection from reserve_pool", pool.database, pool.user)
        self._launch_connect(pool)

    def _launch_connect(self, pool: Pool[ServerConnection, ClientConnection],
                        deliver: asyncio.Future[ServerConnection] | None = None) -> None:
        """One server of `pool` connecting from now on (counted in pool.connecting), see _connect."""
        pool.connecting += 1
        pool.last_connect_time = time.monotonic()
        self.spawn(self._connect(pool, self.next_client_id(), deliver))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _server_targets(self, db: DatabaseEntry) -> list[tuple[str | None, int, str | None]]:
        """(host, port, unix path) for the next server connection of a database, then the other
        hosts of its list to fall back on, in list order: the next host round-robin
        (load_balance_hosts = round-robin, the default), or the host that last worked
        (`disable`: stick to a host until it fails)."""
        hosts = db.hosts or [self.settings.unix_socket_dir or "/tmp"]
        first = 0
        if len(hosts) > 1:
            if db.load_balance_hosts != "disable":
                self._rr_counter += 1
                first = self._rr_counter % len(hosts)
            else:
                first = self._sticky_hosts.get(db.name, 0) % len(hosts)
        out: list[tuple[str | None, int, str | None]] = []
        for host in hosts[first:] + hosts[:first]:
            if host.startswith("/") or host.startswith("@"):
                path = os.path.join(host, f".s.PGSQL.{db.port}")
                if host.startswith("@"):
                    path = "\0" + path[1:]
                out.append((None, db.port, path))
            else:
                out.append((host, db.port, None))
        return out

    async def _open_server(self, pool: Pool[ServerConnection, ClientConnection], sid: int,
                           db: DatabaseEntry) -> tuple[ServerConnection, str | None, str | None]:
        """Connect a server socket to the first host of _server_targets that accepts; one that
        does not resolve or refuses is logged and the next one tried (PgBouncer moves on to the
        next host of the list). Returns the server, its host and unix path."""
        targets = self._server_targets(db)
        for n, (host, port, path) in enumerate(targets):
            addr = host or path or ""

            def factory(addr: str = addr, port: int = port) -> ServerConnection:
                return ServerConnection(self, pool, addr, port, sid)

            try:
                if path is not None:
                    _, server = await self.loop.create_unix_connection(factory, path)
                else:
                    assert host is not None  # _server_targets: a host when there is no path
                    _, server = await self.loop.create_connection(factory, host, port)
                    if server.transport is not None:
                        apply_tcp_options(server.transport.get_extra_info("socket"), self.settings)
            except OSError as exc:
                if n == len(targets) - 1:
                    raise
                logger.warning("%s/%s connect to %s:%s failed: %s; trying the next host",
                               pool.database, pool.user, addr, port, exc)
                continue
            if n and db.load_balance_hosts == "disable":
                hosts = db.hosts or []
                self._sticky_hosts[db.name] = hosts.index(host) if host in hosts else 0
            return server, host, path
        raise AssertionError("no server targets")  # _server_targets returns at least one

    async def _connect(self, pool: Pool[ServerConnection, ClientConnection], sid: int,
                       deliver: asyncio.Future[ServerConnection] | None = None) -> None:
        """Open and log in one server of `pool`, whose id `sid` was drawn when it was launched;
        it goes to the pool (server_ready), or to `deliver` when given (auth_query borrows it
        and gives it back)."""
        db = self.config.find_database(pool.database)
        started = time.monotonic()
        try:
            if db is None:
                raise ServerLoginError({"S": "FATAL", "C": "08P01", "M": "database removed"})
            server = await self._login_server(pool, sid, db, self._server_startup(db))
        except ServerLoginError as exc:
            self._connect_failed(pool, exc, started)
            if deliver is not None and not deliver.done():
                deliver.set_exception(exc)
            return
        pool.connecting -= 1
        self._login_worked(pool)
        server.state = "idle"
        self._mark_if_dirty(server)
        if pool.params is None:
            pool.params = dict(server.login_params)
        for fut, _ in self._params_waiters.pop(id(pool), []):
            if not fut.done():
                fut.set_result(pool.params)
        if deliver is not None and not deliver.done():
            pool.server_busy(server)
            deliver.set_result(server)
            return
        self.server_ready(server)

    @staticmethod
    def _login_worked(pool: Pool[ServerConnection, ClientConnection]) -> None:
        """A server of `pool` logged in: its logins no longer fail."""
        pool.set_login_failure(None)
        pool.last_login_ok = time.monotonic()

    @staticmethod
    def _mark_if_dirty(server: ServerConnection) -> None:
        """A server that has just logged in: RECONNECT or a RELOAD that changed its database
        came while it did (PgBouncer's tag_pool_dirty marks those in SV_LOGIN too)."""
        if server.connect_time < server.pool.dirty_since:
            server.close_needed = True

    async def _login_server(self, pool: Pool[ServerConnection, ClientConnection], sid: int,
                            db: DatabaseEntry, startup: dict[str, str]) -> ServerConnection:
        """Connect a server of `pool` (TLS where configured) and log it in with `startup`, then
        run connect_query (not on a replication connection, which takes no SQL). Raises
        ServerLoginError with the fields a client is told, after closing what was opened."""
        server: ServerConnection | None = None
        connected = False
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout or None):
                server, host, path = await self._open_server(pool, sid, db)
                connected = True
                if self.settings.log_connections:
                    logger.info("%s new connection to server (from %s:%s)", server.log_prefix,
                                server.local_addr, server.local_port)
                self.adopt(server)  # the engine owns the socket from here on: TLS and login run over it
                if self.tls.server is not None and path is None:
                    await server.negotiate_tls(self.tls.server, self.tls.server_mode, host or "")
                await server.login(pool.user, db.target_dbname, self.server_secret(db, pool.user), startup)
                if db.connect_query and "replication" not in startup:
                    err = await server.simple_query(db.connect_query)
                    if err:
                        logger.warning("%s connect_query failed: %s", server.log_prefix, err.get("M"))
        except asyncio.CancelledError:  # the login it was opened for ended (a replication client's)
            if server is not None:
                server.close("login cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - a server must never take the process down
            # PgBouncer's reasons (disconnect_server; the one cached for server_login_retry):
            # `connect failed` when the TCP connect is refused or not answered within
            # server_connect_timeout (sbuf_connect's timer), `connect timeout` when the login
            # does not finish within it (the janitor), `server conn crashed?` when the server
            # goes away while logging in. No ErrorResponse: waiting clients stay queued.
            error: ServerLoginError
            if isinstance(exc, ServerLoginError):
                error = exc
            elif isinstance(exc, ConnectionLost):
                error = ServerLoginError(_fatal("server conn crashed?"), queued=True,
                                         detail="server closed the connection during login")
            elif isinstance(exc, TimeoutError) and connected:
                error = ServerLoginError(_fatal("connect timeout"), queued=True)
            elif isinstance(exc, OSError | ConnectionError):
                error = ServerLoginError(_fatal("connect failed"), queued=True, detail=str(exc) or "timeout")
            else:
                logger.exception("unexpected error connecting to server")
                error = ServerLoginError(_fatal(str(exc)))
            if server is not None:
                msg = error.fields.get("M", "server login failed")
                server.close_reason = msg
                server.close(msg)
            if error is exc:
                raise
            raise error from exc
        return server

    # ------------------------------------------------------------ replication connections

    async def replication_server(self, client: ClientConnection, pool: Pool[ServerConnection, ClientConnection],
                                 db: DatabaseEntry) -> ServerConnection:
        """A server of its own for a replication client (PgBouncer 1.23+), logged in with the
        client's `replication` value, its tracked parameters and its `options` in the startup
        packet (a physical replication connection takes no SET). It counts in the pool as an
        active server (pool_size, max_db_connections, max_user_connections). The client waits
        for room, and for the pool's retries while its connects fail, as a queued client does
        (PgBouncer queues it and relaunches its connect, with no fast fail): up to
        query_wait_timeout, its login bounded by client_login_timeout too. A refused login (e.g.
        a role without REPLICATION) reaches the client at once as PostgreSQL's error, and does
        not mark the pool's logins as failing."""
        startup = self._server_startup(db)
        startup.update(client.startup_params)
        startup["replication"] = "database" if client.replication == "logical" else "true"
        if client.replication_options is not None:
            startup["options"] = client.replication_options
        server = await self._server_for_one(pool, lambda: self._replication_login(pool, db, startup))
        server.replication = client.replication
        server.state = "active"
        self._mark_if_dirty(server)
        pool.active.add(server)
        if self.shared is not None:
            self.shared.servers_changed(pool)
        client.server = server
        server.client = client
        pool.stats.server_assignment_count += 1
        if client.closed:  # it left while the server logged in: the server goes with it
            self.unlink(client, server)
            pool.server_gone(server)
            server.close("replication client was closed")
            raise ConnectionLost("client disconnected during login")
        return server

    async def _replication_login(self, pool: Pool[ServerConnection, ClientConnection], db: DatabaseEntry,
                                 startup: dict[str, str]) -> ServerConnection | None:
        """One try at a replication client's server: None while `pool` has no room for it. A
        connect that fails without an error from PostgreSQL is the pool's failed connect
        (_connect_failed: the next ones server_login_retry apart), as any server's is."""
        if not self._replication_room(pool):
            return None
        started = time.monotonic()
        pool.connecting += 1
        pool.last_connect_time = started
        failure: ServerLoginError | None = None
        try:
            server = await self._login_server(pool, self.next_client_id(), db, startup)
        except ServerLoginError as exc:
            failure = exc
            raise
        finally:
            if failure is not None and self._keeps_waiters_queued(failure):
                self._connect_failed(pool, failure, started)  # (counts the connect out)
            else:
                pool.connecting -= 1
        self._login_worked(pool)
        return server

    def _replication_room(self, pool: Pool[ServerConnection, ClientConnection]) -> bool:
        """Whether `pool` may open one more server: below pool_size (an idle server of the pool
        is closed to make room) and within max_db_connections / max_user_connections (idle
        servers of other pools are evicted, as for any new server)."""
        if pool.server_count >= pool.limits.pool_size and pool.idle:
            victim = pool.idle.popleft()
            pool.server_gone(victim)
            victim.close("evicted")
        room = self._room_outside_pool(pool)
        return pool.server_count < pool.limits.pool_size and (room is None or room > 0 or self._evict_for(pool))

    def start_replication(self, client: ClientConnection, server: ServerConnection) -> None:
        """The welcomed replication client and its server forward from here on, as a session link
        (the engine passes CopyBoth traffic through untouched)."""
        if client.closed or server.closed or client.server is not server:
            return
        self._start_link(client, server)

    # ------------------------------------------------------------ auth_query

    def auth_user_for(self, db: DatabaseEntry) -> str | None:
        """The user that runs auth_query for `db`: its own auth_user, else the global one."""
        return db.auth_user or self.settings.auth_user or None

    def _auth_database(self, db: DatabaseEntry, log_prefix: str) -> DatabaseEntry:
        """Where auth_query runs for `db` (PgBouncer's prepare_auth_database): its auth_dbname,
        else the global one, else `db` itself; one that is not configured, or the console, is
        a config error, one that DISABLE refuses says so."""
        dbname = db.auth_dbname or self.settings.auth_dbname
        if not dbname:
            return db
        auth_db = self.config.find_database(dbname)
        if auth_db is None:
            logger.error('%s authentication database "%s" is not configured.', log_prefix, dbname)
            raise ClientError("bouncer config error")
        if self.admin_db_disabled(auth_db.name):
            raise ClientError(f'authentication database "{dbname}" is disabled')
        return auth_db

    async def auth_query_secret(self, db: DatabaseEntry, user: str, client: ClientConnection) -> str | None:
        """The password secret of a user missing from auth_file, looked up for `client`'s login
        with auth_query over a server connection of the auth_user (auth_user_for(db) must be
        set). None: no such user; "": the user has no usable password (NULL), so no password
        will ever match it. ClientError when the lookup cannot run: its database (see
        _auth_database), no server of the auth_user (see _auth_server), or auth_query failing
        ("bouncer config error", the generic text PgBouncer sends a client whose auth server
        went away)."""
        auth_user = self.auth_user_for(db)
        assert auth_user is not None
        log_prefix = client.log_prefix
        auth_db = self._auth_database(db, log_prefix)
        query = db.auth_query or self.settings.auth_query
        if query == DEFAULT_AUTH_QUERY_PGBOUNCER:
            query = DEFAULT_AUTH_QUERY  # schema-qualified: a search_path cannot redirect it
        pool = self.get_pool(auth_db, auth_user)
        server = await self._auth_server(pool, client)
        answered = False
        try:
            rows, err = await server.query_params(query, [user])
            answered = True
        except Exception:  # noqa: BLE001 - the server went away
            rows, err = [], {"M": "server conn crashed?"}
        finally:  # (not answered: gone, or the login ended while the query ran)
            if answered and not server.closed and server.status == _IDLE:
                self.server_ready(server)
            else:
                pool.server_gone(server)
                server.close("auth_query failed")
        if err is not None:
            logger.warning("%s auth_query for %s failed: %s", log_prefix, user, err.get("M"))
            raise ClientError("bouncer config error")
        if not rows:
            self.looked_up_secrets.pop(user, None)
            return None
        secret = rows[0][1] if len(rows[0]) > 1 and rows[0][1] is not None else ""
        self.looked_up_secrets[user] = secret
        return secret

    async def _auth_server(self, pool: Pool[ServerConnection, ClientConnection],
                           client: ClientConnection) -> ServerConnection:
        """A server of the auth_user's pool, borrowed for one auth_query (it comes back through
        server_ready): an idle one, else a new one (PgBouncer's start_auth_query, where the
        client waits in that pool's queue, see _server_for_one). While the pool's last login
        failed and it has no server, the client gets the cached error (check_fast_fail). While
        it waits, its login is queued, so client_login_timeout does not run (login_queued)."""
        server = pool.take_idle()
        if server is None:
            self._fail_fast_if_login_failing(pool)
            client.login_queued(True)
            try:
                return await self._server_for_one(pool, lambda: self._auth_connect(pool), take=pool.take_idle)
            finally:
                client.login_queued(False)
        pool.server_busy(server)
        return server

    async def _auth_connect(self, pool: Pool[ServerConnection, ClientConnection]) -> ServerConnection:
        """A new server of the auth_user's pool, delivered busy by _connect."""
        fut: asyncio.Future[ServerConnection] = self.loop.create_future()
        self._launch_connect(pool, fut)
        return await fut

    async def _server_for_one(self, pool: Pool[ServerConnection, ClientConnection],
                              connect: Callable[[], Coroutine[Any, Any, ServerConnection | None]],
                              take: Callable[[], ServerConnection | None] | None = None) -> ServerConnection:
        """A server of `pool` for one client that waits for it outside the pool's queue (an
        auth_query lookup, a replication client): one `take` finds idle (then marked busy), else
        one `connect` opens (None: not now, e.g. no room yet). A connect that fails without an
        error from PostgreSQL (refused, timed out, TLS, gone while logging in) keeps it waiting
        for the pool's retries, one at a time, server_login_retry apart, up to
        query_wait_timeout; a login PostgreSQL refuses ends the wait with PostgreSQL's error."""
        since = time.monotonic()
        while True:
            server = take() if take is not None else None
            if server is not None:
                pool.server_busy(server)
                return server
            if self._connect_allowed(pool):
                try:
                    server = await connect()
                except ServerLoginError as exc:
                    if not self._keeps_waiters_queued(exc):
                        fields = exc.fields
                        raise ClientError(fields.get("M", "server login failed"), fields.get("C", "08P01")) from exc
                if server is not None:
                    return server
            wait_timeout = self._query_wait_timeout(pool, self.config.find_database(pool.database))
            if wait_timeout and time.monotonic() - since >= wait_timeout:
                raise ClientError("query_wait_timeout")
            await asyncio.sleep(0.05)

    def _server_startup(self, db: DatabaseEntry) -> dict[str, str]:
        out = {}
        for key, name in (("client_encoding", "client_encoding"), ("datestyle", "datestyle"),
                          ("timezone", "timezone"), ("application_name", "application_name")):
            value = getattr(db, key)
            if value:
                out[name] = value
        return out

    def _connect_failed(self, pool: Pool[ServerConnection, ClientConnection],
                        error: ServerLoginError, started: float) -> None:
        """A server connect or login failed. The pool remembers it (new clients that find no
        server get `server login has been failing, cached error: ...`, retries come
        server_login_retry apart). The clients already waiting for a server are sent
        PostgreSQL's own error when it refused the login (PgBouncer's kill_pool_logins, unless
        57P03 or the pool still has usable servers); when the connect failed or timed out, or
        the server went away while logging in, they stay queued until a retry works, or
        query_wait_timeout / client_login_timeout (server down)."""
        pool.connecting -= 1
        if self.shared is not None:
            self.shared.servers_changed(pool)
        fields = error.fields
        msg = fields.get("M", "server login failed")
        logger.warning("%s/%s server login failed: %s%s", pool.database, pool.user, msg,
                       f": {error.detail}" if error.detail else "")
        if pool.last_login_ok > started:
            # Another login of this pool succeeded after this one began (e.g. a connect made during
            # an outage timing out after it): the server is back, nobody gets this error.
            self.launch_connects(pool)
            return
        pool.set_login_failure((time.monotonic(), fields))
        if self._keeps_waiters_queued(error):
            # the next try for them, server_login_retry after this one began (the janitor's
            # once-a-second pass would add up to a second)
            delay = pool.last_connect_time + self.settings.server_login_retry - time.monotonic()
            self.loop.call_later(max(delay, 0.0) + 0.01, self._retry_for_waiters, pool)
            return
        if pool.params is not None and (pool.idle or pool.active or pool.busy):
            return  # usable servers remain: the waiting clients get one of them
        sqlstate = fields.get("C", "08P01")
        self.fail_params_waiters(pool, ClientError(msg, sqlstate))
        while (client := pool.next_waiter()) is not None:
            client.waiting = False
            client.fail(msg, sqlstate)

    @staticmethod
    def _keeps_waiters_queued(error: ServerLoginError) -> bool:
        """A failed connect or login after which the clients waiting for a server stay queued for
        the retries: no ErrorResponse came (ServerLoginError.queued), or 57P03 (the database
        system is starting up), which is transient."""
        return error.queued or error.fields.get("C") == "57P03"

    def server_ready(self, server: ServerConnection) -> None:
        """A server is clean and unlinked: hand it to the first waiting client or park it idle."""
        pool = server.pool
        if server.closed:
            pool.server_gone(server)
            return
        if server.cancels:  # a cancel request for its last client is still on its way
            server.state = "canceling"
            pool.server_busy(server)
            return
        if server.close_needed or pool.paused or (pool.limits.server_lifetime and self._lifetime_over(server)):
            pool.server_gone(server)
            server.close("close_needed" if server.close_needed else "pause mode" if pool.paused
                         else "server lifetime over")
            self.launch_connects(pool)
            return
        server.state = "idle"
        client = pool.server_ready(server)
        if client is not None:
            client.waiting = False
            self.link(client, server)
        self._check_shutdown()

    @staticmethod
    def _lifetime_over(server: ServerConnection) -> bool:
        lifetime = server.pool.limits.server_lifetime
        return bool(lifetime) and time.monotonic() - server.connect_time >= lifetime

    def link(self, client: ClientConnection, server: ServerConnection) -> None:
        """Attach a server to a client; tracked parameters that differ are SET first."""
        client.server = server
        server.client = client
        server.state = "active"
        pool = server.pool
        stats = pool.stats
        stats.server_assignment_count += 1
        if client.wait_started:
            us = int((time.monotonic() - client.wait_started) * 1_000_000)
            stats.wait_time_us += us
            if stats.histograms:
                stats.wait_hist[us.bit_length()] += 1
            client.wait_started = 0.0
            server.note_wait(us)
        diff = None if client.params.same_as(server.params) else client.params.diff(server.params, self.tracked)
        if diff:
            client.linking = True
            self.spawn(self._sync_params(client, server, diff))
            return
        self._start_link(client, server)

    def _start_link(self, client: ClientConnection, server: ServerConnection) -> None:
        # Prepared statements are tracked only for clients that have named statements: the
        # others skip the per-answer bookkeeping (see ClientConnection._start_tracking).
        tracking = client.lazy_prepare and bool(client.stmts)
        client.tracking = tracking
        # Statement mode reads each answer before forwarding it, to withhold a transaction's start.
        server.statement_mode = client.pool_mode == "statement"
        server.tracking = tracking or server.statement_mode
        server.sent_prefix = 0
        server.start_forwarding()
        if client.write_paused and server.transport is not None:
            server.transport.pause_reading()
        if not self.link_fast(client, server):
            client.resume_held()

    # ------------------------------------------------------------ the engine (pgmux/engine)

    def adopt(self, conn: ClientConnection | ServerConnection) -> None:
        """Hand a connection's socket to the engine: a client once logged in (or at its SSLRequest,
        see ClientConnection._start_tls), a server right after its connect. What is not a socket
        (an in-process harness) or already wrapped in asyncio's TLS stays on its transport."""
        t = conn.transport
        if conn.adopted or conn.tls or t is None or t.is_closing() or t.get_write_buffer_size():
            return
        new = self.engine.adopt(conn, t)
        if new is not None:
            conn.transport = new

    def _configure_core(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        """What the engine needs to link and release this pool's clients by itself, and whether
        it may: not while shutting down, nor with server_reset_query_always (every release
        resets)."""
        s = self.settings
        core = pool.core
        core.enabled = not self.shutting_down and not (s.server_reset_query and s.server_reset_query_always)
        core.lifetime = float(pool.limits.server_lifetime or 0)
        core.check_delay = float(s.server_check_delay) if s.server_check_query else -1.0
        core.pool_size = pool.limits.pool_size
        core.reserve = bool(pool.limits.reserve_pool_size) or bool(pool.limits.min_pool_size)
        core.qpool = self.engine.qstats.pool_id(pool.database, pool.user)
        core.round_robin = pool.round_robin

    def link_fast(self, client: ClientConnection, server: ServerConnection) -> bool:
        """Let the engine forward this link natively, if it can decide every message the link
        will see (not while prepared statements are tracked or answers withheld). True: the
        engine took over, including the bytes the client sent meanwhile."""
        if client.fast:
            return True
        if (not client.adopted or not server.adopted or server.statement_mode
                or client.no_pqexec or client.linking or client.awaiting_quiet or client.closed or server.closed
                or not server.forwarding or client.server is not server or client.tracking != server.tracking):
            return False
        if client.tracking:  # only while the tracker holds nothing the engine cannot account for
            tracker = server.tracker
            if tracker.queue or tracker.skipping or tracker.own_deallocs or server.sent_prefix != server.keep:
                return False
        # the engine may link and release this client by itself until Python looks at it again
        client.auto = self._engine_may_link(client)
        if client.read_paused and client.transport is not None:
            client.read_paused = False
            client.transport.resume_reading()
        return bool(self.engine.link_fast(client, server, self._engine_flags(client)))

    @staticmethod
    def _engine_may_link(client: ClientConnection) -> bool:
        """The engine may link and release this client by itself (Link.auto): transaction
        pooling, no pin and no session-state keyword waiting for its probe."""
        return client.pool_mode == "transaction" and client.pinned is None and client.state_hint is None

    @staticmethod
    def _engine_flags(client: ClientConnection) -> int:
        """What the engine must do for this client's messages (pgmux.engine's ClientFlag)."""
        flags = TRACKED if client.tracking else 0
        if client.pin_mode != "off":
            flags |= PIN_HINTS
        if client.lazy_prepare:
            flags |= LAZY_PREPARE
        if client.pool_mode == "session":
            flags |= SESSION
        return flags

    def client_ready(self, client: ClientConnection) -> None:
        """A client just logged in, with nothing sent yet: in transaction mode the engine links it
        at its first request by itself (Engine.auto_link), as after each transaction it releases,
        instead of handing that request to Python to link."""
        if (self._engine_may_link(client) and client.adopted and not client.keep and client.server is None
                and not client.no_pqexec):
            self.engine.auto_link(client, self._engine_flags(client))

    async def _sync_params(self, client: ClientConnection, server: ServerConnection,
                           diff: list[tuple[str, str]]) -> None:
        sql = set_statement(diff)
        logger.debug("%s varcache_apply: %s", server.log_prefix, sql)  # PgBouncer's debug line
        _, err = await self._own_query(server, sql)
        if err is None:
            client.params.adopt(server.params, [name for name, _ in diff])
        client.linking = False
        if client.closed:
            self._abandon_link(client, server)
            return
        if err is not None:
            self.unlink(client, server)
            server.close("invalid server parameter")
            msg = err.get("M", "")
            client.fail(msg if msg == QUERY_TIMEOUT else f"invalid server parameter: {msg}")
            return
        self._start_link(client, server)

    async def _own_query(self, server: ServerConnection, sql: str) -> tuple[list[list[str | None]],
                                                                           dict[str, str] | None]:
        """One of pgmux's own queries on a server (parameter sync, check, reset, pinning probe):
        its rows and error. A server that does not answer within query_timeout (else
        server_connect_timeout) is closed, so no link step can hang a client."""
        s = self.settings
        try:
            async with asyncio.timeout(s.query_timeout or s.server_connect_timeout or None):
                return await server.query_rows(sql)
        except TimeoutError:
            server.close(QUERY_TIMEOUT)
            return [], {"M": QUERY_TIMEOUT}
        except Exception:  # noqa: BLE001 - the server went away
            return [], {"M": "server conn crashed?"}

    def _needs_check(self, server: ServerConnection) -> bool:
        s = self.settings
        return bool(s.server_check_query) and time.monotonic() - server.last_used >= s.server_check_delay

    async def _check_then_link(self, client: ClientConnection, server: ServerConnection) -> None:
        """server_check_query on a server idle longer than server_check_delay, then link it."""
        query = self.settings.server_check_query
        _, err = await self._own_query(server, "" if query == "<empty>" else query)
        client.linking = False
        self.unlink(client, server)
        if err is not None or server.status != _IDLE:
            server.pool.server_gone(server)
            server.close("server check query failed")
            if not client.closed:
                self.request_server(client)
            return
        server.last_used = time.monotonic()
        if client.closed:
            self.server_ready(server)
            return
        self.link(client, server)

    def unlink(self, client: ClientConnection, server: ServerConnection) -> None:
        if client.fast:
            client.to_slow()  # the engine hands what it carries back to both sides
        client.server = None
        server.client = None
        if server.transport is not None and client.write_paused:
            server.transport.resume_reading()

    def transaction_boundary(self, server: ServerConnection) -> None:
        """A ReadyForQuery with nothing outstanding: release per pool mode."""
        client = server.client
        if client is None:
            return
        if client.awaiting_quiet:  # a named Parse waited for the pipeline to drain
            client.awaiting_quiet = False
            client.linking = False
            client.start_tracking()
            client.resume_held()
            return
        mode = client.pool_mode
        if mode == "session":
            return
        if server.status == _IDLE:
            if client.skip:  # the client is in the middle of sending a message
                return
            if client.state_hint is not None:
                self._probe_session(client, server)
                return
            if client.pinned:
                return
            self.unlink(client, server)
            self.release(server, reset=False)
            if client.keep:  # the client already sent more: it needs a server again
                self.request_server(client)
        elif mode == "statement":
            self.refuse_transaction_block(server)

    def refuse_transaction_block(self, server: ServerConnection) -> None:
        """Statement mode and a ReadyForQuery 'T': the server goes, the client gets the error
        (the server path withholds the statement's own answer, as PgBouncer does)."""
        client = server.client
        if client is None:
            return
        self.unlink(client, server)
        server.pool.server_gone(server)
        server.close("transaction blocks not allowed in statement pooling mode")
        client.fail("transaction blocks not allowed in statement pooling mode")

    # ------------------------------------------------------------ session pinning

    def _probe_session(self, client: ClientConnection, server: ServerConnection) -> None:
        """The transaction that just ended may have created or dropped session state: ask the
        server before deciding whether the client keeps it (see protocol/sessionstate.py)."""
        word = client.state_hint
        client.state_hint = None
        if word == b"load":  # a loaded library cannot be unloaded: pin for good, close at the end
            self._pin(client, server, "LOAD")
            server.close_needed = True
            return
        client.linking = True
        server.stop_forwarding()
        self.spawn(self._run_probe(client, server, cursor_only(word, client.pinned)))

    async def _run_probe(self, client: ClientConnection, server: ServerConnection, cursors: bool) -> None:
        sql = CURSOR_PROBE_SQL if cursors else probe_sql(server.pool.user, list(self.tracked))
        rows, err = await self._own_query(server, sql)
        client.linking = False
        if client.closed or server.closed:
            self._abandon_link(client, server)
            if not client.closed:  # no answer: the session state is unknown, so is the server's
                client.fail(err.get("M", "server conn crashed?") if err else "server conn crashed?")
            return
        if err is not None or not rows:
            reason: str | None = f"unknown session state (probe failed: {(err or {}).get('M', 'no row')})"
        else:
            reason = describe_cursors(rows[0]) if cursors else describe(rows[0])
        if reason is None:
            if client.pinned:
                logger.info("%s unpinned from %s", client.log_prefix, server)
            client.pinned = None
            server.dirty = False
            # no statements under the client's own names are left: track them again
            client.lazy_prepare = client.pool_mode != "session" and self.settings.max_prepared_statements > 0
            self.unlink(client, server)
            if cursors or own_statements_match(rows[0][7:9], server.stmts.names()):
                self.release(server, reset=False)
            else:  # the client's SQL dropped or replaced one of pgmux's PGMUX_<n> statements
                server.pool.server_gone(server)
                server.close("prepared statements out of step with pgmux")
            if client.keep:
                self.request_server(client)
            return
        if self.settings.pin_session_state == "refuse":
            self.unlink(client, server)
            server.pool.server_gone(server)
            server.close("session state refused")
            client.fail(f"session state is not allowed in {client.pool_mode} pooling "
                        f"(pin_session_state = refuse): {reason}", "0A000")
            return
        self._pin(client, server, reason)
        self._start_link(client, server)

    def _pin(self, client: ClientConnection, server: ServerConnection, reason: str) -> None:
        if client.pinned != reason:
            logger.info("%s pinned to %s: %s", client.log_prefix, server, reason)
            if not client.pinned:
                client.pinned_since = time.monotonic()
        client.pinned = reason
        server.dirty = True

    def _abandon_link(self, client: ClientConnection, server: ServerConnection) -> None:
        """The client or server went away during a slow-path step of a link."""
        self.unlink(client, server)
        if server.is_clean:
            self.release(server, reset=True)
        else:
            server.close("client disconnect while server was not ready")

    def pins(self) -> list[tuple[ClientConnection, ServerConnection | None]]:
        """Pinned clients and their servers, for SHOW PINS."""
        return [(c, c.server) for c in self.clients if c.pinned]

    # ------------------------------------------------------------ database drains

    def start_drain(self, client: ClientConnection, databases: list[str]) -> None:
        self.spawn(self._drain(client, databases))

    async def _drain(self, client: ClientConnection, databases: list[str]) -> None:
        """Before DROP DATABASE x / CREATE DATABASE ... TEMPLATE x / ALTER DATABASE x RENAME:
        close pgmux's idle servers to x and wait (up to 10 s) for its busy ones to be released,
        so PostgreSQL does not refuse the command because of the pooler's own connections."""
        targets = set(databases)
        deadline = time.monotonic() + 10.0
        while True:
            busy = 0
            for pool in list(self.pools.values()):
                db = self.config.find_database(pool.database)
                if db is None or db.target_dbname not in targets:
                    continue
                for server in list(pool.idle):
                    pool.server_gone(server)
                    server.close("database drained for DDL")
                busy += len(pool.active) + len(pool.busy) + pool.connecting
            if not busy or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        logger.info("%s drained connections to %s%s", client.log_prefix, ", ".join(sorted(targets)),
                    f" ({busy} still busy)" if busy else "")
        await asyncio.sleep(0.05)  # let PostgreSQL notice the closed backends
        client.linking = False
        client.drain_passed = True
        if not client.closed:
            client.resume_held()

    def release(self, server: ServerConnection, reset: bool) -> None:
        """Return a clean server to its pool, after server_reset_query where configured."""
        server.stop_forwarding()
        server.state = "used"
        s = self.settings
        query = s.server_reset_query
        if server.dirty and not query:
            server.pool.server_gone(server)
            server.close("session state left and no server_reset_query")
            return
        if query and (s.server_reset_query_always
                      or (reset and (server.dirty or server.pool.limits.pool_mode == "session"))):
            server.pool.server_busy(server)
            self.spawn(self._reset(server, query))
            return
        self.server_ready(server)

    async def _reset(self, server: ServerConnection, query: str) -> None:
        _, err = await self._own_query(server, query)
        if err is not None or server.status != _IDLE:
            server.pool.server_gone(server)
            server.close("reset query failed")
            return
        if server.dirty and (server.stmts.lru or self.settings.max_prepared_statements):
            # A pinned client left: unless the reset query deallocated everything, its SQL may have
            # replaced or dropped one of pgmux's PGMUX_<n> statements. Check before reuse.
            rows, err = await self._own_query(server, OWN_STATEMENTS_SQL)
            if err is not None or not rows or not own_statements_match(rows[0], server.stmts.names()):
                server.pool.server_gone(server)
                server.close("prepared statements out of step with pgmux after reset")
                return
        # server.stmts was cleared by query_rows if (and only if) the reset query ran DISCARD ALL or
        # DEALLOCATE ALL; any other reset query leaves the backend's statements in place.
        server.dirty = False
        self.server_ready(server)

    @staticmethod
    def stats_parse(server: ServerConnection, client_side: bool) -> None:
        stats = server.pool.stats
        if client_side:
            stats.client_parse_count += 1
        else:
            stats.server_parse_count += 1

    @staticmethod
    def stats_bind(server: ServerConnection) -> None:
        server.pool.stats.bind_count += 1

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        """A server socket closed (by us or by PostgreSQL)."""
        pool = server.pool
        pool.server_gone(server)
        if self.shared is not None:
            self.shared.server_closed(server)
        if self.settings.log_disconnections and server.state != "login":
            age = time.monotonic() - server.connect_time
            pglog.info(f"{server.log_prefix} closing because: {reason} (age={int(age)}s)")
        client = server.client
        if client is not None:
            self.unlink(client, server)
            client.fail(reason)
        if pool.login_failure is None and server.state != "login":
            self.launch_connects(pool)  # after a failed login the janitor retries, not a tight loop
        self._check_shutdown()

    # ------------------------------------------------------------ cancel requests

    def handle_cancel(self, pid: int, key: int) -> None:
        """Route a CancelRequest to the server the client is linked to, over a new connection;
        a key another pooler process issued goes to that peer, or to the worker that issued it."""
        k = pid.to_bytes(4, "big", signed=True) + key.to_bytes(4, "big", signed=True)
        issued = k
        if self.settings.peer_id:
            owner = self.peers.owner(k)
            if owner is not None:
                self.peers.forward(k, owner)
                return
            issued = peers.as_issued(k)  # the TTL travels on to a worker, for the check below
        if self.shared is not None and self.shared.forward_cancel(k):
            return  # another worker's client: that worker handles it
        client = self.cancel_keys.get(issued)
        if client is None:
            if self.settings.peer_id and 0 in self.config.peers and peers.key_ttl(k):
                # With a `*` peer, processes may share a peer_id (pods of a Deployment): ask them all.
                self.peers.forward(k, 0)
                return
            logger.info("failed cancel request: no such client")
            return
        server = client.server
        if server is None:
            if client.pool is None and client.dbname == "pgbouncer":
                self.admin_console_cancel()
                return
            if client.waiting and client.pool is not None:
                logger.info("%s cancel request for waiting client", client.log_prefix)
            else:
                logger.info("%s cancel request for idle client", client.log_prefix)
            return
        # Until PostgreSQL has the cancel, this server goes to nobody else (server_ready holds
        # it): a late cancel would otherwise stop the next client's query.
        server.cancels += 1
        self.spawn(self._send_cancel(server))

    async def _send_cancel(self, server: ServerConnection) -> None:
        try:
            await self._deliver_cancel(server)
        finally:
            server.cancels -= 1
            if not server.cancels and server.state == "canceling":
                self.server_ready(server)

    async def _deliver_cancel(self, server: ServerConnection) -> None:
        packet = m.cancel_request(server.backend_pid, server.backend_key)
        unix = server.addr.startswith("/") or server.addr.startswith("\0")
        try:
            async with asyncio.timeout(self.settings.cancel_wait_timeout or None):
                reader, writer = await peers.open_stream(server.addr, None if unix else server.port)
                await peers.send_until_closed(reader, writer, packet)  # PostgreSQL closes after processing it
        except (OSError, TimeoutError) as exc:
            logger.warning("cancel request failed: %s", exc)

    # ------------------------------------------------------------ maintenance

    def janitor_tick(self) -> None:
        """Once a second: timeouts of waiting clients, idle servers, lifetimes, min_pool_size."""
        now = time.monotonic()
        self._read_fd_limit()  # prlimit may change it under a running process
        if len(self.clients) + self.server_total() > self.fd_warn_at:
            self._warn_fd_limit()
        s = self.settings
        for pool in list(self.pools.values()):
            db = self.config.find_database(pool.database)
            wait_timeout = self._query_wait_timeout(pool, db)
            if wait_timeout or s.query_wait_notify:
                self._check_waiters(pool, now, wait_timeout)
            if pool.params is None and id(pool) in self._params_waiters:
                self._check_params_waiters(pool, now, wait_timeout)
            idle_timeout = s.server_idle_timeout
            for server in list(pool.idle):
                if idle_timeout and now - server.last_used >= idle_timeout and (
                    pool.server_count > pool.limits.min_pool_size
                ):
                    pool.server_gone(server)
                    server.close("server idle timeout")
                elif self._lifetime_over(server):
                    pool.server_gone(server)
                    server.close("server lifetime over")
            for server in list(pool.active):
                self._check_linked_timeouts(server, now)
            if pool.waiting or (pool.limits.min_pool_size and pool.clients):
                self.launch_connects(pool)
            unused_for = None if id(pool) in self._params_waiters else self._pool_unused_for(pool, now)
            if unused_for is not None and (
                (db is not None and db.is_autodb and unused_for >= s.autodb_idle_timeout)
                or (s.pool_idle_timeout and unused_for >= s.pool_idle_timeout)
            ):
                del self.pools[(pool.database, pool.user)]
        client_idle = s.client_idle_timeout
        for client in list(self.clients):
            if not client.logged_in or client.server is not None or client.waiting or client.linking:
                continue
            limit = self.user_timeout(client.user, "client_idle_timeout", client_idle)
            if limit and now - client.request_time >= limit:
                client.fail("client_idle_timeout")

    def _query_wait_timeout(self, pool: Pool[ServerConnection, ClientConnection], db: DatabaseEntry | None) -> float:
        """query_wait_timeout for the pool's waiting clients: its user's, else its database's
        (`db`), else the global one; 0 means no limit."""
        wait_timeout: float = self.settings.query_wait_timeout
        if db is not None and db.query_wait_timeout is not None:
            wait_timeout = db.query_wait_timeout
        u = self.config.users.get(pool.user)
        if u is not None and u.query_wait_timeout is not None:
            wait_timeout = u.query_wait_timeout
        return wait_timeout

    def user_timeout(self, user: str | None, name: str, default: float) -> float:
        """A timeout from [users] when set there, else the global one."""
        u = self.config.users.get(user) if user else None
        value = getattr(u, name, None) if u is not None else None
        return default if value is None else value

    def _check_linked_timeouts(self, server: ServerConnection, now: float) -> None:
        """query_timeout, idle_transaction_timeout, transaction_timeout and pin_timeout of a
        linked server, and the close of one marked for it under server_fast_close or that
        serves a replication client."""
        client = server.client
        if client is None or client.linking:
            return
        s = self.settings
        reason = None
        if s.server_fast_close and server.close_needed and server.status == _IDLE and not server.outstanding:
            # Session mode: a server RECONNECT or RELOAD marked goes at the end of the
            # transaction rather than of the session, and its client with it.
            reason = "database configuration changed"
        elif server.replication is not None and server.close_needed and server not in self.admin_state().pause_marked:
            # A replication server is never released (its session may stream for ever): once
            # marked (RECONNECT, its database changed on RELOAD, new server TLS settings) it goes
            # now, its client with it, as PgBouncer's pool_server_maint does. PAUSE's mark waits.
            reason = "database configuration changed"
        elif (client.pinned and s.pin_timeout and server.status == _IDLE and not server.outstanding
                and now - max(server.last_used, client.request_time) >= s.pin_timeout):
            client.fail(f"pin timeout (pinned for: {client.pinned})")
            return
        if server.outstanding or server.pending_ext:
            limit = self.user_timeout(client.user, "query_timeout", s.query_timeout)
            if limit and server.query_start and now - server.query_start >= limit:
                reason = "query timeout"
        elif server.status != _IDLE:
            limit = self.user_timeout(client.user, "idle_transaction_timeout", s.idle_transaction_timeout)
            if limit and now - server.last_used >= limit:
                reason = "idle transaction timeout"
        if reason is None and server.status != _IDLE and server.xact_start:
            limit = self.user_timeout(client.user, "transaction_timeout", s.transaction_timeout)
            if limit and now - server.xact_start >= limit:
                reason = "transaction timeout"
        if reason is not None:
            self.unlink(client, server)
            server.pool.server_gone(server)
            server.close(reason)
            client.fail(reason)

    @staticmethod
    def _pool_unused_for(pool: Pool[ServerConnection, ClientConnection], now: float) -> float | None:
        """How long the pool has had no clients and no servers (None while it has some): an
        auto-database's pool goes after autodb_idle_timeout, any pool after pool_idle_timeout
        (PgBouncer #1491). Its statistics go with it, as in PgBouncer."""
        if pool.clients or pool.server_count or pool.waiting:
            pool.empty_since = 0.0
            return None
        if not pool.empty_since:
            pool.empty_since = now
        return now - pool.empty_since

    def _check_waiters(self, pool: Pool[ServerConnection, ClientConnection], now: float,
                       wait_timeout: float) -> None:
        """query_wait_timeout, and query_wait_notify's NOTICE once per client that has waited
        more than that many whole seconds since it was queued (PgBouncer's per_loop_activate)."""
        notify = self.settings.query_wait_notify
        for client in list(pool.waiting):
            if client.closed:
                continue
            waited = now - client.wait_started
            if wait_timeout and waited >= wait_timeout:
                self._fail_waiter(pool, client, "query_wait_timeout")
            elif notify > 0 and int(waited) > notify and client.logged_in and not client.wait_notified:
                client.wait_notified = True
                client.write(QUERY_WAIT_NOTICE)

    @staticmethod
    def _fail_waiter(pool: Pool[ServerConnection, ClientConnection], client: ClientConnection, reason: str) -> None:
        """Take a client out of the pool's queue and close it with `reason`."""
        pool.remove_waiter(client)
        client.waiting = False
        client.fail(reason)

    # ------------------------------------------------------------ reload and shutdown

    def reload(self, config: Config) -> None:
        self.apply_config(config)
        logger.info("config reloaded")

    def start_shutdown(self) -> None:
        """Stop accepting; exit once clients are gone (SIGTERM: WAIT_FOR_CLIENTS)."""
        self.shutting_down = True
        for pool in self.pools.values():
            self._configure_core(pool)  # every release goes through server_ready now
        listeners, self.listeners = self.listeners, []
        stop_listening(self, listeners)
        self._check_shutdown()

    def draining(self) -> bool:
        """Shutting down under WAIT_FOR_CLIENTS (SIGTERM): the listeners are closed, but the
        clients already accepted are served in full (their logins, new servers for them) until
        the last one leaves, so a rolling restart loses no connection."""
        return self.shutting_down and self.admin_state().shutdown_mode == "wait_for_clients"

    def _check_shutdown(self) -> None:
        if not self.shutting_down or self.shutdown_done is None:
            return
        # While draining, a client still logging in counts too (bounded by client_login_timeout).
        logins_count = self.draining()
        if not any(c.logged_in or logins_count for c in self.clients):
            # (WAIT_FOR_SERVERS: the last client took the last server with it)
            self._admin_exit(_CONNECTIONS_DROPPED.get(self.admin_state().shutdown_mode or ""))

    def close_all(self) -> None:
        for client in list(self.clients):
            client.fail("pooler is shutting down", "57P01")
        for pool in self.pools.values():
            for server in list(pool.idle) + list(pool.active) + list(pool.busy):
                server.close("pooler is shutting down")

    def random_choice(self, items: list[Any]) -> Any:
        return random.choice(items)

    # ---- admin console hooks
    # What the admin console (pgmux.admin), the stats timer and the signal handlers do to pools and
    # servers. The console's own state is one AdminState (admin_state()); PAUSE, KILL and SUSPEND
    # record themselves there and are mirrored into Pool.paused, which request_server and
    # launch_connects honour. Nothing here runs on the data path.

    def admin_state(self) -> AdminState:
        """The console's state (pause mode, paused and disabled databases, sessions)."""
        return self._admin

    async def admin_start(self) -> None:
        """Start the stats_period timer and the metrics listener, once. cli.py should await this at
        startup; the console also calls it at each login, so it runs at the latest then."""
        state = self.admin_state()
        if state.started:
            return
        state.started = True
        state.tasks.append(self.spawn(run_stats_timer(self)))
        state.metrics_server = await start_metrics_listener(self)

    def admin_pool_paused(self, db_name: str) -> bool:
        """Whether a pool of `db_name` must hold new transactions (for get_pool to set
        Pool.paused on pools made during a PAUSE or after a KILL)."""
        return bool(self.admin_state().db_paused(db_name))

    def admin_db_disabled(self, db_name: str) -> bool:
        """Whether DISABLE refuses new clients of `db_name` (for the login path)."""
        return db_name in self.admin_state().disabled_dbs

    def admin_sync_paused(self) -> None:
        """Mirror the console's pause state into every Pool.paused."""
        state = self.admin_state()
        for pool in self.pools.values():
            pool.set_paused(state.db_paused(pool.database))

    def _admin_pools(self, db_name: str | None) -> list[Pool[ServerConnection, ClientConnection]]:
        return [p for p in self.pools.values() if db_name is None or p.database == db_name]

    def _admin_pause_step(self, db_name: str | None) -> int:
        """One round of PAUSE: close idle and resetting servers, have active ones closed when
        released (close_needed, so a waiting client never gets them); return how many remain."""
        state = self.admin_state()
        remaining = 0
        for pool in self._admin_pools(db_name):
            for server in list(pool.idle) + list(pool.busy):
                pool.server_gone(server)
                server.close("pause mode")
            for server in pool.active:
                if not server.close_needed:
                    server.close_needed = True
                    state.pause_marked.add(server)
            remaining += len(pool.active) + pool.connecting
        return remaining

    async def admin_pause(self, db_name: str | None, alive: Any = None) -> None:
        """PAUSE [db]: hold new transactions, wait until every server of the db (None: all) is
        released and closed. Returns early if the pause is lifted or `alive()` turns false."""
        state = self.admin_state()
        if db_name is None:
            state.pause_mode = "pause"
        else:
            state.paused_dbs.add(db_name)
        self.admin_sync_paused()

        def still_paused() -> bool:
            return state.pause_mode != "none" if db_name is None else db_name in state.paused_dbs

        while self._admin_pause_step(db_name) and still_paused() and (alive is None or alive()):
            await asyncio.sleep(0.05)

    def admin_resume(self, db_name: str | None) -> None:
        """RESUME [db]: undo PAUSE/KILL (db) or PAUSE/SUSPEND (None), then serve waiting clients."""
        state = self.admin_state()
        if db_name is None:
            if state.pause_mode == "suspend":
                for transport in state.suspended:
                    if not transport.is_closing():
                        transport.resume_reading()
                state.suspended.clear()
            state.pause_mode = "none"
        else:
            state.paused_dbs.discard(db_name)
        self.admin_sync_paused()
        for server in list(state.pause_marked):
            if not server.pool.paused:
                server.close_needed = False
                state.pause_marked.discard(server)
        for pool in self.pools.values():
            if pool.paused:
                continue
            for server in list(pool.idle):
                if not pool.waiting:
                    break
                pool.idle.remove(server)
                self.server_ready(server)  # the released-server path: links the first waiter
            self.launch_connects(pool)

    def admin_kill(self, db_name: str | None) -> None:
        """KILL [db]: drop every client and server of the db (None: all) now; the db stays
        paused until RESUME. The pool objects stay, so counters never go backwards."""
        state = self.admin_state()
        pools = self._admin_pools(db_name)
        if db_name is None:
            state.paused_dbs.update(p.database for p in pools)
        else:
            state.paused_dbs.add(db_name)
        self.admin_sync_paused()
        for pool in pools:
            for server in list(pool.active) + list(pool.idle) + list(pool.busy):
                if server.client is not None:
                    self.unlink(server.client, server)
                pool.server_gone(server)
                server.close("database removed")
            for client in [c for c in self.clients if c.pool is pool and c.close_reason is None]:
                client.fail("database removed")

    def _admin_tag_dirty(self, pool: Pool[ServerConnection, ClientConnection]) -> None:
        """PgBouncer's tag_pool_dirty: idle servers go now, the others when released, and the
        ones still logging in once they have."""
        state = self.admin_state()
        pool.dirty_since = time.monotonic()
        for server in list(pool.idle):
            pool.server_gone(server)
            server.close("database configuration changed")
        for server in list(pool.active) + list(pool.busy):
            server.close_needed = True
            state.pause_marked.discard(server)  # a real close request: RESUME must not undo it
        self.launch_connects(pool)

    def admin_reconnect(self, db_name: str | None) -> None:
        """RECONNECT [db]: replace every server of the db (None: all) as it is released."""
        for pool in self._admin_pools(db_name):
            self._admin_tag_dirty(pool)

    async def admin_wait_close(self, db_name: str | None, alive: Any = None) -> None:
        """WAIT_CLOSE [db]: return once no server of the db (None: all) is close_needed."""
        while alive is None or alive():
            pending = False
            for pool in self._admin_pools(db_name):
                for server in list(pool.idle):
                    if server.close_needed:
                        pool.server_gone(server)
                        server.close("database configuration changed")
                pending = pending or any(s.close_needed for s in (*pool.active, *pool.busy))
            if not pending:
                return
            await asyncio.sleep(0.05)

    def admin_kill_client(self, client_id: int) -> bool:
        """KILL_CLIENT id: disconnect one client (its server is released or closed as on any
        disconnect). False when no such client."""
        for client in self.clients:
            if client.id == client_id and (client.logged_in or client.pool is not None):
                client.fail("admin forced disconnect")
                return True
        return False

    async def admin_suspend(self) -> None:
        """SUSPEND: stop reading from every client and server, wait (suspend_timeout) until what
        was read has been written out; connections that cannot flush in time are dropped."""
        state = self.admin_state()
        state.pause_mode = "suspend"
        self.admin_sync_paused()
        consoles = set(state.sessions)
        conns: list[Any] = [c for c in self.clients if c.id not in consoles]
        for pool in self.pools.values():
            conns += list(pool.idle) + list(pool.active) + list(pool.busy)
        for conn in conns:
            t = conn.transport
            if t is not None and not t.is_closing() and t.is_reading():
                t.pause_reading()
                state.suspended.append(t)
        deadline = time.monotonic() + self.settings.suspend_timeout
        while True:
            unflushed = [c for c in conns if c.transport is not None and not c.transport.is_closing()
                         and c.transport.get_write_buffer_size()]
            if not unflushed:
                return
            if time.monotonic() >= deadline:
                for conn in unflushed:
                    conn.close("suspend_timeout")
                return
            await asyncio.sleep(0.05)

    def admin_reload(self) -> bool:
        """RELOAD/SIGHUP: reread the ini and auth_file; a bad file changes nothing (False).
        Servers of databases whose definition changed are replaced as they are released."""
        systemd.notify_reloading()
        try:
            return self._reload_from_disk()
        finally:
            systemd.notify_ready()

    def _reload_from_disk(self) -> bool:
        from pgmux.auth import AuthFileError
        from pgmux.config import ConfigError, load_config

        try:
            new = load_config(self.config.path)
            check_config(new)
        except (ConfigError, AuthFileError, OSError) as exc:
            logger.error("RELOAD failed: %s", exc)
            return False
        for name in new.settings.adopt_nonreloadable(self.settings):
            logger.warning("setting %s cannot be changed by reload; restart needed", name)
        if self.shared is None or self.shared.index == 0:  # with workers, one of them says it
            log_unsupported_settings(new.settings)
        old = self.config
        self.reload(new)
        for pool in list(self.pools.values()):
            if old.find_database(pool.database) != new.find_database(pool.database):
                self._admin_tag_dirty(pool)
        self.admin_sync_paused()
        if self.on_reload is not None:
            self.on_reload()
        return True

    def console_reload(self) -> bool:
        """RELOAD typed on the console: this process, then, with workers, all the others (a
        signal only ever acts on the process that gets it)."""
        ok = self.admin_reload()
        if ok and self.shared is not None:
            self.shared.relay_reload()
        return ok

    def console_shutdown(self, mode: str) -> None:
        """SHUTDOWN typed on the console: this process, then, with workers, all of them. A second
        SHUTDOWN WAIT_FOR_... only changes the mode here, as in PgBouncer: relayed (as a signal)
        it would make the other workers exit at once."""
        relay = mode == "immediate" or self.admin_state().shutdown_mode is None
        self.admin_shutdown(mode)
        if relay and self.shared is not None:
            self.shared.relay_shutdown(mode)

    def admin_settings_changed(self) -> None:
        """After SET: recompute pool limits and the like from the changed settings."""
        try:
            self.apply_config(self.config)
        except Exception:  # noqa: BLE001 - e.g. the auth_file became unreadable; keep running
            logger.exception("applying SET failed")

    def admin_shutdown(self, mode: str) -> None:
        """SHUTDOWN: 'immediate' (SIGQUIT), 'wait_for_servers' (SIGINT: PAUSE, then exit when no
        server is left) or 'wait_for_clients' (SIGTERM: exit when the last client leaves)."""
        state = self.admin_state()
        state.shutdown_mode = mode
        systemd.notify_stopping()
        if mode == "immediate":
            self._admin_exit()
            return
        if mode == "wait_for_servers":
            state.pause_mode = "pause"
            self.admin_sync_paused()
            # The clients queued for a server never get one (PgBouncer's janitor closes them).
            for pool in self.pools.values():
                for client in list(pool.waiting):
                    if not client.closed:
                        self._fail_waiter(pool, client, SERVER_SHUTTING_DOWN)
                self.fail_params_waiters(pool, ClientError(SERVER_SHUTTING_DOWN))
            self.spawn(self._admin_exit_when_no_servers())
        self.start_shutdown()

    async def _admin_exit_when_no_servers(self) -> None:
        while self._admin_pause_step(None):
            await asyncio.sleep(0.05)
        self._admin_exit(_CONNECTIONS_DROPPED["wait_for_servers"])

    def _admin_exit(self, why: str | None = None) -> None:
        """Let the process exit (cli.py), saying `why` (PgBouncer's janitor line) the first time."""
        fut = self.shutdown_done
        if fut is not None:
            if not fut.done():
                if why:
                    logger.info("%s", why)
                fut.set_result(None)
        else:
            self.close_all()

    def admin_signal_pause(self) -> None:
        """SIGUSR1: PAUSE everything (PgBouncer's signal; nobody waits for the answer)."""
        if self.admin_state().pause_mode != "none":
            logger.info("got SIGUSR1, but already paused/suspended")
            return
        logger.info("got SIGUSR1, pausing all activity")
        self.spawn(self.admin_pause(None))

    def admin_signal_resume(self) -> None:
        """SIGUSR2: RESUME after PAUSE or SUSPEND; nothing during a shutdown (PgBouncer 1.23+, whose
        RESUME refuses too: the pause of WAIT_FOR_SERVERS stays)."""
        state = self.admin_state()
        if self.shutting_down or state.shutdown_mode is not None:
            logger.info("got SIGUSR2 while shutting down, ignoring")
            return
        if state.pause_mode == "none":
            logger.info("got SIGUSR2, but not paused/suspended")
            return
        logger.info("got SIGUSR2, continuing from %s", "SUSPEND" if state.pause_mode == "suspend" else "PAUSE")
        self.admin_resume(None)

    def admin_console_cancel(self) -> None:
        """A CancelRequest with a console client's key (^C in psql during PAUSE or SUSPEND):
        PgBouncer's admin_handle_cancel resumes, unless the pooler is shutting down."""
        state = self.admin_state()
        if state.shutdown_mode is None and state.pause_mode != "none":
            logger.info("cancel request on the console: resuming")
            self.admin_resume(None)
