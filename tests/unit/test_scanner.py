"""The header walk against a reference parser, on random streams cut at random points."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgmux.protocol import scanner
from pgmux.protocol.messages import ProtocolError
from pgmux.protocol.scanner import NO_TYPES, scan, scan_py, type_table

NEED = type_table("ZS")


def msg(typ: bytes, body: bytes) -> bytes:
    return typ + struct.pack("!I", len(body) + 4) + body


def reference(stream: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(stream):
        length = struct.unpack_from("!I", stream, pos + 1)[0]
        out.append((stream[pos], stream[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def walk_in_chunks(stream: bytes, cuts: list[int], need: bytes, notify: bytes) -> list[tuple[int, bytes]]:
    """Drive `scan` the way the server data path does: retained bytes stay at the buffer front."""
    buf = bytearray()
    skip = 0
    seen: list[tuple[int, bytes]] = []
    points = sorted(set(c for c in cuts if 0 < c < len(stream))) + [len(stream)]
    prev = 0
    for p in points:
        chunk = stream[prev:p]
        prev = p
        n = len(chunk)
        if not buf and skip >= n:
            skip -= n
            continue
        pos = skip if not buf else 0
        skip = 0
        buf += chunk
        events: list[tuple[int, int, int]] = []
        stop, skip = scan(buf, pos, len(buf), need, notify, events)
        for typ, s, e in events:
            seen.append((typ, bytes(buf[s + 5 : e]) if need[typ] else b""))
        del buf[:stop]
    assert not buf and skip == 0
    return seen


def random_stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.random()
        if kind < 0.4:
            # DataRow whose payload looks like a ReadyForQuery: must not fool the walk
            parts.append(msg(b"D", b"Z\0\0\0\x05I" * rng.randint(0, 3) + rng.randbytes(rng.randint(0, 300))))
        elif kind < 0.6:
            parts.append(msg(b"Z", rng.choice([b"I", b"T", b"E"])))
        elif kind < 0.7:
            parts.append(msg(b"S", b"TimeZone\0UTC\0"))
        elif kind < 0.8:
            parts.append(msg(b"1", b""))  # ParseComplete: a 5-byte message
        else:
            parts.append(msg(b"C", b"SELECT 1\0"))
    return b"".join(parts)


def test_random_streams_match_reference() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        stream = random_stream(rng)
        cuts = [rng.randint(0, len(stream)) for _ in range(rng.randint(0, 8))]
        expected = [(t, b) for t, b in reference(stream) if NEED[t]]
        assert walk_in_chunks(stream, cuts, NEED, NO_TYPES) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(b"ZSDCT1"), st.binary(max_size=80)), min_size=1, max_size=20),
       st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_property_any_split(messages: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(msg(bytes([t]), b) for t, b in messages)
    expected = [(t, b) for t, b in messages if NEED[t]]
    assert walk_in_chunks(stream, cuts, NEED, NO_TYPES) == expected


def test_notify_reports_headers_before_bodies_arrive() -> None:
    notify = type_table("Q")
    stream = msg(b"Q", b"x" * 1000)
    events: list[tuple[int, int, int]] = []
    stop, skip = scan(stream[:10], 0, 10, NO_TYPES, notify, events)
    assert events == [(ord("Q"), 0, 1005)]
    assert (stop, skip) == (10, 995)


def test_bad_length_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        scan(b"Q\0\0\0\x02", 0, 5, NO_TYPES, NO_TYPES, [])
    with pytest.raises(ProtocolError):
        scan(b"Q\x7f\0\0\0", 0, 5, NO_TYPES, NO_TYPES, [], max_length=1 << 20)


@pytest.mark.skipif(not scanner.COMPILED, reason="compiled walker not built (no Cython or compiler)")
def test_compiled_walker_agrees_with_python() -> None:
    rng = random.Random(99)
    need, notify = type_table("ZSC"), type_table("TQ")
    for _ in range(3000):
        stream = bytearray(random_stream(rng))
        if rng.random() < 0.05:  # a corrupt length word somewhere
            i = rng.randrange(len(stream))
            stream[i] = rng.randrange(256)
        end = rng.randint(0, len(stream))
        results = []
        for impl in (scan_py, scan):
            events: list[tuple[int, int, int]] = []
            try:
                out: object = impl(stream, 0, end, need, notify, events, 1 << 20)
            except ProtocolError as exc:
                out = ("error", str(exc))
            results.append((out, events))
        assert results[0] == results[1]
