"""The exceptions that cross pgmux's layers, in a module that imports nothing of pgmux.

Raised low (the protocol, a connection) and handled high (the login, the pooler, the console, the
workers), so every layer can name them without importing the others.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes that do not follow the protocol. The message is what the client is told."""


class ConnectionLost(Exception):
    """The peer closed the socket while we waited for a message."""


class ClientError(Exception):
    """A refusal the client is told about with an ErrorResponse, then closed."""

    def __init__(self, message: str, sqlstate: str = "08P01", log: bool = True) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.log = log


class ServerLoginError(Exception):
    """PostgreSQL refused the login; `fields` is its ErrorResponse, relayed to waiting clients.

    `queued`: no ErrorResponse came (the connect failed or timed out, TLS negotiation failed, the
    server went away while logging in), so the clients waiting for a server stay queued while the
    pool retries (PgBouncer's disconnect_server of a server in SV_LOGIN, with no kill_pool_logins).
    `detail`: what the log says, when it says more than the clients are told."""

    def __init__(self, fields: dict[str, str], queued: bool = False, detail: str | None = None) -> None:
        super().__init__(fields.get("M", "server login failed"))
        self.fields = fields
        self.queued = queued
        self.detail = detail
