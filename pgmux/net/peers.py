"""Peering (PgBouncer 1.19+): cancel requests that reach the wrong pooler process go to the right one.

Several poolers behind one address (a shared listening socket, so_reuseport, a load balancer, a
Kubernetes Service) each get a `peer_id` and list the others in `[peers]`. A client's cancel key
carries its pooler's id, in PgBouncer's layout so that PgBouncer and pgmux can peer with each other:

    byte 0      random, sign bit clear (with `workers`, the worker index in its low bits)
    bytes 1-2   peer_id, little-endian (PgBouncer: key[1] = id & 0xFF, key[2] = id >> 8)
    bytes 3-6   random
    byte 7      random, but its two low bits are a TTL, 3 when the key is handed out

A CancelRequest whose key names another peer is sent on to that peer with the TTL lowered by one
(dropped when it is already 0, so a misconfigured ring cannot loop); one naming this process is
matched with the TTL bits set back to 3. A peer is reached at `host` (a directory for its Unix
socket `.s.PGSQL.<port>`, `@name` for an abstract one, else a TCP host) and `port`; at most
`pool_size` requests (default_pool_size when unset) are in flight to it at once, the others wait,
and each gives up after cancel_wait_timeout. What is in flight per peer is kept in
`PeerForwarder.pools` (the figures of SHOW PEER_POOLS).

pgmux adds one thing: a `* = host=...` line, for poolers that come and go (a Kubernetes
Deployment). A key whose peer is not listed, or that names this process but no client of it (pods of a
Deployment may share one peer_id), is sent to every address of those hosts (a headless Service's
name resolves to every pod) with its TTL at 0: the process that issued it acts on it, the others
drop it, so no request travels further.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgmux.log import logger
from pgmux.protocol import messages as m

if TYPE_CHECKING:
    from pgmux.config import PeerEntry
    from pgmux.pooler import Pooler

CANCELLATION_TTL_MASK = 0x03  # PgBouncer's name


def stamp_peer(key: bytearray, peer_id: int) -> None:
    """Write this process's peer_id and a full TTL into a fresh cancel key."""
    key[1] = peer_id & 0xFF
    key[2] = (peer_id >> 8) & 0xFF
    key[7] |= CANCELLATION_TTL_MASK


def key_peer(key: bytes) -> int:
    """The peer_id a cancel key names."""
    return key[1] | key[2] << 8


def key_ttl(key: bytes) -> int:
    return key[7] & CANCELLATION_TTL_MASK


def as_issued(key: bytes) -> bytes:
    """The key as this process handed it out (TTL bits all set): what cancel_keys holds."""
    return key[:7] + bytes([key[7] | CANCELLATION_TTL_MASK])


async def peer_addresses(peer: PeerEntry, every: bool) -> list[tuple[str, int | None]]:
    """Where a peer is reached: (path, None) for a Unix socket (a directory, or @name for an
    abstract one), else (address, port). `host` may list several hosts, comma-separated; a host
    name stands for the first of its addresses, or all of them when `every` is set (the `*` peer:
    a headless Service's name resolves to every pod)."""
    found: list[tuple[str, int | None]] = []
    loop = asyncio.get_running_loop()
    for host in (h.strip() for h in (peer.host or "").split(",") if h.strip()):
        if host.startswith("/"):
            found.append((f"{host.rstrip('/')}/.s.PGSQL.{peer.port}", None))
        elif host.startswith("@"):
            found.append((f"\0{host[1:].rstrip('/')}/.s.PGSQL.{peer.port}", None))
        else:
            try:
                infos = await loop.getaddrinfo(host, peer.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                logger.warning("peer host %s: %s", host, exc.strerror or exc)
                continue
            addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
            found += [(addr, peer.port) for addr in (addrs if every else addrs[:1])]
    return found


@dataclass
class PeerPool:
    """Cancel requests on their way to one peer (PgBouncer's peer pool)."""

    peer_id: int
    limit: int
    waiting: int = 0  # cl_waiting_cancel_req: for a free slot
    login: int = 0  # sv_login: connecting to the peer
    active: int = 0  # cl_active_cancel_req / sv_active_cancel: sent, waiting for the peer to close
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(max(1, self.limit))


class PeerForwarder:
    """Sends CancelRequests to the peers that issued their keys."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.pools: dict[int, PeerPool] = {}

    def owner(self, key: bytes) -> int | None:
        """The peer a cancel key must go to, or None when this process handles it (no peering,
        or the key is its own)."""
        me = self.pooler.settings.peer_id
        if not me:
            return None
        peer_id = key_peer(key)
        return None if peer_id == me else peer_id

    def forward(self, key: bytes, peer_id: int) -> None:
        """Send the request to `peer_id` with the TTL lowered, in the background. A peer_id not
        in [peers] goes to every address of the `*` entry, if there is one, with the TTL at 0: only
        the process that issued the key acts on it, the others drop it."""
        if key_ttl(key) == 0:
            logger.info("failed to forward cancel request because its TTL was exhausted")
            return
        peers = self.pooler.config.peers
        peer = peers.get(peer_id) if peer_id else None
        if peer is not None:
            forwarded = key[:7] + bytes([key[7] - 1])
        else:
            peer = peers.get(0)
            if peer is None:
                logger.info("could not find peer to forward request to (peer_id %d)", peer_id)
                return
            forwarded = key[:7] + bytes([key[7] & ~CANCELLATION_TTL_MASK])
        limit = peer.pool_size if peer.pool_size is not None else self.pooler.settings.default_pool_size
        pool = self.pools.get(peer.peer_id)
        if pool is None or pool.limit != limit:
            pool = self.pools[peer.peer_id] = PeerPool(peer.peer_id, limit)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("forwarding cancellation request to %s", f"peer {peer_id}" if peer.peer_id else
                         f"every peer of * (peer {peer_id} not listed)" if peer_id else
                         "every peer of * (no such client here)")
        self.pooler.spawn(self._send(pool, peer, forwarded))

    async def _send(self, pool: PeerPool, peer: PeerEntry, key: bytes) -> None:
        packet = m.cancel_request(int.from_bytes(key[:4], "big", signed=True),
                                  int.from_bytes(key[4:], "big", signed=True))
        pool.waiting += 1
        try:
            await pool.slots.acquire()
        finally:
            pool.waiting -= 1
        try:
            async with asyncio.timeout(self.pooler.settings.cancel_wait_timeout or None):
                addresses = await peer_addresses(peer, every=not peer.peer_id)
                await asyncio.gather(*(self._send_to(pool, peer, where, port, packet) for where, port in addresses))
        except TimeoutError:
            logger.warning("peer-%s: cancel request failed: cancel_wait_timeout", peer.peer_id or "*")
        finally:
            pool.slots.release()

    async def _send_to(self, pool: PeerPool, peer: PeerEntry, where: str, port: int | None, packet: bytes) -> None:
        try:
            pool.login += 1
            try:
                reader, writer = await open_stream(where, port)
            finally:
                pool.login -= 1
            pool.active += 1
            try:
                await send_until_closed(reader, writer, packet)
            finally:
                pool.active -= 1
        except OSError as exc:
            address = where.lstrip("\0") if port is None else f"{where}:{port}"
            logger.warning("peer-%s@%s: cancel request failed: %s", peer.peer_id or "*", address,
                           exc.strerror or exc)


async def open_stream(addr: str, port: int | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to a Unix socket path (port None; a leading NUL: abstract) or a TCP host:port."""
    if port is None:
        return await asyncio.open_unix_connection(addr)
    return await asyncio.open_connection(addr, port)


async def send_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, packet: bytes) -> None:
    """Send a CancelRequest and wait until the other end closes (it does once it has acted on it)."""
    try:
        writer.write(packet)
        await writer.drain()
        await reader.read()
    finally:
        writer.close()
