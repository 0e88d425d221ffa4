"""Counters, averages per stats_period, the stats log line, int-bucket histograms, value encoding."""

from __future__ import annotations

from decimal import Decimal

import pytest
from psycopg.types.numeric import DecimalBinaryDumper, NumericBinaryLoader

from pgmux.admin.result import (
    BYTEA,
    INT4,
    INT8,
    NUMERIC,
    TEXT,
    Column,
    binary_value,
    data_row,
    expand_formats,
    row_description,
    text_value,
)
from pgmux.pool.pool import PoolStats
from pgmux.stats import counters
from pgmux.stats.counters import STAT_FIELDS, StatsTracker, averages, group_by_database, snapshot, stats_log_line
from pgmux.stats.histogram import EXPORTED_INDEXES, cumulative_buckets, new_histogram, observe, upper_bound_seconds


def make_stats(**values: int) -> PoolStats:
    stats = PoolStats()
    for k, v in values.items():
        setattr(stats, k, v)
    return stats


def test_snapshot_order_is_show_stats_order() -> None:
    stats = make_stats(server_assignment_count=1, xact_count=2, query_count=3, bytes_received=4, bytes_sent=5,
                       xact_time_us=6, query_time_us=7, wait_time_us=8, client_login_count=12)
    assert snapshot(stats) == (1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 12)
    assert len(STAT_FIELDS) == 12


def test_averages_like_pgbouncer_calc_average() -> None:
    old = (10, 10, 20, 1000, 5000, 1_000, 2_000, 300, 0, 0, 0, 1)
    cur = (30, 40, 80, 3000, 9000, 61_000, 32_000, 2_300, 4, 2, 6, 3)
    avg = averages(cur, old, 2_000_000)  # two seconds
    assert avg[counters.ASSIGN] == 10 and avg[counters.XACT] == 15 and avg[counters.QUERY] == 30
    assert avg[counters.RECV] == 1000 and avg[counters.SENT] == 2000
    assert avg[counters.XACT_TIME] == 60_000 // 30  # per transaction, not per second
    assert avg[counters.QUERY_TIME] == 30_000 // 60
    assert avg[counters.WAIT_TIME] == 2_000 // 20  # per server assignment
    assert avg[counters.CLIENT_PARSE] == 2 and avg[counters.SERVER_PARSE] == 1 and avg[counters.BIND] == 3
    assert avg[counters.LOGIN] == 1
    assert averages(cur, old, 0) == counters.ZERO
    assert averages(old, cur, 1_000_000) == counters.ZERO  # counters that went backwards count as 0


def test_tracker_refresh_and_log_line() -> None:
    t = StatsTracker(new_stamp=10_000_000)
    assert t.old_stamp == 9_000_000
    key = ("db", "u")
    first = {key: (0, 5, 5, 100, 200, 50, 50, 0, 0, 0, 0, 1)}
    t.refresh(first, now=11_000_000)
    second = {key: (0, 15, 25, 300, 600, 150, 250, 0, 0, 0, 0, 1)}
    cur, old = t.refresh(second, now=12_000_000)
    assert old == first[key] and cur == second[key]
    avg = averages(cur, old, 12_000_000 - t.old_stamp)
    assert avg[counters.XACT] == 10 and avg[counters.QUERY] == 20
    line = stats_log_line(avg)
    assert line == ("stats: 10 xacts/s, 20 queries/s, 0 client parses/s, 0 server parses/s, 0 binds/s, "
                    "in 200 B/s, out 400 B/s, xact 10 us, query 10 us, wait 0 us")
    # SHOW STATS between refreshes: live counters against the older snapshot
    live = (0, 25, 45, 500, 1000, 250, 450, 0, 0, 0, 0, 1)
    assert t.averages(live, t.old(key), now=13_000_000)[counters.XACT] == 10  # 20 xacts over 2 s


def test_group_by_database_cuts_where_the_database_changes() -> None:
    t = StatsTracker()
    sources = [("a", "u1", make_stats(xact_count=1)), ("a", "u2", make_stats(xact_count=2)),
               ("b", "u1", make_stats(xact_count=4))]
    rows = group_by_database(sources, t)
    assert [(db, cur[counters.XACT]) for db, cur, _ in rows] == [("a", 3), ("b", 4)]


def test_histogram_buckets() -> None:
    h = new_histogram()
    for us in (0, 1, 31, 32, 100, 127, 128, 5_000, 10**9):
        observe(h, us)
    assert h[0] == 1 and h[1] == 1 and h[5] == 1 and h[6] == 1 and h[7] == 2 and h[8] == 1
    buckets = cumulative_buckets(h)
    assert buckets[-1] == ("+Inf", 9)
    assert len(buckets) == len(EXPORTED_INDEXES) + 1
    bounds = dict(buckets)
    assert bounds[repr(upper_bound_seconds(5))] == 3  # 0, 1, 31 us are <= 31 us
    assert bounds[repr(upper_bound_seconds(7))] == 6  # ... plus 32, 100, 127
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)
    assert upper_bound_seconds(27) > 100  # the last finite bucket is above 100 s
    assert bounds[repr(upper_bound_seconds(27))] == 8  # 10**9 us = 1000 s only in +Inf


@pytest.mark.parametrize("n", [0, 1, 9999, 10000, 12345, 100_000_000, 123456789012345678, -5, -10000])
def test_numeric_binary_matches_psycopg(n: int) -> None:
    assert binary_value(n, NUMERIC) == bytes(DecimalBinaryDumper(Decimal).dump(Decimal(n)))
    assert NumericBinaryLoader(NUMERIC).load(binary_value(n, NUMERIC)) == n  # type: ignore[arg-type]


def test_value_encodings() -> None:
    assert binary_value(7, INT4) == b"\0\0\0\x07" and binary_value(7, INT8) == b"\0" * 7 + b"\x07"
    assert text_value(7, NUMERIC) == b"7" and text_value(None, TEXT) is None
    assert text_value(b"\x01\xff", BYTEA) == b"\\x01ff" and binary_value(b"\x01", BYTEA) == b"\x01"
    assert text_value("é", TEXT) == "é".encode()


def test_row_messages() -> None:
    cols = [Column("a", TEXT), Column("n", INT4)]
    rd = row_description(cols, [1])
    assert rd[:1] == b"T" and rd.count(b"\x00\x01") >= 2  # binary format code on both columns
    dr = data_row(cols, ["x", None], [0, 1])
    assert dr == b"D" + (4 + 2 + 4 + 1 + 4).to_bytes(4, "big") + b"\x00\x02" + b"\x00\x00\x00\x01x" + b"\xff" * 4
    assert expand_formats([], 3) == [0, 0, 0] and expand_formats([1], 2) == [1, 1]
    with pytest.raises(Exception, match="result formats"):
        expand_formats([0, 1], 3)
