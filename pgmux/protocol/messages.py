"""Builders and parsers for PostgreSQL v3 wire messages.

Pure functions over bytes: nothing here touches a socket, so every edge case is a unit test.
Only the messages a pooler constructs or must read are covered; everything else is forwarded
untouched by the data path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pgmux.errors import ProtocolError

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_II = struct.Struct("!ii")

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Backend message types (bytes values as ints, to compare against buffer indexing).
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
COMMAND_COMPLETE = ord("C")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
DATA_ROW = ord("D")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

# Frontend message types.
QUERY = ord("Q")
SYNC = ord("S")
TERMINATE = ord("X")
FUNCTION_CALL = ord("F")
FLUSH = ord("H")
PARSE = ord("P")
BIND = ord("B")
EXECUTE = ord("E")
DESCRIBE = ord("D")
CLOSE = ord("C")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
PASSWORD = ord("p")

# Authentication request codes.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def message(typ: bytes, payload: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (including itself), payload."""
    return typ + _I32.pack(len(payload) + 4) + payload


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


# ---------------------------------------------------------------- backend messages we build


def error_response(
    message_text: str,
    sqlstate: str = "08P01",
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """ErrorResponse with severity (localised and not), SQLSTATE and message, as PostgreSQL sends."""
    fields = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(sqlstate), b"M", cstr(message_text)]
    if detail:
        fields += [b"D", cstr(detail)]
    if hint:
        fields += [b"H", cstr(hint)]
    return message(b"E", b"".join(fields) + b"\0")


def notice_response(message_text: str, sqlstate: str = "00000", detail: str | None = None) -> bytes:
    fields = [b"S", cstr("NOTICE"), b"V", cstr("NOTICE"), b"C", cstr(sqlstate), b"M", cstr(message_text)]
    if detail:
        fields += [b"D", cstr(detail)]
    return message(b"N", b"".join(fields) + b"\0")


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


def auth_ok() -> bytes:
    return auth_request(AUTH_OK)


AUTHENTICATION_OK = auth_ok()
# BackendKeyData without its 8 key bytes (process id and secret key as pgmux draws them)
BACKEND_KEY_DATA_HEAD = b"K" + _I32.pack(12)


def auth_md5(salt: bytes) -> bytes:
    return auth_request(AUTH_MD5, salt)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", _II.pack(pid, key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


READY_FOR_QUERY_IDLE = ready_for_query(b"I")


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def row_description(columns: list[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    parts = [_I16.pack(len(columns))]
    for name, oid in columns:
        parts.append(cstr(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: list[str | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            b = v.encode()
            parts.append(_I32.pack(len(b)) + b)
    return message(b"D", b"".join(parts))


# ---------------------------------------------------------------- frontend messages we build


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _II.pack(8, SSL_REQUEST_CODE)


def cancel_request(pid: int, key: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _II.pack(pid, key)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def extended_query(sql: str, params: list[str]) -> bytes:
    """Parse + Bind (text parameters) + Execute + Sync with the unnamed statement and portal."""
    parse = message(b"P", b"\0" + cstr(sql) + _I16.pack(0))
    values = b"".join(_I32.pack(len(v.encode())) + v.encode() for v in params)
    bind = message(b"B", b"\0\0" + _I16.pack(0) + _I16.pack(len(params)) + values + _I16.pack(0))
    return parse + bind + message(b"E", b"\0" + _I32.pack(0)) + message(b"S")


def terminate() -> bytes:
    return message(b"X")


# ---------------------------------------------------------------- parsers


@dataclass
class StartupPacket:
    """An untyped first packet: startup, SSL/GSS request or cancel request."""

    code: int
    params: dict[str, str] = field(default_factory=dict)
    cancel_pid: int = 0
    cancel_key: int = 0

    @property
    def is_ssl_request(self) -> bool:
        return self.code == SSL_REQUEST_CODE

    @property
    def is_gssenc_request(self) -> bool:
        return self.code == GSSENC_REQUEST_CODE

    @property
    def is_cancel(self) -> bool:
        return self.code == CANCEL_REQUEST_CODE


# PgBouncer reads an untyped packet's length as 16 bits after two zero bytes (proto.c get_header),
# and since 1.25 takes one longer than pkt_buf into a dynamic buffer: up to 64 KiB, where
# PostgreSQL's own MAX_STARTUP_PACKET_LENGTH is 10000.
MAX_STARTUP_PACKET = 0xFFFF


def startup_packet_length(head: bytes | bytearray | memoryview, limit: int = MAX_STARTUP_PACKET) -> int:
    """Total length of the untyped packet starting at head[0:4]; raises ProtocolError when absurd
    or over `limit` (MAX_STARTUP_PACKET, or max_packet_size when smaller)."""
    (length,) = _I32.unpack_from(head, 0)
    if length < 8 or length > min(limit, MAX_STARTUP_PACKET):
        raise ProtocolError(f"bad packet header: '{bytes(head[:8]).hex()}'")
    return length


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Parse a whole untyped packet (length word included)."""
    if len(packet) < 8:
        raise ProtocolError("bad packet header")
    (code,) = _I32.unpack_from(packet, 4)
    if code == CANCEL_REQUEST_CODE:
        if len(packet) != 16:
            raise ProtocolError("bad cancel request")
        pid, key = _II.unpack_from(packet, 8)
        return StartupPacket(code, cancel_pid=pid, cancel_key=key)
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if len(packet) != 8:
            raise ProtocolError("bad packet header")
        return StartupPacket(code)
    major = code >> 16
    if major < 3:
        raise ProtocolError("old V2 protocol not supported")
    if major != 3:
        raise ProtocolError("unsupported protocol version")
    raw = packet[8:]
    if not raw.endswith(b"\0"):
        raise ProtocolError("bad startup packet")
    items = raw[:-1].split(b"\0")
    if items and items[-1] == b"":
        items.pop()
    if len(items) % 2:
        raise ProtocolError("bad startup packet")
    try:
        params = {items[i].decode(): items[i + 1].decode() for i in range(0, len(items), 2)}
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad startup packet: invalid UTF-8") from exc
    return StartupPacket(code, params=params)


def parse_cstring(body: bytes | memoryview, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated string at pos; returns (text, position after the NUL)."""
    data = bytes(body)
    end = data.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("failed to parse packet")
    return data[pos:end].decode("utf-8", "replace"), end + 1


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = parse_cstring(body, 0)
    value, _ = parse_cstring(body, pos)
    return name, value


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body keyed by their one-letter codes."""
    fields: dict[str, str] = {}
    pos = 0
    data = bytes(body)
    while pos < len(data) and data[pos] != 0:
        code = chr(data[pos])
        value, pos = parse_cstring(data, pos + 1)
        fields[code] = value
    return fields


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    pid, key = _II.unpack_from(body, 0)
    return pid, key


def parse_auth_request(body: bytes) -> tuple[int, bytes]:
    (code,) = _I32.unpack_from(body, 0)
    return code, bytes(body[4:])


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mech, pos = parse_cstring(body, 0)
    if len(body) < pos + 4:
        raise ProtocolError("failed to parse packet")
    (n,) = _I32.unpack_from(body, pos)
    data = bytes(body[pos + 4 :])
    if n != -1 and n != len(data):
        raise ProtocolError("failed to parse packet")
    return mech, data


def parse_data_row(body: bytes) -> list[str | None]:
    """A DataRow's values as text (None for NULL)."""
    (n,) = _I16.unpack_from(body, 0)
    pos = 2
    out: list[str | None] = []
    for _ in range(n):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + length].decode("utf-8", "replace"))
            pos += length
    return out


def unpack_length(buf: bytes | bytearray | memoryview, pos: int) -> int:
    return _U32.unpack_from(buf, pos)[0]
