"""Instructions per transaction of the pgmux process, counted by callgrind: repeatable whatever
else the machine runs, so a small difference between two settings shows where CPU time cannot.

    python -m bench.instructions [--set query_stats=0] [--against query_stats=1] [--txns 10000]

pgmux runs under `valgrind --tool=callgrind` twice per setting, serving `pgbench -S -c 50` for a
short and a long run; the difference of the two totals over the difference of transactions is what
one transaction costs (start-up and shutdown cancel out). It counts user-space instructions only:
the kernel's share of a transaction (recv, send, epoll) is not in it, so the ratio printed is an
upper bound of the CPU-time ratio. Prints how it was run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

from pgmux.testing.cluster import PoolerProcess, TempCluster, write_config

PASSWORDS = {"md5user": "md5pass", "scramuser": "scrampass"}  # (pgmux.testing.cluster's test roles)


class CallgrindPooler(PoolerProcess):
    def command(self) -> list[str]:
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.workdir}/callgrind.out",
                *super().command()]


def run_under_callgrind(cluster: TempCluster, extra: dict[str, object], txns: int, clients: int,
                        workload: tuple[str, ...] = ("-S",), user: str = "md5user") -> Path:
    """pgmux under callgrind serving `txns` transactions of pgbench with the `workload` arguments
    (-S, -C, -M ...) as `user` (md5user: an md5 login against a plaintext auth_file entry;
    scramuser: SCRAM against the role's stored secret): the callgrind output file."""
    workdir = tempfile.mkdtemp(prefix="pgmux-callgrind-")
    os.chmod(workdir, 0o755)
    secret = PASSWORDS[user] if user == "md5user" else cluster.role_secret(user)
    ini, userlist = write_config(cluster, workdir=workdir, pool_mode="transaction", userlist={user: secret},
                                 extra={"default_pool_size": 20, **extra})
    p = CallgrindPooler("pgmux", ini, userlist, workdir)
    p.start(timeout=120)
    try:
        subprocess.run(["pgbench", "-n", *workload, "-c", str(clients), "-j", "2", "-t", str(txns // clients),
                        p.dsn(user, PASSWORDS[user], dbname="testdb")],
                       check=True, capture_output=True)
    finally:
        p.stop()
    return Path(workdir, "callgrind.out")


def total_instructions(out: Path) -> int:
    m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no totals in {out}")
    return int(m.group(1))


def per_function(out: Path) -> dict[str, int]:
    """Instructions per function (self cost), from callgrind_annotate."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", str(out)], capture_output=True,
                          text=True).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)$", line)
        if m and "=>" not in line and m.group(2) not in ("PROGRAM TOTALS", "events annotated"):
            name = m.group(2).split(" [")[0]
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def parse_setting(text: str) -> dict[str, object]:
    """`key=value`, or several separated by commas."""
    out: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="query_stats=1", help="the setting measured (key=value[,key=value...])")
    ap.add_argument("--against", default="query_stats=0", help="the setting it is compared with")
    ap.add_argument("--txns", type=int, default=10000, help="transactions of the long run beyond the short one")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--functions", type=int, default=0, metavar="N",
                    help="also list the N functions that cost the most per transaction (first setting)")
    ap.add_argument("--connect", action="store_true", help="pgbench -C: a new connection (md5 login) per transaction")
    ap.add_argument("--mode", choices=("simple", "extended", "prepared"), default="simple", help="pgbench -M")
    ap.add_argument("--tpcb", action="store_true", help="pgbench's TPC-B-like script instead of -S")
    ap.add_argument("--user", choices=sorted(PASSWORDS), default="md5user",
                    help="who pgbench logs in as (scramuser: SCRAM logins, with --connect)")
    args = ap.parse_args()
    short = 2500
    workload = (*(() if args.tpcb else ("-S",)), *(("-C",) if args.connect else ()), "-M", args.mode)
    print(f"how it was run: pgmux under callgrind, transaction mode, pool 20; "
          f"pgbench {' '.join(workload)} -c {args.clients} -j 2 as {args.user}, "
          f"{short} and {short + args.txns} transactions; per transaction = difference / {args.txns}")
    with TempCluster() as cluster:
        cluster.create_test_roles()
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", cluster.dsn("md5user", "md5pass", "testdb")], check=True,
                       capture_output=True)
        cluster.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO scramuser", dbname="testdb")
        per_txn = {}
        for label in (args.set, args.against):
            extra = parse_setting(label)
            a = run_under_callgrind(cluster, extra, short, args.clients, workload, args.user)
            b = run_under_callgrind(cluster, extra, short + args.txns, args.clients, workload, args.user)
            per_txn[label] = (total_instructions(b) - total_instructions(a)) / args.txns
            print(f"{label}: {per_txn[label]:.0f} instructions per transaction")
            if args.functions and label == args.set:
                fa, fb = per_function(a), per_function(b)
                diff = sorted(((fb.get(k, 0) - fa.get(k, 0)) / args.txns, k) for k in set(fa) | set(fb))
                for cost, name in diff[::-1][: args.functions]:
                    print(f"  {cost:8.0f}  {name[-110:]}")
    print(f"{args.set} / {args.against}: {per_txn[args.set] / per_txn[args.against]:.3f}x "
          f"(+{per_txn[args.set] - per_txn[args.against]:.0f} instructions per transaction)")


if __name__ == "__main__":
    main()
