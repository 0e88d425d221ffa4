"""A server connection: pgmux's login to PostgreSQL, and the server-to-client half of the data path."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING

from pgmux import log as pglog
from pgmux.auth import ScramClient, ScramError, ScramSecret, SecretKind, md5_client_response, secret_kind
from pgmux.errors import ConnectionLost, ServerLoginError
from pgmux.net.base import BUF_SIZE, PgConnection
from pgmux.protocol import messages as m
from pgmux.protocol.prepared import PASS, ResponseTracker, ServerStatements
from pgmux.protocol.scanner import scan, type_table
from pgmux.protocol.varcache import ParamSet

if TYPE_CHECKING:
    from pgmux.net.client import ClientConnection
    from pgmux.pool.pool import Pool
    from pgmux.pooler import Pooler

# Messages whose body the data path reads: ReadyForQuery (transaction status) and
# ParameterStatus (tracked parameters). Everything else is forwarded unread.
SERVER_NEED_BODY = type_table("ZSC")  # C: DISCARD ALL / DEALLOCATE ALL forget prepared statements
# CopyInResponse: Syncs the client sends while the server is in COPY IN get no ReadyForQuery.
SERVER_NOTIFY = type_table("GE")  # E: an error, for per-query statistics
# With prepared-statement tracking every answer that ends a request is read whole, so invented
# answers can be put right after it; DataRows and COPY data still stream through.
TRACKED_NEED_BODY = type_table("ZSCTnE123Is")
TRACKED_NOTIFY = type_table("tGHWV")
_C = m.COMMAND_COMPLETE
_FORGET_ALL_TAGS = (b"DISCARD ALL", b"DEALLOCATE ALL")  # the backend forgot every prepared statement
_G = m.COPY_IN_RESPONSE
_E = m.ERROR_RESPONSE
_Q = m.QUERY
_NOTIFICATION = ord("A")
_Z = m.READY_FOR_QUERY
_S = m.PARAMETER_STATUS
_IDLE = ord("I")
_INTRANS = ord("T")


class ServerConnection(PgConnection):
    """One connection to PostgreSQL, owned by a pool, linked to at most one client at a time."""

    # (see PgConnection.__slots__)
    # The link state (outstanding, pending_ext, status, last_start, copy_in, copy_base,
    # boundary_due, query_start, xact_start, last_used, request_time, connect_time, close_needed,
    # cancels, dirty, read_paused, closed) and client, params, state, tracking, statement_mode,
    # stmts, tracker, sent_prefix are fields of pgmux.engine.Link.
    __slots__ = (
        "pooler", "pool", "addr", "port", "backend_pid", "backend_key", "login_params", "connect_wall", "tls",
        "replication", "local_addr", "local_port", "_events", "id",
    )

    def __init__(self, pooler: Pooler, pool: Pool, addr: str, port: int, sid: int) -> None:
        super().__init__(loop=pooler.loop)
        self.id = sid  # from Pooler.next_client_id(), drawn when the connect was launched
        self.pooler = pooler
        self.pool = pool
        self.link_stats = pool.stats  # what the engine counts this server's traffic in
        self.core = pool.core
        self.addr = addr
        self.port = port
        self.client: ClientConnection | None = None
        self.backend_pid = 0
        self.backend_key = 0
        self.params = ParamSet(pooler.tracked)
        self.login_params: dict[str, str] = {}
        # Requests sent but not answered by ReadyForQuery (Query, Sync, FunctionCall), and
        # whether extended-protocol messages were sent since the last Sync.
        self.outstanding = 0
        self.pending_ext = False
        # COPY IN (see _copy_in): the client side records whether its latest request was a Query
        # or a Sync. copy_in: 1 during COPY IN (PostgreSQL ignores the Syncs the client sends), -1
        # when the client ended a COPY before its CopyInResponse arrived, else 0.
        self.last_start = 0
        self.copy_in = 0
        self.copy_base = 0
        self.boundary_due = False  # the transaction ended but a read cut an async message after it
        self.status = _IDLE
        self.state = "login"
        now = time.monotonic()
        self.connect_time = now
        self.connect_wall = time.time()
        self.last_used = now
        self.request_time = now
        self.query_start = 0.0
        self.xact_start = 0.0
        self.close_needed = False
        self.cancels = 0  # cancel requests for this backend not yet delivered
        self.tls = False
        self.dirty = False  # a pinned client left session state here: reset before reuse
        self.replication: str | None = None  # "physical"/"logical": the dedicated server of a replication client
        self.read_paused = False
        self.local_addr = ""
        self.local_port = 0
        self._events: list[tuple[int, int, int]] = []
        # Prepared statements (transaction/statement mode): what is prepared here, and the
        # requests in flight with what to do with their answers.
        self.tracking = False
        self.statement_mode = False
        self.stmts = ServerStatements(pooler.settings.max_prepared_statements or 0)
        self.tracker = ResponseTracker()
        self.sent_prefix = 0  # bytes at the front of buf already forwarded (tracked path)

    def __repr__(self) -> str:
        return f"S-{id(self):#x}"

    @property
    def log_prefix(self) -> str:
        return pglog.conn_prefix("S", self, self.pool.database, self.pool.user, self.addr, self.port)

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple):
            self.local_addr, self.local_port = sock[0], sock[1]
        else:
            self.local_addr = "unix"

    def buffer_updated(self, nbytes: int) -> None:
        if self.forwarding:
            self.data_path(nbytes)
            return
        self.inbox += self.mv[self.keep : self.keep + nbytes]
        if self._waiter is not None:
            self._wake()
        elif self.state == "idle":
            self._idle_data()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.pooler.server_lost(self, self.close_reason or "server conn crashed?")

    def pause_writing(self) -> None:
        c = self.client
        if c is not None and c.transport is not None:
            c.transport.pause_reading()

    def resume_writing(self) -> None:
        c = self.client
        if c is not None and c.transport is not None:
            c.transport.resume_reading()

    # ------------------------------------------------------------ data path: server -> client

    def data_path(self, nbytes: int) -> None:
        client = self.client
        if client is None:  # unlinked while forwarding: treat as idle data
            self.inbox += self.mv[self.keep : self.keep + nbytes]
            self._idle_data()
            return
        if self.tracking:
            self._data_path_tracked(nbytes, client)
            return
        keep = self.keep
        end = keep + nbytes
        ct = client.transport
        assert ct is not None  # linked: the peer is connected
        ct.write(self.mv[keep:end])  # cut-through: forward before parsing
        self.pool.stats.bytes_sent += nbytes
        pos = self._body_rest(nbytes) if self.skip else 0
        if pos < 0:
            self._keep_rest(end, end, ct)
            if self.boundary_due:
                self._end_of_transaction()
            return
        events = self._events
        buf = self.buf
        stop, self.skip = scan(buf, pos, end, SERVER_NEED_BODY, SERVER_NOTIFY, events)
        self._keep_rest(stop, end, ct)
        if events:
            ready = False
            for typ, start, stop_ in events:
                if typ == _Z:
                    self.ready(buf[start + 5])
                    ready = True
                elif typ == _C:
                    self._command_complete(buf, start, stop_)
                elif typ == _S:
                    self._parameter_status(buf, start, stop_, client)
                elif typ == _E:
                    self.note_error()
                else:  # CopyInResponse
                    self._copy_in()
            events.clear()
            if ready:
                self._end_of_transaction()
                return
        if self.boundary_due:
            self._end_of_transaction()

    def _end_of_transaction(self) -> None:
        """After a ReadyForQuery: with nothing outstanding the link ends (transaction_boundary), but
        only on a message boundary. A notice or ParameterStatus that came after the ReadyForQuery
        and was cut by the read belongs to this client, whose stream already has its start: the
        release waits for its last byte (`boundary_due`)."""
        if self.outstanding or self.pending_ext or (self.tracking and self.tracker.queue):
            self.boundary_due = False  # the client asked again: its next ReadyForQuery decides
            return
        self.copy_in = 0  # a COPY that failed ends without the client's CopyDone
        if self.keep or self.skip:
            self.boundary_due = True
            return
        self.boundary_due = False
        self.pooler.transaction_boundary(self)

    def _data_path_tracked(self, nbytes: int, client: ClientConnection) -> None:
        """The data path while prepared statements are tracked: cut-through as above unless pgmux
        must swallow or invent answers (`tracker.specials`), then message by message."""
        keep = self.keep
        end = keep + nbytes
        ct = client.transport
        assert ct is not None  # linked: the peer is connected
        mv = self.mv
        tracker = self.tracker
        exact = tracker.specials > 0 or self.statement_mode
        if not exact:
            ct.write(mv[self.sent_prefix : end])
        self.pool.stats.bytes_sent += nbytes
        pos = self._body_rest(nbytes) if self.skip else 0
        if pos < 0:
            if exact:
                ct.write(mv[:end])
            self.sent_prefix = 0
            self._keep_rest(end, end, ct)
            if self.boundary_due:
                self._end_of_transaction()
            return
        events = self._events
        buf = self.buf
        stop, self.skip = scan(buf, pos, end, TRACKED_NEED_BODY, TRACKED_NOTIFY, events)
        ready = False
        out: list[bytes | memoryview] = []
        run = self.sent_prefix if exact else 0
        extra: list[bytes] = []
        for typ, start, stop_ in events:
            if typ == _S:
                self._parameter_status(buf, start, stop_, client)
                continue
            if typ == _Z:
                if self.statement_mode and buf[start + 5] == _INTRANS:
                    events.clear()
                    self.pooler.refuse_transaction_block(self)
                    return
                self.ready(buf[start + 5])
                ready = True
            elif typ == _C:
                self._command_complete(buf, start, stop_)
            elif typ == _G:
                self._copy_in()
            elif typ == _E:
                self.note_error()
                self._statement_error(buf, start, stop_)
            forward = tracker.answer(typ, extra)
            if exact:
                if not forward:
                    out.append(mv[run:start])
                    run = stop_
                if extra:
                    out.append(mv[run:stop_])
                    out.extend(extra)
                    run = stop_
            elif extra:  # cannot happen without specials; keep the stream whole regardless
                ct.write(b"".join(extra))
            extra.clear()
        events.clear()
        if exact:
            out.append(mv[run:stop])
            ct.write(b"".join(out))
        self._keep_rest(stop, end, ct)
        self.sent_prefix = 0 if exact else self.keep
        if ready or self.boundary_due:
            self._end_of_transaction()

    def _body_rest(self, nbytes: int) -> int:
        """Where this read's first message header starts, after the rest of a body begun in an
        earlier read; -1 when the whole read is body."""
        skip = self.skip
        if self.keep:
            return 0
        if skip >= nbytes:
            self.skip = skip - nbytes
            return -1
        return skip

    def _keep_rest(self, stop: int, end: int, ct: asyncio.WriteTransport) -> None:
        """Keep an incomplete message for the next read, and the buffer itself while the client's
        transport still holds a view of it."""
        fresh = ct.get_write_buffer_size() > 0
        if stop < end or fresh:
            self.retain(stop, end, fresh)
        else:
            self.keep = 0

    def _parameter_status(self, buf: bytearray, start: int, stop: int, client: ClientConnection) -> None:
        self.engine_parameter_status(bytes(buf[start + 5 : stop]))

    def _command_complete(self, buf: bytearray, start: int, stop: int) -> None:
        """CommandComplete on the slow path: rows for per-query statistics; the tags that forget
        prepared statements start with D."""
        self.note_rows(buf, start + 5, stop)
        if buf[start + 5] == 68:
            self.engine_command_complete(bytes(buf[start + 5 : min(stop, start + 20)]))

    def engine_command_complete(self, tag: bytes) -> None:
        """DISCARD ALL or DEALLOCATE ALL: the server forgot every prepared statement, except the
        ones Parsed after it in the same pipeline (still in the tracker's queue). A DEALLOCATE
        pgmux did not send itself may have dropped one of pgmux's PGMUX_<n> (SQL can name them):
        a server with pgmux's statements is then closed once released. (The engine calls this for
        such tags on a fast link; the slow path through _command_complete.)"""
        if tag.startswith(_FORGET_ALL_TAGS):
            self.stmts.clear()
            if self.client is not None:
                self.client.stmts.clear()
            if self.tracker.queue:
                self.tracker.parsed_later()
        elif tag.startswith(b"DEALLOCATE\0") and not self.tracker.own_deallocate() and self.stmts.lru:
            if not self.close_needed:
                pglog.logger.info("%s client ran DEALLOCATE: pgmux's prepared statements here are no longer "
                                  "known, closing it when released", self.log_prefix)
            self.close_needed = True

    def _statement_error(self, buf: bytearray, start: int, stop: int) -> None:
        """Tracked link: an error about one of pgmux's own statements (PGMUX_<n> missing, or there
        already) means server.stmts no longer matches the backend: close it once released, so no
        other client inherits the mismatch."""
        if buf.find(b"PGMUX_", start, stop) >= 0:  # (quotes vary with lc_messages)
            fields = m.parse_error_fields(bytes(buf[start + 5 : stop]))
            if fields.get("C") in ("26000", "42P05"):
                pglog.logger.warning("%s prepared statements out of step with the server (%s): closing it "
                                     "when released", self.log_prefix, fields.get("M"))
                self.close_needed = True

    def _copy_in(self) -> None:
        """CopyInResponse: PostgreSQL ignores the Syncs it reads during COPY IN, so the ones the
        client sent after the request that started the COPY (libpq sends one right after the
        Execute) will get no ReadyForQuery. Those already counted are uncounted here; the ones sent
        until CopyDone/CopyFail are uncounted then (copy_end). If the client already ended the COPY
        (it did not wait for this answer), which of its Syncs came first is unknown: nothing is
        uncounted, so the server stays with this client rather than being released too early.
        (pgmux.engine.Link.copy_started: the rule the compiled data path applies too.)"""
        before = self.copy_in
        self.copy_started_py()
        if before >= 0 and self.tracker.queue:
            self.tracker.drop_syncs()

    def copy_end(self) -> None:
        """The client sent CopyDone or CopyFail: the Syncs it sent during COPY IN are not answered."""
        before = self.copy_in
        self.copy_end_py()
        if before > 0 and self.tracker.queue:
            self.tracker.drop_syncs()

    @property
    def is_clean(self) -> bool:
        """Idle, outside any transaction, with nothing half sent or half read."""
        return (
            self.status == _IDLE
            and self.outstanding == 0
            and not self.pending_ext
            and self.skip == 0
            and self.keep == 0
            and self.carried == (0, 0)
            and not self.closed
        )

    # ------------------------------------------------------------ engine hooks (fast links)

    def engine_parameter_status(self, body: bytes) -> None:
        """ParameterStatus on a fast link: the tracked values of both sides follow it."""
        name, value = m.parse_parameter_status(body)
        self.params.set(name, value)
        if self.client is not None:
            self.client.params.set(name, value)

    def engine_transaction_end(self) -> None:
        """A ReadyForQuery with nothing outstanding, on a message boundary (the engine checked),
        that the engine could not release by itself."""
        self.pooler.transaction_boundary(self)

    def engine_take_requests(self, kinds: bytes) -> None:
        """The engine forwarded these requests on a tracked link (oldest first) and their answers
        are still to come: they head the tracker's queue, as the slow path would have put them."""
        queue = self.tracker.queue
        if queue:  # cannot happen: the engine takes a tracked link only with an empty queue
            raise RuntimeError("tracker queue not empty when the engine hands requests back")
        queue.extend([kind, PASS, None] for kind in kinds)

    def engine_escape_server(self, data: bytes) -> None:
        """A tracked link met an answer the engine does not account for (an ErrorResponse, a tag
        that forgets statements): the link is on the slow path now. `data`, from that message on,
        already went to the client (cut-through); the tracked path accounts for it here."""
        n = len(data)
        self.take_over(data, BUF_SIZE)
        self.skip = 0
        self.sent_prefix = n
        client = self.client
        if client is None:
            return
        self._data_path_tracked(n, client)

    def engine_server_ready(self) -> None:
        """The engine released this server but cannot link the client waiting first."""
        self.pooler.server_ready(self)

    # ------------------------------------------------------------ idle server

    def _idle_data(self) -> None:
        """Bytes from a server nobody is linked to: ParameterStatus and notices are absorbed; an
        error (e.g. the backend was terminated) or anything else closes it."""
        inbox = self.inbox
        while len(inbox) >= 5:
            length = m.unpack_length(inbox, 1)
            if len(inbox) < length + 1:
                return
            typ = inbox[0]
            body = bytes(inbox[5 : length + 1])
            del inbox[: length + 1]
            if typ == _S:
                self.params.set(*m.parse_parameter_status(body))
            elif typ in (m.NOTICE_RESPONSE, ord("A")):
                continue
            else:
                reason = "server conn crashed?"
                if typ == m.ERROR_RESPONSE:
                    reason = m.parse_error_fields(body).get("M", reason)
                self.close(reason)
                return

    # ------------------------------------------------------------ slow path: login and queries

    async def negotiate_tls(self, ctx: ssl.SSLContext, mode: str, host: str) -> None:
        """SSLRequest to PostgreSQL; switch to TLS on S. With `prefer`/`allow` a plain server is
        accepted; `require` and above refuse it. A negotiation that fails is a failed connect
        (_tls_failed), with PgBouncer's texts (handle_sslchar) where it has one."""
        self.write(m.ssl_request())
        answer = await self.read_exact(1)
        if answer == b"S":
            if self.inbox:  # bytes before the handshake: a man in the middle (CVE-2021-23222 class)
                raise self._tls_failed("received unencrypted data after SSL response")
            if self.adopted:  # the engine does TLS itself (see Pooler._connect)
                try:
                    await self.pooler.engine.start_tls(self, ctx, server_side=False,
                                           server_hostname=host if ctx.check_hostname else None)
                except OSError as exc:
                    raise self._tls_failed(f"server TLS handshake failed: {exc}") from exc
                self.tls = True
                return
            try:
                assert self.transport is not None
                new = await self.pooler.loop.start_tls(
                    self.transport, self, ctx, server_hostname=host if ctx.check_hostname else None)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise self._tls_failed(f"server TLS handshake failed: {exc}") from exc
            if new is None:
                raise ConnectionLost()
            self.transport = new  # type: ignore[assignment]
            self.tls = True
        elif answer == b"N":
            if mode not in ("allow", "prefer"):
                raise self._tls_failed("server refused SSL", detail=f"server_tls_sslmode = {mode}")
        else:
            raise self._tls_failed("bad sslreq answer")

    async def login(self, user: str, database: str, password: str | None, startup: dict[str, str]) -> None:
        """Startup and authentication; collects ParameterStatus and BackendKeyData up to the
        first ReadyForQuery."""
        params = {"user": user, "database": database}
        params.update(startup)
        self.write(m.startup_message(params))
        scram: ScramClient | None = None
        while True:
            typ, body = await self.read_message()
            if typ == m.AUTHENTICATION:
                code, data = m.parse_auth_request(body)
                if code == m.AUTH_OK:
                    continue
                if code == m.AUTH_CLEARTEXT:
                    if password is None or secret_kind(password) is not SecretKind.PLAIN:
                        raise self._wrong_password_type("cleartext")
                    self.write(m.password_message(password.encode() + b"\0"))
                elif code == m.AUTH_MD5:
                    if password is None or secret_kind(password) is SecretKind.SCRAM:
                        raise self._wrong_password_type("MD5")
                    resp = md5_client_response(password, user, data[:4])
                    self.write(m.password_message(resp.encode() + b"\0"))
                elif code == m.AUTH_SASL:
                    mechs = [x.decode() for x in data.split(b"\0") if x]
                    if "SCRAM-SHA-256" not in mechs:
                        raise self._login_refused("server login failed: unsupported SASL mechanism")
                    scram = self._scram_client(password)
                    self.write(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif code == m.AUTH_SASL_CONTINUE and scram is not None:
                    try:
                        self.write(m.password_message(scram.client_final(data)))
                    except ScramError as exc:
                        raise self._login_refused(f"server login failed: {exc}") from exc
                elif code == m.AUTH_SASL_FINAL and scram is not None:
                    try:
                        scram.verify_server_final(data)
                    except ScramError as exc:
                        raise self._login_refused(f"server login failed: {exc}") from exc
                else:
                    raise self._login_refused(f"server login failed: unsupported auth method {code}")
            elif typ == m.ERROR_RESPONSE:
                raise ServerLoginError(m.parse_error_fields(body))
            elif typ == m.PARAMETER_STATUS:
                name, value = m.parse_parameter_status(body)
                self.login_params[name] = value
                self.params.set(name, value)
            elif typ == m.BACKEND_KEY_DATA:
                self.backend_pid, self.backend_key = m.parse_backend_key_data(body)
            elif typ == m.READY_FOR_QUERY:
                self.status = body[0]
                return
            # NoticeResponse, NegotiateProtocolVersion: nothing to do

    def _scram_client(self, password: str | None) -> ScramClient:
        if password is None:
            raise self._wrong_password_type("SCRAM")
        kind = secret_kind(password)
        if kind is SecretKind.SCRAM:
            secret = ScramSecret.parse(password)
            client_key = self.pool.scram_client_key
            if secret is None or client_key is None or not secret.has_client_key(client_key):
                # No keys, or keys of an older secret (the password changed and no client has
                # logged in with the new one yet): PgBouncer's scram_passthrough_valid is false.
                pglog.logger.error(
                    "%s cannot do SCRAM authentication: password is SCRAM secret but client "
                    "authentication did not provide SCRAM keys",
                    self.log_prefix,
                )
                raise self._login_refused("server login failed: wrong password type")
            return ScramClient(client_key=client_key, secret=secret)
        if kind is SecretKind.MD5:
            raise self._wrong_password_type("SCRAM")
        return ScramClient(password=password)

    def _wrong_password_type(self, method: str) -> ServerLoginError:
        """The secret pgmux has cannot answer the server's `method` (an md5 hash asked for SCRAM,
        a SCRAM secret asked for md5, no secret at all): logged as PgBouncer logs it."""
        pglog.logger.error("%s cannot do %s authentication: wrong password type", self.log_prefix, method)
        return self._login_refused("server login failed: wrong password type")

    @staticmethod
    def _login_refused(message: str) -> ServerLoginError:
        return ServerLoginError({"S": "FATAL", "C": "08P01", "M": message})

    @staticmethod
    def _tls_failed(message: str, detail: str | None = None) -> ServerLoginError:
        """TLS negotiation failed: PgBouncer disconnects such a server without kill_pool_logins, as
        a connect that failed, so the waiting clients stay queued while the pool retries
        (server_login_retry apart) and new ones get the cached error; it is no refused login."""
        return ServerLoginError({"S": "FATAL", "C": "08P01", "M": message}, queued=True, detail=detail)

    async def simple_query(self, sql: str) -> dict[str, str] | None:
        """Run one query on the slow path, swallowing its results. Returns the ErrorResponse
        fields if it failed. ParameterStatus updates are recorded."""
        _, error = await self.query_rows(sql)
        return error

    async def query_params(self, sql: str, params: list[str]) -> tuple[list[list[str | None]], dict[str, str] | None]:
        """query_rows() with $n parameters sent separately (extended protocol), never spliced
        into the text: auth_query takes a user name from the client."""
        self.write(m.extended_query(sql, params))
        return await self._read_rows()

    async def query_rows(self, sql: str) -> tuple[list[list[str | None]], dict[str, str] | None]:
        """Run one query on the slow path: its rows as text, and the ErrorResponse fields if it failed."""
        self.write(m.query(sql))
        return await self._read_rows()

    async def _read_rows(self) -> tuple[list[list[str | None]], dict[str, str] | None]:
        error: dict[str, str] | None = None
        rows: list[list[str | None]] = []
        while True:
            typ, body = await self.read_message()
            if typ == m.READY_FOR_QUERY:
                self.status = body[0]
                return rows, error
            if typ == m.DATA_ROW:
                rows.append(m.parse_data_row(body))
            elif typ == _C and body.startswith(_FORGET_ALL_TAGS):
                self.stmts.clear()  # e.g. server_reset_query: the backend forgot its statements
            elif typ == m.ERROR_RESPONSE:
                error = m.parse_error_fields(body)
            elif typ == m.PARAMETER_STATUS:
                self.params.set(*m.parse_parameter_status(body))
            elif typ == m.COPY_IN_RESPONSE:
                self.write(m.message(b"f", m.cstr("COPY not allowed here")))
            elif typ == _NOTIFICATION and self.client is not None:
                # A LISTENing client's notification that arrived during pgmux's own query
                # (the pinning probe): it belongs to the client.
                self.client.write(m.message(b"A", body))

    def close(self, reason: str) -> None:
        """Close the socket; the pool forgets the server in connection_lost."""
        if self.close_reason is None:
            self.close_reason = reason
        t = self.transport
        if t is not None and not t.is_closing():
            if not self.closed:
                t.write(m.terminate())
            t.close()


__all__ = ["ServerConnection", "ServerLoginError", "ConnectionLost"]
