"""COPY FROM STDIN through the extended protocol, as libpq sends it (PQexecParams): Parse, Bind,
Describe, Execute, Sync; then, after the CopyInResponse, CopyData, CopyDone and a second Sync.

PostgreSQL ignores a Sync it reads during COPY IN, so two Syncs get one ReadyForQuery (PgBouncer
issues #1023/#1024). A pooler that counts both never releases the server, or hands a later answer
to the wrong request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers_tx import raw_login
from pgwire import SYNC, RawConn, bind, describe_portal, execute, kinds, message, parse, read_until_z

from pgmux.protocol.messages import cstr, query
from pgmux.testing.cluster import PoolerProcess, TempCluster

pytestmark = [pytest.mark.integration]

def drain(conn: RawConn, timeout: float = 1.0) -> list[tuple[bytes, bytes]]:
    """Whatever arrives within `timeout`."""
    conn.sock.settimeout(timeout)
    out = []
    try:
        while True:
            out.append(conn.read_message())
    except TimeoutError:
        return out
    except ConnectionError:
        out.append((b"<eof>", b""))
        return out


def copy_extended(conn: RawConn, end: bytes | None = None) -> str:
    """One extended-protocol COPY FROM STDIN; `end` replaces the CopyDone (e.g. a CopyFail)."""
    conn.send(parse("", "COPY copy_ext_t FROM STDIN") + bind("") + describe_portal("") + execute("") + SYNC)
    got = []
    conn.sock.settimeout(5)
    while True:
        k, b = conn.read_message()
        got.append((k, b))
        if k == b"G":
            break
    conn.send(message(b"d", b"1\n2\n") + (end or message(b"c", b"")) + SYNC)  # libpq: CopyDone then Sync
    got += read_until_z(conn)
    return kinds(got)


@pytest.fixture
def table(cluster: TempCluster) -> Iterator[None]:
    import psycopg

    with psycopg.connect(cluster.dsn("md5user", "md5pass", "testdb"), autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS copy_ext_t (x int)")
    yield


def test_extended_copy_releases_server(pooler: Callable[..., PoolerProcess], table: None) -> None:
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "query_wait_timeout": 4})
    a = raw_login(p)
    assert copy_extended(a) == "12nGCZ"
    extra = drain(a, 0.5)
    assert extra == [], kinds(extra)
    # a second client must get the (only) server now that A is idle outside a transaction
    b = raw_login(p)
    b.send(query("SELECT 42"))
    got = read_until_z(b, timeout=8)
    assert any(k == b"D" for k, _ in got), kinds(got)


def test_extended_copy_fail_releases_server(pooler: Callable[..., PoolerProcess], table: None) -> None:
    """CopyFail: the COPY ends with an error, then the second Sync's ReadyForQuery."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "query_wait_timeout": 4})
    a = raw_login(p)
    assert copy_extended(a, message(b"f", cstr("client gave up"))) == "12nGEZ"
    assert drain(a, 0.5) == []
    b = raw_login(p)
    b.send(query("SELECT 42"))
    got = read_until_z(b, timeout=8)
    assert any(k == b"D" for k, _ in got), kinds(got)


def test_simple_copy_with_stray_sync(pooler: Callable[..., PoolerProcess], table: None) -> None:
    """A Sync sent during a simple-protocol COPY is ignored too; the Query still gets its own
    ReadyForQuery, and the server is released after it."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "query_wait_timeout": 4})
    a = raw_login(p)
    a.send(query("COPY copy_ext_t FROM STDIN"))
    a.sock.settimeout(5)
    assert a.read_message()[0] == b"G"
    a.send(SYNC + message(b"d", b"3\n") + message(b"c", b""))
    assert kinds(read_until_z(a)) == "CZ"
    assert drain(a, 0.5) == []
    b = raw_login(p)
    b.send(query("SELECT 42"))
    assert any(k == b"D" for k, _ in read_until_z(b, timeout=8))


def test_extended_copy_then_faked_parse_in_order(pooler: Callable[..., PoolerProcess], table: None) -> None:
    """Tracked link: no stale Sync may stay in the tracker after the COPY, or a ParseComplete that
    pgmux invents comes after the ReadyForQuery of the request that follows it."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1})
    a = raw_login(p)
    # a named statement, used once so it is prepared on the server (tracked link)
    a.send(parse("s1", "SELECT 1") + bind("s1") + execute("") + SYNC)
    assert kinds(read_until_z(a)) == "12DCZ"
    a.send(query("BEGIN"))
    read_until_z(a)
    assert copy_extended(a) == "12nGCZ"
    # same text under another name: already on this server, so pgmux fakes the ParseComplete
    a.send(parse("s2", "SELECT 1") + bind("s2") + execute("") + SYNC)
    got = read_until_z(a)
    got += drain(a, 1.0)
    assert kinds(got) == "12DCZ"
    a.send(query("COMMIT"))
    assert kinds(read_until_z(a)) == "CZ"


def test_extended_copy_then_named_parse(pooler: Callable[..., PoolerProcess], table: None) -> None:
    """Untracked link: a stale outstanding count would make the next named Parse wait for a
    ReadyForQuery that never comes."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 2})
    a = raw_login(p)
    assert copy_extended(a) == "12nGCZ"
    a.send(parse("s1", "SELECT 1") + bind("s1") + execute("") + SYNC)
    got = drain(a, 3.0)
    assert kinds(got) == "12DCZ"
