"""A stand-in for systemd in tests: one listening socket, handed to several pgmux processes.

`SocketHolder` binds and listens, as a `.socket` unit does, and keeps the socket open for the whole
test, so processes can come and go behind one port (rolling restarts). `ActivatedPooler` starts
pgmux the way systemd starts a socket-activated `Type=notify` service: the socket as fd 3,
`LISTEN_FDS=1`, `LISTEN_PID` = the pooler's own pid, and `NOTIFY_SOCKET` = a datagram socket of
the test's, on which it waits for `READY=1` instead of polling the port (which answers before
any pgmux is started, since the holder listens). Optionally the process runs in a network
namespace (`netns`), standing in for another machine.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

from pgmux.testing.cluster import PoolerProcess, ini_get

# What systemd does between fork and exec: the socket at fd 3, then LISTEN_FDS and LISTEN_PID (the
# pid of the process about to exec, so the pooler's own).
_ACTIVATE = """import os, sys
fd = int(os.environ.pop("PGMUX_TEST_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execvpe(sys.argv[1], sys.argv[1:], os.environ)
"""


class SocketHolder:
    """A listening TCP socket that outlives the processes serving it (systemd's role)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.host, self.port = self.sock.getsockname()[:2]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SocketHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActivatedPooler(PoolerProcess):
    """pgmux started with the holder's socket (set `holder`, and `netns` if wanted, before start()).
    With `holder = None` it binds its own port, but is still started and awaited like a
    `Type=notify` service (the port may be another namespace's, or shared with so_reuseport)."""

    holder: SocketHolder | None = None
    netns: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owns_port = False
        self.notifications: list[str] = []
        self._notify: socket.socket | None = None

    @property
    def host(self) -> str:
        return str(self.holder.host) if self.holder is not None else super().host

    @property
    def peer_id(self) -> int:
        return int(ini_get(self.ini_text, "peer_id") or 0)

    def command(self) -> list[str]:
        command = super().command()
        if self.holder is not None:
            command = [sys.executable, "-c", _ACTIVATE, *command]
        return ["ip", "netns", "exec", self.netns, *command] if self.netns else command

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.holder is not None:
            env["PGMUX_TEST_FD"] = str(self.holder.fileno())
        env["NOTIFY_SOCKET"] = self._notify_path()
        return env

    def popen_kwargs(self) -> dict[str, Any]:
        return {"pass_fds": (self.holder.fileno(),)} if self.holder is not None else {}

    def _notify_path(self) -> str:
        path = os.path.join(self.workdir, "notify.sock")
        if self._notify is None:
            if os.path.exists(path):
                os.unlink(path)
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(path)
        return path

    def read_notifications(self, timeout: float = 0.0) -> list[str]:
        """Messages that arrived on NOTIFY_SOCKET (waiting up to `timeout` for the first one)."""
        assert self._notify is not None
        got: list[str] = []
        if timeout > 0:
            self._notify.settimeout(timeout)
        else:
            self._notify.setblocking(False)
        try:
            while True:
                got.append(self._notify.recv(4096).decode())
                self._notify.setblocking(False)
        except (BlockingIOError, TimeoutError):
            pass
        self.notifications += got
        return got

    def _wait_ready(self, timeout: float) -> bool:
        """Ready when pgmux says READY=1 (the holder's port answers from the start)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n.startswith("READY=1") for n in self.read_notifications(0.1)):
                return True
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                return False
        return False
