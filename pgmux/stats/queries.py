"""Per-query statistics, Python's side: the rows of SHOW QUERIES, merged across workers.

The engine counts in C (pgmux/engine/_querystats.pyx): for each (database, user, normalized
statement) the calls, errors, rows, query and wait time and a latency histogram, added at the
ReadyForQuery that answers each request. Here those rows become SHOW QUERIES's (sorted by total
time, as one would read pg_stat_statements), /metrics reads them, and with `workers = N` each
worker's raw rows (histograms included) are summed before percentiles are taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pgmux.engine._querystats import BUCKETS, percentiles_of

#: The query text of a pool's row that least recently used statements were folded into.
OTHER_QUERY = "(other)"

#: SHOW QUERIES: name, PgBouncer type letter. Times in microseconds, as SHOW STATS's.
QUERIES_COLUMNS_SPEC = (
    ("database", "s"), ("user", "s"), ("query", "s"), ("calls", "q"), ("errors", "q"), ("rows", "q"),
    ("total_query_time", "q"), ("avg_query_time", "q"), ("p50_query_time", "q"), ("p95_query_time", "q"),
    ("p99_query_time", "q"), ("max_query_time", "q"), ("total_wait_time", "q"), ("queryid", "q"),
)

# Indexes of QueryStats.export() rows.
DB, USER, FP, TEXT, CALLS, ERRORS, ROWS, TOTAL, WAIT, MIN, MAX, P50, P95, P99, HIST = range(15)


def queryid(fp: int) -> int:
    """The fingerprint as PostgreSQL shows a queryid: a signed 64-bit integer (0: the other row)."""
    return fp - (1 << 64) if fp >= 1 << 63 else fp


def show_rows(raw: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """SHOW QUERIES rows from QueryStats.export() rows, the most total time first."""
    out = []
    for r in raw:
        calls = r[CALLS]
        out.append([r[DB], r[USER], OTHER_QUERY if r[TEXT] is None else r[TEXT], calls, r[ERRORS], r[ROWS],
                    r[TOTAL], r[TOTAL] // calls if calls else 0, r[P50], r[P95], r[P99], r[MAX], r[WAIT],
                    queryid(r[FP])])
    out.sort(key=lambda row: (-row[6], -row[3], row[0], row[1], row[2]))
    return out


def worker_part(raw: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """One worker's rows for a merged SHOW QUERIES: JSON-able (the histogram as hex)."""
    return [[*r[:HIST], r[HIST].hex()] for r in raw]


def merge(parts: Iterable[Iterable[Sequence[Any]]]) -> list[tuple[Any, ...]]:
    """Export rows of several workers (worker_part) summed per (database, user, statement), with
    percentiles taken from the summed histograms."""
    acc: dict[tuple[Any, ...], list[Any]] = {}
    hists: dict[tuple[Any, ...], list[int]] = {}
    width = 4
    for part in parts:
        for r in part:
            key = (r[DB], r[USER], r[FP], r[TEXT])
            hist = bytes.fromhex(r[HIST])
            counts = [int.from_bytes(hist[i:i + width], "little") for i in range(0, len(hist), width)]
            have = acc.get(key)
            if have is None:
                acc[key] = list(r[:HIST])
                hists[key] = counts
                continue
            for i in (CALLS, ERRORS, ROWS, TOTAL, WAIT):
                have[i] += r[i]
            have[MIN] = min(have[MIN], r[MIN])
            have[MAX] = max(have[MAX], r[MAX])
            hists[key] = [a + b for a, b in zip(hists[key], counts, strict=True)]
    out = []
    for key, row in acc.items():
        counts = hists[key]
        if len(counts) != BUCKETS:
            continue
        hist = b"".join(min(c, 0xFFFFFFFF).to_bytes(width, "little") for c in counts)
        row[P50], row[P95], row[P99] = percentiles_of(hist, row[CALLS], row[MIN], row[MAX])
        out.append((*row, None))
    return out
