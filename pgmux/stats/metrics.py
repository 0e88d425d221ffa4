"""Prometheus metrics through prometheus_client (the optional `metrics` extra), read at scrape time.

A custom Collector turns the same data SHOW POOLS / STATS_TOTALS / DATABASES / LISTS / CONFIG
answer into metric families, so the endpoint always agrees with the console. Nothing is pushed
from the hot path; only plain ints are read. Metric names are the ones pgbouncer_exporter
derives from those SHOW commands (``pgbouncer_pools_client_active_connections``,
``pgbouncer_stats_queries_pooled_total``, ...), so dashboards built for the exporter work unchanged;
what PgBouncer cannot give is under ``pgmux_``: latency histograms of client wait, query and
transaction time per pool, from the int-bucket lists in pgmux.stats.histogram.

Importing this module requires prometheus_client; callers import it lazily.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from pgmux.stats import counters, queries
from pgmux.stats.histogram import cumulative_buckets

if TYPE_CHECKING:
    from pgmux.pooler import Pooler

NS = "pgbouncer"

# SHOW LISTS row -> metric (pgbouncer_exporter's listsMap).
_LISTS = {
    "databases": ("databases", "Count of databases"),
    "users": ("users", "Count of users"),
    "pools": ("pools", "Count of pools"),
    "free_clients": ("free_clients", "Count of free clients"),
    "used_clients": ("used_clients", "Count of used clients"),
    "login_clients": ("login_clients", "Count of clients in login state"),
    "free_servers": ("free_servers", "Count of free servers"),
    "used_servers": ("used_servers", "Count of used servers"),
    "dns_names": ("cached_dns_names", "Count of DNS names in the cache"),
    "dns_zones": ("cached_dns_zones", "Count of DNS zones in the cache"),
    "dns_queries": ("in_flight_dns_queries", "Count of in-flight DNS queries"),
}

# SHOW POOLS column -> metric (pgbouncer_exporter's "pools" map).
_POOLS = {
    "cl_active": ("client_active_connections", "Client connections linked to server connection and able to "
                  "process queries"),
    "cl_waiting": ("client_waiting_connections", "Client connections waiting on a server connection"),
    "cl_active_cancel_req": ("client_active_cancel_connections", "Client connections that have forwarded "
                             "query cancellations to the server and are waiting for the server response"),
    "cl_waiting_cancel_req": ("client_waiting_cancel_connections", "Client connections that have not "
                              "forwarded query cancellations to the server yet"),
    "sv_active": ("server_active_connections", "Server connections linked to a client connection"),
    "sv_active_cancel": ("server_active_cancel_connections", "Server connections that are currently "
                         "forwarding a cancel request"),
    "sv_being_canceled": ("server_being_canceled_connections", "Servers waiting for in-flight cancel "
                          "requests before becoming idle"),
    "sv_idle": ("server_idle_connections", "Server connections idle and ready for a client query"),
    "sv_used": ("server_used_connections", "Server connections released and not yet ready for reuse"),
    "sv_tested": ("server_testing_connections", "Server connections running server_reset_query or "
                  "server_check_query"),
    "sv_login": ("server_login_connections", "Server connections in the process of logging in"),
}

# SHOW STATS_TOTALS counter index -> (metric, help, scale); pgbouncer_exporter's "stats_totals" map.
_STATS = (
    (counters.QUERY, "queries_pooled", "Total number of SQL queries pooled", 1),
    (counters.QUERY_TIME, "queries_duration_seconds", "Total number of seconds spent by the pooler when "
     "actively connected to PostgreSQL, executing queries", 1e-6),
    (counters.RECV, "received_bytes", "Total volume in bytes of network traffic received from clients", 1),
    (counters.SENT, "sent_bytes", "Total volume in bytes of network traffic sent to clients", 1),
    (counters.WAIT_TIME, "client_wait_seconds", "Time spent by clients waiting for a server in seconds", 1e-6),
    (counters.XACT, "sql_transactions_pooled", "Total number of SQL transactions pooled", 1),
    (counters.XACT_TIME, "server_in_transaction_seconds", "Total number of seconds spent connected to "
     "PostgreSQL in a transaction, either idle in transaction or executing queries", 1e-6),
    (counters.CLIENT_PARSE, "client_parses", "Total number of prepared statement Parse messages received "
     "from clients", 1),
    (counters.SERVER_PARSE, "server_parses", "Total number of prepared statement Parse messages sent to "
     "PostgreSQL", 1),
    (counters.BIND, "binds", "Total number of prepared statements readied for execution with a Bind message", 1),
)

# SHOW DATABASES numeric columns -> metric (pgbouncer_exporter's "databases" map).
_DATABASES = {
    "pool_size": ("pool_size", "Maximum number of server connections"),
    "reserve_pool_size": ("reserve_pool", "Maximum number of additional connections for this database"),
    "max_connections": ("max_connections", "Maximum number of allowed connections for this database"),
    "current_connections": ("current_connections", "Current number of connections for this database"),
    "paused": ("paused", "1 if this database is currently paused, else 0"),
    "disabled": ("disabled", "1 if this database is currently disabled, else 0"),
}
_DATABASE_LABELS = ("name", "host", "port", "database", "force_user", "pool_mode")

# PoolStats histogram attribute -> (metric, help, PoolStats sum attribute in microseconds).
HISTOGRAMS = (
    ("wait_hist", "client_wait_seconds", "Time clients waited for a server, per server assignment",
     "wait_time_us"),
    ("query_hist", "query_duration_seconds", "Query time on the server, per query", "query_time_us"),
    ("xact_hist", "transaction_duration_seconds", "Transaction time on the server, per transaction",
     "xact_time_us"),
)


def _label(value: Any) -> str:
    return "" if value is None else str(value)


# SHOW QUERIES column -> (metric under pgmux_query_, help, scale).
_QUERY_COUNTERS = (
    ("calls", "calls", "Times the statement ran (one per ReadyForQuery)", 1),
    ("errors", "errors", "Times the statement ended in an error", 1),
    ("rows", "rows", "Rows the statement returned or changed (CommandComplete)", 1),
    ("total_query_time", "time_seconds", "Time the statement ran on the server", 1e-6),
    ("total_wait_time", "wait_seconds", "Time its clients waited for a server before it ran", 1e-6),
)


def _query_labels(row: list[Any], idx: dict[str, int]) -> list[str]:
    return [_label(row[idx["database"]]), _label(row[idx["user"]]), str(row[idx["queryid"]]),
            str(row[idx["query"]])[:200]]


async def gather_workers(pooler: Pooler) -> dict[str, Any]:
    """workers > 1: what the collector reads, for pgmux as a whole: the console's merged SHOW
    LISTS / DATABASES / POOLS / STATS_TOTALS (the stats counters summed per database)."""
    import asyncio

    shared = pooler.shared
    assert shared is not None
    names = ("lists", "databases", "pools", "stats_totals", "queries")
    results = await asyncio.gather(*(shared.merged_show(name) for name in names))
    merged: dict[str, Any] = dict(zip(names, results, strict=True))
    merged["stats"] = [(row[0], row[1:], None) for row in merged.pop("stats_totals").rows]
    return merged


class PoolerCollector:
    """prometheus_client Collector reading the pooler's state at scrape time; with workers > 1,
    the merged figures `gather_workers` collected just before (latency histograms are left out
    then: they would show one worker's share as if it were the whole)."""

    def __init__(self, pooler: Pooler, merged: dict[str, Any] | None = None) -> None:
        self.pooler = pooler
        self.merged = merged

    def collect(self) -> Iterator[Metric]:
        from pgmux.admin import show

        pooler = self.pooler
        yield GaugeMetricFamily(f"{NS}_up", "The pgbouncer scrape succeeded", value=1)
        version = GaugeMetricFamily(f"{NS}_version_info", "The pgbouncer version info", labels=["version"])
        version.add_metric([show.VERSION_STRING], 1)
        yield version

        merged = self.merged
        lists = merged["lists"].rows if merged else show.list_counts(pooler)
        for name, items in lists:
            if name in _LISTS:
                metric, doc = _LISTS[name]
                yield GaugeMetricFamily(f"{NS}_{metric}", doc, value=items)

        s = pooler.settings
        yield GaugeMetricFamily(f"{NS}_config_max_client_connections", "Config maximum number of client "
                                "connections", value=s.max_client_conn)
        yield GaugeMetricFamily(f"{NS}_config_max_user_connections", "Config maximum number of server "
                                "connections per user", value=s.max_user_connections)

        databases = merged["databases"] if merged else show.show_databases(pooler)
        yield from self._from_result(databases, "databases", _DATABASE_LABELS, _DATABASES)
        pools = merged["pools"] if merged else show.show_pools(pooler)
        yield from self._from_result(pools, "pools", ("database", "user"), _POOLS)
        idx = {c.name: i for i, c in enumerate(pools.columns or [])}
        maxwait = GaugeMetricFamily(f"{NS}_pools_client_maxwait_seconds", "Age of oldest unserved client "
                                    "connection, in seconds", labels=["database", "user"])
        for row in pools.rows:
            maxwait.add_metric([_label(row[0]), _label(row[1])],
                               int(row[idx["maxwait"]] or 0) + int(row[idx["maxwait_us"]] or 0) / 1e6)
        yield maxwait

        stats = merged["stats"] if merged else show.database_stats(pooler)
        for index, metric, doc, scale in _STATS:
            family = CounterMetricFamily(f"{NS}_stats_{metric}", doc, labels=["database"])
            for db, cur, _avg in stats:
                family.add_metric([db], cur[index] * scale)
            yield family
        for index, metric, doc in ((counters.ASSIGN, "server_assignments", "Times a server was linked to a "
                                    "client"), (counters.LOGIN, "client_logins", "Client logins")):
            family = CounterMetricFamily(f"pgmux_stats_{metric}", doc, labels=["database"])
            for db, cur, _avg in stats:
                family.add_metric([db], cur[index])
            yield family

        if not merged:
            yield from self._histograms(show.sorted_pools(pooler))
        top = int(pooler.settings.query_stats_metrics)
        if top:
            yield from self._queries((merged["queries"] if merged else show.show_queries(pooler)).rows[:top])

    @staticmethod
    def _from_result(result: Any, group: str, labels: tuple[str, ...], mapping: dict[str, tuple[str, str]]
                     ) -> Iterator[Metric]:
        idx = {c.name: i for i, c in enumerate(result.columns or [])}
        label_idx = [idx[label] for label in labels]
        for column, (metric, doc) in mapping.items():
            family = GaugeMetricFamily(f"{NS}_{group}_{metric}", doc, labels=list(labels))
            for row in result.rows:
                value = row[idx[column]]
                family.add_metric([_label(row[i]) for i in label_idx],
                                  float("nan") if value is None else float(value))
            yield family

    @staticmethod
    def _queries(rows: list[Any]) -> Iterator[Metric]:
        """The top statements of SHOW QUERIES (query_stats_metrics of them: label cardinality is
        capped), labelled database, user, queryid and the normalized text (its first 200 chars)."""
        labels = ["database", "user", "queryid", "query"]
        idx = {name: i for i, (name, _) in enumerate(queries.QUERIES_COLUMNS_SPEC)}
        for column, metric, doc, scale in _QUERY_COUNTERS:
            family = CounterMetricFamily(f"pgmux_query_{metric}", doc, labels=labels)
            for row in rows:
                family.add_metric(_query_labels(row, idx), row[idx[column]] * scale)
            yield family
        latency = GaugeMetricFamily("pgmux_query_latency_seconds", "Query time percentiles per statement "
                                    "(since the start or RESET QUERIES)", labels=[*labels, "quantile"])
        for row in rows:
            for quantile, column in (("0.5", "p50_query_time"), ("0.95", "p95_query_time"),
                                     ("0.99", "p99_query_time")):
                latency.add_metric([*_query_labels(row, idx), quantile], row[idx[column]] / 1e6)
        yield latency

    @staticmethod
    def _histograms(pools: list[Any]) -> Iterator[Metric]:
        """Only for pools whose PoolStats keep the int-bucket lists (see pgmux.stats.histogram)."""
        for attr, metric, doc, sum_attr in HISTOGRAMS:
            family = HistogramMetricFamily(f"pgmux_{metric}", doc, labels=["database", "user"])
            found = False
            for pool in pools:
                hist = getattr(pool.stats, attr, None)
                if hist is None:
                    continue
                found = True
                family.add_metric([pool.database, pool.user], cumulative_buckets(hist),
                                  getattr(pool.stats, sum_attr, 0) / 1e6)
            if found:
                yield family


def render_metrics(pooler: Pooler, merged: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """One scrape: (body, content type) in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolerCollector(pooler, merged))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
