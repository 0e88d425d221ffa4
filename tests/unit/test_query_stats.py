"""Per-query statistics without sockets: the normalizer, the bounded table, percentiles, and the
merge of several workers' rows (pgmux/engine/_querystats.pyx, pgmux/stats/queries.py)."""

from __future__ import annotations

import pytest

from pgmux.engine._querystats import BUCKETS, QueryStats, bucket, normalize, percentiles_of
from pgmux.stats import queries as q


@pytest.mark.parametrize(("sql", "text"), [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
     "SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
    ("select 1, 2.5, .5, 1e10, 3.1E-2", "select $1, $2, $3, $4, $5"),
    ("SELECT 'a''b', E'x\\'y', B'101', X'ff', N'n', U&'d\\0061t'", "SELECT $1, $2, $3, $4, $5, $6"),
    ("SELECT $$a;b$$, $tag$ $$ $tag$", "SELECT $1, $2"),
    ("SELECT $1::int + $2", "SELECT $1::int + $2"),
    ("SELECT x1, t2.c3 FROM t2", "SELECT x1, t2.c3 FROM t2"),
    ('SELECT "Col ""1""" FROM "T"', 'SELECT "Col ""1""" FROM "T"'),
    ("  SELECT\n\t1  -- comment\n /* a /* nested */ b */ ;; ", "SELECT $1"),
    ("BEGIN; SELECT 1; COMMIT;", "BEGIN; SELECT $1; COMMIT"),
    ("", ""),
    ("SELECT 'unterminated", "SELECT $1"),
    ("SELECT $", "SELECT $"),
    ("UPDATE t SET a = a + -5 WHERE b = -1.5 AND c = x - 1 AND d = (2) -3",
     "UPDATE t SET a = a + $1 WHERE b = $2 AND c = x - $3 AND d = ($4) -$5"),
])
def test_normalized_text(sql: str, text: str) -> None:
    assert normalize(sql.encode())[1] == text


def test_same_statement_same_fingerprint() -> None:
    same = [b"SELECT a FROM t WHERE b = 1", b"select  A from T where B=2", b"SELECT a FROM t WHERE b = 'x' -- c",
            b"SELECT a FROM t WHERE b = $1;"]
    assert len({normalize(s)[0] for s in same}) == 1
    different = [b"SELECT a FROM t WHERE b = 1", b"SELECT a FROM t WHERE c = 1", b'SELECT "A" FROM t WHERE b = 1',
                 b"SELECT a FROM t WHERE b = 1 AND c = 2", b"SELECT ab FROM t WHERE b = 1", b"SELECT a, b FROM t"]
    assert len({normalize(s)[0] for s in different}) == len(different)
    assert all(normalize(s)[0] > 1 for s in same + different)  # 0 marks the other row


def test_long_text_is_cut_but_hashed_whole() -> None:
    a = b"SELECT " + b", ".join(b"c%d" % i for i in range(400)) + b" FROM t"
    b = a.replace(b"c399", b"c400")
    fa, ta = normalize(a)
    fb, tb = normalize(b)
    assert len(ta) == 1024 and ta == tb and fa != fb


def test_buckets_and_percentiles() -> None:
    assert [bucket(us) for us in (0, 1, 3, 4, 7, 8, 9, 10, 15, 16)] == [0, 1, 3, 4, 7, 8, 8, 9, 11, 12]
    assert bucket(1 << 50) == BUCKETS - 1
    stats = QueryStats(10)
    pool = stats.pool_id("db", "u")
    h = stats.lookup_text(pool, b"SELECT 1")
    for us in [100] * 90 + [1000] * 9 + [50_000]:
        stats.record_call(h, pool, us, rows=1)
    (row,) = stats.export(hist=True)
    db, user, fp, text, calls, errors, rows, total, wait, lo, hi, p50, p95, p99, hist = row
    assert (db, user, text, calls, errors, rows, total, lo, hi) == ("db", "u", "SELECT $1", 100, 0, 100, 68_000,
                                                                     100, 50_000)
    assert 100 <= p50 <= 125 and 1000 <= p95 <= 1250 and 1000 <= p99 <= 1250  # a bucket is a quarter octave wide
    assert percentiles_of(hist, calls, lo, hi) == (p50, p95, p99)
    with pytest.raises(ValueError):
        percentiles_of(b"short", 1, 0, 0)


def test_bounded_least_recently_used_go_to_the_other_row() -> None:
    stats = QueryStats(3)
    a, b = stats.pool_id("db", "a"), stats.pool_id("db", "b")
    assert stats.pool_id("db", "a") == a
    handles = {}
    for i in range(5):
        handles[i] = stats.lookup_text(a, b"SELECT %d AS c%d" % (i, i))
        stats.record_call(handles[i], a, 10)
    assert len(stats) == 3 and stats.evictions == 2
    late = stats.lookup_text(b, b"SELECT 1")  # another pool's statement evicts c2
    stats.record_call(handles[2], a, 10)  # a call of c2 still in flight when it went: the other row
    rows = {(r[0], r[1], r[3]): r[4] for r in stats.export()}
    assert rows == {("db", "a", "SELECT $1 AS c3"): 1, ("db", "a", "SELECT $1 AS c4"): 1,
                    ("db", "a", None): 4}  # c0, c1, c2 and c2's late call; b's statement has no call yet
    stats.record_call(late, b, 5)
    assert ("db", "b", "SELECT $1") in {(r[0], r[1], r[3]) for r in stats.export()}
    stats.configure(1)  # shrinking keeps the most recently used
    assert [r[3] for r in stats.export() if r[3] is not None] == ["SELECT $1"]
    stats.reset()
    assert stats.export() == [] and len(stats) == 0
    stats.enabled = False
    assert stats.lookup_text(a, b"SELECT 1") == -1


def test_many_statements_keep_the_table_consistent() -> None:
    stats = QueryStats(64)
    pool = stats.pool_id("db", "u")
    for i in range(5000):
        h = stats.lookup_text(pool, b"SELECT c%d FROM t%d" % (i % 97, i % 89))
        stats.record_call(h, pool, i)
    rows = stats.export()
    assert len(rows) == 65  # 64 statements and the other row
    assert sum(r[4] for r in rows) == 5000
    assert len({r[2] for r in rows}) == 65


def test_show_rows_and_merge_of_workers() -> None:
    one, two = QueryStats(10), QueryStats(10)
    for stats, n in ((one, 3), (two, 5)):
        pool = stats.pool_id("db", "u")
        h = stats.lookup_text(pool, b"SELECT 1")
        for _ in range(n):
            stats.record_call(h, pool, 200 * n, rows=2, wait_us=7)
        stats.record_call(stats.lookup_text(pool, b"SELECT broken"), pool, 50, error=True)
    merged = q.merge([q.worker_part(one.export(hist=True)), q.worker_part(two.export(hist=True))])
    rows = q.show_rows(merged)
    assert [r[2] for r in rows] == ["SELECT $1", "SELECT broken"]
    first = rows[0]
    assert first[3:8] == [8, 0, 16, 3 * 600 + 5 * 1000, (3 * 600 + 5 * 1000) // 8]
    assert first[8] <= first[9] <= first[10] == first[11] == 1000 and first[12] == 56
    assert rows[1][3:5] == [2, 2]
    assert q.queryid(1 << 63) == -(1 << 63) and q.queryid(5) == 5


def test_same_shape_means_same_statement() -> None:
    """The engine skips the normalizer for a statement shaped as the client's last one or as the
    one in its slot of the shape table (numbers aside): whenever same_shape says so, the
    normalizer must agree, and both texts must have the same slot."""
    import random

    from pgmux.engine._engine import same_shape_py, shape_slot_py

    assert same_shape_py(b"SELECT a FROM t WHERE aid = 1;", b"SELECT a FROM t WHERE aid = 20345;")
    assert same_shape_py(b"x > 1.5e3 AND y < .7", b"x > 2 AND y < .12")
    assert not same_shape_py(b"SELECT * FROM t1", b"SELECT * FROM t2")  # a name, not a number
    assert not same_shape_py(b'SELECT "col 1" FROM t', b'SELECT "col 2" FROM t')  # a quoted name
    assert not same_shape_py(b"SELECT $1", b"SELECT $2")  # (conservative: the normalizer agrees anyway)
    assert not same_shape_py(b"SELECT 1", b"SELECT 1 ")
    assert same_shape_py(b"SET a = a + -5 WHERE x = 1", b"SET a = a + 7 WHERE x = 20")  # a folded sign
    assert not same_shape_py(b"SELECT -5", b"SELECT 5")  # after a keyword: a binary minus to the normalizer
    assert not same_shape_py(b"x --5", b"x -7")  # a comment
    assert not same_shape_py(b"'';-5", b"'';5")  # the normalizer keeps the operand state across `;`
    rnd = random.Random(5)
    parts = [b"SELECT", b" ", b"t", b"1", b"22", b".5", b"e3", b"-", b"'a 1'", b'"q 1"', b"$1", b"x_", b"(", b")",
             b",", b";", b"--c 1\n", b"/* 2 */", b"E'3'", b"$$4$$", b"a1", b"9.9", b"+", b" -", b"-5", b"--",
             b"*", b"/", b"\n", b"=", b"e-", b"WHERE", b"[", b"::", b"\t", b"/*", b"*/", b"'", b"-.5", b"\x0c", b"''"]
    agreed = 0
    for _ in range(60000):
        a = b"".join(rnd.choice(parts) for _ in range(rnd.randint(1, 10)))
        b = bytes(a)
        if rnd.random() < 0.8:  # change some digits or a part
            b = bytes(ch if not 48 <= ch <= 57 or rnd.random() < 0.5 else rnd.randint(48, 57) for ch in b)
        else:
            b = b"".join(rnd.choice(parts) for _ in range(rnd.randint(1, 10)))
        if same_shape_py(a, b):
            agreed += 1
            assert normalize(a) == normalize(b), (a, b)
            # the engine's shape table finds b in a's slot
            assert shape_slot_py(a, 3) == shape_slot_py(b, 3), (a, b)
    assert agreed > 2000
