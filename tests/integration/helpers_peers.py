"""Several pgmux processes behind one inherited socket, as systemd runs them: shared by
test_peers.py and test_rolling_restart.py.

`peer_group` builds N socket-activated pgmux processes (unstarted) that all serve one
`SocketHolder` port, each with its own `peer_id` and a `[peers]` section naming all of them: by
their Unix sockets (one machine), or, with `Hosts`, by TCP addresses in network namespaces of
their own (one "machine" each, joined by a veth pair).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pgwire import RawConn

from pgmux.protocol.messages import cancel_request, parse_error_fields
from pgmux.testing.activation import ActivatedPooler, SocketHolder
from pgmux.testing.cluster import PoolerProcess, TempCluster, wait_for

PoolerFactory = Callable[..., PoolerProcess]


def key_peer(backend_pid: int) -> int:
    """The peer_id in a BackendKeyData's process id (bytes 1-2 of the key, little-endian)."""
    key = backend_pid.to_bytes(4, "big", signed=True)
    return key[1] | key[2] << 8


@dataclass
class Hosts:
    """Two network namespaces joined by a veth pair: `names[i]` has address `addrs[i]`."""

    names: list[str]
    addrs: list[str]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Make the namespaces, or skip the test when this machine does not allow it."""
    tag = uuid.uuid4().hex[:6]
    names = [f"pgmux-a-{tag}", f"pgmux-b-{tag}"]
    addrs = ["10.231.7.1", "10.231.7.2"]
    made: list[str] = []
    try:
        try:
            for name in names:
                _ip("netns", "add", name)
                made.append(name)
            _ip("link", "add", f"pa{tag}", "type", "veth", "peer", "name", f"pb{tag}")
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            pytest.skip(f"network namespaces are not available here (ip netns/veth: {detail.strip()})")
        for name, dev, addr in zip(names, (f"pa{tag}", f"pb{tag}"), addrs, strict=True):
            _ip("link", "set", dev, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", name, "link", "set", dev, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield Hosts(names, addrs)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def peer_group(pooler: PoolerFactory, cluster: TempCluster, holder: SocketHolder | None, count: int,
               hosts: Hosts | None = None, wildcard: bool = False, netns: str | None = None,
               port: int | None = None, **extra: object) -> list[ActivatedPooler]:
    """`count` pgmux processes (peer_id 1..count, unstarted) serving `holder`'s port in
    transaction mode. Without `hosts` each is known to its peers by its Unix socket; with it,
    process i runs in namespace i % 2, listens on that namespace's address and is known by it.
    `wildcard`: [peers] has only a `*` line listing every process, as with a headless Service.
    Without a holder they bind `port` themselves (e.g. so_reuseport), all in namespace `netns`."""
    procs: list[ActivatedPooler] = []
    port = holder.port if holder is not None else port
    # From a namespace of its own, PostgreSQL is reached on its Unix socket.
    db_host = cluster.socket_dir if hosts is not None or netns is not None else "{host}"
    for i in range(count):
        settings: dict[str, object] = {"listen_port": port, "peer_id": i + 1, **extra}
        if hosts is not None:
            settings["listen_addr"] = hosts.addrs[i % 2]
        p = pooler(process_class=ActivatedPooler, start=False, pool_mode="transaction", auth_type="trust",
                   databases={"testdb": f"host={db_host} port={{port}} dbname=testdb"}, extra=settings)
        assert isinstance(p, ActivatedPooler)
        p.holder = holder
        p.netns = hosts.names[i % 2] if hosts is not None else netns
        procs.append(p)
    where = [hosts.addrs[i % 2] if hosts is not None else p.workdir for i, p in enumerate(procs)]
    lines = ["", "[peers]"]
    if wildcard:
        lines.append(f"* = host={','.join(where)} port={port}")
    else:
        lines += [f"{i + 1} = host={w} port={port}" for i, w in enumerate(where)]
    for p in procs:
        p.rewrite_config(p.ini_text + "\n".join(lines) + "\n")
    return procs


def admin(p: PoolerProcess, sql: str) -> list[list[str]]:
    """Run a console command on this very process, over its own Unix socket; its rows."""
    out = subprocess.run(["psql", "-X", "-q", "-At", "-F", "|", "-h", str(p.unix_dir), "-p", str(p.port),
                          "-U", "postgres", "-d", "pgbouncer", "-c", sql],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    return [line.split("|") for line in out.splitlines()]


def wait_backends(cluster: TempCluster, query: str, n: int, timeout: float = 10.0) -> None:
    """Until `n` backends are running `query` (so a cancel has something to stop)."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s"
    wait_for(lambda: int(cluster.execute(sql, params=[query])[0][0]) >= n, timeout, what=f"{n} x {query}")


@contextlib.contextmanager
def only(running: ActivatedPooler, stopped: ActivatedPooler) -> Iterator[None]:
    """While the body runs, `stopped` is SIGSTOPped: every connection to the shared port goes to
    `running` (the kernel otherwise gives it to whichever process accepts first, not evenly)."""
    stopped.signal(signal.SIGSTOP)
    # kill() returns before the process has stopped: until it has, it may still accept.
    wait_for(lambda: _state(stopped.pid) in ("T", "t"), timeout=5.0, interval=0.002, what="SIGSTOP to take effect")
    try:
        yield
    finally:
        stopped.signal(signal.SIGCONT)


def _state(pid: int) -> str:
    """The process state letter in /proc/PID/stat (T: stopped by a signal)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def raw_client_of(holder: SocketHolder, owner: ActivatedPooler, other: ActivatedPooler) -> RawConn:
    """A raw protocol client that `owner` accepted on the shared port, logged in."""
    with only(owner, other):  # the login too: a connection is only queued until a process accepts it
        c = RawConn(holder.host, holder.port)
        c.login("trustuser", "testdb")
    return c


def send_cancel(where: str | tuple[str, int], key: tuple[int, int]) -> None:
    """A CancelRequest to a Unix socket path or a TCP (host, port); returns once the pooler closed."""
    family = socket.AF_UNIX if isinstance(where, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(where)
        s.sendall(cancel_request(*key))
        s.recv(1)


def query_end(c: RawConn) -> str:
    """How the query running on `c` ends: the SQLSTATE of its error, or "ok"."""
    kind, body = c.read_message()
    while kind not in (b"E", b"Z"):
        kind, body = c.read_message()
    return str(parse_error_fields(body).get("C")) if kind == b"E" else "ok"
