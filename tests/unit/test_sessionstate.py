"""The cheap first step of pinning: which query texts deserve a probe, and DDL drain targets."""

from __future__ import annotations

import pytest

from pgmux.protocol.sessionstate import database_ddl_targets, describe, hint, probe_sql


@pytest.mark.parametrize(
    ("sql", "word"),
    [
        (b"SET ROLE other", b"set"),
        (b"  set statement_timeout = '5s'", b"set"),
        (b"SELECT 1; RESET ALL", b"reset"),
        (b"/* app */ LISTEN jobs", b"listen"),
        (b"-- note\nUNLISTEN *", b"unlisten"),
        (b'DECLARE "_django_curs_1" NO SCROLL CURSOR WITH HOLD FOR SELECT 1', b"declare"),
        (b"PREPARE q AS SELECT 1", b"prepare"),
        (b"create temporary table t (x int)", b"create"),
        (b"CREATE GLOBAL TEMP TABLE t (x int)", b"create"),
        (b"SELECT pg_advisory_lock(1)", b"advisory_lock"),
        (b"SELECT pg_advisory_unlock(1)", b"advisory_unlock"),
        (b"SELECT set_config('TimeZone', 'UTC', false)", b"set"),
        (b"LOAD 'auto_explain'", b"load"),
        (b"DO $$ BEGIN PERFORM 1; END $$", b"do"),
    ],
)
def test_statements_that_may_hold_session_state(sql: bytes, word: bytes) -> None:
    assert hint(sql) == word


@pytest.mark.parametrize(
    "sql",
    [
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 1",
        b"UPDATE t SET x = 1 WHERE id = 2",  # SET not at a statement start
        b"INSERT INTO settings (reset) VALUES (1)",
        b"SELECT 'listen'",
        b"BEGIN",
    ],
)
def test_ordinary_statements_need_no_probe(sql: bytes) -> None:
    assert hint(sql) is None


def test_database_ddl_targets() -> None:
    assert database_ddl_targets(b"DROP DATABASE IF EXISTS test_app") == ["test_app"]
    assert database_ddl_targets(b'CREATE DATABASE "test_app_1" WITH TEMPLATE "test_App"') == ["test_App"]
    assert database_ddl_targets(b"create database c template=base owner x") == ["base"]
    assert database_ddl_targets(b"ALTER DATABASE Old RENAME TO new") == ["old"]
    assert database_ddl_targets(b"CREATE DATABASE plain") == []
    assert database_ddl_targets(b"SELECT 'drop database x'") == []


def test_describe_probe_rows() -> None:
    assert describe(["0", "0", "0", "0", "0", None, "f"]) is None
    assert describe(["1", "0", "2", "0", "0", "work_mem", "t"]) == (
        "WITH HOLD cursor, advisory lock, SET work_mem, SET ROLE/SESSION AUTHORIZATION"
    )
    sql = probe_sql("o'brien", ["TimeZone"])
    assert "'o''brien'" in sql and "'timezone'" in sql


def test_fast_path_still_sees_second_statements_and_functions() -> None:
    assert hint(b"SELECT 1;") is None
    assert hint(b"SELECT 1; SET work_mem = '1MB'") == b"set"
    assert hint(b"select PG_ADVISORY_LOCK(1);") == b"advisory_lock"
    assert hint(b"WITH x AS (SELECT 1) SELECT set_config('a.b', '1', false)") == b"set"


def test_several_keywords_ask_for_the_full_probe() -> None:
    from pgmux.protocol.sessionstate import cursor_only

    word = hint(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1; SET work_mem = '1MB'")
    assert word == b"mixed" and not cursor_only(word, None)
    assert cursor_only(hint(b"CLOSE c"), "WITH HOLD cursor")
    assert not cursor_only(hint(b"CLOSE c"), "LISTEN")
