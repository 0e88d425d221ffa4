"""Listening sockets: TCP on listen_addr:listen_port and the Unix socket .s.PGSQL.<port>.

With one process (`workers = 1`) `start_listeners` binds them on the event loop. With several,
the supervisor (pgmux/workers.py) binds them before forking with `bind_worker_sockets`: one TCP
socket per worker and address, all with SO_REUSEPORT so the kernel spreads connections over the
workers, and one Unix socket shared by all of them (SO_REUSEPORT does not balance Unix sockets).
Binding in the parent reports a taken port at start, as one process does, and lets a respawned
worker take over its predecessor's socket with the connections queued on it.

The Unix socket follows PgBouncer: a socket file someone still accepts on stops the start (`unix
socket is in use, cannot continue`) instead of being replaced, a stale one is removed; a socket
that cannot be set up (missing unix_socket_dir, unknown unix_socket_group, ...) is a warning and
TCP is served without it. The file gets unix_socket_mode and unix_socket_group. Accepted TCP
connections get the tcp_* options (pgmux/net/sockopts.py).

Sockets passed by a service manager (systemd socket activation, pgmux/net/systemd.py) are served
first. PgBouncer then ignores listen_addr and unix_socket_dir; pgmux ignores only what the
inherited sockets cover: an inherited Unix socket replaces unix_socket_dir, and a listen_addr
address the service manager already holds (EADDRINUSE, e.g. ListenStream=6432 with
listen_addr = *) is skipped, each with PgBouncer's warning. Anything else is still bound, because
a process sharing one port with others needs an address of its own where its peers can forward
cancel requests (`[peers]`): its own Unix socket on one machine, its own TCP address across
machines. With workers, every worker serves the inherited sockets (one accept queue for all).
"""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgmux.config.settings import unsupported_warnings
from pgmux.engine import C_LOGIN_STARTUP
from pgmux.log import logger
from pgmux.net.client import ClientConnection
from pgmux.net.sockopts import apply_tcp_options, tcp_options
from pgmux.net.systemd import listen_fds

if TYPE_CHECKING:
    from pgmux.pooler import Pooler


TLS_HANDSHAKE_RECORD = 0x16  # the first byte of a TLS ClientHello record
UNIX_SOCKET_IN_USE = "unix socket is in use, cannot continue"  # PgBouncer's words


def unix_socket_path(socket_dir: str, port: int) -> str:
    return os.path.join(socket_dir, f".s.PGSQL.{port}")


class TcpClientConnection(ClientConnection):
    """A client accepted on a TCP listener: its socket gets the tcp_* settings first (the engine's
    accept loop sets them itself, EngineServer)."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        apply_tcp_options(transport.get_extra_info("socket"), self.pooler.settings)
        super().connection_made(transport)


class TlsSniffingClient(TcpClientConnection):
    """A TCP client while client TLS is on: its first read takes one byte, so that a ClientHello
    (direct TLS, PostgreSQL 17's sslnegotiation=direct: a TLS record starts with 0x16) is noticed
    before more of it leaves the socket; reading pauses there and the TLS engine reads the rest
    (ClientConnection._start_direct_tls). An SSLRequest or StartupMessage starts with a length
    byte, 0 for any packet a client may send."""

    __slots__ = ("sniffing", "direct_tls_hello")
    c_login = False  # its first byte decides first

    def start(self, transport: asyncio.BaseTransport, peer: object, local: object) -> None:
        self.sniffing = True
        self.direct_tls_hello = False
        super().start(transport, peer, local)

    def get_buffer(self, sizehint: int) -> memoryview:
        mv = super().get_buffer(sizehint)
        return mv[:1] if self.sniffing else mv

    def buffer_updated(self, nbytes: int) -> None:
        if self.sniffing:
            self.sniffing = False
            if self.mv[self.keep] == TLS_HANDSHAKE_RECORD and self.transport is not None:
                self.transport.pause_reading()  # at once: uvloop would read on in this callback
                self.direct_tls_hello = True
        super().buffer_updated(nbytes)


class CancelOnlyClient(ClientConnection):
    __slots__ = ()
    cancel_only = True
    c_login = False


class TcpCancelOnlyClient(TcpClientConnection):
    __slots__ = ()
    cancel_only = True
    c_login = False


def client_factory(pooler: Pooler, unix: bool, cancel_only: bool = False) -> Callable[[], ClientConnection]:
    """The protocol factory of a listener: Unix-socket or TCP clients (cancel_only: see
    stop_listening)."""
    if unix:
        cls = CancelOnlyClient if cancel_only else ClientConnection
        return lambda: cls(pooler, is_unix=True)
    if cancel_only:
        return lambda: TcpCancelOnlyClient(pooler)
    # Decided per connection: RELOAD may turn client TLS on or off.
    return lambda: (TcpClientConnection if pooler.tls.client is None else TlsSniffingClient)(pooler)


class EngineServer:
    """A listening socket the engine accepts on (Engine.listen): a connection becomes a client
    on an engine transport at once, with its TCP options set and its addresses read in C. Offers
    what pgmux uses of asyncio.Server (`sockets`, `close`)."""

    def __init__(self, pooler: Pooler, sock: socket.socket) -> None:
        self.pooler = pooler
        self.sockets = [sock]
        self.family = sock.family
        self.unix = sock.family == socket.AF_UNIX
        self.factory = client_factory(pooler, self.unix)
        self.settings = pooler.settings
        sock.setblocking(False)
        self.acceptor = pooler.engine.listen(sock.fileno(), self._accepted, self._failed, self._options())

    def _options(self) -> list[tuple[int, int, int]]:
        return [] if self.unix else tcp_options(self.settings)

    def _accepted(self, fd: int, peer: tuple[str, int] | None, local: tuple[str, int] | None) -> None:
        pooler = self.pooler
        if pooler.settings is not self.settings:  # a RELOAD: this socket got the old options
            self.settings = pooler.settings
            self.acceptor.set_options(self._options())
            if not self.unix:
                with socket.socket(fileno=os.dup(fd)) as sock:
                    apply_tcp_options(sock, self.settings)
        client = self.factory()
        client.start(pooler.engine.adopt_fd(client, fd, self.family), peer, local)
        if client.c_login:
            client.engine_login = C_LOGIN_STARTUP  # the engine reads the login (Engine._login_read)

    def _failed(self, err: int) -> None:
        if err in (errno.EMFILE, errno.ENFILE):  # the engine reset that connection (libuv's way)
            self.pooler._warn_fd_limit()
        else:
            logger.warning("accept() failed: %s", os.strerror(err))  # PgBouncer's words

    def close(self) -> None:
        self.pooler.engine.unlisten(self.acceptor)
        for sock in self.sockets:
            sock.close()

def log_unsupported_settings(settings: Any) -> None:
    """One warning per accepted-but-unimplemented setting with a non-default value."""
    for warning in unsupported_warnings(settings):
        logger.warning("%s", warning)


@dataclass
class BoundSockets:
    """Sockets bound before fork: `tcp[i]` are worker i's own, `unix` and `inherited` (passed by
    the service manager) are shared by all."""

    tcp: list[list[socket.socket]] = field(default_factory=list)
    unix: socket.socket | None = None
    unix_path: str | None = None  # a filesystem path to unlink at exit (None: abstract or none)
    unix_inode: int | None = None  # the file's inode once bound: unlinked only while it is still ours
    inherited: list[socket.socket] = field(default_factory=list)

    def keep_only(self, index: int) -> None:
        """In worker `index`: close the other workers' TCP sockets, so a socket is really closed
        (and leaves the SO_REUSEPORT group) when its own worker closes it at shutdown."""
        for i, socks in enumerate(self.tcp):
            if i != index:
                for sock in socks:
                    sock.close()

    def close_tcp(self) -> None:
        for socks in self.tcp:
            for sock in socks:
                sock.close()
        for sock in self.inherited:
            sock.close()

    def close_all(self) -> None:
        self.close_tcp()
        if self.unix is not None:
            self.unix.close()

    def remove_unix_file(self) -> None:
        """At exit, as PgBouncer does: unlink the Unix socket's file if it is still the one bound
        here (a successor may have bound its own at that path meanwhile)."""
        if self.unix_path and self.unix_inode is not None and _inode(self.unix_path) == self.unix_inode:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            logger.warning("%s: %s", path, exc)
        return None


async def start_listeners(pooler: Pooler, bound: BoundSockets | None = None, index: int = 0) -> list[EngineServer]:
    """Bind every configured address; raises OSError (with the address) when one cannot be bound.
    A worker passes the sockets its supervisor bound (`bound`, its `index`) instead; sockets
    passed by a service manager are served instead of listen_addr (module docstring). The
    engine accepts on all of them (EngineServer)."""
    if bound is None:
        bound = bind_worker_sockets(pooler.settings, 1)  # (one process: its own sockets, as a worker's)
        pooler.own_sockets = bound  # (its Unix socket file is removed at exit; a supervisor removes workers')
    backlog = pooler.settings.listen_backlog
    servers: list[EngineServer] = []
    for sock in [*bound.tcp[index], *bound.inherited, *([bound.unix] if bound.unix is not None else [])]:
        sock.listen(backlog)  # (inherited sockets listen already: this sets our backlog, as asyncio did)
        servers.append(EngineServer(pooler, sock))
    return servers


def stop_listening(pooler: Pooler, servers: list[EngineServer | asyncio.AbstractServer]) -> None:
    """Stop accepting (a shutdown). A socket of this process's own is closed only after what is
    queued on it was accepted, so those clients are served (a rolling restart drains them) instead
    of being reset by the close; a socket passed by the service manager keeps its queue for the
    other processes sharing it, so nothing is taken from it.

    With peers, a WAIT_FOR_CLIENTS drain keeps this process's own Unix socket (and its own TCP
    socket, unless so_reuseport shares the port) open for the cancel requests its peers forward
    for the clients it still serves; a login there is refused ("pooler is shutting down")."""
    # By inode: the event loop may serve a dup of the inherited fd (uvloop does).
    inherited = {os.fstat(sock.fileno()).st_ino for sock in listen_fds()}
    keep = bool(pooler.settings.peer_id) and pooler.draining()
    kept: list[socket.socket] = []
    for srv in servers:
        for listening in getattr(srv, "sockets", None) or ():  # asyncio.Server and uvloop's have it
            fd = listening.fileno()
            if fd < 0 or os.fstat(fd).st_ino in inherited:
                continue
            sock = socket.socket(fileno=os.dup(fd))
            sock.setblocking(False)
            _accept_queued(pooler, sock)
            if keep and (sock.family == socket.AF_UNIX or not pooler.settings.so_reuseport):
                kept.append(sock)
            else:
                sock.close()
        srv.close()
    if kept:
        pooler.spawn(_serve_cancels_only(pooler, kept))
    if pooler.settings.so_reuseport and _sysctl("net/ipv4/tcp_migrate_req") == "0":
        # SO_REUSEPORT gives each process a queue of its own: what the kernel puts on ours between
        # the last accept above and the close is reset, unless it may move it to a sibling.
        logger.warning("so_reuseport: net.ipv4.tcp_migrate_req is 0, so connections that reach this "
                       "process's socket as it closes are reset; set it to 1 (Linux 5.14+) for rolling "
                       "restarts that lose nothing")


async def _serve_cancels_only(pooler: Pooler, socks: list[socket.socket]) -> None:
    loop = pooler.loop
    for sock in socks:
        unix = sock.family == socket.AF_UNIX
        factory = client_factory(pooler, unix, cancel_only=True)
        if unix:
            server = await loop.create_unix_server(factory, sock=sock)
        else:
            server = await loop.create_server(factory, sock=sock)
        pooler.listeners.append(server)
        where = sock.getsockname()
        logger.info("accepting only cancel requests on %s while clients finish",
                    f"unix:{where}" if unix else f"{where[0]}:{where[1]}")


def _accept_queued(pooler: Pooler, listening: socket.socket) -> None:
    unix = listening.family == socket.AF_UNIX
    while True:
        try:
            conn, _addr = listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ECONNABORTED: that one left already; EMFILE: nothing more to do
            if exc.errno == errno.ECONNABORTED:
                continue
            logger.warning("accepting queued connections at shutdown: %s", exc.strerror or exc)
            return
        pooler.spawn(pooler.loop.connect_accepted_socket(client_factory(pooler, unix), conn))


def _sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def bind_worker_sockets(settings: Any, workers: int) -> BoundSockets:
    """Bind the listening sockets of `workers` processes (see the module docstring); raises
    OSError naming the address, after closing what was bound. Sockets passed by a service
    manager are used instead of binding what they cover."""
    log_unsupported_settings(settings)
    bound = BoundSockets(inherited=list(listen_fds()))
    inherited_unix = any(sock.family == socket.AF_UNIX for sock in bound.inherited)
    addrs = [a.strip() for a in settings.listen_addr if a.strip()]
    socket_dir = settings.unix_socket_dir
    if inherited_unix and socket_dir:
        logger.warning("sockets passed from service manager, unix_socket_dir ignored")  # PgBouncer's words
        socket_dir = ""
    try:
        for index in range(workers):
            socks: list[socket.socket] = []
            bound.tcp.append(socks)
            for addr in list(addrs):
                # Without so_reuseport a port someone else listens on is refused, as with one process.
                exclusive = index == 0 and not settings.so_reuseport
                try:
                    socks.extend(_bind_tcp(addr, settings.listen_port, settings.listen_backlog, exclusive))
                except OSError as exc:
                    if not bound.inherited or exc.errno != errno.EADDRINUSE:
                        raise
                    # The service manager holds it (e.g. ListenStream=6432 and listen_addr = *).
                    logger.warning("sockets passed from service manager, listen_addr %s ignored", addr)
                    addrs.remove(addr)
        if socket_dir:
            bound.unix, bound.unix_path = _bind_unix(socket_dir, settings)
            if bound.unix_path:
                bound.unix_inode = _inode(bound.unix_path)
        if not bound.unix and not addrs and not bound.inherited:
            raise OSError("nothing to listen on: set listen_addr or unix_socket_dir")
    except BaseException:
        bound.close_all()
        raise
    return bound


def _bind_tcp(addr: str, port: int, backlog: int, exclusive: bool) -> list[socket.socket]:
    """Every address `addr` resolves to (`*`: all of them, v4 and v6), with SO_REUSEPORT;
    `exclusive`: first check that no other socket listens there (even with SO_REUSEPORT)."""
    host = None if addr == "*" else addr
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        seen = set()
        for family, type_, proto, _canon, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            if exclusive:
                with socket.socket(family, type_, proto) as probe:
                    _bind_options(probe, family, reuse_port=False)
                    probe.bind(sockaddr)
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            _bind_options(sock, family, reuse_port=True)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise OSError(exc.errno, f"could not bind {addr}:{port}: {exc.strerror}") from exc
    return socks


def _bind_options(sock: socket.socket, family: int, reuse_port: bool) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _bind_unix(socket_dir: str, settings: Any) -> tuple[socket.socket | None, str | None]:
    """The listening Unix socket and its filesystem path (None when abstract). A socket another
    process accepts on raises UnixSocketInUse (an OSError); any other failure is logged as a
    warning and gives (None, None): the pooler goes on with TCP only, as PgBouncer does."""
    abstract = socket_dir.startswith("@")
    path = unix_socket_path(socket_dir[1:] if abstract else socket_dir, settings.listen_port)
    where = f"unix:{'@' if abstract else ''}{path}"
    if not abstract and _unix_socket_alive(path):
        raise UnixSocketInUse(f"{UNIX_SOCKET_IN_USE} ({where} accepts connections)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound_path: str | None = None
    key, value = "unix_socket_dir", socket_dir  # the setting a failure is blamed on
    try:
        if abstract:
            try:
                sock.bind("\0" + path)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UnixSocketInUse(f"{UNIX_SOCKET_IN_USE} ({where})") from None
                raise
        else:
            if os.path.lexists(path):
                os.unlink(path)  # a stale socket from a previous run: nobody accepts on it
            sock.bind(path)
            bound_path = path
            key, value = "unix_socket_mode", oct(settings.unix_socket_mode)
            os.chmod(path, settings.unix_socket_mode)
            if settings.unix_socket_group:
                key, value = "unix_socket_group", settings.unix_socket_group
                os.chown(path, -1, _group_id(settings.unix_socket_group))
            key, value = "unix_socket_dir", socket_dir
        sock.listen(settings.listen_backlog)
        sock.setblocking(False)
    except UnixSocketInUse:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        if bound_path is not None:
            try:
                os.unlink(bound_path)
            except OSError:
                pass
        reason = exc.strerror or str(exc)
        if exc.filename is not None and exc.filename != path:
            reason += f": {exc.filename}"
        logger.warning("cannot listen on %s (%s = %s): %s; not listening on a Unix socket",
                       where, key, value, reason)
        return None, None
    return sock, bound_path


class UnixSocketInUse(OSError):
    """Another process accepts on our Unix socket: the start must stop (the callers log the
    message as FATAL and exit 1)."""


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise OSError(errno.EINVAL, f"group {group!r} not found") from None


def _unix_socket_alive(path: str) -> bool:
    """True if a process accepts on the socket at `path` (PgBouncer's check before removing it).
    A file nobody listens on (refused, not a socket, missing) is not alive; a full backlog is."""
    if not os.path.lexists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (TimeoutError, BlockingIOError):
        return True
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EINPROGRESS, errno.EISCONN)
    else:
        return True
    finally:
        probe.close()
