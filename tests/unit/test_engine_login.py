"""The engine's C login reads the same bytes as Python's login (pgmux/engine/_login.pyx against
protocol/messages.py parse_startup_packet and auth/secrets.py md5_verify): the parameters of
every StartupMessage Python accepts, None for every one it refuses, and the same verdict on an
md5 answer."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from pgmux.auth.secrets import md5_inner, md5_verify
from pgmux.engine import _ossl
from pgmux.engine._login import md5_password_ok_py, startup_params_py
from pgmux.protocol import messages as m

PROTOCOL_3 = 196608


def python_params(body: bytes) -> dict[str, str] | None:
    packet = struct.pack("!II", 8 + len(body), PROTOCOL_3) + body
    try:
        return m.parse_startup_packet(packet).params
    except m.ProtocolError:
        return None


EDGES = [
    b"", b"\0", b"\0\0", b"user\0bob\0\0", b"user\0bob\0", b"user\0bob", b"user\0\0", b"user\0bob\0database\0",
    b"user\0bob\0user\0eve\0\0", b"\0\0\0", b"a\0b\0c\0d\0\0", b"a\0\0\0", b"\xff\0x\0\0", b"x\0\xc3\xa9\0\0",
    b"x\0\xc3\0\0", b"application_name\0\0\0", b"options\0-c a=b --c=d\0\0",
]


@pytest.mark.parametrize("body", EDGES)
def test_startup_params_as_python_reads_them(body: bytes) -> None:
    assert startup_params_py(body) == python_params(body)


def test_startup_params_random_bodies() -> None:
    rng = random.Random(1234)
    alphabet = [b"\0", b"\0", b"a", b"user", b"bob", b"\xc3\xa9", b"\xff", b"\xc3", b"=", b" "]
    for _ in range(20000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        assert startup_params_py(body) == python_params(body), body


def md5_answer(inner: bytes, salt: bytes) -> bytes:
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\0"


@pytest.mark.skipif(not _ossl.md5_available(), reason="no MD5 in this OpenSSL")
@pytest.mark.parametrize("stored", ["secret", "md5" + hashlib.md5(b"secretbob").hexdigest()])
def test_md5_answer_as_md5_verify_judges_it(stored: str) -> None:
    salt = bytes([1, 2, 3, 250])
    inner = md5_inner(stored, "bob")
    right = md5_answer(inner, salt)
    answers = [right, right[:-1], right + b"\0\0", right.upper(), right[:-2] + b"0\0", b"md5\0", b"\0", b"",
               md5_answer(inner, b"\0\0\0\0"), b"md6" + right[3:], right[:-1] + b"x\0"]
    for answer in answers:
        expected = md5_verify(stored, "bob", salt, answer.rstrip(b"\0").decode("utf-8", "replace"))
        assert md5_password_ok_py(inner, salt, answer) == int(expected), answer
