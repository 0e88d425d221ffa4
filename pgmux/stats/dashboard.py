"""The live dashboard: a self-contained page at ``/`` of the metrics listener and the JSON it polls.

``GET /api/dashboard`` answers, for pgmux as a whole (every worker's part merged, as the console's
merged SHOW commands): SHOW POOLS, SHOW TOTALS, the top statements of SHOW QUERIES, SHOW PINS and
the query-time histogram of every pool summed (pgmux.stats.histogram buckets). The page keeps no
state on the server: rates and latency percentiles over time come from the differences between
two polls, computed in the browser.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgmux.stats.histogram import merge, new_histogram

if TYPE_CHECKING:
    from pgmux.admin.result import Result
    from pgmux.pooler import Pooler

PAGE_PATH = "/"
DATA_PATH = "/api/dashboard"
#: Statements shown (SHOW QUERIES's first rows: the most total time).
TOP_QUERIES = 20


def page() -> bytes:
    # read at each request (the file may be edited), with nothing to import: pgmux may run as
    # `user` by then, who cannot read the interpreter's own modules
    return (Path(__file__).parent / "dashboard.html").read_bytes()


def query_histogram(pooler: Pooler) -> list[int]:
    """The query-time histogram of this process's pools, summed (empty when histograms are off)."""
    total = new_histogram()
    for pool in pooler.pools.values():
        if pool.stats.histograms:
            merge(total, pool.stats.query_hist)
    return total


def _dicts(result: Result) -> list[dict[str, Any]]:
    names = [c.name for c in result.columns or []]
    return [dict(zip(names, row, strict=True)) for row in result.rows]


async def data(pooler: Pooler) -> dict[str, Any]:
    """What the page shows, at this moment."""
    from pgmux.admin import show

    shared = pooler.shared
    names = ("pools", "totals", "queries", "pins")
    if shared is not None:
        results = await asyncio.gather(*(shared.merged_show(name) for name in names))
        hist = query_histogram(pooler)
        for part in await shared.gather(show.QUERY_HIST):
            merge(hist, part)
    else:
        results = [show.SHOW_FUNCTIONS[name](pooler) for name in names]
        hist = query_histogram(pooler)
    pools, totals, queries, pins = results
    top = _dicts(queries)[:TOP_QUERIES]
    for row in top:
        row["queryid"] = str(row["queryid"])  # 64 bits: more than a JavaScript number holds exactly
    return {
        "time": time.time(),
        "version": show.VERSION_STRING,
        "workers": int(pooler.settings.workers),
        "query_stats": bool(pooler.settings.query_stats),
        "pools": _dicts(pools),
        "totals": {name: value for name, value in totals.rows},
        "queries": top,
        "pins": _dicts(pins),
        "query_hist": hist,
    }
