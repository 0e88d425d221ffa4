"""Measurement primitives: pooler CPU from /proc schedstat, RSS, one pgbench run with per-transaction logs.

Why schedstat: on a small shared machine throughput swings by tens of percent between runs, while the
pooler's own CPU time per transaction is stable (``shared/spec/hot-path.md`` section 1.2). The first field
of ``/proc/PID/task/TID/schedstat`` is the time the thread spent on a CPU, in nanoseconds; the sum over
all threads is the process's CPU time at nanosecond resolution.
"""

from __future__ import annotations

import bisect
import glob
import math
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgmux.testing.procs import process_tree

# --------------------------------------------------------------------------------------------------
# /proc readers


def cpu_ns(pid: int) -> int:
    """CPU time (ns) of all live threads of ``pid``, from /proc/PID/task/*/schedstat."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass  # a thread that ended between glob and open
    return total


_TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, busy + idle) clock ticks of all CPUs since boot, from the first line of /proc/stat: busy is
    user + nice + system + irq + softirq, idle is idle + iowait (steal, time the hypervisor gave to other
    guests, is in neither)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM/Threads from /proc/PID/status, in kB (Threads: count); {} if the process is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def rss_kb(pid: int) -> int:
    return proc_status(pid).get("VmRSS", 0)


def tree_rss_kb(pid: int) -> int:
    """VmRSS summed over ``pid`` and its descendants (pages shared after fork count once per process)."""
    return sum(rss_kb(p) for p in process_tree(pid))


def tree_cpu_ns(pid: int) -> int:
    """CPU ns of ``pid`` and its descendants (pgmux ×2: supervisor + workers)."""
    return sum(cpu_ns(p) for p in process_tree(pid))


def nofile_limit(pid: int) -> int:
    """Soft RLIMIT_NOFILE of ``pid`` (from /proc/PID/limits), 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (FileNotFoundError, ValueError, IndexError):
        pass
    return 0


def maps_contain(pid: int, needle: str) -> bool:
    """True if a mapped file of ``pid`` contains ``needle`` (e.g. is uvloop's extension loaded?)."""
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, PermissionError):
        return False


class CpuSampler:
    """Samples (wall time, CPU ns of ``pid`` and its descendants) every ``interval`` s in a thread, to cut a
    steady window later. The process tree is looked up at every sample, so workers forked (or respawned)
    after the start are counted; PgBouncer and single-process pgmux have no children."""

    def __init__(self, pid: int | None, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.host: list[tuple[int, int]] = []  # host_cpu_ticks() at each sample (the whole machine)
        self.root_ns: list[int] = []  # the process ``pid`` alone (pgmux ×2: the supervisor), per sample
        self.most_procs = 0  # the largest process tree seen (3 for pgmux with workers = 2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self) -> None:
        now, tree = time.time(), process_tree(self.pid) if self.pid else []
        per = [cpu_ns(p) for p in tree] or [0]  # no pooler (direct runs): the machine's figures only
        self.samples.append((now, sum(per)))
        self.root_ns.append(per[0])
        self.host.append(host_cpu_ticks())
        self.most_procs = max(self.most_procs, len(tree))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> CpuSampler:
        self._take()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._take()

    def at(self, t: float, series: list[int] | None = None) -> float:
        """CPU ns at wall time ``t`` (or the value of ``series``, one entry per sample), linearly
        interpolated between samples."""
        s = self.samples
        values = series if series is not None else [x[1] for x in s]
        times = [x[0] for x in s]
        i = bisect.bisect_left(times, t)
        if i <= 0:
            return float(values[0])
        if i >= len(s):
            return float(values[-1])
        t0, t1 = times[i - 1], times[i]
        c0, c1 = values[i - 1], values[i]
        return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)

    def host_window(self, t0: float, t1: float) -> tuple[float, float]:
        """(busy µs of the whole machine, idle share 0..1) between wall times t0 and t1."""
        busy = [b for b, _ in self.host]
        total = [t for _, t in self.host]
        d_busy = self.at(t1, busy) - self.at(t0, busy)
        d_total = self.at(t1, total) - self.at(t0, total)
        return d_busy * _TICK_US, (1.0 - d_busy / d_total) if d_total > 0 else 0.0

    @property
    def total_ns(self) -> int:
        return self.samples[-1][1] - self.samples[0][1] if len(self.samples) >= 2 else 0


# --------------------------------------------------------------------------------------------------
# pgbench


@dataclass
class RunResult:
    """One pgbench run (or one idle-clients run) against one target."""

    workload: str
    target: str
    rep: int
    tps: float | None = None
    txns: int = 0
    mean_ms: float | None = None
    p99_ms: float | None = None
    cpu_us: float | None = None  # pooler CPU per transaction, steady window
    cpu_us_whole: float | None = None  # pooler CPU per transaction, whole run incl. connection phase
    rss_kb: int | None = None  # pooler VmRSS after the run
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    k = max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


def read_txn_log(prefix: str) -> tuple[list[float], list[float]]:
    """(latencies in µs, completion wall times in s) from pgbench ``-l --log-prefix`` files.

    Line format (PostgreSQL 15): ``client_id transaction_no time script_no time_epoch time_us [...]``,
    ``time`` being the latency in µs or ``failed``/``skipped``. Files are ``prefix.PID`` and ``prefix.PID.N``
    (one per thread). The files are deleted after reading.
    """
    lat: list[float] = []
    ends: list[float] = []
    for path in glob.glob(glob.escape(prefix) + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or not parts[2].isdigit():
                    continue
                lat.append(float(parts[2]))
                ends.append(int(parts[4]) + int(parts[5]) / 1e6)
        os.unlink(path)
    return lat, ends


_ERROR_PATTERNS = (
    re.compile(r"(?:ERROR|FATAL):\s*(.+)"),
    re.compile(r"client \d+ aborted.*"),
    re.compile(r"(?:error|could not|connection to server).+", re.I),
)


def pgbench_error(stdout: str, stderr: str, rc: int) -> str:
    """The first informative error line of a failed pgbench run."""
    text = stderr + "\n" + stdout
    for pat in _ERROR_PATTERNS:
        m = pat.search(text)
        if m:
            msg = m.group(1) if pat.groups else m.group(0)
            return f"{msg.strip()[:160]} (pgbench exit {rc})"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"pgbench exit {rc}: {lines[-1][:160] if lines else 'no output'}"


def run_pgbench(
    *,
    workload: str,
    target: str,
    rep: int,
    pgbench_args: list[str],
    dsn: str,
    duration: int,
    log_prefix: str,
    pooler_pid: int | None,
    env: dict[str, str],
    cwd: str,
    timeout: float,
) -> RunResult:
    """Run pgbench once with per-transaction logging while sampling the pooler's CPU.

    CPU per transaction is computed over a steady window (from 10% into the run until shortly before the
    last transaction ends), so connecting 500 clients before the run does not count as per-transaction
    cost; with ``-C`` connecting is part of every transaction and therefore inside the window anyway.
    """
    res = RunResult(workload, target, rep)
    cmd = ["pgbench", "-n", "-T", str(duration), "-l", f"--log-prefix={log_prefix}", *pgbench_args, dsn]
    t_start = time.monotonic()
    with CpuSampler(pooler_pid) as sampler:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)
        except subprocess.TimeoutExpired as e:
            res.error = f"timeout: pgbench did not finish within {timeout:.0f} s"
            res.extra["stdout_tail"] = str(e.stdout or "")[-300:]
            read_txn_log(log_prefix)
            return res
    res.seconds = time.monotonic() - t_start
    lat, ends = read_txn_log(log_prefix)
    if pooler_pid:
        res.rss_kb = tree_rss_kb(pooler_pid) or None
    if proc.returncode != 0:
        res.error = pgbench_error(proc.stdout, proc.stderr, proc.returncode)
        return res
    m = re.search(r"^tps = ([\d.]+)", proc.stdout, re.M)
    n = re.search(r"^number of transactions actually processed: (\d+)", proc.stdout, re.M)
    if not m or not n:
        res.error = "cannot parse pgbench output: " + proc.stdout[-200:]
        return res
    res.tps = float(m.group(1))
    res.txns = int(n.group(1))
    if lat:
        lat.sort()
        res.mean_ms = sum(lat) / len(lat) / 1000.0
        res.p99_ms = percentile(lat, 99) / 1000.0
    if pooler_pid and res.txns:
        res.cpu_us_whole = sampler.total_ns / res.txns / 1000.0
        if sampler.most_procs > 1 and len(sampler.root_ns) >= 2:  # the supervisor's own part, whole run
            res.extra["processes"] = sampler.most_procs
            res.extra["cpu_us_supervisor"] = (sampler.root_ns[-1] - sampler.root_ns[0]) / res.txns / 1000.0
        res.cpu_us = res.cpu_us_whole
    if res.txns and len(ends) >= 20 and len(sampler.samples) >= 3:
        ends.sort()
        first, last = ends[0], ends[-1]
        span = last - first
        t0 = first + 0.10 * span
        t1 = min(last - 0.02 * span, sampler.samples[-1][0])
        n_in = bisect.bisect_right(ends, t1) - bisect.bisect_left(ends, t0)
        if t1 > t0 and n_in >= 10:
            if pooler_pid:
                res.cpu_us = (sampler.at(t1) - sampler.at(t0)) / n_in / 1000.0
            busy_us, idle = sampler.host_window(t0, t1)
            # everything on the machine (pgbench, PostgreSQL, the pooler) and how much of it idled
            res.extra["host_cpu_us"] = busy_us / n_in
            res.extra["host_idle_pct"] = max(0.0, 100.0 * idle)  # interpolated ticks can dip below 0
    return res
