"""SCRAM-SHA-256 exchanges as sans-I/O state objects: ``ScramServer`` faces clients, ``ScramClient`` logs in to
PostgreSQL. Payloads in and out are the SASL data inside the Authentication*/SASL* messages; framing is done
elsewhere.

Both sides are our own code over hashlib/hmac, with scramp as the test oracle. scramp's server was the plan, but
it cannot serve real clients: it rejects libpq's ``n,,n=,r=...`` (empty user name, which PostgreSQL expects and
ignores), refuses secrets with fewer than 4096 iterations (PostgreSQL 16's ``scram_iterations`` allows 1) or
salts under 12 bytes, and does not expose ClientKey, which pass-through needs.

Message handling follows PostgreSQL/PgBouncer (``src/scram.c``): gs2 flags ``n`` and ``y`` are accepted, ``p=``
(channel binding) is refused since only SCRAM-SHA-256 is advertised, authzid and mandatory extensions are
refused, optional extensions are ignored, the user name in client-first is ignored (the startup packet's user
counts).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from pgmux.auth.secrets import (
    SCRAM_DEFAULT_ITERATIONS,
    SCRAM_DEFAULT_SALT_LEN,
    SCRAM_KEY_LEN,
    BoundedLRU,
    ScramSecret,
    SecretKind,
    parse_scram_secret,
    salted_password,
    scram_keys,
    secret_kind,
)

__all__ = ["ScramClient", "ScramError", "ScramSecret", "ScramServer"]

_NONCE_RAW_LEN = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
_CBIND_BY_FLAG = {"n": "biws", "y": "eSws"}  # base64 of "n,," and "y,,"


class ScramError(Exception):
    """A SCRAM exchange failed. ``wrong_password`` tells a bad proof (the client gets "password authentication
    failed") from a malformed or refused message (a protocol violation)."""

    def __init__(self, message: str, *, wrong_password: bool = False) -> None:
        super().__init__(message)
        self.wrong_password = wrong_password


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")  # (OpenSSL's one-shot HMAC: no HMAC object per call)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError(f"malformed SCRAM message (invalid base64 in {what})") from None


def _new_nonce() -> str:
    return _b64(os.urandom(_NONCE_RAW_LEN))


def _text(data: bytes | bytearray | memoryview, what: str) -> str:
    """Bytes to str, reversibly (``surrogateescape``), so AuthMessage can be rebuilt byte for byte."""
    text = bytes(data).decode("utf-8", "surrogateescape")
    if "\0" in text:
        raise ScramError(f"malformed SCRAM message (NUL byte in {what})")
    return text


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """``"a=1,b=2"`` -> ``[("a", "1"), ("b", "2")]``; each attribute is one ASCII letter, ``=``, a value."""
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not (part[0].isascii() and part[0].isalpha()):
            raise ScramError(f"malformed SCRAM message (attribute expected in {what})")
        attrs.append((part[0], part[2:]))
    return attrs


def _is_printable(nonce: str) -> bool:
    """RFC 5802 ``printable``: %x21-7E except ','. (ASCII isprintable() is %x20-7E.)"""
    return bool(nonce) and nonce.isascii() and nonce.isprintable() and " " not in nonce and "," not in nonce


def _escape_username(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


# Ad-hoc secrets for plaintext passwords, per (user, password, iterations): like PgBouncer's per-user cache, a
# user's salt stays put and PBKDF2 runs once, not at every login.
_ADHOC_SECRETS: BoundedLRU[tuple[str, str, int], ScramSecret] = BoundedLRU(maxsize=1024)
# Per-process key for mock salts: stable for one user name, unpredictable across processes (PgBouncer's
# scram_mock_salt), so probing for user names sees the same salt each time.
_MOCK_NONCE = os.urandom(32)


def _adhoc_secret(user: str, password: str, iterations: int) -> ScramSecret:
    key = (user, password, iterations)
    secret = _ADHOC_SECRETS.get(key)
    if secret is None:
        secret = ScramSecret.from_password(password, iterations=iterations)
        _ADHOC_SECRETS.put(key, secret)
    return secret


def engine_offer(stored: str) -> tuple[bytes, bytes, bytes] | None:
    """What the engine's C exchange needs for a stored SCRAM secret (StoredKey, ServerKey, and the
    ",s=<salt>,i=<iterations>" that ends its server-first-message); None: not a SCRAM secret."""
    secret = parse_scram_secret(stored)
    if secret is None:
        return None
    return secret.stored_key, secret.server_key, _wire(f",s={_b64(secret.salt)},i={secret.iterations}")


def _mock_secret(user: str, iterations: int) -> ScramSecret:
    salt = hashlib.sha256(_wire(user) + _MOCK_NONCE).digest()[:SCRAM_DEFAULT_SALT_LEN]
    return ScramSecret(iterations, salt, os.urandom(SCRAM_KEY_LEN), os.urandom(SCRAM_KEY_LEN))


class ScramServer:
    """Client-facing SCRAM-SHA-256 exchange (we are the server).

    ``stored`` is the user's SCRAM secret, or a plaintext password (an ad-hoc secret is derived once per user
    and password, as PgBouncer's ``scram_adhoc``). An md5 secret cannot do SCRAM: ``ScramError``. An empty
    ``stored`` behaves like ``mock()``. After ``handle_client_final`` succeeds, ``client_key`` holds the
    client's ClientKey (ClientProof XOR ClientSignature) for logging in to the server in pass-through.
    """

    def __init__(self, stored: str, user: str, *, iterations: int = SCRAM_DEFAULT_ITERATIONS) -> None:
        self.user = user
        self.client_key: bytes | None = None
        self._mock = not stored
        self._state = "client-first"
        self._cbind_flag = ""
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        if self._mock:
            self.secret = _mock_secret(user, iterations)
            return
        kind = secret_kind(stored)
        if kind is SecretKind.MD5:
            raise ScramError("cannot do SCRAM authentication: the stored secret is an md5 hash")
        if kind is SecretKind.SCRAM:
            secret = parse_scram_secret(stored)
            assert secret is not None
            self.secret = secret
        else:
            self.secret = _adhoc_secret(user, stored, iterations)

    @classmethod
    def resumed(cls, stored: str, user: str, client_first_bare: bytes, server_first: bytes, flag: str) -> ScramServer:
        """The exchange after a server-first-message someone else sent (the engine's C exchange,
        pgmux/engine/_login.pyx), against the stored SCRAM secret it was made from: next comes
        handle_client_final."""
        server = cls(stored, user)
        server._cbind_flag = flag
        server._client_first_bare = _text(client_first_bare, "client-first-message")
        server._server_first = _text(server_first, "server-first-message")
        server._nonce = server._server_first.split(",", 1)[0][2:]
        server._state = "client-final"
        return server

    @classmethod
    def mock(cls, user: str, *, iterations: int = SCRAM_DEFAULT_ITERATIONS) -> ScramServer:
        """An exchange for an unknown user that looks like a real one and always fails as a wrong password."""
        return cls("", user, iterations=iterations)

    def _fail(self, message: str, *, wrong_password: bool = False) -> ScramError:
        self._state = "failed"
        return ScramError(message, wrong_password=wrong_password)

    def _expect(self, state: str) -> None:
        if self._state != state:
            raise self._fail(f"SCRAM message out of order (expected {state}, state is {self._state})")

    def handle_client_first(self, data: bytes) -> bytes:
        """SASLInitialResponse data -> AuthenticationSASLContinue data (server-first-message)."""
        self._expect("client-first")
        text = _text(data, "client-first-message")
        flag, sep, rest = text.partition(",")
        if flag.startswith("p"):
            raise self._fail("client requires SCRAM channel binding, but it is not supported")
        if flag not in _CBIND_BY_FLAG or not sep:
            raise self._fail("malformed SCRAM message (unexpected channel-binding flag)")
        authzid, sep, bare = rest.partition(",")
        if authzid.startswith("a="):
            raise self._fail("client uses authorization identity, but it is not supported")
        if authzid or not sep:
            raise self._fail("malformed SCRAM message (unexpected attribute in client-first-message)")
        if bare.startswith("m="):
            raise self._fail("client requires an unsupported SCRAM extension")
        attrs = _attributes(bare, "client-first-message")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise self._fail("malformed SCRAM message (expected n= and r= in client-first-message)")
        client_nonce = attrs[1][1]
        if not _is_printable(client_nonce):
            raise self._fail("non-printable characters in SCRAM nonce")
        # attrs[0] is the user name: ignored, the startup packet's user is the one that counts.
        self._cbind_flag = flag
        self._client_first_bare = bare
        self._nonce = client_nonce + _new_nonce()
        self._server_first = f"r={self._nonce},s={_b64(self.secret.salt)},i={self.secret.iterations}"
        self._state = "client-final"
        return _wire(self._server_first)

    def handle_client_final(self, data: bytes) -> bytes:
        """SASLResponse data -> AuthenticationSASLFinal data (``v=<ServerSignature>``).

        A wrong proof raises ``ScramError`` with ``wrong_password=True``.
        """
        self._expect("client-final")
        text = _text(data, "client-final-message")
        attrs = _attributes(text, "client-final-message")
        if len(attrs) < 3 or attrs[0][0] != "c" or attrs[1][0] != "r" or attrs[-1][0] != "p":
            raise self._fail("malformed SCRAM message (expected c=, r=, ..., p= in client-final-message)")
        if attrs[0][1] != _CBIND_BY_FLAG[self._cbind_flag]:
            raise self._fail("unexpected SCRAM channel-binding attribute in client-final-message")
        if not hmac.compare_digest(_wire(attrs[1][1]), _wire(self._nonce)):
            raise self._fail("invalid SCRAM response (nonce does not match)")
        proof = _b64decode(attrs[-1][1], "proof")
        if len(proof) != SCRAM_KEY_LEN:
            raise self._fail("malformed SCRAM message (malformed proof in client-final-message)")
        without_proof = text[: text.rindex(",p=")]
        auth_message = _wire(f"{self._client_first_bare},{self._server_first},{without_proof}")

        client_key = _xor(proof, _hmac(self.secret.stored_key, auth_message))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), self.secret.stored_key)
        if self._mock or not ok:
            raise self._fail(f'password authentication failed for user "{self.user}"', wrong_password=True)
        self.client_key = client_key
        self._state = "done"
        return _wire("v=" + _b64(_hmac(self.secret.server_key, auth_message)))


class ScramClient:
    """Our SCRAM-SHA-256 login to PostgreSQL (we are the client).

    Either ``password`` (plaintext; SaltedPassword comes from the memo, so PBKDF2 runs once per password, salt
    and iteration count per process), or pass-through keys: ``client_key`` (recovered by ``ScramServer``)
    with ``server_key`` or the ``secret`` it came from. With ``secret``, the server's salt and iteration count
    must equal the secret's: otherwise the keys cannot be right and ``client_final`` raises before sending.
    ``username`` defaults to empty like libpq; PostgreSQL ignores it.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        secret: ScramSecret | None = None,
        username: str = "",
    ) -> None:
        if password is not None and client_key is not None:
            raise ValueError("give either a password or pass-through keys, not both")
        if password is None and client_key is None:
            if secret is not None:
                raise ScramError("cannot do SCRAM authentication: password is SCRAM secret but client "
                                 "authentication did not provide SCRAM keys")
            raise ValueError("a password or pass-through keys (client_key and server_key or secret) are needed")
        if client_key is not None:
            if len(client_key) != SCRAM_KEY_LEN:
                raise ValueError(f"client_key must be {SCRAM_KEY_LEN} bytes")
            if secret is not None:
                if server_key is not None and not hmac.compare_digest(server_key, secret.server_key):
                    raise ValueError("server_key does not belong to secret")
                server_key = secret.server_key
                if not secret.has_client_key(client_key):
                    raise ScramError("cannot do SCRAM authentication: the client's SCRAM keys do not match "
                                     "the stored SCRAM secret")
            if server_key is None or len(server_key) != SCRAM_KEY_LEN:
                raise ValueError(f"pass-through needs server_key ({SCRAM_KEY_LEN} bytes) or secret")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._secret = secret
        self._username = username
        self._state = "client-first"
        self._client_nonce = ""
        self._client_first_bare = ""
        self._server_signature = b""

    def _fail(self, message: str) -> ScramError:
        self._state = "failed"
        return ScramError(message)

    def _expect(self, state: str) -> None:
        if self._state != state:
            raise self._fail(f"SCRAM step out of order (expected {state}, state is {self._state})")

    def client_first(self) -> bytes:
        """SASLInitialResponse data: ``n,,n=,r=<nonce>``."""
        self._expect("client-first")
        self._client_nonce = _new_nonce()
        self._client_first_bare = f"n={_escape_username(self._username)},r={self._client_nonce}"
        self._state = "server-first"
        return _wire("n,," + self._client_first_bare)

    def client_final(self, server_first: bytes) -> bytes:
        """AuthenticationSASLContinue data -> SASLResponse data (``c=biws,r=<nonce>,p=<proof>``)."""
        self._expect("server-first")
        text = _text(server_first, "server-first-message")
        if text.startswith("e="):
            raise self._fail(f"error received from server in SCRAM exchange: {text[2:]}")
        attrs = _attributes(text, "server-first-message")
        if [name for name, _ in attrs] != ["r", "s", "i"]:
            raise self._fail("malformed SCRAM message (expected r=, s=, i= in server-first-message)")
        nonce, salt_text, iter_text = (value for _, value in attrs)
        if not nonce.startswith(self._client_nonce) or len(nonce) <= len(self._client_nonce):
            raise self._fail("invalid SCRAM response (nonce mismatch)")
        if not _is_printable(nonce):
            raise self._fail("non-printable characters in SCRAM nonce")
        salt = _b64decode(salt_text, "salt")
        if not salt:
            raise self._fail("malformed SCRAM message (empty salt)")
        if not (iter_text.isascii() and iter_text.isdigit()) or not 1 <= int(iter_text) < 2**31:
            raise self._fail("malformed SCRAM message (invalid iteration count)")
        iterations = int(iter_text)

        if self._client_key is not None:
            client_key, server_key = self._client_key, self._server_key
            assert server_key is not None
            secret = self._secret
            if secret is not None and (secret.iterations != iterations or
                                       not hmac.compare_digest(secret.salt, salt)):
                raise self._fail("cannot do SCRAM pass-through: the server's salt or iteration count differs "
                                 "from the stored SCRAM secret (the secrets must be identical on both sides)")
        else:
            assert self._password is not None
            client_key, _, server_key = scram_keys(salted_password(self._password, salt, iterations))

        without_proof = f"c=biws,r={nonce}"
        auth_message = _wire(f"{self._client_first_bare},{text},{without_proof}")
        proof = _xor(client_key, _hmac(hashlib.sha256(client_key).digest(), auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "server-final"
        return _wire(f"{without_proof},p={_b64(proof)}")

    def verify_server_final(self, server_final: bytes) -> None:
        """Check AuthenticationSASLFinal data: the server must prove it knows the secret too."""
        self._expect("server-final")
        text = _text(server_final, "server-final-message")
        if text.startswith("e="):
            raise self._fail(f"error received from server in SCRAM exchange: {text[2:]}")
        attrs = _attributes(text, "server-final-message")
        if len(attrs) != 1 or attrs[0][0] != "v":
            raise self._fail("malformed SCRAM message (expected v= in server-final-message)")
        signature = _b64decode(attrs[0][1], "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise self._fail("invalid SCRAM server signature: the server does not know the password")
        self._state = "done"
