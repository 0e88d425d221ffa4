"""Socket activation and peers: two pgmux processes serve one inherited port, and a cancel request
that the kernel hands to the process that did not issue its key is forwarded to the one that did.

A `SocketHolder` stands in for systemd (pgmux/testing/activation.py): it listens, passes the
socket as fd 3 with LISTEN_FDS/LISTEN_PID, and waits for sd_notify's READY=1. Each process has
its own `peer_id`, its own Unix socket (or, across namespaces, its own TCP address) and a `[peers]`
section naming both. Which process issued a key is read from the key itself (bytes 1-2: peer_id).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers_peers import (
    Hosts,
    PoolerFactory,
    key_peer,
    only,
    peer_group,
    query_end,
    raw_client_of,
    send_cancel,
    two_hosts,
    wait_backends,
)

from pgmux.protocol.messages import message
from pgmux.testing.activation import SocketHolder
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


def connect(holder: SocketHolder) -> Any:
    return psycopg.connect(host=holder.host, port=holder.port, user="trustuser", dbname="testdb",
                           autocommit=True, connect_timeout=10)


def test_activated_processes_share_one_port_and_notify(pooler: PoolerFactory, cluster: TempCluster,
                                                       holder: SocketHolder) -> None:
    procs = peer_group(pooler, cluster, holder, 2)
    for p in procs:
        p.start()
    conns = []
    for running, stopped in (procs, procs[::-1]):
        with only(running, stopped):
            conns += [connect(holder) for _ in range(2)]
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
    """12 queries through the shared port, 6 on each process; every cancel request, also through the
    shared port, lands on the process that did not issue its key (the owner is SIGSTOPped while it is
    sent) and is forwarded to its peer; all 12 queries are cancelled within 3 s."""
    procs = peer_group(pooler, cluster, holder, 2, hosts=hosts, default_pool_size=12)
    for p in procs:
        p.start()
    conns: dict[int, list[Any]] = {}
    for running, stopped in (procs, procs[::-1]):
        with only(running, stopped):
            conns[running.peer_id] = [connect(holder) for _ in range(6)]
    everyone = conns[1] + conns[2]
    outcome: dict[int, BaseException | None] = {}

    def run(i: int) -> None:
        try:
            everyone[i].execute(SLEEP)
            outcome[i] = None
        except BaseException as exc:  # noqa: BLE001 - recorded and checked below
            outcome[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(everyone))]
    try:
        assert {peer: {key_peer(c.info.backend_pid) for c in cs} for peer, cs in conns.items()} == {1: {1}, 2: {2}}
        for t in threads:
            t.start()
        wait_backends(cluster, SLEEP, len(everyone))
        started = time.monotonic()
        for owner, other in (procs, procs[::-1]):
            with only(other, owner):
                for conn in conns[owner.peer_id]:
                    conn.cancel()  # a new connection to holder.host:holder.port (libpq's PQcancel)
        for t in threads:
            t.join(max(0.0, started + 3.0 - time.monotonic()))
        elapsed = time.monotonic() - started
        assert len(outcome) == len(everyone), f"{len(everyone) - len(outcome)} still running after {elapsed:.1f}s"
        assert all(isinstance(e, errors.QueryCanceled) for e in outcome.values()), outcome
        assert elapsed < 3.0
    finally:
        for conn in everyone:
            conn.close()
    for owner, other in (procs, procs[::-1]):
        assert other.log_text().count(f"forwarding cancellation request to peer {owner.peer_id}") == 6
        assert "cancel request failed" not in other.log_text()


def test_forwarding_stops_at_an_exhausted_ttl_and_an_unknown_peer(pooler: PoolerFactory, cluster: TempCluster,
                                                                 holder: SocketHolder) -> None:
    procs = peer_group(pooler, cluster, holder, 2)
    for p in procs:
        p.start()
    c = raw_client_of(holder, procs[0], procs[1])
    try:
        assert c.backend_key is not None
        pid, secret = c.backend_key
        assert key_peer(pid) == 1
        c.send(message(b"Q", b"SELECT pg_sleep(1.5)\0"))
        wait_backends(cluster, "SELECT pg_sleep(1.5)", 1)
        assert procs[1].unix_socket_path is not None
        send_cancel(procs[1].unix_socket_path, (pid, secret & ~3))  # to peer 2, no hop left (TTL: 2 low bits)
        unknown = int.from_bytes(bytes([0, 99, 0, 1]), "big")  # peer_id 99, not in [peers]
        send_cancel(procs[1].unix_socket_path, (unknown, secret))
        assert query_end(c) == "ok"  # the query ran to its end: nothing was forwarded
        wait_for(lambda: "could not find peer to forward request to (peer_id 99)" in procs[1].log_text(), 3)
        log = procs[1].log_text()
        assert "failed to forward cancel request because its TTL was exhausted" in log
        assert "forwarding cancellation request" not in log
    finally:
        c.close()


@pytest.mark.parametrize("peer_ids", ["distinct", "shared"])
def test_wildcard_peer_entry_reaches_the_owner(pooler: PoolerFactory, cluster: TempCluster,
                                              holder: SocketHolder, peer_ids: str) -> None:
    """`* = host=a,b` (the Kubernetes recipe: a headless Service): a key whose peer is not listed,
    or that names this process's own peer_id but none of its clients (pods sharing one peer_id),
    goes to every address there with no hop left, so only the process that issued it acts on it."""
    extra = {"peer_id": 1} if peer_ids == "shared" else {}
    procs = peer_group(pooler, cluster, holder, 2, wildcard=True, **extra)
    for p in procs:
        p.start()
    c = raw_client_of(holder, procs[0], procs[1])
    try:
        assert c.backend_key is not None
        c.send(message(b"Q", SLEEP.encode() + b"\0"))
        wait_backends(cluster, SLEEP, 1)
        started = time.monotonic()
        assert procs[1].unix_socket_path is not None
        send_cancel(procs[1].unix_socket_path, c.backend_key)  # the wrong process
        assert query_end(c) == "57014"
        assert time.monotonic() - started < 3.0
    finally:
        c.close()
    why = "peer 1 not listed" if peer_ids == "distinct" else "no such client here"
    assert f"forwarding cancellation request to every peer of * ({why})" in procs[1].log_text()
    # the copy that came back to the sender itself was dropped there, not sent round again
    wait_for(lambda: ("TTL was exhausted" if peer_ids == "distinct" else "failed cancel request: no such client")
             in procs[1].log_text(), 3)
    assert procs[1].log_text().count("forwarding cancellation request") == 1
