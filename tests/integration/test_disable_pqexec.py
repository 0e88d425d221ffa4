"""disable_pqexec = 1: simple-protocol Query messages are refused, the extended protocol works."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from helpers_tx import raw_login, send_query
from pgwire import message, parse_error_fields

from pgmux.testing.cluster import PoolerProcess

pytestmark = [pytest.mark.integration]


def test_disable_pqexec(pooler: Callable[..., PoolerProcess]) -> None:
    p = pooler(pool_mode="transaction", extra={"disable_pqexec": 1})
    a = raw_login(p)
    a.send(message(b"P", b"\0SELECT 41 + 1\0" + struct.pack("!h", 0))
           + message(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
           + message(b"E", b"\0" + struct.pack("!i", 0)) + message(b"S", b""))
    got = []
    while not got or got[-1][0] != b"Z":
        got.append(a.read_message())
    assert [b for k, b in got if k == b"D"] == [b"\x00\x01\x00\x00\x00\x0242"]
    send_query(a, "SELECT 1")
    msgs = a.read_until_close(5.0)
    errs = [parse_error_fields(b) for k, b in msgs if k == b"E"]
    assert [(e.get("S"), e.get("M")) for e in errs] == [("FATAL", "PQexec disallowed")]
