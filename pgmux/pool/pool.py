"""Pools: which servers are idle, which clients wait for one, and how many servers may exist.

This is where a client waits for a server (`Pool.waiting`). It is plain state with no I/O:
the network layer asks it what to do (`take_idle`, `connects_wanted`) and reports what
happened (`server_ready`, `server_gone`). That keeps the pooling rules testable without sockets.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from pgmux.engine import PoolCore, PoolStats  # plain counters the engine adds to in C (SHOW STATS reads them)


class Waiter(Protocol):
    """What the pool needs of a client: whether it is still there, and when it started waiting."""

    closed: bool
    wait_started: float


S = TypeVar("S")
C = TypeVar("C", bound=Waiter)


@dataclass
class PoolLimits:
    """Sizes in force for one pool, resolved from database, user and global settings."""

    pool_size: int = 20
    min_pool_size: int = 0
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    max_db_connections: int = 0
    max_user_connections: int = 0
    pool_mode: str = "session"
    server_lifetime: float = 3600.0


@dataclass
class Pool(Generic[S, C]):
    """One (database, user) pool."""

    database: str
    user: str
    limits: PoolLimits = field(default_factory=PoolLimits)
    round_robin: bool = False
    idle: deque[S] = field(default_factory=deque)
    active: set[S] = field(default_factory=set)
    busy: set[S] = field(default_factory=set)  # being reset, tested or otherwise not linkable yet
    connecting: int = 0
    waiting: deque[C] = field(default_factory=deque)
    clients: set[C] = field(default_factory=set)
    stats: PoolStats = field(default_factory=PoolStats)
    # ParameterStatus values from the first server login, replayed to every new client.
    params: dict[str, str] | None = None
    # (monotonic time, ErrorResponse fields) of the last failed server connect or login, until
    # one works: clients that find no server get its message, retries are server_login_retry apart.
    login_failure: tuple[float, dict[str, str]] | None = None
    last_login_ok: float = 0.0  # monotonic time of the last successful server login
    last_connect_time: float = 0.0  # monotonic time the last server connect began (server_login_retry)
    # ClientKey recovered from a client's SCRAM login, for SCRAM pass-through to PostgreSQL.
    scram_client_key: bytes | None = None
    paused: bool = False
    empty_since: float = 0.0  # for autodb_idle_timeout
    dirty_since: float = 0.0  # RECONNECT: servers that started logging in before it get replaced
    # Encoded ParameterStatus sets by the client's startup values; key None holds the params
    # they were built from, so a change of `params` empties the cache.
    welcome_cache: dict = field(default_factory=dict)
    # The C side (pgmux.engine.PoolCore): the engine links and releases through these same
    # containers when nothing needs Python (Pooler._configure_core says when it may).
    core: PoolCore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.core = PoolCore(self, self.idle, self.active, self.waiting, self.stats)
        self.core.round_robin = self.round_robin

    def set_paused(self, paused: bool) -> None:
        """PAUSE/RESUME of this pool's database; the engine reads the flag from the core."""
        self.paused = self.core.paused = paused

    def set_login_failure(self, failure: tuple[float, dict[str, str]] | None) -> None:
        """The last failed server login (None: the last one worked); the engine links no one
        by itself while there is one."""
        self.login_failure = failure
        self.core.login_failing = failure is not None

    # ------------------------------------------------------------ counting

    @property
    def server_count(self) -> int:
        return len(self.idle) + len(self.active) + len(self.busy) + self.connecting

    def capacity(self, now: float | None = None) -> int:
        """Servers this pool may have now: pool_size, plus the reserve once the oldest client
        has waited reserve_pool_timeout."""
        size = self.limits.pool_size
        if self.limits.reserve_pool_size > 0 and self.waiting:
            now = time.monotonic() if now is None else now
            oldest = self.oldest_wait_start()
            if oldest is not None and now - oldest >= self.limits.reserve_pool_timeout:
                size += self.limits.reserve_pool_size
        return size

    def oldest_wait_start(self) -> float | None:
        for client in self.waiting:
            if not client.closed:
                return client.wait_started
        return None

    def live_waiters(self) -> int:
        return sum(1 for c in self.waiting if not c.closed)

    # ------------------------------------------------------------ decisions

    def take_idle(self) -> S | None:
        """An idle server to link, LIFO (warmest first) unless server_round_robin is set."""
        if not self.idle:
            return None
        server = self.idle.popleft() if self.round_robin else self.idle.pop()
        self.active.add(server)
        return server

    def enqueue(self, client: C, now: float | None = None) -> None:
        """Put a client at the back of the FIFO wait queue."""
        client.wait_started = time.monotonic() if now is None else now
        self.waiting.append(client)

    def next_waiter(self) -> C | None:
        """The client that has waited longest and is still connected."""
        while self.waiting:
            client = self.waiting.popleft()
            if not client.closed:
                return client
        return None

    def remove_waiter(self, client: C) -> None:
        try:
            self.waiting.remove(client)
        except ValueError:
            pass

    def connects_wanted(self, room_elsewhere: int | None = None, now: float | None = None) -> int:
        """How many new server connections to open now: enough for the waiting clients (and to
        reach min_pool_size), within pool capacity and `room_elsewhere` (db/user caps)."""
        room = self.capacity(now) - self.server_count
        if room_elsewhere is not None:
            room = min(room, room_elsewhere)
        if room <= 0:  # the usual case under load: no need to count the waiters (O(n))
            return 0
        wanted = self.live_waiters() - self.connecting - len(self.busy)  # busy ones come back soon
        if self.limits.min_pool_size:
            wanted = max(wanted, self.limits.min_pool_size - self.server_count)
        return max(0, min(wanted, room))

    def server_ready(self, server: S) -> C | None:
        """A server became linkable (new login, or released and clean). Returns the waiting client
        it must be linked to, or None after parking it idle."""
        self.busy.discard(server)
        self.active.discard(server)
        client = self.next_waiter()
        if client is None:
            self.idle.append(server)
            return None
        self.active.add(server)
        return client

    def server_busy(self, server: S) -> None:
        """The server is unlinked but not usable yet (reset query, check query running)."""
        self.active.discard(server)
        self.busy.add(server)

    def server_gone(self, server: S) -> None:
        """A server closed or is about to: forget it wherever it was."""
        self.active.discard(server)
        self.busy.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
