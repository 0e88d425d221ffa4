"""The engine's C login reads the same bytes as Python's login (pgmux/engine/_login.pyx against
protocol/messages.py parse_startup_packet, auth/secrets.py md5_verify and auth/scram.py
ScramServer): the parameters of every StartupMessage Python accepts, None for every one it
refuses, the same verdict on an md5 answer, and the same SCRAM exchange (or a hand-over)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import struct

import pytest

from pgmux.auth.scram import ScramClient, ScramError, ScramServer, engine_offer
from pgmux.auth.secrets import ScramSecret, md5_inner, md5_verify, salted_password, scram_keys
from pgmux.engine import _ossl
from pgmux.engine._login import (
    ScramLogin,
    b64_decode_key_py,
    b64_encode_py,
    md5_password_ok_py,
    scram_final_py,
    scram_first_py,
    startup_params_py,
)
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


# ------------------------------------------------------------------------------------------ SCRAM
# The engine's SCRAM exchange (_login.pyx scram_first / scram_final) against Python's (ScramServer):
# on every input it either hands over (None / -1: Python's exchange decides) or answers as Python
# does, server-first-message, verdict, ClientKey and ServerSignature included.

SCRAM_PASSWORD = "pencil"
SCRAM_STORED = str(ScramSecret.from_password(SCRAM_PASSWORD, salt=b"0123456789abcdef", iterations=64))
needs_sha256 = pytest.mark.skipif(not _ossl.sha256_available(), reason="no OpenSSL SHA-256/HMAC beside _ssl")


def sasl_initial(data: bytes, mechanism: bytes = b"SCRAM-SHA-256") -> bytes:
    return mechanism + b"\0" + struct.pack("!i", len(data)) + data


def c_login() -> ScramLogin:
    offer = engine_offer(SCRAM_STORED)
    assert offer is not None
    return ScramLogin(*offer)


def python_final(s: ScramLogin, data: bytes) -> tuple[str, bytes | None, bytes | None]:
    """What Python's exchange makes of a client-final-message after the engine's server-first."""
    server = ScramServer.resumed(SCRAM_STORED, "u", s.first_bare, s.server_first, chr(s.flag))
    try:
        final = server.handle_client_final(data)
    except ScramError as exc:
        return ("wrong" if exc.wrong_password else "refused"), None, None
    return "ok", server.client_key, final


def client_final(password: str, first: bytes, server_first: bytes) -> bytes:
    """The client-final-message a client that sent `first` (gs2 header included) sends (RFC 5802)."""
    cbind = base64.b64encode(first[:3]).decode()
    nonce = server_first.split(b",")[0][2:].decode()
    salt = base64.b64decode(server_first.split(b",s=")[1].split(b",")[0])
    iterations = int(server_first.split(b",i=")[1])
    client_key, stored_key, _ = scram_keys(salted_password(password, salt, iterations))
    without_proof = f"c={cbind},r={nonce}".encode()
    signature = hmac.digest(stored_key, first[3:] + b"," + server_first + b"," + without_proof, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


def test_base64_as_python_writes_it() -> None:
    rng = random.Random(7)
    for n in range(40):
        data = rng.randbytes(n)
        assert b64_encode_py(data) == base64.b64encode(data)
    for _ in range(3000):
        key = rng.randbytes(32)
        text = bytearray(base64.b64encode(key))
        if rng.random() < 0.7:
            text[rng.randrange(44)] = rng.choice(b"+/=A\0 -_.\xff" + bytes([rng.randrange(256)]))
        decoded = b64_decode_key_py(bytes(text))
        if decoded is not None:  # (None: Python's exchange decides, which accepts more)
            assert decoded == base64.b64decode(bytes(text), validate=True)
    assert b64_decode_key_py(base64.b64encode(b"k" * 32)) == b"k" * 32


@needs_sha256
@pytest.mark.parametrize("flag", ["n", "y"])
@pytest.mark.parametrize("password", [SCRAM_PASSWORD, "wrong"])
def test_scram_exchange_as_python_runs_it(flag: str, password: str) -> None:
    client = ScramClient(password=password)
    first = client.client_first()
    if flag == "y":
        first = b"y" + first[1:]
    s = c_login()
    nonce_raw = bytes(range(18))
    server_first = scram_first_py(s, sasl_initial(first), nonce_raw)
    assert server_first is not None
    python = ScramServer(SCRAM_STORED, "u")
    python._nonce = ""  # (the server's nonce part is random in Python: compare around it)
    expected = python.handle_client_first(first).decode()
    nonce = first.split(b",r=")[1] + base64.b64encode(nonce_raw)
    assert server_first == b"r=" + nonce + b"," + expected.split(",", 1)[1].encode()
    final = client_final(password, first, server_first)
    result, key, signature = scram_final_py(s, final)
    verdict, py_key, py_final = python_final(s, final)
    assert (result, verdict) == ((1, "ok") if password == SCRAM_PASSWORD else (0, "wrong"))
    if result == 1:
        assert key == py_key and py_final == b"v=" + base64.b64encode(signature)
        _, _, server_key = scram_keys(salted_password(password, b"0123456789abcdef", 64))
        auth_message = first[3:] + b"," + server_first + b"," + final[: final.rindex(b",p=")]
        assert signature == hmac.digest(server_key, auth_message, "sha256")  # what the client checks


@needs_sha256
def test_scram_mutated_messages_hand_over_or_agree() -> None:
    """Random edits of both messages: the engine hands over (Python's exchange then answers with
    its own words) or reaches Python's verdict."""
    rng = random.Random(11)
    mutations = b",=\0 rnpcy\x7f\x80biwsSCRAM-SHA-2561"
    for _ in range(2000):
        client = ScramClient(password=SCRAM_PASSWORD)
        first = bytearray(client.client_first())
        body = bytearray(sasl_initial(bytes(first)))
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] = rng.choice(mutations)
        s = c_login()
        server_first = scram_first_py(s, bytes(body), rng.randbytes(18))
        if server_first is None:
            continue
        # Accepted: Python's reader takes the same message, mechanism and all.
        mech, data = m.parse_sasl_initial_response(bytes(body))
        assert mech == "SCRAM-SHA-256"
        ScramServer(SCRAM_STORED, "u").handle_client_first(data)
        assert s.first_bare == data[3:]
        final = bytearray(client_final(SCRAM_PASSWORD, data, server_first))
        if rng.random() < 0.7:
            for _ in range(rng.randint(1, 3)):
                final[rng.randrange(len(final))] = rng.choice(mutations + b"+/A")
        result, key, signature = scram_final_py(s, bytes(final))
        if result == -1:
            continue
        verdict, py_key, py_final = python_final(s, bytes(final))
        assert verdict == ("ok" if result == 1 else "wrong"), (bytes(body), bytes(final))
        if result == 1:
            assert key == py_key and py_final == b"v=" + base64.b64encode(signature)
