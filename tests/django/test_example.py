"""The example project under gunicorn, through pgmux in transaction mode, under a load generator.

No mocks: PostgreSQL, ``manage.py pgmux`` and gunicorn (2 sync workers) are real processes. The load mixes
the benchmark view, ``QuerySet.iterator()`` (server-side ``WITH HOLD`` cursors, which pgmux pins), and
``atomic()`` + ``select_for_update()`` transfers, and must see 0 errors while the total balance holds and
PostgreSQL never sees more backends than the pool size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from djhelpers import ManagedPooler

from pgmux.django.loadtest import run_load
from pgmux.testing.cluster import BackendSampler, TempCluster, tail
from pgmux.testing.djangoapp import Gunicorn, http_get, manage

pytestmark = pytest.mark.pgmux_only

POOL_SIZE = 4  # examples/djangoapp settings: PGMUX_POOL_SIZE default


def get(port: int, path: str) -> tuple[int, Any]:
    """(status, JSON or text body) of a GET to the example."""
    status, body = http_get(port, path)
    return status, json.loads(body) if body[:1] in (b"{", b"[") else body.decode()


@pytest.fixture(scope="module")
def gunicorn(shop_migrated: ManagedPooler) -> Iterator[Callable[..., Gunicorn]]:
    made: list[Gunicorn] = []

    def start(**env: str) -> Gunicorn:
        g = Gunicorn(dict(shop_migrated.env, **env), start_timeout=20)
        made.append(g)
        return g

    yield start
    for g in made:
        output = g.stop()
        if "Traceback" in output:
            print(f"--- gunicorn output ---\n{tail(output, 60)}")


PATHS = ["/items/", "/items/iter/", "/transfer/", "/items/", "/transfer/", "/pgmux/health"]


def test_load_through_pgmux_has_no_errors(gunicorn: Callable[..., Gunicorn], shop_migrated: ManagedPooler,
                                          cluster: TempCluster) -> None:
    g = gunicorn()
    with BackendSampler(cluster, usename="shop", datname="shop", interval=0.1) as sampler:
        result = run_load("127.0.0.1", g.port, PATHS, concurrency=8, duration=6, max_requests=1500)
    sampler.stop()
    print(result.summary(), "backends max", sampler.max)
    assert result.errors == 0, result.error_samples
    assert result.requests >= 100, result.summary()
    assert all(result.by_path.get(p, 0) > 10 for p in set(PATHS)), result.by_path
    assert 1 <= sampler.max <= POOL_SIZE
    status, balance = get(g.port, "/balance/")
    assert status == 200 and balance["total"] == balance["expected"]
    # the iterator's WITH HOLD cursors pinned their clients (and nothing leaked between them)
    log = shop_migrated.log_text()
    assert "pinned to" in log and "unpinned from" in log


def test_load_with_prepared_statements(gunicorn: Callable[..., Gunicorn], shop_migrated: ManagedPooler) -> None:
    """server_side_binding + prepare_threshold through transaction pooling (pgmux's protocol-level statements)."""
    from pgmux.django import console

    g = gunicorn(DJANGOAPP_PREPARED="1")
    entry = {"HOST": "127.0.0.1", "PORT": shop_migrated.port, "USER": "shop", "PASSWORD": "shop", "NAME": "shop",
             "PGMUX": {}}
    before = {r["database"]: r for r in console.show(entry, "stats")}["shop"]
    result = run_load("127.0.0.1", g.port, ["/items/", "/transfer/", "/items/iter/"], concurrency=6, duration=3,
                      max_requests=600)
    assert result.errors == 0, result.error_samples
    after = {r["database"]: r for r in console.show(entry, "stats")}["shop"]
    assert int(after["total_bind_count"]) > int(before["total_bind_count"])
    status, balance = get(g.port, "/balance/")
    assert balance["total"] == balance["expected"]


def test_health_and_metrics_views(gunicorn: Callable[..., Gunicorn]) -> None:
    g = gunicorn()
    status, body = get(g.port, "/pgmux/health")
    assert status == 200, body
    item = body["databases"]["default"]
    assert item["ok"] and item["console"] == "ok" and item["cl_waiting"] == 0 and item["round_trip_ms"] > 0
    status, text = get(g.port, "/pgmux/metrics")
    assert status == 200
    assert "# TYPE pgmux_pool_cl_active gauge" in text
    assert 'pgmux_pool_sv_idle{pooler="127.0.0.1:' in text and 'database="shop",user="shop"}' in text
    assert "# TYPE pgmux_stats_total_xact_count counter" in text
    status, data = get(g.port, "/pgmux/metrics?format=json")
    assert status == 200 and data["poolers"][0]["up"] is True
    assert any(r["database"] == "shop" for r in data["poolers"][0]["pools"])


def test_check_command_of_the_example(shop_migrated: ManagedPooler) -> None:
    proc = manage(shop_migrated.env, "check", "--database", "default", "--fail-level", "WARNING")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues" in proc.stdout
