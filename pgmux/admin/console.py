"""The admin console (virtual database `pgbouncer`). Placeholder until the console lands."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgmux.net.client import ClientConnection


async def run_console(client: ClientConnection) -> None:
    """Authenticate an admin/stats user and serve console commands on the slow path."""
    from pgmux.net.client import ClientError

    raise ClientError("admin console is not available yet", "0A000")
