"""Pool rules without sockets: FIFO waiting, LIFO reuse, capacity, reserve pool, caps."""

from __future__ import annotations

from dataclasses import dataclass

from pgmux.pool.pool import Pool, PoolLimits
from pgmux.protocol.varcache import ParamSet, set_statement, tracked_names


@dataclass(eq=False)
class FakeClient:
    name: str
    closed: bool = False
    wait_started: float = 0.0


def make_pool(**limits: int | float) -> Pool[str, FakeClient]:
    return Pool(database="db", user="u", limits=PoolLimits(**limits))  # type: ignore[arg-type]


def test_waiters_are_served_in_arrival_order_and_closed_ones_skipped() -> None:
    pool = make_pool(pool_size=1)
    a, b, c = FakeClient("a"), FakeClient("b"), FakeClient("c")
    for i, cl in enumerate((a, b, c)):
        pool.enqueue(cl, now=float(i))
    b.closed = True
    assert pool.server_ready("s1") is a
    assert pool.server_ready("s1") is c
    assert pool.server_ready("s1") is None
    assert list(pool.idle) == ["s1"]


def test_idle_reuse_is_lifo_unless_round_robin() -> None:
    pool = make_pool()
    for s in ("s1", "s2", "s3"):
        pool.server_ready(s)
    assert pool.take_idle() == "s3"
    pool.round_robin = True
    assert pool.take_idle() == "s1"


def test_connects_wanted_respects_pool_size_and_connecting() -> None:
    pool = make_pool(pool_size=2)
    for i in range(5):
        pool.enqueue(FakeClient(str(i)), now=100.0)
    assert pool.connects_wanted(now=100.0) == 2
    pool.connecting = 2
    assert pool.connects_wanted(now=100.0) == 0
    assert pool.connects_wanted(room_elsewhere=0, now=100.0) == 0


def test_reserve_pool_opens_after_reserve_pool_timeout() -> None:
    pool = make_pool(pool_size=1, reserve_pool_size=2, reserve_pool_timeout=5.0)
    pool.active.add("s1")
    for i in range(3):
        pool.enqueue(FakeClient(str(i)), now=100.0)
    assert pool.connects_wanted(now=102.0) == 0
    assert pool.connects_wanted(now=105.0) == 2


def test_min_pool_size_opens_without_waiters() -> None:
    pool = make_pool(pool_size=5, min_pool_size=3)
    assert pool.connects_wanted(now=0.0) == 3
    pool.connecting = 1
    assert pool.connects_wanted(now=0.0) == 2


def test_server_gone_forgets_it_everywhere() -> None:
    pool = make_pool()
    pool.server_ready("s1")
    pool.server_busy("s2")
    pool.server_gone("s1")
    pool.server_gone("s2")
    assert pool.server_count == 0


def test_param_diff_is_case_insensitive_and_limited_to_tracked() -> None:
    tracked = tracked_names(["IntervalStyle"])
    client, server = ParamSet(), ParamSet()
    client.set("timezone", "Europe/Paris")
    client.set("DateStyle", "ISO, MDY")
    client.set("work_mem", "1MB")
    server.set("TimeZone", "UTC")
    server.set("datestyle", "ISO, MDY")
    assert client.diff(server, tracked) == [("timezone", "Europe/Paris")]
    assert set_statement([("TimeZone", "it's")]) == "SET TimeZone='it''s';"
