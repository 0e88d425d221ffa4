"""The engine holding uvloop's loop (Engine.enable_hold): while its sockets keep it busy it waits in
its own epoll_wait, with libuv's fd in its set, instead of returning to the loop after every batch.
Whatever the loop has to do must still happen at once: timers when due, callbacks scheduled from a
hook, a uvloop transport's write queued from a hook, a call from another thread. Real uvloop, real
sockets: a thread plays the peer and answers every message at once, so the engine never runs dry.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pgmux.engine import Engine, Link

uvloop = pytest.importorskip("uvloop")

MSG = b"ping"


class EchoLink(Link):
    """A slow-mode link (every read goes to buffer_updated) that answers each read at once; `on_read`
    runs inside the engine's batch, as pgmux's hooks do."""

    def __init__(self) -> None:
        self.buf = bytearray(4096)
        self.mv = memoryview(self.buf)
        self.keep = 0
        self.skip = 0
        self.transport: object = None
        self.reads = 0
        self.on_read: Callable[[], None] | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.mv

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        self.transport.write(bytes(self.mv[:nbytes]))  # type: ignore[attr-defined]
        if self.on_read is not None:
            self.on_read()

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def _peer(sock: socket.socket, stop: threading.Event) -> None:
    """Send a message, wait for its echo, again, as fast as the engine answers."""
    sock.settimeout(5)
    try:
        while not stop.is_set():
            sock.sendall(MSG)
            got = b""
            while len(got) < len(MSG):
                data = sock.recv(64)
                if not data:
                    return
                got += data
    except OSError:
        return


class Busy:
    """An engine on the running uvloop loop with one echo link kept busy by a peer thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.eng = Engine(loop)
        self.eng.start()
        self.held = self.eng.enable_hold()
        self.app, theirs = socket.socketpair()
        theirs.setblocking(False)
        self.link = EchoLink()
        self.link.transport = self.eng.adopt_fd(self.link, theirs.detach())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_peer, args=(self.app, self.stop), daemon=True)

    def start(self) -> None:
        self.thread.start()

    def once(self, action: Callable[[], None]) -> None:
        """Run `action` inside the engine's next batch that reads the link (a hook's place)."""

        def hook() -> None:
            self.link.on_read = None
            action()

        self.link.on_read = hook

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.link.transport.abort()  # type: ignore[attr-defined]
        self.app.close()
        self.eng.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def run(loop: asyncio.AbstractEventLoop, body: Callable[[Busy], object]) -> object:
    async def main() -> object:
        busy = Busy(asyncio.get_running_loop())
        assert busy.held, "enable_hold() refused this uvloop"
        busy.start()
        try:
            return await body(busy)  # type: ignore[misc]
        finally:
            busy.close()

    return loop.run_until_complete(main())


def test_hold_timers_fire_on_time_while_the_engine_is_busy(loop: asyncio.AbstractEventLoop) -> None:
    async def body(busy: Busy) -> None:
        lp = asyncio.get_running_loop()
        fired: list[float] = []
        start = time.monotonic()
        for delay in (0.05, 0.1, 0.2):
            lp.call_later(delay, lambda d=delay: fired.append(time.monotonic() - start - d))  # type: ignore[misc]
        await asyncio.sleep(0.3)
        assert len(fired) == 3 and max(fired) < 0.05, fired  # late by less than 50 ms
        assert busy.eng.holds >= 1 and busy.eng.hold_batches > 100  # the engine did hold
        assert busy.link.reads > 100

    run(loop, body)


def test_hold_a_callback_scheduled_by_a_hook_runs_at_once(loop: asyncio.AbstractEventLoop) -> None:
    async def body(busy: Busy) -> None:
        lp = asyncio.get_running_loop()
        await asyncio.sleep(0.05)
        ran = asyncio.Event()
        reads_at: list[int] = []
        stamps: list[float] = []

        def note() -> None:
            reads_at.append(busy.link.reads)
            stamps.append(time.monotonic())

        def soon() -> None:
            note()
            ran.set()

        def schedule() -> None:
            lp.call_soon(soon)
            note()

        busy.once(schedule)
        await asyncio.wait_for(ran.wait(), 1.0)
        assert reads_at[1] - reads_at[0] <= 1, reads_at  # back to the loop after that batch
        assert stamps[1] - stamps[0] < 0.05, stamps

    run(loop, body)


def test_hold_a_uvloop_write_queued_by_a_hook_goes_out_at_once(loop: asyncio.AbstractEventLoop) -> None:
    async def body(busy: Busy) -> None:
        lp = asyncio.get_running_loop()
        mine, other = socket.socketpair()
        other.settimeout(1.0)
        transport, _ = await lp.connect_accepted_socket(asyncio.Protocol, mine)
        await asyncio.sleep(0.05)
        sent = threading.Event()

        def write() -> None:
            # a uvloop stream: written at once when nothing is queued, else queued for the loop's
            # check phase (the hold then ends on the check handle or on libuv's write watcher)
            transport.write(b"out")
            sent.set()

        busy.once(write)
        t0 = time.monotonic()
        got = await lp.run_in_executor(None, other.recv, 16)
        assert got == b"out" and sent.is_set() and time.monotonic() - t0 < 0.5
        transport.close()
        other.close()

    run(loop, body)


def test_hold_a_call_from_another_thread_wakes_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    async def body(busy: Busy) -> None:
        lp = asyncio.get_running_loop()
        await asyncio.sleep(0.05)
        done = asyncio.Event()
        t0 = time.monotonic()
        threading.Thread(target=lambda: lp.call_soon_threadsafe(done.set)).start()
        await asyncio.wait_for(done.wait(), 1.0)
        assert time.monotonic() - t0 < 0.1

    run(loop, body)


def test_hold_is_refused_by_the_standard_loop() -> None:
    async def main() -> bool:
        eng = Engine(asyncio.get_running_loop())
        eng.start()
        try:
            return bool(eng.enable_hold())
        finally:
            eng.close()

    assert asyncio.run(main()) is False
