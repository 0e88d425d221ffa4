"""TCP socket options from the [pgbouncer] settings, as PgBouncer's tune_socket() applies them.

* ``tcp_keepalive`` (default on) sets SO_KEEPALIVE; with it on, ``tcp_keepidle``,
  ``tcp_keepintvl`` and ``tcp_keepcnt`` set TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT where non-zero
  (0 keeps the kernel's default: net.ipv4.tcp_keepalive_*);
* ``tcp_user_timeout`` sets TCP_USER_TIMEOUT (milliseconds) where non-zero;
* ``tcp_socket_buffer`` sets SO_SNDBUF and SO_RCVBUF where non-zero.

Used on accepted client connections (pgmux/net/listener.py) and on server connections. An option
the platform lacks, or that the kernel refuses, is skipped: a connection is never lost to a
tuning knob. Unix sockets are left alone.
"""

from __future__ import annotations

import socket
from typing import Any

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def apply_tcp_options(sock: Any, settings: Any) -> None:
    """Apply the tcp_* settings to ``sock`` (a socket, or the socket-like object a transport's
    ``get_extra_info("socket")`` returns); does nothing for a non-TCP socket."""
    if sock is None or getattr(sock, "family", None) not in _TCP_FAMILIES:
        return
    keepalive = bool(settings.tcp_keepalive)
    _set(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if keepalive else 0)
    if keepalive:
        for name, value in (("TCP_KEEPIDLE", settings.tcp_keepidle), ("TCP_KEEPINTVL", settings.tcp_keepintvl),
                            ("TCP_KEEPCNT", settings.tcp_keepcnt)):
            option = getattr(socket, name, None)
            if value and option is not None:
                _set(sock, socket.IPPROTO_TCP, option, value)
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if settings.tcp_user_timeout and user_timeout is not None:
        _set(sock, socket.IPPROTO_TCP, user_timeout, settings.tcp_user_timeout)
    if settings.tcp_socket_buffer:
        _set(sock, socket.SOL_SOCKET, socket.SO_SNDBUF, settings.tcp_socket_buffer)
        _set(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, settings.tcp_socket_buffer)


def tcp_options(settings: Any) -> list[tuple[int, int, int]]:
    """The (level, option, value) triples apply_tcp_options sets, plus TCP_NODELAY (as asyncio's
    and uvloop's TCP transports set it, and PgBouncer): for the engine's accept loop, which sets
    them in C (pgmux.engine.Acceptor)."""
    opts: list[tuple[int, int, int]] = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    apply_tcp_options(_Collect(opts), settings)
    return opts


class _Collect:
    """A socket stand-in that records setsockopt calls."""

    family = socket.AF_INET

    def __init__(self, opts: list[tuple[int, int, int]]) -> None:
        self.opts = opts

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if -(1 << 31) <= value < (1 << 31):  # (the kernel would refuse the rest: skipped, as _set does)
            self.opts.append((level, option, value))


def _set(sock: Any, level: int, option: int, value: int) -> None:
    try:
        sock.setsockopt(level, option, int(value))
    except (OSError, ValueError, OverflowError):
        pass  # unsupported here, out of the kernel's range, or the socket is already gone
