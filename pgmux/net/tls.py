"""TLS contexts for both sides, built from PgBouncer's client_tls_* and server_tls_* settings.

Contexts are built once per (re)load, not per connection: new connections use the new files
after RELOAD, as PgBouncer's do.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

ALPN_POSTGRESQL = "postgresql"  # PostgreSQL 17's ALPN protocol, required for direct TLS

# The server-side settings a server connection was made with: changing one (or the contents of
# one of the files) on RELOAD recycles the server connections, as PgBouncer's sbuf_tls_setup
# tags every pool dirty when it sets up server TLS again.
_SERVER_SETTINGS = ("server_tls_sslmode", "server_tls_protocols", "server_tls_ciphers", "server_tls13_ciphers",
                    "server_tls_ca_file", "server_tls_cert_file", "server_tls_key_file")
_SERVER_FILES = ("server_tls_ca_file", "server_tls_cert_file", "server_tls_key_file")

_VERSIONS = {
    "tlsv1.0": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}


class TlsConfigError(Exception):
    """A TLS setting or file that cannot be used; the message names the setting."""


def _protocol_range(spec: str, setting: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """`secure` (1.2+1.3), `all`, `legacy` or a list such as `tlsv1.2,tlsv1.3`."""
    words = [w.strip().lower() for w in spec.replace(":", ",").replace(" ", ",").split(",") if w.strip()]
    versions: list[ssl.TLSVersion] = []
    for w in words or ["secure"]:
        if w in ("secure", "default"):
            versions += [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
        elif w in ("all", "legacy"):
            versions += list(_VERSIONS.values())
        elif w in _VERSIONS:
            versions.append(_VERSIONS[w])
        else:
            raise TlsConfigError(f"{setting}: unknown protocol {w!r}")
    return min(versions), max(versions)


def _apply_common(ctx: ssl.SSLContext, prefix: str, settings: Any) -> None:
    lo, hi = _protocol_range(getattr(settings, f"{prefix}_tls_protocols") or "secure", f"{prefix}_tls_protocols")
    try:
        ctx.minimum_version = lo
        ctx.maximum_version = hi
    except ValueError as exc:  # the local OpenSSL refuses e.g. TLS 1.0
        raise TlsConfigError(f"{prefix}_tls_protocols: {exc}") from exc
    ciphers = getattr(settings, f"{prefix}_tls_ciphers")
    if ciphers and ciphers not in ("default", "fast", "normal", "secure", "all"):
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"{prefix}_tls_ciphers: {exc}") from exc


@dataclass
class TlsContexts:
    """Contexts in force: None where TLS is off for that side."""

    client: ssl.SSLContext | None
    server: ssl.SSLContext | None
    client_mode: str
    server_mode: str
    server_key: tuple[object, ...] = ()  # settings and file digests the server connections use


def _file_digest(path: str) -> str | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def server_key(settings: Any) -> tuple[object, ...]:
    """What server connections depend on: equal keys before and after a RELOAD mean they may stay."""
    if settings.server_tls_sslmode == "disable":
        return ("disable",)
    return (tuple(getattr(settings, name) for name in _SERVER_SETTINGS)
            + tuple(_file_digest(getattr(settings, name)) for name in _SERVER_FILES))


def build_contexts(settings: Any) -> TlsContexts:
    """Both contexts from the settings; raises TlsConfigError naming the setting at fault."""
    client_mode = settings.client_tls_sslmode
    client_ctx = None
    if client_mode != "disable":
        cert, key = settings.client_tls_cert_file, settings.client_tls_key_file
        if not cert or not key:
            raise TlsConfigError("client_tls_sslmode needs client_tls_cert_file and client_tls_key_file")
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # Offered to clients that negotiate ALPN; direct TLS requires it (ClientConnection).
        client_ctx.set_alpn_protocols([ALPN_POSTGRESQL])
        # No session tickets, as PostgreSQL's server (be-secure-openssl.c, SSL_OP_NO_TICKET): libpq
        # and the other drivers never resume a session, so each ticket (two per TLS 1.3 handshake
        # by default) was encrypted and sent for nothing: ~8% of a -C login's CPU with TLS.
        client_ctx.num_tickets = 0
        client_ctx.options |= ssl.OP_NO_TICKET
        try:
            client_ctx.load_cert_chain(cert, key)
            if settings.client_tls_ca_file:
                client_ctx.load_verify_locations(settings.client_tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"client_tls_cert_file/key_file/ca_file: {exc}") from exc
        if client_mode in ("verify-ca", "verify-full"):
            client_ctx.verify_mode = ssl.CERT_REQUIRED
        elif settings.client_tls_ca_file:
            client_ctx.verify_mode = ssl.CERT_OPTIONAL  # certificates are checked when presented (cert auth)
        _apply_common(client_ctx, "client", settings)
    server_mode = settings.server_tls_sslmode
    server_ctx = None
    if server_mode != "disable":
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if server_mode in ("verify-ca", "verify-full"):
            if not settings.server_tls_ca_file:
                raise TlsConfigError(f"server_tls_sslmode = {server_mode} needs server_tls_ca_file")
            server_ctx.check_hostname = server_mode == "verify-full"
            server_ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            server_ctx.check_hostname = False
            server_ctx.verify_mode = ssl.CERT_NONE
        try:
            if settings.server_tls_ca_file:
                server_ctx.load_verify_locations(settings.server_tls_ca_file)
            if settings.server_tls_cert_file:
                server_ctx.load_cert_chain(settings.server_tls_cert_file, settings.server_tls_key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"server_tls_ca_file/cert_file/key_file: {exc}") from exc
        _apply_common(server_ctx, "server", settings)
    return TlsContexts(client_ctx, server_ctx, client_mode, server_mode, server_key(settings))


def describe(transport: Any, absent: str = "no") -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384` for the login log line and SHOW CLIENTS/SERVERS; `absent` without TLS."""
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if obj is None:
        return absent
    cipher = obj.cipher()
    return f"{obj.version()}/{cipher[0] if cipher else '?'}"
