"""Coverage-guided fuzzer of pgmux's compiled data path (pgmux.engine), with atheris.

    bash scripts/fuzz.sh [RUNS]                      # builds the AddressSanitizer copy, then runs this
    python3 tests/fuzz/fuzz_engine.py [libFuzzer flags] [corpus dirs]
    python3 tests/fuzz/fuzz_engine.py --make-corpus DIR [--make-dict FILE]
    python3 tests/fuzz/fuzz_engine.py --replay FILE...  # one input at a time, without atheris

One input is one conversation over a linked fast pair (two socketpairs, a fake loop): its first byte
chooses the link flags and the harness's behaviour, the rest is split into steps. A step is a chunk
written to the client side and the server side in turn (its length is the step's header byte), or a
control operation (unlink, relink, pause, close, a large message that overflows a socket...);
`engine.run()` follows each step. The harness plays pgmux's Python side: after an escape it forwards
the escaped message itself and links again (inside the hook or after run(), as the input says), on
the slow path it forwards whole messages and tracks the framing, so that nothing is lost.

Checked after each step: nothing crashed (AddressSanitizer, when built with it), no hook raised, what
each far end received is a prefix of what the other far end wrote (nothing duplicated, dropped or
reordered), outstanding >= 0, carried values within what was written. At each hook: a transaction end
only with nothing outstanding, nothing pending, on a message boundary; an escape only of a message
the documented rules escape (a Python oracle). At the end of a conversation where nothing closed: the
byte streams are exact copies, every complete message the engine forwarded was one it must not escape,
ParameterStatus bodies and ReadyForQuery counts match the server stream, byte counters match.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from pgmux.auth.scram import ScramError, ScramServer, engine_offer
from pgmux.auth.secrets import ScramSecret
from pgmux.engine import C_LOGIN_STARTUP, LAZY_PREPARE, PIN_HINTS, SESSION, Engine, Link, PoolCore, PoolStats
from pgmux.engine._login import ScramLogin
from pgmux.engine._querystats import normalize
from pgmux.protocol import messages as m
from pgmux.protocol.sessionstate import _PLAIN_STARTS

FLAG_MASK = PIN_HINTS | LAZY_PREPARE | SESSION
OPT_SMALL_MAX_PACKET = 0x08
OPT_RELINK_IN_HOOK = 0x10
OPT_SLOW_PARTIAL = 0x20  # on the slow path, forward the start of a body (the engine gets `skip`)
OPT_BACK_PRESSURE = 0x40  # pause_writing/resume_writing hooks pause/resume the other side
OPT_RELINK_AT_END = 0x80  # engine_transaction_end: unlink and link again (a release and reuse)

QUERY_ROWS = 8  # query_stats_max of every conversation
CONTROL = 0xE0  # step header bytes from here on are control operations
SMALL_MAX_PACKET = 64
BIG = 70000  # more than the engine's HIGH_WATER and one read
BIG_BODY = struct.pack("!I", BIG + 4) + bytes(range(256)) * (BIG // 256) + bytes(BIG % 256)
MAX_BIGS = 4  # per conversation (each costs time, and one or two fill the socket buffers)
MAX_RELINK_DEPTH = 8
Q, P, C, X, B, D = ord("Q"), ord("P"), ord("C"), ord("X"), ord("B"), ord("D")
CLIENT_FORWARDED_TYPES = frozenset(b"BDESFHcfd")


class HarnessError(AssertionError):
    """An invariant of the engine does not hold."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise HarnessError(what)


def be32(b: bytes | bytearray, pos: int) -> int:
    return int.from_bytes(b[pos : pos + 4], "big")


def maybe_session_state(q: bytes) -> bool:
    """The fast path's keyword test (sessionstate.hint's first branch): False when surely plain."""
    head = q[:12].lstrip().lower()
    if head.startswith(_PLAIN_STARTS) and b";" not in q.rstrip(b" \t\r\n;"):
        low = q.lower()
        return b"advisory" in low or b"set_config" in low
    return True


def names_statement(body: bytes, typ: int) -> bool:
    """A Bind or Describe body names a prepared statement (or is malformed)."""
    if typ == B:
        pos = body.find(b"\0")
        if pos < 0:
            return True
        pos += 1
    else:
        if body[:1] != b"S":
            return False
        pos = 1
    return body.find(b"\0", pos) != pos


def escape_reason(data: bytes | bytearray, flags: int, max_packet: int) -> str | None:
    """Why the client side must turn slow at the message starting data (None: forward it), per
    _engine.pxd; None as well while the engine needs more bytes to decide."""
    if len(data) < 5:
        return None
    typ = data[0]
    ln = be32(data, 1)
    if ln < 4 or ln > max_packet:
        return "length"
    lazy = bool(flags & LAZY_PREPARE)
    if (typ in (Q, P, C, X) or (lazy and typ in (B, D))) and len(data) < 1 + ln:
        return None
    body = bytes(data[5 : 1 + ln])
    if lazy and typ in (B, D) and names_statement(body, typ):
        return "named Bind/Describe before tracking"
    if typ == Q:
        text = body[:-1]  # the text without its NUL (the engine does not check it is one)
        if b"atabase" in text or b"ATABASE" in text:
            return "database"
        if flags & PIN_HINTS and maybe_session_state(text):
            return "pin hints"
        return None
    if typ == P:
        end = body.find(b"\0")
        if end < 0:
            return "malformed Parse"
        if end > 0 and (flags & (LAZY_PREPARE | PIN_HINTS) or body.startswith(b"PGMUX_")):
            return "named Parse"
        if flags & PIN_HINTS:
            rest = body[end + 1 :]
            nl = rest.find(b"\0")
            if nl < 0 or maybe_session_state(rest[:nl]):
                return "pin hints"
        return None
    if typ == C:
        if ln >= 5 and body[0] == ord("S") and body[1:].startswith(b"PGMUX_"):
            return "reserved Close"
        return None
    if typ in CLIENT_FORWARDED_TYPES:
        return None
    return "type"


def messages(stream: bytes | bytearray) -> list[tuple[int, int, int]]:
    """(offset, type, total length) of each message whose header is in `stream`, up to a bad length."""
    out = []
    pos = 0
    while len(stream) - pos >= 5:
        ln = be32(stream, pos + 1)
        out.append((pos, stream[pos], 1 + ln))
        if ln < 4:
            break
        pos += 1 + ln
    return out


class FakeLoop:
    def __init__(self) -> None:
        self.ready: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.errors: list[dict[str, Any]] = []
        self.timers: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.ready.append((fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.timers.append((fn, args))  # (a lingering close's end: fired when the conversation ends)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        pass

    def remove_reader(self, fd: int) -> None:
        pass

    def drain(self) -> None:
        while self.ready:
            fn, args = self.ready.pop(0)
            fn(*args)


_SCRATCH_MV = memoryview(bytearray(65536))


class HLink(Link):
    """pgmux's ClientConnection/ServerConnection as far as the engine sees them."""

    def __init__(self, h: Conversation, side: str) -> None:
        self.h = h
        self.side = side
        self.buf = bytearray(4096)
        self.mv = memoryview(self.buf)
        self.keep = 0
        self.skip = 0

    # slow path reads (one shared buffer: buffer_updated copies at once)
    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH_MV

    def buffer_updated(self, nbytes: int) -> None:
        self.h.slow_read(self.side, bytes(_SCRATCH_MV[:nbytes]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.h.lost(self.side)

    def pause_writing(self) -> None:
        self.h.pause_writing(self.side)

    def resume_writing(self) -> None:
        self.h.resume_writing(self.side)

    # client hook
    def engine_escape(self, data: bytes) -> None:
        self.h.escape(data)

    # server hooks
    def engine_parameter_status(self, body: bytes) -> None:
        self.h.parameter_status.append(body)

    def engine_command_complete(self, tag: bytes) -> None:
        check(tag.startswith((b"DISCARD ALL", b"DEALLOCATE")), f"command_complete for {tag!r}")

    def engine_transaction_end(self) -> None:
        self.h.transaction_end()


_RECV = bytearray(262144)
_RECV_MV = memoryview(_RECV)


def recv_into(sock: socket.socket, out: bytearray) -> None:
    while True:
        try:
            n = sock.recv_into(_RECV)
        except OSError:  # (BlockingIOError included)
            return
        if not n:
            return
        out += _RECV_MV[:n]
        if n < len(_RECV):  # a socketpair gives all it has at once: no need for the EAGAIN call
            return


def send_some(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, OSError):
        return 0


class Conversation:
    def __init__(self, config: int) -> None:
        self.flags = config & FLAG_MASK
        self.opts = config
        self.max_packet = SMALL_MAX_PACKET if config & OPT_SMALL_MAX_PACKET else 0x7FFFFFFF
        self.loop = FakeLoop()
        self.eng = Engine(self.loop)
        self.c_app, c_eng = socket.socketpair()
        self.s_app, s_eng = socket.socketpair()
        for sock in (self.c_app, self.s_app, c_eng, s_eng):
            sock.setblocking(False)
        self.c = HLink(self, "client")
        self.s = HLink(self, "server")
        self.stats = PoolStats()
        self.s.link_stats = self.stats
        # per-query statistics on, in a table small enough that inputs evict rows
        self.eng.qstats.configure(QUERY_ROWS)
        core = PoolCore(None, deque(), set(), deque(), self.stats)
        core.enabled = False  # the harness links and releases itself
        core.qpool = self.eng.qstats.pool_id("db", "user")
        self.c.core = self.s.core = core
        self.c.max_packet_size = self.max_packet
        self.c.linger = True  # as pgmux's clients: a close lingers (Engine._end_link)
        self.ct = self.eng.adopt_fd(self.c, c_eng.detach())
        self.st = self.eng.adopt_fd(self.s, s_eng.detach())
        # what each far end wrote (and what of it is still to be written), and received
        self.client_written = bytearray()
        self.server_written = bytearray()
        self.client_backlog = bytearray()
        self.server_backlog = bytearray()
        self.server_received = bytearray()  # by PostgreSQL's end: the client's stream
        self.client_received = bytearray()  # by the client application: the server's stream
        self.c_app_reads = True
        self.s_app_reads = True
        self.alive = {"client": True, "server": True}
        self.exact = True  # nothing closed or refused: the streams must match exactly at the end
        # the harness's slow path (pgmux's Python side)
        self.held = bytearray()  # client bytes from a message boundary, not forwarded yet
        self.cskip = 0  # client body bytes to forward as they come
        self.sheld = bytearray()  # server bytes of the current message (forwarded), kept for its header
        self.sskip = 0
        self.harness_client_fwd = 0  # client bytes the harness forwarded (not counted by the engine)
        self.harness_server_fwd = 0
        self.harness_ranges: list[tuple[int, int]] = []  # [start, end) of the client stream
        self.parameter_status: list[bytes] = []
        self.slow_ready = 0
        self.want_relink = False
        self.stay_slow = False
        self.depth = 0
        self.transaction_ends = 0
        self.bigs = 0
        check(self.eng.link_fast(self.c, self.s, self.flags), "link_fast refused")

    # ------------------------------------------------------------ hooks

    def escape(self, data: bytes) -> None:
        c, s = self.c, self.s
        check(not c.fast and not s.fast, "escape: the pair is still fast")
        check(c.carried == (0, 0) and c.keep == 0 and c.skip == 0, f"escape: client carries {c.carried}")
        check(len(data) > 0, "escape with no data")
        reason = escape_reason(data, self.flags, self.max_packet)
        check(reason is not None, f"escape of a message the fast path decides: {bytes(data[:40])!r}")
        self.absorb_server()
        self.held += data
        self.client_process(first_only=True)
        if not self.can_relink():
            return  # the escaped message is not whole yet: slow until it is
        if self.opts & OPT_RELINK_IN_HOOK and self.depth < MAX_RELINK_DEPTH:
            self.relink()
        else:
            self.want_relink = True

    def can_relink(self) -> bool:
        """pgmux links again once it forwarded what it had to decide itself."""
        return (self.alive["client"] and self.alive["server"] and not self.stay_slow
                and escape_reason(self.held, self.flags, self.max_packet) is None)

    def transaction_end(self) -> None:
        s, c = self.s, self.c
        self.transaction_ends += 1
        check(s.fast, "transaction end on a slow link")
        check(s.outstanding == 0 and not s.pending_ext, f"transaction end with {s.outstanding} outstanding")
        check(s.carried == (0, 0), f"transaction end off a message boundary {s.carried}")
        check(not self.flags & SESSION, "transaction end in session mode")
        check(c.carried[1] == 0, "transaction end while the client is mid-message")
        if self.opts & OPT_RELINK_AT_END and self.depth < MAX_RELINK_DEPTH:
            self.unlink()
            self.relink()

    def lost(self, side: str) -> None:
        self.mark_dead(side)

    def pause_writing(self, side: str) -> None:
        if self.opts & OPT_BACK_PRESSURE:
            other = self.st if side == "client" else self.ct
            other.pause_reading()

    def resume_writing(self, side: str) -> None:
        if self.opts & OPT_BACK_PRESSURE:
            other = self.st if side == "client" else self.ct
            other.resume_reading()

    # ------------------------------------------------------------ the harness's slow path

    def mark_dead(self, side: str) -> None:
        if self.alive[side]:
            self.alive[side] = False
            self.exact = False
            self.eng.unlink(self.c)
            self.absorb_client()
            self.absorb_server()

    def absorb_client(self) -> None:
        """After unlink: what the engine carried for the client comes back to the harness."""
        c = self.c
        check(c.carried == (0, 0), "unlinked client still carries bytes in C")
        check(c.keep >= 0 and c.skip >= 0, "negative carried values")
        if c.keep:
            check(not self.held and not self.cskip, "client carried bytes twice")
            self.held += c.buf[: c.keep]
        if c.skip:
            check(not self.held and not self.cskip, "client carried bytes and body")
            self.cskip = c.skip
        c.keep = c.skip = 0

    def absorb_server(self) -> None:
        s = self.s
        check(s.carried == (0, 0), "unlinked server still carries bytes in C")
        if s.keep:
            check(not self.sheld and not self.sskip, "server carried bytes twice")
            self.sheld += s.buf[: s.keep]
        if s.skip:
            check(not self.sheld and not self.sskip, "server carried bytes and body")
            self.sskip = s.skip
        s.keep = s.skip = 0

    def forward_client(self, data: bytes | bytearray) -> None:
        start = self.stats.bytes_received + self.harness_client_fwd
        self.harness_ranges.append((start, start + len(data)))
        self.harness_client_fwd += len(data)
        self.st.write(bytes(data))

    def slow_read(self, side: str, data: bytes) -> None:
        if side == "client":
            self.client_feed(data)
        else:
            self.server_feed(data)

    def client_feed(self, data: bytes) -> None:
        if self.cskip:
            n = min(self.cskip, len(data))
            self.forward_client(data[:n])
            self.cskip -= n
            data = data[n:]
        self.held += data
        self.client_process(first_only=False)
        if self.can_relink():
            self.want_relink = True

    def client_process(self, first_only: bool) -> None:
        """Forward whole messages from `held` (the first only when the engine gets the rest)."""
        held = self.held
        pos = 0
        while len(held) - pos >= 5:
            typ = held[pos]
            ln = be32(held, pos + 1)
            if ln < 4 or ln > self.max_packet:  # pgmux refuses it and closes the client
                self.ct.abort()
                self.mark_dead("client")
                held.clear()
                return
            total = 1 + ln
            if len(held) - pos < total:
                if self.opts & OPT_SLOW_PARTIAL and typ not in (Q, P, C, X):
                    self.forward_client(held[pos:])
                    self.note(typ)
                    self.cskip = total - (len(held) - pos)
                    pos = len(held)
                break
            self.forward_client(held[pos : pos + total])
            self.note(typ)
            pos += total
            if first_only and not self.stay_slow:
                break
        del held[:pos]

    def note(self, typ: int) -> None:
        """pgmux's bookkeeping for a request it forwarded itself."""
        s = self.s
        if typ in (Q, ord("S"), ord("F")):
            s.request_sent(typ)
            if typ == ord("S"):
                s.pending_ext = False
        elif typ in b"PBDEC":
            s.pending_ext = True
        elif typ in b"cf":
            s.copy_end_py()

    def server_feed(self, data: bytes) -> None:
        """Slow server: cut-through to the client, then the framing (what the engine would keep)."""
        self.harness_server_fwd += len(data)
        self.ct.write(data)
        pos = 0
        if self.sskip and not self.sheld:
            n = min(self.sskip, len(data))
            self.sskip -= n
            pos = n
        buf = self.sheld + data[pos:]
        p = 0
        while len(buf) - p >= 5:
            typ = buf[p]
            ln = be32(buf, p + 1)
            if ln < 4:  # pgmux closes such a server
                self.st.abort()
                self.mark_dead("server")
                self.sheld = bytearray()
                return
            total = 1 + ln
            whole = len(buf) - p >= total
            if typ in b"ZSC" and not whole:
                break
            if typ == ord("Z") and ln >= 5:
                self.s.ready(buf[p + 5])
                self.slow_ready += 1
            elif typ == ord("S"):
                self.parameter_status.append(bytes(buf[p + 5 : p + total]))
            elif typ == ord("G"):
                self.s.copy_started_py()
            if not whole:
                self.sskip = total - (len(buf) - p)
                p = len(buf)
                break
            p += total
        self.sheld = bytearray(buf[p:])

    def unlink(self) -> None:
        self.eng.unlink(self.c)
        check(not self.c.fast and not self.s.fast, "unlink left a side fast")
        self.absorb_client()
        self.absorb_server()

    def relink(self) -> None:
        self.want_relink = False
        if not (self.alive["client"] and self.alive["server"]) or self.stay_slow:
            return
        if self.c.fast:
            return
        c, s = self.c, self.s
        for link, held, skip in ((c, self.held, self.cskip), (s, self.sheld, self.sskip)):
            link.buf = bytearray(max(4096, 2 * len(held)))
            link.buf[: len(held)] = held
            link.mv = memoryview(link.buf)
            link.keep = len(held)
            link.skip = skip
        self.held = bytearray()
        self.sheld = bytearray()
        self.cskip = self.sskip = 0
        self.depth += 1
        try:
            check(self.eng.link_fast(c, s, self.flags), "link_fast refused two open links")
        finally:
            self.depth -= 1
        if c.fast:  # (an escape inside link_fast handed everything back already)
            check(c.keep == 0 and c.skip == 0 and s.keep == 0 and s.skip == 0, "link_fast left keep/skip")

    # ------------------------------------------------------------ driving

    def write(self, side: str, data: bytes) -> None:
        if side == "client":
            self.client_written += data
            self.client_backlog += data
        else:
            self.server_written += data
            self.server_backlog += data
        self.pump()

    def pump(self) -> None:
        for sock, backlog in ((self.c_app, self.client_backlog), (self.s_app, self.server_backlog)):
            if backlog:
                n = send_some(sock, bytes(backlog[:262144]))
                del backlog[:n]

    def step(self) -> None:
        self.eng.run()
        self.after_run()

    def after_run(self) -> None:
        if self.loop.errors:
            exc = self.loop.errors[0].get("exception")
            if isinstance(exc, BaseException):
                raise exc
            raise HarnessError(str(self.loop.errors[0]))
        self.loop.drain()
        for _ in range(1000):
            if not self.want_relink:
                break
            self.relink()
        if self.c_app_reads:
            recv_into(self.c_app, self.client_received)
        if self.s_app_reads:
            recv_into(self.s_app, self.server_received)
        self.pump()
        self.check_step()

    def check_step(self) -> None:
        n = len(self.server_received)
        check(self.server_received == self.client_written[:n], "server got other bytes than the client sent")
        n = len(self.client_received)
        check(self.client_received == self.server_written[:n], "client got other bytes than the server sent")
        for link, written in ((self.c, self.client_written), (self.s, self.server_written)):
            keep, skip = link.carried
            check(0 <= keep <= len(written), f"{link.side} keeps {keep} of {len(written)} bytes")
            check(0 <= skip < 1 << 32, f"{link.side} skip {skip}")
            check(link.outstanding >= 0, f"outstanding {link.outstanding}")
        check(self.c.fast == self.s.fast or not all(self.alive.values()), "one side fast, the other slow")

    def control(self, op: int) -> None:
        c_alive, s_alive = self.alive["client"], self.alive["server"]
        if op == 0:
            self.unlink()
            self.stay_slow = True
        elif op == 1:
            self.stay_slow = False
            self.client_process(first_only=False)
            self.relink()
        elif op == 2:
            self.c_app_reads = not self.c_app_reads
        elif op == 3:
            self.s_app_reads = not self.s_app_reads
        elif op in (4, 5) and self.bigs < MAX_BIGS:  # a message larger than a read and the high water
            self.bigs += 1
            self.write("server" if op == 4 else "client", (b"D" if op == 4 else b"d") + BIG_BODY)
        elif op == 6 and c_alive:
            self.ct.pause_reading()
        elif op == 7 and c_alive:
            self.ct.resume_reading()
        elif op == 8 and s_alive:
            self.st.pause_reading()
        elif op == 9 and s_alive:
            self.st.resume_reading()
        elif op == 10 and c_alive:
            self.ct.close()
            self.mark_dead("client")
        elif op == 11 and s_alive:
            self.st.close()
            self.mark_dead("server")
        elif op == 12 and c_alive:
            self.c_app.shutdown(socket.SHUT_WR)
            self.exact = False
        elif op == 13 and s_alive:
            self.s_app.shutdown(socket.SHUT_WR)
            self.exact = False
        elif op == 14 and c_alive:
            self.ct.abort()
            self.mark_dead("client")
        elif op == 15 and s_alive:
            self.st.abort()
            self.mark_dead("server")
        # other values: one more run() with nothing new

    def settle(self) -> None:
        """Let everything through: both far ends read, no side paused, run until nothing moves."""
        self.c_app_reads = self.s_app_reads = True
        if self.alive["client"]:
            self.ct.resume_reading()
        if self.alive["server"]:
            self.st.resume_reading()
        quiet = 0
        before = self.progress()
        for _ in range(100000):
            self.step()
            after = self.progress()
            quiet = quiet + 1 if before == after else 0
            if quiet >= 3:
                break
            before = after
        else:
            raise HarnessError("the conversation does not settle")

    def progress(self) -> tuple[Any, ...]:
        return (len(self.client_received), len(self.server_received), len(self.client_backlog),
                len(self.server_backlog), self.ct.get_write_buffer_size(), self.st.get_write_buffer_size(),
                self.c.carried, self.s.carried, len(self.held), len(self.sheld), self.cskip, self.sskip,
                self.eng.reads)

    def finish(self) -> None:
        self.settle()
        if self.c.fast:
            self.unlink()
        if not self.exact:
            return
        check(not self.client_backlog and not self.server_backlog, "far ends could not write everything")
        check(self.ct.get_write_buffer_size() == 0 and self.st.get_write_buffer_size() == 0, "queues not empty")
        check(self.server_received + self.held == self.client_written,
              "client stream: forwarded + kept != written")
        check(self.client_received == self.server_written, "server stream: forwarded != written")
        check(self.stats.bytes_received + self.harness_client_fwd == len(self.server_received),
              "bytes_received does not count what the engine forwarded")
        check(self.stats.bytes_sent + self.harness_server_fwd == len(self.server_written),
              "bytes_sent does not count what the engine forwarded")
        # every message the engine forwarded itself is one it must not escape
        ranges = self.harness_ranges
        ri = 0
        for pos, _typ, total in messages(self.server_received):
            while ri < len(ranges) and ranges[ri][1] <= pos:
                ri += 1
            if ri < len(ranges) and ranges[ri][0] <= pos < ranges[ri][1]:
                continue  # the harness forwarded it
            part = self.server_received[pos : pos + total]
            reason = escape_reason(part, self.flags, self.max_packet)
            check(reason is None, f"the engine forwarded a message to escape ({reason}): {bytes(part[:40])!r}")
        # the server stream's ParameterStatus and ReadyForQuery messages, each seen once
        expect_ps = []
        expect_z = 0
        for pos, typ, total in messages(self.server_written):
            if pos + total > len(self.server_written):
                break
            if typ == ord("S"):
                expect_ps.append(bytes(self.server_written[pos + 5 : pos + total]))
            elif typ == ord("Z") and total >= 6:
                expect_z += 1
        check(self.parameter_status == expect_ps, "ParameterStatus bodies differ from the server stream")
        check(self.stats.query_count == expect_z, f"{self.stats.query_count} ReadyForQuery counted, {expect_z} sent")
        rows = self.eng.qstats.export(hist=True)
        check(len(self.eng.qstats) <= QUERY_ROWS, "the query-statistics table outgrew query_stats_max")
        calls = sum(r[4] for r in rows)
        check(calls <= expect_z, f"{calls} statement calls counted for {expect_z} ReadyForQuery")
        check(all(r[4] > 0 and r[9] <= r[11] <= r[12] <= r[13] <= r[10] for r in rows),
              f"statement rows out of order: {rows}")

    def close(self) -> None:
        for t in (self.ct, self.st):
            t.abort()
        self.c_app.close()
        self.s_app.close()
        for fn, args in self.loop.timers:
            fn(*args)
        self.loop.drain()
        self.c.h = self.s.h = None  # type: ignore[assignment]


def run_one(data: bytes) -> None:
    """One conversation; raises on a broken invariant. The input is also a statement text for the
    per-query statistics' normalizer, whose text may not be longer than its own limit."""
    if not data:
        return
    _fp, text = normalize(data)
    check(len(text.encode("utf-8", "replace")) <= 3 * 1024, "normalized text too long")
    h = Conversation(data[0])
    try:
        pos = 1
        side = 0
        while pos < len(data):
            hd = data[pos]
            pos += 1
            if hd >= CONTROL:
                h.control(hd - CONTROL)
            else:
                chunk = data[pos : pos + hd]
                pos += hd
                if chunk:
                    h.write("client" if side == 0 else "server", chunk)
                side ^= 1
            h.step()
        h.finish()
    finally:
        h.close()


# ---------------------------------------------------------------- the C login (Engine._login_read)

LOGIN_INNER = b"0123456789abcdef" * 2  # md5(password + user) as hex digits: any 32 will do
LOGIN_SALT = b"\x01\x02\x03\xfe"
# A stored SCRAM secret for the engine's SCRAM exchange (config & 3 == 3), and its offer.
LOGIN_SCRAM = str(ScramSecret.from_password("pw", salt=b"fuzzsaltfuzzsalt", iterations=16))
LOGIN_SCRAM_OFFER = engine_offer(LOGIN_SCRAM)
AUTH_SASL_SCRAM = b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"
# In a client's login bytes, where the SCRAM nonce goes: replaced by the server's nonce once the
# engine sent it (the length word of the 'p' message before it grows to match), so that inputs can
# reach the proof check.
NONCE_MARK = b"@NONCE@"


class LoginLink(Link):
    """A client whose login the engine reads in C; its hooks check what the engine hands Python
    against the bytes the client sent (Python's own reader and md5 as the oracle)."""

    def __init__(self, h: LoginConversation) -> None:
        self.h = h
        self.keep = 0
        self.skip = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH_MV

    def buffer_updated(self, nbytes: int) -> None:  # after the C login: Python's own reads
        self.h.python_read += bytes(_SCRATCH_MV[:nbytes])

    def connection_lost(self, exc: Exception | None) -> None:
        self.h.closed = True

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def engine_startup(self, code: int, params: dict[str, str], route_key: bytes | None = None) -> Any:
        return self.h.startup(code, params, route_key)

    def engine_password_checked(self, ok: bool, sasl_final: bytes = b"", client_key: bytes | None = None) -> None:
        if self.h.scram:
            self.h.scram_checked(ok, sasl_final, client_key)
        else:
            check(not sasl_final and client_key is None, "SCRAM results from an md5 exchange")
            self.h.password_checked(ok)

    def engine_login_escape(self, data: bytes, exchange: ScramLogin | None = None) -> None:
        self.h.login_escape(data, exchange)


class LoginConversation:
    """The client side's bytes, fed in chunks to a link in C-login mode. `consumed`: how far the
    engine took the stream (requests answered N, the startup packet, the password message)."""

    def __init__(self, config: int) -> None:
        self.md5 = bool(config & 1)  # engine_startup asks the engine to check an md5 answer
        self.scram = config & 3 == 3  # ... to run a SCRAM exchange instead
        self.server_first = b""  # the SCRAM server-first-message the engine sent
        self.first_bare = b""  # ... and the client-first-message-bare it answered
        self.flag = "n"  # ... whose gs2 flag
        self.received = bytearray()  # what the client got so far
        self.chunk = 1 + (config >> (2 if self.scram else 1))  # bytes sent per engine run
        self.loop = FakeLoop()
        self.eng = Engine(self.loop)  # type: ignore[arg-type]
        self.eng.offer_tls = bool(config & 0x80)
        self.app, eng_end = socket.socketpair()
        self.app.setblocking(False)
        eng_end.setblocking(False)
        self.link = LoginLink(self)
        self.link.max_packet_size = 100 if config & 0x40 else 0x7FFFFFFF
        self.transport = self.eng.adopt_fd(self.link, eng_end.detach())
        self.link.engine_login = C_LOGIN_STARTUP
        self.sent = bytearray()
        self.consumed = 0
        self.answers_expected = bytearray()  # what the engine must have written to the client
        self.python_read = bytearray()  # bytes Python's login got (escape, then its own reads)
        self.handed = False  # the login is Python's from here on
        self.awaiting_password = False
        self.closed = False

    def answerable_requests(self) -> int:
        """SSL/GSS requests at the start of what the engine has not consumed that it may answer N
        (an SSLRequest only while TLS is off), each whole."""
        n, pos = 0, self.consumed
        while len(self.sent) >= pos + 8 and be32(self.sent, pos) == 8 and (
                be32(self.sent, pos + 4) == 80877104 or (be32(self.sent, pos + 4) == 80877103
                                                        and not self.eng.offer_tls)):
            n += 1
            pos += 8
        return n

    def answered(self, upto: int) -> None:
        """The engine consumed requests up to `upto`, answering each N."""
        k, rest = divmod(upto - self.consumed, 8)
        check(rest == 0 and 0 <= k <= self.answerable_requests(), "requests consumed that are not answerable")
        self.answers_expected += b"N" * k
        self.consumed = upto

    def startup(self, code: int, params: dict[str, str], route_key: bytes | None) -> Any:
        check(not self.handed and not self.awaiting_password, "engine_startup out of turn")
        # the startup packet is what follows the requests the engine answered (nothing after it)
        pos = self.consumed + 8 * self.answerable_requests()
        length = len(self.sent) - pos
        self.answered(pos)
        check(length >= 8 and be32(self.sent, pos) == length, "engine_startup: not one whole packet after the requests")
        check(len(self.sent) == pos + length, "engine_startup with bytes after the packet")
        check(be32(self.sent, pos + 4) == code, "engine_startup: wrong protocol code")
        try:
            expected = m.parse_startup_packet(bytes(self.sent[pos : pos + length])).params
        except m.ProtocolError:
            raise HarnessError("engine_startup for a packet Python refuses") from None
        check(params == expected, f"startup params {params!r} != {expected!r}")
        check(route_key == (bytes(self.sent[pos + 8 : pos + length]) if code == 196608 else None),
              "engine_startup: the route key is not the packet's body")
        self.consumed = pos + length
        if not self.md5:
            self.handed = True
            return None
        self.awaiting_password = True
        if self.scram:
            self.answers_expected += AUTH_SASL_SCRAM
            return LOGIN_SCRAM_OFFER
        self.answers_expected += b"R\0\0\0\x0c\0\0\0\x05" + LOGIN_SALT
        return LOGIN_INNER + LOGIN_SALT

    def password_checked(self, ok: bool) -> None:
        check(self.awaiting_password and not self.handed, "engine_password_checked out of turn")
        pos = self.consumed
        check(self.sent[pos] == ord("p"), "a password message of another type")
        length = be32(self.sent, pos + 1)
        check(len(self.sent) == pos + 1 + length, "engine_password_checked with bytes after the message")
        body = bytes(self.sent[pos + 5 : pos + 1 + length]).rstrip(b"\0")
        right = b"md5" + hashlib.md5(LOGIN_INNER + LOGIN_SALT).hexdigest().encode()
        check(ok == (body == right), f"md5 answer {body!r} judged {ok}")
        self.consumed = pos + 1 + length
        self.awaiting_password = False
        self.handed = True

    def scram_first_taken(self) -> None:
        """The engine answered the SASLInitialResponse at `consumed` (the client's SASLContinue
        is the last thing it got): check both against Python's exchange, and consume it."""
        self.read_answers()
        pos = self.consumed
        check(self.sent[pos] == ord("p"), "a SASLInitialResponse of another type")
        length = be32(self.sent, pos + 1)
        mech, data = m.parse_sasl_initial_response(bytes(self.sent[pos + 5 : pos + 1 + length]))
        check(mech == "SCRAM-SHA-256", f"SASL mechanism {mech!r} taken")
        ScramServer(LOGIN_SCRAM, "u").handle_client_first(data)  # (raises if Python refuses it)
        check(self.received.startswith(self.answers_expected), f"answers {bytes(self.received)!r}")
        answer = bytes(self.received[len(self.answers_expected) :])
        check(answer[:1] == b"R" and be32(answer, 1) == len(answer) - 1 and be32(answer, 5) == 11,
              f"SASLContinue {answer!r}")
        server_first = answer[9:]
        client_nonce = data.split(b",r=", 1)[1]
        check(server_first.startswith(b"r=" + client_nonce) and len(server_first) == 2 + len(client_nonce) + 24
              + len(LOGIN_SCRAM_OFFER[2]) and server_first.endswith(LOGIN_SCRAM_OFFER[2]),
              f"server-first-message {server_first!r}")
        self.answers_expected += answer
        self.consumed = pos + 1 + length
        self.server_first, self.first_bare, self.flag = server_first, data[3:], chr(data[0])

    def scram_checked(self, ok: bool, sasl_final: bytes, client_key: bytes | None) -> None:
        check(self.awaiting_password and not self.handed, "engine_password_checked out of turn")
        if not self.server_first:
            self.scram_first_taken()
        pos = self.consumed
        check(self.sent[pos] == ord("p"), "a SASLResponse of another type")
        length = be32(self.sent, pos + 1)
        check(len(self.sent) == pos + 1 + length, "engine_password_checked with bytes after the message")
        server = ScramServer.resumed(LOGIN_SCRAM, "u", self.first_bare, self.server_first, self.flag)
        try:
            final = server.handle_client_final(bytes(self.sent[pos + 5 : pos + 1 + length]))
        except ScramError as exc:
            check(exc.wrong_password and not ok, f"SCRAM answer judged {ok}, Python: {exc}")
        else:
            check(ok and sasl_final[9:] == final and client_key == server.client_key, "SCRAM exchange differs")
        self.consumed = pos + 1 + length
        self.awaiting_password = False
        self.handed = True

    def read_answers(self) -> None:
        while True:
            try:
                got = self.app.recv(65536)
            except BlockingIOError:
                return
            if not got:
                return
            self.received += got

    def login_escape(self, data: bytes, exchange: ScramLogin | None) -> None:
        check(not self.handed, "engine_login_escape after the login was handed over")
        if exchange is not None:
            check(self.scram and self.awaiting_password, "a SCRAM exchange handed over out of turn")
            if exchange.server_first is not None:
                check(not self.server_first or self.server_first == exchange.server_first, "another server-first")
                if not self.server_first:
                    self.scram_first_taken()
                check(exchange.server_first == self.server_first, "the exchange's server-first differs")
        start = len(self.sent) - len(data)
        check(bytes(self.sent[start:]) == data, "escaped bytes are not the end of the stream")
        if not self.awaiting_password:
            self.answered(start)  # (requests answered N before the escape)
        check(start == self.consumed, "escaped bytes are not the stream's unconsumed ones")
        self.python_read += data
        self.handed = True

    def run(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self.closed:
                break
            if self.scram and not self.server_first and NONCE_MARK in data[i:]:
                self.read_answers()
                if self.answers_expected.startswith(AUTH_SASL_SCRAM) and len(self.received) > len(
                        self.answers_expected) and self.awaiting_password:
                    data = data[:i] + self.with_nonce(data[i:])
            piece = data[i : i + self.chunk]
            try:
                self.app.sendall(piece)
            except OSError:
                break
            self.sent += piece
            i += len(piece)
            self.eng.run()
            check(not self.loop.errors, f"a hook raised: {self.loop.errors[:1]}")
            self.loop.drain()
        self.read_answers()
        if self.scram and self.awaiting_password and not self.server_first and len(self.received) > len(
                self.answers_expected):
            self.scram_first_taken()  # (the exchange waits for the client's final message)
        if not self.closed and self.handed:
            # everything the client sent reached Python's login once the C login handed over
            check(bytes(self.sent[self.consumed :]) == bytes(self.python_read), "bytes lost after the C login")
        elif not self.closed and not self.awaiting_password:  # still reading the startup: requests answered
            self.answers_expected += b"N" * self.answerable_requests()
        self.read_answers()
        check(bytes(self.received) == bytes(self.answers_expected), f"answers {bytes(self.received)!r}")

    def nonce_now(self) -> bytes:
        """The whole SCRAM nonce of the SASLContinue the client got (NONCE_MARK's stand-in)."""
        answer = bytes(self.received[len(AUTH_SASL_SCRAM) :])
        return answer[11:].split(b",", 1)[0] if answer[:1] == b"R" and len(answer) > 11 else NONCE_MARK

    def with_nonce(self, rest: bytes) -> bytes:
        """`rest` of the input with NONCE_MARK replaced by the server's nonce."""
        nonce = self.nonce_now()
        j = rest.index(NONCE_MARK)
        out = bytearray(rest[:j] + nonce + rest[j + len(NONCE_MARK) :])
        k = out.rfind(b"p", 0, j - 4)
        if k >= 0:
            struct.pack_into("!I", out, k + 1, (be32(out, k + 1) + len(nonce) - len(NONCE_MARK)) & 0xFFFFFFFF)
        return bytes(out)

    def close(self) -> None:
        self.transport.abort()
        self.app.close()
        self.loop.drain()
        self.link.h = None  # type: ignore[assignment]


def run_login(data: bytes) -> None:
    """The same input as a client's login bytes: data[0] configures, the rest is sent in chunks."""
    if not data:
        return
    h = LoginConversation(data[0])
    try:
        h.run(data[1:])
    finally:
        h.close()


# ---------------------------------------------------------------- seeds


def msg(typ: bytes, body: bytes = b"") -> bytes:
    return typ + struct.pack("!I", len(body) + 4) + body


def chunks(flags: int, steps: list[tuple[str, bytes] | int]) -> bytes:
    """An input: the config byte, then steps (client/server chunks in turn, or control ops)."""
    out = bytearray([flags])
    side = "client"
    for st in steps:
        if isinstance(st, int):
            out.append(CONTROL + st)
            continue
        want, data = st
        if want != side:
            out.append(0)  # an empty chunk turns to the other side
            side = want
        while True:
            piece, data = data[:CONTROL - 1], data[CONTROL - 1 :]
            out.append(len(piece))
            out += piece
            side = "server" if side == "client" else "client"
            if not data:
                break
            out.append(0)
            side = "server" if side == "client" else "client"
    return bytes(out)


def seeds() -> list[bytes]:
    qry = msg(b"Q", b"select 1\0")
    ext = msg(b"P", b"\0select $1\0\0\0") + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S")
    answer = msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")
    ext_answer = msg(b"1") + msg(b"2") + msg(b"D", b"\0\1\0\0\0\1x") + answer
    ps = msg(b"S", b"TimeZone\0UTC\0")
    notice = msg(b"N", b"SNOTICE\0Mhi\0\0")
    big_copy = msg(b"d", b"x" * 100)
    return [
        chunks(0, [("client", qry), ("server", answer)]),
        chunks(0, [("client", ext), ("server", ext_answer)]),
        chunks(PIN_HINTS, [("client", msg(b"Q", b"set x = 1\0") + qry), ("server", answer + answer)]),
        chunks(LAZY_PREPARE, [("client", msg(b"P", b"s1\0select 1\0\0\0") + msg(b"S")),
                              ("server", msg(b"1") + msg(b"Z", b"I"))]),
        chunks(OPT_RELINK_IN_HOOK, [("client", msg(b"X"))]),
        chunks(0, [("client", qry), ("server", answer[:7]), ("server", answer[7:] + notice[:3]),
                   ("server", notice[3:])]),
        chunks(OPT_RELINK_AT_END, [("client", qry),
                                   ("server", msg(b"C", b"DISCARD ALL\0") + ps + msg(b"Z", b"I"))]),
        chunks(0, [("client", msg(b"Q", b"copy t from stdin\0")), ("server", msg(b"G", b"\0\0\0")),
                   ("client", msg(b"d", b"1\n") + msg(b"c")), ("server", answer)]),
        chunks(OPT_BACK_PRESSURE, [2, ("client", qry), 4, 4, 4, 2]),
        chunks(OPT_SLOW_PARTIAL, [("client", qry), 0, ("client", big_copy[:50]), 1, ("client", big_copy[50:])]),
        chunks(SESSION | OPT_SMALL_MAX_PACKET, [("client", big_copy)]),
        chunks(0, [("client", msg(b"Q", b"drop database x\0") + qry), ("server", answer + answer)]),
        chunks(0, [("client", msg(b"C", b"SPGMUX_1\0") + msg(b"S")), ("server", msg(b"3") + msg(b"Z", b"I"))]),
        chunks(0, [("client", qry), 10, ("server", answer)]),
        chunks(0, [("client", qry), ("server", b"Z\0\0\0\2")]),
        *login_seeds(),
    ]


def login_seeds() -> list[bytes]:
    """Inputs for run_login (run_one reads them too): a config byte, then a client's login bytes."""
    body = struct.pack("!I", 196608) + b"user\0bob\0database\0db\0application_name\0x\0\0"
    startup = struct.pack("!I", 4 + len(body)) + body
    ssl, gss = struct.pack("!II", 8, 80877103), struct.pack("!II", 8, 80877104)
    answer = b"md5" + hashlib.md5(LOGIN_INNER + LOGIN_SALT).hexdigest().encode() + b"\0"
    return [
        bytes([1 | (14 << 1)]) + ssl + startup + msg(b"p", answer),
        bytes([1 | (2 << 1)]) + gss + startup + msg(b"p", answer[:-2] + b"0\0"),
        bytes([0 | (63 << 1)]) + startup + msg(b"p", b"secret\0"),
        bytes([0x80 | 1]) + ssl + startup,
        bytes([1]) + startup + msg(b"p", answer) + msg(b"Q", b"select 1\0"),
        bytes([0x40 | 1]) + startup,
        *scram_seeds(startup),
    ]


def scram_seeds(startup: bytes) -> list[bytes]:
    """The engine's SCRAM exchange (config & 3 == 3): a wrong proof, a right one cannot be made
    (the server's nonce is random, NONCE_MARK stands for it), extensions, a wrong nonce."""
    def initial(data: bytes, mech: bytes = b"SCRAM-SHA-256") -> bytes:
        return msg(b"p", mech + b"\0" + struct.pack("!i", len(data)) + data)

    first = b"n,,n=,r=fuzznonce"
    proof = base64.b64encode(b"p" * 32)
    final = msg(b"p", b"c=biws,r=" + NONCE_MARK + b",p=" + proof)
    return [
        bytes([3]) + startup + initial(first) + final,
        bytes([3 | (31 << 2)]) + startup + initial(first) + final,
        bytes([3]) + startup + initial(b"y,,n=u,r=abc") + msg(b"p", b"c=eSws,r=" + NONCE_MARK + b",p=" + proof),
        bytes([3]) + startup + initial(first + b",x=1") + final,
        bytes([3]) + startup + initial(first) + msg(b"p", b"c=biws,r=other,p=" + proof),
        bytes([3]) + startup + initial(first, b"SCRAM-SHA-1"),
        bytes([3 | (15 << 2)]) + startup + initial(first),
        bytes([3]) + startup + initial(first) + msg(b"p", b"c=biws,r=" + NONCE_MARK + b",x=1,p=" + proof),
    ]


DICTIONARY = [b"Q", b"P", b"B", b"E", b"S", b"Z", b"X", b"C", b"G", b"\x00\x00\x00\x04", b"\x00\x00\x00\x05I",
              b"select", b"set ", b"set_config", b"advisory", b"atabase", b"ATABASE", b"PGMUX_", b"DISCARD ALL",
              b"DEALLOCATE", b"TimeZone\x00", b";", b"\xe0", b"\xe1", b"\xe4", b"\xea",
              b"\x00\x03\x00\x00", b"\x04\xd2\x16\x2f", b"\x04\xd2\x16\x30", b"user\x00", b"database\x00", b"md5",
              b"SCRAM-SHA-256\x00", b"n,,n=", b",r=", b",p=", b"c=biws", NONCE_MARK]


def make_corpus(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    for i, data in enumerate(seeds()):
        with open(os.path.join(path, f"seed-{i:02d}"), "wb") as f:
            f.write(data)


def make_dict(path: str) -> None:
    with open(path, "w") as f:
        for word in DICTIONARY:
            f.write('"' + "".join(f"\\x{b:02x}" for b in word) + '"\n')


# ---------------------------------------------------------------- entry points


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


_count = [0, 0]


def test_one_input(data: bytes) -> None:
    run_one(data)
    run_login(data)
    _count[0] += 1
    if _count[0] % 1000 == 0:
        # A closed link and its EngineTransport reference each other, and a link its Engine (whose
        # epoll fd closes when it is freed): the cyclic GC frees them. After a collection, no fd of
        # the inputs run so far may remain open.
        gc.collect()
        n = open_fds()
        if not _count[1]:
            _count[1] = n
        check(n <= _count[1] + 4, f"file descriptors leak: {n} open, {_count[1]} after the first inputs")


def main(argv: list[str]) -> None:
    if len(argv) > 2 and argv[1] == "--make-corpus":
        make_corpus(argv[2])
        if len(argv) > 4 and argv[3] == "--make-dict":
            make_dict(argv[4])
        return
    if len(argv) > 1 and argv[1] == "--replay":
        for name in argv[2:]:
            with open(name, "rb") as f:
                data = f.read()
            run_one(data)
            run_login(data)
            print(f"{name}: ok")
        return
    import atheris  # noqa: PLC0415 (only the fuzzing entry point needs it)

    import pgmux.engine._engine as compiled

    print(f"fuzz_engine: engine from {compiled.__file__}", file=sys.stderr)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
