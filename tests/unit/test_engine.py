"""The compiled data path (pgmux.engine) over socketpairs, without PostgreSQL.

Each test builds a linked pair as pgmux does: two `Link` subclasses whose sockets the engine owns
(`adopt_fd`), put on the fast path (`link_fast`). The "client application" and the "PostgreSQL
server" are the far ends of the two socketpairs; `engine.run()` processes one batch of ready
sockets, so every step is deterministic (a socketpair delivers synchronously). The loop is a fake:
the engine only needs call_soon, call_exception_handler, add_reader and remove_reader.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgmux.engine import LAZY_PREPARE, PIN_HINTS, SESSION, Engine, Link, PoolCore, PoolStats

HIGH_WATER = 65536  # the engine's pause_writing threshold (asyncio's default)
READ_SIZE = 65536  # the most the engine reads at once


def msg(typ: bytes, body: bytes = b"") -> bytes:
    return typ + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def parse(name: bytes, sql: bytes) -> bytes:
    return msg(b"P", name + b"\0" + sql + b"\0" + b"\0\0")


BIND = msg(b"B", b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0")
DESCRIBE = msg(b"D", b"P\0")
EXECUTE = msg(b"E", b"\0" + b"\0\0\0\0")
SYNC = msg(b"S")
FLUSH = msg(b"H")
FUNCTION_CALL = msg(b"F", struct.pack("!IHHH", 1234, 0, 0, 0))
TERMINATE = msg(b"X")


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def complete(tag: bytes) -> bytes:
    return msg(b"C", tag + b"\0")


def notice(text: bytes = b"careful") -> bytes:
    return msg(b"N", b"SNOTICE\0M" + text + b"\0\0")


def param_status(name: bytes, value: bytes) -> bytes:
    return msg(b"S", name + b"\0" + value + b"\0")


ROW_DESCRIPTION = msg(b"T", struct.pack("!H", 1) + b"x\0" + struct.pack("!IHIhih", 0, 0, 23, 4, -1, 0))


def data_row(value: bytes) -> bytes:
    return msg(b"D", struct.pack("!HI", 1, len(value)) + value)


class FakeLoop:
    """What the engine asks of its loop; call_soon callbacks run in `drain()`."""

    def __init__(self) -> None:
        self.ready: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.errors: list[dict[str, Any]] = []
        self.readers: dict[int, Callable[[], None]] = {}
        self.timers: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.ready.append((fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.timers.append((delay, fn, args))

    def fire_timers(self) -> None:
        timers, self.timers = self.timers, []
        for _delay, fn, args in timers:
            fn(*args)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def drain(self) -> None:
        while self.ready:
            fn, args = self.ready.pop(0)
            fn(*args)


class TLink(Link):
    """A link that records every hook call; slow-mode reads land in `slow` (BufferedProtocol)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buf = bytearray(4096)
        self.mv = memoryview(self.buf)
        self.keep = 0
        self.skip = 0
        self.calls: list[tuple[Any, ...]] = []
        self.slow = bytearray()
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None
        self.on_escape: Callable[[bytes], None] | None = None

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def engine_escape(self, data: bytes) -> None:
        self.calls.append(("escape", data))
        if self.on_escape is not None:
            self.on_escape(data)

    def engine_parameter_status(self, body: bytes) -> None:
        self.calls.append(("parameter_status", body))

    def engine_command_complete(self, tag: bytes) -> None:
        self.calls.append(("command_complete", tag))

    def engine_transaction_end(self) -> None:
        self.calls.append(("transaction_end",))

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append(("connection_lost", exc))

    def pause_writing(self) -> None:
        self.calls.append(("pause_writing",))
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        self.calls.append(("resume_writing",))
        if self.on_resume is not None:
            self.on_resume()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.mv[self.keep :]

    def buffer_updated(self, nbytes: int) -> None:
        self.slow += self.mv[self.keep : self.keep + nbytes]


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


class Pair:
    """A client link and a server link, adopted and linked on the fast path."""

    def __init__(self, flags: int = 0, link: bool = True) -> None:
        self.loop = FakeLoop()
        self.eng = Engine(self.loop)
        self.c_app, c_eng = socket.socketpair()  # the client application's end
        self.s_app, s_eng = socket.socketpair()  # PostgreSQL's end
        for sock in (self.c_app, self.s_app, c_eng, s_eng):
            sock.setblocking(False)
        self.c = TLink("client")
        self.s = TLink("server")
        self.stats = PoolStats()
        self.s.link_stats = self.stats
        self.c_fd = c_eng.detach()
        self.s_fd = s_eng.detach()
        self.ct = self.eng.adopt_fd(self.c, self.c_fd)
        self.st = self.eng.adopt_fd(self.s, self.s_fd)
        if link:
            assert self.eng.link_fast(self.c, self.s, flags)

    def run(self) -> None:
        self.eng.run()
        assert not self.loop.errors, self.loop.errors

    def client_sends(self, data: bytes) -> None:
        self.c_app.sendall(data)
        self.run()

    def server_sends(self, data: bytes) -> None:
        self.s_app.sendall(data)
        self.run()

    def to_server(self) -> bytes:
        return recv_all(self.s_app)

    def to_client(self) -> bytes:
        return recv_all(self.c_app)

    def close(self) -> None:
        self.ct.abort()
        self.st.abort()
        self.c_app.close()
        self.s_app.close()
        self.loop.drain()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


@pytest.fixture
def make_pair() -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(flags: int = 0, link: bool = True) -> Pair:
        p = Pair(flags, link)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def forwarded_after_cut(stream: bytes, k: int) -> int:
    """What the client side forwards of stream[:k]: everything up to the cut (cut-through), except
    a message whose header is cut (kept) or a Query/Parse/Close/Terminate that is not whole (the
    engine decides those on the whole message)."""
    pos = 0
    while pos < len(stream):
        total = 1 + struct.unpack_from("!I", stream, pos + 1)[0]
        if k >= pos + total:
            pos += total
            continue
        if k < pos + 5 or stream[pos : pos + 1] in (b"Q", b"P", b"C", b"X"):
            return pos
        return k
    return k


# ---------------------------------------------------------------- framing


CLIENT_STREAM = (
    query("select 1")
    + parse(b"", b"select $1")
    + BIND
    + DESCRIBE
    + EXECUTE
    + SYNC
    + FLUSH
    + FUNCTION_CALL
    + msg(b"C", b"P\0")  # Close of an unnamed portal
    + query("select '" + "x" * 300 + "'")
)
CLIENT_REQUESTS = 4  # two Queries, a Sync, a FunctionCall


def test_framing_client_message_cut_at_every_offset(pair: Pair) -> None:
    outstanding = 0
    for k in range(1, len(CLIENT_STREAM)):
        pair.client_sends(CLIENT_STREAM[:k])
        first = pair.to_server()
        assert first == CLIENT_STREAM[: forwarded_after_cut(CLIENT_STREAM, k)], k
        pair.client_sends(CLIENT_STREAM[k:])
        assert first + pair.to_server() == CLIENT_STREAM, k
        outstanding += CLIENT_REQUESTS
        assert pair.s.outstanding == outstanding
        assert pair.c.carried == (0, 0)
        assert pair.c.fast and pair.s.fast
    assert pair.c.calls == [] and pair.s.calls == []
    assert pair.stats.bytes_received == len(CLIENT_STREAM) * (len(CLIENT_STREAM) - 1)


def test_framing_client_one_byte_per_read(pair: Pair) -> None:
    got = b""
    for i in range(len(CLIENT_STREAM)):
        pair.client_sends(CLIENT_STREAM[i : i + 1])
        got += pair.to_server()
        assert got == CLIENT_STREAM[: forwarded_after_cut(CLIENT_STREAM, i + 1)]
    assert got == CLIENT_STREAM
    assert pair.s.outstanding == CLIENT_REQUESTS and pair.c.calls == []


def test_framing_client_long_body_forwarded_as_it_comes(pair: Pair) -> None:
    """A CopyData of 1 MB: cut-through, the body is never buffered (carried says what is to come)."""
    body = bytes(range(256)) * 4096
    data = msg(b"d", body)
    pair.client_sends(data[:1000])
    assert pair.to_server() == data[:1000]
    assert pair.c.carried == (0, len(data) - 1000)
    sent = 1000
    while sent < len(data):
        chunk = data[sent : sent + 50000]
        pair.c_app.sendall(chunk)
        pair.run()
        assert pair.to_server() == chunk
        sent += len(chunk)
    assert pair.c.carried == (0, 0)


SERVER_STREAM = (
    ROW_DESCRIPTION
    + data_row(b"1")
    + data_row(b"y" * 200)
    + complete(b"SELECT 2")
    + param_status(b"TimeZone", b"UTC")
    + notice()
    + complete(b"DISCARD ALL")
    + ready(b"I")
)


def test_framing_server_message_cut_at_every_offset(pair: Pair) -> None:
    for k in range(1, len(SERVER_STREAM)):
        pair.client_sends(query("select 1"))
        pair.to_server()
        pair.server_sends(SERVER_STREAM[:k])
        assert pair.to_client() == SERVER_STREAM[:k], k  # cut-through: nothing waits for the rest
        pair.server_sends(SERVER_STREAM[k:])
        assert pair.to_client() == SERVER_STREAM[k:], k
        assert pair.s.calls == [
            ("parameter_status", b"TimeZone\0UTC\0"),
            ("command_complete", b"DISCARD ALL\0"),
            ("transaction_end",),
        ], k
        assert pair.s.outstanding == 0 and pair.s.carried == (0, 0) and not pair.s.boundary_due
        pair.s.calls.clear()
    assert pair.stats.query_count == len(SERVER_STREAM) - 1


def test_framing_server_one_byte_per_read(pair: Pair) -> None:
    pair.client_sends(query("select 1"))
    got = b""
    for i in range(len(SERVER_STREAM)):
        pair.server_sends(SERVER_STREAM[i : i + 1])
        got += pair.to_client()
        assert got == SERVER_STREAM[: i + 1]
        if i < len(SERVER_STREAM) - 1:
            assert ("transaction_end",) not in pair.s.calls
    assert pair.s.names() == ["parameter_status", "command_complete", "transaction_end"]


def test_framing_command_complete_hook_only_for_forgetting_tags(pair: Pair) -> None:
    pair.client_sends(query("select 1"))
    pair.server_sends(
        complete(b"DELETE 3") + complete(b"DEALLOCATE ALL") + complete(b"DEALLOCATE") + complete(b"DISCARD PLANS")
        + complete(b"DISCARD ALL") + ready()
    )
    assert pair.s.calls == [
        ("command_complete", b"DEALLOCATE ALL\0"),
        ("command_complete", b"DEALLOCATE\0"),
        ("command_complete", b"DISCARD ALL\0"),
        ("transaction_end",),
    ]


def test_framing_bad_server_length_closes_the_server(pair: Pair) -> None:
    pair.server_sends(b"Z\0\0\0\x02I")
    assert pair.st.is_closing()
    pair.loop.drain()
    (lost,) = [c for c in pair.s.calls if c[0] == "connection_lost"]
    assert isinstance(lost[1], ConnectionError)
    assert not fd_is_open(pair.s_fd)


# ---------------------------------------------------------------- request counting


def test_counting_query_until_ready_for_query(pair: Pair) -> None:
    pair.client_sends(query("begin"))
    assert pair.s.outstanding == 1 and pair.s.last_start == ord("Q")
    pair.server_sends(complete(b"BEGIN") + ready(b"T"))
    assert pair.s.outstanding == 0 and pair.s.status == ord("T")
    # inside a transaction block (T) a transaction-mode server stays: nothing for Python to decide
    assert pair.s.names() == []
    pair.client_sends(query("select 1"))
    pair.server_sends(complete(b"SELECT 1") + ready(b"T"))
    assert pair.s.names() == []
    pair.client_sends(query("commit"))
    assert pair.s.outstanding == 1
    pair.server_sends(complete(b"COMMIT") + ready(b"I"))
    assert pair.s.outstanding == 0 and pair.s.status == ord("I")
    assert pair.s.names() == ["transaction_end"]  # (these links are not the engine's to release: Python)
    assert pair.stats.query_count == 3 and pair.stats.xact_count == 1


def test_counting_transaction_block_goes_to_python_only_when_it_decides(pair: Pair) -> None:
    """A ReadyForQuery 'T' or 'E' in transaction mode keeps the server (the engine says nothing);
    in statement mode Python refuses the block, and a client waiting for a quiet pipeline (linking)
    is Python's to resume: both still get the hook."""
    pair.client_sends(query("select 1/0"))
    pair.server_sends(complete(b"ERROR") + ready(b"E"))
    assert pair.s.names() == []
    pair.s.statement_mode = True
    pair.client_sends(query("begin"))
    pair.server_sends(complete(b"BEGIN") + ready(b"T"))
    assert pair.s.names() == ["transaction_end"]
    pair.s.statement_mode = False
    pair.c.linking = True
    pair.client_sends(query("select 2"))
    pair.server_sends(complete(b"SELECT 1") + ready(b"T"))
    assert pair.s.names() == ["transaction_end"] * 2


def test_counting_pipelined_queries_end_once(pair: Pair) -> None:
    pair.client_sends(query("select 1") + query("select 2") + query("select 3"))
    assert pair.s.outstanding == 3
    pair.server_sends(complete(b"SELECT 1") + ready())
    pair.server_sends(complete(b"SELECT 1") + ready())
    assert pair.s.outstanding == 1 and pair.s.calls == []
    pair.server_sends(complete(b"SELECT 1") + ready())
    assert pair.s.outstanding == 0 and pair.s.names() == ["transaction_end"]
    pair.server_sends(notice())  # an idle notice is no new transaction end
    assert pair.s.names() == ["transaction_end"]


def test_counting_several_ready_for_query_in_one_read_end_once(pair: Pair) -> None:
    pair.client_sends(query("select 1") + query("select 2"))
    pair.server_sends(complete(b"SELECT 1") + ready() + complete(b"SELECT 1") + ready())
    assert pair.s.outstanding == 0 and pair.s.names() == ["transaction_end"]
    # one xact counted for the batch: its timer starts at the first request (Link.ready, the
    # rule the slow path applies too)
    assert pair.stats.query_count == 2 and pair.stats.xact_count == 1


def test_counting_extended_protocol_sync(pair: Pair) -> None:
    pair.client_sends(parse(b"", b"select 1") + BIND + DESCRIBE + EXECUTE)
    assert pair.s.outstanding == 0 and pair.s.pending_ext
    pair.client_sends(SYNC)
    assert pair.s.outstanding == 1 and not pair.s.pending_ext and pair.s.last_start == ord("S")
    pair.server_sends(msg(b"1") + msg(b"2") + ROW_DESCRIPTION + data_row(b"1") + complete(b"SELECT 1") + ready())
    assert pair.s.outstanding == 0 and pair.s.names() == ["transaction_end"]


def test_counting_function_call(pair: Pair) -> None:
    pair.client_sends(FUNCTION_CALL)
    assert pair.s.outstanding == 1 and pair.s.last_start == ord("F")
    pair.server_sends(msg(b"V", struct.pack("!i", -1)) + ready())
    assert pair.s.outstanding == 0 and pair.s.names() == ["transaction_end"]


def test_counting_no_transaction_end_while_pending_ext(pair: Pair) -> None:
    pair.client_sends(query("select 1"))
    pair.client_sends(parse(b"", b"select 2") + BIND + EXECUTE)  # no Sync yet
    pair.server_sends(complete(b"SELECT 1") + ready())
    assert pair.s.outstanding == 0 and pair.s.pending_ext and pair.s.calls == []
    pair.client_sends(SYNC)
    pair.server_sends(msg(b"1") + msg(b"2") + complete(b"SELECT 1") + ready())
    assert pair.s.names() == ["transaction_end"]


def test_counting_notice_after_ready_for_query_cut_in_its_body(pair: Pair) -> None:
    pair.client_sends(query("select 1"))
    tail = notice(b"n" * 100)
    pair.server_sends(complete(b"SELECT 1") + ready() + tail[:20])
    assert pair.s.outstanding == 0 and pair.s.boundary_due and pair.s.calls == []
    assert pair.s.carried == (0, len(tail) - 20)
    pair.server_sends(tail[20:60])
    assert pair.s.boundary_due and pair.s.calls == []
    pair.server_sends(tail[60:])
    assert not pair.s.boundary_due and pair.s.names() == ["transaction_end"]
    assert pair.to_client().endswith(tail)


@pytest.mark.parametrize("cut", [1, 3, 4])
def test_counting_notice_after_ready_for_query_cut_in_its_header(pair: Pair, cut: int) -> None:
    pair.client_sends(query("select 1"))
    tail = notice()
    pair.server_sends(complete(b"SELECT 1") + ready() + tail[:cut])
    assert pair.s.boundary_due and pair.s.calls == [] and pair.s.carried == (cut, 0)
    pair.server_sends(tail[cut:])
    assert not pair.s.boundary_due and pair.s.names() == ["transaction_end"]


def test_counting_new_request_while_boundary_due_waits_for_its_answer(pair: Pair) -> None:
    pair.client_sends(query("select 1"))
    tail = notice()
    pair.server_sends(complete(b"SELECT 1") + ready() + tail[:10])
    assert pair.s.boundary_due
    pair.client_sends(query("select 2"))
    pair.server_sends(tail[10:])
    assert not pair.s.boundary_due and pair.s.calls == []
    pair.server_sends(complete(b"SELECT 1") + ready())
    assert pair.s.names() == ["transaction_end"]


def test_counting_no_transaction_end_while_the_client_is_mid_message(pair: Pair) -> None:
    pair.client_sends(query("copy t from stdin"))
    pair.server_sends(msg(b"G", b"\0\0\0"))
    data = msg(b"d", b"x" * 100)
    pair.client_sends(data[:50])  # half a CopyData forwarded
    pair.server_sends(msg(b"E", b"SERROR\0\0") + ready())  # the COPY failed
    assert pair.s.outstanding == 0 and pair.s.calls == []


def test_counting_session_mode_has_no_transaction_end(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(SESSION)
    pair.client_sends(query("select 1"))
    pair.server_sends(complete(b"SELECT 1") + ready())
    assert pair.s.outstanding == 0 and pair.s.calls == []
    assert pair.stats.query_count == 1


def test_counting_copy_in_simple_query(pair: Pair) -> None:
    pair.client_sends(query("copy t from stdin"))
    pair.server_sends(msg(b"G", b"\0\0\0"))
    assert pair.s.copy_in == 1 and pair.s.outstanding == 1
    pair.client_sends(msg(b"d", b"1\n") + msg(b"d", b"2\n") + msg(b"c"))
    assert pair.s.copy_in == 0 and pair.s.outstanding == 1
    pair.server_sends(complete(b"COPY 2") + ready())
    assert pair.s.outstanding == 0 and pair.s.names() == ["transaction_end"]


def test_counting_copy_in_extended_ignores_syncs_until_copy_done(pair: Pair) -> None:
    pair.client_sends(parse(b"", b"copy t from stdin") + BIND + EXECUTE + SYNC)
    assert pair.s.outstanding == 1
    pair.server_sends(msg(b"1") + msg(b"2") + msg(b"G", b"\0\0\0"))
    assert pair.s.copy_in == 1 and pair.s.outstanding == 0  # PostgreSQL ignores that Sync
    pair.client_sends(msg(b"d", b"1\n") + SYNC + msg(b"c") + SYNC)
    assert pair.s.copy_in == 0 and pair.s.outstanding == 1
    pair.server_sends(complete(b"COPY 1") + ready())
    assert pair.s.outstanding == 0 and pair.s.names() == ["transaction_end"]


# ---------------------------------------------------------------- escapes

PREFIX = query("select 1") + parse(b"", b"select 2") + BIND + EXECUTE + SYNC
TRAILER = query("select 3")

ESCAPES: list[tuple[str, int, bytes]] = [
    ("terminate", 0, TERMINATE),
    ("unknown_type", 0, msg(b"z", b"abc")),
    ("password_message", 0, msg(b"p", b"secret\0")),
    ("named_parse_lazy_prepare", LAZY_PREPARE, parse(b"s1", b"select 1")),
    ("named_parse_pin_hints", PIN_HINTS, parse(b"s1", b"select 1")),
    ("parse_reserved_name", 0, parse(b"PGMUX_7", b"select 1")),
    ("parse_unterminated_name", 0, msg(b"P", b"abc")),
    ("parse_empty_body", 0, msg(b"P")),
    ("parse_session_state_pin_hints", PIN_HINTS, parse(b"", b"set search_path = x")),
    ("parse_unterminated_query_pin_hints", PIN_HINTS, msg(b"P", b"\0select 1")),
    ("query_names_database", 0, query("drop database x")),
    ("query_names_database_upper", 0, query("ALTER DATABASE x RENAME TO y")),
    ("query_set_pin_hints", PIN_HINTS, query("SET search_path TO x")),
    ("query_advisory_pin_hints", PIN_HINTS, query("select pg_advisory_lock(1)")),
    ("query_set_config_pin_hints", PIN_HINTS, query("SELECT set_config('a', 'b', false)")),
    ("query_several_statements_pin_hints", PIN_HINTS, query("select 1; select 2")),
    ("query_leading_spaces_pin_hints", PIN_HINTS, query(" " * 12 + "select 1")),
    ("close_reserved_statement", 0, msg(b"C", b"SPGMUX_1\0")),
    ("bind_named_before_tracking", LAZY_PREPARE, msg(b"B", b"\0s1\0" + b"\0\0\0\0\0\0")),
    ("describe_statement_before_tracking", LAZY_PREPARE, msg(b"D", b"Ss1\0")),
    ("length_below_4", 0, b"Q\0\0\0\x03"),
    ("length_zero", 0, b"d\0\0\0\0"),
]


@pytest.mark.parametrize(("flags", "escape"), [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_escape_forwards_what_precedes_and_hands_the_rest(
    make_pair: Callable[..., Pair], flags: int, escape: bytes
) -> None:
    pair = make_pair(flags)
    pair.client_sends(PREFIX + escape + TRAILER)
    assert pair.to_server() == PREFIX
    assert pair.c.calls == [("escape", escape + TRAILER)]
    assert not pair.c.fast and not pair.s.fast and pair.c.carried == (0, 0)
    assert pair.s.outstanding == 2 and pair.eng.escapes == 1
    # slow from now on: the next bytes go to the Python protocol (get_buffer / buffer_updated)
    pair.client_sends(b"more")
    assert pair.c.slow == b"more" and pair.to_server() == b""


@pytest.mark.parametrize(("flags", "escape"), [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_escape_cut_across_reads(make_pair: Callable[..., Pair], flags: int, escape: bytes) -> None:
    """The escaping message arrives in pieces: what precedes it is forwarded as soon as it is
    whole, the escape waits for as much of the message as the decision needs."""
    pair = make_pair(flags)
    data = PREFIX + escape + TRAILER
    for k in range(len(PREFIX) + 1, len(PREFIX) + len(escape)):
        pair = make_pair(flags)
        pair.client_sends(data[:k])
        got = pair.to_server()
        assert got == PREFIX
        if pair.c.calls:  # decided with what was there: exactly the rest of the read
            assert pair.c.calls == [("escape", data[len(PREFIX) : k])]
            continue
        assert pair.c.carried == (k - len(PREFIX), 0)
        pair.client_sends(data[k:])
        assert pair.to_server() == b""
        assert pair.c.calls == [("escape", escape + TRAILER)]


def test_escape_over_max_packet(pair: Pair) -> None:
    pair.c.max_packet_size = 1000
    big = msg(b"d", b"x" * 2000)
    pair.client_sends(PREFIX + big[:5])  # decided on the header alone
    assert pair.to_server() == PREFIX
    assert pair.c.calls == [("escape", big[:5])]


def test_escape_after_a_body_forwarded_in_an_earlier_read(pair: Pair) -> None:
    data = msg(b"d", b"x" * 100)
    pair.client_sends(data[:40])
    pair.client_sends(data[40:] + TERMINATE)
    assert pair.to_server() == data
    assert pair.c.calls == [("escape", TERMINATE)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (0, parse(b"s1", b"select 1")),  # named Parse without tracking nor pinning
        (PIN_HINTS, query("select 1")),
        (PIN_HINTS, query("  SELECT * FROM t;  ")),
        (PIN_HINTS, parse(b"", b"insert into t values (1)")),
        (0, query("SET search_path TO x")),  # no pinning hints: a plain query
        (0, msg(b"C", b"Ss1\0")),
        (0, msg(b"C", b"PPGMUX_1\0")),  # a portal is not one of pgmux's statements
        (LAZY_PREPARE, parse(b"", b"select 1")),
        (LAZY_PREPARE, BIND),  # the unnamed statement
        (LAZY_PREPARE, DESCRIBE),  # a portal
        (0, msg(b"B", b"\0s1\0" + b"\0\0\0\0\0\0")),  # a named Bind where tracking cannot start
    ],
)
def test_escape_not_for_what_the_fast_path_decides(make_pair: Callable[..., Pair], flags: int, message: bytes) -> None:
    pair = make_pair(flags)
    pair.client_sends(message + SYNC)
    assert pair.to_server() == message + SYNC
    assert pair.c.calls == [] and pair.c.fast


def test_escape_relink_from_the_hook_forwards_the_rest(pair: Pair) -> None:
    """What pgmux does: Python handles the escaped message, keeps the rest and links again."""

    def handle(data: bytes) -> None:
        n = 1 + struct.unpack_from("!I", data, 1)[0]
        pair.st.write(data[:n])  # Python forwards the message itself, and counts it
        pair.s.request_sent(data[0])
        rest = data[n:]
        pair.c.buf[: len(rest)] = rest
        pair.c.keep = len(rest)
        assert pair.eng.link_fast(pair.c, pair.s, PIN_HINTS)

    pair.c.on_escape = handle
    pair.eng.unlink(pair.c)
    pair.eng.link_fast(pair.c, pair.s, PIN_HINTS)
    stream = query("set x = 1") + query("select 1") + query("set y = 2") + query("select 2")[:7]
    pair.client_sends(stream)
    assert pair.to_server() == stream[: len(stream) - 7]
    assert pair.c.names() == ["escape", "escape"] and pair.c.fast and pair.c.carried == (7, 0)
    pair.client_sends(query("select 2")[7:])
    assert pair.to_server() == query("select 2") and pair.s.outstanding == 4  # kept bytes were not sent


def test_escape_verdict_kept_with_the_shape_serves_every_link_flag(pair: Pair) -> None:
    """With per-query statistics on, a Query's keyword tests are kept with its shape and reused for
    texts of that shape: the verdict is the text's, so a link with pinning hints still escapes a
    statement that a link without them forwarded, and a text naming a database always escapes."""
    core = PoolCore(None, deque(), set(), deque(), pair.stats)
    core.enabled = False
    pair.eng.qstats.configure(100)
    core.qpool = pair.eng.qstats.pool_id("db", "user")
    pair.c.core = pair.s.core = core
    pair.c.on_escape = lambda data: None
    for n in (1, 2):  # the second is found by its shape (the client's last)
        pair.client_sends(query(f"select pg_advisory_lock({n})"))
        assert pair.to_server() == query(f"select pg_advisory_lock({n})") and pair.c.calls == []
    pair.eng.unlink(pair.c)
    assert pair.eng.link_fast(pair.c, pair.s, PIN_HINTS)
    pair.client_sends(query("select pg_advisory_lock(3)"))
    assert pair.to_server() == b"" and pair.c.names() == ["escape"]
    for sql in ("select 7", "select 8", "drop database d1", "drop database d2"):
        pair.c.calls.clear()
        assert pair.eng.link_fast(pair.c, pair.s, PIN_HINTS)
        pair.client_sends(query(sql))
        escaped = "database" in sql
        assert (pair.to_server() == b"") == escaped and pair.c.names() == (["escape"] if escaped else [])
    assert len(pair.eng.qstats) == 2  # pg_advisory_lock($1) and select $1: both went through statistics


# ---------------------------------------------------------------- back-pressure


def pump(src: socket.socket, data: bytes, sent: int) -> int:
    """Send what the socket takes without blocking; the new offset."""
    while sent < len(data):
        try:
            sent += src.send(data[sent : sent + READ_SIZE])
        except BlockingIOError:
            break
    return sent


def pump_until_paused(pair: Pair, src: socket.socket, data: bytes, sent: int, writer: TLink) -> int:
    """Keep sending `data` and running the engine until `writer` is told to pause; the new offset."""
    for _ in range(200):
        pair.run()
        sent = pump(src, data, sent)
        if writer.calls:
            break
    return sent


def test_back_pressure_pauses_the_server_until_the_client_drains(pair: Pair) -> None:
    pair.c.on_pause = pair.st.pause_reading
    pair.c.on_resume = pair.st.resume_reading
    rows = b"".join(data_row(bytes([65 + i % 26]) * 8000) for i in range(800))  # ~6.4 MB
    stream = rows + complete(b"SELECT 800") + ready()
    pair.client_sends(query("select big"))
    sent = pump_until_paused(pair, pair.s_app, stream, pump(pair.s_app, stream, 0), pair.c)
    assert pair.c.names() == ["pause_writing"]
    queued = pair.ct.get_write_buffer_size()
    assert HIGH_WATER < queued <= HIGH_WATER + READ_SIZE
    # paused: more rounds neither read from the server nor grow the client's queue
    before = sent
    for _ in range(50):
        pair.run()
        sent = pump(pair.s_app, stream, sent)
    assert pair.ct.get_write_buffer_size() == queued
    assert sent - before < 2 * 1024 * 1024  # only the kernel's buffers took more
    assert sent < len(stream)
    # the client application reads: the queue drains, resume_writing, the server is read again
    got = bytearray()
    for _ in range(100000):
        got += pair.to_client()
        pair.run()
        sent = pump(pair.s_app, stream, sent)
        assert pair.ct.get_write_buffer_size() <= HIGH_WATER + READ_SIZE
        if len(got) == len(stream):
            break
    assert got == stream
    names = pair.c.names()
    assert names[0] == "pause_writing" and names[-1] == "resume_writing"
    assert names.count("pause_writing") == names.count("resume_writing")
    assert pair.s.names() == ["transaction_end"] and pair.stats.bytes_sent == len(stream)


def test_back_pressure_client_to_server(pair: Pair) -> None:
    """The other direction: a server that does not read pauses the client (server.pause_writing)."""
    pair.s.on_pause = pair.ct.pause_reading
    pair.s.on_resume = pair.ct.resume_reading
    stream = b"".join(msg(b"d", bytes([48 + i % 10]) * 8000) for i in range(800))
    sent = pump_until_paused(pair, pair.c_app, stream, pump(pair.c_app, stream, 0), pair.s)
    assert pair.s.names() == ["pause_writing"]
    queued = pair.st.get_write_buffer_size()
    for _ in range(20):
        pair.run()
        sent = pump(pair.c_app, stream, sent)
    assert pair.st.get_write_buffer_size() == queued
    got = bytearray()
    for _ in range(100000):
        got += pair.to_server()
        pair.run()
        sent = pump(pair.c_app, stream, sent)
        if len(got) == len(stream):
            break
    assert got == stream
    assert pair.s.names()[-1] == "resume_writing"


# ---------------------------------------------------------------- close semantics


def test_close_peer_eof_connection_lost_once(pair: Pair) -> None:
    pair.c_app.close()
    pair.run()
    assert pair.ct.is_closing() and not fd_is_open(pair.c_fd)
    assert pair.c.calls == []  # connection_lost comes from the loop, not from inside run()
    pair.loop.drain()
    assert pair.c.calls == [("connection_lost", None)]
    pair.run()
    pair.ct.close()
    pair.ct.abort()
    pair.loop.drain()
    assert pair.c.calls == [("connection_lost", None)]
    # the other side is untouched and still works
    pair.server_sends(notice())
    assert pair.s.calls == [] and not pair.st.is_closing()


def test_close_server_eof_while_linked(pair: Pair) -> None:
    pair.client_sends(query("select 1"))
    assert pair.to_server() == query("select 1")  # (unread data would make the close a reset)
    pair.s_app.close()
    pair.run()
    pair.loop.drain()
    assert pair.s.calls == [("connection_lost", None)] and not fd_is_open(pair.s_fd)
    pair.client_sends(query("select 2"))  # to a closed server: dropped, no crash
    assert pair.c.calls == [] and not pair.loop.errors


def test_close_after_queued_data_flushes_first(pair: Pair) -> None:
    stream = b"".join(data_row(bytes([97 + i % 26]) * 4000) for i in range(300))
    sent = pump(pair.s_app, stream, 0)
    for _ in range(500):  # nobody reads the client: the engine queues what its socket refuses
        pair.run()
        sent = pump(pair.s_app, stream, sent)
    assert sent == len(stream) and pair.ct.get_write_buffer_size() > 0
    pair.ct.close()
    assert pair.ct.is_closing() and fd_is_open(pair.c_fd)
    pair.loop.drain()
    assert "connection_lost" not in pair.c.names()
    got = bytearray()
    eof = False
    for _ in range(100000):
        try:
            data = pair.c_app.recv(1 << 20)
        except BlockingIOError:
            data = None
        if data == b"":
            eof = True
            break
        if data:
            got += data
        pair.run()
    assert eof and got == stream
    pair.loop.drain()
    assert pair.c.names().count("connection_lost") == 1 and not fd_is_open(pair.c_fd)


def test_close_abort_drops_the_queue(pair: Pair) -> None:
    stream = b"".join(data_row(b"z" * 4000) for i in range(300))
    sent = pump(pair.s_app, stream, 0)
    for _ in range(100):
        pair.run()
        sent = pump(pair.s_app, stream, sent)
    assert pair.ct.get_write_buffer_size() > 0
    pair.ct.abort()
    assert pair.ct.get_write_buffer_size() == 0 and not fd_is_open(pair.c_fd)
    pair.loop.drain()
    assert pair.c.names().count("connection_lost") == 1


def test_close_idle_close_is_immediate(pair: Pair) -> None:
    pair.ct.close()
    assert not fd_is_open(pair.c_fd)
    assert pair.c_app.recv(10) == b""
    pair.loop.drain()
    assert pair.c.calls == [("connection_lost", None)]


def test_close_lingering_reads_until_the_peer_closes(pair: Pair) -> None:
    """A client link closed after an error (linger): FIN after the error, Python told at once,
    what the client still sends is dropped (no reset that would discard the unread error), the
    socket closes when the client closes."""
    pair.eng.unlink(pair.c)
    pair.c.linger = True
    error = msg(b"E", b"SFATAL\0C08P01\0Mbye\0\0")
    pair.ct.write(error)
    pair.ct.close()
    assert pair.ct.is_closing() and fd_is_open(pair.c_fd)
    pair.loop.drain()
    assert pair.c.calls == [("connection_lost", None)]
    pair.ct.write(b"more")  # Python may still write: nothing goes out after the FIN
    pair.c_app.sendall(query("select 1"))  # the client's late request
    pair.run()
    assert fd_is_open(pair.c_fd) and pair.to_server() == b""
    assert pair.c_app.recv(1024) == error and pair.c_app.recv(1024) == b""  # the error, then EOF
    pair.c_app.close()
    pair.run()
    pair.loop.drain()
    assert not fd_is_open(pair.c_fd) and pair.c.calls == [("connection_lost", None)]
    pair.loop.fire_timers()  # the linger timeout after the fact: nothing happens
    assert pair.c.calls == [("connection_lost", None)]


def test_close_lingering_resets_a_peer_that_keeps_sending(pair: Pair) -> None:
    pair.eng.unlink(pair.c)
    pair.c.linger = True
    pair.ct.close()
    sent = 0
    for _ in range(100):
        sent = pump(pair.c_app, b"x" * (1 << 20), sent)
        pair.run()
        if not fd_is_open(pair.c_fd):
            break
    assert not fd_is_open(pair.c_fd) and sent < (1 << 20)  # closed after about 64 KiB


def test_close_lingering_ends_after_its_timeout(pair: Pair) -> None:
    pair.eng.unlink(pair.c)
    pair.c.linger = True
    pair.ct.close()
    assert fd_is_open(pair.c_fd) and len(pair.loop.timers) == 1 and pair.loop.timers[0][0] == 2.0
    pair.loop.fire_timers()  # the client never closed
    pair.loop.drain()
    assert not fd_is_open(pair.c_fd) and pair.c.calls == [("connection_lost", None)]


def test_close_fd_reused_in_the_same_batch_gets_no_stale_event(make_pair: Callable[..., Pair]) -> None:
    """A hook closes link A and a new link B is adopted on A's fd number within one batch: A's
    event of that batch must not reach B."""
    pair = make_pair()
    other_app, other_eng = socket.socketpair()
    other_eng.setblocking(False)
    a = TLink("a")
    a_fd = other_eng.detach()
    at = pair.eng.adopt_fd(a, a_fd)
    b = TLink("b")
    new_app, new_eng = socket.socketpair()
    new_eng.setblocking(False)
    order: list[str] = []

    def on_escape(data: bytes) -> None:
        order.append("escape")
        at.abort()  # A's fd is closed ...
        fd = new_eng.detach()
        os.dup2(fd, a_fd)  # ... and its number reused at once
        os.close(fd)
        new_app.sendall(b"for b")
        pair.eng.adopt_fd(b, a_fd)

    pair.c.on_escape = on_escape
    pair.c_app.sendall(TERMINATE)  # ready first
    other_app.sendall(b"for a")  # ready second, in the same batch
    pair.run()
    assert order == ["escape"]
    assert a.slow == b"" and b.slow == b""  # neither read: A was closed, B's event is not this one
    pair.run()
    assert b.slow == b"for b"
    pair.loop.drain()
    assert a.calls == [("connection_lost", None)] and b.calls == []
    pair.eng.unlink(b)
    other_app.close()
    new_app.close()


def test_close_fd_reused_by_a_later_link(pair: Pair) -> None:
    pair.c_app.close()
    pair.run()
    pair.loop.drain()
    app, eng_end = socket.socketpair()
    eng_end.setblocking(False)
    fd = eng_end.detach()
    link = TLink("new")
    t = pair.eng.adopt_fd(link, fd)
    app.sendall(b"hello")
    pair.run()
    assert link.slow == b"hello" and pair.c.calls == [("connection_lost", None)]
    t.abort()
    app.close()


# ---------------------------------------------------------------- statistics


def test_stats_counters(pair: Pair) -> None:
    exchanges = [
        (query("begin"), complete(b"BEGIN") + ready(b"T")),
        (query("insert into t values (1)"), complete(b"INSERT 0 1") + ready(b"T")),
        (query("commit"), complete(b"COMMIT") + ready(b"I")),
        (query("select 1"), complete(b"SELECT 1") + ready(b"I")),
    ]
    for request, answer in exchanges:
        pair.client_sends(request)
        pair.server_sends(answer)
    st = pair.stats
    assert st.bytes_received == sum(len(r) for r, _ in exchanges)
    assert st.bytes_sent == sum(len(a) for _, a in exchanges)
    assert st.query_count == 4
    assert st.xact_count == 2
    assert st.query_time_us >= 0 and st.xact_time_us >= 0
    assert sum(st.query_hist) == 4 and sum(st.xact_hist) == 2
    assert pair.eng.stats()["fast_reads"] >= 6


def test_stats_failed_transaction_counts(pair: Pair) -> None:
    pair.client_sends(query("begin"))
    pair.server_sends(complete(b"BEGIN") + ready(b"T"))
    pair.client_sends(query("select 1/0"))
    pair.server_sends(msg(b"E", b"SERROR\0\0") + ready(b"E"))
    assert pair.s.status == ord("E")
    pair.client_sends(query("rollback"))
    pair.server_sends(complete(b"ROLLBACK") + ready(b"I"))
    assert pair.stats.xact_count == 1 and pair.stats.query_count == 3


# ---------------------------------------------------------------- unlink and carried bytes


def test_unlink_hands_a_kept_client_message_to_python(pair: Pair) -> None:
    q = query("select 1")
    pair.client_sends(q[:9])
    assert pair.to_server() == b"" and pair.c.carried == (9, 0)
    pair.eng.unlink(pair.c)
    assert not pair.c.fast and not pair.s.fast
    assert pair.c.keep == 9 and bytes(pair.c.buf[:9]) == q[:9] and pair.c.skip == 0
    assert bytes(pair.c.mv[:9]) == q[:9] and pair.c.carried == (0, 0)
    # linked again: the kept bytes are taken back and forwarded once the message is whole
    assert pair.eng.link_fast(pair.c, pair.s, 0)
    assert pair.c.keep == 0 and pair.c.carried == (9, 0)
    pair.client_sends(q[9:])
    assert pair.to_server() == q and pair.s.outstanding == 1


def test_unlink_hands_the_rest_of_a_body_to_python(pair: Pair) -> None:
    data = msg(b"d", b"x" * 1000)
    pair.client_sends(data[:100])
    assert pair.to_server() == data[:100]
    pair.eng.unlink(pair.s)  # from either side
    assert pair.c.keep == 0 and pair.c.skip == len(data) - 100 and pair.c.carried == (0, 0)
    pair.eng.link_fast(pair.c, pair.s, 0)
    assert pair.c.carried == (0, len(data) - 100) and pair.c.skip == 0
    pair.client_sends(data[100:] + SYNC)
    assert pair.to_server() == data[100:] + SYNC and pair.s.outstanding == 1


def test_unlink_server_partial_header(pair: Pair) -> None:
    pair.server_sends(notice()[:3])
    assert pair.to_client() == notice()[:3]  # cut-through: already forwarded
    assert pair.s.carried == (3, 0)
    pair.eng.unlink(pair.s)
    assert pair.s.keep == 3 and bytes(pair.s.buf[:3]) == notice()[:3] and pair.s.carried == (0, 0)


def test_unlink_server_rest_of_a_body(pair: Pair) -> None:
    row = data_row(b"r" * 500)
    pair.server_sends(row[:100])
    assert pair.s.carried == (0, len(row) - 100)
    pair.eng.unlink(pair.c)
    assert pair.s.keep == 0 and pair.s.skip == len(row) - 100


def test_unlink_server_kept_ready_for_query_relinked(pair: Pair) -> None:
    """Server-side kept bytes were already forwarded (cut-through): after a round trip through Python
    they are walked again, not sent again."""
    pair.client_sends(query("select 1"))
    z = ready()
    pair.server_sends(complete(b"SELECT 1") + z[:4])
    assert pair.s.carried == (4, 0) and pair.s.outstanding == 1
    pair.eng.unlink(pair.s)
    assert pair.s.keep == 4 and bytes(pair.s.buf[:4]) == z[:4]
    assert pair.eng.link_fast(pair.c, pair.s, 0)
    assert pair.s.carried == (4, 0) and pair.s.keep == 0
    pair.server_sends(z[4:])
    assert pair.to_client() == complete(b"SELECT 1") + z
    assert pair.s.outstanding == 0 and pair.s.names() == ["transaction_end"]


def test_unlink_with_nothing_carried(pair: Pair) -> None:
    pair.c.keep = pair.c.skip = pair.s.keep = pair.s.skip = 7  # stale values are overwritten
    pair.eng.unlink(pair.c)
    assert (pair.c.keep, pair.c.skip, pair.s.keep, pair.s.skip) == (0, 0, 0, 0)
    pair.eng.unlink(pair.c)  # a no-op for a slow link
    pair.client_sends(b"abc")
    assert pair.c.slow == b"abc" and pair.to_server() == b""


def test_unlink_python_keep_is_walked_at_link_time(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(link=False)
    held = query("select 1") + SYNC + query("select 2")[:4]
    pair.c.buf[: len(held)] = held
    pair.c.keep = len(held)
    assert pair.eng.link_fast(pair.c, pair.s, 0)
    assert pair.to_server() == held[:-4] and pair.s.outstanding == 2 and pair.c.carried == (4, 0)


def test_link_fast_refuses_links_not_adopted_or_closed(pair: Pair) -> None:
    stranger = TLink("stranger")
    assert not pair.eng.link_fast(pair.c, stranger, 0)
    pair.ct.abort()
    assert not pair.eng.link_fast(pair.c, pair.s, 0)


# ---------------------------------------------------------------- in a real asyncio loop


async def test_real_asyncio_loop_drives_the_engine() -> None:
    """Engine.start() registers the epoll fd with the loop: the loop calls run(), hooks come back."""
    loop = asyncio.get_running_loop()
    eng = Engine(loop)
    eng.start()
    c_app, c_eng = socket.socketpair()
    s_app, s_eng = socket.socketpair()
    for sock in (c_app, s_app, c_eng, s_eng):
        sock.setblocking(False)
    c, s = TLink("client"), TLink("server")
    s.link_stats = PoolStats()
    ct = eng.adopt_fd(c, c_eng.detach())
    st = eng.adopt_fd(s, s_eng.detach())
    try:
        assert eng.link_fast(c, s, 0)
        c_app.sendall(query("select 1"))
        assert await asyncio.wait_for(loop.sock_recv(s_app, 1000), 5) == query("select 1")
        s_app.sendall(complete(b"SELECT 1") + ready())
        assert await asyncio.wait_for(loop.sock_recv(c_app, 1000), 5) == complete(b"SELECT 1") + ready()
        assert s.names() == ["transaction_end"]
        c_app.close()
        for _ in range(500):
            if c.calls:
                break
            await asyncio.sleep(0.01)
        assert c.calls == [("connection_lost", None)] and ct.is_closing()
    finally:
        st.abort()
        ct.abort()
        eng.close()
        s_app.close()
        c_app.close()


# ---------------------------------------------------------------- hooks that fail or change the link mid-walk


class RaisingServer(TLink):
    """ServerConnection.engine_parameter_status raises ProtocolError on a body without NUL
    (messages.parse_parameter_status); any Python hook may raise."""

    def engine_parameter_status(self, body: bytes) -> None:
        self.calls.append(("parameter_status", body))
        if b"\0" not in body:
            raise ValueError("malformed ParameterStatus")


def test_hook_exception_mid_walk_keeps_framing_or_closes() -> None:
    pair = Pair(link=False)
    try:
        server = RaisingServer("server")
        server.link_stats = pair.stats
        s_app, s_eng = socket.socketpair()
        s_app.setblocking(False)
        s_eng.setblocking(False)
        st = pair.eng.adopt_fd(server, s_eng.detach())
        assert pair.eng.link_fast(pair.c, server, 0)
        pair.client_sends(query("select 1"))
        tail = notice(b"x" * 50)
        s_app.sendall(msg(b"S", b"bad") + complete(b"SELECT 1") + ready() + tail[:20])
        pair.eng.run()
        assert len(pair.loop.errors) == 1  # reported to the loop's exception handler
        pair.loop.errors.clear()
        try:
            s_app.sendall(tail[20:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the engine closed the link: checked below
        pair.run()
        pair.loop.drain()
        # either the link is closed (asyncio closes a transport whose protocol callback raised) ...
        if st.is_closing():
            assert "connection_lost" in server.names()
            return
        # ... or the walk went on: the ReadyForQuery counted, the notice framed, the end reported
        assert server.outstanding == 0 and server.carried == (0, 0)
        assert server.names() == ["parameter_status", "transaction_end"]
    finally:
        pair.close()


_UNLINK_IN_HOOK = r"""
import socket, struct, sys
sys.path.insert(0, sys.argv[1])
from test_engine import FakeLoop, TLink, complete, param_status, ready
from pgmux.engine import Engine, PoolStats

class UnlinkingServer(TLink):
    def engine_parameter_status(self, body):
        engine.unlink(self)  # Python decides to handle this link itself from now on

loop = FakeLoop()
engine = Engine(loop)
c_app, c_eng = socket.socketpair()
s_app, s_eng = socket.socketpair()
for sock in (c_app, c_eng, s_app, s_eng):
    sock.setblocking(False)
c, s = TLink("client"), UnlinkingServer("server")
s.link_stats = PoolStats()
engine.adopt_fd(c, c_eng.detach())
engine.adopt_fd(s, s_eng.detach())
engine.link_fast(c, s, 0)
ps = param_status(b"application_name", b"x" * 300000)  # kept whole in s.rbuf until complete
sent = 0
while sent < 250000:
    sent += s_app.send(ps[sent:250000])
    engine.run()
    c_app.recv(1 << 20)
s_app.sendall(ps[250000:] + complete(b"SELECT 1") + ready())
for _ in range(20):
    engine.run()
    try:
        c_app.recv(1 << 20)
    except BlockingIOError:
        pass
print("ok", s.fast, s.carried, len(loop.errors))
"""


def test_hook_unlinking_mid_walk_is_safe() -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big buffers are mmapped: freed = unmapped
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-c", _UNLINK_IN_HOOK, str(Path(__file__).resolve().parent)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("ok False (0, 0)"), proc.stdout


# ---------------------------------------------------------------- the fuzzer's harness, without atheris


def _fuzz_harness() -> Any:
    path = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_engine.py"
    spec = importlib.util.spec_from_file_location("pgmux_fuzz_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_harness_seeds_and_mutations() -> None:
    """tests/fuzz/fuzz_engine.py's conversations and invariants on the in-place engine: its seeds, any
    saved regression inputs (tests/fuzz/regressions), and a few thousand seeded random mutations."""
    fe = _fuzz_harness()
    inputs = list(fe.seeds())
    regressions = Path(__file__).resolve().parents[1] / "fuzz" / "regressions"
    if regressions.is_dir():
        inputs += [p.read_bytes() for p in sorted(regressions.iterdir()) if p.is_file()]
    rng = random.Random(20260)
    seeds = list(inputs)
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(data) + 1)
            k = rng.random()
            if k < 0.35 and i < len(data):
                data[i] = rng.randrange(256)
            elif k < 0.55:
                data[i:i] = rng.randbytes(rng.randint(1, 8))
            elif k < 0.75:
                del data[i : i + rng.randint(1, 4)]
            else:
                data[i:i] = rng.choice(fe.DICTIONARY)
        inputs.append(bytes(data))
    for data in inputs:
        try:
            fe.run_one(data)
        except Exception as exc:
            raise AssertionError(f"fuzz input {data!r}: {exc}") from exc
