"""Socket activation and peers: two pgmux processes serve one inherited port, and a cancel request
that the kernel hands to the process that did not issue its key is forwarded to the one that did.

A `SocketHolder` stands in for systemd (pgmux/testing/activation.py): it listens, passes the
socket as fd 3 with LISTEN_FDS/LISTEN_PID, and waits for sd_notify's READY=1. Each process has
its own `peer_id`, its own Unix socket (or, across namespaces, its own TCP address) and a `[peers]`
section naming both. Which process issued a key is read from the key itself (bytes 1-2: peer_id).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers_peers import Hosts, PoolerFactory, key_peer, peer_group, two_hosts, wait_backends
from pgwire import RawConn

from pgmux.protocol.messages import cancel_request, message
from pgmux.testing.activation import ActivatedPooler, SocketHolder
from pgmux.testing.cluster import TempCluster, wait_for

psycopg = pytest.importorskip("psycopg")
from psycopg import errors  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

SLEEP = "SELECT pg_sleep(60)"


@pytest.fixture
def holder() -> Iterator[SocketHolder]:
    with SocketHolder() as h:
        yield h


@pytest.fixture(params=["one-host", "two-namespaces"])
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts | None]:
    if request.param == "one-host":
        yield None
        return
    with two_hosts() as h:
        yield h


def connect_until_both(holder: SocketHolder, n: int) -> list[Any]:
    """`n` connections through the shared port, with clients of both processes among them (the
    kernel gives each connection to whichever process accepts first)."""
    conns: list[Any] = []
    for _ in range(10 * n):
        conns.append(psycopg.connect(host=holder.host, port=holder.port, user="trustuser", dbname="testdb",
                                     autocommit=True, connect_timeout=10))
        if len(conns) >= n and {key_peer(c.info.backend_pid) for c in conns[-n:]} == {1, 2}:
            for c in conns[:-n]:
                c.close()
            return conns[-n:]
    owners = sorted(key_peer(c.info.backend_pid) for c in conns)
    for c in conns:
        c.close()
    raise AssertionError(f"{len(conns)} connections all went to one process: peers {owners}")


def test_activated_processes_share_one_port_and_notify(pooler: PoolerFactory, cluster: TempCluster,
                                                       holder: SocketHolder) -> None:
    procs = peer_group(pooler, cluster, holder, 2)
    for p in procs:
        p.start()
    conns = connect_until_both(holder, 4)
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()
    for p in procs:
        assert p.notifications[0].startswith("READY=1"), p.notifications
        log = p.log_text()
        assert "socket passed from service manager (fd 3)" in log
        # listen_addr = 127.0.0.1 on the holder's port: the service manager has it.
        assert "sockets passed from service manager, listen_addr 127.0.0.1 ignored" in log
    procs[0].reload()
    got = procs[0].read_notifications(5.0)
    got += [] if any(n.startswith("READY=1") for n in got) else procs[0].read_notifications(5.0)
    assert got[0].startswith("RELOADING=1\nMONOTONIC_USEC="), got
    assert any(n.startswith("READY=1") for n in got), got
    procs[1].stop()
    assert procs[1].read_notifications(1.0) == ["STOPPING=1"]


def test_cancels_through_the_shared_port_reach_every_query(pooler: PoolerFactory, cluster: TempCluster,
                                                           holder: SocketHolder, hosts: Hosts | None) -> None:
    """12 queries through the shared port, split over two processes; cancel requests through the same
    port land on either process, and every query is cancelled within 3 s."""
    procs = peer_group(pooler, cluster, holder, 2, hosts=hosts, default_pool_size=12)
    for p in procs:
        p.start()
    conns = connect_until_both(holder, 12)
    outcome: dict[int, BaseException | None] = {}

    def run(i: int) -> None:
        try:
            conns[i].execute(SLEEP)
            outcome[i] = None
        except BaseException as exc:  # noqa: BLE001 - recorded and checked below
            outcome[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(conns))]
    try:
        for t in threads:
            t.start()
        wait_backends(cluster, SLEEP, len(conns))
        started = time.monotonic()
        for conn in conns:
            conn.cancel()  # a new connection to holder.host:holder.port (libpq's PQcancel)
        for t in threads:
            t.join(max(0.0, started + 3.0 - time.monotonic()))
        elapsed = time.monotonic() - started
        assert len(outcome) == len(conns), f"{len(conns) - len(outcome)} queries not cancelled after {elapsed:.1f}s"
        assert all(isinstance(e, errors.QueryCanceled) for e in outcome.values()), outcome
        assert elapsed < 3.0
    finally:
        for conn in conns:
            conn.close()
    for p in procs:  # a forward that failed (peer unreachable) would have left its query running
        assert "cancel request failed" not in p.log_text()


def raw_clients(holder: SocketHolder) -> dict[int, RawConn]:
    """One raw protocol client of each process (peer_id -> client), through the shared port."""
    found: dict[int, RawConn] = {}
    for _ in range(40):
        c = RawConn(holder.host, holder.port)
        c.login("trustuser", "testdb")
        assert c.backend_key is not None
        owner = key_peer(c.backend_key[0])
        if owner in found:
            c.close()
        else:
            found[owner] = c
        if len(found) == 2:
            return found
    for c in found.values():
        c.close()
    raise AssertionError(f"40 connections all went to peers {set(found)}")


def send_cancel_unix(p: ActivatedPooler, key: tuple[int, int]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        assert p.unix_socket_path is not None
        s.connect(p.unix_socket_path)
        s.sendall(cancel_request(*key))
        s.recv(1)  # the pooler closes once it has taken the request


def test_cancel_sent_to_the_other_process_is_forwarded(pooler: PoolerFactory, cluster: TempCluster,
                                                       holder: SocketHolder) -> None:
    """Deterministic: each process gets the cancel for the other's client, on its own Unix socket."""
    procs = peer_group(pooler, cluster, holder, 2)
    for p in procs:
        p.start()
    clients = raw_clients(holder)
    try:
        for c in clients.values():
            c.send(message(b"Q", SLEEP.encode() + b"\0"))
        wait_backends(cluster, SLEEP, 2)
        for owner, c in clients.items():
            other = procs[2 - owner]  # peer 1 -> procs[1], peer 2 -> procs[0]
            assert c.backend_key is not None
            send_cancel_unix(other, c.backend_key)
        for owner, c in clients.items():
            assert _read_error(c) == "57014", f"the query of peer {owner}'s client was not cancelled"
            assert f"forwarding cancellation request to peer {owner}" in procs[2 - owner].log_text()
    finally:
        for c in clients.values():
            c.close()


def _read_error(c: RawConn) -> str:
    """The SQLSTATE of the ErrorResponse the running query ends with."""
    from pgmux.protocol.messages import parse_error_fields

    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        kind, body = c.read_message()
        if kind == b"E":
            return str(parse_error_fields(body).get("C"))
    return "no error within 3 s"


def test_forwarding_stops_at_an_exhausted_ttl_and_an_unknown_peer(pooler: PoolerFactory, cluster: TempCluster,
                                                                 holder: SocketHolder) -> None:
    procs = peer_group(pooler, cluster, holder, 2)
    for p in procs:
        p.start()
    clients = raw_clients(holder)
    try:
        c = clients[1]
        assert c.backend_key is not None
        pid, secret = c.backend_key
        no_ttl = secret & ~3  # the TTL: the two low bits of the key's last byte
        c.send(message(b"Q", b"SELECT pg_sleep(0.5)\0"))
        wait_backends(cluster, "SELECT pg_sleep(0.5)", 1)
        send_cancel_unix(procs[1], (pid, no_ttl))  # to peer 2, with no hop left
        unknown = struct.unpack("!i", bytes([0, 99, 0, 1]))[0]  # peer_id 99, not in [peers]
        send_cancel_unix(procs[1], (unknown, secret))
        kind, _ = c.read_message()
        while kind not in (b"E", b"Z"):
            kind, _ = c.read_message()
        assert kind == b"Z"  # the query ran to its end: nothing was forwarded
        log = procs[1].log_text()
        wait_for(lambda: "could not find peer to forward request to (peer_id 99)" in procs[1].log_text(), 3)
        assert "failed to forward cancel request because its TTL was exhausted" in log
        assert "forwarding cancellation request" not in procs[1].log_text()
    finally:
        for c in clients.values():
            c.close()
