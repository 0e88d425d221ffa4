"""TLS links in the engine over socketpairs: after the handshake (Python's ssl), the records are read
and written by OpenSSL from C (pgmux/engine/_ossl.pyx), or, with `Engine.native_tls` off, through
the ssl.SSLObject's methods; every test runs both ways and expects the same bytes and the same ends.

The application's end is a real TLS client (ssl.SSLObject over MemoryBIOs, driven by hand), so
each step is deterministic: records cut at any byte, a record's worth of plaintext more than a
read takes, close_notify, a corrupted record.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgmux.engine import Engine, PoolStats, _ossl
from pgmux.testing.tls import make_ca
from tests.unit.test_engine import FakeLoop, TLink, query, recv_all

pytestmark = pytest.mark.skipif(not _ossl.available(), reason="OpenSSL's functions not found beside Python's _ssl")


class Waiter:
    """What Engine.start_tls needs of a future."""

    def __init__(self) -> None:
        self.result: Any = None
        self.exc: BaseException | None = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, value: Any) -> None:
        self.result, self.finished = value, True

    def set_exception(self, exc: BaseException) -> None:
        self.exc, self.finished = exc, True


class TlsLoop(FakeLoop):
    def create_future(self) -> Waiter:
        return Waiter()


class TlsClient:
    """The application's end: a TLS client over its socket, pumped by hand."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, on_send: Callable[[], None]) -> None:
        self.sock = sock
        self.on_send = on_send  # runs the engine after each send
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=False)

    def pump_out(self, chunk: int = 0) -> None:
        data = self.out.read()
        step = chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            self.sock.sendall(data[i : i + step])
            self.on_send()

    def pump_in(self) -> None:
        data = recv_all(self.sock)
        if data:
            self.inc.write(data)

    def send(self, data: bytes, chunk: int = 0) -> None:
        self.obj.write(data)
        self.pump_out(chunk)

    def received(self) -> bytes:
        self.pump_in()
        out = bytearray()
        while True:
            try:
                out += self.obj.read(1 << 20)
            except ssl.SSLWantReadError:
                return bytes(out)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    d: Path = tmp_path_factory.mktemp("tls")
    cert, key = make_ca(d).issue_server(d)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


class TlsPair:
    """A TLS client link and a plain server link; `native`: Engine.native_tls."""

    def __init__(self, contexts: tuple[ssl.SSLContext, ssl.SSLContext], native: bool) -> None:
        self.loop = TlsLoop()
        self.eng = Engine(self.loop)  # type: ignore[arg-type]
        self.eng.native_tls = native
        c_app, c_eng = socket.socketpair()
        self.s_app, s_eng = socket.socketpair()
        for sock in (c_app, self.s_app, c_eng, s_eng):
            sock.setblocking(False)
        self.c = TLink("client")
        self.s = TLink("server")
        self.s.link_stats = PoolStats()
        self.ct = self.eng.adopt_fd(self.c, c_eng.detach())
        self.st = self.eng.adopt_fd(self.s, s_eng.detach())
        self.app = TlsClient(c_app, contexts[1], self.run)
        self.waiter: Any = self.eng.start_tls(self.c, contexts[0], server_side=True)
        self.handshake()

    def run(self) -> None:
        self.eng.run()
        self.loop.drain()

    def handshake(self) -> None:
        for _ in range(20):
            try:
                self.app.obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                if self.waiter.done():
                    break
            self.app.pump_out()
            self.app.pump_in()
        assert self.waiter.done() and self.waiter.exc is None, self.waiter.exc
        self.app.pump_out()  # anything the client has left (nothing in TLS 1.3 after Finished)

    def close(self) -> None:
        self.ct.abort()
        self.st.abort()
        self.app.sock.close()
        self.s_app.close()
        self.loop.drain()


@pytest.fixture(params=[True, False], ids=["native", "python"])
def tls_pair(request: pytest.FixtureRequest, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[TlsPair]:
    p = TlsPair(contexts, request.param)
    yield p
    p.close()


def test_records_go_through_c_only_when_native(tls_pair: TlsPair) -> None:
    native = tls_pair.eng.native_tls
    assert tls_pair.c.tls_native is native
    counters = tls_pair.eng.stats()
    assert (counters["tls_native"], counters["tls_python"]) == ((1, 0) if native else (0, 1))


def test_linked_round_trip_small_and_large(tls_pair: TlsPair) -> None:
    p = tls_pair
    assert p.eng.link_fast(p.c, p.s, 0)
    q = query("select 1")
    p.app.send(q)
    assert recv_all(p.s_app) == q
    # a result far larger than one read (SHARED_SIZE) and than a TLS record (16 KiB)
    row = b"D" + (4 + 2 + 4 + 1000).to_bytes(4, "big") + b"\0\x01" + (1000).to_bytes(4, "big") + b"x" * 1000
    answer = row * 300 + b"C\0\0\0\x0dSELECT 300\0" + b"Z\0\0\0\x05I"
    got = bytearray()
    sent = 0
    while sent < len(answer):
        n = p.s_app.send(answer[sent : sent + 100_000])
        sent += n
        p.run()
        got += p.app.received()
    for _ in range(50):
        if len(got) == len(answer):
            break
        p.run()
        got += p.app.received()
    assert bytes(got) == answer


def test_records_cut_at_every_byte(tls_pair: TlsPair) -> None:
    p = tls_pair
    assert p.eng.link_fast(p.c, p.s, 0)
    q = query("select '" + "y" * 500 + "'")
    p.app.send(q, chunk=1)  # the engine reads each record one byte at a time
    assert recv_all(p.s_app) == q


def test_plaintext_beyond_one_read_is_delivered_without_a_socket_event(tls_pair: TlsPair) -> None:
    """An unlinked link reads into its protocol's 4 KiB buffer: one 12 KiB record leaves plaintext
    in OpenSSL that no epoll event announces (the engine schedules the rest)."""
    p = tls_pair
    data = bytes(range(256)) * 48
    p.app.send(data)
    for _ in range(10):
        p.run()
    assert bytes(p.c.slow) == data


def test_close_notify_ends_the_link(tls_pair: TlsPair) -> None:
    p = tls_pair
    with pytest.raises(ssl.SSLWantReadError):
        p.app.obj.unwrap()
    p.app.pump_out()
    p.run()
    lost = [c for c in p.c.calls if c[0] == "connection_lost"]
    assert lost == [("connection_lost", None)]


def test_corrupted_record_closes_with_a_tls_error(tls_pair: TlsPair) -> None:
    p = tls_pair
    p.app.obj.write(query("select 1"))
    record = bytearray(p.app.out.read())
    record[-3] ^= 0xFF  # inside the AEAD tag: the record does not authenticate
    p.app.sock.sendall(bytes(record))
    p.run()
    lost = [c for c in p.c.calls if c[0] == "connection_lost"]
    assert len(lost) == 1 and isinstance(lost[0][1], ConnectionResetError), p.c.calls
    assert "TLS error" in str(lost[0][1]) or "DECRYPTION" in str(lost[0][1]).upper(), lost
    assert p.c.slow == b""


def test_writes_after_the_peer_left_do_not_raise(tls_pair: TlsPair) -> None:
    p = tls_pair
    assert p.eng.link_fast(p.c, p.s, 0)
    p.app.sock.close()
    for _ in range(3):
        p.s_app.sendall(b"Z\0\0\0\x05I")
        p.run()
    assert any(c[0] == "connection_lost" for c in p.c.calls)
