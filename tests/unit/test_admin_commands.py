"""The console grammar (pgmux.admin.commands): PgBouncer's regexes, quoting, limits and error texts."""

from __future__ import annotations

import pytest

from pgmux.admin.commands import AdminError, Command, parse_command, parse_kill_client_id


@pytest.mark.parametrize(
    ("query", "name", "arg"),
    [
        ("SHOW POOLS", "show", "POOLS"),
        ("show pools;", "show", "pools"),
        ("  show \t\n pools  ;  ", "show", "pools"),
        ("Show Stats_Totals", "show", "Stats_Totals"),
        ("select version", "select", "version"),
        ("PAUSE", "pause", ""),
        ("pause testdb", "pause", "testdb"),
        ('pause "My Db"', "pause", "My Db"),
        ('pause "quo""ted"', "pause", 'quo"ted'),
        ('"SHOW" clients', "show", "clients"),
        ("kill_client 42", "kill_client", "42"),
        ("shutdown wait_for_clients", "shutdown", "wait_for_clients"),
        ("wait_close", "wait_close", ""),
        ("reload;", "reload", ""),
    ],
)
def test_commands(query: str, name: str, arg: str) -> None:
    cmd = parse_command(query)
    assert (cmd.name, cmd.arg, cmd.value, cmd.query) == (name, arg, None, query)


@pytest.mark.parametrize(
    ("query", "key", "value"),
    [
        ("SET default_pool_size = 5", "default_pool_size", "5"),
        ("set default_pool_size to 5;", "default_pool_size", "5"),
        ("SET server_reset_query = 'DISCARD ALL'", "server_reset_query", "DISCARD ALL"),
        ("SET server_reset_query = 'it''s'", "server_reset_query", "it's"),
        ("set query_timeout = '1.5'", "query_timeout", "1.5"),
        ('set "auth_type" = "md5"', "auth_type", "md5"),
        ("set client_encoding to 'UTF8'", "client_encoding", "UTF8"),
    ],
)
def test_set(query: str, key: str, value: str) -> None:
    assert parse_command(query) == Command("set", key, value, query)


@pytest.mark.parametrize(
    "query",
    [
        "",
        ";",
        "select 1 + 1",
        "show pools;;",
        "show pools extra",
        "frobnicate",
        "set",
        "set x",
        "set query_timeout = 1.5",  # not a WORD: PgBouncer wants quotes here
        "show pools; show stats",
        "show pools\n;x",
        'show "unterminated',
        "SET x = 'a' junk",
    ],
)
def test_invalid(query: str) -> None:
    with pytest.raises(AdminError) as exc:
        parse_command(query)
    assert exc.value.message == f"invalid command '{query}', use SHOW HELP;"
    assert exc.value.sqlstate == "08P01"


def test_trailing_newline_is_not_end_of_string() -> None:
    """POSIX `$` is the end of the string; Python's `$` would also accept a final newline."""
    assert parse_command("show pools\n").arg == "pools"  # newline is whitespace in the grammar
    with pytest.raises(AdminError):
        parse_command("show pools;\nx")


@pytest.mark.parametrize(
    "query",
    [
        "x" * 16 + " arg",  # command word buffer is 16 bytes
        "pause " + "d" * 64,  # argument buffer is 64 bytes
        "set key = '" + "v" * 300 + "'",  # value buffer is 256 bytes
    ],
)
def test_too_long_is_bad_arguments(query: str) -> None:
    with pytest.raises(AdminError, match="^bad arguments$"):
        parse_command(query)


def test_limits_just_fit() -> None:
    assert parse_command("pause " + "d" * 63).arg == "d" * 63
    assert parse_command("set key = '" + "v" * 253 + "'").value == "v" * 253


def test_returns_rows() -> None:
    assert parse_command("show pools").returns_rows
    assert parse_command("select stats").returns_rows
    assert not parse_command("show help").returns_rows
    assert not parse_command("pause").returns_rows
    assert not parse_command("set a = b").returns_rows


@pytest.mark.parametrize(("arg", "value"), [("42", 42), (" 7", 7), ("12abc", 12), ("-1", 2**64 - 1)])
def test_kill_client_id_like_sscanf(arg: str, value: int) -> None:
    assert parse_kill_client_id(arg) == value


@pytest.mark.parametrize("arg", ["", "abc", "x1"])
def test_kill_client_bad_id(arg: str) -> None:
    with pytest.raises(AdminError, match="^invalid client pointer supplied$"):
        parse_kill_client_id(arg)
