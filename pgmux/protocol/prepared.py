"""Protocol-level prepared statements in transaction pooling, without I/O.

A client's named statements (Parse with a name) are recorded per client and given a
process-wide server name (`PGMUX_<n>`, one per distinct query text + parameter types). Whatever
server the client lands on, a statement is prepared there on demand; a server keeps an LRU of
at most `max_prepared_statements` of them.

Doing that means dropping some client messages (a Parse already on that server, a Close) and
injecting others (a Parse before a Bind, a Close on eviction). Their answers must then be
invented or swallowed at the right place in the server's answer stream: `ResponseTracker`
keeps one entry per request in flight and says, for each answer header, whether to forward it
and what to insert after it. This mirrors PgBouncer's prepare.c (RA_FAKE / RA_SKIP).
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque

from pgmux.engine import Statement  # (a C struct: the engine reads it on every tracked Bind)

_I32 = struct.Struct("!i")

PARSE_COMPLETE = b"1\0\0\0\x04"
BIND_COMPLETE = b"2\0\0\0\x04"
CLOSE_COMPLETE = b"3\0\0\0\x04"

# request kinds (client message types)
P, B, D, E, C, S, Q, F = (ord(x) for x in "PBDECSQF")
# answer types
_PARSE_OK, _BIND_OK, _CLOSE_OK = ord("1"), ord("2"), ord("3")
_PARAM_DESC, _ROW_DESC, _NO_DATA = ord("t"), ord("T"), ord("n")
_CMD_DONE, _EMPTY, _SUSPENDED = ord("C"), ord("I"), ord("s")
_ERROR, _READY = ord("E"), ord("Z")

_SIMPLE_OK = (_PARSE_OK, _BIND_OK, _CLOSE_OK)
_DESCRIBE_END = (_ROW_DESC, _NO_DATA)
_EXECUTE_END = (_CMD_DONE, _EMPTY, _SUSPENDED)

# actions
PASS = 0
SKIP = 1  # an answer to a request pgmux injected: swallow it
FAKE = 2  # an answer pgmux invents for a request it did not send


class PreparedError(Exception):
    """A client used its statements wrongly; the text is PgBouncer's."""


class StatementRegistry:
    """Process-wide: query text + types -> Statement."""

    def __init__(self) -> None:
        self.by_tail: dict[bytes, Statement] = {}
        self._next = 0

    def get(self, tail: bytes) -> Statement:
        stmt = self.by_tail.get(tail)
        if stmt is None:
            self._next += 1
            stmt = Statement(self._next, b"PGMUX_%d" % self._next, tail)
            self.by_tail[tail] = stmt
        return stmt


class ServerStatements:
    """The statements prepared on one server connection, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lru: OrderedDict[int, Statement] = OrderedDict()

    def has(self, stmt: Statement) -> bool:
        if stmt.id in self.lru:
            self.lru.move_to_end(stmt.id)
            return True
        return False

    def add(self, stmt: Statement) -> list[Statement]:
        """Record a statement about to be prepared; returns the ones evicted to make room."""
        self.lru[stmt.id] = stmt
        evicted = []
        while len(self.lru) > self.capacity:
            _, old = self.lru.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard(self, stmt: Statement) -> None:
        self.lru.pop(stmt.id, None)

    def restore(self, stmt: Statement) -> None:
        """A Close or DEALLOCATE of `stmt` sent to the server did not happen (PostgreSQL skipped or
        refused it): it is still prepared there. Put back as least recently used; the capacity may
        be exceeded by one until the next add() evicts it."""
        if stmt.id not in self.lru:
            self.lru[stmt.id] = stmt
            self.lru.move_to_end(stmt.id, last=False)

    def clear(self) -> None:
        self.lru.clear()

    def names(self) -> list[bytes]:
        return [stmt.server_name for stmt in self.lru.values()]


def split_cstring(body: bytes | memoryview, pos: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated string at body[pos:] and the position after it."""
    data = bytes(body) if not isinstance(body, bytes) else body
    end = data.find(b"\0", pos)
    if end < 0:
        raise PreparedError("invalid string in message")  # PostgreSQL's text for the same fault
    return data[pos:end], end + 1


def split_parse(body: bytes) -> tuple[bytes, bytes]:
    """Parse body -> (statement name, tail after the name)."""
    name, pos = split_cstring(body)
    return name, body[pos:]


def rewrite_named(typ: bytes, body: bytes, name_pos: int, old_len: int, new_name: bytes) -> bytes:
    """Rebuild a message with the name at body[name_pos : name_pos+old_len] replaced."""
    new_body = body[:name_pos] + new_name + body[name_pos + old_len :]
    return typ + _I32.pack(len(new_body) + 4) + new_body


def close_message(server_name: bytes) -> bytes:
    body = b"S" + server_name + b"\0"
    return b"C" + _I32.pack(len(body) + 4) + body


class ResponseTracker:
    """Requests in flight on one server, in order, with what to do with their answers."""

    __slots__ = ("queue", "specials", "skipping", "own_deallocs")

    def __init__(self) -> None:
        # entries: [request kind, action, payload]; payload is the fake bytes for FAKE (plus, for a
        # faked ParseComplete, a 4th item: how to undo the client's statement), or (Statement,
        # ServerStatements, client statement dict, client name) for a Parse, or a `Restore` for a
        # Close (eviction) or DEALLOCATE of a statement already forgotten in ServerStatements.
        self.queue: deque[list] = deque()
        self.specials = 0  # SKIP and FAKE entries queued: the server path must then go message by message
        # An extended-protocol error was answered and no Sync was sent after it yet: PostgreSQL
        # ignores every message up to the next Sync, so none of them is queued or answered.
        self.skipping = False
        # SQL DEALLOCATEs pgmux rewrote (to PGMUX_<n>) whose CommandComplete is still to come:
        # any other "DEALLOCATE" tag is the client's own, which may have dropped a PGMUX_<n>.
        self.own_deallocs = 0

    def request(self, kind: int, action: int = PASS, payload: object = None) -> None:
        if self.skipping:
            if kind != S:
                if kind == P and isinstance(payload, tuple):
                    _forget_failed_parse(payload)
                elif isinstance(payload, Restore):
                    self.undo(payload)
                return
            self.skipping = False
        self.queue.append([kind, action, payload])
        if action != PASS:
            self.specials += 1

    def fake(self, kind: int, answer: bytes, undo: tuple | KeepClientName | None = None) -> bytes | None:
        """An answer to invent. Returned at once when nothing is in flight before it, else
        queued to come out after the answers that precede it. `undo`: for a Parse, (client
        statement dict, name, Statement) forgets the client's statement if PostgreSQL would have
        skipped it; for a Close, a KeepClientName gives it back."""
        if self.skipping:
            if isinstance(undo, KeepClientName):
                undo.undo()
            elif undo is not None:
                _forget_client_name(*undo)
            return None
        if not self.queue:
            return answer
        self.request(kind, FAKE, answer)
        if undo is not None:
            self.queue[-1].append(undo)
        return None

    def clear(self) -> None:
        self.queue.clear()
        self.specials = 0
        self.skipping = False

    def undo(self, payload: Restore) -> None:
        if payload.dealloc and self.own_deallocs:
            self.own_deallocs -= 1
        payload.undo()

    def own_deallocate(self) -> bool:
        """A "DEALLOCATE" CommandComplete: True if it answers a DEALLOCATE pgmux rewrote."""
        if not self.own_deallocs:
            return False
        self.own_deallocs -= 1
        q = self.queue
        if q and isinstance(q[0][2], Restore):  # a Query: it succeeded, nothing to undo
            q[0][2] = None
        return True

    def drop_syncs(self) -> None:
        """COPY IN started or ended: PostgreSQL ignores the Syncs queued since (no ReadyForQuery)."""
        q = self.queue
        if any(e[0] == S for e in q):
            kept = [e for e in q if e[0] != S]
            q.clear()
            q.extend(kept)

    def parsed_later(self) -> None:
        """DISCARD ALL / DEALLOCATE ALL just completed: the statements whose Parse is still queued
        were sent after it, so they survive it (client and server side)."""
        for entry in self.queue:
            if entry[0] != P:
                continue
            if entry[1] == FAKE:
                if len(entry) > 3:  # the client's name stays; the server lost the statement
                    client_stmts, name, stmt = entry[3]
                    if client_stmts is not None:
                        client_stmts[name] = stmt
            elif isinstance(entry[2], tuple):
                stmt, server_stmts, client_stmts, name = entry[2]
                server_stmts.restore(stmt)
                if client_stmts is not None and name is not None:
                    client_stmts[name] = stmt

    def _pop(self) -> list:
        entry = self.queue.popleft()
        if entry[1] != PASS:
            self.specials -= 1
        return entry

    def _drain_fakes(self, out: list[bytes]) -> None:
        q = self.queue
        while q and q[0][1] == FAKE:
            out.append(self._pop()[2])

    def answer(self, typ: int, out: list[bytes]) -> bool:
        """Account for one answer header from the server. Returns False when the message must be
        swallowed; appends to `out` the invented answers that must follow it."""
        q = self.queue
        if not q:
            return True
        head = q[0]
        kind = head[0]
        forward = True
        if typ == _READY:
            if kind in (S, Q, F):
                self._pop()
        elif typ == _ERROR:
            if kind in (Q, F):
                if isinstance(head[2], Restore):  # the DEALLOCATE failed: the statement stays
                    self.undo(head[2])
                    head[2] = None
                return True  # ReadyForQuery follows
            # Extended protocol: the server skips everything up to the next Sync, and whatever
            # the client sends before that Sync too.
            while q and q[0][0] != S:
                entry = self._pop()
                if isinstance(entry[2], Restore):  # a Close or DEALLOCATE the server skipped
                    self.undo(entry[2])
                elif entry[0] == P:
                    if entry[1] != FAKE and entry[2] is not None:
                        _forget_failed_parse(entry[2])
                    elif len(entry) > 3:
                        _forget_client_name(*entry[3])
                elif len(entry) > 3 and isinstance(entry[3], KeepClientName):  # a skipped Close
                    entry[3].undo()
            if not q:
                self.skipping = True
        elif typ in _SIMPLE_OK:
            if kind in (P, B, C):
                forward = self._pop()[1] != SKIP
        elif (typ in _DESCRIBE_END and kind == D) or (typ in _EXECUTE_END and kind == E):
            self._pop()
        # ParameterDescription, DataRow, COPY and async messages belong to the head request.
        if self.specials:
            self._drain_fakes(out)
        return forward


class KeepClientName:
    """Payload of a faked CloseComplete: the client's statement was forgotten when its Close was
    answered; if PostgreSQL skips that Close (an earlier error in the pipeline), the statement is
    still the client's and is given back."""

    __slots__ = ("client_stmts", "name", "stmt")

    def __init__(self, client_stmts: dict, name: bytes, stmt: Statement) -> None:
        self.client_stmts = client_stmts
        self.name = name
        self.stmt = stmt

    def undo(self) -> None:
        self.client_stmts[self.name] = self.stmt


class Restore:
    """Payload of a request that drops `stmt` on the server, already forgotten in `server_stmts`:
    if the server skips or refuses it, the statement is still there and is recorded again (stmt
    None: nothing to record again). `dealloc`: a rewritten SQL DEALLOCATE (see own_deallocs)."""

    __slots__ = ("stmt", "server_stmts", "dealloc")

    def __init__(self, stmt: Statement | None, server_stmts: ServerStatements, dealloc: bool = False) -> None:
        self.stmt = stmt
        self.server_stmts = server_stmts
        self.dealloc = dealloc

    def undo(self) -> None:
        if self.stmt is not None:
            self.server_stmts.restore(self.stmt)


def _forget_failed_parse(payload: tuple) -> None:
    stmt, server_stmts, client_stmts, client_name = payload
    server_stmts.discard(stmt)
    _forget_client_name(client_stmts, client_name, stmt)


def _forget_client_name(client_stmts: dict | None, client_name: bytes | None, stmt: Statement) -> None:
    if client_stmts is not None and client_stmts.get(client_name) is stmt:
        del client_stmts[client_name]
