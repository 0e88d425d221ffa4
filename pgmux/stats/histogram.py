"""Latency histograms as plain int lists, cheap enough for the hot path.

A histogram is a list of 64 ints; a duration of ``us`` microseconds is counted with

    hist[us.bit_length()] += 1

(one C call and one list store, ~60 ns), so bucket ``i`` holds the integers 2**(i-1) .. 2**i - 1.
No bisect, no floats, no prometheus_client on the data path: the collector turns the lists into
cumulative Prometheus buckets at scrape time. The sum comes from the matching PoolStats counter
(query_time_us, ...), to which the very same ``us`` is added.
"""

from __future__ import annotations

from collections.abc import Sequence

N_BUCKETS = 64

#: Exported upper bounds: bucket indexes 5, 7, ..., 27, i.e. 31 us, 127 us, ... about 134 s (x4 steps).
EXPORTED_INDEXES = tuple(range(5, 28, 2))


def new_histogram() -> list[int]:
    """A fresh histogram (the default_factory for PoolStats fields)."""
    return [0] * N_BUCKETS


def observe(hist: list[int], us: int) -> None:
    """Count one duration; the hot path inlines this as ``hist[us.bit_length()] += 1``."""
    hist[us.bit_length() if us > 0 else 0] += 1


def upper_bound_seconds(index: int) -> float:
    """Inclusive upper bound of bucket `index`, in seconds."""
    return ((1 << index) - 1) / 1_000_000


def cumulative_buckets(hist: Sequence[int]) -> list[tuple[str, int]]:
    """Prometheus buckets [(le, cumulative count), ..., ("+Inf", total)] at EXPORTED_INDEXES."""
    out: list[tuple[str, int]] = []
    running = 0
    nxt = 0
    for idx in EXPORTED_INDEXES:
        while nxt <= idx:
            running += hist[nxt]
            nxt += 1
        out.append((repr(upper_bound_seconds(idx)), running))
    out.append(("+Inf", sum(hist)))
    return out


def merge(into: list[int], hist: Sequence[int]) -> None:
    for i, n in enumerate(hist):
        into[i] += n
