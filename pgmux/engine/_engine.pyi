# Type stub of the compiled engine (_engine.pyx); the seam itself is documented in _engine.pxd.
import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from pgmux.engine._querystats import QueryStats

Buffer = bytes | bytearray | memoryview

PIN_HINTS: int
C_LOGIN_STARTUP: int
LAZY_PREPARE: int
SESSION: int
TRACKED: int

class PoolStats:
    xact_count: int
    query_count: int
    server_assignment_count: int
    bytes_received: int
    bytes_sent: int
    xact_time_us: int
    query_time_us: int
    wait_time_us: int
    client_login_count: int
    client_parse_count: int
    server_parse_count: int
    bind_count: int
    histograms: bool
    wait_hist: list[int]
    query_hist: list[int]
    xact_hist: list[int]
    def __init__(self) -> None: ...

class PoolCore:
    pool: Any
    idle: Any
    active: Any
    waiting: Any
    stats: PoolStats
    enabled: bool
    lifetime: float
    check_delay: float
    pool_size: int
    reserve: bool
    qpool: int
    paused: bool
    round_robin: bool
    login_failing: bool
    def __init__(self, pool: Any, idle: Any, active: Any, waiting: Any, stats: PoolStats) -> None: ...

class Link:
    outstanding: int
    pending_ext: bool
    status: int
    last_start: int
    copy_in: int
    copy_base: int
    boundary_due: bool
    query_start: float
    xact_start: float
    last_used: float
    request_time: float
    link_stats: PoolStats | None
    max_packet_size: int
    closed: bool
    waiting: bool
    linking: bool
    write_paused: bool
    read_paused: bool
    auto: bool
    close_needed: bool
    dirty: bool
    cancels: int
    connect_time: float
    wait_started: float
    core: PoolCore | None
    linger: bool
    engine_login: int
    query_names: dict[bytes, int] | None
    @property
    def adopted(self) -> bool: ...
    @property
    def fast(self) -> bool: ...
    @property
    def tls_native(self) -> bool: ...
    @property
    def carried(self) -> tuple[int, int]: ...
    def request_sent(self, kind: int) -> None: ...
    def ready(self, status: int) -> None: ...
    def copy_started_py(self) -> None: ...
    def copy_end_py(self) -> None: ...
    def to_slow(self) -> None: ...
    def reclaim(self) -> None: ...
    # per-query statistics from Python's paths (buf: the protocol's bytearray; start/stop: offsets)
    def note_query(self, buf: Buffer, start: int, stop: int) -> None: ...
    def note_parse(self, server: Link | None, buf: Buffer, start: int, stop: int) -> None: ...
    def note_bind(self, server: Link, buf: Buffer, start: int, stop: int) -> None: ...
    def note_execute(self) -> None: ...
    def note_rows(self, buf: Buffer, start: int, stop: int) -> None: ...
    def note_error(self) -> None: ...
    def note_wait(self, us: int) -> None: ...
    @property
    def query_ring(self) -> tuple[int, list[int]] | None: ...

class EngineTransport(asyncio.Transport):
    def __init__(self, link: Link, family: int) -> None: ...

class Statement:
    id: int
    server_name: bytes
    tail: bytes
    def __init__(self, id: int, server_name: bytes, tail: bytes) -> None: ...
    def parse_message(self) -> bytes: ...

class Acceptor(Link):
    def set_options(self, options: Iterable[tuple[int, int, int]]) -> None: ...

class Engine:
    epfd: int
    batches: int
    reads: int
    fast_reads: int
    escapes: int
    native_tls: bool
    offer_tls: bool
    tls_native: int
    tls_python: int
    c_logins: int
    hold: bool  # enable_hold() succeeded: the engine waits in its own epoll_wait while busy
    holds: int
    hold_batches: int
    login_escapes: int
    login_routes: dict[bytes, Any]  # StartupMessage body -> net.client.LoginRoute
    route_logins: int
    c_scram_logins: int
    qstats: QueryStats
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...
    def listen(self, fd: int, on_accept: Callable[[int, tuple[str, int] | None, tuple[str, int] | None], None],
               on_error: Callable[[int], None], options: Iterable[tuple[int, int, int]] = ...) -> Acceptor: ...
    def unlisten(self, acceptor: Acceptor) -> None: ...
    def adopt(self, link: Link, transport: Any) -> EngineTransport | None: ...
    def adopt_fd(self, link: Link, fd: int, family: int = ...) -> EngineTransport: ...
    def auto_link(self, client: Link, flags: int) -> bool: ...
    def link_fast(self, client: Link, server: Link, flags: int) -> bool: ...
    def unlink(self, link: Link) -> None: ...
    def start_tls(self, link: Link, ctx: Any, server_side: bool = True,
                  server_hostname: str | None = None) -> asyncio.Future[None]: ...
    def enable_hold(self) -> bool: ...
    def run(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
def same_shape_py(a: bytes, b: bytes) -> bool: ...
def shape_slot_py(q: bytes, pool: int) -> int: ...
