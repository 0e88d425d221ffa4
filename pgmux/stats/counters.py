"""Counter snapshots and averages per stats_period, as PgBouncer's ``src/stats.c`` computes them.

The hot path only increments plain ints on `PoolStats`; everything here reads them on the slow path
(SHOW STATS, the periodic ``stats:`` log line, the metrics collector). Every `stats_period` the
tracker shifts two snapshots (older <- newer <- current); averages are "current minus older,
per second of the time since the older snapshot", which is what PgBouncer prints: a rate over the
last one to two periods that never jumps to zero right after a refresh.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: PoolStats attribute for each SHOW STATS counter, in SHOW STATS column order. The three prepared
#: statement counters are read with a default of 0 until the pool keeps them.
STAT_FIELDS = (
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time_us",
    "query_time_us",
    "wait_time_us",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
    "client_login_count",
)
N_FIELDS = len(STAT_FIELDS)
(
    ASSIGN, XACT, QUERY, RECV, SENT, XACT_TIME, QUERY_TIME, WAIT_TIME, CLIENT_PARSE, SERVER_PARSE, BIND, LOGIN,
) = range(N_FIELDS)
ZERO: tuple[int, ...] = (0,) * N_FIELDS
USEC = 1_000_000

Snapshot = tuple[int, ...]
PoolKey = tuple[str, str]


def snapshot(stats: Any) -> Snapshot:
    """The counters of one PoolStats as a tuple in STAT_FIELDS order."""
    return tuple(int(getattr(stats, name, 0)) for name in STAT_FIELDS)


def add(a: Snapshot, b: Snapshot) -> Snapshot:
    return tuple(x + y for x, y in zip(a, b, strict=True))


#: (time counter, the count it is averaged over): mean microseconds per transaction / query / assignment
_MEAN_TIMES = ((XACT_TIME, XACT), (QUERY_TIME, QUERY), (WAIT_TIME, ASSIGN))


def _with_mean_times(rates: list[int], delta: list[int]) -> Snapshot:
    """``rates`` with its time columns replaced by the mean time per count in ``delta`` (0 without any)."""
    for t, n in _MEAN_TIMES:
        rates[t] = delta[t] // delta[n] if delta[n] else 0
    return tuple(rates)


def averages(cur: Snapshot, old: Snapshot, dur_us: int) -> Snapshot:
    """PgBouncer's calc_average(): rates per second for counts and bytes, mean microseconds per
    transaction / query / server assignment for the times. Counters that went backwards (a pool
    that was dropped and made again) count as zero."""
    if dur_us <= 0:
        return ZERO
    d = [max(0, c - o) for c, o in zip(cur, old, strict=True)]
    return _with_mean_times([USEC * x // dur_us for x in d], d)


def merged_averages(parts: Iterable[tuple[Snapshot, Snapshot, int]]) -> Snapshot:
    """Averages of several workers' (current, older, microseconds since older) for one row.

    Each worker shifts its snapshots on its own stats_period timer, so their windows differ by up
    to one period: rates are each worker's rate over its own window, summed; mean times are total
    time over total count of all windows. For one part this is exactly `averages`."""
    rates = [0] * N_FIELDS
    delta = [0] * N_FIELDS
    for cur, old, dur_us in parts:
        for i, x in enumerate(averages(cur, old, dur_us)):
            rates[i] += x
        for i, (c, o) in enumerate(zip(cur, old, strict=True)):
            delta[i] += max(0, c - o)
    return _with_mean_times(rates, delta)


def now_us() -> int:
    return time.monotonic_ns() // 1000


@dataclass
class StatsTracker:
    """The two snapshots per pool and their timestamps (PgBouncer's older/newer_stats)."""

    new_stamp: int = field(default_factory=now_us)
    old_stamp: int = 0
    newer: dict[PoolKey, Snapshot] = field(default_factory=dict)
    older: dict[PoolKey, Snapshot] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.old_stamp:
            self.old_stamp = self.new_stamp - USEC  # as stats_setup(): the first average spans 1 s more

    def refresh(self, current: dict[PoolKey, Snapshot], now: int | None = None) -> tuple[Snapshot, Snapshot]:
        """Shift the snapshots (end of a stats period). Returns (current total, older total) for
        the log line."""
        self.old_stamp = self.new_stamp
        self.new_stamp = now_us() if now is None else now
        self.older = self.newer
        self.newer = dict(current)
        cur_total, old_total = ZERO, ZERO
        for key, snap in current.items():
            cur_total = add(cur_total, snap)
            old_total = add(old_total, self.older.get(key, ZERO))
        return cur_total, old_total

    def old(self, key: PoolKey) -> Snapshot:
        return self.older.get(key, ZERO)

    def averages(self, cur: Snapshot, old: Snapshot, now: int | None = None) -> Snapshot:
        return averages(cur, old, (now_us() if now is None else now) - self.old_stamp)


def group_by_database(
    sources: Iterable[tuple[str, str, Any]], tracker: StatsTracker
) -> list[tuple[str, Snapshot, Snapshot]]:
    """(database, current, older) summed over the pools of each database. `sources` must be sorted by
    database, as PgBouncer's pool list is: rows are cut where the database changes."""
    out: list[tuple[str, Snapshot, Snapshot]] = []
    for db, user, stats in sources:
        cur = snapshot(stats)
        old = tracker.old((db, user))
        if out and out[-1][0] == db:
            _, c, o = out[-1]
            out[-1] = (db, add(c, cur), add(o, old))
        else:
            out.append((db, cur, old))
    return out


def stats_log_line(avg: Snapshot) -> str:
    """The periodic log line, worded as current PgBouncer's refresh_stats()."""
    return (
        f"stats: {avg[XACT]} xacts/s, {avg[QUERY]} queries/s, {avg[CLIENT_PARSE]} client parses/s, "
        f"{avg[SERVER_PARSE]} server parses/s, {avg[BIND]} binds/s, in {avg[RECV]} B/s, out {avg[SENT]} B/s, "
        f"xact {avg[XACT_TIME]} us, query {avg[QUERY_TIME]} us, wait {avg[WAIT_TIME]} us"
    )
