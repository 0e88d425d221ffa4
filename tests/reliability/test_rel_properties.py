"""Property-based tests (hypothesis) of the sans-I/O parsers and state machines, with hostile input.

* the header walk (`scanner.scan`) against a reference parser: adversarial bodies (embedded
  ReadyForQuery/ParameterStatus look-alikes, 5-byte messages at chunk edges), random type tables,
  random cuts, corrupted length words;
* the startup packet parser never raises anything but ProtocolError, and round-trips what we build;
* ResponseTracker against a simulated PostgreSQL: whatever pgmux drops, fakes or injects, the client
  sees exactly the answers PostgreSQL would have given it, in order;
* Pool: a rule-based state machine checking its bookkeeping and FIFO fairness after every step.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pgmux.pool.pool import Pool, PoolLimits
from pgmux.protocol import messages as m
from pgmux.protocol.messages import ProtocolError
from pgmux.protocol.prepared import (
    CLOSE_COMPLETE,
    FAKE,
    PARSE_COMPLETE,
    PASS,
    SKIP,
    ResponseTracker,
    ServerStatements,
    StatementRegistry,
)
from pgmux.protocol.scanner import scan, type_table

# PGMUX_HYPOTHESIS_SCALE=20 multiplies every example count (a longer hunt than the suite's few seconds)
SCALE = max(1, int(os.environ.get("PGMUX_HYPOTHESIS_SCALE", "1")))
FAST = settings(max_examples=250 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# the header walk


def msg(typ: int, body: bytes) -> bytes:
    return bytes([typ]) + struct.pack("!I", len(body) + 4) + body


LOOKALIKES = [
    b"Z\0\0\0\x05I",  # a ReadyForQuery inside a row: must not be taken for one
    b"Z\0\0\0\x05T",
    b"S\0\0\0\x16TimeZone\0Europe/X\0",
    b"1\0\0\0\x04",
    b"\0\0\0\x04",
    b"Z\0\0",
]

bodies = st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from(LOOKALIKES), max_size=6).map(b"".join),
    st.builds(lambda a, b: a + b, st.lists(st.sampled_from(LOOKALIKES), max_size=3).map(b"".join),
              st.binary(max_size=300)),
)
# biased towards the types the data path cares about, but any byte may be a type
types = st.one_of(st.sampled_from(b"ZSDCTEQPBXdH123Ins"), st.integers(0, 255))
streams = st.lists(st.tuples(types, bodies), min_size=0, max_size=25)
tables = st.sets(st.integers(0, 255), max_size=12).map(lambda s: type_table(bytes(sorted(s))))


def reference(messages: list[tuple[int, bytes]], need: bytes, notify: bytes) -> list[tuple[int, bytes | None]]:
    """What the walk must report: whole bodies for need_body types, the header for notify types."""
    out: list[tuple[int, bytes | None]] = []
    for typ, body in messages:
        if need[typ]:
            out.append((typ, body))
        elif notify[typ]:
            out.append((typ, None))
    return out


def ref_walk(stream: bytes, need: bytes, notify: bytes, max_length: int = 0x7FFFFFFF,
             ) -> tuple[list[tuple[int, bytes | None]], bool]:
    """Reference walk of arbitrary bytes: (events, whether a bad length word is reached)."""
    out: list[tuple[int, bytes | None]] = []
    pos = 0
    while len(stream) - pos >= 5:
        typ = stream[pos]
        length = struct.unpack_from("!I", stream, pos + 1)[0]
        if length < 4 or length > max_length:
            return out, True
        nxt = pos + 1 + length
        if need[typ]:
            if nxt > len(stream):
                break
            out.append((typ, stream[pos + 5 : nxt]))
        elif notify[typ]:
            out.append((typ, None))
        pos = nxt
    return out, False


def drive(stream: bytes, cuts: list[int], need: bytes, notify: bytes, max_length: int = 0x7FFFFFFF,
          ) -> tuple[list[tuple[int, bytes | None]], int]:
    """Feed `stream` in chunks the way pgmux's connections do: a stopped walk keeps its bytes at
    the front of the buffer; a message cut in its body continues as `skip` bytes not walked.
    Returns the events and how many bytes were left over (kept, or body still to come)."""
    buf = bytearray()
    skip = 0
    seen: list[tuple[int, bytes | None]] = []
    points = sorted({c for c in cuts if 0 < c < len(stream)}) + [len(stream)]
    prev = 0
    for p in points:
        chunk = stream[prev:p]
        prev = p
        if not buf and skip >= len(chunk):
            skip -= len(chunk)
            continue
        pos = skip if not buf else 0
        skip = 0
        buf += chunk
        events: list[tuple[int, int, int]] = []
        stop, skip = scan(buf, pos, len(buf), need, notify, events, max_length)
        assert pos <= stop <= len(buf) and skip >= 0
        if stop < len(buf):
            assert skip == 0, "a stopped walk has no pending body"
            rest = len(buf) - stop
            # only an incomplete header, or an incomplete need_body message, may stop the walk
            assert rest < 5 or (need[buf[stop]] and stop + 1 + struct.unpack_from("!I", buf, stop + 1)[0] > len(buf))
        last = -1
        for typ, s, e in events:
            assert pos <= s < len(buf) and (s < stop or stop == len(buf)), (pos, s, stop)
            assert s > last, "events out of order or reported twice"
            last = s
            assert buf[s] == typ and e == s + 1 + struct.unpack_from("!I", buf, s + 1)[0]
            if need[typ]:
                assert e <= len(buf)
                seen.append((typ, bytes(buf[s + 5 : e])))
            else:
                seen.append((typ, None))
        del buf[:stop]
    return seen, len(buf) + skip


@FAST
@given(streams, st.lists(st.integers(0, 4000), max_size=12), tables, tables)
def test_scan_matches_reference_at_any_split(messages: list[tuple[int, bytes]], cuts: list[int], need: bytes,
                                              notify: bytes) -> None:
    stream = b"".join(msg(t, b) for t, b in messages)
    assert drive(stream, cuts, need, notify) == (reference(messages, need, notify), 0)


@FAST
@given(streams)
def test_scan_every_byte_cut(messages: list[tuple[int, bytes]]) -> None:
    """Cut after every single byte (the worst case for 5-byte messages and the 6-byte ReadyForQuery)."""
    messages = messages[:6]
    stream = b"".join(msg(t, b) for t, b in messages)
    need, notify = type_table("ZS"), type_table("QSFPBDEC")
    assert drive(stream, list(range(len(stream))), need, notify) == (reference(messages, need, notify), 0)


@FAST
@given(streams, st.integers(0, 10_000), st.binary(min_size=1, max_size=4), st.lists(st.integers(0, 4000), max_size=6),
       st.sampled_from([0x7FFFFFFF, 1 << 20, 4096, 64]), st.integers(0, 40))
def test_scan_corrupt_stream_matches_reference(messages: list[tuple[int, bytes]], where: int, word: bytes,
                                               cuts: list[int], max_length: int, chop: int) -> None:
    """Corrupted length words and truncated streams: the chunked walk reports exactly what a
    whole-stream reference walk reports, and raises ProtocolError (only) where a bad length is reached."""
    stream = bytearray(b"".join(msg(t, b) for t, b in messages))
    if stream:
        i = where % len(stream)
        stream[i : i + len(word)] = word
        del stream[len(stream) - min(chop, len(stream)):]
    need, notify = type_table("ZSXQ"), type_table("QSFPBDEC")
    expected, bad = ref_walk(bytes(stream), need, notify, max_length)
    if bad:
        with pytest.raises(ProtocolError, match="^bad packet header"):
            drive(bytes(stream), cuts, need, notify, max_length)
    else:
        assert drive(bytes(stream), cuts, need, notify, max_length)[0] == expected


@FAST
@given(st.integers(0, 3), st.integers(0x7FFFFFFF - 10, 0xFFFFFFFF), types)
def test_scan_rejects_lengths_below_4_and_above_max(small: int, huge: int, typ: int) -> None:
    for length in (small, huge):
        data = bytes([typ]) + struct.pack("!I", length)
        with pytest.raises(ProtocolError):
            scan(data, 0, 5, type_table("Q"), type_table("S"), [], max_length=0x7FFFFFFF - 11)


# --------------------------------------------------------------------------------------------------
# the startup packet parser: any bytes a client may send before logging in


@FAST
@given(st.binary(max_size=200))
def test_startup_parser_only_raises_protocol_error(packet: bytes) -> None:
    try:
        m.startup_packet_length(packet[:4].ljust(4, b"\0"))
    except ProtocolError:
        pass
    try:
        pkt = m.parse_startup_packet(packet)
    except ProtocolError:
        return
    assert len(packet) >= 8
    if pkt.is_cancel:
        assert len(packet) == 16
    elif pkt.is_ssl_request or pkt.is_gssenc_request:
        assert len(packet) == 8
    else:
        assert pkt.code >> 16 == 3
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in pkt.params.items())


def _mutations() -> st.SearchStrategy[bytes]:
    chars = st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))
    params = st.dictionaries(st.text(chars, max_size=12), st.text(chars, max_size=20), max_size=6)
    good = params.map(lambda d: m.startup_message({"user": "u", "database": "d", **d}))

    def mutate(pkt: bytes, ops: list[tuple[int, int, int]]) -> bytes:
        b = bytearray(pkt)
        for kind, where, value in ops:
            if not b:
                break
            i = where % len(b)
            if kind == 0:
                b[i] = value & 0xFF  # flip a byte
            elif kind == 1:
                del b[i:]  # truncate
            elif kind == 2:
                b[i:i] = bytes([value & 0xFF]) * (value % 7 + 1)  # insert garbage
            else:
                b[0:4] = struct.pack("!i", value)  # lie about the length
        return bytes(b)

    ops = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1000), st.integers(-(2**31), 2**31 - 1)), max_size=4)
    return st.builds(mutate, good, ops)


@FAST
@given(_mutations())
def test_mutated_startup_packets_only_raise_protocol_error(packet: bytes) -> None:
    try:
        length = m.startup_packet_length(packet[:4].ljust(4, b"\0"))
        assert 8 <= length <= m.MAX_STARTUP_PACKET
        m.parse_startup_packet(packet[:length])
    except ProtocolError:
        pass


@FAST
@given(st.dictionaries(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20),
                       st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40),
                       max_size=8))
def test_startup_packet_round_trip(params: dict[str, str]) -> None:
    raw = m.startup_message(params)
    assert m.startup_packet_length(raw[:4]) == len(raw)
    assert m.parse_startup_packet(raw).params == params


@FAST
@given(st.binary(max_size=120))
def test_sasl_initial_response_parser_only_raises_protocol_error(body: bytes) -> None:
    try:
        mech, data = m.parse_sasl_initial_response(body)
    except ProtocolError:
        return
    assert isinstance(mech, str) and isinstance(data, bytes)


# --------------------------------------------------------------------------------------------------
# ResponseTracker against a simulated PostgreSQL


@dataclass
class Req:
    """One frontend message with the outcome PostgreSQL will give it."""

    kind: str  # P B D E C S Q
    ok: bool = True
    rows: int = 0  # Execute/Query: DataRows before the end
    end: str = "C"  # Execute: C (complete), s (suspended), I (empty query)
    describe_stmt: bool = False
    nodata: bool = False
    statements: int = 1  # Query: statements in the string
    # pgmux's treatment: "pass", "fake" (not sent, answer invented), and injected SKIP messages before it
    treatment: str = "pass"
    inject_parse: bool = False
    evictions: int = 0
    stmt_id: int = 0


def pg_answers(req: Req) -> list[str]:
    """PostgreSQL's answer types for one message when it is not skipped."""
    k = req.kind
    if k == "P":
        return ["1"] if req.ok else ["E"]
    if k == "B":
        return ["2"] if req.ok else ["E"]
    if k == "D":
        return (["t"] if req.describe_stmt else []) + (["n"] if req.nodata else ["T"])
    if k == "E":
        return ["D"] * req.rows + ([req.end] if req.ok else ["E"])
    if k == "C":
        return ["3"]
    if k == "S":
        return ["Z"]
    if k == "Q":
        out: list[str] = []
        for i in range(req.statements):
            if not req.ok and i == req.statements - 1:
                out.append("E")
                break
            out += ["T"] + ["D"] * req.rows + ["C"]
        return out + ["Z"]
    raise AssertionError(k)


class SimPostgres:
    """Processes messages one at a time; after an extended-protocol error, skips until Sync."""

    def __init__(self) -> None:
        self.ignoring = False

    def process(self, req: Req) -> list[str]:
        if self.ignoring and req.kind != "S":
            return []
        self.ignoring = False
        answers = pg_answers(req)
        if "E" in answers and req.kind != "Q":
            self.ignoring = True
        return answers


def reference_view(reqs: list[Req]) -> list[str]:
    pg = SimPostgres()
    out: list[str] = []
    for r in reqs:
        out += pg.process(r)
    return out


def req_strategy() -> st.SearchStrategy[Req]:
    return st.one_of(
        st.builds(Req, kind=st.just("P"), ok=st.booleans(), treatment=st.sampled_from(["pass", "pass", "fake"]),
                  evictions=st.integers(0, 2)),
        st.builds(Req, kind=st.just("B"), ok=st.booleans() | st.just(True), inject_parse=st.booleans(),
                  evictions=st.integers(0, 1)),
        st.builds(Req, kind=st.just("D"), describe_stmt=st.booleans(), nodata=st.booleans(),
                  inject_parse=st.booleans()),
        st.builds(Req, kind=st.just("E"), ok=st.booleans() | st.just(True), rows=st.integers(0, 3),
                  end=st.sampled_from("CCsI")),
        st.builds(Req, kind=st.just("C"), treatment=st.sampled_from(["pass", "fake"])),
        st.builds(Req, kind=st.just("S")),
        st.builds(Req, kind=st.just("Q"), ok=st.booleans() | st.just(True), rows=st.integers(0, 2),
                  statements=st.integers(1, 3)),
    )


_KIND = {c: ord(c) for c in "PBDECSQ"}

# Two ResponseTracker bugs this property found (deterministic reproducers below, xfail(strict=True)). While
# they are open the model steers around them (hypothesis.reject) so that the property keeps guarding the
# rest; set to False once they are fixed.
AVOID_KNOWN_TRACKER_BUGS = False


def _error_would_drop_fake_parse(tracker: ResponseTracker) -> bool:
    """Bug 1: an extended-protocol error pops the queue up to Sync and calls _forget_failed_parse() on
    every Parse entry with a payload -- including a queued FAKE ParseComplete, whose payload is the
    answer bytes: ValueError in the server's data path."""
    q = list(tracker.queue)
    if not q or q[0][0] in (_KIND["Q"], ord("F")):
        return False
    for kind, action, _payload in q:
        if kind == _KIND["S"]:
            return False
        if action == FAKE and kind == _KIND["P"]:
            return True
    return False


@settings(max_examples=300 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(req_strategy(), min_size=1, max_size=24), st.data())
def test_response_tracker_client_sees_what_postgres_would_send(reqs: list[Req], data: st.DataObject) -> None:
    """Three actors interleave at random: the client sends (pgmux transforms and records), PostgreSQL
    processes what it received, pgmux reads answers through the tracker. The client must see exactly
    PostgreSQL's answers to its own messages (async messages aside), and the tracker must end empty."""
    if reqs[-1].kind not in "SQ":
        reqs.append(Req("S"))  # a pipeline ends with Sync
    for r in reqs:
        if r.treatment == "fake":
            r.ok = True  # an invented ParseComplete/CloseComplete is a success
        if r.kind == "P" and r.treatment == "fake":
            r.evictions = 0
    tracker = ResponseTracker()
    registry = StatementRegistry()
    server_stmts = ServerStatements(capacity=1000)
    client_stmts: dict[bytes, object] = {}
    parse_outcomes: list[tuple[object, bytes | None, bool]] = []  # (stmt, client name, reached the server ok)

    to_send = list(reqs)
    server_in: list[tuple[Req, object]] = []  # what PostgreSQL received: (req, tracker payload marker)
    wire: list[str] = []  # answers PostgreSQL sent, not yet read by pgmux
    client_view: list[str] = []
    pg = SimPostgres()
    asyncs = 0
    sent_order: list[Req] = []  # what pgmux sent, for PostgreSQL's outcome bookkeeping
    processed = 0
    n = 0

    def send_one(r: Req) -> None:
        nonlocal n
        kind = _KIND[r.kind]
        if AVOID_KNOWN_TRACKER_BUGS and r.kind != "S" and not tracker.queue and (
                pg.ignoring or processed < len(server_in)):
            # Bug 2: nothing in flight, but PostgreSQL is skipping messages until Sync after an error: the
            # tracker queues (or fakes) answers for messages PostgreSQL will ignore.
            reject()
        for _ in range(r.evictions if r.kind in "PB" else 0):
            tracker.request(_KIND["C"], SKIP)
            server_in.append((Req("C"), None))
        if r.inject_parse and r.kind in "BD":
            n += 1
            stmt = registry.get(b"injected %d\0\0\0" % n)
            server_stmts.add(stmt)
            tracker.request(_KIND["P"], SKIP, (stmt, server_stmts, client_stmts, None))
            server_in.append((Req("P"), ("inj", stmt)))
        if r.treatment == "fake" and r.kind in "PC":
            answer = PARSE_COMPLETE if r.kind == "P" else CLOSE_COMPLETE
            now = tracker.fake(kind, answer)
            if now is not None:
                client_view.append(chr(now[0]))
            return
        if r.kind == "P":
            n += 1
            name = b"s%d" % n
            stmt = registry.get(b"query %d\0\0\0" % n)
            client_stmts[name] = stmt
            server_stmts.add(stmt)
            tracker.request(kind, PASS, (stmt, server_stmts, client_stmts, name))
            server_in.append((r, ("cli", stmt, name)))
        else:
            tracker.request(kind)
            server_in.append((r, None))

    def check_specials() -> None:
        assert tracker.specials == sum(1 for e in tracker.queue if e[1] != PASS)
        assert tracker.specials >= 0

    steps = 0
    while to_send or processed < len(server_in) or wire:
        steps += 1
        assert steps < 10_000
        choices = []
        if to_send:
            choices.append("send")
        if processed < len(server_in):
            choices.append("pg")
        if wire:
            choices.append("read")
        action = data.draw(st.sampled_from(choices), label="actor")
        if action == "send":
            r = to_send.pop(0)
            sent_order.append(r)
            send_one(r)
        elif action == "pg":
            r, marker = server_in[processed]
            processed += 1
            answers = pg.process(r)
            if marker is not None:
                stmt = marker[1]
                parse_outcomes.append((stmt, marker[2] if marker[0] == "cli" else None, answers == ["1"]))
            if data.draw(st.integers(0, 9), label="async") == 0:
                wire.append(data.draw(st.sampled_from("NSA"), label="async type"))
            wire.extend(answers)
        else:
            typ = wire.pop(0)
            extra: list[bytes] = []
            if typ in "NSA":
                asyncs += 1
            if AVOID_KNOWN_TRACKER_BUGS and typ == "E" and _error_would_drop_fake_parse(tracker):
                reject()
            if tracker.answer(ord(typ), extra):
                client_view.append(typ)
            client_view.extend(chr(x[0]) for x in extra)
        check_specials()

    assert not tracker.queue and tracker.specials == 0, tracker.queue
    seen = [t for t in client_view if t not in "NSA"]
    assert seen == reference_view(reqs), (seen, reference_view(reqs))
    assert sum(1 for t in client_view if t in "NSA") == asyncs, "an async message was swallowed"
    for stmt, name, ok in parse_outcomes:
        if not ok:  # skipped after an error, or failed: pgmux must not believe it is prepared
            assert not server_stmts.has(stmt), stmt
            if name is not None:
                assert client_stmts.get(name) is not stmt


def _flow(tracker: ResponseTracker, steps: list[tuple[str, object]]) -> str:
    """Run ('req', (kind, action, payload)) / ('fake', (kind, bytes)) / ('ans', type) steps; return what
    the client sees as type letters."""
    view = []
    for what, arg in steps:
        if what == "req":
            tracker.request(*arg)
        elif what == "fake":
            now = tracker.fake(*arg)
            if now is not None:
                view.append(chr(now[0]))
        else:
            extra: list[bytes] = []
            if tracker.answer(ord(arg), extra):
                view.append(arg)
            view += [chr(x[0]) for x in extra]
    return "".join(view)


def test_tracker_error_before_a_queued_fake_parse() -> None:
    """Bind, Execute (fails), Parse of a statement already on the server (answer faked, queued), Sync."""
    t = ResponseTracker()
    seen = _flow(t, [("req", (_KIND["B"], PASS, None)), ("req", (_KIND["E"], PASS, None)),
                     ("fake", (_KIND["P"], PARSE_COMPLETE)), ("req", (_KIND["S"], PASS, None)),
                     ("ans", "2"), ("ans", "E"), ("ans", "Z")])
    assert seen == "2EZ"  # PostgreSQL skips the Parse after the error: no ParseComplete
    assert not t.queue and t.specials == 0


@pytest.mark.parametrize("after_error", ["bind-execute", "fake-parse"])
def test_tracker_messages_after_an_error_before_sync(after_error: str) -> None:
    """Parse (fails), Flush; the client reads the error, then sends more before its Sync (libpq pipeline
    mode does: PQsendFlushRequest, then the aborted queries' messages, then Sync). PostgreSQL answers only
    the Sync; the tracker must end empty (else the server is never released) and invent nothing."""
    t = ResponseTracker()
    stmt = StatementRegistry().get(b"SELECT 1\0\0\0")
    payload = (stmt, ServerStatements(10), {}, b"a")
    steps: list[tuple[str, object]] = [("req", (_KIND["P"], PASS, payload)), ("ans", "E")]
    if after_error == "bind-execute":
        steps += [("req", (_KIND["B"], PASS, None)), ("req", (_KIND["E"], PASS, None))]
    else:
        steps += [("fake", (_KIND["P"], PARSE_COMPLETE))]
    steps += [("req", (_KIND["S"], PASS, None)), ("ans", "Z")]
    seen = _flow(t, steps)
    assert seen == "EZ"
    assert not t.queue, f"left in the queue: {list(t.queue)}"


def test_response_tracker_fake_and_skip_counts_never_leak() -> None:
    """A deterministic corner: an error while only SKIP entries precede the Sync."""
    t = ResponseTracker()
    t.request(ord("C"), SKIP)
    t.request(ord("P"), SKIP, None)
    t.request(ord("B"))
    t.request(ord("S"))
    out: list[bytes] = []
    assert t.answer(ord("3"), out) is False and not out
    assert t.answer(ord("E"), out) is True and not out  # the injected Parse failed: skip to Sync
    assert t.answer(ord("Z"), out) is True and not out
    assert not t.queue and t.specials == 0


# --------------------------------------------------------------------------------------------------
# Pool


@dataclass(eq=False)
class FakeClient:
    n: int
    closed: bool = False
    wait_started: float = 0.0


@dataclass(eq=False)
class FakeServer:
    n: int


@dataclass
class World:
    clock: float = 1000.0
    next_id: int = 0
    linked: dict[FakeServer, FakeClient] = field(default_factory=dict)
    served: list[int] = field(default_factory=list)


class PoolMachine(RuleBasedStateMachine):
    """Drives Pool the way Pooler does and checks its bookkeeping after every step."""

    @initialize(size=st.integers(1, 4), reserve=st.integers(0, 2), min_size=st.integers(0, 3),
                rr=st.booleans())
    def setup(self, size: int, reserve: int, min_size: int, rr: bool) -> None:
        self.pool: Pool[FakeServer, FakeClient] = Pool(
            "db", "user", PoolLimits(pool_size=size, reserve_pool_size=reserve, reserve_pool_timeout=2.0,
                                     min_pool_size=min_size), round_robin=rr)
        self.w = World()
        self.all_servers: set[FakeServer] = set()

    def _new_id(self) -> int:
        self.w.next_id += 1
        return self.w.next_id

    def _link(self, client: FakeClient, server: FakeServer) -> None:
        assert not client.closed
        assert server not in self.w.linked
        self.w.linked[server] = client
        self.w.served.append(client.n)

    @rule()
    def client_wants_server(self) -> None:
        client = FakeClient(self._new_id())
        server = self.pool.take_idle()
        if server is not None:
            self._link(client, server)
        else:
            self.pool.enqueue(client, self.w.clock)

    @rule(data=st.data())
    def waiting_client_leaves(self, data: st.DataObject) -> None:
        live = [c for c in self.pool.waiting if not c.closed]
        if live:
            c = data.draw(st.sampled_from(live))
            c.closed = True
            if data.draw(st.booleans()):
                self.pool.remove_waiter(c)

    @rule()
    def start_connects(self) -> None:
        self.pool.connecting += self.pool.connects_wanted(now=self.w.clock)

    @precondition(lambda self: self.pool.connecting > 0)
    @rule(ok=st.booleans())
    def connect_finishes(self, ok: bool) -> None:
        self.pool.connecting -= 1
        if ok:
            server = FakeServer(self._new_id())
            self.all_servers.add(server)
            client = self.pool.server_ready(server)
            if client is not None:
                self._link(client, server)

    @rule(data=st.data(), how=st.sampled_from(["release", "reset", "close"]))
    def linked_server_done(self, data: st.DataObject, how: str) -> None:
        if not self.w.linked:
            return
        server = data.draw(st.sampled_from(sorted(self.w.linked, key=lambda s: s.n)))
        del self.w.linked[server]
        if how == "release":
            client = self.pool.server_ready(server)
            if client is not None:
                self._link(client, server)
        elif how == "reset":
            self.pool.server_busy(server)
        else:
            self.pool.server_gone(server)
            self.all_servers.discard(server)

    @rule(data=st.data())
    def reset_finishes(self, data: st.DataObject) -> None:
        if self.pool.busy:
            server = data.draw(st.sampled_from(sorted(self.pool.busy, key=lambda s: s.n)))
            client = self.pool.server_ready(server)
            if client is not None:
                self._link(client, server)

    @rule(data=st.data())
    def idle_server_dies(self, data: st.DataObject) -> None:
        if self.pool.idle:
            server = data.draw(st.sampled_from(list(self.pool.idle)))
            self.pool.server_gone(server)
            self.all_servers.discard(server)

    @rule(dt=st.floats(0, 3))
    def time_passes(self, dt: float) -> None:
        self.w.clock += dt

    # ---- invariants

    @invariant()
    def servers_are_in_exactly_one_place(self) -> None:
        p = self.pool
        idle = list(p.idle)
        assert len(idle) == len(set(idle)), "a server is idle twice"
        places = [set(idle), p.active, p.busy]
        for a in range(3):
            for b in range(a + 1, 3):
                assert not places[a] & places[b]
        assert set(idle) | p.active | p.busy == self.all_servers
        assert p.active == set(self.w.linked), "active servers are exactly the linked ones"
        assert p.server_count == len(idle) + len(p.active) + len(p.busy) + p.connecting

    @invariant()
    def no_one_waits_while_a_server_idles(self) -> None:
        if self.pool.idle:
            assert self.pool.live_waiters() == 0

    @invariant()
    def connects_stay_within_capacity(self) -> None:
        p = self.pool
        want = p.connects_wanted(now=self.w.clock)
        cap = p.capacity(self.w.clock)
        assert want >= 0
        assert want <= max(0, cap - p.server_count)
        assert p.limits.pool_size <= cap <= p.limits.pool_size + p.limits.reserve_pool_size
        oldest = p.oldest_wait_start()
        if p.limits.reserve_pool_size and oldest is not None and self.w.clock - oldest >= 2.0:
            assert cap == p.limits.pool_size + p.limits.reserve_pool_size
        if p.limits.min_pool_size and p.server_count < p.limits.min_pool_size:
            assert want >= min(p.limits.min_pool_size - p.server_count, cap - p.server_count)
        if p.live_waiters() > p.connecting + len(p.busy) and p.server_count < cap:
            assert want > 0, "clients wait and nothing will serve them"

    @invariant()
    def clients_are_served_first_come_first_served(self) -> None:
        # Only waiting clients are reordered by the pool; a client finding an idle server never waits,
        # so the served order restricted to clients that waited is increasing.
        waited = [n for n in self.w.served]
        live = [c.n for c in self.pool.waiting if not c.closed]
        assert live == sorted(live)
        if live and waited:
            # everyone served after the first still-waiting client arrived must have arrived earlier
            # than it or found an idle server (impossible while it waits: see the invariant above)
            first = live[0]
            later = [n for n in waited if n > first]
            assert not later, f"client {later[0]} overtook waiting client {first}"


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150 * SCALE, stateful_step_count=40, deadline=None)
