"""A client connection: startup and authentication, then the client-to-server half of the data path."""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from pgmux import log as pglog
from pgmux.auth import ScramError, ScramServer, SecretKind, md5_verify, plain_verify, secret_kind
from pgmux.auth.external import LdapOptions, LdapOptionsError, ldap_authenticate, pam_authenticate, parse_ldap_options
from pgmux.auth.scram import engine_offer
from pgmux.auth.secrets import md5_inner, random_bytes
from pgmux.engine._login import ScramLogin
from pgmux.engine._ossl import sha256_available
from pgmux.errors import ClientError, ConnectionLost
from pgmux.net.base import PgConnection, SharedReadBuffer
from pgmux.net.peercred import peer_credentials
from pgmux.net.tls import ALPN_POSTGRESQL
from pgmux.net.tls import describe as tls_describe
from pgmux.protocol import messages as m
from pgmux.protocol.prepared import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    PASS,
    SKIP,
    KeepClientName,
    PreparedError,
    Restore,
    Statement,
    close_message,
    rewrite_named,
    split_cstring,
    split_parse,
)
from pgmux.protocol.scanner import scan, type_table
from pgmux.protocol.sessionstate import database_ddl_targets, hint
from pgmux.protocol.varcache import ParamSet

if TYPE_CHECKING:
    from pgmux.config import DatabaseEntry
    from pgmux.net.server import ServerConnection
    from pgmux.pool.pool import Pool
    from pgmux.pooler import Pooler

# Terminate must be seen whole (it is never forwarded). Requests that will be answered by a
# ReadyForQuery (Query, Sync, FunctionCall) are counted, and extended-protocol messages mark the
# server busy until the next Sync: together they decide when a transaction-mode server is free.
CLIENT_NEED_BODY = type_table("XQPC")  # P: a named Parse turns on prepared-statement tracking
# (C: a Close must not name one of pgmux's own statements, see RESERVED_PREFIX)
# Before tracking starts (lazy_prepare), a Bind or Describe naming a statement is refused unless
# the client is pinned (_names_unknown_statement): they are read whole then too.
CLIENT_NEED_BODY_LAZY = type_table("XQPCBD")
# Message types a client may send after login; any other one is refused before it reaches a
# server (PostgreSQL would answer it with FATAL, which would then hit the server's next client).
CLIENT_TYPES = b"BCdcfDEHFPQSX"
_UNKNOWN = bytes(sorted(set(range(256)) - set(CLIENT_TYPES)))
# CopyDone / CopyFail end COPY IN, during which PostgreSQL ignores Syncs (not CopyData: rows stream).
CLIENT_NOTIFY = type_table(b"QSFPBDEcf" + _UNKNOWN)
# With prepared-statement tracking, statement messages are read whole (names are rewritten) and so
# are simple queries (a DEALLOCATE of a protocol-level statement is answered here).
TRACKED_NEED_BODY = type_table("XPBDCQ")
TRACKED_NOTIFY = type_table(b"SFEcf" + _UNKNOWN)
_UNKNOWN_SET = frozenset(_UNKNOWN)
_BDE = frozenset(b"BDE")
_P, _B, _D, _C, _E = (ord(x) for x in "PBDCE")
_COPY_END = (m.COPY_DONE, m.COPY_FAIL)
_STMT = ord("S")
# pgmux's own server-side statements are PGMUX_<n> (prepared.StatementRegistry): no client may
# create, replace or drop a statement so named on a pooled server.
RESERVED_PREFIX = b"PGMUX_"
RESERVED_MESSAGE = 'prepared statement names starting with "PGMUX_" are reserved for pgmux'
RESERVED_SQLSTATE = "42939"  # reserved_name
_DEALLOCATE = re.compile(rb'\s*deallocate\s+(?:prepare\s+)?("?)([^\s";]+)\1\s*;?\s*$', re.I)
_D_FIRST = b" \t\n\rdD"  # a query that may be a DEALLOCATE starts with one of these
_D_FIRST_B = tuple(bytes([c]) for c in _D_FIRST)
_X = m.TERMINATE
_Q = m.QUERY
_SYNC = m.SYNC
_F = m.FUNCTION_CALL
CLIENT_BUF_SIZE = 4096  # smallest buffer a client owns while it keeps bytes between reads
# what ClientConnection._named_parse decided
_FORWARD, _SWITCH, _HOLD, _REFUSED = range(4)
HOLD_LIMIT = 1 << 20  # bytes buffered for an unlinked client before we stop reading from it
_EVENTS: list[tuple[int, int, int]] = []  # the slow path's header events, emptied after each read


MAX_AUTH_MESSAGE = 65535 + 4  # a password/SASL message's length word included
# How often client_login_timeout is checked (Pooler.login_deadlines), and how soon at the earliest
# it ends a login that was queued past it: PgBouncer's janitor checks logins every third of a
# second (janitor.c full_maint_period), so the rest of such a login (the auth_query, a quick
# password exchange) usually finishes before it is noticed.
LOGIN_RECHECK = 1 / 3
# ClientConnection.login_step: what the login waits for. Below LOGIN_TASK the client's next packet
# (its read runs the step at once); LOGIN_TASK: a Task runs the rest; LOGIN_DONE: over.
LOGIN_STARTUP, LOGIN_MD5, LOGIN_PLAIN, LOGIN_SASL_FIRST, LOGIN_SASL_FINAL, LOGIN_TASK, LOGIN_DONE = range(7)
# ClientConnection._auth_plan: how a client authenticates
_AUTH_DONE, _AUTH_MD5, _AUTH_PLAIN, _AUTH_SCRAM, _AUTH_TASK = range(5)
# Bytes an unauthenticated client may have sent and pgmux not yet read (startup packet and auth
# messages are far smaller): beyond this the client is refused rather than buffered.
LOGIN_INBOX_LIMIT = 1 << 18
# Engine.login_routes holds at most this many distinct StartupMessages (then starts again), each
# at most this long (an application_name may make a packet of 64 KiB)
LOGIN_ROUTES_MAX = 256
LOGIN_ROUTE_KEY_MAX = 1024
PROTOCOL_3_0 = 196608  # a StartupMessage's version word for protocol 3.0
# The engine runs SCRAM exchanges against stored SCRAM secrets in C (OpenSSL's SHA-256 and HMAC)
C_SCRAM = sha256_available()
# What the engine's C login runs after a StartupMessage (engine_startup): the md5 exchange (md5 of
# password + user in hex, then the salt), a SCRAM exchange (auth/scram.py engine_offer), or
# nothing (None: Python's login goes on).
EngineExchange = bytes | tuple[bytes, bytes, bytes] | None


def replication_mode(value: str | None) -> str | None:
    """The startup `replication` value as PgBouncer's set_replication reads it: "database" is
    logical replication, a true boolean (PostgreSQL's spellings) physical; anything else none."""
    if value is None:
        return None
    if value == "database":
        return "logical"
    v = value.strip().lower()
    if v and ("true".startswith(v) or "yes".startswith(v) or v == "1" or (len(v) >= 2 and "on".startswith(v))):
        return "physical"
    return None


class LoginState:
    """What a login in progress knows after its StartupMessage (ClientConnection.login_state)."""

    __slots__ = ("user", "db", "stored", "console", "method", "ident_map", "ldap", "exchange", "route", "welcome_key")

    def __init__(self, user: str, db: DatabaseEntry | None, stored: str | None, console: bool) -> None:
        self.user = user
        self.db = db
        self.stored = stored  # the user's secret: auth_file's, or auth_query's once looked up
        self.console = console
        self.method = ""  # auth_type, or the auth_hba_file rule's
        self.ident_map: str | None = None
        self.ldap: LdapOptions | None = None
        self.exchange: Any = None  # the md5 salt sent, or the ScramServer of the exchange
        # (StartupMessage body, LoginRoute): kept in Engine.login_routes once the password is right
        self.route: tuple[bytes, LoginRoute] | None = None
        # the startup parameters as the pool's welcome cache knows them (a route has them made)
        self.welcome_key: tuple[tuple[str, str], ...] | None = None


def welcome_key(startup_params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Startup parameters as the key of a pool's welcome cache (Pool.welcome_cache)."""
    return tuple(sorted(startup_params.items()))


class LoginRoute:
    """What a plain md5 or SCRAM login against an auth_file secret made of its StartupMessage,
    kept in Engine.login_routes under the packet's body: a later byte-identical packet (same
    user, database and parameters) goes straight to the exchange (engine_route_startup). Valid
    until the next RELOAD, which clears them all (Pooler.apply_config)."""

    __slots__ = ("params", "user", "dbname", "startup_params", "stored", "method", "plan", "inner", "welcome_key")

    def __init__(self, params: dict[str, str], user: str, dbname: str | None, startup_params: dict[str, str],
                 stored: str, method: str, plan: int, inner: bytes) -> None:
        self.params = params  # the StartupMessage's parameters, as the engine read them
        self.user = user
        self.dbname = dbname
        self.startup_params = startup_params  # shared by every login of the route: never written to
        self.stored = stored
        self.method = method  # auth_type
        self.plan = plan  # _AUTH_MD5 or _AUTH_SCRAM
        self.inner = inner  # md5: md5(password + user) in hex, what the engine checks the answer with
        self.welcome_key = welcome_key(startup_params)


class _ReplayHello:
    """An SSLContext stand-in for Engine.start_tls: the TLS object it makes reads `hello` (bytes of
    the ClientHello the startup reader took off the socket) before anything from the socket."""

    __slots__ = ("ctx", "hello")

    def __init__(self, ctx: ssl.SSLContext, hello: bytes) -> None:
        self.ctx = ctx
        self.hello = hello

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | None = None) -> ssl.SSLObject:
        incoming.write(self.hello)
        return self.ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)


class _NoStatements(dict):  # type: ignore[type-arg]
    """The named statements of every client that has none, shared: never written to."""

    def __setitem__(self, key: object, value: object) -> None:
        raise TypeError("NO_STATEMENTS is shared: use ClientConnection.own_statements()")


NO_STATEMENTS: dict[bytes, Statement] = _NoStatements()


class ClientConnection(PgConnection):
    """One client socket. `server` is the linked server connection, if any."""

    # (see PgConnection.__slots__; closed, waiting, linking, write_paused, read_paused, auto,
    # connect_time, wait_started, server, params, tracking, stmts are pgmux.engine.Link fields)
    __slots__ = (
        "pooler", "replication", "replication_options", "login_expired", "is_unix", "tls", "pool", "db", "user",
        "dbname", "startup_params", "addr", "port", "local_addr", "local_port", "logged_in", "admitted",
        "limits_counted", "pool_mode", "cancel_key", "login_task", "login_step", "login_state", "id",
        "client_key",
        "lazy_prepare", "pin_mode", "state_hint", "pinned", "pinned_since", "drain_passed", "awaiting_quiet",
        "authed", "no_pqexec", "wait_notified",
    )
    # Accepted on a socket kept open during a WAIT_FOR_CLIENTS drain for its peers' cancel
    # requests (pgmux/net/listener.py): a login is refused.
    cancel_only = False
    # A client whose first byte opened a TLS record (direct TLS): set by listener.TlsSniffingClient.
    direct_tls_hello = False
    # Its login may be read by the engine in C (Engine._login_read; listener.EngineServer decides).
    c_login = True

    def __init__(self, pooler: Pooler, is_unix: bool = False) -> None:
        super().__init__(0, pooler.loop)  # reads go to SharedReadBuffer; owned only while bytes are kept
        self.max_packet_size = pooler.settings.max_packet_size or 0x7FFFFFFF
        self.linger = True  # an ErrorResponse before a close must reach the client (Engine._end_link)
        self.pooler = pooler
        self.login_expired = False  # client_login_timeout cancelled the login
        self.is_unix = is_unix
        self.tls = False
        self.server: ServerConnection | None = None
        self.pool: Pool | None = None
        self.db: DatabaseEntry | None = None
        self.user: str | None = None
        self.dbname: str | None = None
        self.params = ParamSet(pooler.tracked)
        self.startup_params: dict[str, str] = {}
        self.addr = ""
        self.port = 0
        self.local_addr = ""
        self.local_port = 0
        now = time.monotonic()
        self.connect_time = now  # (SHOW CLIENTS shows it as wall-clock time: stats.clock.wall_of)
        self.request_time = now
        self.wait_started = 0.0
        self.waiting = False
        self.linking = False
        self.logged_in = False
        self.admitted = False  # counted against max_client_conn
        # (database, user, limited) as counted by check_client_limits
        self.limits_counted: tuple[str, str, bool] | None = None
        self.write_paused = False
        self.read_paused = False
        self.pool_mode = "session"
        self.cancel_key = b""
        # the login's Task, if it needs one (_login_step); client_login_timeout: Pooler.login_deadlines
        self.login_task: asyncio.Task[None] | None = None
        self.login_step = LOGIN_STARTUP
        self.login_state: LoginState | None = None
        self.id = pooler.next_client_id()
        self.client_key: bytes | None = None
        self.tracking = False  # prepared statements tracked (transaction/statement mode)
        self.lazy_prepare = False  # may answer a lone Parse+Sync without a server
        # Session pinning (transaction/statement mode): a keyword seen since the last probe, and
        # why this client keeps its server, if it does.
        self.pin_mode = "off"
        self.state_hint: bytes | None = None
        self.pinned: str | None = None
        self.pinned_since = 0.0
        self.drain_passed = False  # the held DROP/CREATE/ALTER DATABASE already had its drain
        self.awaiting_quiet = False  # a named Parse waits for in-flight requests before tracking starts
        self.stmts: dict[bytes, Statement] = NO_STATEMENTS  # this client's named statements (own_statements)
        self.no_pqexec = bool(pooler.settings.disable_pqexec)  # simple Query refused (not reloadable)
        self.authed = False  # authenticated: until then the login inbox is capped (LOGIN_INBOX_LIMIT)
        self.wait_notified = False  # query_wait_notify's NOTICE went out (once per connection, as PgBouncer)
        # "physical" or "logical" for a replication connection (startup `replication`), which gets a
        # server of its own for its whole session; the `options` it sent go to that server as they are.
        self.replication: str | None = None
        self.replication_options: str | None = None

    def __repr__(self) -> str:
        return f"C-{id(self):#x}"

    @property
    def log_prefix(self) -> str:
        return pglog.conn_prefix("C", self, self.dbname, self.user, self.addr, self.port)

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.start(transport, transport.get_extra_info("peername"), transport.get_extra_info("sockname"))

    def start(self, transport: asyncio.BaseTransport, peer: object, local: object) -> None:
        """A new connection on `transport` (an engine transport when the engine accepted it,
        listener.EngineServer), from `peer` to `local`: (host, port, ...) for TCP."""
        self.transport = transport  # type: ignore[assignment]
        if isinstance(peer, tuple):
            self.addr, self.port = sys.intern(peer[0]), peer[1]
        else:
            self.addr, self.port = "unix", 0
        if isinstance(local, tuple):
            self.local_addr, self.local_port = sys.intern(local[0]), local[1]
        pooler = self.pooler
        pooler.client_connected(self)
        timeout = pooler.settings.client_login_timeout
        if timeout:
            pooler.login_deadline(self, self.connect_time + timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.login_step != LOGIN_DONE and self.close_reason is None:
            self.close_reason = "client unexpected eof"
        self._login_over()
        self.pooler.client_gone(self, self.close_reason or "client unexpected eof")
        # The transport refers back to this client (its link): without this, every closed client
        # would wait for the garbage collector (whose collections would then come ever so often).
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True
        s = self.server
        if s is not None and s.transport is not None:
            s.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        s = self.server
        if s is not None and s.transport is not None:
            s.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.keep:
            shared = SharedReadBuffer
            self.buf = shared.buf
            self.mv = mv = shared.mv
            return mv
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.forwarding:
            self.data_path(nbytes)
        else:
            self.inbox += self.mv[self.keep : self.keep + nbytes]
            if not self.authed and len(self.inbox) > LOGIN_INBOX_LIMIT:
                self.fail("client sent too much data during login")
                return
            if self.login_step < LOGIN_TASK:
                self._login_step()
            else:
                self._wake()
        if self.keep:
            self._own_buffer()

    def start_forwarding(self) -> None:
        super().start_forwarding()
        if self.keep:
            self._own_buffer()

    def _own_buffer(self) -> None:
        """Bytes stay for the next read: they must not sit in the shared buffer. An owned buffer
        with little room left is doubled on the next read (PgConnection.get_buffer)."""
        keep = self.keep
        buf = self.buf
        if buf is SharedReadBuffer.buf:
            new = bytearray(max(CLIENT_BUF_SIZE, keep * 2))
            new[:keep] = buf[:keep]
            self.buf = new
            self.mv = memoryview(new)
        elif len(buf) - keep < CLIENT_BUF_SIZE:
            self.grow = True

    # ------------------------------------------------------------ data path: client -> server

    def data_path(self, nbytes: int) -> None:
        end = self.keep + nbytes
        self.request_time = time.monotonic()
        if self.server is None or self.linking:
            # No server yet: hold the bytes until one is linked. A lone Terminate needs no server.
            if self.server is None:
                first = self.buf[0]
                if first == _X and end >= 5:
                    self.close_requested()
                    return
                if first == _P and self.lazy_prepare and self._prepare_locally(end):
                    return
            self.keep = end
            if end >= HOLD_LIMIT and not self.read_paused and self.transport is not None:
                self.read_paused = True
                self.transport.pause_reading()
            if not (self.waiting or self.linking):
                self.pooler.request_server(self)
            return
        self.forward(end)

    def engine_escape(self, data: bytes) -> None:
        """The engine met a message its fast path does not decide (see pgmux/engine/_engine.pxd):
        the link is on the slow path now, and `data` is everything from that message on. Until
        Pooler.link_fast looks at this client again, the engine links and releases it no more."""
        self.auto = False
        self.take_over(data, CLIENT_BUF_SIZE)
        self.data_path(len(data))

    def forward(self, end: int) -> None:
        """Forward buf[0:end] (the first `keep` bytes held from earlier) to the linked server."""
        if self.tracking:
            self._forward_tracked(end)
            return
        self._forward_untracked(end)
        if self.adopted and not self.closed and self.server is not None and not self.linking:
            self.pooler.link_fast(self, self.server)  # back to the engine after an escape

    def _forward_untracked(self, end: int) -> None:
        server = self.server
        assert server is not None
        st = server.transport
        assert st is not None  # linked: the peer is connected
        mv = self.mv
        pos = self._forward_body_rest(end, server)
        if pos < 0:
            return
        events = _EVENTS if not _EVENTS else []  # (one list for every client: idle clients hold none)
        need = CLIENT_NEED_BODY_LAZY if self.lazy_prepare else CLIENT_NEED_BODY
        try:
            stop, self.skip = scan(self.buf, pos, end, need, CLIENT_NOTIFY, events, self.max_packet_size)
        except m.ProtocolError as exc:
            events.clear()
            self.fail(str(exc))
            return
        fwd = stop
        last = -1  # where a Terminate or a message type no client may send starts
        interrupt = switch = False
        if events:
            for typ, start, stop_ in events:
                if typ in _BDE:  # Bind, Describe, Execute: the server is busy until Sync
                    if typ != _E and self.lazy_prepare and self._names_unknown_statement(typ, start, stop_):
                        events.clear()
                        self.fail("prepared statement did not exist")
                        return
                    server.pending_ext = True
                    if typ == _B:
                        self.note_bind(server, self.buf, start + 5, min(stop_, end))
                    elif typ == _E:
                        server.note_execute()
                elif typ in (_Q, _F):
                    if typ == _Q:
                        if self._inspect_query(start + 5, stop_ - 1):
                            fwd = start
                            interrupt = True
                            break
                        server.note_query(self.buf, start + 5, stop_ - 1)
                    server.request_sent(typ)
                elif typ == _SYNC:
                    server.request_sent(_SYNC)
                    server.pending_ext = False
                elif typ == _X or typ in _UNKNOWN_SET:
                    fwd = last = start
                    break
                elif typ == _C:  # a Close of one of pgmux's own statements is refused
                    if self.buf[start + 5] == _STMT and self.buf.startswith(RESERVED_PREFIX, start + 6):
                        events.clear()
                        self.fail(RESERVED_MESSAGE, RESERVED_SQLSTATE)
                        return
                    server.pending_ext = True
                elif typ in _COPY_END:
                    server.copy_end()
                else:  # Parse
                    self.note_parse(server, self.buf, start + 5, stop_)
                    if self.pin_mode != "off":
                        self._hint_parse(bytes(self.buf[start + 5 : stop_]))
                    if self.buf[start + 5] != 0:
                        step = self._named_parse(server, start)
                        if step == _REFUSED:
                            events.clear()
                            return
                        if step != _FORWARD:  # this Parse waits: tracking starts before it
                            fwd = start
                            interrupt = True
                            switch = step == _SWITCH
                            break
                    server.pending_ext = True
            events.clear()
        if fwd:
            st.write(mv[:fwd])
            server.pool.stats.bytes_received += fwd
        self._after_forward(st, fwd, stop, end, last, interrupt)
        if switch:
            self.start_tracking()
            self.forward(self.keep)

    def _names_unknown_statement(self, typ: int, start: int, stop: int) -> bool:
        """Before tracking starts, a Bind or a Describe of a named statement (whole in buf) names one
        this client never prepared through pgmux: PgBouncer closes such a client. A pinned client
        keeps its server, so a statement it prepared with SQL PREPARE is there: forwarded."""
        if self.pinned is not None:
            return False
        body = bytes(self.buf[start + 5 : stop])
        if typ == _B:
            pos = body.find(b"\0") + 1
            if pos == 0:
                return False  # malformed: PostgreSQL answers it
        elif body[:1] == b"S":
            pos = 1
        else:
            return False
        return body.find(b"\0", pos) > pos

    def _named_parse(self, server: ServerConnection, start: int) -> int:
        """A named Parse on the untracked path: from here on the link is tracked, if it can be.
        _SWITCH: nothing is in flight, tracking starts now; _HOLD: requests are in flight, the
        Parse waits for their ReadyForQuery (awaiting_quiet). _FORWARD: untracked, the statement
        goes to this server under the client's name (max_prepared_statements = 0, or unsynced
        messages are in flight, so the tracker cannot start in step) and the probe pins the
        client. _REFUSED: untracked and pin_session_state = off, so the name would reach the
        server's next clients, or the name is one of pgmux's own (RESERVED_PREFIX): the client is
        refused."""
        if self.lazy_prepare and not server.pending_ext:
            if server.outstanding:
                self.linking = self.awaiting_quiet = True
                return _HOLD
            return _SWITCH
        if self.lazy_prepare and self.pin_mode == "off":
            self.fail("prepared statement cannot be tracked: named Parse after unsynced extended-protocol "
                      "messages (pin_session_state = off)", "0A000")
            return _REFUSED
        if self.buf.startswith(RESERVED_PREFIX, start + 5):
            self.fail(RESERVED_MESSAGE, RESERVED_SQLSTATE)
            return _REFUSED
        self.lazy_prepare = False
        if self.pin_mode != "off":
            self.note_hint(b"parse")
        return _FORWARD

    def _hint_parse(self, body: bytes) -> None:
        """Pinning hint from the query text of a Parse message body."""
        text_start = body.find(b"\0") + 1
        word = hint(body[text_start : body.find(b"\0", text_start)])
        if word is not None:
            self.note_hint(word)

    def note_hint(self, word: bytes) -> None:
        """Remember that this transaction may have touched session state; two different keywords
        make it `mixed`, so the pooler runs the full probe."""
        old = self.state_hint
        self.state_hint = word if old is None or old == word else b"mixed"
        self.auto = False  # the probe decides at the end of this transaction

    def start_tracking(self) -> None:
        """Track prepared statements on this link from now on (nothing is in flight)."""
        server = self.server
        assert server is not None
        self.tracking = server.tracking = True
        self.auto = False
        server.sent_prefix = server.keep  # the untracked path had forwarded what it retained

    def _after_forward(self, st: asyncio.WriteTransport, fwd: int, stop: int, end: int, last: int,
                       interrupt: bool) -> None:
        """Keep what was not forwarded: an incomplete message, or everything from a query that
        must wait for a database drain. `last` >= 0: the read ended with a Terminate, or with a
        message no client may send (refused: it never reaches the server)."""
        if last >= 0:
            typ = self.buf[last]
            self.skip = 0
            if self.buf is SharedReadBuffer.buf and st.get_write_buffer_size():
                SharedReadBuffer.renew()  # the server's transport still sends from it
            if typ == _X:
                self.close_requested()
            else:
                self.fail(f"unknown pkt from client: {typ}/0x{typ:x}")
            return
        if interrupt:
            self.skip = 0
            stop = fwd
        fresh = st.get_write_buffer_size() > 0
        if stop < end or fresh:
            self.retain(stop, end, fresh)
        else:
            self.keep = 0

    def _inspect_query(self, start: int, stop: int) -> bool:
        """Pinning hints and database drains for the query text in buf[start:stop]. True: stop
        forwarding here; the pooler first closes its connections to a database this query drops
        or copies. The text is copied only when there is something to look for. With
        disable_pqexec the client is refused instead, as PgBouncer does (True as well)."""
        if self.no_pqexec:
            self.fail("PQexec disallowed")
            return True
        buf = self.buf
        if self.drain_passed:
            self.drain_passed = False
        elif buf.find(b"atabase", start, stop) >= 0 or buf.find(b"ATABASE", start, stop) >= 0:
            targets = database_ddl_targets(bytes(buf[start:stop]))
            if targets:
                self.linking = True
                self.pooler.start_drain(self, targets)
                return True
        if self.pin_mode != "off":
            word = hint(bytes(buf[start:stop]))
            if word is not None:
                self.note_hint(word)
        return False

    def _forward_body_rest(self, end: int, server: ServerConnection) -> int:
        """Forward the rest of a message body that began in an earlier read (`skip`). Returns
        where the next header starts, or -1 when the whole read was body."""
        skip = self.skip
        if not skip:
            return 0
        st = server.transport
        assert st is not None  # linked: the peer is connected
        if skip >= end:
            self.skip = skip - end
            st.write(self.mv[:end])
            server.pool.stats.bytes_received += end
            if st.get_write_buffer_size():
                self.retain(end, end, True)
            else:
                self.keep = 0
            return -1
        self.skip = 0
        return skip

    def _forward_tracked(self, end: int) -> None:
        """forward() with prepared statements: statement messages are rewritten, dropped or
        preceded by an injected Parse, and every request is recorded in the server's tracker."""
        server = self.server
        assert server is not None
        st = server.transport
        assert st is not None  # linked: the peer is connected
        mv = self.mv
        buf = self.buf
        pos = self._forward_body_rest(end, server)
        if pos < 0:
            return
        events = _EVENTS if not _EVENTS else []  # (one list for every client: idle clients hold none)
        try:
            stop, self.skip = scan(buf, pos, end, TRACKED_NEED_BODY, TRACKED_NOTIFY, events, self.max_packet_size)
        except m.ProtocolError as exc:
            events.clear()
            self.fail(str(exc))
            return
        tracker = server.tracker
        out: list[bytes | memoryview] = []
        run = 0
        fwd = stop
        last = -1
        interrupt = False
        try:
            for typ, start, stop_ in events:
                replacement: bytes | None = None
                if tracker.skipping and typ != _SYNC and typ != _X:
                    # After an error PostgreSQL ignores everything up to Sync: drop it here, so
                    # nothing is prepared, closed, counted or answered on its behalf.
                    out.append(mv[run:start])
                    run = stop_
                    continue
                if typ == _Q:
                    if self._inspect_query(start + 5, stop_ - 1):
                        fwd = start
                        interrupt = True
                        break
                    undo = None
                    if buf[start + 5] in _D_FIRST:
                        replacement, undo = self._rewrite_deallocate(_Q, bytes(buf[start + 5 : stop_]), server)
                    server.note_query(buf, start + 5, stop_ - 1)
                    server.request_sent(_Q)
                    tracker.request(_Q, PASS, undo)
                elif typ == _SYNC:
                    server.request_sent(_SYNC)
                    server.pending_ext = False
                    tracker.request(_SYNC)
                elif typ == _F:
                    server.request_sent(_F)
                    tracker.request(_F)
                elif typ == _X or typ in _UNKNOWN_SET:
                    fwd = last = start
                    break
                elif typ == _E:
                    server.pending_ext = True
                    server.note_execute()
                    tracker.request(_E)
                elif typ in _COPY_END:
                    server.copy_end()
                else:
                    server.pending_ext = True
                    if typ == _P:
                        self.note_parse(server, buf, start + 5, stop_)
                    elif typ == _B:
                        self.note_bind(server, buf, start + 5, stop_)
                    replacement = self._statement_message(typ, bytes(buf[start + 5 : stop_]), server)
                if replacement is not None:
                    out.append(mv[run:start])
                    if replacement:
                        out.append(replacement)
                    run = stop_
        except PreparedError as exc:
            events.clear()
            self.fail(str(exc))
            return
        events.clear()
        if out:
            out.append(mv[run:fwd])
            data: bytes | memoryview = b"".join(out)
        else:
            data = mv[:fwd]
        if data:
            st.write(data)
            server.pool.stats.bytes_received += len(data)
        self._after_forward(st, fwd, stop, end, last, interrupt)

    def _prepare_locally(self, end: int) -> bool:
        """A lone Parse + Sync outside a transaction (libpq's PQprepare) is answered without a
        server: the statement is prepared on whichever server its first Bind lands on, so any
        error shows there. Without this, a client blocked in PQprepare while another of the same
        thread holds a server (pgbench -M prepared) would wait for a server forever."""
        buf = self.buf
        if end < 15:
            return False
        parse_end = 1 + m.unpack_length(buf, 1)
        if parse_end + 5 != end or buf[parse_end] != _SYNC or m.unpack_length(buf, parse_end + 1) != 4:
            return False
        try:
            name, tail = split_parse(bytes(buf[5:parse_end]))
        except PreparedError:
            return False  # malformed: the data path refuses it once a server is linked
        if not name or name in self.stmts:
            return False
        self.note_parse(None, buf, 5, parse_end)
        self.own_statements()[name] = self.pooler.statements.get(tail)
        self.auto = False  # statements to track from now on: links go through Pooler.link_fast
        assert self.pool is not None
        self.pool.stats.client_parse_count += 1
        self.keep = 0
        self.write(PARSE_COMPLETE + m.READY_FOR_QUERY_IDLE)
        return True

    def _statement_message(self, typ: int, body: bytes, server: ServerConnection) -> bytes | None:
        """Parse/Bind/Describe/Close: None to forward as is, else the bytes to send instead."""
        tracker = server.tracker
        if typ == _P:
            name, tail = split_parse(body)
            if self.pin_mode != "off":
                self._hint_parse(body)
            if not name:
                replacement = undo = None
                if tail[:1] in _D_FIRST_B:
                    replacement, undo = self._rewrite_deallocate(_P, body, server)
                tracker.request(_P, PASS, undo)
                return replacement
            if name in self.stmts:
                raise PreparedError("prepared statement name is already in use")
            stmt = self.pooler.statements.get(tail)
            self.own_statements()[name] = stmt
            self.auto = False
            self.pooler.stats_parse(server, client_side=True)
            if server.stmts.has(stmt):
                self._answer_now(tracker.fake(_P, PARSE_COMPLETE, (self.stmts, name, stmt)))
                return b""
            return self._prepare_on(server, stmt, (stmt, server.stmts, self.stmts, name))
        if typ == _C:
            if body[:1] != b"S":
                tracker.request(_C)
                return None
            name, _ = split_cstring(body, 1)
            if not name:
                tracker.request(_C)
                return None
            closed = self.stmts.pop(name, None)
            keep = KeepClientName(self.stmts, name, closed) if closed is not None else None
            self._answer_now(tracker.fake(_C, CLOSE_COMPLETE, keep))
            return b""
        if typ == _B:
            _, name_pos = split_cstring(body)
        elif body[:1] == b"S":  # Describe of a statement
            name_pos = 1
        else:
            tracker.request(typ)
            return None
        name, _ = split_cstring(body, name_pos)
        if not name:
            tracker.request(typ)
            return None
        known = self.stmts.get(name)
        if known is None:
            raise PreparedError("prepared statement did not exist")
        stmt = known  # (typed Statement: the Parse branch above binds stmt too)
        before = b""
        if not server.stmts.has(stmt):
            before = self._prepare_on(server, stmt, None)
        if typ == _B:
            self.pooler.stats_bind(server)
        tracker.request(typ)
        return before + rewrite_named(bytes([typ]), body, name_pos, len(name), stmt.server_name)

    def _prepare_on(self, server: ServerConnection, stmt: Statement, parse_of: tuple | None) -> bytes:
        """Parse `stmt` on this server (evicting its least recently used statements past
        max_prepared_statements). `parse_of` is set when the client's own Parse is forwarded;
        otherwise the Parse is pgmux's and its ParseComplete is swallowed."""
        tracker = server.tracker
        parts = []
        for old in server.stmts.add(stmt):
            parts.append(close_message(old.server_name))
            tracker.request(_C, SKIP, Restore(old, server.stmts))  # restored if the server skips it
        parts.append(stmt.parse_message())
        tracker.request(_P, PASS if parse_of is not None else SKIP, (stmt, server.stmts, self.stmts, None)
                        if parse_of is None else parse_of)
        self.pooler.stats_parse(server, client_side=False)
        return b"".join(parts)

    def _rewrite_deallocate(self, typ: int, body: bytes, server: ServerConnection) -> tuple[bytes | None,
                                                                                           Restore | None]:
        """SQL `DEALLOCATE name` (a simple Query, or an unnamed Parse as older psycopg sends it) of a
        protocol-level statement: the server knows it as PGMUX_<n>, so deallocate that one
        (preparing it first if this server lacks it). None: forward the message as it is. Also
        returns the request's tracker payload: if the DEALLOCATE fails (e.g. in an aborted
        transaction) the statement is still on the server and is recorded again."""
        text_pos = 0 if typ == _Q else body.find(b"\0") + 1
        if len(body) - text_pos > 200 or (typ == _P and text_pos != 1):
            return None, None
        text_end = body.find(b"\0", text_pos)
        match = _DEALLOCATE.match(body[text_pos:text_end])
        if match is None or match.group(2) not in self.stmts:
            return None, None
        stmt = self.stmts.pop(match.group(2))
        had = server.stmts.has(stmt)
        before = b"" if had else self._prepare_on(server, stmt, None)
        server.stmts.discard(stmt)
        server.tracker.own_deallocs += 1
        return (before + rewrite_named(bytes([typ]), body, text_pos, text_end - text_pos,
                                       b'DEALLOCATE "' + stmt.server_name + b'"'),
                Restore(stmt if had else None, server.stmts, dealloc=True))

    def _answer_now(self, answer: bytes | None) -> None:
        if answer is not None:
            self.write(answer)

    def engine_queued(self) -> None:
        """The engine queued this client (no idle server) and the pool may grow."""
        if self.pool is not None:
            self.pooler.launch_connects(self.pool)

    def resume_held(self) -> None:
        """A server was just linked: forward what arrived meanwhile, and read again."""
        self.reclaim()  # what the engine held while this client waited
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        if self.keep and self.server is not None:
            self.forward(self.keep)

    # ------------------------------------------------------------ login

    # The login runs here, step by step as the client's packets arrive (`login_step`), with no
    # Task, Future or coroutine of its own: StartupMessage, the md5 or SCRAM exchange, welcome.
    # Whatever has to wait on something other than this client (TLS, auth_query, LDAP/PAM, a
    # pool's first server, the console) continues in a Task (_continue_in_task), through the
    # same steps in their async form.

    def _login_step(self) -> None:
        """The client sent more during its login: take what the current step waits for."""
        try:
            while self.login_step < LOGIN_TASK:
                if self.login_step == LOGIN_STARTUP:
                    pkt = self._startup_or_tls()
                    if pkt is None:
                        return
                    self._after_startup(pkt)
                    continue
                body = self._take_password()
                if body is None:
                    return
                state = self.login_state
                assert state is not None
                step = self._exchange_step(state, self.login_step, body)
                if step == LOGIN_DONE:
                    self._after_auth(state)
                else:
                    self.login_step = step
        except BaseException as exc:  # noqa: BLE001 - as in a login Task: see _login_error
            self._login_error(exc)

    def _startup_or_tls(self) -> m.StartupPacket | None:
        """The StartupMessage (or CancelRequest) once all of it came; SSL/GSS requests answered
        N, or TLS started in a Task that then goes on with the login (None then, as when more
        bytes are needed)."""
        if self.direct_tls_hello:
            self._continue_in_task(self.login())
            return None
        while True:
            pkt = self._take_startup_packet()
            if pkt is None or not (pkt.is_ssl_request or pkt.is_gssenc_request):
                return pkt
            ctx = self._tls_for(pkt)
            if ctx is not None:
                self._continue_in_task(self._login_over_tls(ctx))
                return None

    def _take_startup_packet(self) -> m.StartupPacket | None:
        """The next untyped packet, if the inbox holds all of it."""
        inbox = self.inbox
        if len(inbox) < 4:
            return None
        length = m.startup_packet_length(bytes(inbox[:4]), self.max_packet_size)
        if len(inbox) < length:
            return None
        pkt = m.parse_startup_packet(bytes(inbox[:length]))
        del inbox[:length]
        return pkt

    def _tls_for(self, pkt: m.StartupPacket) -> ssl.SSLContext | None:
        """An SSLRequest or GSSENCRequest: the context to start TLS with, or None (N answered)."""
        if self.inbox:
            # Bytes sent before our answer would be read as if encrypted later
            # (CVE-2021-23214 class): refuse them.
            raise m.ProtocolError("unexpected data after SSL request")
        ctx = self.pooler.tls.client
        if pkt.is_gssenc_request or ctx is None or self.tls or self.is_unix:
            self.write(b"N")
            return None
        return ctx

    def _take_password(self) -> bytes | None:
        """A PasswordMessage (password or SASL) once all of it came. Before authentication nobody
        gets to make pgmux hold a max_packet_size message: PostgreSQL's own limit for a password
        or SASL message (PG_MAX_AUTH_TOKEN_LENGTH)."""
        msg = self.take_message(MAX_AUTH_MESSAGE)
        if msg is None:
            return None
        if msg[0] != m.PASSWORD:
            raise m.ProtocolError("unknown pkt")
        return msg[1]

    async def _read_password(self) -> bytes:
        while (body := self._take_password()) is None:
            await self._wait_data()
        return body

    def _after_startup(self, pkt: m.StartupPacket, engine_md5: bool = False, route_key: bytes | None = None
                       ) -> EngineExchange:
        """A StartupMessage: the checks, then authentication, by the client's steps where it
        can be (md5, SCRAM against a known secret, trust), else in a Task. `engine_md5`: the
        engine's C login read the packet and may check an md5 answer itself; for an md5 login
        against a known secret it gets md5(password + user) in hex and the salt, and sends the
        challenge (else None: the login goes on here). `route_key`: the packet's body, under
        which such a login is kept for the next identical packet (LoginRoute)."""
        state = self._startup(pkt)
        if state is None:
            return None
        plan = _AUTH_TASK if state.console else self._auth_plan(state)
        if engine_md5 and state.stored and plan in (_AUTH_MD5, _AUTH_SCRAM):
            inner = md5_inner(state.stored, state.user) if plan == _AUTH_MD5 else b""
            if route_key is not None and len(route_key) <= LOGIN_ROUTE_KEY_MAX and self._routable(state):
                state.route = (route_key, LoginRoute(dict(pkt.params), state.user, self.dbname, self.startup_params,
                                                     state.stored, state.method, plan, inner))
            if plan == _AUTH_MD5:
                return self._md5_challenge(state, inner)
            offer = self._scram_offer(state)
            if offer is not None:
                return offer
        if plan == _AUTH_TASK:
            self._continue_in_task(self._authenticate_and_finish(state, plan))
        elif plan == _AUTH_DONE:
            self.write_later(m.AUTHENTICATION_OK)
            self._after_auth(state)
        else:
            self.login_step = self._start_exchange(state, plan)
        return None

    def _routable(self, state: LoginState) -> bool:
        """Whether what this login made of its StartupMessage holds for any later identical one
        until the next RELOAD: everything but the checks _admit and _login_state repeat."""
        settings = self.pooler.settings
        # (not under auth_type = hba: a rule depends on the address, the socket and TLS too)
        return (self.replication is None and state.method in ("md5", "scram-sha-256") and not state.console
                and settings.auth_type == state.method and not settings.application_name_add_host)

    def _keep_route(self, key: bytes, route: LoginRoute) -> None:
        routes = self.pooler.engine.login_routes
        if len(routes) >= LOGIN_ROUTES_MAX:
            routes.clear()
        routes[key] = route

    def _scram_offer(self, state: LoginState) -> tuple[bytes, bytes, bytes] | None:
        """A SCRAM exchange against a stored SCRAM secret, for the engine to run in C (its keys and
        the end of its server-first-message); None: Python's exchange runs it (a plaintext
        secret, or no SHA-256/HMAC in C)."""
        if not C_SCRAM or state.stored is None:
            return None
        offer = engine_offer(state.stored)
        if offer is not None:
            state.exchange = None  # (the engine's: engine_login_escape makes Python's if it hands over)
            self.login_step = LOGIN_SASL_FIRST
        return offer

    def _md5_challenge(self, state: LoginState, inner: bytes) -> bytes:
        """The md5 exchange the engine runs: md5(password + user) in hex, then a new salt."""
        salt = random_bytes(4)
        state.exchange = salt
        self.login_step = LOGIN_MD5
        return inner + salt

    # The engine's C login (Engine._login_read) reads a plain client's StartupMessage and checks an
    # md5 answer itself; these are the calls it makes. Everything else it hands over as bytes.

    def engine_startup(self, code: int, params: dict[str, str], route_key: bytes | None = None) -> EngineExchange:
        """The engine read a StartupMessage: _after_startup, which may leave the md5 exchange to it.
        `route_key`: the packet's body (protocol 3.0), for Engine.login_routes."""
        try:
            return self._after_startup(m.StartupPacket(code, params=params), engine_md5=True, route_key=route_key)
        except BaseException as exc:  # noqa: BLE001 - as in _login_step
            self._login_error(exc)
        return None

    def engine_route_startup(self, route: LoginRoute) -> EngineExchange:
        """The engine read a StartupMessage byte for byte like the one `route` was made from: the
        same login, without reading the parameters, the auth plan and the secret again. What may
        differ per login (TLS required on TCP, max_client_conn, shutdown, a disabled database)
        is checked as _startup checks it. md5: the engine runs the exchange (as engine_startup's
        answer says); SCRAM: the exchange goes on here (None)."""
        settings = self.pooler.settings
        if settings.auth_type != route.method or settings.application_name_add_host:
            # (settings changed without apply_config, which empties the routes: the whole login)
            self.pooler.engine.login_routes.clear()
            return self.engine_startup(PROTOCOL_3_0, dict(route.params))
        try:
            self.user = route.user
            self.dbname = route.dbname
            self._admit()
            self.startup_params = route.startup_params
            state = self._login_state(route.stored)
            state.method = route.method
            state.welcome_key = route.welcome_key
            if route.plan == _AUTH_MD5:
                return self._md5_challenge(state, route.inner)
            offer = self._scram_offer(state)
            if offer is not None:
                return offer
            self.login_step = self._start_exchange(state, route.plan)
        except BaseException as exc:  # noqa: BLE001 - as in _login_step
            self._login_error(exc)
        return None

    def engine_password_checked(self, ok: bool, sasl_final: bytes = b"", client_key: bytes | None = None) -> None:
        """The engine checked the client's answer to the md5 challenge engine_startup asked for,
        or ran the SCRAM exchange to its end: `sasl_final` is then the AuthenticationSASLFinal
        message to send before AuthenticationOk, and `client_key` the client's ClientKey (the
        pool's server logins use it, as after Python's exchange)."""
        state = self.login_state
        if state is None or self.closed:  # (client_login_timeout ended it meanwhile)
            return
        try:
            if not ok:
                raise ClientError("password authentication failed", "28P01")
            if state.route is not None:  # (only a login whose password was right makes a route)
                self._keep_route(*state.route)
            if sasl_final:
                self.write_later(sasl_final)
                self.client_key = client_key
            self.write_later(m.AUTHENTICATION_OK)
            self._after_auth(state)
        except BaseException as exc:  # noqa: BLE001 - as in _login_step
            self._login_error(exc)

    def engine_login_escape(self, data: bytes, exchange: ScramLogin | None = None) -> None:
        """The engine hands the rest of this login to Python: the bytes it had not consumed
        (login_step says what they should be; an md5 challenge sent is in login_state). A SCRAM
        exchange the engine ran so far (`exchange`) goes on in Python's: from the client's first
        message, or after the server-first-message the engine sent."""
        state = self.login_state
        try:
            if exchange is not None and state is not None and state.stored is not None:
                if exchange.server_first is None or exchange.first_bare is None:
                    state.exchange = ScramServer(state.stored, state.user)
                else:
                    state.exchange = ScramServer.resumed(state.stored, state.user, exchange.first_bare,
                                                         exchange.server_first, chr(exchange.flag))
                    self.login_step = LOGIN_SASL_FINAL
        except BaseException as exc:  # noqa: BLE001 - as in _login_step
            self._login_error(exc)
            return
        self.inbox += data
        self._login_step()

    def _after_auth(self, state: LoginState) -> None:
        pool = self._logged_in_to(state)
        if self.replication is None and pool.params is not None:
            self.welcome(pool.params, key=state.welcome_key)
        else:  # the pool's first client waits for a server login; a replication client, for its own
            self._continue_in_task(self._welcome_when_ready(state, pool))

    def _continue_in_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self.login_step = LOGIN_TASK
        self.login_task = self.pooler.loop.create_task(self._login_task(coro))

    async def _login_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """The rest of a login, bounded by client_login_timeout (login_timed_out cancels it)."""
        try:
            await coro
        except asyncio.CancelledError:
            task = self.login_task
            if not self.login_expired or task is None or task.uncancel():
                raise  # cancelled by someone else (the client left, shutdown)
            if self.pool is not None and self.replication is None:
                # authenticated, waiting for the pool's first server (PgBouncer: wait_for_welcome)
                self.fail("client_login_timeout (server down)")
            else:
                self.fail("client_login_timeout")
        except BaseException as exc:  # noqa: BLE001 - see _login_error
            self._login_error(exc)
        finally:
            self.login_task = None  # a finished Task per idle client is memory for nothing
            self._login_over()

    def _login_error(self, exc: BaseException) -> None:
        """How a login ends on an exception: the client is told (FATAL) and closed."""
        if isinstance(exc, ClientError):
            self.fail(str(exc), exc.sqlstate, log=exc.log)
        elif isinstance(exc, m.ProtocolError):
            self.fail(str(exc))
        elif isinstance(exc, ConnectionLost):
            pass
        elif isinstance(exc, Exception):  # never let one client take the process down
            pglog.logger.error("%s unexpected error during login", self.log_prefix, exc_info=exc)
            self.fail("internal error during login", "XX000")
        else:
            raise exc
        self._login_over()

    def _login_over(self) -> None:
        """Logged in, refused, gone, or at the console: client_login_timeout no longer applies."""
        self.login_step = LOGIN_DONE
        self.login_state = None
        self.pooler.login_deadlines.pop(self, None)

    def login_timed_out(self) -> None:
        """client_login_timeout is over (Pooler's login sweep)."""
        task = self.login_task
        if task is not None and not task.done():
            self.login_expired = True
            task.cancel()
        elif self.login_step != LOGIN_DONE and not self.closed:
            self.fail("client_login_timeout")
            self._login_over()

    def login_queued(self, queued: bool) -> None:
        """The login waits in a pool's queue for a server (an auth_query lookup waiting for its
        auth_user's server), or no longer does. PgBouncer's janitor applies client_login_timeout
        only to logins that are not queued (its login_client_list; a queued one has
        query_wait_timeout): the deadline is dropped while queued; afterwards the time since the
        connect counts again, so a login already past client_login_timeout ends at the janitor's
        next pass (LOGIN_RECHECK) unless it is over by then."""
        pooler = self.pooler
        pooler.login_deadlines.pop(self, None)
        timeout = pooler.settings.client_login_timeout
        if not queued and timeout and self.login_step != LOGIN_DONE and not self.closed:
            pooler.login_deadline(self, max(self.connect_time + timeout, time.monotonic() + LOGIN_RECHECK))

    async def read_startup(self) -> m.StartupPacket:
        """Read untyped packets until a StartupMessage (answering SSL/GSS requests with N)."""
        while not self.inbox:  # the first byte tells a ClientHello (direct TLS) from a packet
            await self._wait_data()
        if self.direct_tls_hello:
            await self._start_direct_tls()
        while True:
            pkt = self._take_startup_packet()
            if pkt is None:
                await self._wait_data()
            elif not (pkt.is_ssl_request or pkt.is_gssenc_request):
                return pkt
            elif (ctx := self._tls_for(pkt)) is not None:
                await self._start_tls(ctx)

    async def _start_direct_tls(self) -> None:
        """Direct TLS (PostgreSQL 17's sslnegotiation=direct): the client sent a ClientHello instead
        of an SSLRequest, and its first byte is in the inbox (listener.TlsSniffingClient read no
        more). The handshake starts from that byte with no S answer; a client that did not
        negotiate ALPN `postgresql` is closed without a word, as PostgreSQL 17 closes it."""
        ctx = self.pooler.tls.client
        transport = self.transport
        if ctx is None or transport is None:  # TLS turned off by a RELOAD since the accept
            if transport is not None:
                transport.resume_reading()
            return  # the startup reader refuses the ClientHello as a bad packet
        hello = bytes(self.inbox)
        del self.inbox[:]
        await self._start_tls(ctx, hello)
        obj = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if obj is None or obj.selected_alpn_protocol() != ALPN_POSTGRESQL:
            reason = "received direct SSL connection request without ALPN protocol negotiation extension"
            pglog.logger.warning("%s %s", self.log_prefix, reason)
            self.close(reason)
            raise ConnectionLost()

    async def _start_tls(self, ctx: ssl.SSLContext, hello: bytes = b"") -> None:
        """Answer S and switch this connection to TLS; the next packet is a StartupMessage again.
        The engine takes the socket first and does TLS itself (ssl.SSLObject over MemoryBIOs), so
        the connection can use the fast path once logged in; asyncio's TLS is the fallback.
        `hello`: the start of a ClientHello already read (direct TLS): no S, the TLS engine reads
        those bytes before the socket's."""
        transport = self.transport
        assert transport is not None
        transport.pause_reading()  # no raw ClientHello may reach the startup reader
        engine = self.pooler.engine
        # (accepted by the engine: already its; None: not a socket, an in-process harness)
        new_transport = transport if self.adopted else engine.adopt(self, transport)
        if new_transport is not None:
            self.transport = new_transport
            if not hello:
                new_transport.write(b"S")
            handshake = engine.start_tls(self, _ReplayHello(ctx, hello) if hello else ctx)
            new_transport.resume_reading()
            try:
                await handshake
            except OSError as exc:
                raise ConnectionLost() from exc
            self.tls = True
            return
        if hello:  # asyncio's TLS cannot be given bytes already read
            raise m.ProtocolError("direct TLS needs a socket")
        transport.write(b"S")
        new = await self.pooler.loop.start_tls(transport, self, ctx, server_side=True)
        if new is None:
            raise ConnectionLost()
        self.transport = new  # type: ignore[assignment]
        self.tls = True

    async def _login_over_tls(self, ctx: ssl.SSLContext) -> None:
        await self._start_tls(ctx)
        await self.login()

    async def login(self) -> None:
        """The whole login in a Task (from the first byte: a direct-TLS client's)."""
        state = self._startup(await self.read_startup())
        if state is not None:
            await self._authenticate_and_finish(state)

    def _startup(self, pkt: m.StartupPacket) -> LoginState | None:
        """The checks on a StartupMessage, as far as authentication; None when the login is over
        (a CancelRequest)."""
        pooler = self.pooler
        settings = pooler.settings
        if pkt.is_cancel:
            self.close_reason = "cancel request"
            pooler.handle_cancel(pkt.cancel_pid, pkt.cancel_key)
            self.close("cancel request")
            self._login_over()
            return None
        params = pkt.params
        user = params.get("user")
        if not user:
            raise ClientError("no username supplied")
        # (interned, as the addresses: an idle client holds no string of its own for them)
        self.user = user = sys.intern(user)
        self.dbname = sys.intern(params.get("database") or user)
        self._admit()
        self.replication = replication_mode(params.get("replication"))
        if self.replication is not None:
            # PgBouncer passes a replication client's `options` to its server unchecked.
            self.replication_options = params.pop("options", None)
        self.startup_params = pooler.check_startup_params(params)
        if settings.application_name_add_host:
            name = self.startup_params.get("application_name", "")
            self.startup_params["application_name"] = f"{name} - {self.addr}:{self.port}"
        return self._login_state(pooler.auth_users.get(user))

    def _admit(self) -> None:
        """The checks of a StartupMessage that come before its parameters are read."""
        pooler = self.pooler
        if not self.tls and not self.is_unix and pooler.tls.client_mode in ("require", "verify-ca", "verify-full"):
            raise ClientError("SSL required", "28000")
        if not pooler.admit_client(self) and self.dbname != "pgbouncer":  # (PgBouncer: "dont limit admin db")
            raise ClientError("no more connections allowed (max_client_conn)")

    def _login_state(self, stored: str | None) -> LoginState:
        """The checks of a StartupMessage after its parameters: the login attempt logged, the
        pooler not shutting down, the database not disabled; `stored` is the user's auth_file secret."""
        pooler = self.pooler
        user = self.user
        assert user is not None and self.dbname is not None
        if pooler.settings.log_connections:
            pglog.info(f"{self.log_prefix} login attempt: db={self.dbname} user={user} "
                       f"tls={tls_describe(self.transport)}")
        if pooler.shutting_down and (self.cancel_only or not pooler.draining()):
            raise ClientError("pooler is shutting down")
        db = pooler.config.find_database(self.dbname)
        console = self.dbname == "pgbouncer"
        if db is not None and not console and pooler.admin_db_disabled(db.name):
            raise ClientError(f'database "{db.name}" is disabled')
        state = LoginState(user, db, stored, console)
        self.login_state = state
        return state

    def welcome(self, pool_params: dict[str, str], cache: bool = True,
                key: tuple[tuple[str, str], ...] | None = None) -> None:
        """ParameterStatus (the pool's, with the client's own tracked values), BackendKeyData,
        ReadyForQuery; then switch to the data path. `cache`: pool_params are the pool's, whose
        encoded sets are kept (a replication client is welcomed with its own server's)."""
        pooler = self.pooler
        assert self.pool is not None
        # Clients of a pool mostly ask for the same values: work out each distinct set once (the
        # encoded ParameterStatus messages and the client's tracked values), at most 256 of them.
        if key is None:
            key = welcome_key(self.startup_params)
        welcome_cache = self.pool.welcome_cache
        hit = welcome_cache.get(key) if cache and welcome_cache.get(None) is pool_params else None
        if not cache:
            status = self._welcome_status(pool_params)
        elif hit is not None:
            status, values, startup = hit
            self.params.share(values)
            self.startup_params = startup  # equal by the key: one dict for all of them (read only from here)
        else:
            if welcome_cache.get(None) is not pool_params or len(welcome_cache) > 256:
                welcome_cache.clear()
                welcome_cache[None] = pool_params
            status = self._welcome_status(pool_params)
            template = ParamSet(self.pooler.tracked)
            template.share(self.params)
            welcome_cache[key] = (status, template, self.startup_params)
        out = [status]
        self.cancel_key = pooler.register_cancel_key(self)
        out.append(m.BACKEND_KEY_DATA_HEAD + self.cancel_key)
        out.append(pooler.login_notice)  # login_notify_message's NOTICE (b"" when unset)
        out.append(m.READY_FOR_QUERY_IDLE)
        pooler.adopt(self)  # from here on the engine owns the socket (a TLS client already is its)
        self.write(b"".join(out))
        self.logged_in = True
        self._login_over()
        self.pool.clients.add(self)
        self.pool.stats.client_login_count += 1
        self.start_forwarding()
        pooler.client_ready(self)

    def _welcome_status(self, pool_params: dict[str, str]) -> bytes:
        """Set this client's parameters from the pool's and its startup values; the ParameterStatus
        messages it is sent at login."""
        tracked = self.pooler.tracked
        params = self.params
        for name, value in pool_params.items():
            if name.lower() in tracked:
                params.set(name, value)
        for name, value in self.startup_params.items():
            params.set(tracked.get(name.lower(), name), value)
        parts = []
        sent = set()
        for name, value in pool_params.items():
            v = params.get(name) if name.lower() in tracked else None
            parts.append(m.parameter_status(name, v if v is not None else value))
            sent.add(name.lower())
        for name, value in params.items():
            if name.lower() not in sent:
                parts.append(m.parameter_status(name, value))
        return b"".join(parts)

    def _auth_plan(self, state: LoginState) -> int:
        """How this client authenticates, per auth_type (or its auth_hba_file rule): _AUTH_DONE
        (AuthenticationOk next), an exchange against the secret in hand (_secret_plan), or
        _AUTH_TASK: something to wait for first (LDAP/PAM, an auth_query lookup; the console)."""
        pooler = self.pooler
        method = pooler.settings.auth_type
        user, db = state.user, state.db
        if method == "hba":
            rule = pooler.hba_rule(self, user)
            if rule is None or rule.method == "reject":
                raise ClientError("login rejected", "28000")
            method, state.ident_map, state.ldap = rule.auth_type, rule.map, rule.ldap
        state.method = method
        if method == "any":
            if not (state.console or (db and db.user)):  # any user name, no password: only safe when the
                # pool logs in as its own user (PgBouncer's console database has a fake forced user)
                pglog.logger.error("%s auth_type=any requires forced user", self.log_prefix)
                raise ClientError("bouncer config error", "08P01", log=False)
            return _AUTH_DONE
        if method in ("cert", "peer"):
            self._auth_identity(method, user, state.ident_map)
            return _AUTH_DONE
        if method in ("ldap", "pam"):  # auth_file is not consulted, as in PgBouncer
            return _AUTH_TASK
        if state.stored is None and db is not None and pooler.auth_user_for(db):
            return _AUTH_TASK  # not in auth_file (or only in [users]): auth_query decides whether the user exists
        return self._secret_plan(state)

    @staticmethod
    def _secret_plan(state: LoginState) -> int:
        """The exchange that checks the client against `state.stored` (auth_file or auth_query)."""
        method, stored = state.method, state.stored
        if method == "trust":
            if stored is None:
                raise ClientError('"trust" authentication failed', "28000")
            return _AUTH_DONE
        if method == "plain":
            return _AUTH_PLAIN
        if method in ("md5", "scram-sha-256"):
            kind = secret_kind(stored) if stored is not None else None
            if method == "md5" and kind is not SecretKind.SCRAM:
                return _AUTH_MD5
            if kind is SecretKind.MD5:  # a SCRAM exchange cannot be checked against an md5 secret
                raise ClientError("password authentication failed", "28P01")
            return _AUTH_SCRAM
        raise ClientError("no authentication method is found", "28000")

    def _start_exchange(self, state: LoginState, plan: int) -> int:
        """Send the first authentication request of `plan`: the step that waits for the answer."""
        if plan == _AUTH_MD5:
            salt = random_bytes(4)
            self.write(m.auth_md5(salt))
            state.exchange = salt
            return LOGIN_MD5
        if plan == _AUTH_PLAIN:
            self.write(m.auth_request(m.AUTH_CLEARTEXT))
            return LOGIN_PLAIN
        # An unknown user still goes through a full exchange against a throwaway secret, so
        # the failure reads the same as a wrong password.
        # Secrets built here (from a plaintext password, or the mock) get scram_iterations.
        iterations = self.pooler.settings.scram_iterations
        stored = state.stored
        state.exchange = (ScramServer(stored, state.user, iterations=iterations) if stored
                          else ScramServer.mock(state.user, iterations=iterations))
        self.write(m.auth_sasl(["SCRAM-SHA-256"]))
        return LOGIN_SASL_FIRST

    def _exchange_step(self, state: LoginState, step: int, body: bytes) -> int:
        """The client's answer to the request of `step`: LOGIN_DONE once it is authenticated
        (AuthenticationOk queued), else the next step."""
        user, stored = state.user, state.stored
        if step == LOGIN_MD5:
            response = body.rstrip(b"\0").decode("utf-8", "replace")
            if stored is None or not md5_verify(stored, user, state.exchange, response):
                raise ClientError("password authentication failed", "28P01")
        elif step == LOGIN_PLAIN:
            password = body.rstrip(b"\0").decode("utf-8", "replace")
            if stored is None or not plain_verify(stored, user, password):
                raise ClientError("password authentication failed", "28P01")
        else:
            server = state.exchange
            try:
                if step == LOGIN_SASL_FIRST:
                    mech, data = m.parse_sasl_initial_response(body)
                    if mech != "SCRAM-SHA-256":
                        raise ClientError("client selected an invalid SASL authentication mechanism", "08P01")
                    self.write(m.auth_request(m.AUTH_SASL_CONTINUE, server.handle_client_first(data)))
                    return LOGIN_SASL_FINAL
                final = server.handle_client_final(body)
            except ScramError as exc:
                # PostgreSQL says "password authentication failed" for a wrong SCRAM proof too; so
                # do we (PgBouncer says "SASL authentication failed"), keeping every password
                # failure, and an unknown user, worded the same.
                text = "password authentication failed" if exc.wrong_password else "SASL authentication failed"
                raise ClientError(text, "28P01") from exc
            if not stored:
                raise ClientError("password authentication failed", "28P01")
            self.write(m.auth_request(m.AUTH_SASL_FINAL, final))
            if secret_kind(stored) is SecretKind.SCRAM:
                self.client_key = server.client_key
        self.write_later(m.AUTHENTICATION_OK)
        return LOGIN_DONE

    async def _authenticate_and_finish(self, state: LoginState, plan: int = -1) -> None:
        """The login from authentication on, in a Task (`plan`: _auth_plan's, if already made)."""
        if state.console:
            entry = self.pooler.console_entry
            if entry is None:
                raise ClientError("no such database: pgbouncer", "08P01")
            await entry(self)
            return
        await self.authenticate(state, plan)
        await self._welcome_when_ready(state, self._logged_in_to(state))

    async def authenticate(self, state: LoginState, plan: int = -1) -> None:
        """Check the client per auth_type (or its auth_hba_file rule), against the auth_file secret
        or, for a user missing there, the one auth_query finds; queues AuthenticationOk."""
        if plan < 0:
            plan = self._auth_plan(state)
        if plan == _AUTH_TASK:
            if state.method in ("ldap", "pam"):
                await self._auth_external(state.method, state.user, state.ldap)
                plan = _AUTH_DONE
            else:
                assert state.db is not None
                state.stored = await self.pooler.auth_query_secret(state.db, state.user, self)
                if state.stored is None:
                    if self.pooler.settings.log_connections:
                        pglog.logger.info("%s login failed: db=%s", self.log_prefix, state.db.name)
                    raise ClientError("no such user")
                plan = self._secret_plan(state)
        if plan == _AUTH_DONE:
            self.write_later(m.AUTHENTICATION_OK)
        else:
            step = self._start_exchange(state, plan)
            while step != LOGIN_DONE:
                step = self._exchange_step(state, step, await self._read_password())

    def _logged_in_to(self, state: LoginState) -> Pool:
        """Authenticated: the pool this client is served by, its limits checked."""
        pooler = self.pooler
        settings = pooler.settings
        self.authed = True
        db = state.db
        if db is None:
            raise ClientError(f"no such database: {self.dbname}", "08P01")
        self.db = db
        pool = pooler.get_pool(db, db.user or state.user)
        if self.client_key is not None:
            # Every SCRAM login against a stored SCRAM secret renews the keys the pool's server
            # logins use (PgBouncer copies them at each login): after a password change, the
            # first client with the new password lets the servers log in again.
            pool.scram_client_key = self.client_key
        self.pool = pool
        self.core = pool.core
        self.pool_mode = pool.limits.pool_mode
        self.lazy_prepare = self.pool_mode != "session" and settings.max_prepared_statements > 0
        self.pin_mode = settings.pin_session_state if self.pool_mode != "session" else "off"
        pooler.check_client_limits(self, db, state.user)
        if self.replication is not None:
            self.pool_mode = "session"  # never shared, never released: the server closes with the client
            self.lazy_prepare = False
            self.pin_mode = "off"
        return pool

    async def _welcome_when_ready(self, state: LoginState, pool: Pool) -> None:
        """The welcome once the pool knows its server's parameters (a replication client: once its
        own server logged in)."""
        pooler = self.pooler
        if self.replication is not None:
            assert state.db is not None
            server = await pooler.replication_server(self, pool, state.db)
            self.welcome(server.login_params, cache=False)
            pooler.start_replication(self, server)
            return
        self.welcome(await pooler.pool_params(pool))

    def _auth_identity(self, method: str, user: str, ident_map: str | None) -> None:
        """cert: the TLS client certificate's CN; peer: the Unix user at the other end of the
        socket. Either must equal the user name, or be mapped to it by auth_ident_file."""
        if method == "cert":
            cert = self.transport.get_extra_info("peercert") if self.transport is not None else None
            if not self.tls or not cert:
                raise ClientError("certificate authentication failed", "28000")
            names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            system_user = names[0] if names else ""
            failure = "certificate authentication failed"
        else:
            creds = peer_credentials(self.transport)
            if creds is None:
                raise ClientError("unix socket login rejected", "28000")
            import pwd

            try:
                system_user = pwd.getpwuid(creds[1]).pw_name
            except KeyError as exc:
                raise ClientError("unix socket login rejected", "28000") from exc
            failure = "unix socket login rejected"
        if ident_map:
            if not self.pooler.ident_allows(ident_map, system_user, user):
                raise ClientError(failure, "28000")
        elif system_user != user:
            raise ClientError(failure, "28000")

    async def _auth_external(self, method: str, user: str, options: LdapOptions | None) -> None:
        """ldap or pam: the client's cleartext password, checked in a worker thread. On success it
        becomes the user's password for server logins, as PgBouncer copies it into the user."""
        self.write(m.auth_request(m.AUTH_CLEARTEXT))
        password = (await self._read_password()).rstrip(b"\0").decode("utf-8", "replace")
        pooler = self.pooler
        warning: str | None
        if method == "pam":
            warning = await pam_authenticate(user, password, None if self.is_unix else self.addr)
        else:
            try:  # checked when loaded; an empty auth_ldap_options is the one error left for here
                if options is None:
                    options = parse_ldap_options(pooler.settings.auth_ldap_options or "")
            except LdapOptionsError as exc:
                warning = f"auth_ldap_options: {exc}"
            else:
                warning = await ldap_authenticate(options, user, password)
        if warning is not None:
            pglog.logger.warning("%s %s", self.log_prefix, warning)
            raise ClientError(f"{method.upper()} authentication failed", "08P01")
        pooler.external_passwords[user] = password

    # ------------------------------------------------------------ closing

    def fail(self, message: str, sqlstate: str = "08P01", log: bool = True) -> None:
        """Send a FATAL ErrorResponse and close, as PgBouncer's disconnect_client does."""
        if log and self.pooler.settings.log_pooler_errors:
            pglog.logger.warning("%s pooler error: %s", self.log_prefix, message)
        self.write(m.error_response(message, sqlstate))
        self.close(message)

    def own_statements(self) -> dict[bytes, Statement]:
        """This client's statement dict, made at its first named statement (until then it shares
        NO_STATEMENTS: an idle client holds no dict of its own)."""
        if self.stmts is NO_STATEMENTS:
            self.stmts = {}
        return self.stmts

    def close_requested(self) -> None:
        """The client sent Terminate: nothing is left to tell it, so no lingering close (a FIN
        and a ghost reading what it still sends, Engine._end_link) is needed either."""
        self.linger = False
        self.close("client close request")

    def close(self, reason: str) -> None:
        """Close the socket; from now on the pool treats this client as gone (`closed`)."""
        if self.close_reason is None:
            self.close_reason = reason
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
        self.closed = True
