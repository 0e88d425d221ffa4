"""A rolling restart behind one inherited socket loses nothing.

Two socket-activated pgmux processes serve the holder's port (systemd's role) while
`pgbench -C -S -c 8 -T 12` connects anew for every transaction through it. Both are replaced one at
a time, as `systemctl restart pgmux@N` or a Kubernetes rollout does: a third process starts on the
same socket, the first gets `SHUTDOWN WAIT_FOR_CLIENTS` (it stops accepting, the connections still
queued on the shared socket go to the others, its own clients finish, it exits), then a fourth
starts and the second gets the same. pgbench must see no failed transaction and no connection
error, and both old processes must exit.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers_peers import (
    PoolerFactory,
    admin,
    peer_group,
    query_end,
    raw_client_of,
    send_cancel,
    two_hosts,
    wait_backends,
)
from helpers_tx import parse_bench, pgbench_cmd
from pgwire import RawConn

from pgmux.protocol.messages import message
from pgmux.testing.activation import ActivatedPooler, SocketHolder
from pgmux.testing.cluster import TempCluster, free_port, make_dsn, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]


@dataclass
class Setup:
    """Four processes (two running at first, two to replace them), and how to reach their port."""

    procs: list[ActivatedPooler]
    host: str
    port: int
    netns: str | None = None  # where clients must run from (so_reuseport binds in a namespace)


@pytest.fixture(params=["one-host", "two-namespaces", "so_reuseport"])
def setup(request: pytest.FixtureRequest, pooler: PoolerFactory, cluster: TempCluster) -> Iterator[Setup]:
    """one-host / two-namespaces: a SocketHolder's inherited socket, the processes in one or two
    network namespaces. so_reuseport: no inherited socket; every process binds the port itself, in
    a namespace of its own where the test may set net.ipv4.tcp_migrate_req = 1, as docs/deploy.md
    says to."""
    with contextlib.ExitStack() as stack:
        if request.param == "so_reuseport":
            ns = stack.enter_context(two_hosts()).names[0]
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"], check=True)
            port = free_port()
            procs = peer_group(pooler, cluster, None, 4, netns=ns, port=port, default_pool_size=8,
                               so_reuseport=1, listen_addr="127.0.0.1")
            yield Setup(procs, "127.0.0.1", port, ns)
            return
        hosts = stack.enter_context(two_hosts()) if request.param == "two-namespaces" else None
        holder = stack.enter_context(SocketHolder())
        procs = peer_group(pooler, cluster, holder, 4, hosts=hosts, default_pool_size=8)
        yield Setup(procs, holder.host, holder.port)


def logins(p: ActivatedPooler) -> int:
    return p.log_text().count("login attempt")


def replace(old: ActivatedPooler, new: ActivatedPooler) -> None:
    """Start `new` on the same port and, once it said READY=1, drain `old`."""
    new.start()
    admin(old, "SHUTDOWN WAIT_FOR_CLIENTS")
    assert old.wait(15) == 0, old.log_text()[-2000:]


def test_rolling_restart_under_pgbench_loses_nothing(setup: Setup, pgbench_tables: None) -> None:
    procs = setup.procs
    procs[0].start()
    procs[1].start()
    dsn = make_dsn(host=setup.host, port=setup.port, user="md5user", dbname="testdb", connect_timeout=10)
    command = pgbench_cmd(dsn, "-C", "-S", "-c", "8", "-T", "12")
    if setup.netns:
        command = ["ip", "netns", "exec", setup.netns, *command]
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: logins(procs[0]) + logins(procs[1]) > 50, 10, what="pgbench to be running")
        replace(procs[0], procs[2])
        replace(procs[1], procs[3])
        out, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()
    res = parse_bench((bench.returncode, out, err))
    assert res.returncode == 0, res.describe()
    assert res.failed in (0, None) and res.processed, res.describe()
    assert "connection" not in err.lower() and "error" not in err.lower(), res.describe()
    for old in procs[:2]:
        assert "shutdown complete" in old.log_text()
        assert "tcp_migrate_req is 0" not in old.log_text()
    assert all(new.is_running() for new in procs[2:])
    # Once the old ones were gone, pgbench still ran (-T 12) and the new ones served it.
    assert logins(procs[2]) + logins(procs[3]) > 0


def test_wait_for_clients_serves_a_client_accepted_before_it(pooler: PoolerFactory) -> None:
    """A connection the old process accepted just before SHUTDOWN WAIT_FOR_CLIENTS (its startup
    packet not even sent yet) is served in full, and the process exits when it leaves: in a rolling
    restart that client would otherwise get "pooler is shutting down"."""
    p = pooler(pool_mode="transaction", auth_type="trust")
    client = RawConn(p.host, p.port)
    try:
        # accepted: the console's own connection and this one
        wait_for(lambda: dict(admin(p, "SHOW LISTS")).get("used_clients") == "2", 5, what="the accept")
        admin(p, "SHUTDOWN WAIT_FOR_CLIENTS")
        client.login("trustuser", "testdb")
        assert client.simple_query("SELECT 41 + 1") == [("42",)]
        assert p.is_running()
    finally:
        client.close()
    assert p.wait(10) == 0


def test_cancel_reaches_a_process_that_is_draining(pooler: PoolerFactory, cluster: TempCluster) -> None:
    """While the old process finishes its clients, it no longer accepts on the shared port, so their
    cancel requests land on its peer, which forwards them to the old process's own Unix socket:
    that stays open for cancel requests (and refuses logins) until the old process exits."""
    sleep = "SELECT pg_sleep(60)"
    with SocketHolder() as holder:
        procs = peer_group(pooler, cluster, holder, 2)
        for p in procs:
            p.start()
        c = raw_client_of(holder, procs[0], procs[1])
        try:
            c.send(message(b"Q", sleep.encode() + b"\0"))
            wait_backends(cluster, sleep, 1)
            admin(procs[0], "SHUTDOWN WAIT_FOR_CLIENTS")
            wait_for(lambda: "accepting only cancel requests" in procs[0].log_text(), 5)
            assert c.backend_key is not None
            send_cancel((holder.host, holder.port), c.backend_key)
            assert query_end(c) == "57014"
            assert "forwarding cancellation request to peer 1" in procs[1].log_text()
            refused = subprocess.run(["psql", "-X", "-h", str(procs[0].unix_dir), "-p", str(holder.port),
                                      "-U", "trustuser", "-d", "testdb", "-c", "SELECT 1"],
                                     capture_output=True, text=True, timeout=10)
            assert refused.returncode != 0 and "pooler is shutting down" in refused.stderr
            assert procs[0].is_running()
        finally:
            c.close()
        assert procs[0].wait(10) == 0
