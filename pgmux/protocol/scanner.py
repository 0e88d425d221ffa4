"""The header walk: find message boundaries in a byte stream without copying it.

The data path forwards bytes as they arrive and only needs to know *where* messages start
(to stay in sync) and the few messages that matter (ReadyForQuery, ParameterStatus, Sync,
Terminate, ...). `scan` walks the headers of one receive buffer and reports just those.
It is pure: the connection objects in `pgmux.net` call it from their read callbacks.

A message whose body must be read (``need_body``) and is not complete yet stops the walk:
the caller keeps its bytes at the front of the buffer for the next read. Any other message
may be cut anywhere; its remaining body length comes back as ``skip``.
"""

from __future__ import annotations

import struct

from pgmux.protocol.messages import ProtocolError

_unpack_u32 = struct.Struct("!I").unpack_from


def type_table(types: str | bytes) -> bytes:
    """A 256-entry lookup table (1 where the type byte is in `types`), for O(1) tests."""
    codes = types.encode() if isinstance(types, str) else types
    table = bytearray(256)
    for c in codes:
        table[c] = 1
    return bytes(table)


NO_TYPES = bytes(256)


def scan(
    buf: bytes | bytearray | memoryview,
    pos: int,
    end: int,
    need_body: bytes,
    notify: bytes,
    events: list[tuple[int, int, int]],
    max_length: int = 0x7FFFFFFF,
) -> tuple[int, int]:
    """Walk message headers in buf[pos:end]; pos must be the start of a message header.

    Appends (type, start, end_of_message) to `events` for every complete message whose type is
    in `need_body`, and for every message whose header is complete and whose type is in `notify`
    (its body may extend past `end`).

    Returns (stop, skip):
      * stop < end: buf[stop:end] is an incomplete header or an incomplete `need_body` message;
        the caller must present those bytes again, followed by new data, on the next call.
      * stop == end: every header was walked; `skip` bytes of the last message's body are still
        to come and belong to no new header.
    Raises ProtocolError for a length word below 4 or above max_length.
    """
    while True:
        left = end - pos
        if left < 5:
            return pos, 0
        typ = buf[pos]
        length = _unpack_u32(buf, pos + 1)[0]
        if length < 4 or length > max_length:
            raise ProtocolError(f"bad packet header: '{bytes(buf[pos:pos + 5]).hex()}'")
        nxt = pos + 1 + length
        if need_body[typ]:
            if nxt > end:
                return pos, 0
            events.append((typ, pos, nxt))
        elif notify[typ]:
            events.append((typ, pos, nxt))
        if nxt >= end:
            return end, nxt - end
        pos = nxt


scan_py = scan
try:  # the compiled twin, when it was built (setup.py); same signature and results
    from pgmux.protocol._scan import scan as _compiled_scan  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the build
    COMPILED = False
else:
    COMPILED = True
    scan = _compiled_scan  # type: ignore[assignment]  # noqa: F811
