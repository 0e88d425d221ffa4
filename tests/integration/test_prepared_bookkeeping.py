"""pgmux's record of the statements prepared on each server (ServerConnection.stmts) must match the
backend, and no client may touch pgmux's own statements (PGMUX_<n>): otherwise a statement is
re-prepared where it exists (an error for every client of that server) or, worse, another client's
statement runs under pgmux's name (a wrong result).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers_tx import raw_login
from pgwire import (
    SYNC,
    RawConn,
    bind,
    close_statement,
    execute,
    kinds,
    parse,
    parse_error_fields,
    read_until_z,
)

from pgmux.protocol.messages import query
from pgmux.testing.cluster import PoolerProcess

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

def read_until_close(conn: RawConn) -> list[tuple[bytes, bytes]]:
    return conn.read_until_close(5.0)


def errors(msgs: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [parse_error_fields(b) for k, b in msgs if k == b"E"]


def rows(msgs: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [b for k, b in msgs if k == b"D"]


def run_named(conn: RawConn, name: str, sql: str) -> list[tuple[bytes, bytes]]:
    conn.send(parse(name, sql) + bind(name) + execute("") + SYNC)
    return read_until_z(conn)


PoolerFactory = Callable[..., PoolerProcess]


def test_deallocate_that_fails_keeps_statement(pooler: PoolerFactory) -> None:
    """DEALLOCATE in an aborted transaction fails on the server: the statement stays there, so
    re-preparing the same text must not Parse it again (42P05 on every later try)."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1})
    a = raw_login(p)
    assert kinds(run_named(a, "s1", "SELECT 1")) == "12DCZ"
    for sql in ("BEGIN", "SELECT 1/0", "DEALLOCATE s1", "ROLLBACK"):
        a.send(query(sql))
        read_until_z(a)
    for _ in range(2):
        got = run_named(a, "s1", "SELECT 1")
        assert kinds(got) == "12DCZ", (kinds(got), errors(got))
        a.send(query("DEALLOCATE s1"))
        assert kinds(read_until_z(a)) == "CZ"


def _three_statements_with_reset_query(pooler: PoolerFactory, reset_query: str) -> RawConn:
    """A client that prepares and runs s0, s1, s2 (each a transaction, so the reset query runs
    between them) on the one server; each must succeed."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "server_reset_query": reset_query,
                                               "server_reset_query_always": 1})
    a = raw_login(p)
    for i in range(3):
        got = run_named(a, f"s{i}", "SELECT 7")
        assert kinds(got) == "12DCZ", (i, kinds(got), errors(got))
    return a


def test_reset_query_not_discard_keeps_tracking(pooler: PoolerFactory) -> None:
    """A server_reset_query that does not deallocate leaves the backend's statements in place."""
    _three_statements_with_reset_query(pooler, "RESET ALL")


def test_reset_query_discard_all_forgets(pooler: PoolerFactory) -> None:
    """DISCARD ALL as the reset query: every statement is prepared again afterwards."""
    a = _three_statements_with_reset_query(pooler, "DISCARD ALL")
    a.send(bind("s0") + execute("") + SYNC)
    got = read_until_z(a)
    assert kinds(got) == "2DCZ", (kinds(got), errors(got))


def test_eviction_close_skipped_after_pipeline_error(pooler: PoolerFactory) -> None:
    """The Close pgmux injects to evict a statement is skipped by PostgreSQL after an earlier error
    in the same pipeline: the statement is still on the server and must stay recorded."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "max_prepared_statements": 1})
    a = raw_login(p)
    assert kinds(run_named(a, "a", "SELECT 1")) == "12DCZ"
    # one pipeline: a failing Execute, then a new named statement (evicts "a"), then Sync
    a.send(parse("", "SELECT 1/0") + bind("") + execute("") + parse("b", "SELECT 2") + bind("b") + execute("")
           + SYNC)
    got = read_until_z(a)
    assert kinds(got) in ("1EZ", "12EZ"), kinds(got)
    a.send(bind("a") + execute("") + SYNC)
    got = read_until_z(a)
    assert kinds(got) == "2DCZ", (kinds(got), errors(got))
    assert rows(got)[0].endswith(b"1")


def test_deallocate_all_then_parse_in_one_pipeline(pooler: PoolerFactory) -> None:
    """DEALLOCATE ALL's CommandComplete must not forget a statement Parsed after it in the same
    pipeline."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1})
    a = raw_login(p)
    assert kinds(run_named(a, "s1", "SELECT 1")) == "12DCZ"
    a.send(parse("", "DEALLOCATE ALL") + bind("") + execute("")
           + parse("s2", "SELECT 2") + bind("s2") + execute("") + SYNC)
    got = read_until_z(a)
    assert kinds(got) == "12C12DCZ", (kinds(got), errors(got))
    a.send(bind("s2") + execute("") + SYNC)
    got = read_until_z(a)
    assert kinds(got) == "2DCZ", (kinds(got), errors(got))
    # s1 went with DEALLOCATE ALL
    a.send(bind("s1") + execute("") + SYNC)
    got = read_until_close(a)
    assert [e.get("M") for e in errors(got)] == ["prepared statement did not exist"], kinds(got)


def _prepared_by_b(p: PoolerProcess) -> RawConn:
    """Client B with a statement prepared on the (only) server as PGMUX_1."""
    b = raw_login(p)
    got = run_named(b, "s", "SELECT 1")
    assert kinds(got) == "12DCZ", (kinds(got), errors(got))
    return b


def _b_still_gets_one(b: RawConn) -> None:
    b.send(bind("s") + execute("") + SYNC)
    got = read_until_z(b, timeout=10)
    assert kinds(got) == "2DCZ", (kinds(got), errors(got))
    assert rows(got)[0].endswith(b"\x011"), rows(got)


@pytest.mark.parametrize("attack", ["close", "parse"])
def test_client_cannot_use_reserved_statement_names(pooler: PoolerFactory, attack: str) -> None:
    """An untracked client's Close / Parse of PGMUX_<n> would reach the server under pgmux's own
    name (the hijack replaces another client's statement): refused with 42939."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1})
    b = _prepared_by_b(p)
    a = raw_login(p)
    if attack == "close":
        a.send(parse("", "SELECT 0") + bind("") + close_statement("PGMUX_1") + parse("PGMUX_1", "SELECT 666") + SYNC)
    else:
        # untracked: a named Parse after unsynced messages goes to the server under its own name
        a.send(parse("", "SELECT 0") + bind("") + parse("PGMUX_1", "SELECT 666") + SYNC)
    got = read_until_close(a)
    errs = errors(got)
    assert [(e.get("C"), e.get("S")) for e in errs] == [("42939", "FATAL")], kinds(got)
    assert "PGMUX_" in errs[0]["M"]
    _b_still_gets_one(b)


def test_sql_replacement_of_pgmux_statement_is_not_reused(pooler: PoolerFactory) -> None:
    """SQL can name PGMUX_1 too (a quoted identifier, here inside DO so no tag shows it): the
    replacement is a SQL-level statement, so the client is pinned; when it leaves, a reset query
    that does not deallocate must not hand the server on with it."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1, "server_reset_query": "RESET ALL"})
    b = _prepared_by_b(p)
    a = raw_login(p)
    a.send(query("""DO $$ BEGIN EXECUTE 'DEALLOCATE "PGMUX_1"'; """
                 """EXECUTE 'PREPARE "PGMUX_1" AS SELECT 666'; END $$"""))
    got = read_until_z(a)
    assert kinds(got) == "CZ", (kinds(got), errors(got))
    a.send(query("SELECT 1"))  # the probe has pinned A: this runs after it, on the same server
    assert kinds(read_until_z(a)) == "TDCZ"
    a.terminate()
    _b_still_gets_one(b)


def test_sql_deallocate_of_pgmux_statement(pooler: PoolerFactory) -> None:
    """SQL DEALLOCATE "PGMUX_1", hidden in DO: the probe after it sees pgmux's statement gone and
    closes that server instead of releasing it, so the next client gets no error and no wrong row."""
    p = pooler(pool_mode="transaction", extra={"default_pool_size": 1})
    b = _prepared_by_b(p)
    a = raw_login(p)
    a.send(query("""DO $$ BEGIN EXECUTE 'DEALLOCATE "PGMUX_1"'; END $$"""))
    assert kinds(read_until_z(a)) == "CZ"
    b.send(bind("s") + execute("") + SYNC)
    got = read_until_z(b, timeout=10)
    assert "E" not in kinds(got), errors(got)
    assert rows(got)[0].endswith(b"\x011")
    assert "prepared statements out of step with pgmux" in p.log_text()
    # plain DEALLOCATE (a tag pgmux sees): the server is not reused either
    a.send(query('DEALLOCATE "PGMUX_1"'))
    read_until_z(a)
    _b_still_gets_one(b)


def test_close_skipped_after_a_pipeline_error_keeps_the_statement(pooler: PoolerFactory) -> None:
    """PostgreSQL skips everything after an error up to Sync, a Close included: the client's
    statement still exists afterwards (pgmux answers Close itself, and must not forget it)."""
    p = pooler(pool_mode="transaction")
    c = raw_login(p)
    got = run_named(c, "s", "SELECT 1")
    assert rows(got)[0].endswith(b"\x011"), kinds(got)
    c.send(parse("", "SELECT 1/(random() * 0)::int") + bind("") + execute("") + close_statement("s") + SYNC)
    got = read_until_z(c)
    assert kinds(got) == "12EZ", kinds(got)  # no CloseComplete: the Close was skipped
    c.send(bind("s") + execute("") + SYNC)  # as against PostgreSQL itself, s is still there
    got = read_until_z(c)
    assert not errors(got) and rows(got)[0].endswith(b"\x011"), (kinds(got), errors(got))
    c.send(close_statement("s") + SYNC)  # a Close that is not skipped does close it
    assert kinds(read_until_z(c)) == "3Z"
    c.send(bind("s") + execute("") + SYNC)  # a statement it no longer has: closed, as PgBouncer does
    kind, body = c.read_message()
    fields = parse_error_fields(body)
    assert kind == b"E" and (fields["S"], fields["C"], fields["M"]) == ("FATAL", "08P01",
                                                                      "prepared statement did not exist")
