"""What client and server connections share: the receive buffer and the slow-path reader.

Each connection is one `asyncio.BufferedProtocol` with one reusable receive buffer (no asyncio
streams on the data path: they cost 1.3-3x the CPU, see shared/spec/hot-path.md). Before a
connection reaches the data path (login, reset queries, parameter sync) its bytes are instead
collected in `inbox` and read message by message with `await read_message()`, which is simple
and not on the hot path.
"""

from __future__ import annotations

import asyncio
import struct

from pgmux.engine import Link
from pgmux.errors import ConnectionLost, ProtocolError

BUF_SIZE = 65536
_unpack_u32 = struct.Struct("!I").unpack_from


class SharedReadBuffer:
    """The receive buffer of every client with nothing retained between reads.

    Thousands of idle clients must stay cheap, so a client reads into this one process-wide buffer
    and owns a buffer only while it keeps bytes between reads (`ClientConnection.buffer_updated`).
    Callbacks do not nest, so one read at a time uses it; a transport that still holds a view of it
    after a write gets it for good, and a new one replaces it (`PgConnection.retain`)."""

    buf = bytearray(BUF_SIZE)
    mv = memoryview(buf)

    @classmethod
    def renew(cls) -> None:
        cls.buf = bytearray(BUF_SIZE)
        cls.mv = memoryview(cls.buf)


class PgConnection(Link, asyncio.BufferedProtocol):
    """Receive buffer plus a message reader for the non-forwarding phases.

    The link state the data path keeps (outstanding requests, transaction status, timers) is in
    `Link`, pgmux.engine's C struct, so that the compiled data path and this Python code read and
    write the same fields. Once the engine owns the socket (`Engine.adopt`), `transport` is its
    EngineTransport; a linked pair may then forward in C (`Engine.link_fast`) and this class's
    buffer is used only while the link is on the slow path."""

    # Slots, not an instance __dict__: CPython 3.11 shares dict keys between instances only up to
    # 30 attributes, so every client carried its own ~1.5 KiB dict; slots are 8 bytes each and
    # make the data path's attribute loads cheaper. Every attribute must be listed here or in
    # the subclass's __slots__ (admin state keeps weak references: __weakref__).
    __slots__ = (
        "loop", "buf", "mv", "grow", "later", "transport", "_waiter", "close_reason", "__weakref__",
    )

    def __init__(self, buf_size: int = BUF_SIZE, loop: asyncio.AbstractEventLoop | None = None) -> None:
        # The event loop, given by the owner: asyncio.get_running_loop() costs a getpid()
        # system call per use (glibc does not cache it), several times per login.
        self.loop = loop
        # buf_size 0: no buffer of its own, reads go to SharedReadBuffer (clients: thousands of
        # idle ones must stay cheap; see ClientConnection.get_buffer).
        if buf_size:
            self.buf = bytearray(buf_size)
            self.mv = memoryview(self.buf)
        else:
            self.buf = SharedReadBuffer.buf
            self.mv = SharedReadBuffer.mv
        self.keep = 0  # bytes retained at the front of buf, waiting for the rest of a message
        self.grow = False
        self.later: list[bytes] | None = None  # made when needed: idle clients hold none
        self.skip = 0  # body bytes of the current message still to arrive, not to be scanned
        self.transport: asyncio.Transport | None = None
        self.forwarding = False  # False: bytes go to `inbox` for read_message()
        self.inbox = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.close_reason: str | None = None
        self.max_packet_size = 0x7FFFFFFF

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.keep >= len(self.buf) or self.grow:  # full, or a small buffer was filled by one read
            self.grow = False
            self._resize(len(self.buf) * 2)
        return self.mv[self.keep :]

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    # ------------------------------------------------------------ data path hook

    def data_path(self, nbytes: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _resize(self, size: int) -> None:
        """Move retained bytes into a new buffer (also used when the transport still holds a
        view of the old one: uvloop and CPython >= 3.12 keep references to unsent data)."""
        new = bytearray(max(size, self.keep))
        new[: self.keep] = self.buf[: self.keep]
        self.buf = new
        self.mv = memoryview(new)

    def retain(self, start: int, end: int, fresh: bool) -> None:
        """Keep buf[start:end] at the front for the next read; `fresh` means the old buffer may
        still be referenced by a transport and must not be overwritten."""
        n = end - start
        if fresh:
            if self.buf is SharedReadBuffer.buf:
                SharedReadBuffer.renew()
            new = bytearray(max(len(self.buf), n * 2))
            new[:n] = self.buf[start:end]
            self.buf = new
            self.mv = memoryview(new)
        elif n and start:
            self.buf[:n] = self.buf[start:end]
        self.keep = n

    # ------------------------------------------------------------ slow-path reading

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait_data(self) -> None:
        if self.closed:
            raise ConnectionLost()
        self._waiter = (self.loop or asyncio.get_running_loop()).create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_message(self, max_length: int = 0) -> tuple[int, bytes]:
        """Next typed message (type byte as int, body) from the inbox; longer than `max_length`
        (default: max_packet_size) is a protocol error, before the body is read."""
        while (msg := self.take_message(max_length)) is None:
            await self._wait_data()
        return msg

    def take_message(self, max_length: int = 0) -> tuple[int, bytes] | None:
        """read_message's message if the inbox holds all of it, else None."""
        inbox = self.inbox
        if len(inbox) < 5:
            return None
        length = _unpack_u32(inbox, 1)[0]
        if length < 4 or length > (max_length or self.max_packet_size):
            raise ProtocolError(f"bad packet header: '{bytes(inbox[:5]).hex()}'")
        if len(inbox) < length + 1:
            return None
        typ = inbox[0]
        body = bytes(inbox[5 : length + 1])
        del inbox[: length + 1]
        return typ, body

    async def read_exact(self, n: int) -> bytes:
        """n raw bytes (untyped startup packets)."""
        while len(self.inbox) < n:
            await self._wait_data()
        data = bytes(self.inbox[:n])
        del self.inbox[:n]
        return data

    def start_forwarding(self) -> None:
        """Leave the slow path: move unread inbox bytes into the buffer and run the data path."""
        self.forwarding = True
        self.keep = 0
        self.skip = 0
        leftover = self.inbox
        if leftover:  # (a server linked for each transaction mostly has none: no allocation)
            self.inbox = bytearray()
            n = len(leftover)
            if n > len(self.buf):
                self._resize(n)
            self.buf[:n] = leftover
            self.data_path(n)

    def stop_forwarding(self) -> None:
        """Back to the slow path (reset queries, parameter sync)."""
        if self.fast:
            self.to_slow()  # what the engine carries comes back to buf/keep/skip
        if self.keep:
            self.inbox += self.buf[: self.keep]
        self.keep = 0
        self.forwarding = False

    def take_over(self, data: bytes, minimum: int) -> None:
        """`data` (bytes the engine hands to the slow path) at the front of a new buffer of at
        least `minimum` bytes, nothing kept yet: the caller runs the data path over it."""
        n = len(data)
        buf = bytearray(max(minimum, 2 * n))
        buf[:n] = data
        self.buf = buf
        self.mv = memoryview(buf)
        self.keep = 0

    def write(self, data: bytes | memoryview) -> None:
        t = self.transport
        if t is not None and not self.closed:
            if self.later:
                self.later.append(bytes(data))
                data = b"".join(self.later)
                self.later = None
            t.write(data)

    def write_later(self, data: bytes) -> None:
        """Queue bytes to go out with the next write (one send for AuthenticationOk + welcome)."""
        if self.later is None:
            self.later = [data]
        else:
            self.later.append(data)
