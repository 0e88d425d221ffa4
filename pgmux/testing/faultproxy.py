"""A fault-injecting TCP proxy for tests: put it between pgmux and PostgreSQL and break things on demand.

Why: "the server stops answering in the middle of a query", "PostgreSQL is unreachable", "the network
adds 200 ms" cannot be produced with PostgreSQL alone. pgmux connects to the proxy's port instead of
PostgreSQL's (``host=127.0.0.1 port=<proxy.port>`` in ``[databases]``) and the test flips faults:

* ``delay(seconds, new_only=False)``: every chunk is held that long before it is passed on (both
  directions, order kept), on new connections and, unless ``new_only``, on the open ones;
* ``freeze()``: the connections open right now stop passing bytes (they are read and dropped), but stay
  open, exactly like a server that hangs or a network path that blackholes; new connections work;
* ``blackhole_new(True)``: new connections are accepted and then ignored (no byte ever comes back),
  which is what ``server_connect_timeout`` is for;
* ``refuse_new(True)``: new connections are closed at once (RST), like a server that is down;
* ``unreachable()`` / ``reachable()``: stop / start listening (connection refused), same port;
* ``cut()``: close every open connection now (RST), as a crashed server or a broken link;
* ``heal()``: back to plain forwarding for new connections (frozen ones stay frozen: they are lost).

The proxy runs its own asyncio loop in a daemon thread, so it works from synchronous tests (psycopg,
subprocess pgbench) and from asyncio tests alike. It only ever binds 127.0.0.1. Every method is
thread-safe; counters (``accepted``, ``open_count``, ``bytes_up``, ``bytes_down``) are for assertions.

    with FaultProxy(cluster.port) as proxy:
        ini, users = write_config(cluster, databases={"testdb": f"host=127.0.0.1 port={proxy.port} dbname=testdb"})
        ...
        proxy.freeze()          # in-flight queries never get an answer
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

__all__ = ["FaultProxy"]

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_CHUNK = 65536


class _Link:
    """One proxied connection: the client side (pgmux) and the upstream side (PostgreSQL)."""

    __slots__ = ("delay", "down_w", "frozen", "up_w", "tasks", "id")

    def __init__(self, ident: int, delay: float) -> None:
        self.id = ident
        self.delay = delay
        self.frozen = False
        self.up_w: asyncio.StreamWriter | None = None
        self.down_w: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []


class FaultProxy:
    """TCP proxy 127.0.0.1:<port> -> target_host:target_port with switchable faults."""

    host = "127.0.0.1"

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self._delay_new = 0.0
        self._blackhole_new = False
        self._refuse_new = False
        self._links: dict[int, _Link] = {}
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # counters
        self.accepted = 0
        self.bytes_up = 0  # pgmux -> PostgreSQL
        self.bytes_down = 0  # PostgreSQL -> pgmux

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            # stop(): cancel what is left and close the loop
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy-{self.target_port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown(), timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults (thread-safe)

    def delay(self, seconds: float, new_only: bool = False) -> None:
        """Hold every chunk `seconds` before passing it on (0: no delay), on the connections opened
        from now on and, unless `new_only`, on the open ones too."""
        seconds = max(0.0, float(seconds))
        self._delay_new = seconds
        if not new_only:
            with self._lock:
                for link in self._links.values():
                    link.delay = seconds

    def freeze(self) -> int:
        """The connections open now pass no byte any more, in either direction, and stay open.
        Returns how many were frozen."""
        with self._lock:
            links = list(self._links.values())
        for link in links:
            link.frozen = True
        return len(links)

    def blackhole_new(self, on: bool = True) -> None:
        """New connections are accepted and then never answered."""
        self._blackhole_new = on

    def refuse_new(self, on: bool = True) -> None:
        """New connections are reset right after accept."""
        self._refuse_new = on

    def cut(self) -> int:
        """Reset every open connection now. Returns how many were cut."""
        return self._call(self._cut_all())

    def unreachable(self) -> None:
        """Stop listening: connects get ECONNREFUSED. Open connections are cut too."""
        self._call(self._unlisten())

    def reachable(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen())

    @contextlib.contextmanager
    def reachable_after(self, seconds: float) -> Iterator[None]:
        """Within the block, listen again `seconds` from now (reachable() on a timer thread); the
        timer is cancelled if the block ends first."""
        timer = threading.Timer(seconds, self.reachable)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()

    def heal(self) -> None:
        """Plain forwarding for new connections again (no delay, no blackhole, no refusal)."""
        self._delay_new = 0.0
        self._blackhole_new = False
        self._refuse_new = False

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._links)

    # ------------------------------------------------------------------ internals (proxy thread)

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        assert self._loop is not None, "proxy not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True, backlog=512
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._cut_all()

    async def _shutdown(self) -> None:
        await self._unlisten()

    async def _cut_all(self) -> int:
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            for w in (link.down_w, link.up_w):
                if w is not None:
                    _reset(w)
            for t in link.tasks:
                t.cancel()
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refuse_new:
            _reset(writer)
            return
        with self._lock:
            self._next_id += 1
            link = _Link(self._next_id, self._delay_new)
            self._links[link.id] = link
        link.down_w = writer
        try:
            if self._blackhole_new:
                link.frozen = True
                await _drain_forever(reader)
                return
            try:
                up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                _reset(writer)
                return
            link.up_w = up_w
            up = asyncio.ensure_future(self._pump(link, reader, up_w, True))
            down = asyncio.ensure_future(self._pump(link, up_r, writer, False))
            link.tasks = [up, down]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            # one side closed: half-close semantics are not needed by PostgreSQL, close both
            for t in link.tasks:
                t.cancel()
            for w in (up_w, writer):
                with contextlib.suppress(Exception):
                    w.close()
        except asyncio.CancelledError:
            pass
        finally:
            with self._lock:
                self._links.pop(link.id, None)

    async def _pump(self, link: _Link, r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
        try:
            while True:
                data = await r.read(_CHUNK)
                if not data:
                    return
                if link.frozen:
                    continue  # read and dropped: the peer sees silence, not a close
                if link.delay:
                    await asyncio.sleep(link.delay)
                    if link.frozen:
                        continue
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            return


async def _drain_forever(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(_CHUNK):
            pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (not FIN): the peer sees ECONNRESET, as with a crashed host."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(Exception):
        writer.transport.abort()
