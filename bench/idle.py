"""Many idle client connections: open N real logins (md5) on raw asyncio sockets, hold them, close them.

Why raw sockets: a libpq/psycopg connection object costs far more memory and CPU in *our* process than the
pooler spends on it; the pooler only sees the wire protocol, so a StartupMessage, an md5 PasswordMessage
and waiting for ReadyForQuery is all a "real login" needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import Callable
from typing import TypedDict


def _startup(user: str, database: str) -> bytes:
    body = (
        struct.pack("!I", 196608)
        + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", user), ("database", database)))
        + b"\0"
    )
    return struct.pack("!I", len(body) + 4) + body


def _md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    digest = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    payload = digest.encode() + b"\0"
    return b"p" + struct.pack("!I", len(payload) + 4) + payload


async def login(host: str, port: int, user: str, password: str, database: str, timeout: float):
    """One md5 login on a raw asyncio socket, until ReadyForQuery; returns (reader, writer). ``timeout``
    bounds the whole login (one deadline: cheaper for the client than a wait_for per read)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(_startup(user, database))
            while True:
                header = await reader.readexactly(5)
                typ, length = header[:1], struct.unpack("!I", header[1:])[0]
                body = await reader.readexactly(length - 4)
                if typ == b"R":
                    code = struct.unpack("!I", body[:4])[0]
                    if code == 5:
                        writer.write(_md5_password(user, password, body[4:8]))
                    elif code != 0:
                        raise RuntimeError(f"unsupported authentication request {code}")
                elif typ == b"E":
                    fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
                    raise RuntimeError(fields.get(b"M", body).decode(errors="replace"))
                elif typ == b"Z":
                    return reader, writer
    except BaseException:
        if writer is not None:
            writer.transport.abort()
        raise

async def close_with_rst(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    """Send Terminate on every connection, then close it with RST instead of FIN: 10,000 closes per run
    would otherwise leave 10,000 loopback ports in TIME_WAIT for a minute."""
    for _r, w in conns:
        try:
            w.write(b"X\0\0\0\4")
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, RuntimeError):
            pass
        w.transport.abort()
    await asyncio.sleep(0)


class IdleOutcome(TypedDict):
    """What hold_idle_clients saw."""

    opened: int
    alive: int
    failed: int
    first_error: str
    login_seconds: float


async def hold_idle_clients(
    host: str,
    port: int,
    user: str,
    password: str,
    database: str,
    n: int,
    *,
    concurrency: int = 100,
    hold: float = 2.0,
    on_held: Callable[[int], None] | None = None,
    timeout: float = 30.0,
) -> IdleOutcome:
    """Open ``n`` logged-in connections (``concurrency`` logins in flight), call ``on_held(opened)``
    after ``hold`` seconds, then close them all. Returns counts, first error and timings."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            try:
                conns.append(await login(host, port, user, password, database, timeout))
            except Exception as e:  # noqa: BLE001 - counted and reported, not fatal
                errors.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one() for _ in range(n)))
        login_s = time.monotonic() - t0
        await asyncio.sleep(hold)
        # every connection must still be open (the pooler must not have dropped idle clients)
        alive = sum(1 for r, _w in conns if not r.at_eof())
        if on_held is not None:
            on_held(len(conns))
    finally:
        await close_with_rst(conns)
    return {
        "opened": len(conns),
        "alive": alive,
        "failed": len(errors),
        "first_error": errors[0] if errors else "",
        "login_seconds": login_s,
    }
