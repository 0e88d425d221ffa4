"""Facts about a client socket that only the kernel knows: the Unix peer's credentials."""

from __future__ import annotations

import socket
import struct
from typing import Any

_UCRED = struct.Struct("3i")


def peer_credentials(transport: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED), else None.

    This is how PgBouncer's getpeereid() lets the pooler's own Unix user into the console as
    ``pgbouncer`` without a password."""
    if transport is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid

