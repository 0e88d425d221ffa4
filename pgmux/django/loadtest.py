"""A small HTTP load generator for concurrency tests of a Django site through pgmux.

Threads with ``http.client`` (one connection per request, as gunicorn's sync workers close them),
bounded both in time and in request count, so a test or a benchmark always stops by itself. Only
meant for servers on this machine.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["LoadResult", "run_load", "percentile"]


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    by_path: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1000

    def summary(self) -> str:
        return (f"{self.requests} requests in {self.elapsed:.1f}s ({self.rps:.0f}/s), {self.errors} errors, "
                f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms")


def run_load(
    host: str,
    port: int,
    paths: Sequence[str],
    *,
    concurrency: int = 8,
    duration: float = 5.0,
    max_requests: int = 1000,
    timeout: float = 10.0,
) -> LoadResult:
    """GET ``paths`` round-robin from ``concurrency`` threads until ``duration`` s or ``max_requests``.

    A response other than 200 counts as an error (first few bodies kept in ``error_samples``).
    """
    if not host.startswith("127.") and host not in ("localhost", "::1"):
        raise ValueError("run_load only targets this machine (127.0.0.0/8, localhost, ::1)")
    result = LoadResult()
    lock = threading.Lock()
    counter = itertools.count()
    deadline = time.monotonic() + duration

    def worker() -> None:
        local_lat: list[float] = []
        errors = 0
        samples: list[str] = []
        per_path: dict[str, int] = {}
        while time.monotonic() < deadline:
            n = next(counter)
            if n >= max_requests:
                break
            path = paths[n % len(paths)]
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
                try:
                    conn.request("GET", path, headers={"Connection": "close"})
                    resp = conn.getresponse()
                    body = resp.read()
                    ok = resp.status == 200
                    detail = f"{path} -> {resp.status}: {body[:300]!r}"
                finally:
                    conn.close()
            except OSError as e:
                ok = False
                detail = f"{path} -> {type(e).__name__}: {e}"
            local_lat.append(time.perf_counter() - t0)
            per_path[path] = per_path.get(path, 0) + 1
            if not ok:
                errors += 1
                if len(samples) < 5:
                    samples.append(detail)
        with lock:
            result.latencies += local_lat
            result.requests += len(local_lat)
            result.errors += errors
            result.error_samples += samples[: max(0, 10 - len(result.error_samples))]
            for p, c in per_path.items():
                result.by_path[p] = result.by_path.get(p, 0) + c

    start = time.monotonic()
    threads = [threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + timeout + 5)
    result.elapsed = time.monotonic() - start
    return result
