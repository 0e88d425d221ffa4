"""The fault proxy itself, against a local echo server (no PostgreSQL): each fault does what it says."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pgmux.testing.faultproxy import FaultProxy


@pytest.fixture
def echo() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


def roundtrip(port: int, payload: bytes = b"ping", timeout: float = 2.0) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(payload)
        return s.recv(4096), time.monotonic() - t0


def test_forwarding_delay_freeze_cut_refuse_unreachable(echo: int) -> None:
    with FaultProxy(echo) as proxy:
        assert roundtrip(proxy.port)[0] == b"ping"

        proxy.delay(0.2)
        data, took = roundtrip(proxy.port)
        assert data == b"ping" and took >= 0.35  # 0.2 s each way
        proxy.delay(0)

        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
        held.sendall(b"a")
        assert held.recv(10) == b"a"
        assert proxy.freeze() >= 1  # open connections go silent ...
        held.sendall(b"b")
        with pytest.raises(TimeoutError):
            held.recv(10)
        assert roundtrip(proxy.port)[0] == b"ping"  # ... new ones are fine

        assert proxy.cut() >= 1  # reset
        with pytest.raises(OSError):
            held.sendall(b"c" * 100000)
            held.recv(10)
        held.close()

        proxy.blackhole_new(True)
        with pytest.raises(TimeoutError):
            roundtrip(proxy.port, timeout=0.5)
        proxy.blackhole_new(False)

        proxy.refuse_new(True)
        with pytest.raises(OSError):
            data, _ = roundtrip(proxy.port)
            if not data:
                raise ConnectionResetError("closed")
        proxy.heal()

        proxy.unreachable()
        with pytest.raises(ConnectionRefusedError):
            roundtrip(proxy.port)
        proxy.reachable()
        assert roundtrip(proxy.port)[0] == b"ping"
        assert proxy.bytes_up > 0 and proxy.bytes_down > 0 and proxy.accepted >= 6
