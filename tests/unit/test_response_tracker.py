"""ResponseTracker and statement bookkeeping, without sockets."""

from __future__ import annotations

from helpers_tracker import B, C, D, E, P, Q, S, feed

from pgmux.protocol.prepared import (
    CLOSE_COMPLETE,
    FAKE,
    PARSE_COMPLETE,
    SKIP,
    ResponseTracker,
    ServerStatements,
    StatementRegistry,
    close_message,
    rewrite_named,
    split_parse,
)


def test_fake_answer_is_immediate_when_nothing_is_in_flight() -> None:
    t = ResponseTracker()
    assert t.fake(P, PARSE_COMPLETE) == PARSE_COMPLETE
    assert not t.queue


def test_fake_answer_waits_for_earlier_answers() -> None:
    t = ResponseTracker()
    t.request(B)
    t.request(E)
    assert t.fake(P, PARSE_COMPLETE) is None  # a Parse we did not send, after Bind+Execute
    t.request(S)
    seen = feed(t, "2DDCZ")
    assert seen == "2DDC1*Z"
    assert not t.queue and t.specials == 0


def test_injected_parse_answer_is_swallowed() -> None:
    t = ResponseTracker()
    t.request(P, SKIP)
    t.request(B)
    t.request(D)
    t.request(E)
    t.request(S)
    seen = feed(t, "12TDCZ")
    assert seen == "2TDCZ"


def test_error_skips_to_sync_and_drops_pending_fakes() -> None:
    t = ResponseTracker()
    registry = StatementRegistry()
    stmt = registry.get(b"select bad\0\0\0")
    server = ServerStatements(10)
    server.add(stmt)
    client_stmts = {b"s1": stmt}
    t.request(P, 0, (stmt, server, client_stmts, b"s1"))
    t.request(B)
    t.request(C, FAKE, CLOSE_COMPLETE)
    t.request(S)
    seen = feed(t, "EZ")
    assert seen == "EZ"
    assert not server.has(stmt) and b"s1" not in client_stmts  # a failed Parse prepared nothing
    assert t.specials == 0 and not t.queue


def test_simple_query_error_keeps_the_query_entry_until_ready() -> None:
    t = ResponseTracker()
    t.request(Q)
    t.request(P, FAKE, PARSE_COMPLETE)
    seen = feed(t, "TDCEZ")
    assert seen == "TDCEZ1*"


def test_registry_shares_statements_and_lru_evicts_oldest() -> None:
    reg = StatementRegistry()
    a, b, c = reg.get(b"a\0\0\0"), reg.get(b"b\0\0\0"), reg.get(b"c\0\0\0")
    assert reg.get(b"a\0\0\0") is a and a.server_name != b.server_name
    lru = ServerStatements(2)
    assert lru.add(a) == [] and lru.add(b) == []
    assert lru.has(a)  # a becomes most recent
    assert lru.add(c) == [b]


def test_message_rewriting() -> None:
    body = b"s1\0select 1\0\0\0"
    assert split_parse(body) == (b"s1", b"select 1\0\0\0")
    bind = b"\0s1\0\0\0\0\0\0\0"
    out = rewrite_named(b"B", bind, 1, 2, b"PGMUX_7")
    assert out[5:] == b"\0PGMUX_7\0\0\0\0\0\0\0" and int.from_bytes(out[1:5], "big") == len(out) - 1
    assert close_message(b"X")[5:] == b"SX\0"
