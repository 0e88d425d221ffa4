"""pgmux.stats: counters read at scrape time, never pushed from the hot path.

Modules: ``counters`` (snapshots, averages per stats_period, the ``stats:`` log line), ``histogram``
(int-bucket latency histograms), ``service`` (the stats_period timer and the metrics HTTP listener)
and ``metrics`` (the prometheus_client Collector; needs the optional ``metrics`` extra).
"""
