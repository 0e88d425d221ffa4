"""What the console adds to the process state: pause/suspend mode, paused and disabled databases,
the console sessions and the counters of the console's own pool ("pgbouncer"/"pgbouncer").

Kept in one object hung on the Pooler (``Pooler.admin_state()``) so that the pooler proper does
not grow console fields, and so that a fresh Pooler (tests) starts with fresh console state.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgmux.pool.pool import PoolStats
from pgmux.stats.counters import StatsTracker

if TYPE_CHECKING:
    from pgmux.net.client import ClientConnection

ADMIN_DB = "pgbouncer"
ADMIN_USER = "pgbouncer"

# PgBouncer's cf_pause_mode.
P_NONE = "none"
P_PAUSE = "pause"
P_SUSPEND = "suspend"


@dataclass(eq=False)
class ConsoleSession:
    """One logged-in console client."""

    client: ClientConnection
    user: str
    is_admin: bool
    query_start: float = 0.0  # monotonic start of the command being answered, 0 when idle


@dataclass(eq=False)
class AdminState:
    pause_mode: str = P_NONE
    paused_dbs: set[str] = field(default_factory=set)
    disabled_dbs: set[str] = field(default_factory=set)
    shutdown_mode: str | None = None
    sessions: dict[int, ConsoleSession] = field(default_factory=dict)  # by client id
    stats: PoolStats = field(default_factory=PoolStats)  # the console pool's own counters
    tracker: StatsTracker = field(default_factory=StatsTracker)
    # Servers whose close_needed was set by PAUSE (so RESUME can take it back).
    pause_marked: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    # Transports whose reading SUSPEND stopped.
    suspended: list[asyncio.ReadTransport] = field(default_factory=list)
    started: bool = False
    metrics_server: asyncio.AbstractServer | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def db_paused(self, db: str) -> bool:
        """Whether new transactions of `db` must wait (global PAUSE/SUSPEND or per-db PAUSE/KILL)."""
        return self.pause_mode != P_NONE or db in self.paused_dbs
