"""ResponseTracker bookkeeping that keeps ServerStatements in step with the backend: Closes and
DEALLOCATEs the server skipped or refused, DISCARD ALL / DEALLOCATE ALL in a pipeline, and the
Syncs PostgreSQL ignores during COPY IN."""

from __future__ import annotations

from helpers_tracker import B, C, E, P, Q, S, feed

from pgmux.protocol.prepared import (
    FAKE,
    PARSE_COMPLETE,
    SKIP,
    ResponseTracker,
    Restore,
    ServerStatements,
    StatementRegistry,
)


def test_eviction_close_skipped_after_error_is_restored() -> None:
    reg = StatementRegistry()
    a, b = reg.get(b"SELECT 1\0\0\0"), reg.get(b"SELECT 2\0\0\0")
    server = ServerStatements(1)
    server.add(a)
    t = ResponseTracker()
    t.request(P)
    t.request(B)
    t.request(E)
    assert server.add(b) == [a]  # evicted: pgmux sends Close PGMUX_a, then Parse PGMUX_b
    t.request(C, SKIP, Restore(a, server))
    t.request(P, SKIP, (b, server, None, None))
    t.request(S)
    assert feed(t, "12EZ") == "12EZ"  # the Execute failed: PostgreSQL skipped the Close and the Parse
    assert server.has(a) and not server.has(b)


def test_failed_deallocate_query_restores_and_is_not_own() -> None:
    reg = StatementRegistry()
    a = reg.get(b"SELECT 1\0\0\0")
    server = ServerStatements(5)
    t = ResponseTracker()
    t.own_deallocs += 1
    t.request(Q, payload=Restore(a, server, dealloc=True))  # already discarded from `server`
    assert feed(t, "EZ") == "EZ"
    assert server.has(a) and t.own_deallocs == 0
    # a successful one: its tag is pgmux's own, and nothing is restored
    t.own_deallocs += 1
    t.request(Q, payload=Restore(reg.get(b"SELECT 2\0\0\0"), server, dealloc=True))
    assert t.own_deallocate() and not t.own_deallocate()
    assert feed(t, "CZ") == "CZ"
    assert len(server.lru) == 1


def test_parsed_after_deallocate_all_survive() -> None:
    reg = StatementRegistry()
    a, b = reg.get(b"SELECT 1\0\0\0"), reg.get(b"SELECT 2\0\0\0")
    server = ServerStatements(5)
    client: dict[bytes, object] = {}
    t = ResponseTracker()
    t.request(E)  # the DEALLOCATE ALL being answered
    server.add(a)
    client[b"a"] = a
    t.request(P, payload=(a, server, client, b"a"))
    client[b"b"] = b
    t.request(P, FAKE, PARSE_COMPLETE)
    t.queue[-1].append((client, b"b", b))
    server.clear()
    client.clear()
    t.parsed_later()
    assert server.has(a) and not server.has(b)
    assert client == {b"a": a, b"b": b}


def test_drop_syncs() -> None:
    t = ResponseTracker()
    t.request(E)
    t.request(S)
    t.request(P, FAKE, PARSE_COMPLETE)
    t.request(S)
    t.drop_syncs()
    assert [e[0] for e in t.queue] == [E, P] and t.specials == 1
