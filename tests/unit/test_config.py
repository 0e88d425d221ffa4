"""pgbouncer.ini parsing: the libusual INI dialect, connection strings, settings and SHOW CONFIG.

Where a test pins down PgBouncer behaviour, the comment says what Debian's PgBouncer 1.18 did
with the same input (run as ``pgbouncer -v file.ini``), so that the reason for the rule is visible.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgmux.config import (
    SETTINGS,
    Config,
    ConfigError,
    DatabaseEntry,
    SettingDef,
    Settings,
    load_config,
    load_config_text,
)
from pgmux.config.connstr import parse_connstr
from pgmux.config.settings import parse_c_int

MAIN = "[pgbouncer]\nlisten_port = 6432\n"


def write(path: Path, text: str | bytes) -> str:
    """Write a config file and return its path as a string."""
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str | bytes, name: str = "pgbouncer.ini") -> Config:
    return load_config(write(tmp_path / name, text))


def error_of(tmp_path: Path, text: str | bytes, name: str = "pgbouncer.ini") -> ConfigError:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# --- INI level ---------------------------------------------------------------------------------


def test_comments_and_semicolons_inside_values_are_data(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        (
            "; a comment\n"
            "   # an indented comment\n"
            "[pgbouncer]\n"
            "server_reset_query = DISCARD ALL; SELECT 1  \n"
            "logfile = /var/log/pg#bouncer.log ; not a comment\n"
            "[databases]\n"
            "db = host=x connect_query='set a=1; set b=2'\n"
            "  ;db2 = host=y\n"
        ),
    )
    assert cfg.settings.server_reset_query == "DISCARD ALL; SELECT 1"
    assert cfg.settings.logfile == "/var/log/pg#bouncer.log ; not a comment"
    assert cfg.databases["db"].connect_query == "set a=1; set b=2"
    assert list(cfg.databases) == ["db"]


def test_blank_lines_crlf_and_spacing_around_equals(tmp_path: Path) -> None:
    cfg = load(tmp_path, "\r\n[pgbouncer]\r\n\r\n  listen_port\t=\t7000 \r\npool_mode=transaction\r\n")
    assert cfg.settings.listen_port == 7000
    assert cfg.settings.pool_mode == "transaction"


def test_duplicate_keys_last_wins(tmp_path: Path) -> None:
    cfg = load(tmp_path, MAIN + "max_client_conn = 10\nmax_client_conn = 20\n[databases]\nd = host=a\nd = host=b\n")
    assert cfg.settings.max_client_conn == 20
    assert cfg.databases["d"].host == "b"


def test_section_and_key_names_are_case_sensitive(tmp_path: Path) -> None:
    # PgBouncer 1.18: "ERROR unknown parameter: pgbouncer/Listen_Backlog" then
    # "FATAL cannot load config file"; "[PgBouncer]" gives "invalid section "PgBouncer"".
    err = error_of(tmp_path, MAIN + "Listen_Backlog = 5\n")
    assert (err.line, err.key) == (3, "Listen_Backlog")
    err = error_of(tmp_path, "[PgBouncer]\nlisten_port = 1\n")
    assert err.line == 1 and "PgBouncer" in str(err)


def test_unknown_key_in_pgbouncer_section_is_fatal(tmp_path: Path) -> None:
    # PgBouncer 1.18 at start-up:
    #   ERROR unknown parameter: pgbouncer/foo_bar
    #   ERROR invalid value "1" for parameter foo_bar in configuration (unk.ini:11)
    #   FATAL cannot load config file
    # and on RELOAD (SIGHUP): the same two errors, then "WARNING config file loading failed";
    # the lines *before* the bad one were already applied (and everything else reset to its
    # default), the lines after it were not. pgmux raises, so a reload applies all or nothing.
    err = error_of(tmp_path, MAIN + "default_pool_size = 7\nfoo_bar = 1\n")
    assert err.key == "foo_bar"
    assert err.line == 4
    assert "unknown parameter" in err.message
    assert str(err) == f"{tmp_path / 'pgbouncer.ini'}:4: foo_bar: unknown parameter"


def test_unknown_section_is_fatal(tmp_path: Path) -> None:
    # PgBouncer 1.18: 'ERROR invalid section "foo" in configuration (us.ini:7)', then FATAL,
    # even when the section is empty.
    err = error_of(tmp_path, MAIN + "[foo]\n")
    assert err.line == 3 and err.key == "[foo]"
    assert "unknown section" in err.message


def test_main_section_is_required(tmp_path: Path) -> None:
    # PgBouncer 1.18: "load_init_file: main section missing from config file".
    err = error_of(tmp_path, "[databases]\nx = host=a\n")
    assert err.file == str(tmp_path / "pgbouncer.ini") and "missing" in err.message


def test_value_outside_any_section(tmp_path: Path) -> None:
    err = error_of(tmp_path, "x = 1\n" + MAIN)
    assert (err.line, err.key) == (1, "x")


def test_syntax_errors_give_file_and_line(tmp_path: Path) -> None:
    for body, line in [
        (MAIN + "this is junk\n", 3),
        (MAIN + "key value\n", 3),
        ("[pgbouncer\n", 1),
        (MAIN + '[databases]\n"open = host=x\n', 4),
        (MAIN + "db@x = host=y\n", 3),
    ]:
        err = error_of(tmp_path, body)
        assert err.file == str(tmp_path / "pgbouncer.ini")
        assert err.line == line, body
        assert str(err).startswith(f"{tmp_path / 'pgbouncer.ini'}:{line}: ")


def test_repeated_main_section_resets_earlier_settings(tmp_path: Path) -> None:
    # PgBouncer 1.18: every [pgbouncer] header re-applies the defaults (libusual fill_defaults()),
    # so with two sections the first one's listen_port/pidfile/... are lost; settings whose
    # default is NULL (auth_file, ...) survive. We copy that, and warn.
    cfg = load(
        tmp_path,
        MAIN + "auth_file = /etc/users.txt\ndefault_pool_size = 7\n"
        "[databases]\nd = host=x\n[pgbouncer]\nmax_client_conn = 55\n",
    )
    s = cfg.settings
    assert (s.listen_port, s.default_pool_size, s.max_client_conn) == (6432, 20, 55)
    assert s.auth_file == "/etc/users.txt"
    assert len(cfg.warnings) == 1 and "default_pool_size" in cfg.warnings[0]
    assert cfg.warnings[0].startswith(f"{tmp_path / 'pgbouncer.ini'}:7: ")


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    err = error_of(tmp_path, b"[pgbouncer]\nlisten_port = 1\nlogfile = /tmp/\xff\n")
    assert (err.file, err.line) == (str(tmp_path / "pgbouncer.ini"), 3)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.ini"))
    assert info.value.file == str(tmp_path / "nope.ini") and info.value.line is None
    with pytest.raises(ConfigError):
        load_config(str(tmp_path))  # a directory


# --- %include ----------------------------------------------------------------------------------


def test_include_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PgBouncer resolves %include against its working directory.
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "conf.d" / "dbs.ini", "[databases]\nincluded = host=h\n")
    main = write(tmp_path / "main.ini", MAIN + "%include conf.d/dbs.ini\n[pgbouncer]\npool_mode = statement\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(main)
    assert cfg.databases["included"].host == "h"
    assert cfg.settings.pool_mode == "statement"
    assert cfg.files == [main, "conf.d/dbs.ini"]


def test_include_falls_back_to_including_files_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc" / "extra.ini", "max_client_conn = 77\n")
    main = write(tmp_path / "etc" / "main.ini", MAIN + "%include extra.ini\n")
    monkeypatch.chdir(tmp_path)  # extra.ini is not in the cwd
    assert load_config(main).settings.max_client_conn == 77


def test_included_file_continues_the_current_section(tmp_path: Path) -> None:
    write(tmp_path / "inc.ini", "default_pool_size = 3\n[databases]\nfrom_inc = host=x\n")
    cfg = load(tmp_path, MAIN + f"%include {tmp_path / 'inc.ini'}\nafter = host=y\n")
    assert cfg.settings.default_pool_size == 3
    assert set(cfg.databases) == {"from_inc", "after"}  # the include left us in [databases]


def test_include_nesting_limit_is_ten(tmp_path: Path) -> None:
    # libusual MAX_INCLUDE = 10: the main file may include a chain 10 files deep.
    def chain(depth: int) -> str:
        for i in range(depth, 0, -1):
            nxt = f"%include {tmp_path / f'f{i + 1}.ini'}\n" if i < depth else f"max_client_conn = {depth}\n"
            write(tmp_path / f"f{i}.ini", nxt)
        return write(tmp_path / "main.ini", MAIN + f"%include {tmp_path / 'f1.ini'}\n")

    assert load_config(chain(10)).settings.max_client_conn == 10
    with pytest.raises(ConfigError) as info:
        load_config(chain(11))
    assert info.value.key == "%include" and "too deep" in info.value.message
    assert info.value.file == str(tmp_path / "f10.ini") and info.value.line == 1


def test_self_include_stops_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "loop.ini"
    err = error_of(tmp_path, MAIN + f"%include {path}\n", name="loop.ini")
    assert err.key == "%include" and err.line == 3


def test_missing_include_names_the_including_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, MAIN + "\n%include /nonexistent/x.ini\n")
    assert (err.file, err.line, err.key) == (str(tmp_path / "pgbouncer.ini"), 4, "%include")
    assert "/nonexistent/x.ini" in err.message


def test_include_needs_a_blank_after_the_keyword(tmp_path: Path) -> None:
    # "%includefoo" is not an include; libusual then sees a key that does not start with a key
    # character: a syntax error.
    err = error_of(tmp_path, MAIN + "%includefoo\n")
    assert err.line == 3


# --- [databases] -------------------------------------------------------------------------------


def test_database_entry_fields(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        MAIN + "[databases]\n"
        "main = host=10.0.0.1,10.0.0.2 port=5433 dbname=app user=u password=p pool_size=5 "
        "min_pool_size=1 reserve_pool_size=2 pool_mode=Transaction query_wait_timeout=1.5 "
        "load_balance_hosts=disable max_db_connections=9 max_db_client_connections=90 "
        "server_lifetime=30 client_encoding=UTF8 datestyle=ISO timezone=UTC "
        "application_name=app auth_user=au auth_dbname=authdb auth_query='SELECT 1' "
        "connect_query='SELECT 2'\n"
        "local =\n",
    )
    db = cfg.databases["main"]
    assert db == DatabaseEntry(
        name="main",
        dbname="app",
        host="10.0.0.1,10.0.0.2",
        port=5433,
        user="u",
        password="p",
        auth_user="au",
        auth_query="SELECT 1",
        auth_dbname="authdb",
        pool_size=5,
        min_pool_size=1,
        reserve_pool_size=2,
        connect_query="SELECT 2",
        pool_mode="transaction",
        query_wait_timeout=1.5,
        load_balance_hosts="disable",
        max_db_connections=9,
        max_db_client_connections=90,
        server_lifetime=30.0,
        client_encoding="UTF8",
        datestyle="ISO",
        timezone="UTC",
        application_name="app",
    )
    assert db.hosts == ["10.0.0.1", "10.0.0.2"] and db.target_dbname == "app"
    local = cfg.databases["local"]
    assert (local.host, local.hosts, local.port, local.target_dbname) == (None, [], 5432, "local")
    assert local.pool_size is None and local.query_wait_timeout is None


def test_query_wait_timeout_minus_one_means_unset(tmp_path: Path) -> None:
    cfg = load(tmp_path, MAIN + "[databases]\nd = query_wait_timeout=-1\n[users]\nu = query_wait_timeout=-1\n")
    assert cfg.databases["d"].query_wait_timeout is None
    assert cfg.users["u"].query_wait_timeout is None


def test_quoted_database_names(tmp_path: Path) -> None:
    # PgBouncer 1.18 says "syntax error" here (pgbouncer#971); libusual PR #50 added quoted keys,
    # which current PgBouncer accepts. The quotes are not part of the name.
    cfg = load(tmp_path, MAIN + '[databases]\n"my db" = dbname=\'my db\'\n"say ""hi""" = host=x\n')
    assert cfg.databases["my db"].dbname == "my db"
    assert set(cfg.databases) == {"my db", 'say "hi"'}


def test_database_names_are_case_sensitive(tmp_path: Path) -> None:
    # PgBouncer 1.18 SHOW DATABASES lists both "Db1" and "db1" for this file.
    cfg = load(tmp_path, MAIN + "[databases]\nDb1 = dbname=x\ndb1 = host=h\n")
    assert set(cfg.databases) == {"Db1", "db1"}
    assert cfg.find_database("DB1") is None
    assert cfg.find_database("Db1") is cfg.databases["Db1"]


def test_reserved_database_name(tmp_path: Path) -> None:
    # PgBouncer 1.18: 'database name "pgbouncer" is reserved', then FATAL.
    err = error_of(tmp_path, MAIN + "[databases]\npgbouncer = host=x\n")
    assert (err.line, err.key) == (4, "pgbouncer") and "reserved" in err.message


def test_autodb_fallback(tmp_path: Path) -> None:
    cfg = load(tmp_path, MAIN + "[databases]\n* = host=fallback port=6000 pool_size=3\nfixed = host=f\n")
    auto = cfg.find_database("anything")
    assert auto is not None
    assert (auto.name, auto.dbname, auto.host, auto.port, auto.pool_size) == (
        "anything",
        "anything",
        "fallback",
        6000,
        3,
    )
    assert auto.is_autodb and not cfg.find_database("fixed").is_autodb  # type: ignore[union-attr]
    star = cfg.databases["*"]
    assert (star.name, star.dbname, star.is_autodb) == ("*", None, False)  # the template is untouched

    assert cfg.find_database("pgbouncer") is None  # the console's name never falls back to *
    cfg = load(tmp_path, MAIN + "[databases]\n* = dbname=shared\n")
    assert cfg.find_database("x").target_dbname == "shared"  # type: ignore[union-attr]
    assert load(tmp_path, MAIN).find_database("x") is None


def test_reserve_pool_is_the_118_spelling(tmp_path: Path) -> None:
    # PgBouncer 1.18 knows only "reserve_pool" and rejects "reserve_pool_size" with
    # "unrecognized connection parameter"; current PgBouncer accepts the long name.
    cfg = load(tmp_path, MAIN + "[databases]\nold = reserve_pool=4\nnew = reserve_pool_size=5\n")
    assert cfg.databases["old"].reserve_pool_size == 4
    assert cfg.databases["new"].reserve_pool_size == 5


def test_libpq_style_quoting() -> None:
    assert parse_connstr("host=x  port = 5 connect_query='set a=1; set b=2'") == [
        ("host", "x"),
        ("port", "5"),
        ("connect_query", "set a=1; set b=2"),
    ]
    assert parse_connstr("password='it''s' user='o''brien'") == [("password", "it's"), ("user", "o'brien")]
    # Backslashes stay as they are, as in PgBouncer (so passwords mean the same), a trailing one too.
    assert parse_connstr("password='secret\\' user=u") == [("password", "secret\\"), ("user", "u")]
    assert parse_connstr(r"password='a\b\\c'") == [("password", r"a\b\\c")]
    assert parse_connstr("password=ab\\'c") == [("password", "ab\\'c")]  # unquoted: literal
    assert parse_connstr("   ") == []
    for bad in ["host", "=x", "host=", "host=''", "host='x", "host='x'port=1", "a b=c"]:
        with pytest.raises(ConfigError):
            parse_connstr(bad)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("d = host=x foo=1", "unrecognized connection parameter: foo"),
        ("d = pool_size=abc", "invalid integer value 'abc' for pool_size"),
        ("d = port=abc", "invalid port 'abc' for port"),
        ("d = port=70000", "for port"),
        ("d = pool_mode=foo", "invalid pool mode 'foo'"),
        ("d = load_balance_hosts=random", "load_balance_hosts"),
        ("d = server_lifetime=-5", "invalid time value"),
        ("d = query_wait_timeout=soon", "invalid time value"),
        ("d = host='x", "unterminated"),
        ("d = host=", "empty value"),
        ("d = target_session_attrs=any", "unrecognized connection parameter: target_session_attrs"),
    ],
)
def test_bad_database_values_name_file_line_and_entry(tmp_path: Path, line: str, fragment: str) -> None:
    # PgBouncer 1.18 for "d = host=x foo=1": "unrecognized connection parameter: foo" and
    # 'invalid value "host=x foo=1" for parameter d in configuration (udk.ini:2)'.
    # (It accepts pool_size=abc as 0 through atoi(); we refuse.)
    err = error_of(tmp_path, MAIN + "[databases]\n" + line + "\n")
    assert (err.file, err.line, err.key) == (str(tmp_path / "pgbouncer.ini"), 4, "d")
    assert fragment in str(err)
    assert str(err).startswith(f"{tmp_path / 'pgbouncer.ini'}:4: d: ")


# --- [users] and [peers] -----------------------------------------------------------------------


def test_users_section(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        MAIN + "[users]\nalice = pool_mode=statement max_user_connections=3 pool_size=2 "
        "reserve_pool_size=1 query_timeout=2.5 idle_transaction_timeout=9 "
        "transaction_timeout=60 client_idle_timeout=300 "
        "max_user_client_connections=10 query_wait_timeout=4\nBob =\n",
    )
    a = cfg.users["alice"]
    assert (a.pool_mode, a.max_user_connections, a.pool_size, a.reserve_pool_size) == ("statement", 3, 2, 1)
    assert (a.query_timeout, a.idle_transaction_timeout, a.transaction_timeout) == (2.5, 9.0, 60.0)
    assert (a.client_idle_timeout, a.max_user_client_connections, a.query_wait_timeout) == (300.0, 10, 4.0)
    assert cfg.users["Bob"].pool_mode is None
    err = error_of(tmp_path, MAIN + "[users]\nalice = host=x\n")
    assert (err.line, err.key) == (4, "alice") and "unrecognized user parameter: host" in err.message


def test_peers_section(tmp_path: Path) -> None:
    cfg = load(tmp_path, MAIN + "[peers]\n1 = host=/tmp/p1\n2 = host=10.0.0.2 port=6433 pool_size=4\n")
    assert cfg.peers[1].host == "/tmp/p1" and cfg.peers[1].port == 6432
    assert (cfg.peers[2].port, cfg.peers[2].pool_size) == (6433, 4)
    for body in ["[peers]\nabc = host=x\n", "[peers]\n0 = host=x\n", "[peers]\n3 = port=1\n", "[peers]\n* = port=1\n"]:
        err = error_of(tmp_path, MAIN + body)
        assert err.line == 4 and err.key is not None


def test_peers_wildcard_entry_is_peer_zero(tmp_path: Path) -> None:
    cfg = load(tmp_path, MAIN + "[peers]\n* = host=pgmux-peers.ns.svc,/tmp/p2 port=6433\n")
    assert (cfg.peers[0].host, cfg.peers[0].port) == ("pgmux-peers.ns.svc,/tmp/p2", 6433)


# --- [pgbouncer] values ------------------------------------------------------------------------


def test_core_defaults_match_pgbouncer_md() -> None:
    # Spot-check of the "C" (core) rows of pgbouncer.md §1 and a few others.
    s = Settings()
    assert s.listen_port == 6432
    assert s.listen_addr == []
    assert s.unix_socket_dir == "/tmp"
    assert s.unix_socket_mode == 0o777
    assert s.pool_mode == "session"
    assert s.max_client_conn == 100
    assert s.default_pool_size == 20
    assert s.reserve_pool_size == 0
    assert s.reserve_pool_timeout == 5.0
    assert s.auth_type == "md5"
    assert s.auth_file is None and s.auth_user is None
    assert s.admin_users == [] and s.stats_users == []
    assert s.ignore_startup_parameters == []
    assert s.server_reset_query == "DISCARD ALL"
    assert s.server_check_query == "<empty>"
    assert s.server_lifetime == 3600.0
    assert s.server_idle_timeout == 600.0
    assert s.query_wait_timeout == 120.0
    assert s.client_tls_sslmode == "disable"
    assert s.server_tls_sslmode == "prefer"
    assert s.max_prepared_statements == 200
    assert s.track_extra_parameters == ["IntervalStyle"]
    assert s.log_connections is True and s.so_reuseport is False
    assert s.pkt_buf == 4096 and s.max_packet_size == 2147483647
    assert s.scram_iterations == 4096 and s.query_wait_notify == 5 and s.verbose == 0
    assert s.logfile == "" and s.pidfile == ""


def test_pgmux_extension_settings() -> None:
    s = Settings()
    assert (s.workers, s.metrics_listen, s.pin_session_state, s.pin_timeout) == (1, "", "auto", 0.0)
    assert (s.query_stats, s.query_stats_max, s.query_stats_metrics) == (True, 5000, 20)
    ext = [d for d in SETTINGS.values() if d.extension]
    assert [d.name for d in ext] == ["workers", "metrics_listen", "pin_session_state", "pin_timeout", "query_stats",
                                     "query_stats_max", "query_stats_metrics"]
    assert not SETTINGS["workers"].reloadable and not SETTINGS["metrics_listen"].reloadable
    assert SETTINGS["pin_session_state"].choices == ("auto", "off", "refuse")


def test_setting_table_shape() -> None:
    assert all(isinstance(d, SettingDef) for d in SETTINGS.values())
    assert {d.kind for d in SETTINGS.values()} == {"int", "float", "bool", "str", "enum", "list", "octal"}
    nonreload = {n for n, d in SETTINGS.items() if not d.reloadable and not d.extension}
    assert nonreload == {
        "disable_pqexec",
        "job_name",
        "listen_addr",
        "listen_backlog",
        "listen_port",
        "pidfile",
        "pkt_buf",
        "resolv_conf",
        "so_reuseport",
        "track_extra_parameters",
        "unix_socket_dir",
        "unix_socket_group",
        "unix_socket_mode",
        "user",
    }
    assert set(SETTINGS["auth_type"].choices) == {
        "cert",
        "md5",
        "scram-sha-256",
        "plain",
        "trust",
        "any",
        "hba",
        "pam",
        "ldap",
    }


def test_ldap_and_pam_without_their_library_are_refused_at_load(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ldap3", "pam") else real(name))
    for value, package in (("pam", "python-pam"), ("LDAP", "ldap3")):
        expected = rf"pgbouncer.ini:2: auth_type: auth method {value.lower()} needs the {package} package"
        with pytest.raises(ConfigError, match=expected):
            load(tmp_path, f"[pgbouncer]\nauth_type = {value}\n")


def test_bad_auth_ldap_options_name_file_line_and_key(tmp_path: Path) -> None:
    expected = r'pgbouncer.ini:3: auth_ldap_options: invalid LDAP key parameter: "ldaphost"'
    with pytest.raises(ConfigError, match=expected):
        load(tmp_path, "[pgbouncer]\nauth_type = ldap\nauth_ldap_options = ldaphost=x\n")
    cfg = load(tmp_path, "[pgbouncer]\nauth_type = ldap\nauth_ldap_options = ldapserver=h ldapprefix=uid=\n")
    assert cfg.settings.auth_type == "ldap"


def test_typed_values_from_file(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "[pgbouncer]\nlisten_addr = 127.0.0.1, ::1\nadmin_users = alice,bob\n"
        "unix_socket_mode = 0700\nlog_connections = off\nserver_round_robin = yes\n"
        "query_wait_timeout = 0.25\nauth_type = SCRAM-SHA-256\nmax_client_conn = 0x20\n"
        "client_tls_sslmode = verify-full\nauth_user =\n",
    )
    s = cfg.settings
    assert s.listen_addr == ["127.0.0.1", "::1"] and s.admin_users == ["alice", "bob"]
    assert s.unix_socket_mode == 0o700 and s.max_client_conn == 32
    assert s.log_connections is False and s.server_round_robin is True
    assert s.query_wait_timeout == 0.25 and s.auth_type == "scram-sha-256"
    assert s.client_tls_sslmode == "verify-full" and s.auth_user == ""
    assert cfg.settings.conffile == str(tmp_path / "pgbouncer.ini")


def test_c_integer_syntax() -> None:
    # libusual parses every integer setting with strtol(s, &end, 0).
    assert [parse_c_int(x) for x in ["0", "10", "-3", "+4", "010", "0x1F", " 7"]] == [0, 10, -3, 4, 8, 31, 7]
    for bad in ["", "08", "0x", "1.5", "7 ", "1_000", "abc", "٣"]:
        with pytest.raises(ValueError):
            parse_c_int(bad)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("default_pool_size", "abc", "invalid integer value 'abc'"),
        ("listen_port", "", "invalid integer value ''"),
        ("max_client_conn", "99999999999", "out of range"),
        ("unix_socket_mode", "0789", "invalid integer"),
        ("peer_id", "16384", "out of range"),
        ("query_timeout", "-1", "invalid time value"),
        ("server_lifetime", "1h", "invalid time value"),
        ("server_idle_timeout", "inf", "invalid time value"),
        ("log_connections", "maybe", "invalid boolean value"),
        ("pool_mode", "sessions", "invalid value 'sessions'"),
        ("auth_type", "password", "expected one of"),
        ("server_tls_sslmode", "strict", "verify-full"),
        ("pin_session_state", "on", "refuse"),
        ("workers", "0", "out of range"),
    ],
)
def test_bad_setting_values_name_file_line_and_key(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    # PgBouncer 1.18 for "default_pool_size = abc":
    # 'invalid value "abc" for parameter default_pool_size in configuration (bis.ini:7)', FATAL.
    err = error_of(tmp_path, f"[pgbouncer]\nlisten_port = 1\n{key} = {value}\n")
    assert (err.file, err.line, err.key) == (str(tmp_path / "pgbouncer.ini"), 3, key)
    assert str(err).startswith(f"{tmp_path / 'pgbouncer.ini'}:3: {key}: ")
    assert fragment in str(err)


def test_service_name_is_an_alias_of_job_name(tmp_path: Path) -> None:
    cfg = load(tmp_path, MAIN + "service_name = mybouncer\n")
    assert cfg.settings.job_name == "mybouncer"
    assert "service_name" not in [r[0] for r in cfg.settings.show_rows()]


# --- Settings API ------------------------------------------------------------------------------


def test_settings_set_and_get() -> None:
    s = Settings()
    s.set("default_pool_size", "50")
    s.set("pool_mode", "TRANSACTION")
    s.set("admin_users", "a, b")
    s.set("server_check_delay", "1.5")
    assert s.get("default_pool_size") == 50 and s.default_pool_size == 50
    assert s.pool_mode == "transaction" and s.admin_users == ["a", "b"]
    assert s.server_check_delay == 1.5
    assert s.get("service_name") == "pgbouncer"
    with pytest.raises(KeyError):
        s.get("nope")
    with pytest.raises(AttributeError):
        s.listen_port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        _ = s.nope


def test_settings_set_errors() -> None:
    s = Settings()
    with pytest.raises(ConfigError) as info:
        s.set("default_pool_size", "abc")
    assert str(info.value) == "default_pool_size: invalid integer value 'abc'"
    assert s.default_pool_size == 20  # unchanged
    with pytest.raises(ConfigError) as info:
        s.set("foo", "1")
    assert str(info.value) == "foo: unknown parameter"
    # Non-reloadable settings cannot be changed from the console, but can be loaded from a file.
    with pytest.raises(ConfigError) as info:
        s.set("listen_port", "7000")
    assert info.value.key == "listen_port" and s.listen_port == 6432
    s.set("listen_port", "7000", source="file")
    assert s.listen_port == 7000


def test_show_rows_order_and_formatting() -> None:
    s = Settings()
    s.set("query_timeout", "1234567.5")
    s.set("server_check_delay", "0.5")
    s.set("log_connections", "no")
    s.set("unix_socket_mode", "0700", source="file")
    s.set("admin_users", "alice ,bob")
    rows = s.show_rows()
    keys = [r[0] for r in rows]
    core = [k for k in keys if not SETTINGS[k].extension]
    assert core == sorted(core)  # PgBouncer's CF table order (strcmp)
    assert keys[len(core) :] == ["workers", "metrics_listen", "pin_session_state", "pin_timeout", "query_stats",
                                 "query_stats_max", "query_stats_metrics"]
    assert keys == list(SETTINGS)
    by_key = {r[0]: r for r in rows}
    # Rows as PgBouncer 1.18 printed them (value, default, changeable):
    assert by_key["unix_socket_mode"] == ("unix_socket_mode", "448", "0777", "no")
    assert by_key["query_timeout"] == ("query_timeout", "1.23457e+06", "0", "yes")
    assert by_key["server_check_delay"] == ("server_check_delay", "0.5", "30", "yes")
    assert by_key["query_wait_timeout"] == ("query_wait_timeout", "120", "120", "yes")
    assert by_key["log_connections"] == ("log_connections", "0", "1", "yes")
    assert by_key["admin_users"] == ("admin_users", "alice ,bob", "", "yes")  # raw text
    assert by_key["auth_user"] == ("auth_user", "", "", "yes")
    assert by_key["verbose"] == ("verbose", "0", "", "yes")
    assert by_key["listen_port"] == ("listen_port", "6432", "6432", "no")
    assert by_key["auth_query"][1] == by_key["auth_query"][2]
    nullable = {r[0]: r for r in s.show_rows(nulls=True)}
    assert nullable["auth_user"] == ("auth_user", None, None, "yes")  # SQL NULLs in PgBouncer
    assert nullable["verbose"] == ("verbose", "0", None, "yes")
    assert nullable["logfile"] == ("logfile", "", "", "yes")


def test_time_values_keep_whole_microseconds() -> None:
    s = Settings()
    s.set("client_idle_timeout", "0.0000001")  # below 1 µs: PgBouncer stores 0
    assert s.client_idle_timeout == 0.0
    s.set("client_idle_timeout", "2e3")
    assert s.client_idle_timeout == 2000.0


def test_changed_nonreloadable_and_adopt() -> None:
    running = Settings()
    new = Settings()
    new.set("listen_port", "7000", source="file")
    new.set("pool_mode", "transaction")
    new.set("listen_addr", "*", source="file")
    assert new.changed_nonreloadable(running) == ["listen_addr", "listen_port"]
    assert new.adopt_nonreloadable(running) == ["listen_addr", "listen_port"]
    assert (new.listen_port, new.listen_addr, new.pool_mode) == (6432, [], "transaction")
    assert new.changed_nonreloadable(running) == []


def test_settings_copy_and_equality() -> None:
    a = Settings()
    b = a.copy()
    assert a == b
    b.set("admin_users", "x")
    assert a != b and a.admin_users == []


# --- ConfigError -------------------------------------------------------------------------------


def test_config_error_formatting_and_pickling() -> None:
    err = ConfigError("invalid integer value 'abc'", file="/etc/pgbouncer.ini", line=12, key="default_pool_size")
    assert str(err) == "/etc/pgbouncer.ini:12: default_pool_size: invalid integer value 'abc'"
    assert str(ConfigError("boom", file="/x.ini")) == "/x.ini: boom"
    assert str(ConfigError("boom", key="k")) == "k: boom"
    assert str(ConfigError("boom")) == "boom"
    again = pickle.loads(pickle.dumps(err))
    assert (again.file, again.line, again.key, again.message) == (err.file, err.line, err.key, err.message)


def test_load_config_text() -> None:
    cfg = load_config_text(MAIN + "[databases]\nd = host=x\n", "inline.ini")
    assert cfg.path == "inline.ini" and cfg.databases["d"].host == "x"
    with pytest.raises(ConfigError) as info:
        load_config_text(MAIN + "x y\n", "inline.ini")
    assert str(info.value).startswith("inline.ini:3: ")


def test_config_survives_pickling(tmp_path: Path) -> None:
    # Worker processes receive the Config; it must round-trip.
    cfg = load(tmp_path, MAIN + "admin_users = a,b\n[databases]\nd = host=x\n[users]\nu = pool_size=1\n")
    again = pickle.loads(pickle.dumps(cfg))
    assert again.settings == cfg.settings and again.databases == cfg.databases and again.users == cfg.users
    assert again.settings.admin_users == ["a", "b"]


_FRAGMENTS = st.sampled_from(
    [
        "[pgbouncer]",
        "[databases]",
        "[users]",
        "[peers]",
        "[x]",
        "listen_port = 1",
        "pool_mode = statement",
        "d = host=x port=5",
        "d = port=abc",
        "* = dbname='a b'",
        "1 = host=h",
        '"q" = host=y',
        "; c",
        "# c",
        "%include /nonexistent",
        "key",
        "= v",
        "a = 'unterminated",
        "max_client_conn = 0x10",
        "'",
        '"',
        "\\",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=20)), max_size=12))
def test_only_config_errors_escape(lines: list[str]) -> None:
    # Whatever the text, load_config_text() returns a Config or raises a located ConfigError.
    try:
        cfg = load_config_text("\n".join(lines), "fuzz.ini")
    except ConfigError as exc:
        assert exc.file is not None and str(exc).startswith(("fuzz.ini", "/nonexistent"))
    else:
        assert isinstance(cfg.settings, Settings)
