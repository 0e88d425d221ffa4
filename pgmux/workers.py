"""`workers = N`: N processes behind one port, with pool limits that hold across them.

One Python process saturates one core; PgBouncer's answer is several processes on one port
(so_reuseport) with per-process limits. Here a supervisor (the parent, which owns the pidfile)
binds the sockets, creates the shared accounting and forks N workers, each running the ordinary
single-process pooler (cli.serve) on its own event loop:

- Listening: each worker has its own TCP socket with SO_REUSEPORT (the kernel spreads connections
  over them); the Unix socket is one socket shared by all (pgmux/net/listener.py).
- Limits: `SharedTable`, an anonymous shared mapping made before fork, holds per-name, per-worker
  counters: servers per pool ("pool\\0db\\0user"), per database ("db\\0name"), per user
  ("user\\0name") and admitted clients ("clients"). A worker checks the sum over workers and takes
  a slot under one lock before it opens a server (pool_size, max_db_connections,
  max_user_connections) or admits a client (max_client_conn), and publishes its own count when
  one goes. Each worker writes only its own column, so a dead worker's column is simply zeroed.
- Sharing a pool's servers: workers publish how many clients wait per pool; a worker holding more
  than its fair share while another waits gives servers back: idle ones at once (`closing
  because: evicted for another worker`), busy ones when released (close_needed).
- Cancel requests: the 8-byte key carries the worker index in the low bits of its first byte; a
  CancelRequest that lands on another worker is forwarded over a datagram socketpair to the
  worker that owns the key, which handles it as if received directly.

The supervisor forwards SIGHUP/SIGINT/SIGTERM/SIGQUIT/SIGUSR1/SIGUSR2, respawns a worker that
dies unexpectedly and exits once all workers are gone after a shutdown. RELOAD and SHUTDOWN on one
worker's admin console are passed to the others through the supervisor; every other console
command acts on the worker the console connected to. The console's statistics (SHOW STATS,
POOLS, LISTS, ...: show.MERGED_SHOWS) cover every worker: the worker asked sends a request over
the socketpairs, each other worker answers with its part as JSON (in datagrams of up to CHUNK
bytes), and the asker adds them up (show.merged_show), leaving out a worker that is silent for
GATHER_TIMEOUT. With `workers = 1` none of this exists.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgmux import log as pglog
from pgmux.errors import ClientError
from pgmux.net import systemd
from pgmux.net.listener import BoundSockets, bind_worker_sockets

if TYPE_CHECKING:
    from pgmux.admin.result import Result
    from pgmux.config import Config
    from pgmux.net.server import ServerConnection
    from pgmux.pool.pool import Pool
    from pgmux.pooler import Pooler

logger = pglog.logger

TICK = 0.1  # seconds between two rounds of publishing waiters and giving servers back
# A closed server still counts for this long, so PostgreSQL has ended its backend before another
# worker opens one in its place (a worker's own replacements follow the one-process rules).
LINGER = 0.03
CANCEL_PACKET = struct.Struct("!iiii")
CANCEL_REQUEST_CODE = 80877102
WAKE = b"W"  # datagram: a pool slot was freed, retry the connects your waiting clients need
# Merged SHOW commands: b"S" + ASK + show name asks a sibling for its part; it answers with
# b"T" + PART + a piece of the JSON of its part (parts can outgrow one datagram).
ASK = struct.Struct("!IH")  # request id, asking worker
PART = struct.Struct("!IHHH")  # request id, answering worker, piece number, pieces
CHUNK = 60000  # bytes of JSON per datagram (a Unix datagram may be up to about SO_SNDBUF)
MAX_DATAGRAM = 1 + PART.size + CHUNK
GATHER_TIMEOUT = 1.0  # seconds a merged SHOW waits for the other workers
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
SHUTDOWN_SIGNAL = {"immediate": signal.SIGQUIT, "wait_for_servers": signal.SIGINT,
                   "wait_for_clients": signal.SIGTERM}


def hash64(name: str) -> int:
    """A stable, non-zero 64-bit key for a name (0 marks a free slot)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") or 1


# ---------------------------------------------------------------------------------------------
# shared accounting


class SharedTable:
    """Counters per name and per worker in an anonymous MAP_SHARED mapping made before fork.

    Layout: `slots` 64-bit name keys (open addressing, never freed), then per slot and worker two
    int32: servers (or clients) held, clients waiting. Writers change only their own column.
    The lock is a POSIX record lock (fcntl.lockf) on a temporary file: per process, and released
    by the kernel when its holder dies, so a SIGKILLed worker cannot block the others.
    """

    def __init__(self, workers: int, slots: int = 8192) -> None:
        self.workers = workers
        self.slots = slots
        self._lock_file = tempfile.TemporaryFile(prefix="pgmux-workers-")  # noqa: SIM115 - lives with the process
        self._lock_fd = self._lock_file.fileno()
        self._mm = mmap.mmap(-1, slots * 8 + slots * workers * 8)
        view = memoryview(self._mm)
        self.keys = view[: slots * 8].cast("Q")
        self.cells = view[slots * 8:].cast("i")
        self._slot_of: dict[str, int] = {}
        self._full_logged = False

    def lock(self) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)

    def slot(self, name: str) -> int:
        """The slot of `name`, claimed on first use; -1 when the table is full (then the name is
        not limited across workers, and that is logged once)."""
        found = self._slot_of.get(name)
        if found is not None:
            return found
        key = hash64(name)
        keys = self.keys
        self.lock()
        try:
            i = key % self.slots
            found = -1
            for _ in range(self.slots):
                k = keys[i]
                if k == key:
                    found = i
                    break
                if k == 0:
                    keys[i] = key
                    found = i
                    break
                i = (i + 1) % self.slots
        finally:
            self.unlock()
        if found < 0 and not self._full_logged:
            self._full_logged = True
            logger.warning("workers: shared table full (%d names); new pools are limited per worker", self.slots)
        self._slot_of[name] = found
        return found

    def counts(self, slot: int) -> list[int]:
        if slot < 0:
            return [0] * self.workers
        base = slot * self.workers * 2
        return list(self.cells[base: base + self.workers * 2: 2])

    def waiting(self, slot: int) -> list[int]:
        if slot < 0:
            return [0] * self.workers
        base = slot * self.workers * 2 + 1
        return list(self.cells[base: base + self.workers * 2: 2])

    def others(self, slot: int, me: int) -> int:
        """Held by the other workers (a read without the lock: for estimates only)."""
        counts = self.counts(slot)
        return sum(counts) - counts[me]

    def reserve(self, me: int, items: list[tuple[int, int, int]], fair: tuple[int, int] | None = None) -> bool:
        """Atomically: if for every (slot, limit, mine) the others' count + mine + 1 stays within
        limit, publish mine + 1 in each and return True; else publish mine and return False.
        `fair` = (slot, my waiting clients): also refuse when another worker has clients waiting
        there and this worker would go beyond its fair share of items[0]'s limit."""
        cells = self.cells
        w = self.workers
        self.lock()
        try:
            ok = True
            for slot, limit, mine in items:
                if slot >= 0 and sum(self.counts(slot)) - cells[(slot * w + me) * 2] + mine + 1 > limit:
                    ok = False
                    break
            if ok and fair is not None and items[0][0] >= 0:
                slot, limit, mine = items[0]
                ok = mine + 1 <= self.fair_share(slot, me, limit)
            for slot, _limit, mine in items:
                if slot >= 0:
                    cells[(slot * w + me) * 2] = mine + 1 if ok else mine
            if fair is not None and fair[0] >= 0:
                cells[(fair[0] * w + me) * 2 + 1] = fair[1]
            return ok
        finally:
            self.unlock()

    def fair_share(self, slot: int, me: int, limit: int) -> int:
        """`limit` while no other worker waits there, else the limit shared (rounded up) by this
        worker and the others that hold or want servers of it."""
        counts, waits = self.counts(slot), self.waiting(slot)
        if not any(n for i, n in enumerate(waits) if i != me):
            return limit
        demand = 1 + sum(1 for i in range(self.workers) if i != me and (counts[i] or waits[i]))
        return math.ceil(limit / demand)

    def publish(self, me: int, items: list[tuple[int, int, int | None]]) -> None:
        """Set this worker's (count, waiting) of each slot; waiting None leaves it as it is."""
        cells = self.cells
        w = self.workers
        self.lock()
        try:
            for slot, count, waiting in items:
                if slot >= 0:
                    cells[(slot * w + me) * 2] = count
                    if waiting is not None:
                        cells[(slot * w + me) * 2 + 1] = waiting
        finally:
            self.unlock()

    def clear_worker(self, index: int) -> None:
        """A worker died: nothing it held exists any more."""
        cells = self.cells
        w = self.workers
        self.lock()
        try:
            for slot in range(self.slots):
                if self.keys[slot]:
                    cells[(slot * w + index) * 2] = 0
                    cells[(slot * w + index) * 2 + 1] = 0
        finally:
            self.unlock()


# ---------------------------------------------------------------------------------------------
# one worker's side


@dataclass
class WorkerContext:
    """What a worker inherits from the supervisor at fork."""

    index: int
    count: int
    table: SharedTable
    bound: BoundSockets
    channels: list[tuple[socket.socket, socket.socket]]  # [i] = (worker i reads, others send)
    parent_pid: int
    signal_mask: set[int]  # to restore once the event loop handles signals (blocked until then)

    def prepare(self, pooler: Pooler) -> WorkerShare:
        """Right after the Pooler is made, before listeners and admin_start: keep only this
        worker's sockets and channel ends, and hook the shared accounting in."""
        self.bound.keep_only(self.index)
        systemd.disable_notify()  # the supervisor is the process the service manager knows
        for i, (receive, send) in enumerate(self.channels):
            if i == self.index:
                send.close()
            else:
                receive.close()
        if self.index and pooler.settings.metrics_listen:
            # One metrics endpoint, worker 0's: the others would fail to bind the same address.
            pooler.settings.set("metrics_listen", "", source="worker")
        share = WorkerShare(self, pooler)
        pooler.shared = share
        return share


@dataclass
class _Slots:
    pool: int
    db: int
    user: int


@dataclass
class _Gather:
    """A merged SHOW's answers from the other workers, as they come in."""

    expected: int
    done: asyncio.Future[None]
    parts: dict[int, Any] = field(default_factory=dict)  # worker index -> its part
    pieces: dict[int, dict[int, bytes]] = field(default_factory=dict)  # worker -> piece no. -> bytes


@dataclass
class WorkerShare:
    """This worker's part in the shared accounting, cancel routing and pool sharing; the Pooler
    calls it (as `pooler.shared`) where it opens or loses servers and admits or loses clients."""

    ctx: WorkerContext
    pooler: Pooler
    # Per pool (database, user): servers closed less than LINGER ago, and servers promised to
    # another worker (close_needed) that are still open. Both still count as held.
    lingering: dict[tuple[str, str], int] = field(default_factory=dict)
    marked: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    _closing: dict[int, bool] = field(default_factory=dict)  # id(server) -> given to another worker
    _slots: dict[tuple[str, str], _Slots] = field(default_factory=dict)
    _params_since: dict[tuple[str, str], float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False
    _gathers: dict[int, _Gather] = field(default_factory=dict)  # merged SHOWs waiting, by request id
    _next_request: int = 0
    _replies: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.index = self.ctx.index
        self.table = self.ctx.table
        self.clients_slot = self.table.slot("clients")
        bits = max(1, (self.ctx.count - 1).bit_length())
        self.key_mask = (1 << bits) - 1
        self.receiver = self.ctx.channels[self.index][0]

    # ---- lifecycle

    def start(self) -> None:
        """After the signal handlers are set: listen for forwarded cancels and start the tick."""
        pooler = self.pooler
        # Signals stayed blocked since fork: a SIGHUP before the handlers existed would have
        # killed the worker. Pending ones are delivered now.
        signal.pthread_sigmask(signal.SIG_SETMASK, self.ctx.signal_mask)
        pooler.loop.add_reader(self.receiver.fileno(), self._on_datagram)
        self._task = pooler.loop.create_task(self._run_ticks())

    def relay_reload(self) -> None:
        """A RELOAD typed on this worker's console: the supervisor passes it to every worker."""
        _signal(self.ctx.parent_pid, signal.SIGHUP)

    def relay_shutdown(self, mode: str) -> None:
        """A SHUTDOWN typed on this worker's console: the supervisor shuts every worker down."""
        _signal(self.ctx.parent_pid, SHUTDOWN_SIGNAL.get(mode, signal.SIGTERM))

    def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        try:
            self.pooler.loop.remove_reader(self.receiver.fileno())
        except (OSError, ValueError):
            pass

    # ---- clients (max_client_conn)

    def admit_client(self, admitted: int, limit: int) -> bool:
        """Take one of max_client_conn's slots; `admitted` is this worker's count before."""
        return self.table.reserve(self.index, [(self.clients_slot, limit, admitted)])

    def clients_changed(self, admitted: int) -> None:
        self.table.publish(self.index, [(self.clients_slot, admitted, None)])

    def admit_login(self, dbname: str, max_db: int, n_db: int, user: str, max_user: int,
                    n_user: int) -> str | None:
        """max_db_client_connections / max_user_client_connections across workers: take a slot of
        each limit that is set, or name the one that is full (and take none)."""
        t = self.table
        db_item = (t.slot(f"dbclients\0{dbname}"), max_db, n_db)
        if max_db and not t.reserve(self.index, [db_item]):
            return "max_db_client_connections"
        if max_user and not t.reserve(self.index, [(t.slot(f"userclients\0{user}"), max_user, n_user)]):
            if max_db:
                t.publish(self.index, [(db_item[0], n_db, None)])
            return "max_user_client_connections"
        return None

    def logins_changed(self, dbname: str, n_db: int, user: str, n_user: int) -> None:
        """A counted client went: publish this worker's counts for its database and user."""
        t = self.table
        t.publish(self.index, [(t.slot(f"dbclients\0{dbname}"), n_db, None),
                               (t.slot(f"userclients\0{user}"), n_user, None)])

    # ---- cancel keys

    def stamp_key(self, first_byte: int) -> int:
        """The key's first byte with this worker's index in its low bits (sign bit clear)."""
        return (first_byte & 0x7F & ~self.key_mask) | self.index

    def forward_cancel(self, key: bytes) -> bool:
        """A CancelRequest whose key another worker issued: send it there (True), else False."""
        owner = key[0] & self.key_mask
        if owner == self.index or owner >= self.ctx.count:
            return False
        pid, secret = struct.unpack("!ii", key)
        self._send(owner, CANCEL_PACKET.pack(16, CANCEL_REQUEST_CODE, pid, secret))
        logger.debug("cancel request forwarded to worker %d", owner + 1)  # rare: no DEBUG guard
        return True

    def _send(self, worker: int, data: bytes) -> None:
        try:
            self.ctx.channels[worker][1].send(data)
        except OSError as exc:
            logger.warning("message to worker %d dropped: %s", worker + 1, exc)

    def _on_datagram(self) -> None:
        wake = False
        while True:
            try:
                data = self.receiver.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return
            kind = data[:1]
            if kind == b"T":
                self._on_part(data)
            elif kind == b"S" and len(data) > 1 + ASK.size:
                rid, asker = ASK.unpack_from(data, 1)
                what = data[1 + ASK.size:].decode("ascii", "replace")
                task = self.pooler.loop.create_task(self._answer(rid, asker, what))
                self._replies.add(task)
                task.add_done_callback(self._replies.discard)
            elif len(data) == 16:
                _length, code, pid, secret = CANCEL_PACKET.unpack(data)
                if code == CANCEL_REQUEST_CODE:
                    self.pooler.handle_cancel(pid, secret)
            elif data == WAKE:
                wake = True
        if wake:
            self._retry_waiting()

    # ---- merged SHOW commands (console, metrics)

    async def merged_show(self, name: str) -> Result:
        """SHOW `name` for pgmux as a whole: this worker's part and the others', merged."""
        from pgmux.admin import show

        mine = show.worker_part(self.pooler, name)
        return show.merged_show(name, [mine, *await self.gather(name)])

    async def gather(self, what: str) -> list[Any]:
        """The other workers' `show.worker_part(what)`: asked over the channels, awaited for up to
        GATHER_TIMEOUT. A worker that does not answer in time (being restarted, stuck) is left
        out, with a warning in the log."""
        self._next_request = (self._next_request + 1) & 0xFFFFFFFF
        rid = self._next_request
        others = [w for w in range(self.ctx.count) if w != self.index]
        gather = _Gather(len(others), self.pooler.loop.create_future())
        self._gathers[rid] = gather
        request = b"S" + ASK.pack(rid, self.index) + what.encode("ascii")
        try:
            for worker in others:
                self._send(worker, request)
            await asyncio.wait({gather.done}, timeout=GATHER_TIMEOUT)
        finally:
            del self._gathers[rid]
        missing = [w + 1 for w in others if w not in gather.parts]
        if missing:
            logger.warning("SHOW %s: no answer from worker %s within %.1fs; shown without it",
                           what.upper(), ", ".join(map(str, missing)), GATHER_TIMEOUT)
        return [gather.parts[w] for w in sorted(gather.parts)]

    async def _answer(self, rid: int, asker: int, what: str) -> None:
        """A sibling's merged SHOW asks for this worker's part: send it back in pieces."""
        from pgmux.admin import show

        if what not in show.GATHERED or not 0 <= asker < self.ctx.count or asker == self.index:
            return
        try:
            payload = json.dumps(show.worker_part(self.pooler, what), separators=(",", ":")).encode()
        except Exception:  # noqa: BLE001 - the asker then goes without this worker's part
            logger.exception("SHOW %s for worker %d failed", what.upper(), asker + 1)
            return
        pieces = max(1, -(-len(payload) // CHUNK))
        sock = self.ctx.channels[asker][1]
        deadline = time.monotonic() + GATHER_TIMEOUT
        for n in range(pieces):
            datagram = b"T" + PART.pack(rid, self.index, n, pieces) + payload[n * CHUNK:(n + 1) * CHUNK]
            while True:
                try:
                    sock.send(datagram)
                    break
                except (BlockingIOError, InterruptedError):
                    if time.monotonic() > deadline:
                        logger.warning("SHOW %s answer to worker %d dropped: its channel is full",
                                       what.upper(), asker + 1)
                        return
                    await asyncio.sleep(0.005)  # the asker reads on its own loop
                except OSError as exc:
                    logger.warning("SHOW %s answer to worker %d dropped: %s", what.upper(), asker + 1, exc)
                    return

    def _on_part(self, data: bytes) -> None:
        if len(data) < 1 + PART.size:
            return
        rid, worker, n, pieces = PART.unpack_from(data, 1)
        gather = self._gathers.get(rid)
        if gather is None or worker in gather.parts or not n < pieces:
            return  # an answer that came too late
        got = gather.pieces.setdefault(worker, {})
        got[n] = data[1 + PART.size:]
        if len(got) < pieces:
            return
        del gather.pieces[worker]
        try:
            gather.parts[worker] = json.loads(b"".join(got[i] for i in range(pieces)))
        except ValueError:
            logger.warning("bad SHOW answer from worker %d", worker + 1)
            return
        if len(gather.parts) >= gather.expected and not gather.done.done():
            gather.done.set_result(None)

    # ---- servers

    def slots(self, pool: Pool[Any, Any]) -> _Slots:
        key = (pool.database, pool.user)
        found = self._slots.get(key)
        if found is None:
            t = self.table
            found = self._slots[key] = _Slots(t.slot(f"pool\0{pool.database}\0{pool.user}"),
                                              t.slot(f"db\0{pool.database}"), t.slot(f"user\0{pool.user}"))
        return found

    def held(self, pool: Pool[Any, Any]) -> int:
        """Servers this worker counts in the pool: its own, the ones closed less than LINGER ago
        and the ones promised to another worker but still open (those count twice: the slot is
        not this worker's to reuse when they go)."""
        key = (pool.database, pool.user)
        marked = self.marked.get(key)
        return pool.server_count + self.lingering.get(key, 0) + (len(marked) if marked else 0)

    def waiters(self, pool: Pool[Any, Any]) -> int:
        """Clients waiting for a server of the pool, or (new pool) for its first login."""
        n = pool.live_waiters()
        if pool.params is None:
            n += self.pooler.params_waiter_count(pool)
        return n

    def wanting(self, pool: Pool[Any, Any]) -> int:
        """Waiting clients no connect in flight or server being reset will serve: what other
        workers are told this worker lacks."""
        return max(0, self.waiters(pool) - pool.connecting - len(pool.busy))

    def _held_where(self, database: str | None = None, user: str | None = None) -> int:
        return sum(self.held(p) for p in self.pooler.pools.values()
                   if p.database == database or p.user == user)

    def reserve_server(self, pool: Pool[Any, Any]) -> bool:
        """Before a new server connection: room in the pool, its database and its user across
        all workers, and not beyond this worker's fair share while another worker waits."""
        slots = self.slots(pool)
        lim = pool.limits
        items = [(slots.pool, pool.capacity(), self.held(pool))]
        if lim.max_db_connections:
            items.append((slots.db, lim.max_db_connections, self._held_where(database=pool.database)))
        if lim.max_user_connections:
            items.append((slots.user, lim.max_user_connections, self._held_where(user=pool.user)))
        return self.table.reserve(self.index, items, fair=(slots.pool, self.wanting(pool)))

    def servers_sharing(self, pool: Pool[Any, Any], by_database: bool) -> int:
        """Pooler._servers_sharing across workers: the other workers' servers of the pool's
        database (or user), and the ones this worker holds."""
        slots = self.slots(pool)
        if by_database:
            return self.table.others(slots.db, self.index) + self._held_where(database=pool.database)
        return self.table.others(slots.user, self.index) + self._held_where(user=pool.user)

    def pool_room(self, pool: Pool[Any, Any], room: int | None) -> int:
        """`room` further bounded by the pool's capacity across workers (an estimate, read without
        the lock; reserve_server decides): when the other workers hold the rest of the pool, a
        queued client does not try, and fail, to reserve connects (O(waiters) each)."""
        left = pool.capacity() - self.table.others(self.slots(pool).pool, self.index) - self.held(pool)
        return left if room is None else min(room, left)

    def servers_changed(self, pool: Pool[Any, Any]) -> None:
        """A connect failed or a server went: publish this worker's counts of the pool."""
        self.table.publish(self.index, self._publish_items([pool]))

    def server_closed(self, server: ServerConnection) -> None:
        """A server of ours is closing (Pooler.server_lost): it keeps its slot for LINGER
        seconds, so PostgreSQL has ended the backend before another worker opens one."""
        sid = id(server)
        pool = server.pool
        key = (pool.database, pool.user)
        if sid not in self._closing:
            marked = self.marked.get(key)
            given = marked is not None and sid in marked
            if given:
                marked.discard(sid)  # type: ignore[union-attr]
            self._closing[sid] = given
            self.lingering[key] = self.lingering.get(key, 0) + 1
            self.pooler.loop.call_later(LINGER, self._linger_done, sid, key)
        self.servers_changed(pool)

    def _linger_done(self, sid: int, key: tuple[str, str]) -> None:
        given = self._closing.pop(sid, False)
        left = self.lingering.get(key, 1) - 1
        if left > 0:
            self.lingering[key] = left
        else:
            self.lingering.pop(key, None)
        pool = self.pooler.pools.get(key)
        if pool is None:
            return
        self.servers_changed(pool)
        if not given and self.waiters(pool):
            self._retry(pool)  # a slot given away is left to the worker it was given to
        for worker, n in enumerate(self.table.waiting(self.slots(pool).pool)):
            if n and worker != self.index:
                self._send(worker, WAKE)

    def _publish_items(self, pools: list[Pool[Any, Any]]) -> list[tuple[int, int, int | None]]:
        items: list[tuple[int, int, int | None]] = []
        by_db: dict[str, list[int]] = {}
        by_user: dict[str, list[int]] = {}
        for pool in pools:
            items.append((self.slots(pool).pool, self.held(pool), self.wanting(pool)))
            if pool.limits.max_db_connections:
                by_db.setdefault(pool.database, [0, 0])
            if pool.limits.max_user_connections:
                by_user.setdefault(pool.user, [0, 0])
        if by_db or by_user:
            for pool in self.pooler.pools.values():
                for acc in (by_db.get(pool.database), by_user.get(pool.user)):
                    if acc is not None:
                        acc[0] += self.held(pool)
                        acc[1] += self.wanting(pool)
            t = self.table
            items += [(t.slot(f"db\0{db}"), n, w) for db, (n, w) in by_db.items()]
            items += [(t.slot(f"user\0{user}"), n, w) for user, (n, w) in by_user.items()]
        return items

    # ---- the tick: publish, retry, give back

    async def _run_ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - maintenance must not stop
                logger.exception("worker tick failed")

    def tick(self) -> None:
        """Publish waiting clients and held servers, retry connects that were refused for want
        of room, give servers back to workers whose clients wait, notice a dead supervisor."""
        pooler = self.pooler
        if os.getppid() != self.ctx.parent_pid and not self._stopping:
            self._stopping = True
            logger.warning("supervisor is gone; shutting down")
            _signal(os.getpid(), signal.SIGTERM)
        pools = list(pooler.pools.values())
        if not pools:
            return
        self.table.publish(self.index, self._publish_items(pools))
        now = time.monotonic()
        for pool in pools:
            if self.waiters(pool):
                self._retry(pool, now)
            else:
                self._params_since.pop((pool.database, pool.user), None)
            self._give_back(pool)

    def _retry_waiting(self) -> None:
        for pool in list(self.pooler.pools.values()):
            if self.waiters(pool):
                self._retry(pool)

    def _retry(self, pool: Pool[Any, Any], now: float | None = None) -> None:
        """Connects a waiting client needs, refused earlier for want of room: try again."""
        pooler = self.pooler
        if pool.login_failure is not None:
            return  # server logins fail: the janitor retries at its own pace
        if pool.params is not None:
            pooler.launch_connects(pool)
            return
        if pool.connecting:
            return  # its first login is on its way (server_connect_timeout applies)
        # A new pool's first clients wait for room for its first login, within query_wait_timeout.
        key = (pool.database, pool.user)
        now = time.monotonic() if now is None else now
        since = self._params_since.setdefault(key, now)
        timeout = pooler.settings.query_wait_timeout
        if timeout and now - since >= timeout:
            self._params_since.pop(key, None)
            pooler.fail_params_waiters(pool, ClientError("query_wait_timeout"))
            return
        if not pool.paused and not (pooler.shutting_down and not pooler.draining()):
            pooler._spawn_connect(pool)

    def _give_back(self, pool: Pool[Any, Any]) -> None:
        """Another worker's clients wait for this pool (or its database or user) and every slot
        is taken: close idle servers this worker's clients do not need; beyond this worker's
        fair share (or while another worker has none at all), have one closed when released."""
        slots = self.slots(pool)
        counts, waits = self.table.counts(slots.pool), self.table.waiting(slots.pool)
        me = self.index
        others_waiting = sum(waits) - waits[me]
        limit = pool.capacity()
        if others_waiting and sum(counts) >= limit:
            if pool.idle and not self.waiters(pool):
                for _ in range(min(len(pool.idle), others_waiting)):
                    self._evict_idle(pool)
                return
            marked = self.marked.setdefault((pool.database, pool.user), set())
            keeps = pool.server_count - len(marked)
            if keeps <= 0:
                return
            give = keeps > self.table.fair_share(slots.pool, me, limit)
            others = [(counts[w], w) for w in range(len(counts)) if w != me]
            if not give and not marked and any(waits[w] and not counts[w] for _, w in others):
                # A worker with waiting clients and no server: the one holding most gives.
                top, first = max(others, key=lambda cw: (cw[0], -cw[1]))
                give = keeps > top or (keeps == top and me < first)
            if not give:
                return
            if pool.idle:
                self._evict_idle(pool)
                return
            for server in pool.active:
                # (never a replication server: it is not released, the mark would close it now)
                if not server.close_needed and server.replication is None:
                    server.close_needed = True
                    marked.add(id(server))
                    logger.info("%s closing when released: evicted for another worker", server.log_prefix)
                    return
            return
        if not pool.idle or self.waiters(pool):
            return
        lim = pool.limits
        for slot, cap in ((slots.db, lim.max_db_connections), (slots.user, lim.max_user_connections)):
            if not cap or slot < 0:
                continue
            waits = self.table.waiting(slot)
            if sum(waits) - waits[me] and sum(self.table.counts(slot)) >= cap:
                self._evict_idle(pool)
                return

    def _evict_idle(self, pool: Pool[Any, Any]) -> None:
        server = pool.idle.popleft()
        pool.server_gone(server)
        self.marked.setdefault((pool.database, pool.user), set()).add(id(server))
        self.server_closed(server)
        server.close("evicted for another worker")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# the supervisor


@dataclass
class _Child:
    index: int
    pid: int
    started: float


class Supervisor:
    """The parent process: binds, forks the workers, forwards signals, respawns, waits."""

    def __init__(self, config: Config, run_worker: Callable[[Config, WorkerContext], int],
                 after_bind: Callable[[], bool] | None = None,
                 on_reload: Callable[[Config], None] | None = None) -> None:
        self.config = config
        self.count = int(config.settings.workers)
        self.run_worker = run_worker
        self.after_bind = after_bind
        self.on_reload = on_reload
        self.children: dict[int, _Child] = {}  # pid -> child
        self.respawn_at: dict[int, float] = {}  # worker index -> monotonic time
        self.clear_at: dict[int, float] = {}  # dead worker's column to zero, at LINGER after its death
        self.backoff: dict[int, float] = {}
        self.stopping = False
        self.exit_code = 0

    def run(self) -> int:
        s = self.config.settings
        try:
            self.bound = bind_worker_sockets(s, self.count)
        except OSError as exc:
            logger.critical("%s", exc)
            return 1
        # after_bind (cli: pidfile, then -u/`user`) logs why it failed; nothing was forked yet.
        try:
            ok = self.after_bind is None or self.after_bind()
        except BaseException:
            self._close_bound()
            raise
        if not ok:
            self._close_bound()
            return 1
        self.table = SharedTable(self.count)
        self.channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(self.count)]
        for pair in self.channels:
            for sock in pair:
                sock.setblocking(False)
        self.parent_pid = os.getpid()
        waited = {*FORWARDED_SIGNALS, signal.SIGCHLD}
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        logger.info("pgmux %s starting %d worker processes", __import__("pgmux").__version__, self.count)
        try:
            for index in range(self.count):
                self._spawn(index)
            systemd.notify_ready()
            self._loop(waited)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)
            self._close_bound()
        logger.info("all workers exited")
        return self.exit_code

    def _close_bound(self) -> None:
        """Close the listening sockets; unlink the Unix socket if it is still the one we bound."""
        self.bound.close_all()
        self.bound.remove_unix_file()

    def _loop(self, waited: set[signal.Signals]) -> None:
        while True:
            self._reap()
            if self.stopping and not self.children:
                return
            now = time.monotonic()
            for index, when in list(self.clear_at.items()):
                if when <= now or index in self.respawn_at and self.respawn_at[index] <= now:
                    del self.clear_at[index]
                    self.table.clear_worker(index)
            for index, when in list(self.respawn_at.items()):
                if when <= now:
                    del self.respawn_at[index]
                    self._spawn(index)
            timeout = min([1.0, *(t - now for t in (*self.respawn_at.values(), *self.clear_at.values()))])
            timeout = max(0.01, timeout)
            info = signal.sigtimedwait(waited, timeout)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            self._on_signal(info.si_signo, info.si_pid)

    def _on_signal(self, sig: int, sender: int) -> None:
        name = _signame(sig)
        from_worker = sender in self.children
        if sig in STOP_SIGNALS:
            if not self.stopping:
                logger.info("got %s%s, stopping the workers", name,
                            f" from worker {self.children[sender].index + 1}" if from_worker else "")
                systemd.notify_stopping()
            self.stopping = True
            self.respawn_at.clear()
            self.bound.close_all()  # the listeners close for good as each worker stops listening
        elif sig == signal.SIGHUP:
            self._reload()
        for pid in list(self.children):
            if pid != sender:
                _signal(pid, sig)

    def _reload(self) -> None:
        """SIGHUP: reread the config for the workers started from now on (they get it too)."""
        from pgmux.auth import AuthFileError
        from pgmux.config import ConfigError, load_config
        from pgmux.pooler import check_config

        systemd.notify_reloading()
        try:
            try:
                new = load_config(self.config.path)
                check_config(new)
            except (ConfigError, AuthFileError, OSError):
                return  # the workers log why
            new.settings.adopt_nonreloadable(self.config.settings)
            self.config = new
            if self.on_reload is not None:
                # Reopening the log must never take the supervisor (and so every worker) down.
                try:
                    self.on_reload(new)
                except Exception:  # noqa: BLE001 - keep supervising; the old handlers still log
                    logger.exception("reload: redoing the logging setup failed")
        finally:
            systemd.notify_ready()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            # What it held is gone once PostgreSQL has ended its backends (LINGER).
            self.clear_at[child.index] = time.monotonic() + LINGER
            code = os.waitstatus_to_exitcode(status)
            how = f"exit code {code}" if code >= 0 else f"signal {-code} ({_signame(-code)})"
            if self.stopping:
                logger.info("worker %d (pid %d) exited (%s)", child.index + 1, pid, how)
                continue
            # Not a shutdown of pgmux (those come through here as signals first): replace it.
            lived = time.monotonic() - child.started
            delay = self.backoff.get(child.index, 0.05)
            delay = min(5.0, delay * 2) if lived < 2.0 else 0.1
            self.backoff[child.index] = delay
            self.respawn_at[child.index] = time.monotonic() + delay
            log = logger.info if code == 0 else logger.warning
            log("worker %d (pid %d) %s (%s); restarting it in %.1fs", child.index + 1, pid,
                "exited" if code == 0 else "died", how, delay)

    def _spawn(self, index: int) -> None:
        ctx = WorkerContext(index=index, count=self.count, table=self.table, bound=self.bound,
                            channels=self.channels, parent_pid=self.parent_pid, signal_mask=self.old_mask)
        pid = os.fork()
        if pid:
            self.children[pid] = _Child(index, pid, time.monotonic())
            logger.info("worker %d started (pid %d)", index + 1, pid)
            return
        code = 1
        try:
            # Own process group: a terminal's ^C reaches the supervisor, which forwards it once.
            os.setpgid(0, 0)
            code = self.run_worker(self.config, ctx)
        except BaseException:  # noqa: BLE001 - a worker must exit here, never return into the parent's code
            logger.exception("worker %d failed", index + 1)
        finally:
            for handler in logger.handlers:
                try:
                    handler.flush()
                except Exception:  # noqa: BLE001
                    pass
            logging.shutdown()
            os._exit(code)


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

