"""A tiny raw PostgreSQL wire-protocol client for the tests.

Why not a driver: drivers hide the exact ErrorResponse fields (psycopg gives no SQLSTATE for failed
connections), the authentication method the pooler asked for, and cannot send malformed packets.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from dataclasses import dataclass, field

from pgmux.protocol.messages import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    cstr,
    message,
    parse_data_row,
    parse_error_fields,
)
from pgmux.protocol.messages import PROTOCOL_V3 as PROTOCOL_3


@dataclass
class PgError(Exception):
    """An ErrorResponse, with its fields by one-letter code (S, V, C, M, ...)."""

    fields: dict[str, str] = field(default_factory=dict)

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str | None:
        return self.fields.get("V") or self.fields.get("S")

    def __str__(self) -> str:
        return f"{self.severity} {self.sqlstate}: {self.message}"


def startup_packet(params: dict[str, str], protocol: int = PROTOCOL_3) -> bytes:
    body = struct.pack("!i", protocol)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


class RawConn:
    """One TCP connection speaking just enough protocol for login and simple queries."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.auth_methods: list[int] = []
        self.params: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self.sasl_server_first: str | None = None  # SCRAM server-first-message (r=...,s=...,i=...)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by peer")
            buf += chunk
        return buf

    def read_message(self) -> tuple[bytes, bytes]:
        """(type byte, body); raises ConnectionError on EOF."""
        head = self._recv_exact(5)
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        return kind, self._recv_exact(length - 4)

    def login(self, user: str, database: str, password: str | None = None, **params: str) -> None:
        """Startup + md5/cleartext/SCRAM auth until ReadyForQuery; raises PgError on ErrorResponse."""
        self.send(startup_packet({"user": user, "database": database, **params}))
        scram = None
        while True:
            kind, body = self.read_message()
            if kind == b"E":
                raise PgError(parse_error_fields(body))
            if kind == b"R":
                code = struct.unpack("!i", body[:4])[0]
                if code != AUTH_OK and code not in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL):
                    self.auth_methods.append(code)
                if code == AUTH_OK:
                    continue
                if code == AUTH_CLEARTEXT:
                    self.send(message(b"p", (password or "").encode() + b"\0"))
                elif code == AUTH_MD5:
                    salt = body[4:8]
                    inner = hashlib.md5((password or "").encode() + user.encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + salt).hexdigest()
                    self.send(message(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == AUTH_SASL:
                    from scramp import ScramClient

                    mechs = [m.decode() for m in body[4:].split(b"\0") if m]
                    scram = ScramClient(mechs, user, password or "")
                    first = scram.get_client_first().encode()
                    self.send(
                        message(b"p", scram.mechanism_name.encode() + b"\0" + struct.pack("!i", len(first)) + first)
                    )
                elif code == AUTH_SASL_CONTINUE:
                    assert scram is not None
                    self.sasl_server_first = body[4:].decode()
                    scram.set_server_first(self.sasl_server_first)
                    self.send(message(b"p", scram.get_client_final().encode()))
                elif code == AUTH_SASL_FINAL:
                    assert scram is not None
                    scram.set_server_final(body[4:].decode())
                else:
                    raise AssertionError(f"unsupported auth request {code}")
            elif kind == b"S":
                k, v, _ = body.split(b"\0", 2)
                self.params[k.decode()] = v.decode()
            elif kind == b"K":
                self.backend_key = struct.unpack("!ii", body)
            elif kind == b"Z":
                return

    def simple_query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run a Query; return DataRow values as text; raises PgError (after ReadyForQuery)."""
        self.send(message(b"Q", sql.encode() + b"\0"))
        rows: list[tuple[str | None, ...]] = []
        error: PgError | None = None
        while True:
            kind, body = self.read_message()
            if kind == b"D":
                rows.append(tuple(parse_data_row(body)))
            elif kind == b"E":
                error = PgError(parse_error_fields(body))
            elif kind == b"Z":
                if error:
                    raise error
                return rows

    def read_until_close(self, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        """All messages until the peer closes (or TimeoutError on timeout)."""
        self.sock.settimeout(timeout)
        out: list[tuple[bytes, bytes]] = []
        while True:
            try:
                out.append(self.read_message())
            except (ConnectionError, OSError) as e:
                if isinstance(e, TimeoutError):
                    raise
                return out

    def terminate(self) -> None:
        try:
            self.send(message(b"X", b""))
        finally:
            self.close()


def login_error(host: str, port: int, user: str, database: str, password: str | None) -> tuple[PgError, RawConn]:
    """Log in expecting failure; returns the PgError and the (closed) connection for auth_methods."""
    conn = RawConn(host, port)
    try:
        conn.login(user, database, password)
    except PgError as e:
        conn.close()
        return e, conn
    conn.terminate()
    raise AssertionError(f"login of {user}@{database} unexpectedly succeeded")


# -------------------------------------------------------------- extended-protocol frontend messages
# (cstr and query are pgmux.protocol.messages')

SYNC = message(b"S", b"")


def parse(name: str, sql: str) -> bytes:
    return message(b"P", cstr(name) + cstr(sql) + struct.pack("!h", 0))


def bind(stmt: str, portal: str = "") -> bytes:
    return message(b"B", cstr(portal) + cstr(stmt) + struct.pack("!hhh", 0, 0, 0))


def execute(portal: str = "") -> bytes:
    return message(b"E", cstr(portal) + struct.pack("!i", 0))


def describe_portal(portal: str = "") -> bytes:
    return message(b"D", b"P" + cstr(portal))


def close_statement(name: str) -> bytes:
    return message(b"C", b"S" + cstr(name))


def read_until_z(conn: RawConn, n: int = 1, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
    """Messages up to and including the n-th ReadyForQuery."""
    conn.sock.settimeout(timeout)
    out = []
    while n:
        kind, body = conn.read_message()
        out.append((kind, body))
        if kind == b"Z":
            n -= 1
    return out


def kinds(msgs: list[tuple[bytes, bytes]]) -> str:
    """The messages' type letters, e.g. "12DCZ"."""
    return "".join(k.decode() for k, _ in msgs)
