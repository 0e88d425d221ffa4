"""Processes seen from /proc: children, process trees, start times (for the test harness and bench/).

pgmux with ``workers = N`` is a supervisor and N worker processes, and PgBouncer under ``runuser`` is
runuser's child: the harness and the benchmark find those processes here.
"""

from __future__ import annotations

import glob
import os

# CONFIG_PROC_CHILDREN: without it, children() walks /proc for the ppid instead
_CHILDREN_FILE = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``: /proc/PID/task/*/children, else a walk of /proc for the ppid."""
    kids: list[int] = []
    if _CHILDREN_FILE:
        for path in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                with open(path) as f:
                    kids += [int(x) for x in f.read().split()]
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        return kids
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()  # after "(comm)": state, ppid, ...
        except (FileNotFoundError, ProcessLookupError):
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(stat.split("/")[2]))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (pgmux with ``workers = N``: the supervisor and its N workers)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo += children(p)
    return out


def start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), 0 if gone: with the pid it
    names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0
