"""The two halves of systemd's daemon protocol pgmux speaks, without libsystemd.

* **Socket activation** (`sd_listen_fds(3)`): a service manager (systemd's `pgmux.socket`, or
  anything that does the same) binds the listening sockets and starts pgmux with them open from
  fd 3 on, `LISTEN_FDS` = how many and `LISTEN_PID` = the pid they are meant for. pgmux serves
  those sockets instead of binding `listen_addr`; several processes started with the same socket
  share its accept queue, so one can stop accepting while the others go on (rolling restarts).
* **Readiness** (`sd_notify(3)`): with `NOTIFY_SOCKET` set (`Type=notify`), pgmux sends `READY=1`
  once it listens, `RELOADING=1` then `READY=1` around a reload, `STOPPING=1` when a shutdown
  starts, as PgBouncer built with systemd support does.

Both read their variables once and remove them from the environment (as `unset_environment=1`
does), so nothing pgmux starts takes them for its own. With `workers > 1` only the supervisor
(the process systemd started) notifies; the workers call `disable_notify()` after fork.
"""

from __future__ import annotations

import os
import socket
import time

from pgmux.log import logger

SD_LISTEN_FDS_START = 3

_inherited: list[socket.socket] | None = None
_notify_address: str | None = None
_notify_read = False


def listen_fds() -> list[socket.socket]:
    """The listening sockets passed by the service manager (empty when none were), as socket
    objects, non-blocking and close-on-exec. Read from the environment on the first call only."""
    global _inherited
    if _inherited is not None:
        return _inherited
    _inherited = []
    pid, fds = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not fds:
        return _inherited
    if not (pid.isdigit() and int(pid) == os.getpid()):
        logger.debug("LISTEN_FDS ignored: LISTEN_PID=%r is not this process", pid)
        return _inherited
    if not fds.isdigit():
        logger.warning("LISTEN_FDS=%r ignored: not a number", fds)
        return _inherited
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(fds)):
        try:
            sock = socket.socket(fileno=fd)  # family and type are read from the fd
        except OSError as exc:
            raise OSError(exc.errno, f"socket passed from service manager (fd {fd}) is not usable: "
                                     f"{exc.strerror}") from exc
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            sock.detach()
            raise OSError(f"fd {fd} passed from service manager is not a stream socket of a known family")
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        logger.info("socket passed from service manager (fd %d)", fd)  # PgBouncer's words
        _inherited.append(sock)
    return _inherited


def describe(sock: socket.socket) -> str:
    """`host:port` or `unix:path` of a listening socket, for log lines."""
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode(errors='replace') if isinstance(name, bytes) else name}"
    return f"[{name[0]}]:{name[1]}" if sock.family == socket.AF_INET6 else f"{name[0]}:{name[1]}"


def _address() -> str | None:
    global _notify_address, _notify_read
    if not _notify_read:
        _notify_read = True
        _notify_address = os.environ.pop("NOTIFY_SOCKET", None) or None
    return _notify_address


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; False when there is none or the
    message could not be sent (logged, never raised: readiness must not stop the pooler)."""
    address = _address()
    if address is None:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    elif not address.startswith("/"):
        logger.warning("NOTIFY_SOCKET=%r: not a Unix socket path; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logger.warning("sd_notify(%s) failed: %s", state.split("\n", 1)[0], exc.strerror or exc)
        return False
    return True


def notify_ready() -> bool:
    return notify(f"READY=1\nSTATUS=accepting connections\nMAINPID={os.getpid()}")


def notify_reloading() -> bool:
    """RELOADING=1 with the MONOTONIC_USEC that Type=notify-reload requires (harmless otherwise)."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def notify_stopping() -> bool:
    return notify("STOPPING=1")


def disable_notify() -> None:
    """In a worker process: only the process the service manager started may notify."""
    global _notify_address, _notify_read
    _notify_read, _notify_address = True, None
