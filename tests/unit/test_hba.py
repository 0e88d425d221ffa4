"""auth_hba_file / auth_ident_file: rules allow and reject exactly as written; every error names file:line."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pgmux.auth.hba import HbaError, HbaRules, IdentMap, IdentMapError, NameList

HBA = textwrap.dedent(
    """\
    # type     database        user            address                 method
    local      all             postgres                                peer map=admins
    local      sameuser        all                                     md5
    local      all             all                                     reject
    hostssl    certdb          all             all                     cert map=certmap
    hostnossl  certdb          all             all                     reject
    host       replication     repl            10.0.0.0/8              scram-sha-256
    host       "replication"   all             10.0.0.0/8              md5
    host       app,"odd, name" alice, bob      192.168.1.0/24          scram-sha-256
    host       app             "all"           192.168.1.0/24          password
    host       app             all             192.168.0.0 255.255.0.0 trust   # mask column
    host       all             all             2001:db8::/32           md5
    host       all             all             fe80:: ffff:ffff::      md5
    host       "All"           all             127.0.0.1/32            trust
    host       all             blocked         0.0.0.0/0               reject
    host       all             all             127.0.0.0/8             md5
    hostssl    all             all             ::/0                    scram-sha-256
    """
)

RULES = HbaRules.parse(HBA, "/etc/pgbouncer/hba.conf", read_include=lambda p: "")

# (conn_type, tls, database, user, address, replication, expected line or None, expected method or None)
MATCH_CASES = [
    # local: first match wins, peer before the sameuser rule, reject at the end
    ("local", False, "x", "postgres", None, False, 2, "peer"),
    ("local", False, "alice", "alice", None, False, 3, "md5"),
    ("local", False, "alice", "bob", None, False, 4, "reject"),
    ("local", True, "alice", "alice", None, False, 3, "md5"),  # tls is irrelevant for local
    # hostssl vs hostnossl
    ("host", True, "certdb", "carol", "203.0.113.9", False, 5, "cert"),
    ("host", False, "certdb", "carol", "203.0.113.9", False, 6, "reject"),
    # replication keyword: only physical replication connections; `all` never matches them
    ("host", False, "anything", "repl", "10.1.2.3", True, 7, "scram-sha-256"),
    ("host", False, "replication", "repl", "10.1.2.3", False, 8, "md5"),  # quoted: a database named so
    ("host", False, "anything", "other", "10.1.2.3", True, None, None),
    ("host", False, "anything", "repl", "127.0.0.1", True, None, None),
    ("host", False, "replication", "other", "10.9.9.9", False, 8, "md5"),
    # lists, quoted names with commas, whitespace after commas
    ("host", False, "app", "alice", "192.168.1.7", False, 9, "scram-sha-256"),
    ("host", False, "odd, name", "bob", "192.168.1.7", False, 9, "scram-sha-256"),
    ("host", False, "odd", "bob", "192.168.1.7", False, None, None),
    ("host", False, "app", "all", "192.168.1.7", False, 10, "password"),  # "all" quoted is a user name
    ("host", False, "app", "carol", "192.168.1.7", False, 11, "trust"),  # falls to the mask-column rule
    ("host", False, "app", "carol", "192.168.200.1", False, 11, "trust"),
    ("host", False, "app", "carol", "192.169.0.1", False, None, None),
    ("host", False, "ap", "alice", "192.168.1.7", False, None, None),  # exact names, no prefixes
    ("host", False, "APP", "alice", "192.168.1.7", False, None, None),  # case-sensitive
    # IPv6 CIDR and IPv6 mask column, scope ids and brackets stripped
    ("host", False, "db", "u", "2001:db8:1::5", False, 12, "md5"),
    ("host", False, "db", "u", "[2001:db8::1]", False, 12, "md5"),
    ("host", False, "db", "u", "fe80::1234%eth0", False, 13, "md5"),
    ("host", False, "db", "u", "2001:db9::1", False, None, None),
    # IPv4 rules never match IPv6 peers and vice versa, but IPv4-mapped IPv6 peers match IPv4 rules
    ("host", False, "All", "u", "127.0.0.1", False, 14, "trust"),
    ("host", False, "All", "u", "::ffff:127.0.0.1", False, 14, "trust"),
    ("host", False, "all", "u", "127.0.0.1", False, 16, "md5"),  # `all` keyword != quoted "All"
    ("host", False, "db", "blocked", "127.0.0.1", False, 15, "reject"),
    ("host", False, "db", "blocked", "::1", False, None, None),  # the 0.0.0.0/0 reject is IPv4 only
    ("host", True, "db", "blocked", "::1", False, 17, "scram-sha-256"),
    ("host", True, "db", "u", "::1", False, 17, "scram-sha-256"),
    ("host", False, "db", "u", "::1", False, None, None),
    ("host", False, "db", "u", "8.8.8.8", False, None, None),
]


@pytest.mark.parametrize(
    ("conn_type", "tls", "database", "user", "address", "replication", "line", "method"), MATCH_CASES
)
def test_match_table(
    conn_type: str,
    tls: bool,
    database: str,
    user: str,
    address: str | None,
    replication: bool,
    line: int | None,
    method: str | None,
) -> None:
    rule = RULES.match(
        conn_type=conn_type, tls=tls, database=database, user=user, address=address, replication=replication
    )
    if line is None:
        assert rule is None
    else:
        assert rule is not None
        assert (rule.line, rule.method) == (line, method)


def test_parsed_fields() -> None:
    by_line = {r.line: r for r in RULES}
    assert len(RULES) == 16
    r = by_line[9]
    assert r.conn_type == "host"
    assert r.databases == NameList(names=frozenset({"app", "odd, name"}))
    assert r.users == NameList(names=frozenset({"alice", "bob"}))
    assert (r.address, r.mask, str(r.network)) == ("192.168.1.0/24", None, "192.168.1.0/24")
    r = by_line[11]
    assert (r.address, r.mask, str(r.network)) == ("192.168.0.0", "255.255.0.0", "192.168.0.0/16")
    r = by_line[13]
    assert str(r.network) == "fe80::/32"
    r = by_line[2]
    assert (r.conn_type, r.address, r.network, r.map, r.options) == ("local", None, None, "admins", {"map": "admins"})
    assert by_line[3].databases.sameuser and not by_line[3].databases.all
    assert by_line[7].databases.replication and by_line[7].databases.names == frozenset()
    assert by_line[8].databases.names == frozenset({"replication"}) and not by_line[8].databases.replication
    assert by_line[10].auth_type == "plain" and by_line[10].method == "password"
    assert by_line[5].address == "all" and by_line[5].network is None
    assert RULES.warnings == []


def test_no_rules_means_no_match() -> None:
    rules = HbaRules.parse("# nothing here\n\n   \n", "hba.conf")
    assert len(rules) == 0
    assert rules.match(conn_type="host", tls=True, database="d", user="u", address="127.0.0.1") is None


def test_comments_whitespace_and_crlf() -> None:
    text = "host all all 127.0.0.1/32 md5#comment glued to the method\r\n\t host\tall,  x ,y all ::1/128 trust \r\n"
    rules = HbaRules.parse(text, "hba.conf")
    assert [(r.line, r.method) for r in rules] == [(1, "md5"), (2, "trust")]
    assert rules.rules[1].databases == NameList(all=True, names=frozenset({"x", "y"}))


def test_hash_inside_quotes_and_doubled_quotes() -> None:
    rules = HbaRules.parse('local "a#b" "say ""hi""" trust\n', "hba.conf")
    assert rules.rules[0].databases.names == {"a#b"}
    assert rules.rules[0].users.names == {'say "hi"'}
    assert rules.match(conn_type="local", tls=False, database="a#b", user='say "hi"', address=None) is not None


def test_host_bits_outside_mask_warn_and_match_the_network() -> None:
    rules = HbaRules.parse("host all all 10.1.2.3/8 trust\n", "hba.conf")
    assert str(rules.rules[0].network) == "10.0.0.0/8"
    assert [str(w) for w in rules.warnings] == [
        "hba.conf:1: address 10.1.2.3 has bits set outside its mask; matching 10.0.0.0/8 as PostgreSQL does "
        "(PgBouncer would never match this rule)"
    ]
    assert rules.match(conn_type="host", tls=False, database="d", user="u", address="10.200.0.1") is not None


def test_suspicious_method_placement_warns() -> None:
    rules = HbaRules.parse("host all all all peer\nhost all all all cert\nhostssl all all all cert\n", "h")
    assert [(w.line, w.message.split(" ")[0]) for w in rules.warnings] == [(1, "peer"), (2, "cert")]


# -- @file includes ------------------------------------------------------------------------------------------


def test_includes_relative_to_hba_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "dbs.txt").write_text("# databases\nsales, hr\n\n  finance\n")
    (tmp_path / "users.txt").write_text('alice,"bob smith"\n@sub/more.txt\n')
    (tmp_path / "sub" / "more.txt").write_text("carol\n")  # nested, relative to users.txt's directory
    hba = tmp_path / "hba.conf"
    hba.write_text("host @dbs.txt,extra @users.txt 0.0.0.0/0 md5\n")
    rules = HbaRules.load(str(hba))
    rule = rules.rules[0]
    assert rule.databases.names == {"sales", "hr", "finance", "extra"}
    assert rule.users.names == {"alice", "bob smith", "carol"}
    for user, ok in [("alice", True), ("bob smith", True), ("carol", True), ("dave", False)]:
        got = rules.match(conn_type="host", tls=False, database="hr", user=user, address="1.2.3.4")
        assert (got is not None) is ok


def test_include_keywords_and_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "kw.txt").write_text("all\n")
    rules = HbaRules.parse(f"local @{tmp_path / 'kw.txt'} all trust\n", "relative-hba.conf")
    assert rules.rules[0].databases.all


def test_include_via_callback_resolves_against_filename() -> None:
    seen: list[str] = []

    def read(path: str) -> str:
        seen.append(path)
        return "u1,u2\n"

    rules = HbaRules.parse("local all @users trust\n", "/etc/pgbouncer/hba.conf", read_include=read)
    assert seen == [os.path.join("/etc/pgbouncer", "users")]
    assert rules.rules[0].users.names == {"u1", "u2"}


def test_quoted_at_and_plus_are_plain_names() -> None:
    rules = HbaRules.parse('local "@file" "+group" trust\n', "hba.conf")
    assert rules.rules[0].databases.names == {"@file"}
    assert rules.rules[0].users.names == {"+group"}


# -- errors name file:line -----------------------------------------------------------------------------------

ERROR_CASES = [
    ("bogus all all trust", "unknown record type 'bogus'"),
    ('"host" all all all trust', "unknown record type quoted"),
    ("HOST all all all trust", "unknown record type 'HOST'"),
    ("local", "missing database name, found end of line"),
    ("local all", "missing user name, found end of line"),
    ("local all all", "missing authentication method, found end of line"),
    ("local all, all trust", "missing authentication method"),  # `, all` joins the list; no user column left
    ("local ,all all trust", "missing database name, found ','"),
    ("local a,,b all trust", "missing database name after ','"),
    ("local a, all", "missing user name, found end of line"),  # the database list is `a, all`
    ('local "unterminated all trust', "unterminated quoted string"),
    ("local samerole all trust", "samerole is not supported"),
    ("local samegroup all trust", "samegroup is not supported"),
    ("local all +admins trust", "group membership (+admins) is not supported"),
    ("local all sameuser trust", "'sameuser' is only a keyword in the database column"),
    ("local all replication trust", "'replication' is only a keyword in the database column"),
    ("host all all trust", "missing address before the method 'trust'"),
    ("host all all", "missing address, found end of line"),
    ("host all all samehost trust", "samehost is not supported by PgBouncer"),
    ("host all all samenet md5", "samenet is not supported by PgBouncer"),
    ("host all all db.example.com md5", "host names are not supported by PgBouncer ('db.example.com')"),
    ("host all all .example.com md5", "host names are not supported"),
    ("host all all localhost md5", "host names are not supported"),
    ('host all all "10.0.0.1/32" md5', "quoted address"),
    ("host all all 10.0.0.0/33 md5", "CIDR mask length 33 is too long for 10.0.0.0 (max 32)"),
    ("host all all ::/129 md5", "CIDR mask length 129 is too long"),
    ("host all all 10.0.0.0/ md5", "invalid CIDR mask length ''"),
    ("host all all 10.0.0.0/x md5", "invalid CIDR mask length 'x'"),
    ("host all all 10.0.0.0/-1 md5", "invalid CIDR mask length '-1'"),
    ("host all all 10.0.0.256/8 md5", "invalid address '10.0.0.256'"),
    ("host all all 10.0.0.0 md5", "invalid netmask 'md5' for address 10.0.0.0"),
    ("host all all 10.0.0.0", "address 10.0.0.0 needs a mask"),
    ("host all all 10.0.0.0 255.0.255.0 md5", "netmask 255.0.255.0 is not contiguous"),
    ("host all all 10.0.0.0 ffff:: md5", "invalid netmask 'ffff::' for address 10.0.0.0"),
    ("host all all fe80::1%eth0/64 md5", "IPv6 zone indexes are not supported"),
    ("host all all 10.0.0.0/8 255.0.0.0 md5", "unsupported authentication method '255.0.0.0'"),
    ("host all all all ident", "unsupported authentication method 'ident'"),
    ("host all all all gss", "unsupported authentication method 'gss'"),
    ("host all all all ldap ldapserver=x", 'requires argument "ldapbasedn", "ldapprefix", or "ldapsuffix"'),
    ("host all all all ldap ldapserver=x ldapfoo=1", 'invalid LDAP key parameter: "ldapfoo"'),
    ('host all all all ldap ldapserver=x ldapprefix="uid=" ldapbasedn=dc=x', "together with ldapprefix"),
    ("host all all all ldap ldapserver=x ldapport=0 ldapprefix=a", 'invalid LDAP port number: "0"'),
    ("host all all all ldap ldapserver=x ldapscheme=http ldapprefix=a", 'invalid ldapscheme value: "http"'),
    ("host all all all ldap ldapbasedn=dc=x", "LDAP server not specified"),
    ("host all all all ldap ldapserver= ldapbasedn=dc=x", 'no space is allowed after "ldapserver="'),
    ("host all all all plain", "write 'password'"),
    ("host all all all MD5", "unsupported authentication method 'MD5'"),
    ('host all all all "md5"', "missing authentication method, found quoted"),
    ("host all all all md5 map=x", "map= is only valid for the cert and peer methods, not md5"),
    ("hostssl all all all cert clientcert=verify-full", "unsupported option 'clientcert'"),
    ("hostssl all all all cert map=", "map= needs a map name"),
    ("hostssl all all all cert map=a map=b", "map= given twice"),
    ("hostssl all all all cert extra", "unexpected 'extra' after the method"),
    ('hostssl all all all cert map="a b"', "map= needs a map name (unquoted)"),
    ("host all all all md5 \\", "line continuation with a trailing backslash is not supported"),
    ("host all all all \\", "line continuation with a trailing backslash is not supported"),
]


@pytest.mark.parametrize(("line", "message"), ERROR_CASES)
def test_syntax_errors_name_file_and_line(line: str, message: str) -> None:
    text = "# header comment\nlocal all all trust\n\n" + line + "\nlocal all all reject\n"
    with pytest.raises(HbaError) as info:
        HbaRules.parse(text, "/etc/pgbouncer/hba.conf", read_include=lambda p: "")
    assert info.value.file == "/etc/pgbouncer/hba.conf"
    assert info.value.line == 4
    assert str(info.value).startswith("/etc/pgbouncer/hba.conf:4: ")
    assert message in str(info.value)


def test_backslash_in_a_comment_is_just_a_comment() -> None:
    rules = HbaRules.parse("# old rule \\\nlocal all all trust\n", "hba.conf")
    assert [r.line for r in rules] == [2]


def test_include_errors_name_the_included_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text("alice\nbob carol\n")
    hba = tmp_path / "hba.conf"
    hba.write_text("\nlocal all @users.txt trust\n")
    with pytest.raises(HbaError) as info:
        HbaRules.load(str(hba))
    assert str(info.value) == (
        f"{tmp_path / 'users.txt'}:2: names in an @file must be separated by commas or newlines, found 'carol' "
        f"(included from {hba}:2)"
    )


def test_missing_include_and_include_loop(tmp_path: Path) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text("local all @nope.txt trust\n")
    with pytest.raises(HbaError) as info:
        HbaRules.load(str(hba))
    assert str(info.value).startswith(f"{hba}:1: could not read @nope.txt ({tmp_path / 'nope.txt'})")

    (tmp_path / "a.txt").write_text("@b.txt\n")
    (tmp_path / "b.txt").write_text("x,@a.txt\n")
    hba.write_text("local all @a.txt trust\n")
    with pytest.raises(HbaError) as info:
        HbaRules.load(str(hba))
    assert info.value.file == str(tmp_path / "b.txt")
    assert info.value.line == 1
    assert "include loop" in info.value.message

    hba.write_text("local all @ trust\n")
    with pytest.raises(HbaError, match=r"hba.conf:1: '@' must be followed by a file name"):
        HbaRules.load(str(hba))


def test_unreadable_hba_file(tmp_path: Path) -> None:
    with pytest.raises(HbaError) as info:
        HbaRules.load(str(tmp_path / "missing.conf"))
    assert info.value.line is None
    assert str(info.value).startswith(f"{tmp_path / 'missing.conf'}: could not read HBA file")


def test_match_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="conn_type"):
        RULES.match(conn_type="hostssl", tls=True, database="d", user="u", address="127.0.0.1")
    with pytest.raises(ValueError, match="peer address"):
        RULES.match(conn_type="host", tls=True, database="d", user="u", address=None)
    with pytest.raises(ValueError, match="not an IP address"):
        RULES.match(conn_type="host", tls=True, database="d", user="u", address="localhost")


# -- ident maps ----------------------------------------------------------------------------------------------

IDENT = textwrap.dedent(
    """\
    # MAPNAME   SYSTEM-USERNAME   PG-USERNAME
    certmap     alice.example     alice
    certmap     "Bob Smith"       bob
    certmap     ops               all        # ops may be anyone
    admins      root              postgres
    admins      "/literal"        "all"
    """
)


@pytest.mark.parametrize(
    ("map_name", "system_user", "db_user", "allowed"),
    [
        ("certmap", "alice.example", "alice", True),
        ("certmap", "alice.example", "bob", False),
        ("certmap", "alice", "alice", False),  # no implicit identity mapping inside a map
        ("certmap", "Bob Smith", "bob", True),
        ("certmap", "bob smith", "bob", False),  # case-sensitive
        ("certmap", "ops", "anyone", True),
        ("certmap", "root", "postgres", False),  # other map
        ("admins", "root", "postgres", True),
        ("admins", "/literal", "all", True),  # quoted: a user named "all", a system name starting with /
        ("admins", "/literal", "postgres", False),
        ("nosuchmap", "alice.example", "alice", False),
    ],
)
def test_ident_allows(map_name: str, system_user: str, db_user: str, allowed: bool) -> None:
    ident = IdentMap.parse(IDENT, "ident.conf")
    assert ident.allows(map_name, system_user, db_user) is allowed


def test_ident_structure() -> None:
    ident = IdentMap.parse(IDENT, "ident.conf")
    assert ident.map_names == {"certmap", "admins"}
    assert "certmap" in ident and "other" not in ident
    assert len(ident) == 5
    assert [(m.line, m.db_user) for m in ident.mappings] == [
        (2, "alice"),
        (3, "bob"),
        (4, None),
        (5, "postgres"),
        (6, "all"),
    ]


IDENT_ERRORS = [
    ("certmap", "missing system user name"),
    ("certmap alice", "missing database user name"),
    ("certmap alice bob extra", "unexpected 'extra' after the database user name"),
    ('"certmap" alice bob', "the map name must not be quoted"),
    ("certmap /^(.*)@example\\.com$ \\1", "regular expressions are not supported"),
    ("certmap alice +admins", "group membership and @file are not supported in ident maps"),
    ("certmap alice @users", "group membership and @file are not supported in ident maps"),
    ("certmap alice,bob carol", "lists are not supported"),
    ('certmap "alice bob', "unterminated quoted string"),
    ("certmap alice bob \\", "line continuation"),
]


@pytest.mark.parametrize(("line", "message"), IDENT_ERRORS)
def test_ident_errors_name_file_and_line(line: str, message: str) -> None:
    with pytest.raises(IdentMapError) as info:
        IdentMap.parse("# maps\nok a b\n" + line + "\n", "/etc/pgbouncer/ident.conf")
    assert isinstance(info.value, HbaError)
    assert str(info.value).startswith("/etc/pgbouncer/ident.conf:3: ")
    assert message in str(info.value)


def test_ident_load(tmp_path: Path) -> None:
    path = tmp_path / "ident.conf"
    path.write_text(IDENT)
    assert IdentMap.load(str(path)).allows("certmap", "ops", "x")
    with pytest.raises(IdentMapError, match="could not read ident file"):
        IdentMap.load(str(tmp_path / "missing"))


def test_maps_checked_against_ident_file() -> None:
    ident = IdentMap.parse(IDENT, "/etc/pgbouncer/ident.conf")
    text = "local all all peer map=admins\nhostssl all all all cert map=certmap\nhostssl all all all cert map=nope\n"
    with pytest.raises(HbaError) as info:
        HbaRules.parse(text, "hba.conf", ident=ident)
    assert str(info.value) == "hba.conf:3: map=nope is not defined in /etc/pgbouncer/ident.conf"

    ok = HbaRules.parse(text.rsplit("\n", 2)[0] + "\n", "hba.conf", ident=ident)
    assert [r.map for r in ok] == ["admins", "certmap"]
    with pytest.raises(HbaError, match=r"hba.conf:1: map=admins needs auth_ident_file, which is not set"):
        ok.validate_maps(None)
    HbaRules.parse("local all all peer\n", "hba.conf").validate_maps(None)  # no map=: nothing to check


def test_cert_login_maps_names() -> None:
    """How the login path combines the two: the rule's map decides which CNs may be which users."""
    ident = IdentMap.parse(IDENT, "ident.conf")
    rules = HbaRules.parse(
        "hostssl app all 127.0.0.1/32 cert map=certmap\nhostssl all all 127.0.0.1/32 cert\n", "hba.conf", ident=ident
    )

    def cert_login(database: str, user: str, cn: str) -> bool:
        rule = rules.match(conn_type="host", tls=True, database=database, user=user, address="127.0.0.1")
        assert rule is not None and rule.method == "cert"
        return ident.allows(rule.map, cn, user) if rule.map else cn == user

    assert cert_login("app", "alice", "alice.example")
    assert not cert_login("app", "alice", "alice")
    assert cert_login("other", "alice", "alice")
    assert not cert_login("other", "alice", "alice.example")


def test_ldap_line_options_are_the_rest_of_the_line() -> None:
    rules = HbaRules.parse('host all all all ldap ldapserver="a b" ldapport=3389, ldapbasedn="dc=x,dc=y" '
                           'ldapsearchfilter="(|(uid=$username)(mail=$username))"  # comment\n', "hba.conf")
    opts = rules.rules[0].ldap
    assert opts is not None
    assert (opts.servers, opts.port, opts.basedn, opts.searchfilter) == (
        ("a", "b"), 3389, "dc=x,dc=y", "(|(uid=$username)(mail=$username))")


def test_ldapurl_fills_server_port_basedn_attribute_scope() -> None:
    from pgmux.auth.external import parse_ldap_options

    opts = parse_ldap_options('ldapurl="ldaps://ldap.example:1636/dc=example,dc=net?cn?one"')
    assert (opts.scheme, opts.servers, opts.effective_port, opts.basedn, opts.searchattribute, opts.scope) == (
        "ldaps", ("ldap.example",), 1636, "dc=example,dc=net", "cn", "LEVEL")
    assert parse_ldap_options("ldapserver=h ldapscheme=ldaps ldapprefix=u").effective_port == 636


def test_ldap_and_pam_lines_need_their_library(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ldap3", "pam") else real(name))
    for line, package in (("host all all all ldap ldapserver=h ldapprefix=u", "ldap3"), ("local all all pam", "pam")):
        with pytest.raises(HbaError, match=rf"hba.conf:1: auth method \w+ needs the .*{package}"):
            HbaRules.parse(line + "\n", "hba.conf")
