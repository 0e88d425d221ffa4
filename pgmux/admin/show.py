"""Every SHOW command as a function of the pooler's state: column names and rows, nothing sent.

Column names, order and types are current PgBouncer's (``src/admin.c``, ``src/stats.c``; see
shared/spec/pgbouncer.md section 2), because pgbouncer_exporter and scripts read them by name.
Rows follow PgBouncer's conventions: pools and databases sorted by name, the console itself shown
as database ``pgbouncer`` / user ``pgbouncer`` in statement mode, ``(nouser)``/``(nodb)`` for
unknowns, ``%p``-style pointers that match the ``C-0x...``/``S-0x...`` prefixes of the log.

Things pgmux does not have report empty lists (DNS cache, peer pools) or zero counters (cancel
request states, prepared statements until the pool counts them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pgmux import __version__
from pgmux.admin.commands import FAKE_PARAMS, AdminError
from pgmux.admin.result import Column, Result, Value, columns
from pgmux.net.base import BUF_SIZE
from pgmux.net.peercred import peer_credentials
from pgmux.net.tls import describe as tls_describe
from pgmux.pool.admin_state import ADMIN_DB, ADMIN_USER, P_PAUSE, P_SUSPEND
from pgmux.protocol import messages as m
from pgmux.stats import counters, queries

if TYPE_CHECKING:
    from pgmux.config import DatabaseEntry
    from pgmux.net.client import ClientConnection
    from pgmux.net.server import ServerConnection
    from pgmux.pool.pool import Pool
    from pgmux.pooler import Pooler

#: The version text of SHOW VERSION and of `pgmux --version`'s first line.
VERSION_STRING = f"pgmux {__version__}"
#: server_version in the console's welcome, PgBouncer style ("<version>/bouncer").
SERVER_VERSION = f"{__version__}/bouncer"

HELP_DETAIL = (
    "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n"
    "\tSHOW PEERS|PEER_POOLS\n"
    "\tSHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE\n"
    "\tSHOW DNS_HOSTS|DNS_ZONES\n"
    "\tSHOW PINS|ENGINE|QUERIES (pgmux)\n"
    "\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n"
    "\tRESET QUERIES (pgmux)\n"
    "\tSET key = arg\n"
    "\tRELOAD\n"
    "\tPAUSE [<db>]\n"
    "\tRESUME [<db>]\n"
    "\tDISABLE <db>\n"
    "\tENABLE <db>\n"
    "\tRECONNECT [<db>]\n"
    "\tKILL [<db>]\n"
    "\tKILL_CLIENT <client_id>\n"
    "\tSUSPEND\n"
    "\tSHUTDOWN\n"
    "\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS\n"
    "\tWAIT_CLOSE [<db>]"
)

# ------------------------------------------------------------------ column lists

POOLS_COLUMNS = columns(
    "ssiiiiiiiiiiiiiss",
    "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
    "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts",
)
STATS_COLUMNS = columns(
    "s" + "N" * 24,
    "database",
    "total_server_assignment_count", "total_xact_count", "total_query_count", "total_received", "total_sent",
    "total_xact_time", "total_query_time", "total_wait_time", "total_client_parse_count",
    "total_server_parse_count", "total_bind_count", "total_client_login_count",
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
    "avg_server_parse_count", "avg_bind_count", "avg_client_login_count",
)
STATS_TOTALS_COLUMNS = columns(
    "s" + "N" * 12,
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
    "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
    "client_login_count",
)
STATS_AVERAGES_COLUMNS = columns(
    "s" + "N" * 12,
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
    "xact_time", "query_time", "wait_time", "avg_client_parse_count", "avg_server_parse_count",
    "avg_bind_count", "avg_client_login_count",
)
TOTALS_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes", "xact_time",
    "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count", "ps_bind_count",
    "client_login_count",
)
TOTALS_COLUMNS = columns("sN", "name", "value")
SOCKET_NAMES = (
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr", "local_port",
    "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls",
    "application_name", "prepared_statements", "id",
)
SOCKET_DEBUG_NAMES = ("recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail")
SOCKETS_COLUMNS = columns("ssssssisiTTiiississii", *SOCKET_NAMES)
SOCKETS_DEBUG_COLUMNS = columns("ssssssisiTTiiississiiiiiiiii", *SOCKET_NAMES, *SOCKET_DEBUG_NAMES)
DATABASES_COLUMNS = columns(
    "ssissiiiissiiiiii",
    "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool_size",
    "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections", "current_connections",
    "max_client_connections", "current_client_connections", "paused", "disabled",
)
USERS_COLUMNS = columns(
    "ssssiiii",
    "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections", "current_connections",
    "max_user_client_connections", "current_client_connections",
)
CONFIG_COLUMNS = columns("ssss", "key", "value", "default", "changeable")
LISTS_COLUMNS = columns("si", "list", "items")
PEERS_COLUMNS = columns("isii", "peer_id", "host", "port", "pool_size")
PEER_POOLS_COLUMNS = columns(
    "iiiii", "peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"
)
FDS_COLUMNS = columns(
    "issssiqisssssbb",
    "fd", "task", "user", "database", "addr", "port", "cancel", "link", "client_encoding", "std_strings",
    "datestyle", "timezone", "password", "scram_client_key", "scram_server_key",
)
MEM_COLUMNS = columns("siiii", "name", "size", "used", "free", "memtotal")
DNS_HOSTS_COLUMNS = columns("sqs", "hostname", "ttl", "addrs")
DNS_ZONES_COLUMNS = columns("sqi", "zonename", "serial", "count")
STATE_COLUMNS = columns("ss", "key", "value")
VERSION_COLUMNS = columns("s", "version")
# pgmux extension: clients whose transaction-mode server stays linked because of session state.
PINS_COLUMNS = columns("ssssiiiqs", "database", "user", "type", "addr", "port", "id", "remote_pid",
                       "pinned_seconds", "reason")

# ------------------------------------------------------------------ helpers


def _rows(cols: list[Column], rows: list[Any]) -> Result:
    return Result("SHOW", cols, rows)


def timestamp(wall: float) -> str:
    """PgBouncer's 'T' column format: local time, ``YYYY-MM-DD HH:MM:SS TZ``."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(wall))


def _wall(mono: float, now_mono: float, now_wall: float) -> float:
    return now_wall - (now_mono - mono)


def _split_us(seconds: float) -> tuple[int, int]:
    us = max(0, int(seconds * 1_000_000))
    return us // 1_000_000, us % 1_000_000


def sorted_pools(pooler: Pooler) -> list[Pool[Any, Any]]:
    """Pools in PgBouncer's pool_list order: by database, then user."""
    return [pooler.pools[k] for k in sorted(pooler.pools)]


def _database_entries(pooler: Pooler) -> list[DatabaseEntry]:
    """[databases] entries plus auto-databases that have a pool (PgBouncer registers those)."""
    config = pooler.config
    found = {name: db for name, db in config.databases.items() if name != "*"}
    for pool in pooler.pools.values():
        if pool.database not in found:
            db = config.find_database(pool.database)
            if db is not None:
                found[pool.database] = db
    return [found[n] for n in sorted(found)]


def _pool_mode(pooler: Pooler, pool: Pool[Any, Any]) -> str:
    db = pooler.config.find_database(pool.database)
    return pooler.pool_mode_for(db, pool.user) if db is not None else pooler.settings.pool_mode


def _load_balance(db: DatabaseEntry | None) -> str | None:
    """Only shown for a multi-host database, as PgBouncer does."""
    if db is None or not db.host or "," not in db.host:
        return None
    return db.load_balance_hosts or "round-robin"


def _login_clients_by_pool(pooler: Pooler) -> dict[int, list[ClientConnection]]:
    """Clients that chose a pool but are still logging in (waiting for the pool's first server):
    PgBouncer keeps those in the pool's waiting list (CL_WAITING_LOGIN)."""
    out: dict[int, list[ClientConnection]] = {}
    for c in pooler.clients:
        if c.pool is not None and not c.logged_in and not c.closed:
            out.setdefault(id(c.pool), []).append(c)
    return out


def _sessions(pooler: Pooler) -> list[Any]:
    state = pooler.admin_state()
    return [s for s in state.sessions.values() if not s.client.closed]


def _pool_items(pooler: Pooler) -> list[tuple[str, str, Pool[Any, Any] | None]]:
    """(database, user, pool) for every pool plus the console's (pool None), sorted."""
    items: list[tuple[str, str, Pool[Any, Any] | None]] = [(p.database, p.user, p) for p in sorted_pools(pooler)]
    items.append((ADMIN_DB, ADMIN_USER, None))
    items.sort(key=lambda t: (t[0], t[1]))
    return items


# ------------------------------------------------------------------ SHOW POOLS


def show_pools(pooler: Pooler) -> Result:
    now = time.monotonic()
    logins = _login_clients_by_pool(pooler)
    rows: list[list[Value]] = []
    for db_name, user, pool in _pool_items(pooler):
        if pool is None:
            rows.append([db_name, user, len(_sessions(pooler)), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                         "statement", None])
            continue
        waiting = [c for c in pool.waiting if not c.closed]
        login = logins.get(id(pool), [])
        starts = [c.wait_started for c in waiting if c.wait_started] + [c.connect_time for c in login]
        maxwait, maxwait_us = _split_us(now - min(starts)) if starts else (0, 0)
        cl_active = sum(1 for c in pool.clients if not c.waiting and not c.closed)
        # released servers held until a cancel for their last client is delivered (Pooler.server_ready)
        canceling = sum(1 for sv in pool.busy if sv.state == "canceling")
        db = pooler.config.find_database(pool.database)
        rows.append([
            db_name, user, cl_active, len(waiting) + len(login), 0, 0,
            len(pool.active), 0, canceling, len(pool.idle), len(pool.busy) - canceling, 0, pool.connecting,
            maxwait, maxwait_us, _pool_mode(pooler, pool), _load_balance(db),
        ])
    return _rows(POOLS_COLUMNS, rows)


# ------------------------------------------------------------------ SHOW STATS family


def stat_sources(pooler: Pooler) -> list[tuple[str, str, Any]]:
    """(database, user, PoolStats) for every pool and the console, sorted as PgBouncer's pool list."""
    items = [(p.database, p.user, p.stats) for p in sorted_pools(pooler)]
    items.append((ADMIN_DB, ADMIN_USER, pooler.admin_state().stats))
    items.sort(key=lambda t: (t[0], t[1]))
    return items


def database_stats(pooler: Pooler) -> list[tuple[str, counters.Snapshot, counters.Snapshot]]:
    """(database, totals, averages) per database; shared by SHOW STATS* and the metrics collector."""
    tracker = pooler.admin_state().tracker
    now = counters.now_us()
    return [(db, cur, tracker.averages(cur, old, now))
            for db, cur, old in counters.group_by_database(stat_sources(pooler), tracker)]


def _stats_result(name: str, stats: list[tuple[str, counters.Snapshot, counters.Snapshot]]) -> Result:
    """SHOW STATS, STATS_TOTALS or STATS_AVERAGES (``name``) from (database, totals, averages) rows."""
    if name == "stats":
        return _rows(STATS_COLUMNS, [[db, *cur, *avg] for db, cur, avg in stats])
    if name == "stats_totals":
        return _rows(STATS_TOTALS_COLUMNS, [[db, *cur] for db, cur, _ in stats])
    return _rows(STATS_AVERAGES_COLUMNS, [[db, *avg] for db, _, avg in stats])


def _sum_snapshots(snaps: Iterable[counters.Snapshot]) -> counters.Snapshot:
    """Counter-wise sum of ``snaps`` (ZERO for none)."""
    total = counters.ZERO
    for snap in snaps:
        total = counters.add(total, snap)
    return total


def _totals_result(cur: counters.Snapshot, avg: counters.Snapshot) -> Result:
    """SHOW TOTALS: a total_<counter> row for each counter, then an avg_<counter> row for each."""
    rows: list[list[Value]] = [[f"total_{n}", v] for n, v in zip(TOTALS_NAMES, cur, strict=True)]
    rows += [[f"avg_{n}", v] for n, v in zip(TOTALS_NAMES, avg, strict=True)]
    return _rows(TOTALS_COLUMNS, rows)


def show_stats(pooler: Pooler) -> Result:
    return _stats_result("stats", database_stats(pooler))


def show_stats_totals(pooler: Pooler) -> Result:
    return _stats_result("stats_totals", database_stats(pooler))


def show_stats_averages(pooler: Pooler) -> Result:
    return _stats_result("stats_averages", database_stats(pooler))


def show_totals(pooler: Pooler) -> Result:
    tracker = pooler.admin_state().tracker
    sources = stat_sources(pooler)
    cur_total = _sum_snapshots(counters.snapshot(stats) for _, _, stats in sources)
    old_total = _sum_snapshots(tracker.old((db, user)) for db, user, _ in sources)
    return _totals_result(cur_total, tracker.averages(cur_total, old_total))


# ------------------------------------------------------------------ SHOW CLIENTS / SERVERS / SOCKETS


class _Clock:
    """One reading of both clocks per command, so every row of a result uses the same 'now'."""

    def __init__(self) -> None:
        self.mono = time.monotonic()
        self.wall = time.time()

    def wall_of(self, mono: float) -> float:
        return _wall(mono, self.mono, self.wall)


def _ptr(obj: object | None) -> str:
    return f"{id(obj):#x}" if obj is not None else ""


def _prepared_count(conn: Any) -> int:
    """Prepared statements known on a connection, when the prepared-statement support keeps them."""
    stmts = getattr(conn, "stmts", None)
    try:
        return len(stmts) if stmts is not None else 0
    except TypeError:
        return 0


def _debug_cols(conn: Any) -> list[Value]:
    """recv_pos, pkt_pos, pkt_remain, send_pos, send_remain, pkt_avail, send_avail from our buffers."""
    t = conn.transport
    pending = t.get_write_buffer_size() if t is not None and not t.is_closing() else 0
    kept, skip = conn.carried  # what the engine holds (pgmux.engine.Link)
    held = conn.keep + kept + len(conn.inbox)
    return [held, 0, conn.skip + skip, 0, 0, conn.keep + kept, pending]


def _has_buffered_data(conn: Any) -> bool:
    t = conn.transport
    pending = t.get_write_buffer_size() if t is not None and not t.is_closing() else 0
    return bool(conn.keep or conn.carried[0] or conn.inbox or pending)


def _client_row(pooler: Pooler, c: ClientConnection, state: str, clock: _Clock, debug: bool,
                session: Any = None) -> list[Value]:
    s = pooler.settings
    if state == "active" and c.server is None:
        state = "idle"  # PgBouncer 1.25: an active socket without a link shows as idle
    wait_start = 0.0
    if c.waiting and c.wait_started:
        wait_start = c.wait_started
    elif not c.logged_in and c.pool is not None:
        wait_start = c.connect_time
    elif session is not None and session.query_start:
        wait_start = session.query_start
    elif c.server is not None and c.server.query_start:
        wait_start = c.server.query_start
    wait, wait_us = _split_us(clock.mono - wait_start) if wait_start else (0, 0)
    if c.is_unix:
        addr, port, laddr, lport = "unix", s.listen_port, "unix", s.listen_port
        cred = peer_credentials(c.transport)
        remote_pid = cred[0] if cred else 0
    else:
        addr, port, laddr, lport = c.addr, c.port, c.local_addr, c.local_port
        remote_pid = 0
    if session is not None:
        db_name: str | None = ADMIN_DB
    else:
        db_name = c.pool.database if c.pool is not None else c.dbname
    app = c.params.get("application_name") or c.startup_params.get("application_name") or ""
    row: list[Value] = [
        "C", c.user or "(nouser)", db_name or "(nodb)", c.replication or "none", state, addr, port, laddr, lport,
        timestamp(clock.wall_of(c.connect_time)), timestamp(clock.wall_of(c.request_time)), wait, wait_us, 0,
        _ptr(c), _ptr(c.server), remote_pid, tls_describe(c.transport, absent=""), app, _prepared_count(c), c.id,
    ]
    if debug:
        row += _debug_cols(c)
    return row


def server_id(pooler: Pooler, server: ServerConnection) -> int:
    """A server connection's id: drawn from the clients' counter when its connect was launched
    (Pooler.next_client_id), as PgBouncer numbers every socket."""
    return server.id


def _server_row(pooler: Pooler, sv: ServerConnection, state: str, clock: _Clock, debug: bool) -> list[Value]:
    if state == "active" and sv.client is None:
        state = "idle"  # PgBouncer 1.25: an active socket without a link shows as idle
    wait, wait_us = _split_us(clock.mono - sv.query_start) if sv.query_start else (0, 0)
    unix = sv.addr.startswith("/") or sv.addr.startswith("\0") or sv.local_addr == "unix"
    addr = "unix" if unix else sv.addr
    laddr = "unix" if unix else sv.local_addr
    row: list[Value] = [
        "S", sv.pool.user, sv.pool.database, sv.replication or "none", state, addr, sv.port, laddr, sv.local_port,
        timestamp(sv.connect_wall), timestamp(clock.wall_of(sv.request_time)), wait, wait_us,
        int(sv.close_needed), _ptr(sv), _ptr(sv.client), sv.backend_pid, tls_describe(sv.transport, absent=""),
        sv.params.get("application_name") or "", _prepared_count(sv), server_id(pooler, sv),
    ]
    if debug:
        row += _debug_cols(sv)
    return row


def _client_lists(pooler: Pooler, pool: Pool[Any, Any], login: list[ClientConnection]
                  ) -> tuple[list[ClientConnection], list[ClientConnection]]:
    """(active, waiting) clients of a pool, waiting in queue order."""
    waiting = [c for c in pool.waiting if not c.closed]
    waiting_ids = {id(c) for c in waiting}
    active = sorted((c for c in pool.clients if id(c) not in waiting_ids and not c.closed), key=lambda c: c.id)
    return active, waiting + sorted(login, key=lambda c: c.id)


def _iter_clients(pooler: Pooler, clock: _Clock, debug: bool) -> Iterator[list[Value]]:
    logins = _login_clients_by_pool(pooler)
    names = ("cl_active", "cl_waiting") if debug else ("active", "waiting")
    for _, _, pool in _pool_items(pooler):
        if pool is None:
            for sess in sorted(_sessions(pooler), key=lambda s: s.client.id):
                yield _client_row(pooler, sess.client, names[0], clock, debug, sess)
            continue
        active, waiting = _client_lists(pooler, pool, logins.get(id(pool), []))
        for c in active:
            yield _client_row(pooler, c, names[0], clock, debug)
        for c in waiting:
            yield _client_row(pooler, c, names[1], clock, debug)


def _iter_servers(pooler: Pooler, clock: _Clock, debug: bool) -> Iterator[list[Value]]:
    names = ("sv_active", "sv_idle", "sv_used") if debug else ("active", "idle", "used")
    for pool in sorted_pools(pooler):
        for sv in list(pool.active):
            yield _server_row(pooler, sv, names[0], clock, debug)
        for sv in list(pool.idle):
            yield _server_row(pooler, sv, names[1], clock, debug)
        for sv in list(pool.busy):
            state = names[2] if sv.state != "canceling" else "sv_being_canceled" if debug else "being_canceled"
            yield _server_row(pooler, sv, state, clock, debug)


def _unpooled_login_clients(pooler: Pooler) -> list[ClientConnection]:
    """Clients still in startup/authentication (PgBouncer's login_client_list)."""
    sessions = pooler.admin_state().sessions
    return sorted((c for c in pooler.clients if c.pool is None and not c.logged_in and not c.closed
                   and c.id not in sessions), key=lambda c: c.id)


def show_clients(pooler: Pooler) -> Result:
    return _rows(SOCKETS_COLUMNS, list(_iter_clients(pooler, _Clock(), False)))


def show_servers(pooler: Pooler) -> Result:
    return _rows(SOCKETS_COLUMNS, list(_iter_servers(pooler, _Clock(), False)))


def _socket_rows(pooler: Pooler, only_busy: bool) -> list[list[Value]]:
    clock = _Clock()
    rows = list(_iter_clients(pooler, clock, True)) + list(_iter_servers(pooler, clock, True))
    rows += [_client_row(pooler, c, "cl_login", clock, True) for c in _unpooled_login_clients(pooler)]
    if only_busy:
        # pkt_avail (held bytes) or send_avail (unsent bytes): the socket has buffered data.
        rows = [r for r in rows if r[-7] or r[-1]]
    return rows


def show_sockets(pooler: Pooler) -> Result:
    return _rows(SOCKETS_DEBUG_COLUMNS, _socket_rows(pooler, False))


def show_active_sockets(pooler: Pooler) -> Result:
    return _rows(SOCKETS_DEBUG_COLUMNS, _socket_rows(pooler, True))


# ------------------------------------------------------------------ SHOW DATABASES / USERS


def _first(*values: Any) -> Any:
    for v in values:
        if v:
            return v
    return 0


def show_databases(pooler: Pooler) -> Result:
    s = pooler.settings
    state = pooler.admin_state()
    servers: dict[str, int] = {}
    for pool in pooler.pools.values():
        servers[pool.database] = servers.get(pool.database, 0) + pool.server_count
    client_counts: dict[str, int] = {}
    for c in pooler.clients:
        if c.pool is not None and not c.closed:
            client_counts[c.pool.database] = client_counts.get(c.pool.database, 0) + 1
    rows: list[list[Value]] = []
    entries: list[tuple[str, Any]] = [(db.name, db) for db in _database_entries(pooler)]
    entries.append((ADMIN_DB, None))
    entries.sort(key=lambda t: t[0])
    for name, db in entries:
        if db is None:
            rows.append([ADMIN_DB, None, s.listen_port, ADMIN_DB, ADMIN_USER, 2, 0, 0, int(s.server_lifetime),
                         "statement", None, s.max_db_connections, 0, s.max_db_client_connections,
                         len(_sessions(pooler)), 0, 0])
            continue
        rows.append([
            name, db.host, db.port, db.target_dbname, db.user,
            db.pool_size if db.pool_size is not None else s.default_pool_size,
            db.min_pool_size if db.min_pool_size is not None else s.min_pool_size,
            db.reserve_pool_size if db.reserve_pool_size is not None else s.reserve_pool_size,
            int(_first(db.server_lifetime, s.server_lifetime)),
            db.pool_mode, _load_balance(db),
            _first(db.max_db_connections, s.max_db_connections), servers.get(name, 0),
            _first(db.max_db_client_connections, s.max_db_client_connections), client_counts.get(name, 0),
            int(name in state.paused_dbs), int(name in state.disabled_dbs),
        ])
    return _rows(DATABASES_COLUMNS, rows)


def _user_names(pooler: Pooler) -> set[str]:
    """PgBouncer's user list: auth_file and [users] entries, the console's user, and pool users
    (auth_query / auth_type=any users get one when they log in)."""
    return (set(pooler.auth_users) | set(pooler.config.users) | {p.user for p in pooler.pools.values()}
            | {ADMIN_USER})


def show_users(pooler: Pooler) -> Result:
    s = pooler.settings
    cfg_users = pooler.config.users
    names = _user_names(pooler)
    servers: dict[str, int] = {}
    for pool in pooler.pools.values():
        servers[pool.user] = servers.get(pool.user, 0) + pool.server_count
    client_counts: dict[str, int] = {}
    for c in pooler.clients:
        if c.user is not None and (c.logged_in or c.pool is not None) and not c.closed:
            client_counts[c.user] = client_counts.get(c.user, 0) + 1
    rows: list[list[Value]] = []
    for name in sorted(names):
        u = cfg_users.get(name)
        pool_size = f"{u.pool_size:9d}" if u is not None and u.pool_size is not None else ""
        reserve = f"{u.reserve_pool_size:9d}" if u is not None and u.reserve_pool_size is not None else ""
        rows.append([
            name, pool_size, reserve, u.pool_mode if u is not None else None,
            _first(u.max_user_connections if u else None, s.max_user_connections), servers.get(name, 0),
            _first(u.max_user_client_connections if u else None, s.max_user_client_connections),
            client_counts.get(name, 0),
        ])
    return _rows(USERS_COLUMNS, rows)


# ------------------------------------------------------------------ the small ones


def show_config(pooler: Pooler) -> Result:
    return _rows(CONFIG_COLUMNS, [list(r) for r in pooler.settings.show_rows(nulls=True)])


def list_counts(pooler: Pooler) -> list[tuple[str, int]]:
    """SHOW LISTS rows; also read by the metrics collector."""
    return [
        ("databases", len(_database_entries(pooler)) + 1),
        ("users", len(_user_names(pooler))),
        ("peers", len(pooler.config.peers)),
        ("pools", len(pooler.pools) + 1),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", len(pooler.clients)),
        ("login_clients", len(_unpooled_login_clients(pooler))),
        ("free_servers", 0),
        ("used_servers", pooler.server_total()),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]


def show_lists(pooler: Pooler) -> Result:
    return _rows(LISTS_COLUMNS, [list(r) for r in list_counts(pooler)])


def show_peers(pooler: Pooler) -> Result:
    s = pooler.settings
    rows = [[p.peer_id, p.host, p.port, p.pool_size if p.pool_size is not None else s.default_pool_size]
            for _, p in sorted(pooler.config.peers.items())]
    return _rows(PEERS_COLUMNS, rows)


def show_peer_pools(pooler: Pooler) -> Result:
    """One row per [peers] entry: cancel requests forwarded to it (pgmux/net/peers.py)."""
    rows = []
    for peer_id in sorted(pooler.config.peers):
        pool = pooler.peers.pools.get(peer_id)
        waiting, login, active = (pool.waiting, pool.login, pool.active) if pool is not None else (0, 0, 0)
        rows.append([peer_id, active, waiting, active, login])
    return _rows(PEER_POOLS_COLUMNS, rows)


def show_mem(pooler: Pooler) -> Result:
    """PgBouncer lists its slab caches; the nearest thing here is the per-connection receive buffers."""
    n_clients = len(pooler.clients)
    n_servers = sum(len(p.idle) + len(p.active) + len(p.busy) for p in pooler.pools.values())
    # Idle clients share one receive buffer (net/base.py SharedReadBuffer): count each buffer once.
    client_bytes = sum(len(buf) for buf in {id(c.buf): c.buf for c in pooler.clients}.values())
    server_bytes = sum(len(s.buf) for p in pooler.pools.values() for s in (*p.idle, *p.active, *p.busy))
    rows = [
        ["db_cache", 0, len(_database_entries(pooler)) + 1, 0, 0],
        ["pool_cache", 0, len(pooler.pools) + 1, 0, 0],
        ["user_cache", 0, len(_user_names(pooler)), 0, 0],
        ["client_cache", BUF_SIZE, n_clients, 0, client_bytes],
        ["server_cache", BUF_SIZE, n_servers, 0, server_bytes],
    ]
    return _rows(MEM_COLUMNS, rows)


def show_dns_hosts(pooler: Pooler) -> Result:
    return _rows(DNS_HOSTS_COLUMNS, [])  # no DNS cache: the event loop resolves each connect


def show_dns_zones(pooler: Pooler) -> Result:
    return _rows(DNS_ZONES_COLUMNS, [])


def show_state(pooler: Pooler) -> Result:
    mode = pooler.admin_state().pause_mode
    rows = [["active", "yes" if mode == "none" else "no"], ["paused", "yes" if mode == P_PAUSE else "no"],
            ["suspended", "yes" if mode == P_SUSPEND else "no"]]
    return _rows(STATE_COLUMNS, rows)


def show_version(pooler: Pooler) -> Result:
    return _rows(VERSION_COLUMNS, [[VERSION_STRING]])


def show_pins(pooler: Pooler) -> Result:
    """SHOW PINS (pgmux): who is pinned to which backend, for how long and why."""
    now = time.monotonic()
    rows = []
    for client, server in sorted(pooler.pins(), key=lambda cs: cs[0].id):
        rows.append([client.dbname, client.user, "C", client.addr, client.port, client.id,
                     server.backend_pid if server is not None else 0, int(now - client.pinned_since),
                     client.pinned])
    return _rows(PINS_COLUMNS, rows)


ENGINE_COLUMNS = columns("sq", "name", "value")
QUERIES_COLUMNS = columns("".join(t for _, t in queries.QUERIES_COLUMNS_SPEC),
                          *(n for n, _ in queries.QUERIES_COLUMNS_SPEC))


def show_engine(pooler: Pooler) -> Result:
    """SHOW ENGINE (pgmux): the compiled data path's counters in this process (batches of ready
    sockets, reads, reads done natively, escapes to Python)."""
    return _rows(ENGINE_COLUMNS, [[name, value] for name, value in pooler.engine.stats().items()])


def show_queries(pooler: Pooler) -> Result:
    """SHOW QUERIES (pgmux): per (database, user, normalized statement), the most total time first."""
    return _rows(QUERIES_COLUMNS, queries.show_rows(pooler.engine.qstats.export()))


def show_help(pooler: Pooler) -> Result:
    notice = m.message(b"N", b"SNOTICE\0C00000\0MConsole usage\0D" + HELP_DETAIL.encode() + b"\0\0")
    return Result("SHOW", notices=[notice])


def show_fds(pooler: Pooler) -> Result:
    # SHOW FDS hands sockets to a new PgBouncer started with -R. pgmux cannot hand its sockets over,
    # and an empty answer would make the new process take over nothing: refuse instead.
    raise AdminError("SHOW FDS is not supported: pgmux has no online restart (-R); use so_reuseport")


def fake_show(name: str) -> Result:
    key = name.lower()
    return _rows(columns("s", key), [[FAKE_PARAMS[key]]])


# ------------------------------------------------------------------ across workers (`workers = N`)

#: SHOW commands answered for pgmux as a whole when workers > 1: the asking worker gathers each
#: sibling's `worker_part` (plain data, pgmux/workers.py) and `merged_show` adds them up.
STATS_SHOWS = frozenset({"stats", "stats_totals", "stats_averages", "totals"})
MERGED_SHOWS = STATS_SHOWS | {"pools", "lists", "databases", "users", "queries", "pins"}
# SHOW LISTS rows that count this worker's objects (summed); the others count names (max).
_SUMMED_LISTS = frozenset({"free_clients", "used_clients", "login_clients", "free_servers", "used_servers"})


#: Not a SHOW: asked of every worker by RESET QUERIES through the same channel (pgmux/workers.py).
RESET_QUERIES = "reset_queries"
#: Not a SHOW either: the dashboard's query-time histogram (pgmux/stats/dashboard.py).
QUERY_HIST = "query_hist"
#: What a worker answers a sibling's gather with (worker_part).
GATHERED = MERGED_SHOWS | {RESET_QUERIES, QUERY_HIST}


def worker_part(pooler: Pooler, name: str) -> Any:
    """This worker's share of a merged SHOW, as JSON-able data. For the stats family: the raw
    counters per database, so that averages can be recomputed from summed deltas."""
    if name in STATS_SHOWS:
        tracker = pooler.admin_state().tracker
        dbs = counters.group_by_database(stat_sources(pooler), tracker)
        return {"dur": counters.now_us() - tracker.old_stamp,
                "dbs": [[db, list(cur), list(old)] for db, cur, old in dbs]}
    if name == "queries":
        return queries.worker_part(pooler.engine.qstats.export(hist=True))
    if name == RESET_QUERIES:
        pooler.engine.qstats.reset()
        return []
    if name == QUERY_HIST:
        from pgmux.stats.dashboard import query_histogram

        return query_histogram(pooler)
    return SHOW_FUNCTIONS[name](pooler).rows


def merged_show(name: str, parts: list[Any]) -> Result:
    """The answer to SHOW `name` from every worker's `worker_part` (the asking worker's first):
    same columns and row order as one worker's answer, counts summed per row."""
    if name in STATS_SHOWS:
        return _merged_stats(name, parts)
    if name == "queries":
        return _rows(QUERIES_COLUMNS, queries.show_rows(queries.merge(parts)))
    if name == "pins":
        return _rows(PINS_COLUMNS, sorted((row for part in parts for row in part), key=lambda row: row[5]))
    if name == "pools":
        # cl_* and sv_* summed; maxwait the longest wait of any worker; mode columns as the first.
        return _rows(POOLS_COLUMNS, _merge_rows(parts, 2, range(2, 13), longest=(13, 14)))
    if name == "databases":
        return _rows(DATABASES_COLUMNS, _merge_rows(parts, 1, (12, 14)))
    if name == "users":
        return _rows(USERS_COLUMNS, _merge_rows(parts, 1, (5, 7)))
    if name == "lists":
        merged: dict[str, int] = {}
        for part in parts:
            for list_name, n in part:
                old = merged.get(list_name)
                merged[list_name] = n if old is None else old + n if list_name in _SUMMED_LISTS else max(old, n)
        return _rows(LISTS_COLUMNS, [[k, v] for k, v in merged.items()])
    raise ValueError(f"SHOW {name} is not merged across workers")


def _merge_rows(parts: list[Any], key_len: int, summed: Iterable[int],
                longest: tuple[int, int] | None = None) -> list[list[Value]]:
    """Rows keyed by their first `key_len` columns, in key order: `summed` columns added up, the
    `longest` (seconds, microseconds) pair the largest, every other column as the first worker has it."""
    cols = list(summed)
    out: dict[tuple[Any, ...], list[Value]] = {}
    for part in parts:
        for row in part:
            key = tuple(row[:key_len])
            have = out.get(key)
            if have is None:
                out[key] = list(row)
                continue
            for i in cols:
                have[i] = int(have[i] or 0) + int(row[i] or 0)
            if longest is not None:
                a, b = longest
                if (row[a], row[b]) > (have[a], have[b]):
                    have[a], have[b] = row[a], row[b]
    return [out[k] for k in sorted(out)]


def _merged_stats(name: str, parts: list[Any]) -> Result:
    by_db: dict[str, list[tuple[counters.Snapshot, counters.Snapshot, int]]] = {}
    totals: list[tuple[counters.Snapshot, counters.Snapshot, int]] = []
    for part in parts:
        cur_total, old_total = counters.ZERO, counters.ZERO
        for db, cur, old in part["dbs"]:
            cur, old = tuple(cur), tuple(old)
            by_db.setdefault(db, []).append((cur, old, part["dur"]))
            cur_total, old_total = counters.add(cur_total, cur), counters.add(old_total, old)
        totals.append((cur_total, old_total, part["dur"]))
    if name == "totals":
        return _totals_result(_sum_snapshots(c for c, _, _ in totals), counters.merged_averages(totals))
    stats = [(db, _sum_snapshots(c for c, _, _ in rows), counters.merged_averages(rows))
             for db, rows in sorted(by_db.items())]
    return _stats_result(name, stats)


#: name -> function; `fds` needs admin rights (checked by the caller).
SHOW_FUNCTIONS: dict[str, Callable[[Pooler], Result]] = {
    "clients": show_clients,
    "config": show_config,
    "databases": show_databases,
    "fds": show_fds,
    "help": show_help,
    "lists": show_lists,
    "peers": show_peers,
    "peer_pools": show_peer_pools,
    "pools": show_pools,
    "servers": show_servers,
    "sockets": show_sockets,
    "active_sockets": show_active_sockets,
    "stats": show_stats,
    "stats_totals": show_stats_totals,
    "stats_averages": show_stats_averages,
    "users": show_users,
    "version": show_version,
    "totals": show_totals,
    "mem": show_mem,
    "dns_hosts": show_dns_hosts,
    "dns_zones": show_dns_zones,
    "state": show_state,
    "pins": show_pins,
    "engine": show_engine,
    "queries": show_queries,
}
