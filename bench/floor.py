"""How close pgmux is to what Python can do at all: ``python -m bench.floor``.

Runs PgBouncer, pgmux and a bare uvloop forwarder side by side, interleaved, against one throwaway
PostgreSQL. The forwarder is the floor of a Python pooler built on uvloop transports: one
``BufferedProtocol`` per socket, each read written straight to the peer, the Cython header walk
(as pgmux's), and no pooling, no authentication, no statistics (each client gets its own server
connection). Whatever pgmux spends above it is pgmux's own Python; what the forwarder spends above
PgBouncer is the cost of the interpreter and the event loop, which no Python pooler can remove.
Prints TPS and the middleman's CPU per transaction (from /proc schedstat), with ratios to PgBouncer
from the same repetition, and the whole machine's busy CPU per transaction and idle share (from
/proc/stat): a slower middleman also costs the processes around it, and leaves cores idle while
everyone waits for it. Not a test; see bench/README.md.

``python -m bench.floor --serve LISTEN_PORT SERVER_PORT`` runs only the forwarder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # python bench/floor.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"  # noqa: A001

from bench import report  # noqa: E402
from bench.measure import RunResult, run_pgbench  # noqa: E402
from pgmux.protocol.scanner import NO_TYPES, scan, type_table  # noqa: E402
from pgmux.testing.cluster import PoolerProcess, TempCluster, free_port, port_accepts, wait_for, write_config  # noqa: E402

_Z = type_table("Z")


class Half(asyncio.BufferedProtocol):
    """One side of a forwarded connection: every read goes to the peer at once (cut-through), then
    its headers are walked, as pgmux's data path does. `untyped_first`: the first packet is the
    client's startup packet (a length word, no type byte)."""

    def __init__(self, untyped_first: bool = False) -> None:
        self.buf = bytearray(65536)
        self.mv = memoryview(self.buf)
        self.keep = 0  # an incomplete header at the front of buf, already forwarded
        self.skip = -1 if untyped_first else 0  # body bytes still to come; -1: startup packet next
        self.peer: Half | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # bytes that arrived before the peer connected
        self.events: list[tuple[int, int, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.mv[self.keep :]

    def buffer_updated(self, nbytes: int) -> None:
        keep, buf = self.keep, self.buf
        end = keep + nbytes
        out = self.peer.transport if self.peer is not None else None
        if out is None:
            self.early.append(bytes(self.mv[keep:end]))
        else:
            out.write(self.mv[keep:end])
        stop = self._walk(buf, end)
        rest = end - stop
        if out is not None and out.get_write_buffer_size():  # the transport keeps a view of buf
            self.buf = bytearray(65536)
            self.mv = memoryview(self.buf)
            self.buf[:rest] = buf[stop:end]
        elif rest and stop:
            buf[:rest] = buf[stop:end]
        self.keep = rest

    def _walk(self, buf: bytearray, end: int) -> int:
        """Walk the headers in buf[:end]; returns where an incomplete header starts (or end)."""
        if self.skip < 0:  # the startup packet (at 0): its length word, then typed messages
            if end < 4:
                return 0
            self.skip = int.from_bytes(buf[:4], "big")
        pos, self.skip = self.skip, 0  # (0 after a kept header: it is at the front)
        if pos >= end:
            self.skip = pos - end
            return end
        stop, self.skip = scan(buf, pos, end, _Z, NO_TYPES, self.events)
        self.events.clear()
        return stop

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class ClientSide(Half):
    def __init__(self, server_port: int) -> None:
        super().__init__(untyped_first=True)
        self.server_port = server_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        server = Half()
        server.peer, self.peer = self, server
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: server, "127.0.0.1", self.server_port)
        if self.transport is None or self.transport.is_closing():  # the client left meanwhile
            transport.close()
            return
        for data in self.early:
            transport.write(data)
        self.early.clear()


def serve(listen_port: int, server_port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: ClientSide(server_port), "127.0.0.1", listen_port)
        await asyncio.Event().wait()

    uvloop.run(main())


class Forwarder:
    """The forwarder as a subprocess, with what run_pgbench needs of a pooler."""

    def __init__(self, server_port: int) -> None:
        self.port = free_port()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=root)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.floor", "--serve", str(self.port), str(server_port)],
                                     env=env, cwd=root)
        wait_for(lambda: port_accepts("127.0.0.1", self.port), 15, what="forwarder listening")
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


WORKLOADS = {
    "select-c1": ["-S", "-c", "1", "-j", "1"],
    "select-c20": ["-S", "-c", "20", "-j", "2"],
    "select-c50": ["-S", "-c", "50", "-j", "2"],
    "select1-c50": ["-c", "50", "-j", "2", "-f", "@select1"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pgmux and a bare uvloop forwarder against PgBouncer")
    ap.add_argument("--serve", nargs=2, type=int, metavar=("LISTEN_PORT", "SERVER_PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=["select-c1", "select-c50", "select1-c50"])
    args = ap.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0

    tmp = tempfile.mkdtemp(prefix="pgmux-floor-")
    os.chmod(tmp, 0o755)
    select1 = os.path.join(tmp, "select1.sql")
    Path(select1).write_text("SELECT 1;\n")
    cluster = TempCluster(settings={"fsync": "off", "synchronous_commit": "off", "max_connections": "200"})
    poolers: dict[str, PoolerProcess] = {}
    fwd: Forwarder | None = None
    results: list[RunResult] = []
    env = dict(os.environ, PGPASSWORD="md5pass", PGSSLMODE="disable")
    try:
        cluster.start()
        cluster.create_test_roles()
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", cluster.socket_dsn(dbname="testdb")], check=True,
                       capture_output=True)
        cluster.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO md5user", dbname="testdb")
        for kind in ("pgbouncer", "pgmux"):
            workdir = os.path.join(tmp, kind)
            os.makedirs(workdir)
            os.chmod(workdir, 0o777)
            ini, userlist = write_config(cluster, pool_mode="transaction", workdir=workdir, extra={
                "default_pool_size": 20, "max_client_conn": 1000, "log_connections": 0, "log_disconnections": 0})
            poolers[kind] = PoolerProcess(kind, ini, userlist, workdir, verbose=False).start()
        fwd = Forwarder(cluster.port)
        targets = {
            "PgBouncer": ("127.0.0.1", poolers["pgbouncer"].port, poolers["pgbouncer"].pid),
            "pgmux": ("127.0.0.1", poolers["pgmux"].port, poolers["pgmux"].pid),
            "uvloop forwarder": ("127.0.0.1", fwd.port, fwd.pid),
        }
        print(f"# bench.floor: {args.reps} repetitions x {args.duration} s, interleaved; "
              f"PostgreSQL {cluster.version()}, pgbench scale 1, transaction mode, pool 20, md5; "
              "the forwarder has no pool (a server per client)")
        for rep in range(args.reps):
            for key in args.only:
                pgargs = [a if a != "@select1" else select1 for a in WORKLOADS[key]]
                for name, (host, port, pid) in targets.items():
                    res = run_pgbench(workload=key, target=name, rep=rep, pgbench_args=pgargs,
                                      dsn=f"host={host} port={port} user=md5user dbname=testdb",
                                      duration=args.duration, log_prefix=os.path.join(tmp, f"log-{key}-{rep}"),
                                      pooler_pid=pid, env=env, cwd=tmp, timeout=args.duration + 60)
                    results.append(res)
                    print(f"  rep {rep + 1} {key:12s} {name:17s} tps {res.tps or 0:8.0f}  "
                          f"CPU µs/txn {res.cpu_us or 0:6.1f}  host CPU µs/txn {res.extra.get('host_cpu_us', 0):6.1f}  "
                          f"host idle {res.extra.get('host_idle_pct', 0):4.1f}%"
                          f"{'  ' + res.error if res.error else ''}", flush=True)
        summary = report.Summary([], results)
        rows = []
        for key in args.only:
            for name in targets:
                cell = summary.cell(key, name)
                rows.append([key, name, report.fails(cell) or report.f_num(cell.median("tps") if cell else None),
                             report.f_num(cell.median("cpu_us") if cell else None, 1),
                             report.f_ratio(summary.ratio(key, "cpu_us", num=name, den="PgBouncer")),
                             report.f_ratio(summary.ratio(key, "tps", num=name, den="PgBouncer")),
                             report.f_num(cell.extra_median("host_cpu_us") if cell else None, 1),
                             report.f_num(cell.extra_median("host_idle_pct") if cell else None, 1)])
        print()
        print(report.md_table(["workload", "target", "TPS (median)", "CPU µs per transaction (median)",
                               "CPU / PgBouncer's", "TPS / PgBouncer's", "whole machine's CPU µs per transaction",
                               "machine idle %"], rows))
        print("\nwhole machine: busy CPU of every process (pgbench, PostgreSQL, the pooler) from /proc/stat over "
              "the same steady window, per transaction; idle: the share of both cores' time nobody used")
    finally:
        if fwd is not None:
            fwd.stop()
        for p in poolers.values():
            p.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
