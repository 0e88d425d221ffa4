"""Stored secrets: what kind a secret is, md5 hashing, SCRAM secrets and key derivation, password checks.

A secret comes from the auth_file, ``[databases] password=`` or auth_query, and is one of:
plaintext, ``md5`` + md5(password || user), or ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``.
Classification follows PgBouncer's ``get_password_type`` (and PostgreSQL's): md5 needs exactly 32 *lower-case*
hex digits, and a SCRAM secret must parse completely; anything else is plaintext.

Strings are turned into bytes as UTF-8 with ``surrogateescape``, so a secret loaded from a file that is not
UTF-8 hashes over the file's exact bytes. Every comparison of secret material is ``hmac.compare_digest``.

``ScramSecret`` lives here, not in ``scram.py``, because plaintext checks need it and ``scram.py`` needs the
classification: this module is the lower layer, ``scram.py`` re-exports the class.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from scramp import ScramException
from scramp.utils import saslprep

_RANDOM_CHUNK = 4096
_random = bytearray()


def random_bytes(n: int) -> bytes:
    """n bytes from the operating system's CSPRNG, drawn from a 4 KiB chunk: md5 salts and cancel
    keys are needed at every login, and one getrandom() system call per 4 KiB instead of two per
    login is visible under pgbench -C. Bytes are used once and then dropped."""
    global _random
    if n <= 0:
        return b""
    if len(_random) < n:
        _random = bytearray(os.urandom(max(_RANDOM_CHUNK, n)))
    out = bytes(_random[-n:])
    del _random[-n:]
    return out


def _forget_random() -> None:
    """A forked worker must not reuse its parent's unused random bytes."""
    _random.clear()


os.register_at_fork(after_in_child=_forget_random)

__all__ = [
    "SCRAM_DEFAULT_ITERATIONS",
    "SCRAM_KEY_LEN",
    "CacheStats",
    "ScramSecret",
    "SecretKind",
    "clear_salted_password_cache",
    "forget_secret_classifications",
    "md5_client_response",
    "md5_secret",
    "md5_verify",
    "plain_verify",
    "prepare_password",
    "salted_password",
    "salted_password_cache_stats",
    "scram_keys",
    "secret_kind",
]

SCRAM_KEY_LEN = 32  # SHA-256
SCRAM_DEFAULT_ITERATIONS = 4096  # PostgreSQL's and PgBouncer's default (scram_iterations)
SCRAM_DEFAULT_SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_SCRAM_PREFIX = "SCRAM-SHA-256$"
_MD5_LEN = 35
_MD5_HEX = frozenset("0123456789abcdef")  # PostgreSQL's MD5_PASSWD_CHARSET: lower case only
_INT_MAX = 2**31 - 1


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class SecretKind(enum.Enum):
    PLAIN = "plain"
    MD5 = "md5"
    SCRAM = "scram-sha-256"


def _is_md5_secret(secret: str) -> bool:
    return len(secret) == _MD5_LEN and secret.startswith("md5") and all(c in _MD5_HEX for c in secret[3:])


@functools.lru_cache(maxsize=4096)
def secret_kind(secret: str) -> SecretKind:
    """Classify like PgBouncer: a malformed ``SCRAM-SHA-256$...`` string is a plaintext password.
    Cached: every md5 login asks it three times about the same auth_file secret."""
    if _is_md5_secret(secret):
        return SecretKind.MD5
    if ScramSecret.parse(secret) is not None:
        return SecretKind.SCRAM
    return SecretKind.PLAIN


# ---------------------------------------------------------------------------------------------------- md5

def md5_secret(password: str, user: str) -> str:
    """``pg_authid.rolpassword`` for ``password_encryption = md5``."""
    return "md5" + hashlib.md5(_utf8(password) + _utf8(user)).hexdigest()


def md5_client_response(secret: str, user: str, salt: bytes) -> str:
    """The PasswordMessage that answers AuthenticationMD5Password(``salt``).

    ``secret`` may be plaintext or an md5 secret (the md5 secret is password-equivalent here, which is why
    PgBouncer can log in to the server with it). A SCRAM secret cannot answer md5: ``ValueError``.
    """
    return "md5" + hashlib.md5(md5_inner(secret, user) + bytes(salt)).hexdigest()


@functools.lru_cache(maxsize=4096)
def md5_inner(secret: str, user: str) -> bytes:
    """The salted half of an md5 answer: md5(password || user) in hex, from either kind of secret."""
    kind = secret_kind(secret)
    if kind is SecretKind.SCRAM:
        raise ValueError("cannot answer an MD5 challenge with a SCRAM secret (wrong password type)")
    return (secret[3:] if kind is SecretKind.MD5 else md5_secret(secret, user)[3:]).encode("ascii")


def md5_verify(stored: str, user: str, salt: bytes, response: str) -> bool:
    """Check a client's md5 answer against a plaintext or md5 ``stored`` secret.

    Empty stored secrets or answers never match (PgBouncer's "disallow empty passwords"); a SCRAM secret
    cannot verify md5 (PgBouncer switches such users to SCRAM before it gets here).
    """
    if not stored or not response or secret_kind(stored) is SecretKind.SCRAM:
        return False
    expected = md5_client_response(stored, user, salt)
    return hmac.compare_digest(expected.encode("ascii"), _utf8(response))


def plain_verify(stored: str, user: str, password: str) -> bool:
    """Check a cleartext password (auth_type=plain, or PasswordMessage after AuthenticationCleartextPassword).

    A SCRAM secret is checked by deriving the keys from ``password`` with its salt and iterations (one PBKDF2
    run; a match is remembered, so repeated logins with the right password cost nothing).
    """
    if not stored or not password:
        return False
    kind = secret_kind(stored)
    if kind is SecretKind.PLAIN:
        return hmac.compare_digest(_utf8(stored), _utf8(password))
    if kind is SecretKind.MD5:
        return hmac.compare_digest(stored.encode("ascii"), md5_secret(password, user).encode("ascii"))
    secret = ScramSecret.parse(stored)
    assert secret is not None
    return secret.matches_password(password)


# ------------------------------------------------------------------------------------------- SCRAM keys

def prepare_password(password: str) -> bytes:
    """SASLprep ``password`` the way PostgreSQL's ``pg_saslprep`` callers do.

    ASCII is used as it is; otherwise SASLprep (RFC 4013) applies, and if it refuses the string (prohibited
    characters, or bytes that were not UTF-8) the raw bytes are used, as PostgreSQL and libpq do.
    """
    if password.isascii():
        return password.encode("ascii")
    try:
        return _utf8(saslprep(password))
    except ScramException:
        return _utf8(password)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def scram_keys(salted: bytes) -> tuple[bytes, bytes, bytes]:
    """``(ClientKey, StoredKey, ServerKey)`` from a SaltedPassword (RFC 5802)."""
    client_key = _hmac(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CacheStats(NamedTuple):
    hits: int
    misses: int
    size: int
    maxsize: int


class BoundedLRU(Generic[K, V]):
    """A small bounded LRU with hit counters; a lock because PBKDF2 callers may run in worker threads."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, len(self._data), self.maxsize)


# SaltedPassword per (password, salt, iterations). PBKDF2 with 4096 rounds takes ~1.3 ms of event-loop time;
# a pool opens server connections with the same password and salt over and over, so derive once.
_SALTED_PASSWORDS: BoundedLRU[tuple[str, bytes, int], bytes] = BoundedLRU(maxsize=1024)


def _derive_salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """SCRAM SaltedPassword = PBKDF2-HMAC-SHA-256(SASLprep(password), salt, iterations), memoised (bounded LRU)."""
    key = (password, bytes(salt), iterations)
    salted = _SALTED_PASSWORDS.get(key)
    if salted is None:
        salted = _derive_salted_password(password, key[1], iterations)
        _SALTED_PASSWORDS.put(key, salted)
    return salted


def salted_password_cache_stats() -> CacheStats:
    return _SALTED_PASSWORDS.stats()


def clear_salted_password_cache() -> None:
    _SALTED_PASSWORDS.clear()


@functools.lru_cache(maxsize=1024)
def parse_scram_secret(text: str) -> ScramSecret | None:
    """ScramSecret.parse, cached (a SCRAM login against a stored secret needs it each time; a
    ScramSecret is immutable, so logins share it)."""
    return ScramSecret.parse(text)


def forget_secret_classifications() -> None:
    """Empty the caches of secret_kind, parsed SCRAM secrets and the md5 inner hash (on RELOAD:
    a removed user's password should not stay in them)."""
    secret_kind.cache_clear()
    parse_scram_secret.cache_clear()
    md5_inner.cache_clear()


def _b64decode_strict(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True, repr=False)
class ScramSecret:
    """A parsed ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` secret (what ``pg_authid`` stores)."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or not 1 <= self.iterations <= _INT_MAX:
            raise ValueError("SCRAM iteration count must be an int between 1 and 2**31-1")
        if not self.salt:
            raise ValueError("SCRAM salt must not be empty")
        if len(self.stored_key) != SCRAM_KEY_LEN or len(self.server_key) != SCRAM_KEY_LEN:
            raise ValueError(f"SCRAM StoredKey and ServerKey must be {SCRAM_KEY_LEN} bytes")

    @classmethod
    def parse(cls, text: str) -> ScramSecret | None:
        """Parse the text form; ``None`` if it is not a well-formed SCRAM-SHA-256 secret."""
        if not text.startswith(_SCRAM_PREFIX):
            return None
        try:
            iter_salt, keys = text[len(_SCRAM_PREFIX):].split("$")
            iter_text, salt_text = iter_salt.split(":")
            stored_text, server_text = keys.split(":")
        except ValueError:
            return None
        if not (iter_text.isascii() and iter_text.isdigit()) or len(iter_text) > 10:
            return None
        salt = _b64decode_strict(salt_text)
        stored_key = _b64decode_strict(stored_text)
        server_key = _b64decode_strict(server_text)
        if salt is None or stored_key is None or server_key is None:
            return None
        try:
            return cls(int(iter_text), salt, stored_key, server_key)
        except ValueError:
            return None

    @classmethod
    def from_salted_password(cls, salted: bytes, salt: bytes, iterations: int) -> ScramSecret:
        _, stored_key, server_key = scram_keys(salted)
        return cls(iterations, bytes(salt), stored_key, server_key)

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = SCRAM_DEFAULT_ITERATIONS
    ) -> ScramSecret:
        """What ``password_encryption = scram-sha-256`` would store (a fresh 16-byte salt unless given)."""
        if salt is None:
            salt = os.urandom(SCRAM_DEFAULT_SALT_LEN)
        return cls.from_salted_password(_derive_salted_password(password, salt, iterations), salt, iterations)

    def has_client_key(self, client_key: bytes) -> bool:
        """Whether ``client_key`` (recovered from a client's SCRAM proof) belongs to this secret."""
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key)

    def matches_password(self, password: str) -> bool:
        """Whether ``password`` produces this secret; only a match is memoised, so guesses cannot fill the memo."""
        key = (password, self.salt, self.iterations)
        salted = _SALTED_PASSWORDS.get(key)
        remember = salted is None
        if salted is None:
            salted = _derive_salted_password(password, self.salt, self.iterations)
        _, stored_key, server_key = scram_keys(salted)
        ok = hmac.compare_digest(stored_key + server_key, self.stored_key + self.server_key)
        if ok and remember:
            _SALTED_PASSWORDS.put(key, salted)
        return ok

    def __str__(self) -> str:
        b64 = base64.b64encode
        return (f"{_SCRAM_PREFIX}{self.iterations}:{b64(self.salt).decode()}"
                f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}")

    def __repr__(self) -> str:
        # The keys are what a server needs to impersonate PostgreSQL to clients: keep them out of logs.
        return f"ScramSecret(iterations={self.iterations}, salt={base64.b64encode(self.salt).decode()!r}, keys=...)"
